"""Off-policy estimators: exact identities, bias against a known truth, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest

from training.ope import (
    ESTIMATORS,
    DirectMethod,
    DoublyRobust,
    InverseProbabilityWeighting,
    OpeInputError,
    SelfNormalizedInverseProbabilityWeighting,
    SwitchDoublyRobust,
    bootstrap_interval,
)


def synthetic_log(n: int = 4000, n_actions: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    """A logged bandit problem with known expected rewards ``q`` (n, A)."""
    rng = np.random.default_rng(seed)
    q = rng.random((n, n_actions))
    behaviour = rng.dirichlet(np.ones(n_actions), n)
    action = (rng.random(n)[:, None] > np.cumsum(behaviour, axis=1)).sum(axis=1)
    reward = rng.binomial(1, q[np.arange(n), action]).astype(float)
    target = np.zeros((n, n_actions))
    target[np.arange(n), q.argmax(axis=1)] = 1.0
    return {
        "reward": reward,
        "action": action,
        "pscore": behaviour[np.arange(n), action],
        "behaviour": behaviour,
        "target": target,
        "q": q,
    }


@pytest.fixture(scope="module")
def log() -> dict[str, np.ndarray]:
    return synthetic_log()


def make(name: str):
    return ESTIMATORS[name](lambda_=50.0) if name == "switch-dr" else ESTIMATORS[name]()


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_estimate_policy_value_near_truth_every_estimator(log, name: str) -> None:
    truth = float((log["target"] * log["q"]).sum(axis=1).mean())
    noisy_q = np.clip(log["q"] + np.random.default_rng(1).normal(0, 0.05, log["q"].shape), 0, 1)
    est = make(name)
    value = est.estimate_policy_value(
        log["reward"], log["action"], log["target"], log["pscore"], noisy_q
    )
    rounds = est.estimate_round_rewards(
        log["reward"], log["action"], log["target"], log["pscore"], noisy_q
    )
    assert rounds.shape == (len(log["reward"]),)
    assert value == pytest.approx(rounds.mean())
    assert abs(value - truth) < 0.1, f"{name}: {value} vs truth {truth}"
    interval = est.estimate_interval(
        log["reward"], log["action"], log["target"], log["pscore"], noisy_q, random_state=3
    )
    assert interval["lower"] <= value <= interval["upper"]


def test_ips_on_policy_equals_mean_reward(log) -> None:
    value = InverseProbabilityWeighting().estimate_policy_value(
        log["reward"], log["action"], log["behaviour"], log["pscore"]
    )
    assert value == pytest.approx(log["reward"].mean(), rel=1e-12)


def test_snips_weights_average_to_one(log) -> None:
    rounds = SelfNormalizedInverseProbabilityWeighting().estimate_round_rewards(
        np.ones_like(log["reward"]), log["action"], log["target"], log["pscore"]
    )
    assert rounds.mean() == pytest.approx(1.0)


def test_dm_with_true_model_is_exact(log) -> None:
    truth = float((log["target"] * log["q"]).sum(axis=1).mean())
    value = DirectMethod().estimate_policy_value(
        log["reward"], log["action"], log["target"], None, log["q"]
    )
    assert value == pytest.approx(truth, rel=1e-12)


def test_dr_zero_model_equals_ips(log) -> None:
    zeros = np.zeros_like(log["q"])
    dr = DoublyRobust().estimate_policy_value(
        log["reward"], log["action"], log["target"], log["pscore"], zeros
    )
    ips = InverseProbabilityWeighting().estimate_policy_value(
        log["reward"], log["action"], log["target"], log["pscore"]
    )
    assert dr == pytest.approx(ips, rel=1e-12)


def test_switch_dr_extremes_equal_dm_and_dr(log) -> None:
    args = (log["reward"], log["action"], log["target"], log["pscore"], log["q"] * 0.9)
    assert SwitchDoublyRobust(lambda_=0.0).estimate_policy_value(*args) == pytest.approx(
        DirectMethod().estimate_policy_value(*args)
    )
    assert SwitchDoublyRobust(lambda_=np.inf).estimate_policy_value(*args) == pytest.approx(
        DoublyRobust().estimate_policy_value(*args)
    )


def test_ips_clipping_lowers_heavy_weights(log) -> None:
    args = (log["reward"], log["action"], log["target"], log["pscore"])
    clipped = InverseProbabilityWeighting(lambda_=2.0).estimate_round_rewards(*args)
    assert clipped.max() <= 2.0
    assert clipped.sum() < InverseProbabilityWeighting().estimate_round_rewards(*args).sum()


def test_estimate_policy_value_slate_positions(log) -> None:
    n = len(log["target"])
    dist3 = np.repeat(log["target"][:, :, None], 2, axis=2)
    q3 = np.repeat(log["q"][:, :, None], 2, axis=2)
    position = np.random.default_rng(0).integers(0, 2, n)
    value = DoublyRobust().estimate_policy_value(
        log["reward"], log["action"], dist3, log["pscore"], q3, position
    )
    flat = DoublyRobust().estimate_policy_value(
        log["reward"], log["action"], log["target"], log["pscore"], log["q"]
    )
    assert value == pytest.approx(flat)


def _bad(log, **override):
    args = {
        "reward": log["reward"][:10],
        "action": log["action"][:10],
        "action_dist": log["target"][:10],
        "pscore": log["pscore"][:10],
        "estimated_rewards_by_reg_model": log["q"][:10],
    }
    args.update(override)
    return args


BAD_INPUTS = [
    ({"pscore": np.r_[0.0, np.full(9, 0.5)]}, r"`pscore` must be in \(0, 1\], got 0.0 at round 0"),
    ({"pscore": np.r_[np.full(9, 0.5), 1.5]}, r"`pscore` must be in \(0, 1\], got 1.5 at round 9"),
    ({"pscore": np.full(9, 0.5)}, r"`pscore` must have shape \(10,\)"),
    ({"pscore": np.r_[np.nan, np.full(9, 0.5)]}, "`pscore` is missing at round 0"),
    ({"pscore": np.r_[np.full(9, 0.5), 1e-320]}, "1e-320 at round 9 is too small"),
    ({"pscore": None}, "needs `pscore`.*use DirectMethod"),
    ({"pscore": np.full(10, np.nan)}, "needs `pscore`.*log the logging policy's propensity"),
    ({"action": np.r_[99, np.zeros(9, int)]}, r"`action` must be in \[0, 6\).*got 99 at round 0"),
    ({"action": np.full(10, 0.5)}, "`action` must hold integer action ids"),
    ({"action": np.zeros(8, int)}, r"`action` must have shape \(10,\)"),
    ({"reward": np.r_[np.inf, np.zeros(9)]}, "`reward` must be finite"),
    ({"reward": np.zeros((10, 2))}, "`reward` must be 1-dimensional"),
    ({"action_dist": np.full((10, 6), 0.5)}, "`action_dist` must sum to 1"),
    ({"action_dist": np.full(10, 1.0)}, "`action_dist` must be 2- or 3-dimensional"),
    ({"estimated_rewards_by_reg_model": np.zeros((10, 5))}, "must have the shape of `action_dist`"),
    ({"estimated_rewards_by_reg_model": None}, "needs `estimated_rewards_by_reg_model`"),
]


@pytest.mark.parametrize(("override", "message"), BAD_INPUTS)
def test_estimate_policy_value_bad_input_refused(log, override, message) -> None:
    with pytest.raises(OpeInputError, match=message):
        DoublyRobust().estimate_policy_value(**_bad(log, **override))


def test_estimate_policy_value_empty_log_refused() -> None:
    with pytest.raises(OpeInputError, match="empty"):
        InverseProbabilityWeighting().estimate_policy_value(
            np.zeros(0), np.zeros(0, int), np.zeros((0, 3)), np.zeros(0)
        )


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "big", True, np.float32(-1)])
def test_estimator_bad_lambda_refused(bad) -> None:
    with pytest.raises(ValueError, match="`lambda_` must be a non-negative number"):
        InverseProbabilityWeighting(lambda_=bad)


@pytest.mark.parametrize("good", [5, 5.0, np.float32(5), np.int64(5), float("inf")])
def test_estimator_lambda_takes_any_real_number(good) -> None:
    """Numpy numbers as well (obp takes them)."""
    assert SwitchDoublyRobust(lambda_=good).lambda_ == good


def test_dm_needs_no_pscore(log) -> None:
    value = DirectMethod().estimate_policy_value(
        log["reward"], log["action"], log["target"], estimated_rewards_by_reg_model=log["q"]
    )
    assert np.isfinite(value)


def test_bootstrap_interval_covers_mean_at_nominal_rate() -> None:
    rng = np.random.default_rng(7)
    covered = 0
    for _ in range(100):
        samples = rng.exponential(1.0, 300)
        interval = bootstrap_interval(samples, alpha=0.1, n_bootstrap_samples=300, random_state=rng)
        covered += interval["lower"] <= 1.0 <= interval["upper"]
    assert 80 <= covered <= 98


def test_snips_interval_covers_the_truth_at_nominal_rate() -> None:
    """SNIPS's interval renormalises in every resample. Resampling its round rewards, each
    divided by the whole sample's mean weight, gives IPS's interval scaled by a constant: on
    this log (a rare action the target favours, worth nothing) that covered the truth in 75
    of these 150 replications."""
    rng = np.random.default_rng(11)
    logging = np.array([0.5, 0.02, 0.48])
    target = np.array([0.0, 0.5, 0.5])
    truth = 0.5 * 0.0 + 0.5 * 0.9
    n, covered, replications = 300, 0, 150
    for _ in range(replications):
        action = rng.choice(3, n, p=logging)
        reward = np.where(action == 2, rng.random(n) < 0.9, 0.0).astype(float)
        interval = SelfNormalizedInverseProbabilityWeighting().estimate_interval(
            reward,
            action,
            np.broadcast_to(target, (n, 3)).copy(),
            logging[action],
            alpha=0.05,
            n_bootstrap_samples=300,
            random_state=rng,
        )
        covered += interval["lower"] <= truth <= interval["upper"]
    assert covered >= 0.85 * replications, covered


def test_bootstrap_interval_normaliser_without_weight_is_left_out() -> None:
    """A resample whose divisor sums to 0 has no value: it is left out, not counted as 0."""
    samples = np.array([0.0, 0.0, 3.0])
    normaliser = np.array([0.0, 0.0, 3.0])  # value 1 wherever defined
    interval = bootstrap_interval(
        samples, n_bootstrap_samples=200, random_state=0, normaliser=normaliser
    )
    assert interval["lower"] == interval["upper"] == 1.0


def test_bootstrap_interval_seeded_is_reproducible() -> None:
    samples = np.random.default_rng(0).normal(size=500)
    assert bootstrap_interval(samples, random_state=5) == bootstrap_interval(
        samples, random_state=5
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 0.0}, "alpha"),
        ({"n_bootstrap_samples": 0}, "n_bootstrap_samples"),
        ({"n_bootstrap_samples": 2.5}, "`n_bootstrap_samples` must be a positive integer"),
    ],
)
def test_bootstrap_interval_bad_settings_refused(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        bootstrap_interval(np.ones(5), **kwargs)


def test_snips_without_overlap_refused(log) -> None:
    dist = np.zeros_like(log["target"])
    dist[np.arange(len(dist)), (log["action"] + 1) % dist.shape[1]] = 1.0
    with pytest.raises(OpeInputError, match="SNIPS is undefined"):
        SelfNormalizedInverseProbabilityWeighting().estimate_policy_value(
            log["reward"], log["action"], dist, log["pscore"]
        )
