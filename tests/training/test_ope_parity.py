"""Our estimators give the same numbers as the Open Bandit Pipeline (obp 0.5.7)."""

from __future__ import annotations

import numpy as np
import pytest

from training import ope

obp_ope = pytest.importorskip("obp.ope", reason="obp is installed by `make test`")

PAIRS = [
    (ope.InverseProbabilityWeighting(), obp_ope.InverseProbabilityWeighting()),
    (
        ope.InverseProbabilityWeighting(lambda_=3.0),
        obp_ope.InverseProbabilityWeighting(lambda_=3.0),
    ),
    (
        ope.SelfNormalizedInverseProbabilityWeighting(),
        obp_ope.SelfNormalizedInverseProbabilityWeighting(),
    ),
    (ope.DirectMethod(), obp_ope.DirectMethod()),
    (ope.DoublyRobust(), obp_ope.DoublyRobust()),
    (ope.DoublyRobust(lambda_=3.0), obp_ope.DoublyRobust(lambda_=3.0)),
    (ope.SwitchDoublyRobust(lambda_=2.0), obp_ope.SwitchDoublyRobust(lambda_=2.0)),
]


def random_inputs(seed: int, len_list: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n, n_actions = 500, 7
    dist = rng.dirichlet(np.ones(n_actions) * 0.5, (n, len_list)).transpose(0, 2, 1)
    out = {
        "reward": rng.normal(1.0, 2.0, n),
        "action": rng.integers(0, n_actions, n),
        "pscore": rng.uniform(0.05, 1.0, n),
        "action_dist": dist,
        "estimated_rewards_by_reg_model": rng.normal(0.5, 1.0, (n, n_actions, len_list)),
    }
    if len_list > 1:
        out["position"] = rng.integers(0, len_list, n)
    return out


@pytest.mark.parametrize("len_list", [1, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("ours", "theirs"), PAIRS, ids=lambda e: repr(e))
def test_estimate_policy_value_matches_obp(ours, theirs, seed: int, len_list: int) -> None:
    inputs = random_inputs(seed, len_list)
    expected = theirs.estimate_policy_value(**inputs)
    got = ours.estimate_policy_value(**inputs)
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-12)
    with_position = {"position": np.zeros(len(inputs["reward"]), int), **inputs}
    np.testing.assert_allclose(
        ours.estimate_round_rewards(**with_position),
        theirs._estimate_round_rewards(**with_position),
        rtol=1e-10,
        atol=1e-12,
    )
