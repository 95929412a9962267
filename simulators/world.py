"""The batch simulator: N customers, one step per day, vectorised with numpy.

Each day some customers reach a decision point (the scenario's cadence, plus event triggers:
mortgage-page views, a maturing product, two months without a login). For them the
simulator gives the context (:meth:`BatchSimulator.context`) and the allowed mask (rules
plus the day's relationship-manager capacity); a policy picks actions; :meth:`step` samples
outcomes from the exact response model, applies them, and advances every customer one day
(fatigue decay, events, logins, lifecycle, churn). An action the rules block raises at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np

from nextbest.catalog import ActionCatalog
from nextbest.compliance import ALLOWED, RuleEngine
from nextbest.context import ContextBatch
from nextbest.rewards import reward_cny
from nextbest.send_schedule import SendSchedule
from simulators.population import (
    CONTACT_RING_DAYS,
    CONTACT_WINDOW_DAYS,
    Population,
    sample_population,
)
from simulators.response import Outcome, ResponseModel, outcome_probabilities
from simulators.scenario import Scenario

DEFAULT_START = datetime(2026, 1, 5)  # a Monday, local midnight in the scenario's zone
DECLINE_AFTER_DAYS = 180.0


def _given(joint: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """P(stage | previous stage) from the two unconditional probabilities (0 where 0)."""
    return np.divide(joint, prior, out=np.zeros(joint.shape, np.float32), where=prior > 0)


class ComplianceViolationError(RuntimeError):
    """A policy chose an action the rules block. The simulator never substitutes one."""


@dataclass(frozen=True)
class StepResult:
    """Outcomes of one day's decisions, arrays of shape ``(n,)`` over the deciding customers."""

    customers: np.ndarray
    actions: np.ndarray
    delivered: np.ndarray
    opened: np.ndarray
    clicked: np.ndarray
    reward: np.ndarray
    converted: np.ndarray
    complaint: np.ndarray
    opted_out: np.ndarray
    value_cny: np.ndarray
    expected_reward: np.ndarray
    churned_today: int
    """Customers (any, not only deciders) who churned at the end of the day."""


class BatchSimulator:
    """A seeded population evolving day by day under a policy's decisions.

    Parameters
    ----------
    scenario, catalog, engine
        The world, the action catalogue and the compliance rules.
    n_customers : int
    seed : int or numpy.random.Generator
        The only source of randomness: the same seed gives the same trajectories.
    decide_every_day : bool
        Every active customer has a decision point every day (the one-customer environment),
        instead of the scenario's cadence and triggers.
    """

    def __init__(
        self,
        scenario: Scenario,
        catalog: ActionCatalog,
        engine: RuleEngine,
        n_customers: int,
        seed: int | np.random.Generator,
        start: datetime = DEFAULT_START,
        decide_every_day: bool = False,
    ) -> None:
        if n_customers <= 0:
            raise ValueError(f"n_customers must be positive, got {n_customers}")
        if engine.catalog is not catalog and engine.catalog.version != catalog.version:
            raise ValueError("the rule engine was built for another catalogue")
        self.scenario = scenario
        self.catalog = catalog
        self.engine = engine
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        self.decide_every_day = decide_every_day
        self.pop: Population = sample_population(scenario, catalog, n_customers, self.rng)
        self.model = ResponseModel.build(scenario, catalog)
        if start.tzinfo is not None:
            raise ValueError("start is a naive local date-time in the scenario's time zone")
        self.zone = ZoneInfo(scenario.population.timezone)
        self.start = start
        self.day = 0
        beh = scenario.behaviour
        self._fatigue_decay = np.float32(0.5 ** (1.0 / beh.fatigue.half_life_days))
        monthly = np.array(
            [beh.churn.monthly_base[s] for s in ("new", "growth", "mature", "decline")]
        )
        self._daily_churn = (1.0 - (1.0 - monthly) ** (1.0 / 30.0)).astype(np.float32)
        self._mortgage_rate = np.array(
            [beh.events.mortgage_views_per_day[s] for s in ("young", "middle", "senior")],
            np.float32,
        )
        gains = scenario.reward.aum_gain_cny
        self._aum_gain = np.array([gains.get(o.family, 0.0) for o in catalog.offers])
        self._renewal = self.model.renewal_offers
        self._schedule = SendSchedule.of(catalog)
        self._capacity = {
            i: ch.daily_capacity * n_customers / scenario.bank_customers
            for i, ch in enumerate(catalog.channels)
            if ch.daily_capacity is not None
        }
        self._channel_columns = {
            i: np.flatnonzero(catalog.channel_index == i) for i in range(catalog.n_channels)
        }
        self.capacity_rule_ids = tuple(
            f"capacity_{catalog.channel_names[i]}" for i in self._capacity
        )
        self._new_day()

    # -- what a policy sees -------------------------------------------------------------
    @property
    def n(self) -> int:
        return self.pop.n

    @property
    def now(self) -> datetime:
        """Local midnight starting the current simulated day, timezone-aware."""
        return (self.start + timedelta(days=self.day)).replace(tzinfo=self.zone)

    def decision_time_us(self, customers: np.ndarray) -> np.ndarray:
        """UTC time of each customer's decision today, microseconds since the epoch (n,)."""
        midnight_us = int(self.now.astimezone(UTC).timestamp()) * 1_000_000
        return midnight_us + self.hour[customers].astype(np.int64) * 3_600_000_000

    @property
    def weekday(self) -> int:
        return (self.start.weekday() + self.day) % 7

    def decision_customers(self) -> np.ndarray:
        """Indices of the customers with a decision point today, int ``(n,)``, ascending."""
        return self._deciders

    def context(self, customers: np.ndarray) -> ContextBatch:
        """The bank-visible context of ``customers`` at their decision hour today."""
        p = self.pop
        hour = self.hour[customers]
        now_hours = self.day * 24.0 + hour
        # 0 while a scheduled contact may still go out (the service clamps the same way)
        since_contact = np.maximum(now_hours - p.last_contact_hour[customers], 0.0)
        c7, c30 = self.window_counts(customers)
        return ContextBatch.from_columns(
            self.catalog,
            age=p.age[customers],
            aum_cny=p.aum_cny[customers],
            income_band=p.income_band[customers],
            risk_tolerance=p.risk_tolerance[customers],
            risk_assessment_age_days=p.risk_assessment_age_days[customers],
            lifecycle_stage=p.lifecycle_stage[customers],
            tenure_months=p.tenure_months[customers],
            app_logins_30d=p.app_logins_30d[customers],
            litigation=p.litigation[customers],
            dishonest_debtor=p.dishonest_debtor[customers],
            opted_out_all=p.opted_out_all[customers],
            days_since_complaint=p.days_since_complaint[customers],
            hours_since_last_contact=since_contact,
            local_hour=hour,
            local_weekday=np.full(len(customers), self.weekday),
            mortgage_page_views_7d=p.mortgage_page_views_7d[customers],
            days_to_product_maturity=p.days_to_product_maturity[customers],
            days_since_last_login=p.days_since_last_login[customers],
            contacts_7d_total=c7.sum(axis=1),
            contacts_30d_total=c30.sum(axis=1),
            consent=p.consent[customers],
            opt_out=p.opt_out[customers],
            contacts_7d=c7,
            contacts_30d=c30,
            holds=p.holds[customers],
            offer_views_30d=p.offer_views_30d[customers],
            usual_login_hour=p.usual_login_hour[customers],
        )

    def window_counts(self, customers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Contacts of ``customers`` in the 7- and 30-day windows before their decision hour
        today, int16 ``(n, C)`` each, as the service counts them: a contact counts while the
        latest it goes out lies less than the window before now. The contacts going out on
        the window's first day count if they went out after today's decision hour (of two on
        that day, both count if the later one did: more blocking, never less)."""
        p = self.pop
        hour = self.hour[customers]
        counts = []
        for days, base in ((7, p.contacts_7d), (CONTACT_WINDOW_DAYS, p.contacts_30d)):
            window = base[customers]
            if self.day >= days:
                first = (self.day - days) % CONTACT_RING_DAYS
                late = p.send_hour_ring[customers, first] > hour
                window = window + p.contact_ring[first, customers] * late[:, None]
            counts.append(window)
        return counts[0], counts[1]

    def blocked_by(self, customers: np.ndarray, batch: ContextBatch) -> np.ndarray:
        """Blocking code per (customer, action), uint8 ``(n, A)``, read-only: a rule index, a
        capacity code (``len(rules) + k`` for the k-th capacity channel) or ``ALLOWED``.

        Capacity: a channel with a daily capacity (relationship managers) is open today to the
        ``K`` customers of ``customers`` with the highest AUM among those the rules allow on
        that channel. ``K`` is the bank's capacity scaled to this population's size, rounded
        up or down at random each day so that small populations keep the expected capacity.
        """
        codes = self.engine.blocked_by(batch)
        n_rules = len(self.engine.rule_ids)
        for k, (channel, capacity) in enumerate(self._capacity_today.items()):
            cols = self._channel_columns[channel]
            block = np.take(codes, cols, axis=1)
            open_by_rules = (block == ALLOWED).any(axis=1)
            if open_by_rules.sum() <= capacity:
                continue
            candidates = np.flatnonzero(open_by_rules)
            aum = batch["aum_cny"][candidates]
            keep = candidates[np.argpartition(-aum, capacity)[:capacity]] if capacity else []
            closed = open_by_rules.copy()
            closed[keep] = False
            np.copyto(block, np.uint8(n_rules + k), where=(block == ALLOWED) & closed[:, None])
            codes[:, cols] = block
        codes.flags.writeable = False  # shared with the day's cache: nobody may edit it
        if customers is self._deciders or np.array_equal(customers, self._deciders):
            self._todays_codes = codes
        return codes

    @property
    def capacity_today(self) -> dict[str, int]:
        """Today's slots per capacity-limited channel, by channel name."""
        names = self.catalog.channel_names
        return {names[c]: k for c, k in self._capacity_today.items()}

    def todays_blocked_by(self) -> np.ndarray:
        """:meth:`blocked_by` for today's decision customers (cached for the day)."""
        if self._todays_codes is None:
            deciders = self._deciders
            self.blocked_by(deciders, self.context(deciders))
        assert self._todays_codes is not None
        return self._todays_codes

    def allowed(self, customers: np.ndarray, batch: ContextBatch) -> np.ndarray:
        """bool ``(n, A)``: what the rules and today's capacity allow."""
        return self.blocked_by(customers, batch) == ALLOWED

    def expected_outcome(self, customers: np.ndarray, actions: np.ndarray) -> Outcome:
        """Ground truth: exact outcome probabilities for today's state (no sampling).

        ``actions`` of shape ``(n,)`` gives one action per customer; ``(1, A)`` (with
        ``customers`` of shape ``(n, 1)``) gives every action.
        """
        return outcome_probabilities(self.model, self.pop, customers, actions, self.hour)

    # -- one day ------------------------------------------------------------------------
    def step(
        self, customers: np.ndarray, actions: np.ndarray, allowed: np.ndarray | None = None
    ) -> StepResult:
        """Apply today's decisions, then advance every customer one day.

        Parameters
        ----------
        customers : int array (n,)
            Must be :meth:`decision_customers` (customers without a decision point today
            are not contacted).
        actions : int array (n,)
            Chosen action ids.
        allowed : bool array (n, A), optional
            The mask the policy chose under. Only documentation: every action is checked
            against the simulator's own rules and capacity for today, whatever it says.

        Raises
        ------
        ComplianceViolationError
            If any chosen action is not allowed.
        """
        customers = np.asarray(customers, np.int64)
        actions = np.asarray(actions, np.int64)
        if not np.array_equal(customers, self._deciders):
            raise ValueError("step() takes exactly today's decision_customers()")
        if actions.shape != customers.shape:
            raise ValueError(f"actions has shape {actions.shape}, expected {customers.shape}")
        if len(actions) and (actions.min() < 0 or actions.max() >= self.catalog.n_actions):
            raise ValueError("action id outside the catalogue")
        ok = self.todays_blocked_by()[np.arange(len(actions)), actions] == ALLOWED
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise ComplianceViolationError(
                f"day {self.day}: action {self.catalog.actions[actions[i]].name} chosen for "
                f"customer #{customers[i]} is blocked by the rules"
            )
        outcome = self.expected_outcome(customers, actions)
        # the funnel, stage by stage: each stage given the one before
        u = self.rng.random((6, len(actions)), dtype=np.float32)
        delivered = u[0] < outcome.deliver
        opened = delivered & (u[1] < _given(outcome.opened, outcome.deliver))
        clicked = opened & (u[2] < _given(outcome.clicked, outcome.opened))
        converted = clicked & (u[3] < _given(outcome.convert, outcome.clicked))
        complaint = delivered & (u[4] < _given(outcome.complaint, outcome.deliver))
        opted_out = delivered & (u[5] < _given(outcome.opt_out, outcome.deliver))
        value = np.where(converted, outcome.value, np.float32(0.0))
        penalty = np.float32(self.scenario.reward.complaint_penalty_cny)
        reward = reward_cny(value, outcome.cost, complaint, penalty)
        self._apply(customers, actions, converted, complaint, opted_out)
        churned = self._advance()
        return StepResult(
            customers=customers,
            actions=actions,
            delivered=delivered,
            opened=opened,
            clicked=clicked,
            reward=reward.astype(np.float64),
            converted=converted,
            complaint=complaint,
            opted_out=opted_out,
            value_cny=value.astype(np.float64),
            expected_reward=outcome.expected_reward.astype(np.float64),
            churned_today=churned,
        )

    def _apply(
        self,
        customers: np.ndarray,
        actions: np.ndarray,
        converted: np.ndarray,
        complaint: np.ndarray,
        opted_out: np.ndarray,
    ) -> None:
        p = self.pop
        beh = self.scenario.behaviour
        ch = self.catalog.channel_index[actions].astype(np.int64)
        of = self.catalog.offer_index[actions].astype(np.int64)
        contact = ch >= 0
        who, chan = customers[contact], ch[contact]
        # the latest the contact goes out, as the service records it: a morning SMS decided
        # at 20:00 goes out by 11:00 tomorrow. The gap to the next contact counts from then,
        # and the contact counts in the 7- and 30-day windows from today until that many days
        # after the day it goes out (its ring slot is that day's)
        sent = self._schedule.hours_until_sent(actions[contact], self.hour[who], self.weekday)
        ahead, send_hour = np.divmod(self.hour[who] + sent, 24)  # ahead <= DAYS_AHEAD
        slot = (self.day + ahead) % CONTACT_RING_DAYS
        # ``who`` holds each customer once (one decision a day), so plain fancy-index
        # increments count every contact (``np.add.at`` would allow repeats, ~10x slower)
        p.contact_ring[slot, who, chan] += 1
        p.send_hour_ring[who, slot] = np.maximum(p.send_hour_ring[who, slot], send_hour)
        p.contacts_7d[who, chan] += 1
        p.contacts_30d[who, chan] += 1
        p.last_contact_hour[who] = self.day * 24.0 + self.hour[who] + sent
        p.fatigue[who] += np.float32(beh.fatigue.per_contact)

        conv = converted & contact
        cw, co = customers[conv], of[conv]
        p.holds[cw, co] = True
        p.aum_cny[cw] += self._aum_gain[co]
        p.days_since_conversion[cw] = 0.0
        p.lifecycle_stage[cw] = np.where(p.lifecycle_stage[cw] == 3, 1, p.lifecycle_stage[cw])
        renewed = self._renewal[co]
        p.days_to_product_maturity[cw[renewed]] = np.inf
        woken = conv.copy()
        woken[conv] = self.model.winback_offers[co] | (
            np.array(self.catalog.offer_names)[co] == "echannel_activation"
        )
        p.days_since_last_login[customers[woken]] = 0.0
        p.app_logins_30d[customers[woken]] = np.maximum(p.app_logins_30d[customers[woken]], 2.0)

        p.days_since_complaint[customers[complaint & contact]] = 0.0
        out = opted_out & contact
        all_channels = out & (self.rng.random(len(out)) < beh.opt_out.all_channels_share)
        p.opted_out_all[customers[all_channels]] = True
        single = out & ~all_channels
        p.opt_out[customers[single], ch[single]] = True

    def _advance(self) -> int:
        """Move every customer one day on; return how many churned."""
        p = self.pop
        beh = self.scenario.behaviour
        rng = self.rng
        n = p.n
        self.day += 1

        # rolling contact windows: the counts hold the send days after the window's first
        # day; its first day's contacts are added by the hour (:meth:`window_counts`)
        p.contacts_7d -= p.contact_ring[(self.day - 7) % CONTACT_RING_DAYS]
        p.contacts_30d -= p.contact_ring[(self.day - CONTACT_WINDOW_DAYS) % CONTACT_RING_DAYS]
        recycled = (self.day - CONTACT_WINDOW_DAYS - 1) % CONTACT_RING_DAYS
        p.contact_ring[recycled] = 0
        p.send_hour_ring[:, recycled] = 0

        p.fatigue *= self._fatigue_decay
        p.days_since_complaint += 1.0
        p.days_since_conversion += 1.0
        p.risk_assessment_age_days += 1.0
        p.tenure_months += np.float32(1.0 / 30.0)

        # app logins
        login = rng.random(n, dtype=np.float32) < np.minimum(p.app_logins_30d / 30.0, 1.0)
        p.days_since_last_login = np.where(login, 0.0, p.days_since_last_login + 1.0).astype(
            np.float32
        )
        p.app_logins_30d = (p.app_logins_30d * np.float32(29.0 / 30.0) + login).astype(np.float32)

        # behaviour events
        views = rng.poisson(self._mortgage_rate[p.life_stage]).astype(np.float32)
        p.mortgage_page_views_7d = p.mortgage_page_views_7d * np.float32(6.0 / 7.0) + views
        p.days_to_product_maturity -= 1.0
        matured = p.days_to_product_maturity < 0
        p.days_to_product_maturity[matured] = np.inf
        holder = (p.holds & self._renewal).any(axis=1)
        starts = (
            holder
            & np.isinf(p.days_to_product_maturity)
            & (rng.random(n, dtype=np.float32) < beh.events.new_maturity_per_day)
        )
        p.days_to_product_maturity[starts] = 60.0

        # lifecycle
        stage = p.lifecycle_stage
        stage[(stage == 0) & (p.tenure_months >= 6)] = 1
        stage[(stage == 1) & (p.tenure_months >= 24)] = 2
        stage[
            (p.days_since_last_login > DECLINE_AFTER_DAYS)
            & (p.days_since_conversion > DECLINE_AFTER_DAYS)
        ] = 3

        # churn: hazard rises with neglect and with over-contact
        churn = beh.churn
        hazard = self._daily_churn[stage].copy()
        hours_since = self.day * 24.0 - p.last_contact_hour
        neglected = hours_since > churn.neglect_days * 24.0
        hazard[neglected] *= np.float32(churn.neglect_factor)
        hazard *= 1.0 + np.float32(churn.fatigue_factor) * p.fatigue_sensitivity * p.fatigue
        hazard[p.days_since_complaint < 30] *= np.float32(churn.complaint_factor)
        hazard[p.days_since_conversion < 90] *= np.float32(churn.conversion_factor)
        hazard[matured & ~(p.days_since_conversion < 1)] *= 2.0
        churned = p.active & (rng.random(n, dtype=np.float32) < hazard)
        p.active &= ~churned
        self._new_day()
        return int(churned.sum())

    def _new_day(self) -> None:
        p = self.pop
        beh = self.scenario.behaviour
        rng = self.rng
        n = p.n
        lo, hi = beh.decision_hours
        self.hour = rng.integers(lo, hi, n).astype(np.int8)
        trig = beh.triggers
        triggered = (
            (p.mortgage_page_views_7d >= trig.mortgage_views_threshold)
            | (p.days_to_product_maturity <= 7)
            | ((p.days_since_last_login >= 60) & (p.days_since_last_login < 61))
        )
        due = rng.random(n, dtype=np.float32) < beh.decision_rate
        if self.decide_every_day:
            due[:] = True
        self._deciders = np.flatnonzero(p.active & (due | triggered))
        self._todays_codes: np.ndarray | None = None
        self._capacity_today = {
            channel: int(expected) + int(rng.random() < expected - int(expected))
            for channel, expected in self._capacity.items()
        }
