"""Acting on scores: the distribution a policy draws its action from, over allowed actions.

Defined once for the trainers (the acting policy OPE evaluates) and the scoring service (the
distribution it draws from and logs, so ``pscore = dist[chosen]`` exactly). Blocked actions
always get probability 0.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Exploration = Literal["greedy", "epsilon_greedy", "softmax"]


def greedy_distribution(scores: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """One-hot on the best allowed action, float64 ``(n, A)`` (ties: the lowest id).

    Parameters
    ----------
    scores : float ``(n, A)``
    allowed : bool ``(n, A)``, at least one True per row
    """
    masked = np.where(allowed, scores, -np.inf)
    dist = np.zeros(scores.shape)
    dist[np.arange(len(scores)), masked.argmax(axis=1)] = 1.0
    return dist


def _epsilon_greedy_levels(counts: np.ndarray, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """The two probabilities of an epsilon-greedy row with ``counts`` allowed actions,
    float64 ``(n,)`` each: every allowed action's share of epsilon, and the greedy action's
    (its share plus ``1 - epsilon``). The one place they are computed, so that every form of
    the distribution (dense, one propensity, the allowed actions only) has the same bits."""
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"`epsilon` must be in [0, 1], got {epsilon}")
    share = epsilon / np.asarray(counts)
    return share, share + (1.0 - epsilon)


def epsilon_greedy_distribution(
    scores: np.ndarray, allowed: np.ndarray, epsilon: float, greedy: np.ndarray | None = None
) -> np.ndarray:
    """``1 - epsilon`` on the best allowed action plus ``epsilon`` spread evenly over all
    allowed actions, float64 ``(n, A)``. ``greedy`` (int ``(n,)``): the best allowed action
    when already known."""
    share, top = _epsilon_greedy_levels(np.count_nonzero(allowed, axis=1), epsilon)
    if greedy is None:
        greedy = np.where(allowed, scores, -np.inf).argmax(axis=1)
    dist = allowed * share[:, None]
    dist[np.arange(len(dist)), greedy] = top
    return dist


def epsilon_greedy_pscore(
    allowed: np.ndarray,
    greedy: np.ndarray,
    action: np.ndarray,
    epsilon: float,
    counts: np.ndarray | None = None,
) -> np.ndarray:
    """Probability each row's ``action`` has under :func:`epsilon_greedy_distribution`,
    float64 ``(n,)``, without building the ``(n, A)`` distribution (the same values).

    Parameters
    ----------
    allowed : bool ``(n, A)``
    greedy, action : int ``(n,)``, allowed actions
    counts : int ``(n,)``, optional
        ``allowed``'s count per row, if the caller has it (else counted here).
    """
    if counts is None:
        counts = np.count_nonzero(allowed, axis=1)
    share, top = _epsilon_greedy_levels(counts, epsilon)
    return np.where(np.asarray(action) == np.asarray(greedy), top, share)


def epsilon_greedy_candidate_probabilities(
    counts: np.ndarray, greedy_index: np.ndarray, epsilon: float
) -> np.ndarray:
    """:func:`epsilon_greedy_distribution` on the allowed actions only, row after row,
    rounded to float32 ``(total,)`` (the same bits as casting the dense distribution).
    ``counts`` int ``(n,)``: allowed actions per row; ``greedy_index`` int ``(n,)``: the
    greedy action's position in that flat list."""
    share, top = _epsilon_greedy_levels(counts, epsilon)
    dist = np.repeat(share.astype(np.float32), counts)
    dist[greedy_index] = top.astype(np.float32)
    return dist


def sample_epsilon_greedy(
    allowed: np.ndarray, greedy: np.ndarray, epsilon: float, rng: np.random.Generator
) -> np.ndarray:
    """Draw from the epsilon-greedy distribution without building it: the greedy action,
    or with probability ``epsilon`` a uniform draw among the allowed ones; int64 ``(n,)``.

    Parameters
    ----------
    allowed : bool ``(n, A)``
    greedy : int ``(n,)``, allowed actions
    """
    action = np.asarray(greedy, np.int64).copy()
    explore = np.flatnonzero(rng.random(len(action)) < epsilon)
    if len(explore):
        sub = allowed[explore]
        pick = (rng.random(len(explore)) * sub.sum(axis=1)).astype(np.int64)
        action[explore] = (np.cumsum(sub, axis=1) <= pick[:, None]).sum(axis=1)
    return action


def softmax_distribution(scores: np.ndarray, allowed: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax of ``scores / temperature`` over the allowed actions, float64 ``(n, A)``."""
    if not temperature > 0:
        raise ValueError(f"`temperature` must be positive, got {temperature}")
    masked = np.where(allowed, np.asarray(scores, np.float64), -np.inf)
    # the best allowed score subtracted before dividing: a tiny temperature then sends the
    # others to -inf (not scores to +-inf, whose difference would be NaN)
    masked -= masked.max(axis=1, keepdims=True)
    with np.errstate(over="ignore"):  # a gap past float64 over a tiny temperature: -inf, 0
        weights = np.exp(masked / temperature)
    return weights / weights.sum(axis=1, keepdims=True)


def action_distribution(
    scores: np.ndarray,
    allowed: np.ndarray,
    kind: Exploration,
    epsilon: float = 0.0,
    temperature: float = 1.0,
) -> np.ndarray:
    """The acting distribution of ``kind``, float64 ``(n, A)``, 0 on blocked actions."""
    if kind == "greedy":
        return greedy_distribution(scores, allowed)
    if kind == "epsilon_greedy":
        return epsilon_greedy_distribution(scores, allowed, epsilon)
    if kind == "softmax":
        return softmax_distribution(scores, allowed, temperature)
    raise ValueError(f"unknown exploration {kind!r}: greedy, epsilon_greedy or softmax")


def sample_actions(dist: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One action per row drawn from ``dist`` (float ``(n, A)``, rows summing to 1), int64
    ``(n,)``. Never an action of probability 0: the draw is clipped to the last positive one."""
    cumulative = np.cumsum(dist, axis=1)
    u = rng.random(len(dist)) * cumulative[:, -1]
    action = (cumulative <= u[:, None]).sum(axis=1)
    last_positive = dist.shape[1] - 1 - np.argmax(dist[:, ::-1] > 0, axis=1)
    return np.minimum(action, last_positive)
