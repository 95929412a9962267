"""MLflow tracking: the run of a training job, its artifacts and the model registry.

Metric keys are namespaced: ``losses/...`` per epoch, ``ope/<policy>/<estimator>/...``,
``compliance/...``. Models are registered under one name with aliases: ``challenger`` for
every new model, ``champion`` for the one the service loads (moved by :func:`promote`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import onnx
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from nextbest.model_source import mlflow_client, sqlite_store_path

CHALLENGER = "challenger"
CHAMPION = "champion"
PROMOTION_METRIC = "ope/model/dr/lower"
"""The challenger's DR lower bound must beat the champion's DR value to be promoted."""
CHAMPION_METRIC = "ope/champion/dr/value"
"""The champion's DR value on the challenger's own held-out decisions, in the challenger's
run (:func:`champion_on_holdout`): both values rest on the same decisions."""
CHAMPION_TAG = "champion.version"
"""The registered version the run evaluated as the champion (absent: there was none)."""
CHAMPION_UNEVALUATED_TAG = "champion.unevaluated"
"""Why the run could not evaluate the champion on its held-out decisions."""
COMPLIANCE_METRIC = "compliance/blocked_actions_chosen"
"""Chosen actions the rules block, on the run's held-out decisions (must be 0): by the log's
candidate masks and, for a simulated log, by the rules' reference semantics on the replayed
customers at a sample of decisions, plus any of those decisions whose engine mask the
reference semantics disagree with (:data:`MASK_DISAGREEMENTS_METRIC`)."""
REFERENCE_CHECKED_METRIC = "compliance/reference_checked"
"""Held-out decisions at which the policy's action was checked by the rules' reference
semantics (:data:`simulators.ground_truth.REFERENCE_ROWS`; simulated logs only)."""
MASK_DISAGREEMENTS_METRIC = "compliance/mask_disagreements"
"""Replayed decisions (of the first 50 checked) where the rule engine's mask allows an action
that the rules' reference semantics block (must be 0; counted in :data:`COMPLIANCE_METRIC`)."""
RULESET_MISMATCH_TAG = "compliance.ruleset_mismatch"
"""Set when the log's masks were made by another rule set than the run's: the log's rule set
version and the run's."""
LOGGING_METRIC = "ope/logging/dr/value"
"""What runs today, estimated in the same run: the bar when there is no champion yet."""
LOGGED_REWARD_METRIC = "eval/holdout_mean_reward"
"""What runs today, observed: the bar when the log has no distribution to estimate it."""
ALPHA_PARAM = "evaluation.alpha"
PROMOTION_ALPHA = 0.05
"""Promotion compares the 95% lower bound; a run evaluated at another level is refused."""
CROSSFIT_PARAM = "evaluation.crossfit_folds"
"""A run valued with its own model's scores as the DM/DR reward model (``0``) rates its own
choices highly (optimistic by +72% on the retail benchmark's log, README): promotion needs
the cross-fitted reward model."""


ARTIFACTS_DIRNAME = "mlartifacts"
"""Beside a SQLite tracking store, the folder its new experiments keep their artifacts in."""


def tracking_client(tracking_uri: str, must_exist: bool = False) -> MlflowClient:
    """A client of the tracking store (and model registry) at ``tracking_uri``
    (:func:`nextbest.model_source.mlflow_client`), checked to be usable; ``must_exist``: for
    commands that only read it (a missing SQLite file is an error, not a new empty store).

    Raises
    ------
    ValueError
        Naming the URI and MLflow's reason when it has no store for it (an unknown scheme,
        a file store at an unusable path, a missing SQLite file with ``must_exist`` ...).
    """
    try:
        return mlflow_client(tracking_uri, must_exist=must_exist)
    except mlflow.exceptions.MlflowException as exc:
        reason = str(exc.message).strip().split(" See https://")[0]
        raise ValueError(f"tracking URI {tracking_uri!r} cannot be used: {reason}") from None


def use_experiment(tracking_uri: str, name: str) -> MlflowClient:
    """Track to ``tracking_uri`` under experiment ``name``, creating it when missing; returns
    the client of that store (:func:`tracking_client`), for the run's model registry.

    A new experiment in a local SQLite store (``sqlite:///path/mlflow.db``) keeps its
    artifacts in ``path/mlartifacts``, beside the database, instead of MLflow's default
    ``./mlruns`` under whatever the working directory is: a store and its artifacts then
    move, and are deleted, together. Other stores keep their server's default.
    """
    client = tracking_client(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    found = client.get_experiment_by_name(name)
    if found is not None and found.lifecycle_stage == "deleted":
        raise ValueError(
            f"tracking.experiment {name!r} was deleted in {tracking_uri}: restore it "
            f"(mlflow experiments restore --experiment-id {found.experiment_id}) or choose "
            "another name"
        )
    if found is None:
        location = None
        database = sqlite_store_path(tracking_uri)
        if database is not None:
            location = (database.resolve().parent / ARTIFACTS_DIRNAME).as_uri()
        client.create_experiment(name, artifact_location=location)
    mlflow.set_experiment(name)
    return client


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """Nested config -> ``{"a.b.c": value}`` for ``mlflow.log_params``."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), inner))
        return out
    return {prefix: value}


def register_onnx(
    client: MlflowClient, onnx_path: Path, registered_model: str, spec_path: Path
) -> tuple[str, str]:
    """Log the ONNX model (with its feature spec) in the active run, register it in
    ``client``'s model registry and give it the ``challenger`` alias. Returns (model version,
    model URI).

    Registered through ``client``, not by ``log_model(registered_model_name=...)``: that
    registers in the process-wide registry, which ``MLFLOW_REGISTRY_URI`` can point away
    from the store that ``promote`` and the service read.
    """
    info = mlflow.onnx.log_model(
        onnx.load(str(onnx_path)),
        name="model",
        save_as_external_data=False,  # one self-contained .onnx file for the service
    )
    mlflow.log_artifact(str(spec_path), artifact_path="model_spec")
    try:
        client.create_registered_model(registered_model)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    made = client.create_model_version(
        registered_model, info.model_uri, run_id=info.run_id, model_id=info.model_id
    )
    version = str(made.version)
    # the link from the logged model to its registered version that log_model would record
    client.set_logged_model_tags(
        info.model_id,
        {MLFLOW_MODEL_VERSIONS: json.dumps([{"name": registered_model, "version": version}])},
    )
    client.set_registered_model_alias(registered_model, CHALLENGER, version)
    return version, f"models:/{registered_model}@{CHALLENGER}"


def promote(client: MlflowClient, registered_model: str) -> tuple[bool, str]:
    """Move ``champion`` to the challenger in ``client``'s registry if its OPE lower bound
    beats the champion's value, both estimated on the challenger's held-out decisions (the
    training run evaluates the champion registered at the time, :data:`CHAMPION_METRIC`).

    Fails closed: the challenger must have chosen no blocked action on its held-out data,
    checked against masks of the current rule set (no :data:`RULESET_MISMATCH_TAG`), its
    bound must be the 95% one (``evaluation.alpha`` 0.05), and with no champion yet it must
    beat what runs today (the logging policy's DR value in the same run, else the
    logged mean reward of its held-out decisions, else doing nothing: 0). A champion the
    challenger's run did not evaluate (it became champion later, or its features or acting
    policy could not be read) is not replaced automatically.

    Returns
    -------
    (promoted, reason)
    """
    try:
        challenger = client.get_model_version_by_alias(registered_model, CHALLENGER)
    except mlflow.exceptions.MlflowException:
        return False, f"model {registered_model!r} has no {CHALLENGER!r} version"
    run = None if challenger.run_id is None else client.get_run(challenger.run_id)
    if run is None or run.info.status != "FINISHED":
        status = "no run" if run is None else f"a {run.info.status} run"
        return False, (
            f"challenger v{challenger.version} comes from {status}: only a training run that "
            "finished (its model card, checks and values all logged) is promoted"
        )
    metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
    lower = metrics.get(PROMOTION_METRIC)
    if lower is None:
        return False, f"the challenger's run has no {PROMOTION_METRIC!r} metric"
    violations = metrics.get(COMPLIANCE_METRIC)
    if violations is None or violations != 0:
        return False, (
            f"challenger v{challenger.version}: {COMPLIANCE_METRIC} is {violations} (must be 0)"
        )
    mismatch = tags.get(RULESET_MISMATCH_TAG)
    if mismatch is not None:
        return False, (
            f"challenger v{challenger.version} was checked against its log's candidate masks, "
            f"made by another rule set than its run's ({RULESET_MISMATCH_TAG}: {mismatch}): "
            "its compliance check and values are not under the current rules; train it on a "
            "log made under the current rule set (or move the alias by hand if that is intended)"
        )
    alpha = params.get(ALPHA_PARAM)
    if _as_float(alpha) != PROMOTION_ALPHA:
        return False, (
            f"challenger v{challenger.version} was evaluated with {ALPHA_PARAM}={alpha}: "
            f"promotion compares the {1 - PROMOTION_ALPHA:.0%} lower bound "
            f"({ALPHA_PARAM}={PROMOTION_ALPHA})"
        )
    folds = _as_float(params.get(CROSSFIT_PARAM))
    if folds is None or folds < 2:
        return False, (
            f"challenger v{challenger.version} was evaluated with "
            f"{CROSSFIT_PARAM}={params.get(CROSSFIT_PARAM)}: its DR value rests on its own "
            "reward model, which favours its own choices; promotion needs a reward model "
            "cross-fitted on the held-out customers (at least 2 folds)"
        )
    champion = registered_champion(client, registered_model)
    if champion is None:
        logged = metrics.get(LOGGING_METRIC)
        observed = metrics.get(LOGGED_REWARD_METRIC)
        if logged is not None:
            bar, what = logged, "the logging policy"
        elif observed is not None:  # no logged distribution: its mean reward, on-policy
            bar, what = observed, "the logging policy's mean held-out reward"
        else:
            bar, what = 0.0, "doing nothing (0)"
        if not lower > bar:
            return False, (
                f"challenger v{challenger.version} DR lower bound {lower:.4f} does not beat "
                f"{what} ({bar:.4f}): no champion set"
            )
    else:
        if champion.version == challenger.version:
            return False, f"version {challenger.version} is already the champion"
        evaluated = tags.get(CHAMPION_TAG)
        if evaluated != str(champion.version):
            against = f"v{evaluated}" if evaluated else "no champion"
            return False, (
                f"challenger v{challenger.version}'s run evaluated {against}, the champion is "
                f"v{champion.version}: train it again, so that both are valued on the same "
                "held-out decisions"
            )
        value = metrics.get(CHAMPION_METRIC)
        if value is None:
            why = tags.get(CHAMPION_UNEVALUATED_TAG, f"no {CHAMPION_METRIC!r} metric")
            return False, (
                f"champion v{champion.version} could not be evaluated on the challenger's "
                f"held-out decisions ({why}): the two cannot be compared (move the alias by "
                "hand if that is intended)"
            )
        if not lower > value:
            return False, (
                f"challenger v{challenger.version} DR lower bound {lower:.4f} does not beat "
                f"champion v{champion.version} DR value {value:.4f} (same held-out decisions)"
            )
    client.set_registered_model_alias(registered_model, CHAMPION, challenger.version)
    before = (
        f"no champion, {what} {bar:.4f}"
        if champion is None
        else f"champion v{champion.version}, DR value {value:.4f} on the same decisions"
    )
    return True, f"v{challenger.version} (DR lower bound {lower:.4f}) over {before}"


def _as_float(text: str | None) -> float | None:
    try:
        return None if text is None else float(text)
    except ValueError:
        return None


def registered_champion(client: MlflowClient, registered_model: str) -> ModelVersion | None:
    """The version the ``champion`` alias points at, None if none (or no such model)."""
    try:
        return client.get_model_version_by_alias(registered_model, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None


def run_config(client: MlflowClient, run_id: str, directory: Path) -> dict[str, Any]:
    """The ``config.json`` a training run logged, as a dict (downloaded into ``directory``)."""
    path = client.download_artifacts(run_id, "config.json", str(directory))
    return dict(json.loads(Path(path).read_text()))
