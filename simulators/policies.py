"""Logging policies: uniform over allowed actions, and the rule playbook banks run today.

Both are epsilon-greedy over the allowed actions: with probability ``1 - epsilon`` the greedy
action, otherwise an allowed action uniformly (uniform is ``epsilon = 1``). So the full action
distribution is known exactly and every logged decision carries its ``pscore``. A policy
only ever puts probability on allowed actions.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from nextbest.catalog import NO_CONTACT_ID, ActionCatalog
from nextbest.context import ContextBatch
from nextbest.exploration import sample_epsilon_greedy
from nextbest.segments import BEHAVIOURAL_SEGMENTS, LIFE_STAGES, behavioural_segment, life_stage

if TYPE_CHECKING:
    from simulators.world import BatchSimulator

NOT_IN_PLAYBOOK = -1e9


@dataclass(frozen=True)
class EpsilonGreedyDecision:
    """Decisions for n customers: greedy action, exploration rate, allowed mask, chosen action.

    ``allowed`` is bool ``(n, A)``; ``greedy`` and ``action`` are int ``(n,)``.
    """

    allowed: np.ndarray
    greedy: np.ndarray
    epsilon: float
    action: np.ndarray

    @cached_property
    def n_allowed(self) -> np.ndarray:
        """Allowed actions per customer, int ``(n,)``."""
        return np.count_nonzero(self.allowed, axis=1)

    def probability(self, actions: np.ndarray) -> np.ndarray:
        """Probability of ``actions`` (int ``(n,)``) under the decision rule, float64 ``(n,)``."""
        k = self.n_allowed
        allowed = self.allowed[np.arange(len(actions)), actions]
        p = self.epsilon / k + (1.0 - self.epsilon) * (actions == self.greedy)
        return np.where(allowed, p, 0.0)

    @property
    def pscore(self) -> np.ndarray:
        return self.probability(self.action)

    def candidate_distribution(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The full distribution in the logged form: ``(offsets (n+1,), candidates, probs)``,
        candidates in id order per customer and probabilities aligned with them."""
        n, n_actions = self.allowed.shape
        k = self.n_allowed
        flat = np.flatnonzero(self.allowed)  # row-major: grouped by customer, ids ascending
        cols = (flat - np.repeat(np.arange(n) * n_actions, k)).astype(np.int32)
        offsets = np.concatenate([[0], np.cumsum(k)]).astype(np.int32)
        probs = np.repeat((self.epsilon / k).astype(np.float32), k)
        greedy_at = np.searchsorted(flat, np.arange(n) * n_actions + self.greedy)
        probs[greedy_at] += np.float32(1.0 - self.epsilon)
        return offsets, cols, probs


def epsilon_greedy(
    allowed: np.ndarray, greedy: np.ndarray, epsilon: float, rng: np.random.Generator
) -> EpsilonGreedyDecision:
    """Sample actions: greedy with probability ``1 - epsilon``, else uniform over allowed.

    Raises
    ------
    ValueError
        If a greedy action is not allowed (a policy must never prefer a blocked action).
    """
    n = len(greedy)
    if not allowed[np.arange(n), greedy].all():
        bad = int(np.flatnonzero(~allowed[np.arange(n), greedy])[0])
        raise ValueError(f"greedy action {greedy[bad]} of row {bad} is blocked by the rules")
    action = sample_epsilon_greedy(allowed, greedy, epsilon, rng)
    return EpsilonGreedyDecision(allowed, greedy, float(epsilon), action)


class UniformPolicy:
    """Every allowed action (including no contact) with equal probability."""

    name = "uniform"

    def __init__(self, catalog: ActionCatalog) -> None:
        self.catalog = catalog

    def decide(
        self, batch: ContextBatch, allowed: np.ndarray, rng: np.random.Generator
    ) -> EpsilonGreedyDecision:
        """Decisions for the customers of ``batch``, given their allowed mask ``(n, A)``."""
        return epsilon_greedy(allowed, np.zeros(batch.n, np.int64), 1.0, rng)


TRIGGERS = ("none", "mortgage", "maturity", "care")


class PlaybookPolicy:
    """The rule playbook from the domain brief, as a bank runs it today.

    Segments: potential customers get asset-growth offers by AI call and relationship
    manager (HNW: private banking, family trust); active customers cross-sell by app and SMS;
    dormant customers win-back perks by WeChat and SMS, followed by a branch invitation.
    Triggers come first: 3+ mortgage-page views -> rate offer by SMS; a product maturing
    within 14 days -> renewal call; no login for 60 days -> care message. Timing by age:
    young in the evening, seniors in the morning, middle-aged in the evening or at the weekend.
    Each customer's preference list is tried in order; the first allowed entry is the greedy
    action, and if none is allowed the playbook waits.
    """

    name = "playbook"

    def __init__(self, catalog: ActionCatalog, epsilon: float = 0.1) -> None:
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
        self.catalog = catalog
        self.epsilon = epsilon
        table = self._build_table()
        # Per profile, the playbook's actions in preference order, padded with no-contact
        # (always allowed), so the greedy action is the first allowed entry of a short list.
        order = [np.flatnonzero(row > 0)[np.argsort(-row[row > 0], kind="stable")] for row in table]
        width = max(len(o) for o in order) + 1
        self._preferences = np.zeros((len(order), width), np.int64)
        for i, o in enumerate(order):
            self._preferences[i, : len(o)] = o

    def _offers_for(
        self, segment: str, stage: str, trigger: str, hnw: bool
    ) -> list[tuple[list[str], list[str]]]:
        """Ordered (offers, channels) preference entries for one profile."""
        entries: list[tuple[list[str], list[str]]] = []
        if trigger == "mortgage":
            entries.append((["mortgage_rate_offer"], ["sms", "app_push", "wechat"]))
        elif trigger == "maturity":
            entries.append(
                (
                    ["wealth_r2", "structured_deposit", "wealth_r1"],
                    ["outbound_call", "relationship_manager", "sms"],
                )
            )
        elif trigger == "care":
            entries.append((["market_report", "winback_perk"], ["wechat", "sms"]))
        if segment == "potential":
            if hnw:
                entries.append(
                    (["private_banking", "family_trust"], ["relationship_manager", "branch_invite"])
                )
            entries.append(
                (
                    ["fund_sip", "wealth_r3", "wealth_r2", "structured_deposit", "wealth_r1"],
                    ["outbound_call", "relationship_manager"],
                )
            )
            if stage != "young":
                entries.append((["personal_pension"], ["outbound_call", "relationship_manager"]))
        elif segment == "active":
            offers = {
                "young": ["credit_card_upgrade", "consumer_loan", "fund_sip"],
                "middle": [
                    "credit_card_upgrade",
                    "education_insurance",
                    "consumer_loan",
                    "fund_sip",
                ],
                "senior": ["health_insurance", "personal_pension", "wealth_r1"],
            }[stage]
            entries.append((offers, ["app_push", "sms"]))
        else:  # dormant
            entries.append((["winback_perk"], ["wechat", "sms"]))
            entries.append((["winback_perk", "market_report"], ["branch_invite"]))
        return entries

    def _build_table(self) -> np.ndarray:
        cat = self.catalog
        timing_order = {
            "young": ["evening", "now", "weekend", "morning"],
            "middle": ["evening", "weekend", "now", "morning"],
            "senior": ["morning", "now", "weekend", "evening"],
        }
        n_profiles = len(BEHAVIOURAL_SEGMENTS) * len(LIFE_STAGES) * len(TRIGGERS) * 2
        table = np.full((n_profiles, cat.n_actions), NOT_IN_PLAYBOOK, np.float32)
        table[:, NO_CONTACT_ID] = -1.0
        for seg in BEHAVIOURAL_SEGMENTS:
            for stage in LIFE_STAGES:
                for trig in TRIGGERS:
                    for hnw in (False, True):
                        row = table[self._profile_index(seg, stage, trig, hnw)]
                        rank = 0
                        for offers, channels in self._offers_for(seg, stage, trig, hnw):
                            for offer in offers:
                                for channel in channels:
                                    for t_rank, slot in enumerate(timing_order[stage]):
                                        name = f"{channel}:{offer}:{slot}"
                                        if cat.has_action(name):
                                            a = cat.action_id(name)
                                            row[a] = max(row[a], 1e6 - rank * 10 - t_rank)
                                    rank += 1
        return table

    @staticmethod
    def _profile_index(seg: str, stage: str, trig: str, hnw: bool) -> int:
        s = BEHAVIOURAL_SEGMENTS.index(seg)
        st = LIFE_STAGES.index(stage)
        t = TRIGGERS.index(trig)
        return ((s * len(LIFE_STAGES) + st) * len(TRIGGERS) + t) * 2 + int(hnw)

    def profiles(self, batch: ContextBatch) -> np.ndarray:
        """Playbook profile of each customer, int ``(n,)``."""
        seg = behavioural_segment(
            batch["aum_cny"], batch["days_since_last_login"], batch["lifecycle_stage"]
        ).astype(np.int64)
        stage = life_stage(batch["age"]).astype(np.int64)
        trig = np.where(
            batch["mortgage_page_views_7d"] >= 3,
            1,
            np.where(
                batch["days_to_product_maturity"] <= 14,
                2,
                np.where(batch["days_since_last_login"] >= 60, 3, 0),
            ),
        )
        hnw = (batch["aum_cny"] >= 6_000_000).astype(np.int64)
        return ((seg * len(LIFE_STAGES) + stage) * len(TRIGGERS) + trig) * 2 + hnw

    def greedy(self, batch: ContextBatch, allowed: np.ndarray) -> np.ndarray:
        """The playbook's first allowed preference per customer (no contact if none)."""
        prefs = self._preferences[self.profiles(batch)]
        ok = np.take_along_axis(allowed, prefs, axis=1)
        return prefs[np.arange(len(prefs)), ok.argmax(axis=1)]

    def decide(
        self, batch: ContextBatch, allowed: np.ndarray, rng: np.random.Generator
    ) -> EpsilonGreedyDecision:
        """Decisions for the customers of ``batch``, given their allowed mask ``(n, A)``."""
        return epsilon_greedy(allowed, self.greedy(batch, allowed), self.epsilon, rng)


class MyopicOraclePolicy:
    """The best allowed action by exact expected immediate reward (ground truth).

    Reads the simulator's hidden state, so it is a yardstick for regret, not a policy a bank
    could run. Deterministic (``epsilon`` 0 by default).
    """

    name = "myopic_oracle"

    def __init__(self, sim: BatchSimulator, epsilon: float = 0.0) -> None:
        self.sim = sim
        self.epsilon = epsilon

    def expected_rewards(self, customers: np.ndarray) -> np.ndarray:
        """Exact expected reward of every action, float32 ``(n, A)``."""
        actions = np.arange(self.sim.catalog.n_actions)[None, :]
        return self.sim.expected_outcome(customers[:, None], actions).expected_reward

    def decide(
        self, batch: ContextBatch, allowed: np.ndarray, rng: np.random.Generator
    ) -> EpsilonGreedyDecision:
        """Decisions for today's deciders (``batch`` must be their context)."""
        customers = self.sim.decision_customers()
        if len(customers) != batch.n:
            raise ValueError("the oracle decides for the simulator's decision customers only")
        values = np.where(allowed, self.expected_rewards(customers), -np.inf)
        return epsilon_greedy(allowed, values.argmax(axis=1), self.epsilon, rng)
