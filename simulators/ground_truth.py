"""Ground truth for simulated decision logs: the exact value of any policy on logged decisions.

A simulated log is reproducible: ``nextbest simulate`` writes its :class:`SimulationRecipe`
(``simulation.json``) beside the Parquet parts, and the same recipe replays the same
trajectories (same seed, same logging policy). :func:`replay_truth` replays a log and, at
each selected decision point, in the very state the decision was made in, computes the exact
expected outcome of every catalogue action; any target policy's distribution over actions then
gives its true value on those decisions, next to what off-policy estimators say about it.

Values are per decision: the expected immediate reward (CNY) of the policy's action
distribution, the quantity OPE estimates. The myopic oracle takes the best allowed action by
that same expected reward.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from nextbest.catalog import ActionCatalog
from nextbest.compliance import ALLOWED, RuleEngine
from nextbest.compliance.reference import reference_blocked_by, reference_rule
from nextbest.config_loading import StrictModel, content_hash, load_model
from nextbest.context import ContextBatch
from nextbest.features import ContextEncoder
from nextbest.segments import BEHAVIOURAL_SEGMENTS, behavioural_segment
from simulators.policies import PlaybookPolicy, UniformPolicy
from simulators.rollout import Policy, RolloutSummary, run_policy
from simulators.scenario import load_scenario
from simulators.world import BatchSimulator

RECIPE_FILE = "simulation.json"
ORACLE = "myopic_oracle"
POLICY_COLUMNS = ("value", "complaint", "conversion", "contact")
"""What :func:`replay_truth` records of every policy at every row."""
CHUNK_ROWS = 8192
"""Decision points per ground-truth chunk (bounds memory: ~10 arrays of (chunk, A) floats)."""
REFERENCE_ROWS = 1_000
"""Evaluated decisions (spread over the replay) at which each policy's most likely action
is checked by the rules' reference semantics as well (:func:`reference_rule`: plain loops,
independent of the rule engine's tables): ~0.1 ms a decision and policy."""
MASK_ROWS = 50
"""Of those, how many have the engine's whole mask checked by the reference semantics, every
action (:func:`reference_blocked_by`, ~3 ms a decision): an action allowed that a rule
blocks, wherever it is, not only among the actions the policies pick."""

TargetPolicy = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
"""``policy(rows, context, allowed) -> dist``: log row indices int ``(m,)``, encoded contexts
float32 ``(m, F)``, allowed bool ``(m, A)`` -> action distribution float ``(m, A)``."""


SIMULATOR_REVISION = 1
"""Raised whenever a change to the simulator changes the trajectories a recipe makes (1:
contact windows counted by the hour, 2026-11-25); a recipe of another revision cannot be
replayed. Recipes written before revisions were recorded read as 0."""


class SimulationRecipe(StrictModel):
    """Everything needed to replay a simulated decision log exactly."""

    scenario: Path
    """Scenario YAML the log was simulated from."""
    scenario_hash: str
    """Content hash of the scenario file (a changed file cannot replay the log)."""
    customers: int = Field(ge=1)
    days: int = Field(ge=1)
    policy: Literal["playbook", "uniform"]
    epsilon: float = Field(ge=0.0, le=1.0)
    seed: int
    catalog_version: str
    ruleset_version: str
    simulator_revision: int = 0
    """:data:`SIMULATOR_REVISION` of the code that made the log."""

    @classmethod
    def create(
        cls,
        scenario: Path,
        customers: int,
        days: int,
        policy: Literal["playbook", "uniform"],
        epsilon: float,
        seed: int,
        catalog: ActionCatalog,
        engine: RuleEngine,
    ) -> SimulationRecipe:
        """A recipe for a new run (hashes the scenario file now)."""
        return cls(
            scenario=scenario.resolve(),
            scenario_hash=content_hash(scenario.read_text()),
            customers=customers,
            days=days,
            policy=policy,
            epsilon=epsilon,
            seed=seed,
            catalog_version=catalog.version,
            ruleset_version=engine.ruleset.version,
            simulator_revision=SIMULATOR_REVISION,
        )

    def check(self, catalog: ActionCatalog, engine: RuleEngine) -> None:
        """Refuse to replay when the scenario file, catalogue or rule set changed since the
        log was made (the replay would not be the log's world).

        Raises
        ------
        ValueError
            Naming what changed.
        """
        if self.simulator_revision != SIMULATOR_REVISION:
            raise ValueError(
                f"{RECIPE_FILE}: made by simulator revision {self.simulator_revision}, this "
                f"code's is {SIMULATOR_REVISION}: its replay would not be the log's world "
                "(simulate the log again, or turn the ground-truth replay off: "
                "evaluation.ground_truth: false)"
            )
        if not self.scenario.exists():
            raise ValueError(f"{RECIPE_FILE}: scenario {self.scenario} no longer exists")
        if content_hash(self.scenario.read_text()) != self.scenario_hash:
            raise ValueError(f"{RECIPE_FILE}: scenario {self.scenario} changed since the run")
        if catalog.version != self.catalog_version:
            raise ValueError(
                f"{RECIPE_FILE}: made with catalogue {self.catalog_version}, this is "
                f"{catalog.version}"
            )
        if engine.ruleset.version != self.ruleset_version:
            raise ValueError(
                f"{RECIPE_FILE}: made with rule set {self.ruleset_version}, this is "
                f"{engine.ruleset.version} (pass the rule set the log was made with, or turn "
                "the ground-truth replay off: evaluation.ground_truth: false)"
            )

    def simulator(self, catalog: ActionCatalog, engine: RuleEngine) -> BatchSimulator:
        """A fresh simulator at day 0 of this recipe.

        Raises
        ------
        ValueError
            When the scenario file, catalogue or rule set changed since the log was made.
        """
        self.check(catalog, engine)
        world = load_scenario(self.scenario, catalog)
        return BatchSimulator(world, catalog, engine, self.customers, seed=self.seed)

    def logging_policy(self, catalog: ActionCatalog) -> Policy:
        """The policy that made the log."""
        if self.policy == "playbook":
            return PlaybookPolicy(catalog, self.epsilon)
        return UniformPolicy(catalog)

    def policy_rng(self) -> np.random.Generator:
        """The logging policy's random stream (separate from the world's)."""
        return np.random.default_rng(self.seed + 1)


def write_recipe(recipe: SimulationRecipe, log_dir: str | Path) -> Path:
    """Store ``recipe`` in ``log_dir``; returns the file."""
    path = Path(log_dir) / RECIPE_FILE
    path.write_text(json.dumps(recipe.model_dump(mode="json"), indent=2))
    return path


def read_recipe(log_path: str | Path) -> SimulationRecipe | None:
    """The recipe of a simulated log directory, None for a log without one (real traffic)."""
    log_path = Path(log_path)
    path = (log_path if log_path.is_dir() else log_path.parent) / RECIPE_FILE
    if not path.exists():
        return None
    return load_model(path, SimulationRecipe)


def simulate_log(
    recipe: SimulationRecipe,
    catalog: ActionCatalog,
    engine: RuleEngine,
    log_dir: str | Path | None,
    on_day: Callable[[int], None] | None = None,
) -> RolloutSummary:
    """Run ``recipe``, logging to ``log_dir`` (with the recipe) when given."""
    sim = recipe.simulator(catalog, engine)
    summary = run_policy(
        sim,
        recipe.logging_policy(catalog),
        recipe.days,
        recipe.policy_rng(),
        log_dir=None if log_dir is None else str(log_dir),
        on_day=on_day,
    )
    if log_dir is not None:
        write_recipe(recipe, log_dir)
    return summary


@dataclass(frozen=True)
class TruthTable:
    """Exact per-decision outcomes of several policies on the same logged decision points.

    Attributes
    ----------
    policies : names, in column order
    value, complaint, conversion, contact : float64 ``(m, P)``
        Expected reward (CNY), complaint probability, conversion probability and contact
        probability of each policy at each decision point.
    oracle_value : float64 ``(m,)``, the best allowed expected reward
    oracle_complaint, oracle_conversion, oracle_contact : float64 ``(m,)``
        The same KPIs of the oracle's action (contact: 1 if it contacts the customer).
    segment : int ``(m,)``, index into ``BEHAVIOURAL_SEGMENTS``
    blocked_mass : float64 ``(P,)``, total probability each policy put on blocked actions
    reference_blocked : int64 ``(P,)``
        Of the ``reference_checked`` decisions, how many times the policy's most likely
        action is blocked by the rules' reference semantics (not by the engine).
    reference_checked : int
    mask_disagreements : int
        Of the first :data:`MASK_ROWS` checked decisions, how many have an action the
        engine's mask allows and the reference semantics block (must be 0).
    logged_q : float64 ``(m,)`` or None
        The expected reward of the action the log took at each decision point (None unless
        the replay was given the log's actions): what a perfect reward model would predict
        for it (:meth:`exact_model_dr`).
    """

    policies: tuple[str, ...]
    value: np.ndarray
    complaint: np.ndarray
    conversion: np.ndarray
    contact: np.ndarray
    oracle_value: np.ndarray
    oracle_complaint: np.ndarray
    oracle_conversion: np.ndarray
    oracle_contact: np.ndarray
    segment: np.ndarray
    blocked_mass: np.ndarray
    reference_blocked: np.ndarray
    reference_checked: int
    mask_disagreements: int
    logged_q: np.ndarray | None = None

    @property
    def n_rows(self) -> int:
        return len(self.oracle_value)

    def exact_model_dr(self, policy: str, weight: np.ndarray, reward: np.ndarray) -> np.ndarray:
        """``(m,)`` the per-decision terms of the doubly robust estimate of ``policy`` had
        its reward model been exact (the simulator's expected rewards): ``sum_a pi(a|x) q(x,
        a) + w (r - q(x, a_logged))``. Their mean minus the policy's true value is the
        importance-weighted correction's noise alone, which no reward model removes: how
        close a DR estimate can come on this log.

        Parameters
        ----------
        weight : float ``(m,)``
            ``pi(a_logged | x) / pscore`` at each decision point.
        reward : float ``(m,)``
            The logged reward.

        Raises
        ------
        ValueError
            Without :attr:`logged_q`, or with arrays of another length.
        """
        if self.logged_q is None:
            raise ValueError("the replay was not given the log's actions: no logged_q")
        weight, reward = np.asarray(weight, np.float64), np.asarray(reward, np.float64)
        if weight.shape != (self.n_rows,) or reward.shape != (self.n_rows,):
            raise ValueError(
                f"weight {weight.shape} and reward {reward.shape} must be ({self.n_rows},)"
            )
        value = self.value[:, self.policies.index(policy)]
        return value + weight * (reward - self.logged_q)

    def summary(self) -> list[dict[str, float | str]]:
        """One row per policy (and the oracle): value, regret, rates, per decision."""
        oracle = float(self.oracle_value.mean())
        rows: list[dict[str, float | str]] = []
        for j, name in enumerate(self.policies):
            value = float(self.value[:, j].mean())
            rows.append(
                {
                    "policy": name,
                    "value": value,
                    "regret": oracle - value,
                    "oracle_ratio": value / oracle if oracle else float("nan"),
                    "complaint_rate": float(self.complaint[:, j].mean()),
                    "conversion_rate": float(self.conversion[:, j].mean()),
                    "contact_rate": float(self.contact[:, j].mean()),
                    "blocked_mass": float(self.blocked_mass[j]),
                    "reference_blocked": int(self.reference_blocked[j]),
                }
            )
        rows.append(
            {
                "policy": ORACLE,
                "value": oracle,
                "regret": 0.0,
                "oracle_ratio": 1.0,
                "complaint_rate": float(self.oracle_complaint.mean()),
                "conversion_rate": float(self.oracle_conversion.mean()),
                "contact_rate": float(self.oracle_contact.mean()),
                "blocked_mass": 0.0,
                "reference_blocked": 0,
            }
        )
        return rows

    def by_segment(self) -> list[dict[str, float | str]]:
        """KPIs per behavioural segment and policy (segments with decisions only)."""
        rows: list[dict[str, float | str]] = []
        for s, segment in enumerate(BEHAVIOURAL_SEGMENTS):
            sel = self.segment == s
            if not sel.any():
                continue
            oracle = float(self.oracle_value[sel].mean())
            for j, name in enumerate(self.policies):
                value = float(self.value[sel, j].mean())
                rows.append(
                    {
                        "segment": segment,
                        "policy": name,
                        "decisions": int(sel.sum()),
                        "value": value,
                        "regret": oracle - value,
                        "complaint_rate": float(self.complaint[sel, j].mean()),
                        "conversion_rate": float(self.conversion[sel, j].mean()),
                        "contact_rate": float(self.contact[sel, j].mean()),
                    }
                )
        return rows


def replay_truth(
    recipe: SimulationRecipe,
    catalog: ActionCatalog,
    engine: RuleEngine,
    rows: np.ndarray,
    policies: Mapping[str, TargetPolicy],
    logged_context: np.ndarray | None = None,
    logged_action: np.ndarray | None = None,
) -> TruthTable:
    """Replay the log of ``recipe`` and score ``policies`` exactly at the selected rows.

    Parameters
    ----------
    rows : bool ``(n_log,)``
        Which log rows (decisions, in log order) to evaluate.
    policies : name -> :data:`TargetPolicy`
    logged_context : float32 ``(n_log, F)``, optional
        The log's encoded contexts; when given, every replayed context is checked against
        it, so a log that does not match its recipe is refused rather than misjudged.
    logged_action : int ``(n_log,)``, optional
        The log's actions; when given, the table keeps each selected decision's expected
        reward of its logged action (:attr:`TruthTable.logged_q`).

    Raises
    ------
    ValueError
        When the replay does not reproduce the log (row count or contexts differ).
    """
    rows = np.asarray(rows, bool)
    sim = recipe.simulator(catalog, engine)
    encoder = ContextEncoder(catalog)
    names = tuple(policies)
    all_actions = np.arange(catalog.n_actions)[None, :]
    contact_action = catalog.channel_index >= 0
    parts: dict[str, list[np.ndarray]] = {
        k: []
        for k in (
            *POLICY_COLUMNS,
            "oracle",
            "oracle_complaint",
            "oracle_conversion",
            "oracle_contact",
            "segment",
            "logged_q",
        )
    }
    blocked = np.zeros(len(names))
    reference_blocked = np.zeros(len(names), np.int64)
    stride = max(1, -(-int(rows.sum()) // REFERENCE_ROWS))  # at most REFERENCE_ROWS checked
    mask_disagreements = 0
    evaluated = 0  # decisions evaluated so far: every stride-th is checked by reference
    offset = 0

    def collect(customers: np.ndarray, batch: ContextBatch, allowed: np.ndarray) -> None:
        nonlocal offset, evaluated, mask_disagreements
        start, offset = offset, offset + len(customers)
        if offset > len(rows):
            raise ValueError(f"replay made more decisions than the log's {len(rows)} rows")
        picked = np.flatnonzero(rows[start:offset])
        for lo in range(0, len(picked), CHUNK_ROWS):
            local = picked[lo : lo + CHUNK_ROWS]
            sub = batch.take(local)
            context = encoder.encode(sub)
            log_rows = start + local
            if logged_context is not None and not np.allclose(
                context, logged_context[log_rows], atol=1e-5
            ):
                raise ValueError(
                    "the replayed contexts differ from the logged ones: the log does not "
                    "match its simulation recipe"
                )
            mask = allowed[local]
            checked = np.flatnonzero((evaluated + np.arange(len(local))) % stride == 0)
            reference_rows = [sub.row(int(i)) for i in checked]
            for i, row in zip(checked.tolist(), reference_rows, strict=True):
                if evaluated + i < MASK_ROWS * stride:  # the first MASK_ROWS checked: whole mask
                    # the mask may block more (the simulator's daily capacity), never less
                    rule_blocks = reference_blocked_by(engine.ruleset, row) != ALLOWED
                    mask_disagreements += int((mask[i] & rule_blocks).any())
            evaluated += len(local)
            outcome = sim.expected_outcome(customers[local][:, None], all_actions)
            q = outcome.expected_reward.astype(np.float64)
            cols = {k: np.empty((len(local), len(names))) for k in POLICY_COLUMNS}
            for j, name in enumerate(names):
                dist = np.asarray(policies[name](log_rows, context, mask), np.float64)
                blocked[j] += float(dist[~mask].sum())
                top = dist[checked].argmax(axis=1)
                reference_blocked[j] += sum(
                    reference_rule(engine.ruleset, row, int(a)) is not None
                    for row, a in zip(reference_rows, top, strict=True)
                )
                cols["value"][:, j] = (dist * q).sum(axis=1)
                cols["complaint"][:, j] = (dist * outcome.complaint).sum(axis=1)
                cols["conversion"][:, j] = (dist * outcome.convert).sum(axis=1)
                cols["contact"][:, j] = dist[:, contact_action].sum(axis=1)
            for k in POLICY_COLUMNS:
                parts[k].append(cols[k])
            best = np.where(mask, q, -np.inf).argmax(axis=1)  # no contact is always allowed
            pick = (np.arange(len(local)), best)
            parts["oracle"].append(q[pick])
            parts["oracle_complaint"].append(outcome.complaint[pick])
            parts["oracle_conversion"].append(outcome.convert[pick])
            parts["oracle_contact"].append(contact_action[best].astype(np.float64))
            if logged_action is not None:
                parts["logged_q"].append(q[np.arange(len(local)), logged_action[log_rows]])
            parts["segment"].append(
                behavioural_segment(
                    sub["aum_cny"], sub["days_since_last_login"], sub["lifecycle_stage"]
                ).astype(np.int64)
            )

    run_policy(
        sim, recipe.logging_policy(catalog), recipe.days, recipe.policy_rng(), on_decide=collect
    )
    if offset != len(rows):
        raise ValueError(f"replay made {offset} decisions, the log has {len(rows)} rows")
    width = len(names)

    def stack(key: str, shape: tuple[int, ...]) -> np.ndarray:
        return np.concatenate(parts[key]) if parts[key] else np.empty(shape)

    return TruthTable(
        policies=names,
        value=stack("value", (0, width)),
        complaint=stack("complaint", (0, width)),
        conversion=stack("conversion", (0, width)),
        contact=stack("contact", (0, width)),
        oracle_value=stack("oracle", (0,)),
        oracle_complaint=stack("oracle_complaint", (0,)),
        oracle_conversion=stack("oracle_conversion", (0,)),
        oracle_contact=stack("oracle_contact", (0,)),
        segment=stack("segment", (0,)).astype(np.int64),
        blocked_mass=blocked,
        reference_blocked=reference_blocked,
        reference_checked=len(range(0, evaluated, stride)),
        mask_disagreements=mask_disagreements,
        logged_q=None if logged_action is None else stack("logged_q", (0,)),
    )
