"""A Vowpal Wabbit ``--cb_explore_adf`` contextual bandit, trained through VW's own parser.

Every logged decision becomes one multi-line ADF example in VW's text format::

    shared |x 0:0.25 3 7:-1.5 ...                  <- customer context, namespace x
    |p 0 |a 0                                      <- one line per allowed action ...
    17:-0.088:0.25 |c 1 |o 9 |t 29 |p 31:0.6 34:5.7071104 35:0.0198 |a 17
    ...                                            <- ... the logged one carries the label
    <blank line>

Context feature ``j`` is feature ``j`` of namespace ``x`` (zeros are left out, as VW drops
them, and so are values below :data:`FEATURE_FLOOR`). Action features are the columns of
:func:`nextbest.features.action_features`, named by their column number, in namespaces ``c``
(channel), ``o`` (offer), ``t`` (timing), ``p`` (the no-contact flag and the offer/channel
attributes) and ``a`` (the catalogue id). Only the allowed (candidate) actions of a decision
are written. The label of the logged action is
``action:cost:probability`` with ``cost = -reward / cost_scale`` (VW minimises cost; the scale
keeps costs near unit size, which VW's adaptive learning rate expects) and ``probability`` the
logged ``pscore`` (1 for ``cb_type dm`` on logs without propensities). VW ignores the action
number of an ADF label (the line's position says which action it is); it is the catalogue id
for people reading the file.

Scores for new contexts: VW's cost prediction for (context ``x``, action ``a``) is a sum of
hashed weights times feature values. With interactions only between the context and an
action namespace (or between two action namespaces) it is linear in ``x``::

    cost(x, a) = sum_j x_j (w[x_j] + sum_s sum_k v_ak w[x_j * s_k]) + b_a

so it collapses into a matrix ``C (F, A)`` and a bias ``b (A,)`` read from the workspace's weight
table at the indices VW's own hashing gives (:func:`linear_readout`; hash collisions are
reproduced, not avoided). The exported score is ``-cost_scale * cost``, a reward in CNY,
higher is better; with ``bag`` it is the mean of the bootstrapped models. VW clips
predictions to the range of costs it has seen, which no linear graph can do, so training sets
``--min_prediction``/``--max_prediction`` far outside any cost (:data:`PREDICTION_BOUND`).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import vowpalwabbit

from nextbest.catalog import ActionCatalog
from nextbest.features import FeatureSpec, action_feature_names, action_features
from nextbest.onnx_scoring import linear_scoring_model, save_scoring_model
from training.config import VW_ACTION_NAMESPACES, VW_SHARED_NAMESPACE, VwBanditSpec
from training.logged_data import LoggedBandit
from training.ope.inputs import MISSING_PSCORE_HINT

MODEL_KIND = "vw_bandit"
PREDICTION_BOUND = 1e6
"""``--min_prediction``/``--max_prediction``, in cost units: no clipping in practice."""
FNV_PRIME = np.uint64(16777619)
"""VW's quadratic-feature hash: ``index(u, v) = (FNV_PRIME * u) ^ v`` (feature indices)."""
FEATURE_FLOOR = 1e-6
"""Context values of smaller magnitude are written as 0 (left out). They are float noise
(``sin(pi)`` is 1.2e-16) or decays to nothing, and VW's normalised updates give a feature
seen only at magnitude ``m`` a weight of order ``1 / m``, which explodes at an ordinary value.
The exported model still multiplies them by ordinary weights: a difference below 1e-6."""
CHUNK_ROWS = 8192
"""Decisions formatted per vectorised chunk when writing a data file."""
NEEDS_PSCORE = ("mtr", "ips", "dr")


def action_namespace(name: str) -> str:
    """The VW namespace of an action-feature column (a name of ``action_feature_names``)."""
    for prefix, namespace in (("channel=", "c"), ("offer=", "o"), ("timing=", "t")):
        if name.startswith(prefix):
            return namespace
    return "p"


def action_lines(catalog: ActionCatalog) -> list[str]:
    """The unlabelled ADF line of every catalogue action, ``A`` strings ending in a newline."""
    features = action_features(catalog)
    spaces = [action_namespace(name) for name in action_feature_names(catalog)]
    lines = []
    for a, row in enumerate(features):
        parts: dict[str, list[str]] = {}
        for col in np.flatnonzero(row):
            value = row[col]
            token = str(col) if value == 1 else f"{col}:{value!s}"
            parts.setdefault(spaces[col], []).append(token)
        parts["a"] = [str(a)]
        lines.append(" ".join(f"|{ns} {' '.join(tokens)}" for ns, tokens in parts.items()) + "\n")
    return lines


def vw_arguments(spec: VwBanditSpec) -> list[str]:
    """VW command-line arguments of the learner (without data, cache or output options)."""
    args = ["--cb_explore_adf", "--cb_type", spec.cb_type]
    if spec.exploration == "epsilon":
        args += ["--epsilon", str(spec.epsilon)]
    elif spec.exploration == "squarecb":
        args += ["--squarecb", "--gamma_scale", str(spec.gamma_scale)]
    elif spec.exploration == "bag":
        args += ["--bag", str(spec.bag), "--epsilon", str(spec.epsilon)]
    else:
        args += ["--softmax", "--lambda", str(spec.softmax_lambda)]
    learning = ["-l", str(spec.learning_rate), "--power_t", str(spec.power_t)]
    learning += ["--l2", str(spec.l2), "--random_seed", str(spec.seed)]
    return [*args, *_feature_arguments(spec), *learning]


def _feature_arguments(spec: VwBanditSpec) -> list[str]:
    """Arguments that decide hashing and prediction (shared with the cost-predicting twin)."""
    args = ["-b", str(spec.bits)]
    for pair in spec.interactions:
        args += ["-q", pair]
    if not spec.constant:
        args.append("--noconstant")
    bound = f"{PREDICTION_BOUND:g}"
    return [*args, "--min_prediction", f"-{bound}", "--max_prediction", bound]


def check_vw_inputs(log: LoggedBandit, catalog: ActionCatalog, spec: VwBanditSpec) -> None:
    """Refuse a log the VW learner cannot use, before anything is written.

    Raises
    ------
    ValueError
        Naming the array and the reason: ``pscore`` missing for a propensity-weighted
        ``cb_type``, a logged action the rules did not allow, non-finite contexts or rewards,
        or a catalogue of another size.
    """
    if spec.cb_type in NEEDS_PSCORE and log.pscore is None:
        raise ValueError(
            f"vw_bandit cb_type {spec.cb_type!r} needs `pscore`; {MISSING_PSCORE_HINT}; "
            "or train with vw_bandit.cb_type 'dm'"
        )
    if log.n_actions != catalog.n_actions:
        raise ValueError(
            f"`candidates` has {log.n_actions} actions, the catalogue {catalog.n_actions}"
        )
    for name, values in (("context", log.context), ("reward", log.reward)):
        bad = ~np.isfinite(values)
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise ValueError(f"`{name}` must be finite, decision {row} is not")
    logged = log.candidates[np.arange(log.n_rounds), log.action]
    if not logged.all():
        row = int(np.flatnonzero(~logged)[0])
        raise ValueError(
            f"decision {row}: the logged action {log.action[row]} is not among its "
            "`candidate_actions`"
        )


def cost_scale(spec: VwBanditSpec, reward: np.ndarray) -> float:
    """CNY per unit of VW cost: the configured value, else the rewards' standard deviation
    (1 when the rewards are constant)."""
    if spec.cost_scale_cny is not None:
        return float(spec.cost_scale_cny)
    std = float(np.std(reward))
    return std if std > 0 else 1.0


def write_vw_data(
    path: str | Path,
    context: np.ndarray,
    candidates: np.ndarray,
    catalog: ActionCatalog,
    action: np.ndarray | None = None,
    cost: np.ndarray | None = None,
    probability: np.ndarray | None = None,
) -> int:
    """Write decisions as a VW ADF text data file, vectorised in chunks; returns its size.

    Parameters
    ----------
    path : the file to (over)write.
    context : float32 ``(n, F)``
        Values smaller than :data:`FEATURE_FLOOR` in magnitude are left out.
    candidates : bool ``(n, A)``, the allowed actions (one ADF line each).
    catalog : the action catalogue (``A`` actions).
    action, cost, probability : ``(n,)`` each, or all None for unlabelled examples
        The logged action id, its VW cost and its logging probability.

    Returns
    -------
    int : bytes written.
    """
    lines = pa.array(action_lines(catalog))
    size = 0
    with open(path, "wb") as out:
        for text in _text_chunks(context, candidates, lines, action, cost, probability):
            out.write(text)
            size += len(text)
    return size


def _text_chunks(
    context: np.ndarray,
    candidates: np.ndarray,
    lines: pa.Array,
    action: np.ndarray | None,
    cost: np.ndarray | None,
    probability: np.ndarray | None,
) -> Iterator[memoryview]:
    """VW text of ``CHUNK_ROWS`` decisions at a time (see :func:`write_vw_data`)."""
    names = pa.array([str(j) for j in range(context.shape[1])])
    for start in range(0, len(context), CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        labels = None
        if action is not None and cost is not None and probability is not None:
            labels = (action[rows], cost[rows], probability[rows])
        yield _chunk_text(context[rows], candidates[rows], lines, names, labels)


def _chunk_text(
    context: np.ndarray,
    candidates: np.ndarray,
    lines: pa.Array,
    names: pa.Array,
    labels: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
) -> memoryview:
    """The VW text of a chunk of decisions, as the value buffer of one Arrow string array.

    Every piece (shared line, action line, labelled line, blank line) is an Arrow string
    ending in a newline; one ``take`` puts them in file order, so no Python loop runs per
    decision or per action.
    """
    n, n_actions = candidates.shape
    row, col = np.nonzero(np.abs(context) >= FEATURE_FLOOR)
    value = pa.array(context[row, col].astype(np.float32))
    token = pc.if_else(
        pc.equal(value, 1.0),
        names.take(pa.array(col)),
        pc.binary_join_element_wise(names.take(pa.array(col)), pc.cast(value, pa.string()), ":"),
    )
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(np.bincount(row, minlength=n), out=offsets[1:])
    body = pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), token), " ")
    shared = pc.binary_join_element_wise(f"shared |{VW_SHARED_NAMESPACE} ", body, "\n", "")

    pair_row, pair_action = np.nonzero(candidates)
    source = n + pair_action.astype(np.int64)  # the catalogue's unlabelled line of the action
    pieces = [shared, lines]
    if labels is not None:
        act, cost, prob = labels
        head = pc.binary_join_element_wise(
            pc.cast(pa.array(act.astype(np.int64)), pa.string()),
            pc.cast(pa.array(cost.astype(np.float32)), pa.string()),
            pc.cast(pa.array(prob.astype(np.float32)), pa.string()),
            ":",
        )
        pieces.append(
            pc.binary_join_element_wise(head, lines.take(pa.array(act.astype(np.int64))), " ")
        )
        logged = pair_action == act[pair_row]
        source[logged] = n + n_actions + pair_row[logged]
    pieces.append(pa.array(["\n"]))
    blank = n + n_actions + (n if labels is not None else 0)

    counts = candidates.sum(axis=1)
    first = np.arange(n) * 2 + np.concatenate([[0], np.cumsum(counts)[:-1]])
    order = np.empty(2 * n + len(pair_row), np.int64)
    order[first] = np.arange(n)
    order[first + 1 + counts] = blank
    rank = np.arange(len(pair_row)) - (first[pair_row] - 2 * pair_row)
    order[first[pair_row] + 1 + rank] = source
    text = pa.concat_arrays([p.cast(pa.string()) for p in pieces]).take(pa.array(order))
    bounds = np.frombuffer(text.buffers()[1], np.int32)[text.offset : text.offset + len(text) + 1]
    return memoryview(text.buffers()[2])[bounds[0] : bounds[-1]]


class VwBandit:
    """A trained VW learner with its linear read-out.

    Attributes
    ----------
    workspace : vowpalwabbit.Workspace
        The trained ``--cb_explore_adf`` workspace.
    cost_weights : float64 ``(M, F, A)``, cost_bias : float64 ``(M, A)``
        VW's predicted cost of every action, ``context @ cost_weights[m] + cost_bias[m]``, for
        each of its ``M`` models (``bag`` models, else 1).
    weights : float64 ``(F, A)``, bias : float64 ``(A,)``
        The exported scores: ``-cost_scale`` times the models' mean cost, CNY.
    cost_scale : float
        CNY per unit of VW cost.
    history : list of dict
        Training metrics under namespaced keys (one entry: VW runs every pass itself).
    """

    def __init__(
        self,
        workspace: vowpalwabbit.Workspace,
        spec: VwBanditSpec,
        catalog: ActionCatalog,
        n_features: int,
        scale: float,
        history: list[dict[str, float]],
    ) -> None:
        self.workspace = workspace
        self.spec = spec
        self.catalog = catalog
        self.cost_scale = scale
        self.history = history
        models = spec.bag if spec.exploration == "bag" else 1
        self.cost_weights, self.cost_bias = linear_readout(
            workspace, spec, catalog, n_features, models
        )
        self.weights = -scale * self.cost_weights.mean(axis=0)
        self.bias = -scale * self.cost_bias.mean(axis=0)

    def scores(self, context: np.ndarray) -> np.ndarray:
        """Score of every action, float32 ``(n, A)``, CNY (``-cost_scale * cost``)."""
        return (np.asarray(context, np.float64) @ self.weights + self.bias).astype(np.float32)

    def export(self, path: str | Path, spec: FeatureSpec) -> Path:
        """Write the scores as a linear ONNX scoring model (spec inside and beside it)."""
        model = linear_scoring_model(self.weights, self.bias, spec, MODEL_KIND)
        return save_scoring_model(model, path, spec, MODEL_KIND)

    def vw_predictions(
        self,
        context: np.ndarray,
        candidates: np.ndarray,
        kind: Literal["pmf", "costs"] = "pmf",
    ) -> np.ndarray:
        """VW's own predictions, parsed by VW from the same text format, float64 ``(n, A)``.

        ``pmf``: the ``--cb_explore_adf`` workspace's action distribution (0 off the
        candidates). ``costs``: VW's predicted costs (NaN off the candidates), from a
        ``--cb_adf`` twin holding the trained weights, since exploration replaces the
        costs with probabilities; single-model explorations only (not ``bag``, whose
        models interleave in the weight table differently from one ``cb_adf`` model).
        """
        if kind == "costs":
            if self.spec.exploration == "bag":
                raise ValueError("VW predicts no costs for bag exploration: compare its pmf")
            workspace = self._cost_twin()
            fill = np.nan
        else:
            workspace, fill = self.workspace, 0.0
        out = np.full(candidates.shape, fill)
        lines = pa.array(action_lines(self.catalog))
        chunks = _text_chunks(context, candidates, lines, None, None, None)
        examples = (
            block.split("\n")
            for chunk in chunks
            for block in bytes(chunk).decode().split("\n\n")
            if block
        )
        for i, example in enumerate(examples):
            allowed = np.flatnonzero(candidates[i])
            out[i, allowed] = workspace.predict(example)
        return out

    def _cost_twin(self) -> vowpalwabbit.Workspace:
        """A ``--cb_adf`` workspace with the same hashing, weight layout (``cb_type dr``
        interleaves two models) and this model's weights."""
        args = ["--cb_adf", "--cb_type", self.spec.cb_type, *_feature_arguments(self.spec)]
        twin = vowpalwabbit.Workspace(arg_list=[*args, "--quiet"])
        for index in range(self.workspace.num_weights()):
            twin.set_weight(index, 0, self.workspace.get_weight(index, 0))
        return twin


def linear_readout(
    workspace: vowpalwabbit.Workspace,
    spec: VwBanditSpec,
    catalog: ActionCatalog,
    n_features: int,
    models: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """VW's cost prediction as a linear function of the context, read from its weights.

    The feature indices come from VW itself (a probe example with every context feature and
    every catalogue action goes through ``workspace.parse``, so hashing and any index
    multiplier are VW's); a quadratic feature's index is ``(FNV_PRIME * first) ^ second``,
    model ``m`` of several (``bag``) sits at index ``+ m``, and the table wraps at
    ``num_weights``.

    Returns
    -------
    cost_weights : float64 ``(models, F, A)``
    cost_bias : float64 ``(models, A)``
    """
    shared, columns = _probe_indices(workspace, catalog, n_features)
    mask = np.uint64(workspace.num_weights() - 1)
    n_actions = catalog.n_actions
    cost_weights = np.zeros((models, n_features, n_actions))
    cost_bias = np.zeros((models, n_actions))
    for m in range(models):
        offset = np.uint64(m)

        def weight(index: np.ndarray, offset: np.uint64 = offset) -> np.ndarray:
            unique, inverse = np.unique((index + offset) & mask, return_inverse=True)
            read = np.array([workspace.get_weight(int(u)) for u in unique], np.float64)
            return read[inverse].reshape(index.shape)

        x_index = shared["x"]
        cost_weights[m] += weight(x_index)[:, None]
        if "constant" in shared:
            cost_bias[m] += weight(shared["constant"])[0]
        for index, values in columns.values():
            cost_bias[m] += values @ weight(index)
        for first, second in spec.interactions:
            if VW_SHARED_NAMESPACE in (first, second):
                other = second if first == VW_SHARED_NAMESPACE else first
                index, values = columns[other]
                a, b = (x_index[:, None], index[None, :])
                pair = (FNV_PRIME * a) ^ b if first == VW_SHARED_NAMESPACE else (FNV_PRIME * b) ^ a
                cost_weights[m] += weight(pair) @ values.T
            else:
                (i1, v1), (i2, v2) = columns[first], columns[second]
                pair = (FNV_PRIME * i1[:, None]) ^ i2[None, :]
                cost_bias[m] += np.einsum("ac,ad,cd->a", v1, v2, weight(pair))
    return cost_weights, cost_bias


def _probe_indices(
    workspace: vowpalwabbit.Workspace, catalog: ActionCatalog, n_features: int
) -> tuple[dict[str, np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """VW's feature indices for the context and the catalogue's action features.

    Returns
    -------
    shared : ``{"x": uint64 (F,), "constant": uint64 (1,)}`` (no ``constant`` with
        ``--noconstant``)
    columns : per action namespace, ``(uint64 (C,), float64 (A, C))``: the indices of its
        ``C`` distinct features and each action's value of them (as VW parsed them).
    """
    probe = [f"shared |{VW_SHARED_NAMESPACE} " + " ".join(map(str, range(n_features)))]
    probe += [line.rstrip("\n") for line in action_lines(catalog)]
    examples = workspace.parse(probe)
    try:
        head = examples[0]
        x_index = [head.feature(VW_SHARED_NAMESPACE, k) for k in range(n_features)]
        rest = [index for index, _ in head.iter_features() if index not in set(x_index)]
        shared = {"x": np.array(x_index, np.uint64)}
        if rest:
            shared["constant"] = np.array(rest[:1], np.uint64)
        columns = {}
        for namespace in VW_ACTION_NAMESPACES:
            found: dict[int, int] = {}
            entries = []
            for a, example in enumerate(examples[1:]):
                for k in range(example.num_features_in(namespace)):
                    index = example.feature(namespace, k)
                    column = found.setdefault(index, len(found))
                    entries.append((a, column, example.feature_weight(namespace, k)))
            values = np.zeros((catalog.n_actions, len(found)))
            for a, column, value in entries:
                values[a, column] = value
            columns[namespace] = (np.array(list(found), np.uint64), values)
    finally:
        workspace.finish_example(examples)
    return shared, columns


def train_vw_bandit(
    log: LoggedBandit,
    catalog: ActionCatalog,
    spec: VwBanditSpec,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    data_path: str | Path | None = None,
) -> VwBandit:
    """Write ``log`` as a VW data file and train on it through VW's own parser.

    Parameters
    ----------
    log : LoggedBandit
        Contexts ``(n, F)``, logged actions, rewards, ``pscore`` and candidates ``(n, A)``.
    catalog : ActionCatalog
    spec : VwBanditSpec
    on_epoch : callable, optional
        Called once with step 0 and the training metrics (VW runs all passes itself).
    data_path : path, optional
        Where to write (and keep) the data file; default a temporary file, deleted after.

    Raises
    ------
    ValueError
        From :func:`check_vw_inputs`, before anything is written.
    """
    check_vw_inputs(log, catalog, spec)
    scale = cost_scale(spec, log.reward)
    probability = log.pscore if log.pscore is not None else np.ones(log.n_rounds)
    with tempfile.TemporaryDirectory(prefix="nextbest-vw-") as scratch:
        data = Path(data_path) if data_path is not None else Path(scratch) / "train.vw"
        start = time.perf_counter()
        size = write_vw_data(
            data, log.context, log.candidates, catalog, log.action, -log.reward / scale, probability
        )
        written = time.perf_counter()
        args = [*vw_arguments(spec), "--quiet", "-d", str(data)]
        if spec.passes > 1:
            cache = Path(scratch) / "train.cache"
            args += ["--passes", str(spec.passes), "--cache_file", str(cache), "-k"]
            args.append("--holdout_off")  # the training job holds out its own decisions
        workspace = vowpalwabbit.Workspace(arg_list=args)
        learned = time.perf_counter()
    examples = max(workspace.get_weighted_examples(), 1.0)
    metrics = {
        "losses/vw_progressive_cost": workspace.get_sum_loss() / examples,
        "charts/vw_examples": float(log.n_rounds * spec.passes),
        "charts/vw_data_mb": size / 1e6,
        "charts/vw_write_seconds": written - start,
        "charts/vw_learn_seconds": learned - written,
        "charts/vw_cost_scale_cny": scale,
    }
    if on_epoch is not None:
        on_epoch(0, metrics)
    return VwBandit(workspace, spec, catalog, log.context.shape[1], scale, [metrics])


__all__ = [
    "MODEL_KIND",
    "VwBandit",
    "action_lines",
    "check_vw_inputs",
    "linear_readout",
    "train_vw_bandit",
    "vw_arguments",
    "write_vw_data",
]
