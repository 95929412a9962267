"""Running a logging policy in the batch simulator: decision logs and KPIs per segment."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nextbest.context import ContextBatch
from nextbest.decision_log import DECISION_SCHEMA, DecisionLogWriter
from nextbest.features import ContextEncoder
from nextbest.privacy import pseudonymise
from nextbest.segments import BEHAVIOURAL_SEGMENTS, behavioural_segment
from simulators.policies import EpsilonGreedyDecision
from simulators.world import BatchSimulator, StepResult

SIMULATION_KEY = b"nextbest-simulation-pseudonym-key"
"""Key for the pseudonyms of simulated customers (they are not real people)."""


class Policy(Protocol):
    """What the rollout needs of a policy (see :mod:`simulators.policies`)."""

    name: str

    def decide(
        self, batch: ContextBatch, allowed: np.ndarray, rng: np.random.Generator
    ) -> EpsilonGreedyDecision: ...


@dataclass
class SegmentKpis:
    """Running totals per behavioural segment (at decision time)."""

    decisions: np.ndarray = field(default_factory=lambda: np.zeros(len(BEHAVIOURAL_SEGMENTS)))
    contacts: np.ndarray = field(default_factory=lambda: np.zeros(len(BEHAVIOURAL_SEGMENTS)))
    opens: np.ndarray = field(default_factory=lambda: np.zeros(len(BEHAVIOURAL_SEGMENTS)))
    clicks: np.ndarray = field(default_factory=lambda: np.zeros(len(BEHAVIOURAL_SEGMENTS)))
    conversions: np.ndarray = field(default_factory=lambda: np.zeros(len(BEHAVIOURAL_SEGMENTS)))
    complaints: np.ndarray = field(default_factory=lambda: np.zeros(len(BEHAVIOURAL_SEGMENTS)))
    opt_outs: np.ndarray = field(default_factory=lambda: np.zeros(len(BEHAVIOURAL_SEGMENTS)))
    reward: np.ndarray = field(default_factory=lambda: np.zeros(len(BEHAVIOURAL_SEGMENTS)))

    def add(self, segment: np.ndarray, result: StepResult) -> None:
        k = len(BEHAVIOURAL_SEGMENTS)
        contact = result.actions > 0
        self.decisions += np.bincount(segment, minlength=k)
        self.contacts += np.bincount(segment, weights=contact, minlength=k)
        self.opens += np.bincount(segment, weights=result.opened, minlength=k)
        self.clicks += np.bincount(segment, weights=result.clicked, minlength=k)
        self.conversions += np.bincount(segment, weights=result.converted, minlength=k)
        self.complaints += np.bincount(segment, weights=result.complaint, minlength=k)
        self.opt_outs += np.bincount(segment, weights=result.opted_out, minlength=k)
        self.reward += np.bincount(segment, weights=result.reward, minlength=k)


@dataclass
class RolloutSummary:
    """KPIs of a run, per behavioural segment and overall."""

    policy: str
    customers: int
    days: int
    kpis: SegmentKpis
    initial_segment_sizes: np.ndarray
    churned_by_initial_segment: np.ndarray
    rows_logged: int = 0

    def table(self) -> list[dict[str, float | str]]:
        """One dict per segment plus ``all``: contact rate (contacts per decision), conversion
        and complaint and opt-out rates per contact, monthly churn, value per customer."""
        rows = []
        k = self.kpis
        months = self.days / 30.0
        names = [*BEHAVIOURAL_SEGMENTS, "all"]
        for i, name in enumerate(names):
            sel = slice(None) if name == "all" else slice(i, i + 1)
            decisions = k.decisions[sel].sum()
            contacts = k.contacts[sel].sum()
            size = self.initial_segment_sizes[sel].sum()
            rows.append(
                {
                    "segment": name,
                    "customers": int(size),
                    "decisions": int(decisions),
                    "contact_rate": _ratio(contacts, decisions),
                    "opens_per_contact": _ratio(k.opens[sel].sum(), contacts),
                    "clicks_per_contact": _ratio(k.clicks[sel].sum(), contacts),
                    "conversion_per_contact": _ratio(k.conversions[sel].sum(), contacts),
                    "complaints_per_contact": _ratio(k.complaints[sel].sum(), contacts),
                    "opt_outs_per_contact": _ratio(k.opt_outs[sel].sum(), contacts),
                    "monthly_churn": _ratio(
                        self.churned_by_initial_segment[sel].sum(), size * months
                    ),
                    "value_per_customer": _ratio(k.reward[sel].sum(), size),
                }
            )
        return rows

    def overall(self) -> dict[str, float | str]:
        return self.table()[-1]


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else 0.0


def run_policy(
    sim: BatchSimulator,
    policy: Policy,
    days: int,
    rng: np.random.Generator,
    log_dir: str | None = None,
    on_day: Callable[[int], None] | None = None,
    on_decide: Callable[[np.ndarray, ContextBatch, np.ndarray], None] | None = None,
) -> RolloutSummary:
    """Run ``policy`` for ``days`` days; optionally log every decision to ``log_dir``.

    Each logged row carries the encoded context, the allowed candidates, the chosen action,
    its ``pscore`` and the full action distribution over the candidates, and the outcome.
    ``on_decide(customers, batch, allowed)`` sees each day's decision points before the
    simulator steps (the state the decisions were made in), in log-row order.
    """
    if days <= 0:
        raise ValueError(f"days must be positive, got {days}")
    catalog = sim.catalog
    encoder = ContextEncoder(catalog) if log_dir else None
    keys = (
        pa.array([pseudonymise(f"SIM-{i:09d}", SIMULATION_KEY) for i in range(sim.n)], pa.string())
        if log_dir
        else None
    )
    pop = sim.pop
    initial = behavioural_segment(pop.aum_cny, pop.days_since_last_login, pop.lifecycle_stage)
    active_before = pop.active.copy()
    kpis = SegmentKpis()
    # The simulator builds its rows from validated parts; read_decisions checks the file.
    writer = DecisionLogWriter(log_dir, catalog.n_actions, validate=False) if log_dir else None
    model_version = f"{policy.name}-eps{getattr(policy, 'epsilon', 1.0):g}"
    id_rng = np.random.default_rng(rng.integers(2**63))
    run_id = f"sim{id_rng.integers(16**8):08x}"
    try:
        for _ in range(days):
            customers = sim.decision_customers()
            batch = sim.context(customers)
            allowed = sim.allowed(customers, batch)
            decision = policy.decide(batch, allowed, rng)
            if on_decide is not None:
                on_decide(customers, batch, allowed)
            segment = behavioural_segment(
                batch["aum_cny"], batch["days_since_last_login"], batch["lifecycle_stage"]
            ).astype(np.int64)
            if writer is not None and encoder is not None and keys is not None:
                day, timestamps = sim.day, sim.decision_time_us(customers)
                result = sim.step(customers, decision.action, allowed)
                writer.write(
                    _decision_rows(
                        sim,
                        encoder,
                        keys,
                        customers,
                        batch,
                        decision,
                        result,
                        day,
                        timestamps,
                        model_version,
                        policy.name,
                        run_id,
                        id_rng,
                    )
                )
            else:
                result = sim.step(customers, decision.action, allowed)
            kpis.add(segment, result)
            if on_day is not None:
                on_day(sim.day)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    rows = 0
    if writer is not None:
        rows = writer.rows
        writer.close()
    churned = active_before & ~pop.active
    k = len(BEHAVIOURAL_SEGMENTS)
    return RolloutSummary(
        policy=policy.name,
        customers=sim.n,
        days=days,
        kpis=kpis,
        initial_segment_sizes=np.bincount(initial, minlength=k).astype(float),
        churned_by_initial_segment=np.bincount(initial, weights=churned, minlength=k),
        rows_logged=rows,
    )


def _list_array(offsets: np.ndarray, values: np.ndarray, type_: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(
        pa.array(offsets, pa.int32()), pa.array(values, type_.value_type)
    )


def _decision_rows(
    sim: BatchSimulator,
    encoder: ContextEncoder,
    keys: pa.Array,
    customers: np.ndarray,
    batch,
    decision: EpsilonGreedyDecision,
    result: StepResult,
    day: int,
    timestamps_us: np.ndarray,
    model_version: str,
    policy_name: str,
    run_id: str,
    id_rng: np.random.Generator,
) -> pa.Table:
    """One day's decisions as a table in the decision schema. Decision ids are
    ``<run>-d<day>-<k>`` with ``k`` a random permutation of the day's rows, so an id reveals
    nothing about which customer it belongs to."""
    n = len(customers)
    features = encoder.encode(batch)
    width = features.shape[1]
    ctx_offsets = np.arange(0, (n + 1) * width, width, dtype=np.int32)
    offsets, candidates, probs = decision.candidate_distribution()
    contact = result.actions > 0
    ts = pa.array(timestamps_us.astype(np.int64), pa.int64()).cast(pa.timestamp("us", tz="UTC"))
    columns = {
        "decision_id": pc.binary_join_element_wise(
            f"{run_id}-d{day:04d}-",
            pc.cast(pa.array(id_rng.permutation(n)), pa.string()),
            "",
        ),
        "timestamp": ts,
        "customer_key": keys.take(pa.array(customers)),
        "context": _list_array(ctx_offsets, features.ravel(), pa.list_(pa.float32())),
        "candidate_actions": _list_array(offsets, candidates, pa.list_(pa.int32())),
        "action": pa.array(result.actions, pa.int32()),
        "pscore": pa.array(decision.pscore, pa.float64()),
        "action_dist": _list_array(offsets, probs, pa.list_(pa.float32())),
        "reward": pa.array(result.reward, pa.float64()),
        "converted": pa.array(result.converted),
        "complaint": pa.array(result.complaint & contact),
        "opted_out": pa.array(result.opted_out & contact),
        "value_cny": pa.array(result.value_cny, pa.float64()),
        "reward_at": ts,
        "campaign_id": pa.nulls(n, pa.string()),
        "policy": pa.repeat(policy_name, n),
        "model_version": pa.repeat(model_version, n),
        "ruleset_version": pa.repeat(sim.engine.version, n),
        "catalog_version": pa.repeat(sim.catalog.version, n),
        "feature_spec_version": pa.repeat(encoder.spec.version, n),
    }
    return pa.Table.from_arrays(list(columns.values()), schema=DECISION_SCHEMA)
