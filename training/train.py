"""``nextbest train``: learn a policy from a decision log, evaluate it off-policy on held-out
decisions, export it to ONNX and track everything in MLflow."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import numpy as np

from nextbest.catalog import ActionCatalog
from nextbest.features import ContextEncoder, action_features
from training.config import TrainingConfig
from training.evaluation import baseline_action_dist, ope_table
from training.logged_data import LoggedBandit, load_logged_bandit
from training.neural_bandit import (
    NeuralBanditConfig,
    greedy_policy,
    predict_rewards,
    softmax_policy,
    train_reward_model,
)
from training.onnx_export import export_reward_model, spec_path
from training.tracking import data_fingerprint, flatten, register_onnx


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced."""

    run_id: str
    model_version: str
    model_uri: str
    onnx_path: Path
    ope: list[dict[str, float | str]]
    violations: int


def split_log(
    log: LoggedBandit, holdout_share: float, seed: int
) -> tuple[LoggedBandit, LoggedBandit]:
    """Random split of the decisions into (train, holdout)."""
    rng = np.random.default_rng(seed)
    holdout = rng.random(log.n_rounds) < holdout_share
    if holdout.all() or not holdout.any():
        raise ValueError("the log is too small to hold out decisions for evaluation")

    def part(mask: np.ndarray) -> LoggedBandit:
        return replace(
            log,
            context=log.context[mask],
            action=log.action[mask],
            reward=log.reward[mask],
            pscore=None if log.pscore is None else log.pscore[mask],
            candidates=log.candidates[mask],
            logging_dist=None if log.logging_dist is None else log.logging_dist[mask],
        )

    return part(~holdout), part(holdout)


def run_training(config: TrainingConfig, catalog: ActionCatalog) -> TrainResult:
    """Train, evaluate, export and register; returns the run and model identifiers.

    Raises
    ------
    DecisionLogError, ValueError
        Bad logs or a log made with another catalogue or feature spec, before training.
    """
    encoder = ContextEncoder(catalog)
    log = load_logged_bandit(config.data.logs, catalog.n_actions)
    if log.catalog_version != catalog.version:
        raise ValueError(
            f"{config.data.logs}: made with catalogue {log.catalog_version}, this is "
            f"{catalog.version}"
        )
    if log.feature_spec_version != encoder.spec.version:
        raise ValueError(
            f"{config.data.logs}: features {log.feature_spec_version}, this encoder is "
            f"{encoder.spec.version}"
        )
    train, holdout = split_log(log, config.data.holdout_share, config.data.split_seed)
    nb = NeuralBanditConfig(**config.neural_bandit.model_dump())

    mlflow.set_tracking_uri(config.tracking.uri)
    mlflow.set_experiment(config.tracking.experiment)
    with mlflow.start_run(run_name=f"{config.learner}-{config.neural_bandit.loss}") as run:
        mlflow.log_params(flatten("", config.model_dump(mode="json")))
        mlflow.set_tags(
            {
                "data.fingerprint": data_fingerprint(config.data.logs),
                "data.rounds": str(log.n_rounds),
                "catalog.version": catalog.version,
                "ruleset.version": log.ruleset_version,
                "features.version": encoder.spec.version,
            }
        )
        mlflow.log_dict(config.model_dump(mode="json"), "config.json")

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            mlflow.log_metrics(metrics, step=epoch)

        model, history = train_reward_model(train, action_features(catalog), nb, on_epoch)

        scores = predict_rewards(model, holdout.context)
        if config.policy.kind == "greedy":
            target = greedy_policy(scores, holdout.candidates)
        else:
            target = softmax_policy(scores, holdout.candidates, config.policy.temperature)
        chosen = target.argmax(axis=1)
        violations = int((~holdout.candidates[np.arange(holdout.n_rounds), chosen]).sum())
        violations += int((target * ~holdout.candidates).sum() > 1e-9)
        mlflow.log_metric("compliance/blocked_actions_chosen", violations)

        policies = {"model": target}
        if holdout.logging_dist is not None:
            policies["logging"] = baseline_action_dist("logging", holdout)
        policies["uniform"] = baseline_action_dist("uniform", holdout)
        rows = ope_table(
            holdout,
            policies,
            estimated_rewards=scores.astype(np.float64),
            alpha=config.evaluation.alpha,
            n_bootstrap_samples=config.evaluation.bootstrap,
            seed=config.evaluation.seed,
        )
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
        mlflow.log_metric("eval/holdout_mean_reward", float(holdout.reward.mean()))
        _log_plots(rows, history.epochs, holdout, chosen, catalog, encoder)

        onnx_path = export_reward_model(
            model, Path(config.export.dir) / f"{run.info.run_id}.onnx", encoder.spec
        )
        version, uri = register_onnx(
            onnx_path, config.tracking.registered_model, spec_path(onnx_path)
        )
        mlflow.log_text(
            _model_card(config, log, holdout, rows, violations, version, catalog, encoder),
            "model_card.md",
        )
    return TrainResult(run.info.run_id, version, uri, onnx_path, rows, violations)


def _log_plots(rows, epochs, holdout, chosen, catalog, encoder) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: plots go to files
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    dr = [r for r in rows if r["estimator"] == "dr"] or [r for r in rows if r["estimator"] == "ips"]
    names = [str(r["policy"]) for r in dr]
    values = np.array([float(r["value"]) for r in dr])
    err = np.array(
        [
            [v - float(r["lower"]) for v, r in zip(values, dr, strict=True)],
            [float(r["upper"]) - v for v, r in zip(values, dr, strict=True)],
        ]
    )
    ax.bar(names, values, yerr=err, capsize=6, color=["#2a6f97", "#999999", "#cccccc"][: len(dr)])
    ax.set_ylabel("value per decision (CNY)")
    ax.set_title(f"Off-policy value ({dr[0]['estimator'] if dr else ''}, held-out decisions)")
    mlflow.log_figure(fig, "plots/value_with_intervals.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([e["losses/train_mse_scaled"] for e in epochs], marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("weighted MSE (scaled)")
    ax.set_title("Learning curve")
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


def _model_card(config, log, holdout, rows, violations, version, catalog, encoder) -> str:
    table = "\n".join(
        f"| {r['policy']} | {r['estimator']} | {r['value']:.4f} | {r['lower']:.4f} "
        f"| {r['upper']:.4f} |"
        for r in rows
    )
    return f"""# Model card: {config.tracking.registered_model} v{version}

## What it is
A {config.learner} reward model (PyTorch, exported to ONNX) scoring every one of the
{catalog.n_actions} catalogue actions for a customer context; the policy acts
**{config.policy.kind}** over the actions the compliance rules allow. The rules are applied
by the rule engine, not by the model.

## Data
- Log: `{config.data.logs}` ({log.n_rounds:,} decisions; {holdout.n_rounds:,} held out for
  evaluation).
- Catalogue `{catalog.version}`, rule set `{log.ruleset_version}`,
  features `{encoder.spec.version}`.

## Training
`{json.dumps(config.neural_bandit.model_dump())}`

## Off-policy evaluation on held-out decisions
{100 * (1 - config.evaluation.alpha):g}% bootstrap intervals.

| policy | estimator | value | lower | upper |
|---|---|---|---|---|
{table}

## Compliance
Chosen actions that a rule blocks on the held-out decisions: **{violations}** (must be 0).

## Limits
Values are per decision, immediate reward (CNY), on the logged population; they say nothing
of long-horizon effects (fatigue, churn) beyond what the logged rewards contain.
"""
