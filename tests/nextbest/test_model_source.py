"""Model sources: a clear error for a path or artifact that is not an ONNX model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nextbest.model_source import ModelSourceError, mlflow_client, resolve_model


def test_a_directory_is_not_a_model_file(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match=r"a directory, not an \.onnx file"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelSourceError, match="no such file"):
        resolve_model(str(tmp_path / "missing.onnx"))


def test_a_run_artifact_that_is_not_onnx_is_named(tmp_path: Path) -> None:
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("model-source", artifact_location=str(tmp_path / "a"))
    run = client.create_run(experiment)
    (tmp_path / "config.json").write_text("{}")
    client.log_artifact(run.info.run_id, str(tmp_path / "config.json"))
    with pytest.raises(ModelSourceError, match=r"the artifact config\.json is not an \.onnx file"):
        resolve_model(f"runs:/{run.info.run_id}/config.json", uri, download_dir=tmp_path / "d")


def test_mlflow_client_registry_is_its_tracking_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not the process-wide registry (``MLFLOW_REGISTRY_URI``) MLflow would otherwise use."""
    mlflow = pytest.importorskip("mlflow")
    elsewhere = tmp_path / "elsewhere.db"
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{elsewhere}")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow_client(uri).create_registered_model("here")
    assert mlflow.MlflowClient(uri, registry_uri=uri).get_registered_model("here").name == "here"
    assert not elsewhere.exists()


def test_a_database_that_is_not_an_mlflow_store_is_refused_and_left_alone(
    tmp_path: Path,
) -> None:
    """MLflow would add its ~60 tables to any SQLite file it is pointed at (a service's
    journal, say), and a file that is not a database failed with SQLAlchemy's traceback."""
    import sqlite3

    journal = tmp_path / "journal.db"
    with sqlite3.connect(journal) as conn:
        conn.execute("CREATE TABLE journal_meta (key TEXT PRIMARY KEY, value TEXT)")
    before = journal.read_bytes()
    text = tmp_path / "notes.db"
    text.write_text("not a database")
    for path, reason in (
        (journal, "is a SQLite database but not an MLflow store (its tables: journal_meta"),
        (text, "is not a SQLite database"),
        (tmp_path, "is a directory"),
    ):
        for must_exist in (False, True):  # writers (train) and readers alike
            with pytest.raises(ModelSourceError, match=re.escape(reason)):
                mlflow_client(f"sqlite:///{path}", must_exist=must_exist)
    assert journal.read_bytes() == before
    with pytest.raises(ModelSourceError, match="tracking URI is empty"):
        mlflow_client("  ")
    fresh = tmp_path / "new.db"
    mlflow_client(f"sqlite:///{fresh}").search_experiments()  # a new store is set up
    mlflow_client(f"sqlite:///{fresh}", must_exist=True).search_experiments()  # and reread
