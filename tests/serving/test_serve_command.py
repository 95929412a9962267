"""``nextbest serve`` checks its settings and configuration files before any worker starts:
one line naming the variable or file and the reason, exit code 2, no traceback."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from typer.testing import CliRunner

from nextbest.cli import app

runner = CliRunner()


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[dict[str, Any]]:
    """A clean ``NEXTBEST_`` environment, and ``uvicorn.run`` recording its calls instead of
    serving (the list stays empty when ``serve`` stops before starting)."""
    for name in [n for n in os.environ if n.upper().startswith("NEXTBEST_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("NEXTBEST_STATE_DIR", str(tmp_path / "state"))
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda target, **options: calls.append(options))
    return calls


def serve(*args: str) -> Any:
    return runner.invoke(app, ["serve", "--model", "model.onnx", *args])


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("NEXTBEST_API_KEYS_FILE", "{tmp}/nope.json", "{tmp}/nope.json: API keys file not found"),
        ("NEXTBEST_API_KEYS_FILE", "{tmp}/bad.json", "{tmp}/bad.json"),
        ("NEXTBEST_CAMPAIGNS_PATH", "{tmp}/nope.yaml", "{tmp}/nope.yaml"),
        ("NEXTBEST_RULES_PATH", "{tmp}/nope.yaml", "{tmp}/nope.yaml"),
        ("NEXTBEST_CATALOG_DIR", "{tmp}", "{tmp}"),
    ],
)
def test_a_bad_configuration_file_is_one_line_before_any_worker(
    started: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    variable: str,
    value: str,
    expected: str,
) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    monkeypatch.setenv(variable, value.format(tmp=tmp_path))
    result = serve()
    assert result.exit_code == 2, result.output
    assert "config error" in result.output
    assert expected.format(tmp=tmp_path) in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert started == []
    assert not (tmp_path / "state").exists()  # nothing written


@pytest.mark.parametrize(
    ("environment", "expected"),
    [
        (
            {"NEXTBEST_EPSILON": "2", "NEXTBEST_MAX_BATCH": "many"},
            [
                "NEXTBEST_EPSILON=2: Input should be less than or equal to 1",
                "NEXTBEST_MAX_BATCH=many: Input should be a valid integer",
            ],
        ),
        (  # unsafe outside local: each variable named, the key's value never printed
            {
                "NEXTBEST_ENVIRONMENT": "production",
                "NEXTBEST_PSEUDONYMISATION_KEY": "aaaaaaaaaaaaaaaaaaaaaaaa",
            },
            [
                "NEXTBEST_PSEUDONYMISATION_KEY has fewer than 8 distinct",
                "NEXTBEST_API_KEYS_FILE is not set",
                "NEXTBEST_DOCS=false",
            ],
        ),
    ],
)
def test_bad_settings_name_their_environment_variables(
    started: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    environment: dict[str, str],
    expected: list[str],
) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    result = serve()
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert all(line in output for line in expected), output
    assert "aaaaaaaa" not in output
    assert started == []


def test_a_misspelt_setting_is_named_with_the_one_it_resembles(
    started: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("NEXTBEST_EPSLION", "0.2")
    monkeypatch.setenv("NEXTBEST_NOTEBOOK_DIR", str(tmp_path))  # the notebooks' own: not named
    result = serve()
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "NEXTBEST_EPSLION (did you mean NEXTBEST_EPSILON?)" in output
    assert "NOTEBOOK_DIR" not in output
    assert len(started) == 1


def test_a_state_directory_of_another_key_is_one_line_before_any_worker(
    started: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import sqlite3

    from serving.pseudonym_binding import STATE_FILES, bind_pseudonym_key
    from serving.settings import load_settings

    monkeypatch.setenv("NEXTBEST_PSEUDONYMISATION_KEY", "the-key-this-state-was-written-with")
    settings = load_settings()
    settings.state_dir.mkdir(parents=True)
    for name, table in STATE_FILES:  # the meta tables a service's stores make
        with sqlite3.connect(settings.state_dir / name) as conn:
            conn.execute(f"CREATE TABLE {table} (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    bind_pseudonym_key(settings.state_dir, settings.pseudonym_key)
    monkeypatch.setenv("NEXTBEST_PSEUDONYMISATION_KEY", "a-new-key-nobody-told-the-state")
    result = serve()
    assert result.exit_code == 2, result.output
    assert "another pseudonymisation key" in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert started == []


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("journal", "journal.db cannot be read as a SQLite database: file is not a database"),
        ("contacts", "contacts.db cannot be read as a SQLite database: file is not a database"),
        ("state_file", "NEXTBEST_STATE_DIR={tmp}/afile: {tmp}/afile is a file, not a directory"),
        ("empty_state", "NEXTBEST_STATE_DIR=: must name a directory"),
        ("seed", "NEXTBEST_SEED=-1: Input should be greater than or equal to 0"),
    ],
)
def test_an_unusable_state_or_seed_is_one_line_before_any_worker(
    started: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    setup: str,
    expected: str,
) -> None:
    """They were tracebacks (exit 1 or 3) from a worker or the key check."""
    state = tmp_path / "state"
    if setup in ("journal", "contacts"):
        state.mkdir()
        (state / f"{setup}.db").write_text("garbage")
    elif setup == "state_file":
        (tmp_path / "afile").write_text("")
        monkeypatch.setenv("NEXTBEST_STATE_DIR", str(tmp_path / "afile"))
    elif setup == "empty_state":
        monkeypatch.setenv("NEXTBEST_STATE_DIR", "")
    else:
        monkeypatch.setenv("NEXTBEST_SEED", "-1")
    result = serve()
    assert result.exit_code == 2, result.output
    assert expected.format(tmp=tmp_path) in " ".join(result.output.split())
    assert "Traceback" not in result.output and started == []
