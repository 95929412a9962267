"""A Gymnasium environment for one customer's journey, one step per day.

Observation: the customer's encoded context (``ContextEncoder``), float32 ``(F,)``.
Action: a catalogue action id. ``info["action_mask"]`` (int8 ``(A,)``) marks the actions the
rules and capacity allow today; the action space samples only allowed actions, and stepping
a blocked action raises :class:`~simulators.world.ComplianceViolationError` (the environment
never substitutes one). Reward: the day's value to the bank. The episode terminates when the
customer churns and is truncated after ``horizon_days``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

from nextbest.catalog import ActionCatalog
from nextbest.compliance import RuleEngine
from nextbest.features import ContextEncoder
from simulators.scenario import Scenario
from simulators.world import BatchSimulator


class AllowedActions(gym.spaces.Discrete):
    """``Discrete(A)`` whose ``sample()`` draws from today's allowed actions by default."""

    def __init__(self, n: int, seed: int | None = None) -> None:
        super().__init__(n, seed=seed)
        self.current_mask: np.ndarray | None = None

    def sample(self, mask: Any = None, probability: Any = None) -> np.int64:
        if mask is None and probability is None and self.current_mask is not None:
            mask = self.current_mask
        return super().sample(mask=mask, probability=probability)


class CustomerJourneyEnv(gym.Env):
    """One simulated customer, seeded by ``reset(seed=...)``."""

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}
    observation_bound = 50.0
    """Features are scaled to a few units; the bound only guards against nonsense."""

    def __init__(
        self,
        scenario: Scenario,
        catalog: ActionCatalog,
        engine: RuleEngine,
        horizon_days: int = 90,
    ) -> None:
        if horizon_days <= 0:
            raise ValueError(f"horizon_days must be positive, got {horizon_days}")
        self.scenario = scenario
        self.catalog = catalog
        self.engine = engine
        self.horizon_days = horizon_days
        self.encoder = ContextEncoder(catalog)
        self.observation_space = gym.spaces.Box(
            -self.observation_bound,
            self.observation_bound,
            shape=(self.encoder.n_features,),
            dtype=np.float32,
        )
        self.action_space = AllowedActions(catalog.n_actions)
        self.sim: BatchSimulator | None = None
        self._mask = np.zeros(catalog.n_actions, np.int8)
        self._obs = np.zeros(self.encoder.n_features, np.float32)

    def _observe(self) -> tuple[np.ndarray, dict[str, Any]]:
        assert self.sim is not None
        customers = self.sim.decision_customers()
        if len(customers):
            batch = self.sim.context(customers)
            bound = self.observation_bound
            self._obs = np.clip(self.encoder.encode(batch)[0], -bound, bound)
            self._mask = self.sim.allowed(customers, batch)[0].astype(np.int8)
        else:  # churned: only waiting is possible
            self._mask = np.zeros(self.catalog.n_actions, np.int8)
            self._mask[0] = 1
        self.action_space.current_mask = self._mask
        return self._obs.copy(), {"action_mask": self._mask.copy(), "day": self.sim.day}

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self.sim = BatchSimulator(
            self.scenario, self.catalog, self.engine, 1, seed=self.np_random, decide_every_day=True
        )
        return self._observe()

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self.sim is None:
            raise RuntimeError("call reset() before step()")
        action = int(action)
        customers = self.sim.decision_customers()
        allowed = self._mask.astype(bool)[None, :]
        result = self.sim.step(
            customers, np.array([action])[: len(customers)], allowed[: len(customers)]
        )
        reward = float(result.reward.sum())
        obs, info = self._observe()
        terminated = not bool(self.sim.pop.active[0])
        truncated = self.sim.day >= self.horizon_days
        info.update(
            converted=bool(result.converted.any()),
            complaint=bool(result.complaint.any()),
            opted_out=bool(result.opted_out.any()),
        )
        return obs, reward, terminated, truncated, info
