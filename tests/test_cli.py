"""The command line: --help everywhere, the demo runs, bad configs exit 2 with a reason."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nextbest.catalog import DEFAULT_CATALOG_DIR
from nextbest.cli import app

runner = CliRunner()


@pytest.mark.parametrize("command", [[], ["check"], ["catalog"], ["demo"]])
def test_help_every_subcommand(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_command_list_describes_each_command_in_one_flowing_line() -> None:
    """The top-level --help lists every command with its summary as text that wraps to the
    terminal: a docstring's hard line breaks would cut the summaries into ragged pieces."""
    for command in app.registered_commands:
        assert command.callback is not None
        summary = command.short_help or (command.callback.__doc__ or "").split("\n\n")[0]
        assert summary and "\n" not in summary.strip(), command.callback.__name__


def test_demo_small_population_simulates_and_shows_rules(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "demo",
            "--customers",
            "300",
            "--days",
            "3",
            "--seed",
            "3",
            "--out",
            str(tmp_path),
            "--tracking-uri",
            f"sqlite:///{tmp_path}/mlflow.db",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "suitability_risk" in result.output
    assert "300 customers x 361 actions" in result.output
    assert "registered nextbest v1" in " ".join(result.output.split())
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir() and p.name.startswith("run-")]
    assert (tmp_path / "mlartifacts").is_dir()  # the run's artifacts, beside its store
    assert list((run / "logs").glob("part-*.parquet"))
    assert (run / "logs" / "kpis.json").exists()


def test_check_bad_catalog_exits_2_naming_file_and_key(tmp_path: Path) -> None:
    shutil.copytree(DEFAULT_CATALOG_DIR, tmp_path / "catalog")
    offers = tmp_path / "catalog" / "offers.yaml"
    offers.write_text(offers.read_text().replace("risk_level: R5", "risk_level: R7"))
    result = runner.invoke(app, ["check", "--catalog", str(tmp_path / "catalog")])
    assert result.exit_code == 2
    flat = " ".join(result.output.split())
    assert "offers.yaml" in flat and "risk_level" in flat and "R7" in flat


def test_demo_negative_customers_refused() -> None:
    result = runner.invoke(app, ["demo", "--customers", "-5"])
    assert result.exit_code == 2


def test_catalog_piped_keeps_names_whole() -> None:
    """Piped to a file or a pager, the table is not cut to 80 columns (``wealth_…``)."""
    result = runner.invoke(app, ["catalog"])
    assert result.exit_code == 0, result.output
    assert "wealth_r1" in result.output and "relationship_manager" in result.output
    assert "…" not in result.output


def test_demo_too_small_to_train_says_which_options_to_raise(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            *("demo", "--customers", "50", "--days", "3", "--out", str(tmp_path)),
            *("--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"),
        ],
    )
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert "give it more --customers or --days (now 50 and 3" in flat


def test_demo_bad_tracking_uri_refused_before_simulating(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["demo", "--customers", "50", "--out", str(tmp_path), "--tracking-uri", "bogus://x"]
    )
    assert result.exit_code == 2, result.output
    assert "bad --tracking-uri tracking URI 'bogus://x' cannot be used" in result.output
    assert list(tmp_path.iterdir()) == []  # nothing simulated
