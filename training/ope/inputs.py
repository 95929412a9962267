"""Validation shared by every off-policy estimator, in the Open Bandit Pipeline vocabulary.

Arrays: ``reward`` (n,), ``action`` (n,) int, ``pscore`` (n,) the logging policy's
probability of the logged action, ``action_dist`` (n, A) or (n, A, L) the evaluation policy's
distribution, ``estimated_rewards_by_reg_model`` of the same shape, ``position`` (n,) int in
[0, L) for slate logs (optional, 0 when absent).
"""

from __future__ import annotations

import numpy as np

MISSING_PSCORE_HINT = (
    "this log has no propensities: use DirectMethod, which needs none, or log the logging "
    "policy's propensity of each chosen action (`pscore`; the simulator and the scoring "
    "service both do)"
)


class OpeInputError(ValueError):
    """Inputs an estimator cannot use; the message names the array and the reason."""


class UndefinedEstimateError(OpeInputError):
    """Valid inputs on which an estimator has no value (SNIPS when no logged action has
    probability under the evaluation policy)."""


def _fail(message: str) -> OpeInputError:
    return OpeInputError(message)


def as_3d(name: str, array: np.ndarray | None) -> np.ndarray | None:
    """``(n, A)`` arrays become ``(n, A, 1)``; ``(n, A, L)`` pass; anything else is refused."""
    if array is None:
        return None
    array = np.asarray(array, dtype=np.float64)
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim != 3:
        raise _fail(
            f"`{name}` must be 2- or 3-dimensional (n_rounds, n_actions[, len_list]), "
            f"got shape {array.shape}"
        )
    return array


def first_bad(mask: np.ndarray) -> int:
    """Index of the first True in a boolean array (flattened)."""
    return int(np.flatnonzero(np.asarray(mask).ravel())[0])


def check_ope_inputs(
    reward: np.ndarray,
    action: np.ndarray,
    action_dist: np.ndarray,
    pscore: np.ndarray | None = None,
    estimated_rewards_by_reg_model: np.ndarray | None = None,
    position: np.ndarray | None = None,
    require_pscore: bool = False,
    require_estimated_rewards: bool = False,
    estimator: str = "estimator",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray]:
    """Validate and normalise OPE inputs.

    Returns
    -------
    reward (n,) float64, action (n,) int64, action_dist (n, A, L) float64,
    pscore (n,) float64 or None, estimated_rewards (n, A, L) float64 or None,
    position (n,) int64

    Raises
    ------
    OpeInputError
        Naming the array and what was expected, for example "`pscore` must be in (0, 1],
        got 0.0 at round 3".
    """
    reward = np.asarray(reward, dtype=np.float64)
    if reward.ndim != 1:
        raise _fail(f"`reward` must be 1-dimensional, got shape {reward.shape}")
    n = len(reward)
    if n == 0:
        raise _fail("`reward` is empty: there is nothing to evaluate")
    if not np.isfinite(reward).all():
        raise _fail(
            f"`reward` must be finite, got {reward[first_bad(~np.isfinite(reward))]} "
            f"at round {first_bad(~np.isfinite(reward))}"
        )

    action = np.asarray(action)
    if action.shape != (n,):
        raise _fail(f"`action` must have shape ({n},) like `reward`, got {action.shape}")
    integral = np.issubdtype(action.dtype, np.integer) or (
        np.issubdtype(action.dtype, np.floating) and np.all(np.mod(action, 1) == 0)
    )
    if not integral:
        raise _fail(f"`action` must hold integer action ids, got dtype {action.dtype}")
    action = action.astype(np.int64)

    dist = as_3d("action_dist", action_dist)
    assert dist is not None
    if dist.shape[0] != n:
        raise _fail(f"`action_dist` has {dist.shape[0]} rounds but `reward` has {n}")
    n_actions, len_list = dist.shape[1], dist.shape[2]
    if (action < 0).any() or (action >= n_actions).any():
        i = first_bad((action < 0) | (action >= n_actions))
        raise _fail(
            f"`action` must be in [0, {n_actions}) (the width of `action_dist`), "
            f"got {action[i]} at round {i}"
        )
    if not np.isfinite(dist).all() or (dist < 0).any():
        raise _fail("`action_dist` must be finite and non-negative")
    sums = dist.sum(axis=1)
    if not np.allclose(sums, 1.0, atol=1e-6):
        i = first_bad(~np.isclose(sums, 1.0, atol=1e-6))
        raise _fail(
            f"`action_dist` must sum to 1 over actions, got {sums.ravel()[i]:.6g} "
            f"(round {i // len_list})"
        )

    if position is None:
        position_arr = np.zeros(n, np.int64)
    else:
        position_arr = np.asarray(position)
        if position_arr.shape != (n,):
            raise _fail(f"`position` must have shape ({n},), got {position_arr.shape}")
        position_arr = position_arr.astype(np.int64)
        if (position_arr < 0).any() or (position_arr >= len_list).any():
            raise _fail(f"`position` must be in [0, {len_list}) (len_list of `action_dist`)")
    if position is None and len_list > 1:
        raise _fail("`position` is required when `action_dist` has len_list > 1")

    pscore_arr: np.ndarray | None = None
    if pscore is not None:
        pscore_arr = np.asarray(pscore, dtype=np.float64)
        if pscore_arr.shape != (n,):
            raise _fail(f"`pscore` must have shape ({n},) like `reward`, got {pscore_arr.shape}")
        if np.isnan(pscore_arr).all():
            pscore_arr = None
        elif np.isnan(pscore_arr).any():
            i = first_bad(np.isnan(pscore_arr))
            raise _fail(f"`pscore` is missing at round {i} but present elsewhere")
    if pscore_arr is None and require_pscore:
        raise _fail(f"{estimator} needs `pscore`; {MISSING_PSCORE_HINT}")
    if pscore_arr is not None:
        bad = ~((pscore_arr > 0) & (pscore_arr <= 1))
        if bad.any():
            i = first_bad(bad)
            raise _fail(f"`pscore` must be in (0, 1], got {pscore_arr[i]} at round {i}")
        with np.errstate(divide="ignore", over="ignore"):
            bad = ~np.isfinite(1.0 / pscore_arr)
        if bad.any():  # subnormal: its importance weight overflows to inf, the value to NaN
            i = first_bad(bad)
            raise _fail(
                f"`pscore` {pscore_arr[i]} at round {i} is too small: its importance weight "
                "1 / pscore is not a finite number"
            )

    q_hat = as_3d("estimated_rewards_by_reg_model", estimated_rewards_by_reg_model)
    if q_hat is None and require_estimated_rewards:
        raise _fail(
            f"{estimator} needs `estimated_rewards_by_reg_model` (a reward model's "
            "prediction for every round and action)"
        )
    if q_hat is not None:
        if q_hat.shape != dist.shape:
            raise _fail(
                f"`estimated_rewards_by_reg_model` must have the shape of "
                f"`action_dist` {dist.shape}, got {q_hat.shape}"
            )
        if not np.isfinite(q_hat).all():
            raise _fail("`estimated_rewards_by_reg_model` must be finite")
    return reward, action, dist, pscore_arr, q_hat, position_arr
