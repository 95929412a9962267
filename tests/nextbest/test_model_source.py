"""Model sources: a clear error for a path or artifact that is not an ONNX model."""

from __future__ import annotations

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
