"""Off-policy estimators: IPS, SNIPS, DM, DR and Switch-DR, with bootstrap intervals.

Every estimator takes the same arrays (see :mod:`training.ope.inputs`) and computes a
round-wise estimate whose mean is the value of the evaluation policy ``pi_e``. With
``w_i = pi_e(a_i | x_i) / pscore_i`` and a reward model ``q(x, a)``:

* IPS:       ``V = mean(w_i r_i)`` (``w`` clipped at ``lambda_``)
* SNIPS:     ``V = sum(w_i r_i) / sum(w_i)``
* DM:        ``V = mean(sum_a pi_e(a | x_i) q(x_i, a))``
* DR:        ``V = mean(q(x_i, pi_e) + w_i (r_i - q(x_i, a_i)))`` (``w`` clipped at ``lambda_``)
* Switch-DR: DR, where the correction term is dropped for rounds with ``w_i > lambda_``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from training.ope.bootstrap import bootstrap_interval
from training.ope.inputs import UndefinedEstimateError, check_ope_inputs


@dataclass(frozen=True)
class OffPolicyEstimator:
    """Base class. Subclasses set the class flags and implement :meth:`_round_rewards`."""

    needs_pscore: ClassVar[bool] = True
    needs_reward_model: ClassVar[bool] = False
    estimator_name: ClassVar[str] = "base"

    def _round_rewards(
        self,
        reward: np.ndarray,
        action: np.ndarray,
        dist: np.ndarray,
        pscore: np.ndarray | None,
        q_hat: np.ndarray | None,
        position: np.ndarray,
    ) -> np.ndarray:
        raise NotImplementedError

    def estimate_round_rewards(
        self,
        reward: np.ndarray,
        action: np.ndarray,
        action_dist: np.ndarray,
        pscore: np.ndarray | None = None,
        estimated_rewards_by_reg_model: np.ndarray | None = None,
        position: np.ndarray | None = None,
    ) -> np.ndarray:
        """Round-wise estimates, shape (n,); their mean is the policy value."""
        return self.estimate_round_terms(
            reward, action, action_dist, pscore, estimated_rewards_by_reg_model, position
        )[0]

    def estimate_round_terms(
        self,
        reward: np.ndarray,
        action: np.ndarray,
        action_dist: np.ndarray,
        pscore: np.ndarray | None = None,
        estimated_rewards_by_reg_model: np.ndarray | None = None,
        position: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The round-wise estimates ``(n,)`` and, for a self-normalised estimator (SNIPS), the
        per-round divisor ``(n,)`` whose mean is 1 over the sample (else None). A resample's
        value is ``mean(rounds[i]) / mean(divisor[i])``: :func:`bootstrap_interval` with
        ``normaliser`` recomputes the ratio in every resample, as the estimator does."""
        args = check_ope_inputs(
            reward,
            action,
            action_dist,
            pscore,
            estimated_rewards_by_reg_model,
            position,
            require_pscore=self.needs_pscore,
            require_estimated_rewards=self.needs_reward_model,
            estimator=type(self).__name__,
        )
        return self._round_terms(*args)

    def _round_terms(
        self,
        reward: np.ndarray,
        action: np.ndarray,
        dist: np.ndarray,
        pscore: np.ndarray | None,
        q_hat: np.ndarray | None,
        position: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`estimate_round_terms` on checked inputs (a plain mean: no divisor)."""
        return self._round_rewards(reward, action, dist, pscore, q_hat, position), None

    def estimate_policy_value(
        self,
        reward: np.ndarray,
        action: np.ndarray,
        action_dist: np.ndarray,
        pscore: np.ndarray | None = None,
        estimated_rewards_by_reg_model: np.ndarray | None = None,
        position: np.ndarray | None = None,
    ) -> float:
        """The estimated value of the evaluation policy (mean reward per round)."""
        return float(
            self.estimate_round_rewards(
                reward, action, action_dist, pscore, estimated_rewards_by_reg_model, position
            ).mean()
        )

    def estimate_interval(
        self,
        reward: np.ndarray,
        action: np.ndarray,
        action_dist: np.ndarray,
        pscore: np.ndarray | None = None,
        estimated_rewards_by_reg_model: np.ndarray | None = None,
        position: np.ndarray | None = None,
        alpha: float = 0.05,
        n_bootstrap_samples: int = 1000,
        random_state: int | np.random.Generator | None = None,
    ) -> dict[str, float]:
        """Bootstrap interval of the policy value: ``{"mean", "lower", "upper", "alpha"}``."""
        rounds, normaliser = self.estimate_round_terms(
            reward, action, action_dist, pscore, estimated_rewards_by_reg_model, position
        )
        return bootstrap_interval(rounds, alpha, n_bootstrap_samples, random_state, normaliser)


def _factual(array: np.ndarray, action: np.ndarray, position: np.ndarray) -> np.ndarray:
    """``array[i, action_i, position_i]`` for (n, A, L) arrays, shape (n,)."""
    return array[np.arange(len(action)), action, position]


def _at_position(array: np.ndarray, position: np.ndarray) -> np.ndarray:
    """``array[i, :, position_i]``, shape (n, A)."""
    return array[np.arange(len(position)), :, position]


def _check_lambda(value: float, name: str) -> None:
    """Refuse anything but a real number >= 0 (numpy scalars included; inf: no clipping)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"`{name}` must be a non-negative number, got {value!r}")
    if np.isnan(value) or value < 0:
        raise ValueError(f"`{name}` must be a non-negative number, got {value!r}")


@dataclass(frozen=True)
class InverseProbabilityWeighting(OffPolicyEstimator):
    """IPS. ``lambda_``: clip importance weights above this value (inf: no clipping)."""

    lambda_: float = np.inf
    estimator_name: ClassVar[str] = "ipw"

    def __post_init__(self) -> None:
        _check_lambda(self.lambda_, "lambda_")

    def _weights(self, action, dist, pscore, position) -> np.ndarray:
        weights = _factual(dist, action, position) / pscore
        return np.minimum(weights, self.lambda_)

    def _round_rewards(self, reward, action, dist, pscore, q_hat, position) -> np.ndarray:
        return reward * self._weights(action, dist, pscore, position)


@dataclass(frozen=True)
class SelfNormalizedInverseProbabilityWeighting(InverseProbabilityWeighting):
    """SNIPS: IPS divided by the mean importance weight (lower variance, small bias)."""

    estimator_name: ClassVar[str] = "snipw"

    def _round_terms(
        self, reward, action, dist, pscore, q_hat, position
    ) -> tuple[np.ndarray, np.ndarray]:
        weights = self._weights(action, dist, pscore, position)
        if weights.sum() == 0:
            raise UndefinedEstimateError(
                "SNIPS is undefined: the evaluation policy gives zero probability to every "
                "logged action (use IPS, whose estimate is then 0)"
            )
        divisor = weights / weights.mean()
        return reward * divisor, divisor


@dataclass(frozen=True)
class DirectMethod(OffPolicyEstimator):
    """DM: the reward model's prediction under the evaluation policy (needs no pscore)."""

    needs_pscore: ClassVar[bool] = False
    needs_reward_model: ClassVar[bool] = True
    estimator_name: ClassVar[str] = "dm"

    def _round_rewards(self, reward, action, dist, pscore, q_hat, position) -> np.ndarray:
        return (_at_position(dist, position) * _at_position(q_hat, position)).sum(axis=1)


@dataclass(frozen=True)
class DoublyRobust(OffPolicyEstimator):
    """DR: DM plus an importance-weighted correction of the reward model's error."""

    lambda_: float = np.inf
    needs_reward_model: ClassVar[bool] = True
    estimator_name: ClassVar[str] = "dr"

    def __post_init__(self) -> None:
        _check_lambda(self.lambda_, "lambda_")

    def _correction_weights(self, weights: np.ndarray) -> np.ndarray:
        return np.minimum(weights, self.lambda_)

    def _round_rewards(self, reward, action, dist, pscore, q_hat, position) -> np.ndarray:
        weights = self._correction_weights(_factual(dist, action, position) / pscore)
        baseline = (_at_position(dist, position) * _at_position(q_hat, position)).sum(axis=1)
        return baseline + weights * (reward - _factual(q_hat, action, position))


@dataclass(frozen=True)
class SwitchDoublyRobust(DoublyRobust):
    """Switch-DR: DR's correction only where the importance weight is at most ``lambda_``;
    elsewhere the reward model alone (DM)."""

    estimator_name: ClassVar[str] = "switch-dr"

    def _correction_weights(self, weights: np.ndarray) -> np.ndarray:
        return np.where(weights <= self.lambda_, weights, 0.0)


ESTIMATORS: dict[str, type[OffPolicyEstimator]] = {
    "ips": InverseProbabilityWeighting,
    "snips": SelfNormalizedInverseProbabilityWeighting,
    "dm": DirectMethod,
    "dr": DoublyRobust,
    "switch-dr": SwitchDoublyRobust,
}
"""Every estimator, by the name configs and the CLI use."""
