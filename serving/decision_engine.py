"""The decision itself, in process: features, rules over the full catalogue, model scores,
exploration and ranking, for one customer or a campaign's batch.

Vectorised over customers; a single customer takes the rule engine's one-row path. The
exploration distribution is the one logged (``pscore = action_dist[chosen]``), drawn from a
generator the engine owns (seedable). Blocked actions have probability 0 and never rank.
No contact (action 0) is always available: a customer every contact is blocked for, or
whose candidate list the rules empty, gets no contact rather than a blocked action.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, TypeVar

import numpy as np

from nextbest.catalog import NO_CONTACT_ID, ActionCatalog
from nextbest.compliance import ALLOWED, RuleEngine
from nextbest.context import ContextBatch
from nextbest.decision_batch import DecisionBatch
from nextbest.exploration import (
    action_distribution,
    epsilon_greedy_distribution,
    epsilon_greedy_pscore,
    sample_actions,
    sample_epsilon_greedy,
)
from nextbest.features import ContextEncoder
from serving.model_store import LoadedModel, ModelStore

T = TypeVar("T")


def pick(items: list[T], rows: np.ndarray | slice) -> list[T]:
    """``items[rows]`` for a list: ``rows`` int ``(m,)`` or a slice."""
    if isinstance(rows, slice):
        return items[rows]
    return [items[i] for i in np.asarray(rows).tolist()]


@dataclass(frozen=True)
class Decisions:
    """The decisions for n customers over A actions.

    Attributes
    ----------
    features : float32 ``(n, F)``, the encoded contexts (logged with each decision)
    blocked_by : uint8 ``(n, A)``, index of the first blocking rule, ALLOWED if none
    allowed : bool ``(n, A)``, allowed by the rules and by the request's candidates
    scores : float32 ``(n, A)``, the model's scores of every action
    action : int64 ``(n,)``, the chosen action (drawn from ``action_dist``)
    pscore : float64 ``(n,)``, probability the chosen action had
    dist : float64 ``(n, A)`` or None, the exploration distribution (0 where not allowed)
        when the exploration builds one; None for epsilon-greedy, which ``greedy`` and
        ``epsilon`` describe (:attr:`action_dist` builds it on demand)
    greedy : int64 ``(n,)``, the best allowed action of every row
    epsilon : float or None, the epsilon of an epsilon-greedy distribution
    ranked : int64 ``(n, k)``, the best allowed actions by score, -1 padded
    ranked_scores : float32 ``(n, k)``, their scores (undefined where ``ranked`` is -1)
    blocked : list of lists of (action id, rule id) per customer, when explained, else None
    model_version, feature_spec_version : str
    """

    features: np.ndarray
    blocked_by: np.ndarray
    allowed: np.ndarray
    scores: np.ndarray
    action: np.ndarray
    pscore: np.ndarray
    dist: np.ndarray | None
    greedy: np.ndarray
    epsilon: float | None
    ranked: np.ndarray
    ranked_scores: np.ndarray
    blocked: list[list[tuple[int, str]]] | None
    model_version: str
    feature_spec_version: str

    @cached_property
    def action_dist(self) -> np.ndarray:
        """The exploration distribution, float64 ``(n, A)``, 0 where not allowed."""
        if self.dist is not None:
            return self.dist
        assert self.epsilon is not None  # the engine sets one or the other
        return epsilon_greedy_distribution(self.scores, self.allowed, self.epsilon, self.greedy)

    def take(self, rows: np.ndarray) -> Decisions:
        """The decisions of ``rows`` (int ``(m,)``), in that order."""
        columns = {n: None if a is None else a[rows] for n, a in self._per_row().items()}
        blocked = None if self.blocked is None else pick(self.blocked, rows)
        return replace(self, **columns, blocked=blocked)

    def with_rows(self, rows: np.ndarray, other: Decisions) -> Decisions:
        """These decisions with ``rows`` (int ``(m,)``) replaced by ``other``'s ``m``
        decisions (made again, by the same model and exploration)."""
        columns = {}
        for name, mine in self._per_row().items():
            if mine is None:
                columns[name] = None
                continue
            merged = mine.copy()
            merged[rows] = getattr(other, name)
            columns[name] = merged
        blocked = self.blocked
        if blocked is not None and other.blocked is not None:
            blocked = list(blocked)
            for row, explained in zip(np.asarray(rows).tolist(), other.blocked, strict=True):
                blocked[row] = explained
        return replace(self, **columns, blocked=blocked)

    def _per_row(self) -> dict[str, np.ndarray | None]:
        """The arrays with one row per customer, by field name."""
        return {
            name: getattr(self, name)
            for name in (
                "features",
                "blocked_by",
                "allowed",
                "scores",
                "action",
                "pscore",
                "dist",
                "greedy",
                "ranked",
                "ranked_scores",
            )
        }

    def journal_batch(self, **fields: Any) -> DecisionBatch:
        """These decisions as a :class:`~nextbest.decision_batch.DecisionBatch` (the
        allowed actions and their probabilities only); ``fields``: its other fields."""
        compact = None if self.dist is not None else (self.greedy, self.epsilon)
        return DecisionBatch.from_mask(
            self.allowed,
            self.dist,
            self.action,
            epsilon_greedy=compact,  # type: ignore[arg-type]  # the engine sets epsilon then
            **{"pscore": self.pscore, **fields},
        )


class ModelNotReadyError(RuntimeError):
    """No model is loaded yet (the service answers 503)."""


class DecisionEngine:
    """Decides for batches of customers with the store's current model.

    Parameters
    ----------
    catalog, rules : the catalogue and the compiled rule set
    models : the model store (its ``current`` model is read once per call)
    exploration : ``epsilon_greedy`` or ``softmax`` (``greedy`` for no exploration)
    epsilon, temperature : their parameters
    seed : seed of the exploration draws (None: fresh entropy)
    """

    def __init__(
        self,
        catalog: ActionCatalog,
        rules: RuleEngine,
        models: ModelStore,
        exploration: str = "epsilon_greedy",
        epsilon: float = 0.05,
        temperature: float = 1.0,
        seed: int | None = None,
    ) -> None:
        self.catalog = catalog
        self.rules = rules
        self.models = models
        self.encoder = ContextEncoder(catalog)
        self.exploration = exploration
        self.epsilon = epsilon
        self.temperature = temperature
        # validates the exploration settings once, at start-up
        action_distribution(
            np.zeros((1, 2)), np.ones((1, 2), bool), exploration, epsilon, temperature
        )  # type: ignore[arg-type]
        self.rng = np.random.default_rng(seed)
        self._rule_ids = rules.rule_ids

    def decide(
        self,
        batch: ContextBatch,
        k: int = 3,
        candidates: np.ndarray | None = None,
        explain: bool = False,
        model: LoadedModel | None = None,
    ) -> Decisions:
        """Decide for every customer of ``batch``.

        Parameters
        ----------
        batch : ContextBatch of n customers
        k : how many ranked actions to return per customer
        candidates : bool ``(A,)`` or ``(n, A)``, optional
            The actions the caller allows (a campaign's offers, a channel subset); the rules
            still apply on top.
        explain : also list every blocked action with the rule that blocked it
        model : the model to score with (default: the store's current one); a caller
            deciding a batch in parts passes one, so a swap cannot split the batch

        Raises
        ------
        ModelNotReadyError
            When no model has been loaded.
        """
        if model is None:
            model = self.models.current  # one read: a swap during this call cannot split it
        if model is None:
            raise ModelNotReadyError("no model loaded")
        n, n_actions = batch.n, self.catalog.n_actions
        if n == 1:  # one customer: rules and features from one row of Python values
            row = batch.row(0)
            blocked_by = self.rules.evaluate_row(row)[None, :]
            features = self.encoder.encode_row(row)[None, :]
        else:
            blocked_by = self.rules.blocked_by(batch)
            features = self.encoder.encode(batch)
        allowed = blocked_by == ALLOWED
        if candidates is not None:
            allowed &= candidates
        allowed[:, NO_CONTACT_ID] = True
        scores = _finite(model.scorer.scores(features))
        masked = np.where(allowed, scores, -np.inf)
        ranked, ranked_scores = _top_k(masked, scores, max(1, min(k, n_actions)))
        greedy = ranked[:, 0]  # no contact is always allowed: never -1
        ranked, ranked_scores = ranked[:, :k], ranked_scores[:, :k]
        dist: np.ndarray | None = None
        epsilon: float | None = None
        if self.exploration == "epsilon_greedy":
            epsilon = self.epsilon
            action = sample_epsilon_greedy(allowed, greedy, epsilon, self.rng)
            pscore = epsilon_greedy_pscore(allowed, greedy, action, epsilon)
        else:
            dist = action_distribution(
                scores,
                allowed,
                self.exploration,  # type: ignore[arg-type]
                self.epsilon,
                self.temperature,
            )
            action = sample_actions(dist, self.rng)
            pscore = dist[np.arange(n), action]
        blocked = None
        if explain:
            blocked = [
                [(int(a), self._rule_ids[blocked_by[i, a]]) for a in np.flatnonzero(row != ALLOWED)]
                for i, row in enumerate(blocked_by)
            ]
        return Decisions(
            features,
            blocked_by,
            allowed,
            scores,
            action,
            pscore,
            dist,
            greedy,
            epsilon,
            ranked,
            ranked_scores,
            blocked,
            model.version,
            model.spec_version,
        )


def _finite(scores: np.ndarray) -> np.ndarray:
    """``scores`` with NaN and infinities replaced by the extreme finite floats, so that every
    allowed action keeps a rank (a NaN ranks last) whatever the model outputs."""
    if np.isfinite(scores.sum()):  # one pass in the common case
        return scores
    info = np.finfo(scores.dtype)
    return np.nan_to_num(scores, nan=info.min, posinf=info.max, neginf=info.min)


def _top_k(masked: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best allowed actions per row, int64 ``(n, k)`` (-1 where fewer are allowed),
    and their scores, float32 ``(n, k)``.

    ``masked`` is float ``(n, A)`` with -inf on actions not allowed (consumed: overwritten).
    k argmax passes (ties: the lowest id first): for the few actions a response ranks,
    cheaper than a partition.
    """
    n = len(masked)
    if n == 1:  # one customer: plain Python around k argmax calls over A scores
        line, scored = masked[0], scores[0]
        ranked_one, top_scores = [], []
        for _ in range(k):
            best = int(line.argmax())
            if line[best] == -np.inf:  # fewer than k allowed: pad
                break
            ranked_one.append(best)
            top_scores.append(scored[best])
            line[best] = -np.inf
        missing = k - len(ranked_one)
        ranked_one += [-1] * missing
        top_scores += [scored[0]] * missing
        return np.array([ranked_one], np.int64), np.array([top_scores], np.float32)
    rows = np.arange(n)
    ranked = np.empty((n, k), np.int64)
    for j in range(k):
        best = masked.argmax(axis=1)
        ranked[:, j] = np.where(np.isfinite(masked[rows, best]), best, -1)
        masked[rows, best] = -np.inf
    return ranked, np.take_along_axis(scores, np.maximum(ranked, 0), axis=1)
