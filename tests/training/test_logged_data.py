"""Decision logs as OPE arrays: Parquet and CSV, bad files, and honest estimates."""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from nextbest.catalog import ActionCatalog
from nextbest.cli import app
from nextbest.compliance import RuleEngine
from nextbest.decision_log import DecisionLogError, arrow_reason, read_decisions
from simulators.policies import PlaybookPolicy
from simulators.rollout import run_policy
from simulators.scenario import Scenario
from simulators.world import BatchSimulator
from training.evaluation import baseline_action_dist, effective_sample_size, ope_table
from training.logged_data import LoggedBandit, load_logged_bandit, read_csv_decisions, split_log
from training.ope import InverseProbabilityWeighting, OpeInputError

LIST_COLUMNS = ("context", "candidate_actions", "action_dist")


@pytest.fixture(scope="module")
def sim_log(tmp_path_factory, catalog: ActionCatalog, engine: RuleEngine, scenario: Scenario):
    out = tmp_path_factory.mktemp("log")
    sim = BatchSimulator(scenario, catalog, engine, 3000, seed=3)
    run_policy(sim, PlaybookPolicy(catalog, 0.2), 6, np.random.default_rng(4), log_dir=str(out))
    return out


def to_csv(table: pa.Table, path: Path) -> Path:
    columns = {}
    for name in table.column_names:
        column = table.column(name)
        if name in LIST_COLUMNS:
            column = pa.array(
                [None if v is None else " ".join(repr(x) for x in v) for v in column.to_pylist()],
                pa.string(),
            )
        columns[name] = column
    pacsv.write_csv(pa.table(columns), path)
    return path


def test_load_logged_bandit_parquet_arrays(sim_log, catalog: ActionCatalog) -> None:
    log = load_logged_bandit(sim_log, catalog.n_actions)
    n = log.n_rounds
    assert n > 1000
    assert log.context.shape[0] == n and log.context.dtype == np.float32
    assert log.candidates.shape == (n, catalog.n_actions)
    assert log.candidates[np.arange(n), log.action].all()
    assert log.candidates[:, 0].all()
    np.testing.assert_allclose(log.logging_dist.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(log.logging_dist[np.arange(n), log.action], log.pscore, atol=1e-6)
    assert (log.logging_dist[~log.candidates] == 0).all()


def test_load_logged_bandit_csv_equals_parquet(sim_log, catalog, tmp_path: Path) -> None:
    table = read_decisions(sim_log).slice(0, 300)
    log_pq = load_logged_bandit(sim_log, catalog.n_actions)
    log_csv = load_logged_bandit(to_csv(table, tmp_path / "log.csv"), catalog.n_actions)
    assert log_csv.n_rounds == 300
    np.testing.assert_allclose(log_csv.context, log_pq.context[:300])
    np.testing.assert_array_equal(log_csv.candidates, log_pq.candidates[:300])
    np.testing.assert_allclose(log_csv.logging_dist, log_pq.logging_dist[:300], atol=1e-7)
    np.testing.assert_array_equal(log_csv.action, log_pq.action[:300])


def test_read_csv_decisions_non_numeric_list_refused(sim_log, catalog, tmp_path: Path) -> None:
    table = read_decisions(sim_log).slice(0, 5)
    path = to_csv(table, tmp_path / "log.csv")
    text = path.read_text().splitlines()
    header = text[0].split(",")
    cells = text[1].split(",")
    cells[header.index('"candidate_actions"')] = '"0 seven 12"'
    text[1] = ",".join(cells)
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(DecisionLogError, match="space-separated numbers") as info:
        load_logged_bandit(path, catalog.n_actions)
    assert info.value.column == "candidate_actions"


def test_read_csv_text_columns_stay_text(sim_log, catalog, tmp_path: Path) -> None:
    """Ids and versions that look like numbers are read as the text they are: "007" and
    "7" stay two customers, a version hash "123456e78901" is not a float."""
    table = read_decisions(sim_log).slice(0, 4)
    table = table.set_column(
        table.schema.get_field_index("customer_key"),
        "customer_key",
        pa.array(["007", "7", "007", "1e3"]),
    )
    table = table.set_column(
        table.schema.get_field_index("decision_id"),
        "decision_id",
        pa.array(["001", "1", "01", "1.0"]),
    )
    versions = pa.array(["123456e78901"] * 4)
    table = table.set_column(
        table.schema.get_field_index("ruleset_version"), "ruleset_version", versions
    )
    read = read_csv_decisions(to_csv(table, tmp_path / "log.csv"), catalog.n_actions)
    assert read.column("customer_key").to_pylist() == ["007", "7", "007", "1e3"]
    assert read.column("decision_id").to_pylist() == ["001", "1", "01", "1.0"]
    assert read.column("ruleset_version").to_pylist() == ["123456e78901"] * 4


def test_read_csv_errors_do_not_quote_the_data(sim_log, catalog, tmp_path: Path) -> None:
    """A refused CSV log is named with the reason, never with a row's text or a cell's value
    (a user's file may hold personal data; the message lands in job logs)."""
    table = read_decisions(sim_log).slice(0, 3)
    path = to_csv(table, tmp_path / "log.csv")
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    marker = "Zhang San 110101199003071234"
    extra = lines[1] + f",{marker}"  # one field too many
    path.write_text("\n".join([lines[0], extra, *lines[2:]]) + "\n")
    n = len(header)
    with pytest.raises(DecisionLogError, match=f"Expected {n} columns, got {n + 1}") as info:
        read_csv_decisions(path, catalog.n_actions)
    assert "Zhang" not in str(info.value) and "1101" not in str(info.value)
    cells = lines[1].split(",")
    cells[header.index('"context"')] = f'"0.5 {marker}"'
    path.write_text("\n".join([lines[0], ",".join(cells)]) + "\n")
    with pytest.raises(DecisionLogError, match="space-separated numbers") as info:
        read_csv_decisions(path, catalog.n_actions)
    assert "Zhang" not in str(info.value) and "1101" not in str(info.value)


@pytest.mark.parametrize(
    ("message", "shown"),
    [
        ("CSV parse error: Expected 3 columns, got 4: 4,ZHANG,5,6", "Expected 3 columns, got 4"),
        ("Failed to parse string: 'ZHANG' as a scalar of type int64", "of type int64"),
        ("In CSV column #0: CSV conversion error to int64: invalid value 'ZHANG'", "#0"),
        ("Failed to parse string: 'O'ZHANG' as a scalar of type double", "of type double"),
        ('unexpected "ZHANG', "unexpected"),
        ("Integer value 13812345678 not in range: 0 to 255", "not in range"),
        ("Value 13812345678 too large to fit in C integer type", "too large"),
        ("Couldn't deserialize thrift: 'ZHANG' bad", "Couldn't deserialize thrift"),
    ],
)
def test_arrow_reason_keeps_the_reason_drops_the_data(message: str, shown: str) -> None:
    reason = arrow_reason(pa.ArrowInvalid(message))
    assert shown in reason and "ZHANG" not in reason and "13812345678" not in reason


def test_load_logged_bandit_missing_reward_refused(
    sim_log, catalog, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    table = read_decisions(sim_log).slice(0, 20)
    rewards = table.column("reward").to_pylist()
    rewards[3] = None
    table = table.set_column(
        table.schema.get_field_index("reward"), "reward", pa.array(rewards, pa.float64())
    )
    path = to_csv(table, tmp_path / "log.csv")
    with pytest.raises(DecisionLogError, match="1 of 20 decisions have no outcome"):
        load_logged_bandit(path, catalog.n_actions)
    assert load_logged_bandit(path, catalog.n_actions, require_reward=False).n_rounds == 20
    assert "left out" not in caplog.text
    kept = load_logged_bandit(path, catalog.n_actions, drop_pending=True)
    assert kept.n_rounds == 19
    assert f"{path}: 1 of 20 decisions have no outcome yet: left out" in caplog.text
    np.testing.assert_array_equal(
        kept.reward, np.delete(np.array([*rewards[:3], 0.0, *rewards[4:]]), 3)
    )


def test_ope_without_pscore_points_to_dm(sim_log, catalog, tmp_path: Path) -> None:
    table = read_decisions(sim_log).slice(0, 50)
    for name in ("pscore", "action_dist"):
        table = table.set_column(
            table.schema.get_field_index(name), name, pa.nulls(50, table.schema.field(name).type)
        )
    log = load_logged_bandit(to_csv(table, tmp_path / "log.csv"), catalog.n_actions)
    assert log.pscore is None
    uniform = {"uniform": baseline_action_dist("uniform", log)}
    with pytest.raises(OpeInputError, match="use DirectMethod"):
        ope_table(log, uniform, estimators={"ips": InverseProbabilityWeighting()})
    # by default, the estimators the log supports: none without a reward model, else DM
    with pytest.raises(ValueError, match=r"no estimator .* ips, snips, dr, switch-dr: .*`pscore`"):
        ope_table(log, uniform)
    q_hat = np.zeros(log.candidates.shape)
    rows = ope_table(log, uniform, estimated_rewards=q_hat, n_bootstrap_samples=20)
    assert [r["estimator"] for r in rows] == ["dm"]


def test_ope_table_on_policy_ips_equals_mean_reward(sim_log, catalog) -> None:
    log = load_logged_bandit(sim_log, catalog.n_actions)
    rows = ope_table(log, {"logging": baseline_action_dist("logging", log)}, n_bootstrap_samples=50)
    ips = next(r for r in rows if r["estimator"] == "ips")
    assert ips["value"] == pytest.approx(log.reward.mean(), rel=1e-4)


def test_effective_sample_size_counts_the_decisions_an_estimate_rests_on() -> None:
    n, n_actions = 100, 4
    rng = np.random.default_rng(0)
    log = LoggedBandit(
        context=np.zeros((n, 2), np.float32),
        action=np.arange(n) % n_actions,
        reward=rng.normal(size=n),
        pscore=np.full(n, 1.0 / n_actions),
        candidates=np.ones((n, n_actions), bool),
        logging_dist=np.full((n, n_actions), 1.0 / n_actions),
        feature_spec_version="t",
        ruleset_version="t",
        catalog_version="t",
    )
    # the logging policy on its own log: every weight 1, all n decisions count
    assert effective_sample_size(log, baseline_action_dist("logging", log)) == pytest.approx(n)
    # a deterministic policy that agrees with the log on 7 rows: those 7 count, however
    # large their weights
    choice = (log.action + 1) % n_actions
    choice[:7] = log.action[:7]
    dist = np.eye(n_actions)[choice]
    assert effective_sample_size(log, dist) == pytest.approx(7.0)
    rows = ope_table(log, {"rare": dist}, n_bootstrap_samples=20)
    assert [r["ess"] for r in rows] == [pytest.approx(7.0)] * 2  # ips, snips
    # never agreeing: nothing to rest on; no propensities: undefined
    assert effective_sample_size(log, np.eye(n_actions)[(log.action + 1) % n_actions]) == 0.0
    assert np.isnan(effective_sample_size(replace(log, pscore=None), dist))
    # valid but tiny propensities: the weights' squares must not overflow (scale-free ratio)
    tiny = replace(log, pscore=np.full(n, 1e-300))
    assert effective_sample_size(tiny, dist) == pytest.approx(7.0)
    below_double = replace(log, pscore=np.where(np.arange(n) < 3, 5e-324, 1e-300))
    assert effective_sample_size(below_double, dist) == pytest.approx(3.0)  # infinite weights


def test_ope_table_blocked_action_policy_refused(sim_log, catalog) -> None:
    log = load_logged_bandit(sim_log, catalog.n_actions)
    dist = np.zeros(log.candidates.shape)
    blocked = np.argmin(log.candidates, axis=1)
    dist[np.arange(log.n_rounds), blocked] = 1.0
    with pytest.raises(ValueError, match="actions the rules blocked"):
        ope_table(log, {"rogue": dist})


def test_ips_estimate_covers_ground_truth(catalog, engine, scenario, tmp_path: Path) -> None:
    """The IPS value of 'uniform over allowed' from a playbook log, against the exact
    expected reward of that policy on the same logged rounds (simulator ground truth)."""
    sim = BatchSimulator(scenario, catalog, engine, 20_000, seed=11)
    rng = np.random.default_rng(12)
    policy = PlaybookPolicy(catalog, 0.3)
    truths, rewards, actions, pscores, dists = [], [], [], [], []
    for _ in range(5):
        customers = sim.decision_customers()
        batch = sim.context(customers)
        allowed = sim.allowed(customers, batch)
        decision = policy.decide(batch, allowed, rng)
        expected = sim.expected_outcome(customers[:, None], np.arange(catalog.n_actions)[None, :])
        uniform = allowed / allowed.sum(axis=1, keepdims=True)
        truths.append((uniform * expected.expected_reward).sum(axis=1))
        result = sim.step(customers, decision.action, allowed)
        rewards.append(result.reward)
        actions.append(decision.action)
        pscores.append(decision.pscore)
        dists.append(uniform)
    truth = float(np.concatenate(truths).mean())
    args = (
        np.concatenate(rewards),
        np.concatenate(actions),
        np.concatenate(dists),
        np.concatenate(pscores),
    )
    est = InverseProbabilityWeighting()
    value = est.estimate_policy_value(*args)
    interval = est.estimate_interval(*args, n_bootstrap_samples=300, random_state=0)
    assert interval["lower"] <= truth <= interval["upper"], (value, truth, interval)


def test_evaluate_cli_prints_ope_table(sim_log) -> None:
    result = CliRunner().invoke(app, ["evaluate", "--logs", str(sim_log), "--bootstrap", "50"])
    assert result.exit_code == 0, result.output
    assert "logging" in result.output and "uniform" in result.output and "snips" in result.output


def test_several_logs_load_as_one(sim_log, tmp_path: Path, catalog: ActionCatalog) -> None:
    """A log split in two (Parquet and CSV) loads as the whole did, fingerprint included;
    ``nextbest evaluate`` takes both; the same log twice is refused, naming it."""
    whole = read_decisions(sim_log, n_actions=catalog.n_actions)
    half = whole.num_rows // 2
    (tmp_path / "first").mkdir()
    pq.write_table(whole.slice(0, half), tmp_path / "first" / "part.parquet")
    second = to_csv(whole.slice(half), tmp_path / "second.csv")
    one = load_logged_bandit(sim_log, catalog.n_actions)
    two = load_logged_bandit([tmp_path / "first", second], catalog.n_actions)
    assert two.n_rounds == one.n_rounds
    for name in ("context", "action", "reward", "pscore", "candidates", "logging_dist"):
        assert np.array_equal(getattr(two, name), getattr(one, name)), name
    assert two.fingerprint() == one.fingerprint()
    result = CliRunner().invoke(
        app,
        ["evaluate", "--logs", str(tmp_path / "first"), "--logs", str(second), "--bootstrap", "50"],
    )
    assert result.exit_code == 0, result.output
    assert f"{one.n_rounds:,} logged decisions" in result.output
    with pytest.raises(DecisionLogError, match=r"second\.csv and .*second\.csv: a log given twice"):
        load_logged_bandit([second, second], catalog.n_actions)
    first_again = CliRunner().invoke(
        app, ["evaluate", "--logs", str(sim_log), "--logs", str(tmp_path / "first")]
    )
    assert first_again.exit_code == 2 and "a log given twice" in first_again.output


def test_several_logs_must_agree_and_an_empty_one_is_left_out(
    sim_log, tmp_path: Path, catalog: ActionCatalog, caplog: pytest.LogCaptureFixture
) -> None:
    """Each log is validated alone; what only shows across them is refused naming them:
    propensities in one log and not the other, two context widths. An empty log (a journal
    just started) is left out with a warning."""
    whole = read_decisions(sim_log, n_actions=catalog.n_actions)
    first, second = whole.slice(0, 200), whole.slice(200, 200)
    paths = [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    pq.write_table(first, paths[0])
    no_pscore = second.set_column(
        second.column_names.index("pscore"), "pscore", pa.nulls(200, pa.float64())
    )
    pq.write_table(no_pscore.drop_columns(["action_dist"]), paths[1])
    with pytest.raises(DecisionLogError, match=r"b\.parquet has no propensities but the other"):
        load_logged_bandit(paths, catalog.n_actions)
    narrow = [row[:10] for row in second.column("context").to_pylist()]
    i = second.column_names.index("context")
    pq.write_table(
        second.set_column(i, "context", pa.array(narrow, pa.list_(pa.float32()))), paths[1]
    )
    with pytest.raises(
        DecisionLogError, match=r"different widths \(.*a\.parquet: \d+, .*b\.parquet: 10\)"
    ):
        load_logged_bandit(paths, catalog.n_actions)
    pq.write_table(second.slice(0, 0), paths[1])
    with caplog.at_level("WARNING"):
        alone = load_logged_bandit(paths, catalog.n_actions)
    assert alone.n_rounds == 200 and "b.parquet: holds no decisions" in caplog.text
    with pytest.raises(DecisionLogError, match="holds no decisions"):
        load_logged_bandit([paths[1], paths[1]], catalog.n_actions)


def test_evaluate_cli_missing_log_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["evaluate", "--logs", str(tmp_path / "nope.parquet")])
    assert result.exit_code == 2
    assert "no such file" in result.output


def test_evaluate_cli_pending_outcomes_refused_unless_dropped(tmp_path: Path, catalog) -> None:
    path = _small_log(
        tmp_path, catalog, [[0, 1, 2]] * 4, [None] * 4, [1, 2, 1, 2], [0.5] * 4, pending=1
    )
    refused = CliRunner().invoke(app, ["evaluate", "--logs", str(path), "--bootstrap", "20"])
    assert refused.exit_code == 2
    assert "--drop-pending" in " ".join(refused.output.split())
    dropped = CliRunner().invoke(
        app, ["evaluate", "--logs", str(path), "--bootstrap", "20", "--drop-pending"]
    )
    assert dropped.exit_code == 0, dropped.output
    assert "uniform" in dropped.output


def _small_log(tmp_path: Path, catalog, candidates, dist, action, pscore, pending: int = 0) -> Path:
    """A valid 4-decimal log written through the schema, for edge cases."""
    from datetime import UTC, datetime

    from nextbest.decision_log import decisions_table, write_decisions

    n = len(action)
    table = decisions_table(
        {
            "decision_id": [f"d{i}" for i in range(n)],
            "timestamp": [datetime(2026, 1, 5, tzinfo=UTC)] * n,
            "customer_key": ["cust_x"] * n,
            "context": [[0.0, 1.0]] * n,
            "candidate_actions": candidates,
            "action": action,
            "pscore": pscore,
            "action_dist": dist,
            "reward": ([None] * pending + [1.0, 0.0, 2.0, 0.0])[:n],
            "policy": ["p"] * n,
            "model_version": ["m"] * n,
            "ruleset_version": ["r"] * n,
            "catalog_version": [catalog.version] * n,
            "feature_spec_version": ["f"] * n,
        }
    )
    return write_decisions(table, tmp_path / "log.parquet")


@pytest.mark.parametrize("bad_id", [-1, 10_000])
def test_load_logged_bandit_candidate_outside_catalogue_refused(
    tmp_path: Path, catalog, bad_id: int
) -> None:
    path = _small_log(tmp_path, catalog, [[0, bad_id]] * 2, [[0.5, 0.5]] * 2, [0, 0], [0.5] * 2)
    with pytest.raises(DecisionLogError, match="outside the catalogue") as info:
        load_logged_bandit(path, catalog.n_actions)
    assert info.value.column == "candidate_actions"


def test_ope_table_rounded_logging_dist_accepted(tmp_path: Path, catalog) -> None:
    path = _small_log(
        tmp_path, catalog, [[0, 1, 2]] * 3, [[0.3333] * 3] * 3, [0, 1, 2], [0.3333] * 3
    )
    log = load_logged_bandit(path, catalog.n_actions)
    rows = ope_table(log, {"logging": baseline_action_dist("logging", log)}, n_bootstrap_samples=20)
    assert all(np.isfinite(r["value"]) for r in rows)


def test_ope_table_snips_without_overlap_is_marked_undefined(tmp_path: Path, catalog) -> None:
    path = _small_log(
        tmp_path, catalog, [[0, 1, 2]] * 4, [[0.0, 0.5, 0.5]] * 4, [1, 2, 1, 2], [0.5] * 4
    )
    log = load_logged_bandit(path, catalog.n_actions)
    rows = ope_table(
        log, {"no_contact": baseline_action_dist("no_contact", log)}, n_bootstrap_samples=20
    )
    snips = next(r for r in rows if r["estimator"] == "snips")
    ips = next(r for r in rows if r["estimator"] == "ips")
    assert np.isnan(snips["value"]) and "undefined" in snips["note"]
    assert ips["value"] == 0.0


def test_evaluate_cli_log_without_action_dist_evaluates_the_rest(tmp_path: Path, catalog) -> None:
    path = _small_log(tmp_path, catalog, [[0, 1, 2]] * 4, [None] * 4, [1, 2, 1, 2], [0.5] * 4)
    result = CliRunner().invoke(app, ["evaluate", "--logs", str(path), "--bootstrap", "20"])
    assert result.exit_code == 0, result.output
    assert "uniform" in result.output and "logging" not in result.output


def test_fingerprint_is_of_the_decisions_read_not_the_files(
    tmp_path: Path, sim_log, catalog
) -> None:
    import dataclasses

    import pyarrow.parquet as pq

    from training.logged_data import FINGERPRINTED

    log = load_logged_bandit(sim_log, catalog.n_actions)
    table = read_decisions(sim_log)
    renamed = tmp_path / "renamed.parquet"
    pq.write_table(table, renamed)  # other files, other name, the same decisions
    assert load_logged_bandit(renamed, catalog.n_actions).fingerprint() == log.fingerprint()
    assert len(log.fingerprint()) == 16
    assert log.fingerprint("recipe-a") != log.fingerprint("recipe-b") != log.fingerprint()
    rewards = table.column("reward").to_numpy().copy()
    rewards[0] += 1.0
    changed = tmp_path / "changed.parquet"
    column = table.schema.get_field_index("reward")
    pq.write_table(table.set_column(column, "reward", pa.array(rewards)), changed)
    assert load_logged_bandit(changed, catalog.n_actions).fingerprint() != log.fingerprint()
    assert log.take(np.arange(1, log.n_rounds)).fingerprint() != log.fingerprint()
    arrays = {f.name for f in dataclasses.fields(log) if not f.name.endswith("_version")}
    assert arrays == set(FINGERPRINTED)  # a new array cannot escape the fingerprint


def test_split_log_by_customer_and_independent_per_purpose(sim_log, catalog) -> None:
    log = load_logged_bandit(sim_log, catalog.n_actions)
    kept, held, mask = split_log(log, 0.3, 0)
    assert 0.2 < mask.mean() < 0.4
    assert not set(held.customer_key) & set(kept.customer_key)  # customers stay whole
    np.testing.assert_array_equal(split_log(log, 0.3, 0)[2], mask)  # stable
    _, _, validation = split_log(log, 0.3, 0, "validation")
    assert 0.2 < validation.mean() < 0.4
    assert 0.1 < (validation & mask).mean() / mask.mean() < 0.5  # about 30%: independent
    with pytest.raises(ValueError, match="too small"):
        split_log(log.take(np.arange(1)), 0.3, 0)


def _edit_csv(path: Path, edit: Callable[[list[list[str]]], object]) -> None:
    """Rewrite a CSV file after ``edit`` changed its lines (header first), as a user would."""
    with path.open(newline="") as handle:
        lines = list(csv.reader(handle))
    edit(lines)
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows(lines)


def _set_csv_cell(path: Path, row: int, column: str, value: str) -> None:
    """Overwrite one cell (data row ``row``, 0-based) of a CSV file."""

    def edit(lines: list[list[str]]) -> None:
        lines[row + 1][lines[0].index(column)] = value

    _edit_csv(path, edit)


@pytest.mark.parametrize("spelling", ["nan", "NaN", "NA", "null"])
def test_read_csv_decisions_reward_spelled_as_missing_is_refused_not_pending(
    sim_log, catalog, tmp_path: Path, spelling: str
) -> None:
    """Only an empty cell means "no outcome yet" (the README's CSV convention): a NaN is a
    bad reward, refused as in Parquet, and ``--drop-pending`` must not drop it silently."""
    path = to_csv(read_decisions(sim_log).slice(0, 10), tmp_path / "log.csv")
    _set_csv_cell(path, 3, "reward", spelling)
    for drop_pending in (False, True):
        with pytest.raises(DecisionLogError, match="reward") as info:
            load_logged_bandit(path, catalog.n_actions, drop_pending=drop_pending)
        assert info.value.column == "reward" and str(path) in str(info.value)
    _set_csv_cell(path, 3, "reward", "")  # the empty cell: pending, dropped on request
    assert load_logged_bandit(path, catalog.n_actions, drop_pending=True).n_rounds == 9


@pytest.mark.parametrize("column", ["timestamp", "reward_at"])
def test_read_csv_decisions_time_without_utc_offset_refused(
    sim_log, catalog, tmp_path: Path, column: str
) -> None:
    """The README's CSV convention: times carry their offset; one without it is refused
    rather than read as UTC (a bank's local times would shift by its offset)."""
    path = to_csv(read_decisions(sim_log).slice(0, 10), tmp_path / "log.csv")

    def naive(lines: list[list[str]]) -> None:
        at = lines[0].index(column)
        for line in lines[1:]:
            line[at] = line[at] and datetime.fromisoformat(line[at]).strftime("%Y-%m-%dT%H:%M:%S")

    _edit_csv(path, naive)
    with pytest.raises(DecisionLogError, match="UTC offset") as info:
        load_logged_bandit(path, catalog.n_actions)
    assert info.value.column == column and str(path) in str(info.value)


@pytest.mark.parametrize("column", ["action", "decision_id", "customer_key"])
def test_read_csv_decisions_empty_required_cell_names_file_column_and_row(
    sim_log, catalog, tmp_path: Path, column: str
) -> None:
    path = to_csv(read_decisions(sim_log).slice(0, 10), tmp_path / "log.csv")
    _set_csv_cell(path, 2, column, "")
    with pytest.raises(DecisionLogError, match="must not be null") as info:
        load_logged_bandit(path, catalog.n_actions)
    assert (info.value.source, info.value.column, info.value.row) == (str(path), column, 2)


def _rename_csv_column(path: Path, old: str, new: str) -> None:
    def rename(lines: list[list[str]]) -> None:
        lines[0][lines[0].index(old)] = new

    _edit_csv(path, rename)


@pytest.mark.parametrize("spelt", ["Pscore", " pscore", "PScore ", "p_score"])
def test_read_csv_decisions_misspelt_pscore_refused(
    sim_log, catalog, tmp_path: Path, spelt: str
) -> None:
    """A header such as ``action, pscore`` (a space after the comma) or ``Pscore`` would
    otherwise read the log as one without propensities."""
    path = to_csv(read_decisions(sim_log).slice(0, 10), tmp_path / "log.csv")
    _rename_csv_column(path, "pscore", spelt)
    with pytest.raises(DecisionLogError, match="did you mean 'pscore'") as info:
        load_logged_bandit(path, catalog.n_actions)
    assert (info.value.source, info.value.column) == (str(path), spelt)


def test_read_csv_decisions_unknown_column_warned_and_left_out(
    sim_log, catalog, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = to_csv(read_decisions(sim_log).slice(0, 10), tmp_path / "log.csv")
    _rename_csv_column(path, "pscore", "pscroe")
    with caplog.at_level("WARNING", logger="nextbest.decision_log"):
        log = load_logged_bandit(path, catalog.n_actions)
    assert log.n_rounds == 10 and log.pscore is None  # read, as the warning says
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: columns not in the decision schema, left out: 'pscroe' (did you mean 'pscore'?)"
    ]


def test_a_csv_log_with_a_column_twice_is_refused_naming_it(
    sim_log, catalog, tmp_path: Path
) -> None:
    path = to_csv(read_decisions(sim_log).slice(0, 10), tmp_path / "log.csv")

    def twice(lines: list[list[str]]) -> None:
        at = lines[0].index("pscore")
        for line in lines:
            line.append(line[at])

    _edit_csv(path, twice)
    with pytest.raises(DecisionLogError, match=r"pscore.*this column twice"):
        load_logged_bandit(path, catalog.n_actions)


def test_ope_table_makes_one_policy_array_at_a_time(sim_log, catalog) -> None:
    """Each (n, A) float64 array is 3.7 GB on a 1.3-million-decision log: evaluate ran out
    of memory holding four at once. Given functions, the table makes each in turn and drops
    it before the next."""
    import gc
    import weakref

    log = load_logged_bandit(sim_log, catalog.n_actions)
    made: list[weakref.ref] = []

    def factory(name: str):
        def make() -> np.ndarray:
            gc.collect()
            assert all(ref() is None for ref in made), "an earlier policy's array is alive"
            dist = baseline_action_dist(name, log)
            made.append(weakref.ref(dist))
            return dist

        return make

    lazy = ope_table(
        log, {n: factory(n) for n in ("uniform", "no_contact", "logging")}, n_bootstrap_samples=20
    )
    eager = ope_table(
        log,
        {n: baseline_action_dist(n, log) for n in ("uniform", "no_contact", "logging")},
        n_bootstrap_samples=20,
    )
    assert lazy == eager and len(made) == 3


def test_a_log_without_rewards_says_so_not_that_they_are_pending(
    sim_log, catalog, tmp_path: Path
) -> None:
    """A missing reward column read as 'N of N decisions have no outcome yet', pointing to
    --drop-pending, which then found nothing left."""
    table = read_decisions(sim_log).slice(0, 10)
    path = to_csv(table.drop_columns(["reward"]), tmp_path / "log.csv")
    for drop_pending in (False, True):
        with pytest.raises(DecisionLogError, match="column is missing or empty"):
            load_logged_bandit(path, catalog.n_actions, drop_pending=drop_pending)


def test_raw_customer_ids_in_a_log_are_warned_of_without_printing_them(
    sim_log, catalog, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    table = read_decisions(sim_log).slice(0, 10)
    column = table.schema.get_field_index("customer_key")
    raw = ["110101199003071234"] * 3 + table.column("customer_key").to_pylist()[3:]
    path = to_csv(table.set_column(column, "customer_key", pa.array(raw)), tmp_path / "log.csv")
    load_logged_bandit(path, catalog.n_actions)
    assert "3 of 10 customer keys are not pseudonyms" in caplog.text
    assert "110101199003071234" not in caplog.text
    caplog.clear()
    load_logged_bandit(sim_log, catalog.n_actions)
    assert "not pseudonyms" not in caplog.text


def _versioned_log(tmp_path: Path, catalog) -> tuple[Path, list]:
    """Six decisions over three days: rule set r1 on the first two, r2 on the third."""
    from datetime import UTC, datetime

    from nextbest.decision_log import decisions_table, write_decisions

    times = [datetime(2026, 1, day, hour, tzinfo=UTC) for day in (5, 6, 7) for hour in (9, 15)]
    n = len(times)
    table = decisions_table(
        {
            "decision_id": [f"d{i}" for i in range(n)],
            "timestamp": times,
            "customer_key": ["cust_x"] * n,
            "context": [[0.0, 1.0]] * n,
            "candidate_actions": [[0, 1]] * n,
            "action": [0, 1] * 3,
            "pscore": [0.5] * n,
            "action_dist": [[0.5, 0.5]] * n,
            "reward": [1.0, 0.0] * 3,
            "policy": ["p"] * n,
            "model_version": ["m"] * n,
            "ruleset_version": ["r1"] * 4 + ["r2"] * 2,
            "catalog_version": [catalog.version] * n,
            "feature_spec_version": ["f"] * n,
        }
    )
    return write_decisions(table, tmp_path / "log.parquet"), times


def test_a_log_mixing_versions_names_them_and_a_time_window_keeps_one(
    tmp_path: Path, catalog
) -> None:
    """A live journal spans rule-set changes: the refusal names each version's span and
    how to keep the latest, and ``since`` / ``until`` select decisions by time."""
    from datetime import timedelta

    path, times = _versioned_log(tmp_path, catalog)
    with pytest.raises(DecisionLogError) as info:
        load_logged_bandit(path, catalog.n_actions)
    message = str(info.value)
    assert info.value.column == "ruleset_version"
    assert "r1: 4 decisions, 2026-01-05T09:00:00+00:00 to 2026-01-06T15:00:00+00:00" in message
    assert "r2: 2 decisions" in message
    assert "--since 2026-01-06T15:00:00.000001+00:00" in message  # after r1's last decision
    assert "left out" not in message
    latest = load_logged_bandit(path, catalog.n_actions, since=times[4])
    assert latest.n_rounds == 2 and latest.ruleset_version == "r2"
    first_day = load_logged_bandit(path, catalog.n_actions, until=times[2])
    assert first_day.n_rounds == 2 and first_day.ruleset_version == "r1"
    np.testing.assert_array_equal(first_day.action, [0, 1])
    middle = load_logged_bandit(path, catalog.n_actions, since=times[1], until=times[3])
    assert middle.n_rounds == 2  # since is inside, until outside
    with pytest.raises(DecisionLogError, match="no decision between") as empty:
        load_logged_bandit(path, catalog.n_actions, since=times[-1] + timedelta(seconds=1))
    assert "the log runs from 2026-01-05T09:00:00+00:00 to 2026-01-07T15:00:00+00:00" in str(
        empty.value
    )
    with pytest.raises(ValueError, match="needs a time zone"):
        load_logged_bandit(path, catalog.n_actions, since=times[4].replace(tzinfo=None))
    with pytest.raises(ValueError, match="must come before until"):
        load_logged_bandit(path, catalog.n_actions, since=times[4], until=times[2])


def test_the_suggested_window_keeps_only_the_latest_of_overlapping_versions(
    tmp_path: Path, catalog
) -> None:
    """Workers move to a new rule set one by one, within the same second: the suggested
    ``since`` starts after the older version's last decision (to the microsecond), says how
    many of the new version's decisions that leaves out, and then loads."""
    from datetime import datetime, timedelta

    import pyarrow.parquet as pq

    path, times = _versioned_log(tmp_path, catalog)
    table = pq.read_table(path)
    base = times[3]
    stamps = [base + timedelta(microseconds=m) for m in (0, 10, 20, 30, 40, 50)]
    versions = ["r1", "r1", "r2", "r1", "r2", "r2"]  # the versions interleave
    table = table.set_column(
        table.schema.get_field_index("timestamp"),
        "timestamp",
        pa.array(stamps, table.schema.field("timestamp").type),
    ).set_column(
        table.schema.get_field_index("ruleset_version"), "ruleset_version", pa.array(versions)
    )
    pq.write_table(table, path)
    with pytest.raises(DecisionLogError) as info:
        load_logged_bandit(path, catalog.n_actions)
    message = " ".join(str(info.value).split())
    since = (base + timedelta(microseconds=31)).isoformat()
    assert f"--since {since}" in message
    assert "(1 of r2's decisions are earlier and left out)" in message
    kept = load_logged_bandit(path, catalog.n_actions, since=datetime.fromisoformat(since))
    assert kept.n_rounds == 2 and kept.ruleset_version == "r2"


def test_evaluate_cli_since_keeps_one_version_and_refuses_a_time_without_zone(
    tmp_path: Path, catalog
) -> None:
    path, _ = _versioned_log(tmp_path, catalog)
    mixed = CliRunner().invoke(app, ["evaluate", "--logs", str(path), "--bootstrap", "20"])
    assert mixed.exit_code == 2 and "--since" in " ".join(mixed.output.split())
    ok = CliRunner().invoke(
        app,
        ["evaluate", "--logs", str(path), "--bootstrap", "20", "--since", "2026-01-07T00:00Z"],
    )
    assert ok.exit_code == 0, ok.output
    assert "snips" in ok.output
    naive = CliRunner().invoke(
        app, ["evaluate", "--logs", str(path), "--since", "2026-01-07T00:00"]
    )
    assert naive.exit_code == 2 and "bad --since" in naive.output
    assert "time zone" in " ".join(naive.output.split())
