"""The softmax policy's distribution: a probability distribution over the allowed actions
for every temperature the settings accept, however extreme."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from nextbest.exploration import softmax_distribution

ACTIONS = 12


@given(
    scores=arrays(np.float64, (4, ACTIONS), elements=st.floats(-1e12, 1e12)),
    blocked=arrays(np.bool_, (4, ACTIONS)),
    temperature=st.sampled_from([1e-300, 1e-12, 1e-3, 1.0, 1e3, 1e300]),
)
def test_softmax_is_a_distribution_over_the_allowed_actions(
    scores: np.ndarray, blocked: np.ndarray, temperature: float
) -> None:
    allowed = ~blocked
    allowed[:, 0] = True  # no contact is always allowed
    dist = softmax_distribution(scores, allowed, temperature)
    assert np.isfinite(dist).all()
    np.testing.assert_allclose(dist.sum(axis=1), 1.0)
    assert (dist[~allowed] == 0).all()
    best = np.where(allowed, scores, -np.inf).max(axis=1, keepdims=True)
    assert (dist[(scores == best) & allowed] > 0).all()  # the best allowed action is drawn


def test_softmax_at_a_tiny_temperature_is_greedy_with_ties_shared() -> None:
    scores = np.array([[0.0, 5e9, 5e9, -3e9, 9e9]])  # over 1e-300: beyond float64
    allowed = np.array([[True, True, True, True, False]])
    dist = softmax_distribution(scores, allowed, 1e-300)
    np.testing.assert_array_equal(dist, [[0.0, 0.5, 0.5, 0.0, 0.0]])
