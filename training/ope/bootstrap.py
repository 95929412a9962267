"""Bootstrap confidence intervals for a policy value estimated as a mean of round rewards."""

from __future__ import annotations

import numbers

import numpy as np

BOOTSTRAP_CHUNK_ELEMENTS = 20_000_000
"""Resampled indices drawn at once (memory bound: 8 bytes each)."""


def bootstrap_interval(
    samples: np.ndarray,
    alpha: float = 0.05,
    n_bootstrap_samples: int = 1000,
    random_state: int | np.random.Generator | None = None,
    normaliser: np.ndarray | None = None,
) -> dict[str, float]:
    """Percentile bootstrap interval of the mean of ``samples`` (with ``normaliser``: of
    ``mean(samples) / mean(normaliser)``, the ratio recomputed in every resample).

    Parameters
    ----------
    samples : ndarray, shape (n,)
        Round-wise estimates whose mean is the policy value.
    alpha : float
        1 - confidence level, in (0, 1).
    n_bootstrap_samples : int
        Number of resamples (with replacement, each of size n).
    random_state : int, Generator or None
    normaliser : ndarray, shape (n,), optional
        A self-normalised estimate's per-round divisor (SNIPS: the importance weights).
        Resamples whose divisor sums to 0 have no value and are left out. When only a handful
        of rounds carry weight, most resamples repeat the same few and the interval narrows
        to almost nothing: no bootstrap interval is reliable there; read the effective sample
        size beside it.

    Returns
    -------
    dict
        ``mean`` (of the bootstrap means), ``lower`` and ``upper`` (percentiles
        ``100 alpha / 2`` and ``100 (1 - alpha / 2)``), ``alpha``.
    """
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim != 1 or len(samples) == 0:
        raise ValueError(f"`samples` must be a non-empty 1-d array, got shape {samples.shape}")
    if normaliser is not None:
        normaliser = np.asarray(normaliser, dtype=np.float64)
        if normaliser.shape != samples.shape:
            raise ValueError(
                f"`normaliser` has shape {normaliser.shape}, `samples` {samples.shape}"
            )
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"`alpha` must be in (0, 1), got {alpha}")
    if (
        isinstance(n_bootstrap_samples, bool)
        or not isinstance(n_bootstrap_samples, numbers.Integral)
        or n_bootstrap_samples < 1
    ):
        raise ValueError(
            f"`n_bootstrap_samples` must be a positive integer, got {n_bootstrap_samples!r}"
        )
    rng = (
        random_state
        if isinstance(random_state, np.random.Generator)
        else np.random.default_rng(random_state)
    )
    n = len(samples)
    chunk = max(1, BOOTSTRAP_CHUNK_ELEMENTS // n)
    means = np.empty(n_bootstrap_samples)
    done = 0
    while done < n_bootstrap_samples:
        k = min(chunk, n_bootstrap_samples - done)
        idx = rng.integers(0, n, size=(k, n))
        means[done : done + k] = samples[idx].mean(axis=1)
        if normaliser is not None:
            divisor = normaliser[idx].mean(axis=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                means[done : done + k] = np.where(
                    divisor > 0, means[done : done + k] / divisor, np.nan
                )
        done += k
    if normaliser is not None:
        means = means[~np.isnan(means)]  # resamples without weight have no value
        if len(means) == 0:  # the weight is 0 throughout
            nan = float("nan")
            return {"mean": nan, "lower": nan, "upper": nan, "alpha": alpha}
    return {
        "mean": float(means.mean()),
        "lower": float(np.percentile(means, 100 * alpha / 2)),
        "upper": float(np.percentile(means, 100 * (1 - alpha / 2))),
        "alpha": alpha,
    }
