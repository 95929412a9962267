"""Training configs (``configs/training/*.yaml``), validated once at load."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from nextbest.config_loading import StrictModel, load_model


class DataSpec(StrictModel):
    logs: Path
    """Decision log to learn from: ``.parquet``, a directory of parts, or ``.csv``."""
    holdout_share: float = Field(default=0.3, gt=0.0, lt=1.0)
    """Share of decisions kept out of training and used for off-policy evaluation."""
    split_seed: int = 0


class NeuralBanditSpec(StrictModel):
    """The PyTorch neural bandit (see ``training.neural_bandit.NeuralBanditConfig``)."""

    hidden: int = Field(default=128, ge=1)
    embedding: int = Field(default=64, ge=1)
    epochs: int = Field(default=6, ge=1)
    batch_size: int = Field(default=4096, ge=1)
    learning_rate: float = Field(default=3e-3, gt=0)
    target: Literal["reward", "outcomes"] = "reward"
    """``reward``: regress the logged reward; ``outcomes``: conversion and complaint heads
    priced with the catalogue's economics."""
    loss: Literal["direct", "ips", "dr"] = "direct"
    ips_clip: float = Field(default=50.0, ge=1)
    dr_warmup_epochs: int = Field(default=2, ge=0)
    """First-stage (direct) epochs of the ``dr`` loss."""
    warm_start_epochs: int = Field(default=0, ge=0)
    """Behaviour-cloning epochs on the logging policy's choices before learning rewards."""
    seed: int = 0

    @model_validator(mode="after")
    def _dr_epochs(self) -> NeuralBanditSpec:
        if self.loss == "dr" and self.dr_warmup_epochs >= self.epochs:
            raise ValueError(
                f"dr_warmup_epochs ({self.dr_warmup_epochs}) must be below epochs ({self.epochs})"
            )
        return self


class RewardSpec(StrictModel):
    """How the log's reward is made (the simulator's and the bank's economics)."""

    complaint_penalty_cny: float = Field(default=300.0, ge=0)
    """CNY charged per complaint in the logged reward."""


class PolicySpec(StrictModel):
    kind: Literal["greedy", "softmax"] = "greedy"
    temperature: float = Field(default=1.0, gt=0)
    max_complaint_ratio: float | None = Field(default=None, gt=0)
    """Bound on the policy's predicted complaint rate, as a multiple of the logging policy's:
    a shadow price on complaints is raised until it holds (needs outcome heads). None: off."""


class EvaluationSpec(StrictModel):
    alpha: float = Field(default=0.05, gt=0, lt=1)
    bootstrap: int = Field(default=500, ge=10)
    seed: int = 0
    ground_truth: bool = True
    """For simulated logs (with ``simulation.json``): replay the simulator and log every
    policy's true value next to its estimates."""
    crossfit_folds: int = Field(default=2, ge=0)
    """DM and DR use a reward model cross-fitted on the held-out decisions in this many folds
    (by customer), independent of the policy's own scores, which are optimistic about the
    actions they pick; 0 uses the policy's scores."""

    @model_validator(mode="after")
    def _folds(self) -> EvaluationSpec:
        if self.crossfit_folds == 1:
            raise ValueError("crossfit_folds must be 0 (off) or at least 2, got 1")
        return self


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
    reward: RewardSpec = RewardSpec()
    neural_bandit: NeuralBanditSpec = NeuralBanditSpec()
    policy: PolicySpec = PolicySpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    tracking: TrackingSpec = TrackingSpec()
    export: ExportSpec = ExportSpec()

    @model_validator(mode="after")
    def _complaint_guard(self) -> TrainingConfig:
        guarded = self.policy.max_complaint_ratio is not None
        if guarded and (self.learner != "neural_bandit" or self.neural_bandit.target != "outcomes"):
            raise ValueError(
                "policy.max_complaint_ratio needs complaint predictions: learner neural_bandit "
                "with neural_bandit.target 'outcomes'"
            )
        return self


def load_training_config(path: str | Path) -> TrainingConfig:
    """Load a training config; errors name the file, the key and the reason."""
    return load_model(path, TrainingConfig)
