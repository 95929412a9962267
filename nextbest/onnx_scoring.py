"""Exported scoring models: the one ONNX contract that training writes and serving reads.

A scoring model maps ``context`` float32 ``(batch, F)`` (the :class:`~nextbest.features.
ContextEncoder` encoding) to ``scores`` float32 ``(batch, A)``: one score per catalogue action,
higher is better. The compliance mask is never in the graph: the rule engine applies it, so
the rules stay auditable and change without re-exporting.

The feature spec the model was trained on travels inside the file, as the metadata property
:data:`SPEC_KEY` (JSON of :meth:`FeatureSpec.to_dict`), so a model from the registry is
self-describing. A ``<model>.spec.json`` sidecar is also written for people to read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from nextbest.features import FeatureSpec

INPUT_NAME = "context"
OUTPUT_NAME = "scores"
SPEC_KEY = "nextbest.feature_spec"
"""Metadata property of the ONNX model that holds its feature spec (JSON)."""
MODEL_KIND_KEY = "nextbest.model_kind"
"""Metadata property naming the learner that produced the model (``neural_bandit``, ...)."""
SOURCE_KEY = "nextbest.exported_from"
"""Metadata property of an exported model (``nextbest export``): the registered version it
was exported from (``nextbest/3``), so a service serving the file can say which it is."""
OPSET = 18


class ModelSpecError(ValueError):
    """An ONNX model file that is not a nextbest scoring model (or not the expected one)."""


def spec_path(model_path: str | Path) -> Path:
    """Where the human-readable feature spec of an exported model lives."""
    return Path(model_path).with_suffix(".spec.json")


def set_metadata(model: onnx.ModelProto, **values: str) -> onnx.ModelProto:
    """Set metadata properties of ``model`` (in place), replacing any of the same keys."""
    props = {p.key: p.value for p in model.metadata_props}
    props.update(values)
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model


def attach_spec(model: onnx.ModelProto, spec: FeatureSpec, model_kind: str) -> onnx.ModelProto:
    """Store ``spec`` and ``model_kind`` in the model's metadata properties (in place)."""
    return set_metadata(
        model,
        **{SPEC_KEY: json.dumps(spec.to_dict(), sort_keys=True), MODEL_KIND_KEY: model_kind},
    )


def save_scoring_model(
    model: onnx.ModelProto, path: str | Path, spec: FeatureSpec, model_kind: str
) -> Path:
    """Check ``model``, attach its spec, write it to ``path`` and the sidecar beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    attach_spec(model, spec, model_kind)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    spec_path(path).write_text(json.dumps(spec.to_dict(), indent=2))
    return path


def linear_scoring_model(
    weights: np.ndarray, bias: np.ndarray, spec: FeatureSpec, model_kind: str
) -> onnx.ModelProto:
    """A scoring graph ``scores = context @ weights + bias``.

    Parameters
    ----------
    weights : float ``(F, A)``
    bias : float ``(A,)``
    spec : the feature spec; ``F`` must equal ``spec.n_context``.
    """
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    bias = np.ascontiguousarray(bias, dtype=np.float32).reshape(-1)
    if weights.ndim != 2 or weights.shape[0] != spec.n_context:
        raise ValueError(
            f"weights must be (F={spec.n_context}, A), got shape {tuple(weights.shape)}"
        )
    if bias.shape[0] != weights.shape[1]:
        raise ValueError(f"bias must be ({weights.shape[1]},), got shape {tuple(bias.shape)}")
    n_actions = weights.shape[1]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", [INPUT_NAME, "weights"], ["linear"]),
            helper.make_node("Add", ["linear", "bias"], [OUTPUT_NAME]),
        ],
        "nextbest_linear_scores",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", spec.n_context])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", n_actions])],
        initializer=[
            numpy_helper.from_array(weights, "weights"),
            numpy_helper.from_array(bias, "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    return attach_spec(model, spec, model_kind)


def read_spec(model: onnx.ModelProto | ort.InferenceSession) -> dict[str, Any]:
    """The feature-spec dict stored in a scoring model (raises :class:`ModelSpecError`)."""
    if isinstance(model, ort.InferenceSession):
        props = dict(model.get_modelmeta().custom_metadata_map)
    else:
        props = {p.key: p.value for p in model.metadata_props}
    if SPEC_KEY not in props:
        raise ModelSpecError(f"the model has no {SPEC_KEY!r} metadata: not a nextbest export")
    return json.loads(props[SPEC_KEY])


class OnnxScorer:
    """A scoring model loaded in ONNX Runtime: ``scores(context) -> (n, A)``.

    Parameters
    ----------
    path : the ``.onnx`` file.
    threads : intra-op threads of the session (1 suits a server with one worker per core).
    content : the file's bytes, already read (the session is built from them, so a file
        replaced meanwhile cannot slip in under the version they were hashed for)
    """

    def __init__(self, path: str | Path, threads: int = 1, content: bytes | None = None) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # idle pool threads sleep rather than spin: a spinning thread takes a core from the
        # other worker and the writer threads between two calls
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = Path(path)
        if content is not None:  # weights kept in files beside the model are found there
            options.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", str(self.path.parent)
            )
        try:
            self.session = ort.InferenceSession(
                str(self.path) if content is None else content,
                options,
                providers=["CPUExecutionProvider"],
            )
        except Exception as exc:  # ONNX Runtime raises its own exception types
            raise ModelSpecError(f"{self.path}: cannot load ONNX model: {exc}") from exc
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [INPUT_NAME] or OUTPUT_NAME not in outputs:
            raise ModelSpecError(
                f"{self.path}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, "
                f"got inputs {inputs} and outputs {outputs}"
            )
        props = dict(self.session.get_modelmeta().custom_metadata_map)
        try:
            if SPEC_KEY in props:
                self.spec: dict[str, Any] = json.loads(props[SPEC_KEY])
            elif spec_path(self.path).exists():
                self.spec = json.loads(spec_path(self.path).read_text())
            else:
                raise ModelSpecError(f"{self.path}: no feature spec inside the model or beside it")
        except json.JSONDecodeError as exc:
            raise ModelSpecError(f"{self.path}: its feature spec is not JSON: {exc}") from None
        if (
            not isinstance(self.spec, dict)
            or not isinstance(self.spec.get("context_names"), list)
            or "version" not in self.spec
        ):
            raise ModelSpecError(
                f"{self.path}: its feature spec lacks a context_names list or a version"
            )
        self.model_kind = props.get(MODEL_KIND_KEY, "unknown")
        self.exported_from: str | None = props.get(SOURCE_KEY)
        """The registered version the file was exported from (:data:`SOURCE_KEY`), if any."""

    @property
    def spec_version(self) -> str:
        """Version of the feature spec the model was trained on."""
        return str(self.spec["version"])

    def require_features(self, expected: str, model: str, whose: str, advice: str = "") -> None:
        """Refuse a model trained on another feature spec than ``expected``.

        Raises
        ------
        ModelSpecError
            ``model <model> reads features <its spec>; <whose> <expected>[: <advice>]``.
        """
        if self.spec_version != expected:
            raise ModelSpecError(
                f"model {model!r} reads features {self.spec_version}; {whose} {expected}"
                + (f": {advice}" if advice else "")
            )

    def scores(self, context: np.ndarray) -> np.ndarray:
        """Scores of every action, float32 ``(n, A)``, for float32 contexts ``(n, F)``."""
        context = np.ascontiguousarray(context, dtype=np.float32)
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: context})[0]
