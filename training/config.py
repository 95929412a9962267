"""Training configs (``configs/training/*.yaml``), validated once at load."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from nextbest.config_loading import StrictModel, load_model


class DataSpec(StrictModel):
    logs: Path
    """Decision log to learn from: ``.parquet``, a directory of parts, or ``.csv``."""
    holdout_share: float = Field(default=0.3, gt=0.0, lt=1.0)
    """Share of decisions kept out of training and used for off-policy evaluation."""
    split_seed: int = 0


class NeuralBanditSpec(StrictModel):
    hidden: int = Field(default=128, ge=1)
    embedding: int = Field(default=64, ge=1)
    epochs: int = Field(default=6, ge=1)
    batch_size: int = Field(default=4096, ge=1)
    learning_rate: float = Field(default=3e-3, gt=0)
    loss: Literal["direct", "ips"] = "ips"
    ips_clip: float = Field(default=50.0, ge=1)
    seed: int = 0


class PolicySpec(StrictModel):
    kind: Literal["greedy", "softmax"] = "greedy"
    temperature: float = Field(default=1.0, gt=0)


class EvaluationSpec(StrictModel):
    alpha: float = Field(default=0.05, gt=0, lt=1)
    bootstrap: int = Field(default=500, ge=10)
    seed: int = 0


class TrackingSpec(StrictModel):
    uri: str = "sqlite:///mlflow.db"
    experiment: str = Field(default="nextbest", min_length=1)
    registered_model: str = Field(default="nextbest", min_length=1)


class ExportSpec(StrictModel):
    dir: Path = Path("data/models")


class TrainingConfig(StrictModel):
    """A training job: data, learner, acting policy, evaluation, tracking, export."""

    learner: Literal["neural_bandit"]
    data: DataSpec
    neural_bandit: NeuralBanditSpec = NeuralBanditSpec()
    policy: PolicySpec = PolicySpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    tracking: TrackingSpec = TrackingSpec()
    export: ExportSpec = ExportSpec()


def load_training_config(path: str | Path) -> TrainingConfig:
    """Load a training config; errors name the file, the key and the reason."""
    return load_model(path, TrainingConfig)
