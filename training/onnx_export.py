"""ONNX export of torch reward models (the contract is in :mod:`nextbest.onnx_scoring`).

The exported graph maps ``context`` float32 ``(batch, F)`` to ``scores`` float32
``(batch, A)``; the feature spec is stored inside the file and in a ``.spec.json`` sidecar.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
import torch

from nextbest.features import FeatureSpec
from nextbest.onnx_scoring import (
    INPUT_NAME,
    OUTPUT_NAME,
    OnnxScorer,
    save_scoring_model,
    spec_path,
)
from training.neural_bandit import RewardModel

__all__ = ["OnnxScorer", "export_reward_model", "spec_path"]

MODEL_KIND = "neural_bandit"


@contextmanager
def _exporter_notes_quiet() -> Iterator[None]:
    """The exporter's log notes (``torchvision is not installed. Skipping ...``, one line per
    operator it would have registered) left out; its errors still show."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def export_reward_model(model: RewardModel, path: str | Path, spec: FeatureSpec) -> Path:
    """Write ``model`` as ONNX to ``path`` (spec inside and beside it); return the path."""
    n_features = model.context_net[0].in_features
    if n_features != spec.n_context:
        raise ValueError(f"the model takes {n_features} features, the spec has {spec.n_context}")
    model.eval()
    example = torch.zeros(2, n_features)
    with tempfile.TemporaryDirectory() as scratch:
        raw = Path(scratch) / "model.onnx"
        with warnings.catch_warnings(), _exporter_notes_quiet():
            warnings.simplefilter("ignore")  # exporter chatter about deprecated internals
            torch.onnx.export(
                model,
                (example,),
                str(raw),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={"context": {0: torch.export.Dim("batch")}},
                dynamo=True,
                verbose=False,
            )
        # the dynamo exporter may keep weights in an external-data file: load them in
        exported = onnx.load(str(raw), load_external_data=True)
    return save_scoring_model(exported, path, spec, MODEL_KIND)
