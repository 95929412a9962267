"""``nextbest train``: learn a policy from a decision log, evaluate it off-policy on held-out
decisions, export it to ONNX and track everything in MLflow."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np

from nextbest.catalog import ActionCatalog
from nextbest.compliance import RuleEngine
from nextbest.features import (
    ContextEncoder,
    FeatureSpec,
    action_features,
    aligned_context_columns,
)
from nextbest.model_source import mlflow_client, unwritable_directory
from simulators.ground_truth import TruthTable, read_recipe, replay_truth
from training.config import PolicySpec, TrainingConfig
from training.evaluation import (
    baseline_action_dist,
    ess_text,
    exact_model_dr,
    model_scores,
    ope_table,
)
from training.evidence import (
    NOTABLE_SHARE,
    THIN_EVIDENCE_CONVERSIONS,
    EvidenceRow,
    choice_evidence,
)
from training.logged_data import (
    LoggedBandit,
    customer_unit,
    describe_logs,
    load_logged_bandit,
    log_paths,
    split_log,
)
from training.neural_bandit import (
    Economics,
    NeuralBanditConfig,
    greedy_policy,
    guard_complaints,
    predict_rewards,
    softmax_policy,
    train_reward_model,
)
from training.onnx_export import export_reward_model, spec_path
from training.tracking import (
    CHAMPION_TAG,
    CHAMPION_UNEVALUATED_TAG,
    COMPLIANCE_METRIC,
    LOGGED_REWARD_METRIC,
    MASK_DISAGREEMENTS_METRIC,
    REFERENCE_CHECKED_METRIC,
    RULESET_MISMATCH_TAG,
    flatten,
    register_onnx,
    registered_champion,
    run_config,
    use_experiment,
)
from training.vw_bandit import MODEL_KIND as VW_MODEL_KIND
from training.vw_bandit import check_vw_inputs, train_vw_bandit, vw_arguments

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FittedModel:
    """A trained scoring model: ``scores(context (n, F)) -> (n, A)`` and its ONNX export."""

    kind: str
    scores: Callable[[np.ndarray], np.ndarray]
    export: Callable[[Path, FeatureSpec], Path]
    history: list[dict[str, float]]
    params: dict[str, object]


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced."""

    run_id: str
    model_version: str
    model_uri: str
    onnx_path: Path
    ope: list[dict[str, float | str]]
    violations: int
    truth: list[dict[str, float | str]] | None = None
    """Ground-truth value of each policy on the held-out decisions (simulated logs only)."""
    evidence: list[EvidenceRow] | None = None
    """Per offer the policy chooses: its share of the held-out decisions and the logged
    decisions and conversions behind it (:func:`training.evidence.choice_evidence`)."""


def target_distribution(policy: PolicySpec, scores: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """The acting policy's distribution over actions, float64 ``(n, A)`` (0 where blocked)."""
    if policy.kind == "greedy":
        return greedy_policy(scores, allowed)
    return softmax_policy(scores, allowed, policy.temperature)


def champion_on_holdout(
    config: TrainingConfig, holdout: LoggedBandit, work_dir: Path
) -> tuple[str, np.ndarray | str] | None:
    """The registered champion's acting policy on the held-out decisions, so that the run
    values it on the same decisions as the new model (``nextbest promote`` compares them).

    The champion may have been trained on some of these customers (another split of the
    same log): its value is then optimistic, which errs towards keeping it.

    Returns
    -------
    None if there is no champion; else its version and its distribution over actions,
    float64 ``(n, A)``, or why it could not be evaluated (features of another spec, a graph
    that contradicts its spec, an unreadable model or run).
    """
    uri = config.tracking.uri
    client = mlflow_client(uri)  # the registry resolve_model reads too
    champion = registered_champion(client, config.tracking.registered_model)
    if champion is None:
        return None
    version = str(champion.version)
    model = f"models:/{config.tracking.registered_model}/{version}"
    try:
        acting = PolicySpec.model_validate(
            run_config(client, champion.run_id, work_dir).get("policy", {})
        )
        _, scores = model_scores(model, uri, holdout, work_dir)
        if scores.shape[1] != holdout.candidates.shape[1]:  # a graph against its own spec
            return version, (
                f"it scores {scores.shape[1]} actions, the log's catalogue has "
                f"{holdout.candidates.shape[1]}"
            )
        return version, target_distribution(acting, scores, holdout.candidates)
    except Exception as exc:
        # whatever the champion's files hold (a missing or unreadable model or config, a graph
        # ONNX Runtime refuses), this run goes on: the reason is tagged, and promote refuses
        # to compare without the champion's value
        first_line = (str(exc).splitlines() or [""])[0]
        return version, f"{type(exc).__name__}: {first_line}"


def fit_model(
    config: TrainingConfig,
    train: LoggedBandit,
    catalog: ActionCatalog,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    acting: bool = True,
) -> FittedModel:
    """Train the configured learner on ``train``.

    ``acting=False`` fits a pure reward model (no acting adjustments such as the complaint
    shadow price), for off-policy evaluation."""
    if config.learner == "vw_bandit":
        return _fit_vw_bandit(config, train, catalog, on_epoch)
    economics = Economics.from_catalog(catalog, config.reward.complaint_penalty_cny)
    spec = config.neural_bandit
    nb = NeuralBanditConfig(**spec.model_dump())
    features = action_features(catalog)
    aligned = aligned_context_columns(ContextEncoder(catalog).spec, features)
    model, history = train_reward_model(train, features, nb, on_epoch, economics, aligned)
    params: dict[str, object] = spec.model_dump()
    if acting and config.policy.max_complaint_ratio is not None:
        params["complaint_shadow_price_cny"] = guard_complaints(
            model, train, config.policy.max_complaint_ratio, seed=spec.seed
        )
    return FittedModel(
        kind="neural_bandit",
        scores=lambda context: predict_rewards(model, context),
        export=lambda path, feature_spec: export_reward_model(model, path, feature_spec),
        history=history.epochs,
        params=params,
    )


def _fit_vw_bandit(
    config: TrainingConfig,
    train: LoggedBandit,
    catalog: ActionCatalog,
    on_epoch: Callable[[int, dict[str, float]], None] | None,
) -> FittedModel:
    """The Vowpal Wabbit learner: scores are its weights read out as a linear model (CNY)."""
    spec = config.vw_bandit
    model = train_vw_bandit(train, catalog, spec, on_epoch)
    params: dict[str, object] = spec.model_dump(mode="json")
    params["cost_scale_cny"] = model.cost_scale
    params["vw_arguments"] = " ".join(vw_arguments(spec))
    return FittedModel(
        kind=VW_MODEL_KIND,
        scores=model.scores,
        export=model.export,
        history=model.history,
        params=params,
    )


def crossfit_rewards(
    config: TrainingConfig,
    holdout: LoggedBandit,
    catalog: ActionCatalog,
    scores: np.ndarray,
    fold: np.ndarray | None,
) -> np.ndarray:
    """Reward estimates for DM and DR on the held-out decisions, float64 ``(n, A)``.

    With ``evaluation.crossfit_folds = K >= 2`` the holdout is split into K folds by customer
    (``fold``, from :func:`crossfit_folds`) and each fold is scored by the configured learner
    (with ``evaluation.reward_model``'s overrides) fitted on the other folds, so the
    estimates' errors are independent of the policy's choices (the policy picks the actions
    its own ``scores`` overrate, which biases a DM built on them upwards). With 0 (``fold``
    None), ``scores``.
    """
    if fold is None:
        return scores.astype(np.float64)
    reward_model = config.ope_reward_model()
    out = np.empty(scores.shape, np.float64)
    for k in range(config.evaluation.crossfit_folds):
        rows = fold == k
        fitted = fit_model(reward_model, holdout.take(~rows), catalog, acting=False)
        out[rows] = fitted.scores(holdout.context[rows])
    overridden = "learning_rate" in config.evaluation.reward_model
    require_finite_scores(
        out,
        reward_model,
        "the cross-fitted DM/DR reward model",
        "evaluation.reward_model.learning_rate" if overridden else None,
    )
    return out


def require_finite_scores(
    scores: np.ndarray, config: TrainingConfig, what: str, setting: str | None = None
) -> None:
    """Refuse scores ``(n, A)`` that are not all finite: a model that diverged in training
    (its policy would be arbitrary and its value estimates NaN) must not be registered.
    ``setting``: the config key of the learning rate ``config`` trained with (default: its
    learner's own).

    Raises
    ------
    ValueError
        Naming how many scores are not finite and the settings that most likely caused it.
    """
    bad = ~np.isfinite(scores)
    if not bad.any():
        return
    section = config.learner
    raise ValueError(
        f"{what} gives {int(bad.sum()):,} non-finite scores (NaN or infinite) out of "
        f"{scores.size:,} on the held-out decisions: training diverged. Lower "
        f"{setting or section + '.learning_rate'} (now "
        f"{getattr(config, section).learning_rate:g}) or check the "
        "log for extreme rewards; nothing was registered"
    )


def crossfit_folds(config: TrainingConfig, holdout: LoggedBandit) -> np.ndarray | None:
    """Cross-fitting fold ``(n,)`` of every held-out decision (``evaluation.crossfit_folds``
    of them, by customer; None when that is 0), for :func:`crossfit_rewards`. Computed
    before any training, as it checks that every fold holds decisions.

    Raises
    ------
    ValueError
        If a fold would be empty (the reward model of another fold would then train on
        nothing, or nothing would be scored), with what to change.
    """
    folds = config.evaluation.crossfit_folds
    if folds == 0:
        return None
    fold = _fold_of(holdout, folds, config.evaluation.seed)
    sizes = np.bincount(fold, minlength=folds)
    if (sizes == 0).any():
        customers = (
            f" of {len(np.unique(holdout.customer_key))} customers"
            if holdout.customer_key is not None
            else ""
        )
        raise ValueError(
            f"{describe_logs(config.data.logs)}: the {holdout.n_rounds} held-out "
            f"decisions{customers} are "
            f"too few for evaluation.crossfit_folds = {folds} (fold sizes {sizes.tolist()}): "
            "use a larger log or data.holdout_share, fewer folds, or crossfit_folds: 0 (a run "
            "valued without cross-fitting cannot be promoted)"
        )
    return fold


def _fold_of(log: LoggedBandit, folds: int, seed: int) -> np.ndarray:
    """Fold index ``(n,)`` of every decision: by customer when the log names them."""
    if log.customer_key is None:
        return np.random.default_rng(seed).integers(0, folds, log.n_rounds)
    # salted apart from the holdout split, which put these customers below its share
    unit = customer_unit(log.customer_key, f"crossfit-{seed}")
    return np.minimum((unit * folds).astype(np.int64), folds - 1)


def check_export_dir(directory: Path) -> None:
    """Refuse an ``export.dir`` the ONNX model cannot be written to, before any training.

    Raises
    ------
    ValueError
        Naming ``export.dir``, the path and the reason (:func:`unwritable_directory`).
    """
    problem = unwritable_directory(directory)
    if problem:
        raise ValueError(f"export.dir {directory} {problem}")


def run_training(
    config: TrainingConfig, catalog: ActionCatalog, engine: RuleEngine | None = None
) -> TrainResult:
    """Train, evaluate, export and register; returns the run and model identifiers.

    ``engine`` (the rule set the log was made under) enables the ground-truth replay of
    simulated logs; without it, or for logs without a simulation recipe, the run has OPE only.

    Raises
    ------
    DecisionLogError, ValueError
        Before any training: bad logs, a log made with another catalogue or feature spec,
        too few held-out customers for the cross-fitting folds, an unusable ``export.dir``
        or tracking URI. After training, inside the run (which then ends FAILED and
        registers nothing): a model whose held-out scores are not all finite.
    """
    encoder = ContextEncoder(catalog)
    logs = describe_logs(config.data.logs)
    windowed = config.data.since is not None or config.data.until is not None
    log = load_logged_bandit(
        config.data.logs,
        catalog.n_actions,
        drop_pending=config.data.drop_pending,
        since=config.data.since,
        until=config.data.until,
    )
    if log.catalog_version != catalog.version:
        raise ValueError(
            f"{logs}: made with catalogue {log.catalog_version}, this is {catalog.version}"
        )
    if log.feature_spec_version != encoder.spec.version:
        raise ValueError(
            f"{logs}: features {log.feature_spec_version}, this encoder is {encoder.spec.version}"
        )
    # everything that can refuse the log is checked before a run is opened
    if log.pscore is None:  # whatever the learner: its held-out evaluation needs them
        raise ValueError(
            f"{logs}: the log has no propensities (pscore): the held-out "
            "evaluation's IPS and DR need them; log the behaviour policy's propensities, or "
            "value an existing model on such a log with the direct method: nextbest "
            f"evaluate {' '.join(f'--logs {p}' for p in log_paths(config.data.logs))} "
            "--model <.onnx file or models:/name@alias> "
            "(DM only)"
        )
    if config.learner == "vw_bandit":
        check_vw_inputs(log, catalog, config.vw_bandit)
    recipe = None
    if config.evaluation.ground_truth:
        paths = log_paths(config.data.logs)
        recipes = [read_recipe(path) for path in paths]
        if len(paths) > 1 and any(r is not None for r in recipes):
            raise ValueError(
                f"{logs}: the ground-truth replay reruns one "
                "simulated log, whole: give that log alone, or set evaluation.ground_truth: "
                "false to learn from these logs together without it"
            )
        recipe = recipes[0]
    if recipe is not None and windowed:
        raise ValueError(
            f"{logs}: data.since / data.until keep part of a simulated log, and "
            "the ground-truth replay needs the whole of it: set evaluation.ground_truth: false "
            "to learn from the window without it"
        )
    if recipe is not None and engine is not None:
        recipe.check(catalog, engine)
    train, holdout, holdout_rows = split_log(log, config.data.holdout_share, config.data.split_seed)
    fold = crossfit_folds(config, holdout)
    check_export_dir(config.export.dir)

    client = use_experiment(config.tracking.uri, config.tracking.experiment)
    with mlflow.start_run(run_name=f"{config.learner}") as run:
        mlflow.log_params(flatten("", config.model_dump(mode="json")))
        mlflow.set_tags(
            {
                "data.fingerprint": log.fingerprint(
                    None if recipe is None else recipe.model_dump_json()
                ),
                "data.rounds": str(log.n_rounds),
                "data.simulated": str(recipe is not None).lower(),
                "catalog.version": catalog.version,
                "ruleset.version": log.ruleset_version,
                "features.version": encoder.spec.version,
            }
        )
        mlflow.log_dict(config.model_dump(mode="json"), "config.json")
        economics = Economics.from_catalog(catalog, config.reward.complaint_penalty_cny)
        residual = economics.residual(log)
        if np.isfinite(residual):
            mlflow.log_metric("data/reward_economics_residual", residual)

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            mlflow.log_metrics(metrics, step=epoch)

        fitted = fit_model(config, train, catalog, on_epoch)

        scores = fitted.scores(holdout.context)
        require_finite_scores(scores, config, "the trained model")
        target = target_distribution(config.policy, scores, holdout.candidates)
        chosen = target.argmax(axis=1)
        violations = int((~holdout.candidates[np.arange(holdout.n_rounds), chosen]).sum())
        violations += int((target * ~holdout.candidates).sum() > 1e-9)
        if engine is not None and log.ruleset_version != engine.version:
            # the log's masks are another rule set's: checked against them only
            mlflow.set_tag(RULESET_MISMATCH_TAG, f"{log.ruleset_version} != {engine.version}")
            _logger.warning(
                "the log's candidate masks were made by rule set %s, not the current %s: the "
                "compliance check on them is not a check against the current rules",
                log.ruleset_version,
                engine.version,
            )
        evidence = choice_evidence(train, target, catalog)
        mlflow.log_dict(evidence.rows, "choice_evidence.json")
        if np.isfinite(evidence.thin_share):
            mlflow.log_metric("evidence/thin_share", evidence.thin_share)

        policies = {"model": target}
        if holdout.logging_dist is not None:
            policies["logging"] = baseline_action_dist("logging", holdout)
        policies["uniform"] = baseline_action_dist("uniform", holdout)
        policies["no_contact"] = baseline_action_dist("no_contact", holdout)
        with tempfile.TemporaryDirectory(prefix="nextbest-champion-") as work_dir:
            champion = champion_on_holdout(config, holdout, Path(work_dir))
        if champion is not None:
            version, evaluated = champion
            mlflow.set_tag(CHAMPION_TAG, version)
            if isinstance(evaluated, str):
                mlflow.set_tag(CHAMPION_UNEVALUATED_TAG, evaluated)
            else:
                policies["champion"] = evaluated
        rows = ope_table(
            holdout,
            policies,
            estimated_rewards=crossfit_rewards(config, holdout, catalog, scores, fold),
            alpha=config.evaluation.alpha,
            n_bootstrap_samples=config.evaluation.bootstrap,
            seed=config.evaluation.seed,
        )
        ess = {r["policy"]: float(r["ess"]) for r in rows if np.isfinite(float(r["ess"]))}
        mlflow.log_metrics({f"ope/{policy}/ess": value for policy, value in ess.items()})
        for row in rows:
            if "note" in row:
                continue  # undefined estimate: nothing to log as a metric
            key = f"ope/{row['policy']}/{row['estimator']}"
            mlflow.log_metrics(
                {
                    f"{key}/value": row["value"],
                    f"{key}/lower": row["lower"],
                    f"{key}/upper": row["upper"],
                }
            )
        mlflow.log_dict(rows, "ope_table.json")
        mlflow.log_metric(LOGGED_REWARD_METRIC, float(holdout.reward.mean()))

        truth: TruthTable | None = None
        truth_rows: list[dict[str, float | str]] | None = None
        if recipe is not None and engine is not None:
            evaluated = {"champion": policies["champion"]} if "champion" in policies else {}
            truth = _ground_truth(
                config, recipe, catalog, engine, log, holdout_rows, fitted, evaluated
            )
            truth_rows = truth.summary()
            if holdout.pscore is not None:  # how close DR could come with an exact model
                model_row = next(r for r in truth_rows if r["policy"] == "model")
                model_row |= exact_model_dr(
                    truth,
                    "model",
                    target,
                    holdout,
                    config.evaluation.alpha,
                    config.evaluation.bootstrap,
                    config.evaluation.seed,
                )
            for row in truth_rows:
                name = row["policy"]
                mlflow.log_metrics(
                    {
                        f"truth/{name}/{k}": float(v)
                        for k, v in row.items()
                        if k != "policy" and np.isfinite(float(v))
                    }
                )
            mlflow.log_dict(truth_rows, "ground_truth.json")
            mlflow.log_dict(truth.by_segment(), "ground_truth_by_segment.json")
            # the current rules on the replayed customers by their reference semantics, at a
            # sample of decisions: the policy's action, and the engine's whole mask (the
            # policy acted under that mask, so only the reference can find it wrong)
            violations += int(truth.reference_blocked[truth.policies.index("model")])
            violations += truth.mask_disagreements
            mlflow.log_metric(REFERENCE_CHECKED_METRIC, truth.reference_checked)
            mlflow.log_metric(MASK_DISAGREEMENTS_METRIC, truth.mask_disagreements)
        mlflow.log_metric(COMPLIANCE_METRIC, violations)
        _log_plots(
            rows, truth, fitted.history, holdout, chosen, catalog, encoder, config.evaluation.alpha
        )

        onnx_path = fitted.export(Path(config.export.dir) / f"{run.info.run_id}.onnx", encoder.spec)
        version, uri = register_onnx(
            client, onnx_path, config.tracking.registered_model, spec_path(onnx_path)
        )
        mlflow.log_text(
            _model_card(
                config,
                fitted,
                log,
                holdout,
                rows,
                truth_rows,
                violations,
                version,
                catalog,
                encoder,
                evidence.rows,
            ),
            "model_card.md",
        )
    return TrainResult(
        run.info.run_id,
        version,
        uri,
        onnx_path,
        rows,
        violations,
        truth_rows,
        evidence.rows,
    )


def _ground_truth(
    config: TrainingConfig,
    recipe,
    catalog: ActionCatalog,
    engine: RuleEngine,
    log: LoggedBandit,
    holdout_rows: np.ndarray,
    fitted: FittedModel,
    evaluated: Mapping[str, np.ndarray],
) -> TruthTable:
    """Exact value of the model, the baselines and the ``evaluated`` policies (the champion:
    distributions over actions on the held-out decisions, float ``(n_holdout, A)``, in log
    order) on the held-out decisions (replay)."""
    n_actions = catalog.n_actions
    logging_dist = log.logging_dist
    holdout_position = np.cumsum(holdout_rows) - 1  # a held-out log row's row in ``evaluated``

    def model(rows: np.ndarray, context: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        return target_distribution(config.policy, fitted.scores(context), allowed)

    def uniform(rows: np.ndarray, context: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        return allowed / allowed.sum(axis=1, keepdims=True)

    def no_contact(rows: np.ndarray, context: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        out = np.zeros((len(rows), n_actions))
        out[:, 0] = 1.0
        return out

    policies = {"model": model}
    if logging_dist is not None:
        policies["logging"] = lambda rows, context, allowed: logging_dist[rows]
    policies["uniform"] = uniform
    policies["no_contact"] = no_contact
    for name, dist in evaluated.items():
        policies[name] = lambda rows, context, allowed, d=dist: d[holdout_position[rows]]
    return replay_truth(
        recipe, catalog, engine, holdout_rows, policies, log.context, logged_action=log.action
    )


def _log_plots(rows, truth, epochs, holdout, chosen, catalog, encoder, alpha) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: plots go to files
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    dr = [r for r in rows if r["estimator"] == "dr" and "note" not in r] or [
        r for r in rows if r["estimator"] == "ips" and "note" not in r
    ]
    names = [str(r["policy"]) for r in dr]
    values = np.array([float(r["value"]) for r in dr])
    err = np.array(
        [
            [v - float(r["lower"]) for v, r in zip(values, dr, strict=True)],
            [float(r["upper"]) - v for v, r in zip(values, dr, strict=True)],
        ]
    ).clip(min=0)  # a bootstrap interval need not contain the estimate itself
    x = np.arange(len(names))
    ax.bar(
        x,
        values,
        yerr=err,
        capsize=6,
        color="#2a6f97",
        alpha=0.8,
        label=f"{dr[0]['estimator'] if dr else ''} estimate, {1 - alpha:.0%} interval",
    )
    if truth is not None:
        true = {str(r["policy"]): float(r["value"]) for r in truth.summary()}
        ax.scatter(
            x,
            [true.get(n, np.nan) for n in names],
            color="#d62828",
            zorder=3,
            label="ground truth (simulator)",
        )
        ax.axhline(true["myopic_oracle"], color="#555555", ls="--", label="myopic oracle")
    ax.set_xticks(x, names)
    ax.set_ylabel("value per decision (CNY)")
    ax.set_title("Policy value on held-out decisions: model vs playbook (logging) and oracle")
    ax.legend(fontsize=7)
    mlflow.log_figure(fig, "plots/value_with_intervals.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in sorted({k for e in epochs for k in e if k.startswith("losses/")}):
        steps = [i for i, e in enumerate(epochs) if key in e]
        ax.plot(steps, [epochs[i][key] for i in steps], marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_title("Learning curves")
    ax.legend(fontsize=7)
    mlflow.log_figure(fig, "plots/learning_curve.png")
    plt.close(fig)

    names = encoder.spec.context_names
    tiers = [n for n in names if n.startswith("value_tier=")]
    tier = holdout.context[:, [names.index(t) for t in tiers]].argmax(axis=1)
    channel = catalog.channel_index[chosen]
    labels = ["wait", *catalog.channel_names]
    mix = np.zeros((len(tiers), len(labels)))
    for t in range(len(tiers)):
        sel = tier == t
        if sel.any():
            counts = np.bincount(channel[sel] + 1, minlength=len(labels))
            mix[t] = counts / counts.sum()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    bottom = np.zeros(len(tiers))
    for j, label in enumerate(labels):
        ax.bar([t.split("=")[1] for t in tiers], mix[:, j], bottom=bottom, label=label)
        bottom += mix[:, j]
    ax.set_ylabel("share of decisions")
    ax.set_title("Action mix of the learned policy by value tier (channel)")
    ax.legend(fontsize=7, ncol=4)
    mlflow.log_figure(fig, "plots/action_mix_by_segment.png")
    plt.close(fig)


def _model_card(
    config, fitted, log, holdout, rows, truth, violations, version, catalog, encoder, evidence
) -> str:
    table = "\n".join(
        f"| {r['policy']} | {r['estimator']} | {r['value']:.4f} | {r['lower']:.4f} "
        f"| {r['upper']:.4f} | {ess_text(float(r['ess']))} |"
        for r in rows
        if "note" not in r
    )
    folds = config.evaluation.crossfit_folds
    overrides = config.evaluation.reward_model
    reward_model = (
        f"DM and DR use a reward model cross-fitted on the held-out decisions ({folds} folds "
        "by customer), not the policy's own scores"
        + (
            f", trained with `{json.dumps(overrides)}` over the policy's settings."
            if overrides
            else "."
        )
        if folds
        else "DM and DR use the policy's own scores (optimistic about the actions it picks)."
    )
    if truth is None:
        truth_section = "Not available: the log has no simulation recipe (real traffic)."
    else:
        truth_section = (
            "Exact expected reward per decision from a replay of the simulator, on the same "
            "held-out decisions:\n\n| policy | value | regret to oracle | complaint rate |\n"
            "|---|---|---|---|\n"
            + "\n".join(
                f"| {r['policy']} | {r['value']:.4f} | {r['regret']:.4f} "
                f"| {r.get('complaint_rate', float('nan')):.5f} |"
                for r in truth
            )
        )
        model = next(r for r in truth if r["policy"] == "model")
        if "dr_exact_value" in model:
            truth_section += (
                "\n\nDR with an *exact* reward model (the simulator's expected rewards) would "
                f"estimate the model at {model['dr_exact_value']:.4f} "
                f"[{model['dr_exact_lower']:.4f}, {model['dr_exact_upper']:.4f}] against its "
                f"true {model['value']:.4f}: the importance-weighted correction's noise on this "
                "log, which no reward model removes."
            )
    evidence_table = "\n".join(
        f"| {r['offer']} | {float(r['policy_share']):.1%} | {r['logged']:,} "
        f"| {'unknown' if r['conversions'] is None else format(r['conversions'], ',')} "
        f"| {'**thin**' if r['thin'] else ''} |"
        for r in evidence
    )
    return f"""# Model card: {config.tracking.registered_model} v{version}

## What it is
A {fitted.kind} model (exported to ONNX) scoring every one of the {catalog.n_actions}
catalogue actions for a customer context; the policy acts **{config.policy.kind}** over the
actions the compliance rules allow. The rules are applied by the rule engine, not by the model.

## Data
- Log: `{describe_logs(config.data.logs)}` ({log.n_rounds:,} decisions;
  {holdout.n_rounds:,} held out for evaluation, split by customer when the log names customers).
- Catalogue `{catalog.version}`, rule set `{log.ruleset_version}`,
  features `{encoder.spec.version}`.

## Training
`{json.dumps(fitted.params)}`

## Off-policy evaluation on held-out decisions
{100 * (1 - config.evaluation.alpha):g}% bootstrap intervals. {reward_model} ESS: the
effective number of held-out decisions the policy's importance weights rest on (IPS, SNIPS
and DR's correction); an interval resting on a few dozen is not to be trusted, however narrow.

| policy | estimator | value | lower | upper | ESS |
|---|---|---|---|---|---|
{table}

## Evidence behind the policy's choices
Each offer the policy chooses on the held-out decisions, and the training decisions whose
logged action had that offer, with their conversions. **thin**: chosen for at least
{NOTABLE_SHARE:.0%} of decisions on fewer than {THIN_EVIDENCE_CONVERSIONS} logged
conversions; the policy's value there rests on little more than its prior, and exploring
those offers is how to learn more.

| offer | chosen for | logged | conversions | |
|---|---|---|---|---|
{evidence_table}

## Ground truth
{truth_section}

## Compliance
Chosen actions that a rule blocks on the held-out decisions: **{violations}** (must be 0).

## Limits
Values are per decision, immediate reward (CNY), on the logged population; they say nothing
of long-horizon effects (fatigue, churn) beyond what the logged rewards contain.
"""
