"""Where a training run's artifacts go."""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow import MlflowClient

from training.tracking import ARTIFACTS_DIRNAME, use_experiment


def test_use_experiment_sqlite_store_keeps_artifacts_beside_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # not where the store is
    store = tmp_path / "store" / "mlflow.db"
    store.parent.mkdir()
    uri = f"sqlite:///{store}"
    use_experiment(uri, "evidence")
    use_experiment(uri, "evidence")  # an existing experiment is reused, not recreated
    experiments = [e for e in MlflowClient().search_experiments() if e.name == "evidence"]
    assert len(experiments) == 1
    assert experiments[0].artifact_location == (store.parent / ARTIFACTS_DIRNAME).as_uri()
    with mlflow.start_run():
        mlflow.log_dict({"a": 1}, "a.json")
    assert list((store.parent / ARTIFACTS_DIRNAME).glob("*/artifacts/a.json"))
    assert not (tmp_path / "mlruns").exists()


def test_use_experiment_relative_sqlite_path_resolves_from_the_working_directory(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    use_experiment("sqlite:///relative.db", "rel")
    experiment = MlflowClient().get_experiment_by_name("rel")
    assert experiment.artifact_location == (tmp_path / ARTIFACTS_DIRNAME).as_uri()
