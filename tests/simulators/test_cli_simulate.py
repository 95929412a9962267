"""``nextbest simulate``: writes a decision log and KPIs; bad input exits 2 with a reason and
never touches an existing log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nextbest.catalog import ActionCatalog
from nextbest.cli import app
from nextbest.decision_log import read_decisions
from simulators.scenario import DEFAULT_SCENARIO

runner = CliRunner()
SMALL_RUN = ["simulate", "--customers", "500", "--days", "5", "--seed", "1"]


def _flat(output: str) -> str:
    return " ".join(output.split())


def _bad_scenario(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "bad_scenario.yaml"
    text = DEFAULT_SCENARIO.read_text(encoding="utf-8")
    assert text.count("sms: 0.90") == 1
    path.write_text(text.replace("sms: 0.90", "sms: 1.5"), encoding="utf-8")
    return path


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


def test_simulate_help() -> None:
    result = runner.invoke(app, ["simulate", "--help"])
    assert result.exit_code == 0
    assert "--epsilon" in result.output and "--scenario" in result.output


def test_simulate_small_run_writes_log_and_kpis(tmp_path: Path, catalog: ActionCatalog) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, [*SMALL_RUN, "--out", str(out)])
    assert result.exit_code == 0, result.output
    parts = list(out.glob("part-*.parquet"))
    assert len(parts) == 1
    kpis = json.loads((out / "kpis.json").read_text())
    assert {k: kpis[k] for k in ("scenario", "policy", "epsilon", "seed", "customers", "days")} == {
        "scenario": "retail_bank",
        "policy": "playbook",
        "epsilon": 0.1,
        "seed": 1,
        "customers": 500,
        "days": 5,
    }
    assert [row["segment"] for row in kpis["segments"]] == ["potential", "active", "dormant", "all"]
    log = read_decisions(out, n_actions=catalog.n_actions)
    assert log.num_rows == kpis["segments"][-1]["decisions"] > 0
    flat = _flat(result.output)
    assert f"logged {log.num_rows:,} decisions to" in flat
    assert "retail_bank: playbook (epsilon 0.1), 5 days" in flat


def test_simulate_same_seed_same_kpis(tmp_path: Path) -> None:
    for name in ("a", "b"):
        result = runner.invoke(app, [*SMALL_RUN, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    a = json.loads((tmp_path / "a" / "kpis.json").read_text())
    b = json.loads((tmp_path / "b" / "kpis.json").read_text())
    assert a == b


def test_simulate_without_out_says_no_log_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, SMALL_RUN)
    assert result.exit_code == 0, result.output
    assert "no --out: the KPIs above only, no decision log written" in _flat(result.output)
    assert list(tmp_path.iterdir()) == []


def test_simulate_uniform_policy_runs(tmp_path: Path) -> None:
    result = runner.invoke(app, [*SMALL_RUN, "--policy", "uniform", "--out", str(tmp_path / "u")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "u" / "kpis.json").read_text())["policy"] == "uniform"


def test_simulate_bad_scenario_exits_2_naming_file_and_key(tmp_path: Path) -> None:
    path = _bad_scenario(tmp_path / "scenarios")
    out = tmp_path / "run"
    result = runner.invoke(app, [*SMALL_RUN, "--scenario", str(path), "--out", str(out)])
    assert result.exit_code == 2
    flat = _flat(result.output)
    assert "config error" in flat
    assert f"{path}: population.consent_rates.sms: " in flat
    assert "less than or equal to 1" in flat
    assert not out.exists()


def test_simulate_missing_scenario_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    result = runner.invoke(app, [*SMALL_RUN, "--scenario", str(path)])
    assert result.exit_code == 2
    assert f"{path}: file not found" in _flat(result.output)


def test_simulate_bad_scenario_path_with_brackets_shown_verbatim(tmp_path: Path) -> None:
    path = _bad_scenario(tmp_path / "[prod]")
    result = runner.invoke(app, [*SMALL_RUN, "--scenario", str(path)])
    assert result.exit_code == 2
    assert str(path) in _flat(result.output)


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["--epsilon", "2"], id="epsilon_above_1"),
        pytest.param(["--epsilon", "-0.1"], id="epsilon_negative"),
        pytest.param(["--customers", "0"], id="no_customers"),
        pytest.param(["--days", "0"], id="no_days"),
        pytest.param(["--policy", "greedy"], id="unknown_policy"),
    ],
)
def test_simulate_bad_option_exits_2(tmp_path: Path, args: list[str]) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, [*SMALL_RUN, *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "Invalid value" in _flat(result.output)
    assert not out.exists()


def test_simulate_existing_log_refused_and_untouched(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = runner.invoke(app, [*SMALL_RUN, "--out", str(out)])
    assert first.exit_code == 0, first.output
    before = _snapshot(out)
    assert any(name.endswith(".parquet") for name in before) and "kpis.json" in before
    again = runner.invoke(app, [*SMALL_RUN, "--seed", "2", "--out", str(out)])
    assert again.exit_code == 2
    flat = _flat(again.output)
    assert "refused" in flat and "already holds a decision log" in flat
    assert _snapshot(out) == before
    assert sorted(p.name for p in out.iterdir()) == sorted(before)


def test_simulate_and_demo_refuse_an_out_that_is_a_file(tmp_path: Path) -> None:
    """Both crashed with FileExistsError / NotADirectoryError tracebacks."""
    afile = tmp_path / "notes.txt"
    afile.write_text("")
    for args in (
        ["simulate", "--customers", "10", "--days", "1", "--out", str(afile)],
        ["simulate", "--customers", "10", "--days", "1", "--out", str(afile / "x")],
        [
            "demo",
            "--customers",
            "10",
            "--days",
            "1",
            "--out",
            str(afile),
            "--tracking-uri",
            f"sqlite:///{tmp_path}/m.db",
        ],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "bad --out" in result.output and "file, not a directory" in result.output
    assert afile.read_text() == ""
