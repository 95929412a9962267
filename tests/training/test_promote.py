"""``promote`` moves ``champion`` only on evidence, and fails closed when it is missing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from nextbest.cli import app
from training.config import TrainingConfig
from training.tracking import CHALLENGER, CHAMPION, CHAMPION_TAG, promote
from training.train import champion_on_holdout

NAME = "promote-test"
TAG = CHAMPION_TAG


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MlflowClient]:
    """A registry of its own; MLflow's global tracking URI and environment restored after."""
    before = mlflow.get_tracking_uri()
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)  # set_tracking_uri writes the first one
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/m.db")
    client = MlflowClient()
    client.create_registered_model(NAME)
    yield client
    mlflow.set_tracking_uri(before)


EXPERIMENT = "promote-test"


def version(
    client: MlflowClient,
    alias: str,
    metrics: dict[str, float],
    alpha: str | None = "0.05",
    tags: dict[str, str] | None = None,
    folds: str | None = "2",
) -> str:
    """A registered version whose run logged ``metrics``, ``tags`` (and ``evaluation.alpha``,
    ``evaluation.crossfit_folds``)."""
    found = client.get_experiment_by_name(EXPERIMENT)
    experiment = found.experiment_id if found else client.create_experiment(EXPERIMENT)
    with mlflow.start_run(experiment_id=experiment) as run:  # no active experiment set
        mlflow.log_metrics(metrics)
        mlflow.set_tags(tags or {})
        if alpha is not None:
            mlflow.log_param("evaluation.alpha", alpha)
        if folds is not None:
            mlflow.log_param("evaluation.crossfit_folds", folds)
    made = client.create_model_version(NAME, f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.set_registered_model_alias(NAME, alias, made.version)
    return str(made.version)


GOOD = {
    "ope/model/dr/lower": 2.0,
    "ope/model/dr/value": 3.0,
    "ope/logging/dr/value": 1.0,
    "compliance/blocked_actions_chosen": 0,
}


def champion_version(client: MlflowClient) -> str | None:
    try:
        return str(client.get_model_version_by_alias(NAME, CHAMPION).version)
    except mlflow.exceptions.MlflowException:
        return None


def test_first_challenger_beating_the_logging_policy_is_promoted(client: MlflowClient) -> None:
    made = version(client, CHALLENGER, GOOD)
    promoted, reason = promote(client, NAME)
    assert promoted, reason
    assert champion_version(client) == made


@pytest.mark.parametrize(
    ("metrics", "alpha", "reason"),
    [
        ({**GOOD, "ope/model/dr/lower": 0.5}, "0.05", "does not beat the logging policy"),
        ({**GOOD, "compliance/blocked_actions_chosen": 1}, "0.05", "must be 0"),
        ({k: v for k, v in GOOD.items() if not k.startswith("compliance")}, "0.05", "must be 0"),
        (GOOD, "0.5", "evaluation.alpha=0.5"),
        (GOOD, None, "evaluation.alpha=None"),
        (
            {k: v for k, v in GOOD.items() if not k.startswith("ope/logging")}
            | {"ope/model/dr/lower": -0.1},
            "0.05",
            "does not beat doing nothing",
        ),
        (
            {k: v for k, v in GOOD.items() if not k.startswith("ope/logging")}
            | {"eval/holdout_mean_reward": 2.5},
            "0.05",
            "does not beat the logging policy's mean held-out reward",
        ),
        (GOOD, "lots", "evaluation.alpha=lots"),
    ],
)
def test_first_challenger_without_evidence_is_not_promoted(
    client: MlflowClient, metrics: dict[str, float], alpha: str | None, reason: str
) -> None:
    version(client, CHALLENGER, metrics, alpha)
    promoted, why = promote(client, NAME)
    assert not promoted
    assert reason in why
    assert champion_version(client) is None


def test_challenger_must_beat_the_champion_on_its_own_held_out_decisions(
    client: MlflowClient,
) -> None:
    old = version(client, CHAMPION, GOOD)
    # the champion's own run valued it at 3.0; on the challenger's decisions it is worth 2.0
    same_data = {**GOOD, "ope/champion/dr/value": 2.0}
    version(client, CHALLENGER, {**same_data, "ope/model/dr/lower": 1.9}, tags={TAG: old})
    promoted, why = promote(client, NAME)
    assert not promoted and "does not beat champion" in why and "2.0000" in why
    assert champion_version(client) == old
    better = version(client, CHALLENGER, {**same_data, "ope/model/dr/lower": 2.5}, tags={TAG: old})
    promoted, why = promote(client, NAME)
    assert promoted, why  # 2.5 beats 2.0 on the same decisions (not the 3.0 of another log)
    assert champion_version(client) == better


@pytest.mark.parametrize(
    ("tags", "reason"),
    [
        ({}, "evaluated no champion"),  # trained before there was a champion
        ({TAG: "previous"}, "evaluated vprevious"),  # trained before the champion moved
        (
            {TAG: "current", "champion.unevaluated": "it reads features f1, the log has f2"},
            "could not be evaluated on the challenger's held-out decisions (it reads features",
        ),
        ({TAG: "current"}, "could not be evaluated"),  # tagged, but no value logged
    ],
)
def test_champion_the_challenger_was_not_compared_with_is_kept(
    client: MlflowClient, tags: dict[str, str], reason: str
) -> None:
    old = version(client, CHAMPION, GOOD)
    tags = {k: old if v == "current" else v for k, v in tags.items()}
    metrics = {**GOOD, "ope/model/dr/lower": 1000.0}
    if "champion.unevaluated" not in tags and tags.get(TAG) != old:
        metrics["ope/champion/dr/value"] = 0.0
    version(client, CHALLENGER, metrics, tags=tags)
    promoted, why = promote(client, NAME)
    assert not promoted and reason in why, why
    assert champion_version(client) == old


def test_a_champion_that_cannot_be_read_is_reported_not_raised(
    client: MlflowClient, tmp_path: Path
) -> None:
    """Training values the champion when it can; a champion whose run logged no config, or
    no model, is reported with the reason (which the run tags, and promote then refuses
    on); it does not stop the training."""
    champion = version(client, CHAMPION, GOOD)  # its run logged no config and no model file
    config = TrainingConfig.model_validate(
        {
            "learner": "neural_bandit",
            "data": {"logs": str(tmp_path)},
            "tracking": {"uri": mlflow.get_tracking_uri(), "registered_model": NAME},
        }
    )
    holdout = SimpleNamespace(
        feature_spec_version="f", context=np.zeros((2, 3), np.float32), candidates=np.ones((2, 4))
    )

    found = champion_on_holdout(config, holdout, tmp_path)  # type: ignore[arg-type]
    assert found is not None
    evaluated_version, why = found
    assert evaluated_version == champion
    assert isinstance(why, str) and why.startswith("MlflowException") and "config.json" in why

    run_id = client.get_model_version(NAME, champion).run_id
    client.log_dict(run_id, {"policy": {"kind": "greedy"}}, "config.json")  # now the model
    found = champion_on_holdout(config, holdout, tmp_path / "again")  # type: ignore[arg-type]
    assert found is not None and isinstance(found[1], str)
    assert found[1].startswith("ModelSourceError"), found[1]
    client.delete_registered_model_alias(NAME, CHAMPION)
    assert champion_on_holdout(config, holdout, tmp_path) is None  # type: ignore[arg-type]


@pytest.fixture
def registry_elsewhere(
    client: MlflowClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """``MLFLOW_REGISTRY_URI`` naming another store than the tracking URI given (set after
    ``client``, whose registry is its tracking store)."""
    elsewhere = tmp_path / "elsewhere.db"
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{elsewhere}")
    return elsewhere


def test_promote_cli_uses_the_registry_of_the_tracking_uri_given(
    client: MlflowClient, registry_elsewhere: Path
) -> None:
    made = version(client, CHALLENGER, GOOD)
    uri = mlflow.get_tracking_uri()
    result = CliRunner().invoke(app, ["promote", "--tracking-uri", uri, "--model", NAME])
    assert result.exit_code == 0, result.output
    assert champion_version(client) == made
    assert not registry_elsewhere.exists()


def test_promote_cli_builds_one_mlflow_client(
    client: MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    version(client, CHALLENGER, GOOD)
    built = []
    init = MlflowClient.__init__

    def counted(self: MlflowClient, *args: object, **kwargs: object) -> None:
        built.append(kwargs)
        init(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(MlflowClient, "__init__", counted)
    uri = mlflow.get_tracking_uri()
    result = CliRunner().invoke(app, ["promote", "--tracking-uri", uri, "--model", NAME])
    assert result.exit_code == 0, result.output
    assert len(built) == 1, built


@pytest.mark.parametrize("folds", ["0", None])
def test_a_challenger_valued_with_its_own_reward_model_is_not_promoted(
    client: MlflowClient, folds: str | None
) -> None:
    """DR with the challenger's own scores as its reward model favours the challenger's
    choices: without cross-fitting (or without the setting logged) there is no promotion."""
    version(client, CHALLENGER, GOOD, folds=folds)
    promoted, why = promote(client, NAME)
    assert not promoted and "evaluation.crossfit_folds" in why and "cross-fitted" in why
    assert champion_version(client) is None


def test_a_challenger_checked_against_another_rule_sets_masks_is_not_promoted(
    client: MlflowClient,
) -> None:
    """Its compliance check and values are under the log's rules, not the current ones."""
    version(client, CHALLENGER, GOOD, tags={"compliance.ruleset_mismatch": "older != rs-2"})
    promoted, why = promote(client, NAME)
    assert not promoted and "older != rs-2" in why and "current rule set" in why
    assert champion_version(client) is None


@pytest.mark.parametrize("status", ["FAILED", "RUNNING", "KILLED"])
def test_a_challenger_whose_run_did_not_finish_is_not_promoted(
    client: MlflowClient, status: str
) -> None:
    """Training registers the challenger before its run ends: a run that failed or was
    killed after that (its checks or card not logged) must not be promoted."""
    made = version(client, CHALLENGER, GOOD)
    run_id = client.get_model_version(NAME, made).run_id
    client.update_run(run_id, status=status)
    promoted, why = promote(client, NAME)
    assert not promoted and f"a {status} run" in why
    assert champion_version(client) is None
    client.update_run(run_id, status="FINISHED")
    assert promote(client, NAME)[0]
