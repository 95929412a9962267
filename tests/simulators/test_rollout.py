"""Rollouts: the decision log they write, the KPI summary, and calibration of the default
scenario under the bank's playbook."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from nextbest.catalog import ActionCatalog
from nextbest.decision_log import read_decisions
from nextbest.features import ContextEncoder
from nextbest.privacy import PSEUDONYM_HEX_CHARS, PSEUDONYM_PREFIX, pseudonymise
from nextbest.segments import BEHAVIOURAL_SEGMENTS
from simulators.policies import PlaybookPolicy, UniformPolicy
from simulators.rollout import SIMULATION_KEY, RolloutSummary, run_policy
from simulators.scenario import Scenario
from simulators.world import BatchSimulator

MakeSim = Callable[..., BatchSimulator]
SEGMENT_ROWS = [*BEHAVIOURAL_SEGMENTS, "all"]


@pytest.fixture(scope="module")
def logged_run(
    tmp_path_factory: pytest.TempPathFactory,
    catalog: ActionCatalog,
    engine,
    scenario: Scenario,
) -> tuple[RolloutSummary, Path, pa.Table, BatchSimulator]:
    """A logged playbook run: 3,000 customers, 12 days."""
    log_dir = tmp_path_factory.mktemp("rollout") / "log"
    sim = BatchSimulator(scenario, catalog, engine, 3000, seed=41)
    summary = run_policy(
        sim, PlaybookPolicy(catalog, 0.1), 12, np.random.default_rng(42), log_dir=str(log_dir)
    )
    table = read_decisions(log_dir, n_actions=catalog.n_actions)
    return summary, log_dir, table, sim


def test_run_policy_log_readable_with_one_row_per_decision(logged_run, catalog) -> None:
    summary, log_dir, table, _ = logged_run
    total = int(summary.kpis.decisions.sum())
    assert total > 3000
    assert table.num_rows == summary.rows_logged == total
    assert summary.overall()["decisions"] == total
    assert len(list(log_dir.glob("*.parquet"))) == 1
    assert not [p for p in log_dir.iterdir() if p.name.startswith(".")]  # no temporary files
    width = ContextEncoder(catalog).n_features
    read_decisions(log_dir, n_actions=catalog.n_actions, n_features=width)


def test_run_policy_log_agrees_with_kpis(logged_run) -> None:
    summary, _, table, _ = logged_run
    k = summary.kpis
    action = table.column("action").to_numpy()
    assert int((action > 0).sum()) == int(k.contacts.sum())
    assert int(pc.sum(table.column("converted")).as_py()) == int(k.conversions.sum())
    assert int(pc.sum(table.column("complaint")).as_py()) == int(k.complaints.sum())
    assert int(pc.sum(table.column("opted_out")).as_py()) == int(k.opt_outs.sum())
    assert pc.sum(table.column("reward")).as_py() == pytest.approx(k.reward.sum())
    converted = table.column("converted").to_numpy(zero_copy_only=False)
    value = table.column("value_cny").to_numpy()
    assert (value[~converted] == 0).all() and (value[converted] > 0).all()
    assert (table.column("policy").to_pylist()[0], table.column("model_version")[0].as_py()) == (
        "playbook",
        "playbook-eps0.1",
    )


def test_run_policy_log_pscores_and_distributions(logged_run, catalog) -> None:
    _, _, table, _ = logged_run
    pscore = table.column("pscore").to_numpy()
    assert ((pscore > 0) & (pscore <= 1)).all()
    assert table.column("pscore").null_count == 0
    assert table.column("action_dist").null_count == 0
    # the chosen action's entry of action_dist is its pscore (checked by read_decisions too)
    cand = table.column("candidate_actions").to_pylist()[:500]
    dist = table.column("action_dist").to_pylist()[:500]
    action = table.column("action").to_pylist()[:500]
    for c, d, a, p in zip(cand, dist, action, pscore[:500], strict=True):
        assert c == sorted(c) and c[0] == 0  # waiting is always a candidate
        assert d[c.index(a)] == pytest.approx(p, rel=1e-6)
        assert sum(d) == pytest.approx(1.0, abs=1e-5)
        k = len(c)  # epsilon spread over the allowed, the rest on the greedy action
        assert sorted(d)[0] == pytest.approx(0.1 / k if k > 1 else 1.0, rel=1e-5)
        assert sorted(d)[-1] == pytest.approx(0.9 + 0.1 / k, rel=1e-5)


def test_run_policy_log_customer_keys_pseudonymous(logged_run) -> None:
    _, log_dir, table, sim = logged_run
    keys = table.column("customer_key").to_pylist()
    assert all(k.startswith(PSEUDONYM_PREFIX) for k in keys)
    assert {len(k) for k in keys} == {len(PSEUDONYM_PREFIX) + PSEUDONYM_HEX_CHARS}
    all_keys = {pseudonymise(f"SIM-{i:09d}", SIMULATION_KEY) for i in range(sim.n)}
    assert set(keys) <= all_keys
    assert len(set(keys)) > 0.8 * sim.n  # one key per customer, not one per decision
    for path in log_dir.iterdir():
        assert b"SIM-" not in path.read_bytes(), path
    for name in table.column_names:
        if pa.types.is_string(table.schema.field(name).type):
            values = table.column(name).drop_null()
            assert not pc.any(pc.match_substring(values, "SIM-")).as_py(), name
    metadata = pq.read_metadata(next(log_dir.glob("*.parquet"))).metadata or {}
    assert not any(b"SIM-" in v for v in metadata.values())


def test_run_policy_log_decision_id_hides_customer(logged_run) -> None:
    _, _, table, _ = logged_run
    ids = table.column("decision_id").to_pylist()
    keys = table.column("customer_key").to_pylist()
    recovered = [
        pseudonymise(f"SIM-{i.rsplit('-c', 1)[-1]}", SIMULATION_KEY) == k
        for i, k in zip(ids, keys, strict=True)
    ]
    assert not any(recovered)


def test_run_policy_log_timestamps_at_local_decision_hours(logged_run, scenario) -> None:
    _, _, table, _ = logged_run
    zone = ZoneInfo(scenario.population.timezone)
    lo, hi = scenario.behaviour.decision_hours
    stamps = table.column("timestamp").to_pylist()
    hours = {t.astimezone(zone).hour for t in stamps}
    assert min(hours) >= lo and max(hours) < hi
    days = {t.astimezone(zone).date() for t in stamps}
    assert len(days) == 12
    assert table.column("reward_at").to_pylist() == stamps
    ids = table.column("decision_id").to_pylist()
    assert len(set(ids)) == len(ids)


def test_run_policy_summary_table_rows(logged_run) -> None:
    summary, _, _, sim = logged_run
    rows = summary.table()
    assert [r["segment"] for r in rows] == SEGMENT_ROWS
    by_segment, overall = rows[:-1], rows[-1]
    assert overall == summary.overall()
    assert overall["customers"] == sim.n == sum(r["customers"] for r in by_segment)
    assert overall["decisions"] == sum(r["decisions"] for r in by_segment)
    for row in rows:
        for key in ("contact_rate", "conversion_per_contact", "complaints_per_contact"):
            assert 0.0 <= row[key] <= 1.0, (row["segment"], key)
        assert row["monthly_churn"] >= 0.0
    churned = int((~sim.pop.active).sum())
    assert overall["monthly_churn"] == pytest.approx(churned / (sim.n * 12 / 30))
    value = sum(r["value_per_customer"] * r["customers"] for r in by_segment)
    assert overall["value_per_customer"] * sim.n == pytest.approx(value)


def test_run_policy_logging_does_not_change_trajectory(
    make_sim: MakeSim, catalog: ActionCatalog, tmp_path: Path
) -> None:
    runs = []
    for log_dir in (None, str(tmp_path / "log")):
        sim = make_sim(1500, 43)
        summary = run_policy(
            sim, UniformPolicy(catalog), 6, np.random.default_rng(1), log_dir=log_dir
        )
        runs.append((summary, sim))
    (plain, sim_a), (logged, sim_b) = runs
    assert plain.rows_logged == 0 and logged.rows_logged > 0
    assert plain.table() == logged.table()
    np.testing.assert_array_equal(sim_a.pop.aum_cny, sim_b.pop.aum_cny)
    np.testing.assert_array_equal(sim_a.pop.contact_ring, sim_b.pop.contact_ring)
    assert read_decisions(tmp_path / "log").column("model_version")[0].as_py() == "uniform-eps1"


def test_run_policy_failure_leaves_no_part_file(
    make_sim: MakeSim, catalog: ActionCatalog, tmp_path: Path
) -> None:
    class Failing(PlaybookPolicy):
        calls = 0

        def decide(self, batch, allowed, rng):
            Failing.calls += 1
            if Failing.calls == 3:
                raise RuntimeError("model server went away")
            return super().decide(batch, allowed, rng)

    log_dir = tmp_path / "log"
    with pytest.raises(RuntimeError, match="model server went away"):
        run_policy(make_sim(500, 44), Failing(catalog), 5, np.random.default_rng(0), str(log_dir))
    assert list(log_dir.iterdir()) == []


@pytest.mark.parametrize("days", [0, -3])
def test_run_policy_non_positive_days_raises(
    make_sim: MakeSim, catalog: ActionCatalog, days: int
) -> None:
    with pytest.raises(ValueError, match="days must be positive"):
        run_policy(make_sim(100, 1), UniformPolicy(catalog), days, np.random.default_rng(0))


def test_run_policy_on_day_called_every_day(make_sim: MakeSim, catalog: ActionCatalog) -> None:
    seen: list[int] = []
    run_policy(
        make_sim(200, 1), UniformPolicy(catalog), 4, np.random.default_rng(0), None, seen.append
    )
    assert seen == [1, 2, 3, 4]


def test_calibration_playbook_inside_scenario_targets(
    make_sim: MakeSim, catalog: ActionCatalog, scenario: Scenario
) -> None:
    """retail_bank under the playbook (epsilon 0.1): 20,000 customers for 90 days land inside
    the scenario's calibration ranges."""
    sim = make_sim(20_000, 2026)
    summary = run_policy(sim, PlaybookPolicy(catalog, 0.1), 90, np.random.default_rng(7))
    overall = summary.overall()
    assert overall["decisions"] > 100_000
    for name in ("conversion_per_contact", "complaints_per_contact", "monthly_churn"):
        lo, hi = getattr(scenario.calibration, name)
        assert lo <= overall[name] <= hi, (name, overall[name], (lo, hi))
