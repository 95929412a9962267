"""ONNX export of reward models, and scoring with ONNX Runtime.

The exported graph maps ``context`` float32 ``(batch, F)`` to ``scores`` float32
``(batch, A)``: one score per catalogue action. The compliance mask is not in the graph: the
rule engine applies it (so the rules stay auditable and change without re-exporting).
A JSON sidecar (``<model>.spec.json``) carries the feature spec the model was trained on.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from nextbest.features import FeatureSpec
from training.neural_bandit import RewardModel

INPUT_NAME = "context"
OUTPUT_NAME = "scores"


def export_reward_model(model: RewardModel, path: str | Path, spec: FeatureSpec) -> Path:
    """Write ``model`` as ONNX to ``path`` and its feature spec beside it; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_features = model.context_net[0].in_features
    if n_features != spec.n_context:
        raise ValueError(f"the model takes {n_features} features, the spec has {spec.n_context}")
    model.eval()
    example = torch.zeros(2, n_features)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter about deprecated internals
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"context": {0: torch.export.Dim("batch")}},
            dynamo=True,
            verbose=False,
        )
    spec_path(path).write_text(json.dumps(spec.to_dict(), indent=2))
    return path


def spec_path(model_path: str | Path) -> Path:
    """Where the feature spec of an exported model lives."""
    model_path = Path(model_path)
    return model_path.with_suffix(".spec.json")


class OnnxScorer:
    """An exported model loaded in ONNX Runtime: ``scores(context) -> (n, A)``."""

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.path = Path(path)
        self.session = ort.InferenceSession(
            str(self.path), options, providers=["CPUExecutionProvider"]
        )
        self.spec = json.loads(spec_path(self.path).read_text())

    def scores(self, context: np.ndarray) -> np.ndarray:
        """Scores of every action, float32 ``(n, A)``, for float32 contexts ``(n, F)``."""
        context = np.ascontiguousarray(context, dtype=np.float32)
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: context})[0]
