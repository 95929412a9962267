"""Off-policy evaluation of target policies on a decision log: the OPE table."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from nextbest.model_source import ResolvedModel, resolve_model
from nextbest.onnx_scoring import OnnxScorer
from training.logged_data import LoggedBandit
from training.ope import ESTIMATORS, OffPolicyEstimator, bootstrap_interval
from training.ope.inputs import UndefinedEstimateError

WEIGHTED_ESTIMATORS = ("ips", "snips", "dr")
"""Estimators whose value rests on the importance weights (their rows carry the ESS)."""
BASELINE_POLICIES = ("logging", "uniform", "no_contact")
"""Target policies every log can be evaluated against without a model."""


def baseline_action_dist(name: str, log: LoggedBandit) -> np.ndarray:
    """Action distribution of a baseline policy over the log's rounds, float64 (n, A).

    ``logging``: the logged distribution (an on-policy check: IPS must match the mean reward);
    ``uniform``: every allowed action equally; ``no_contact``: always wait (action 0).
    """
    if name == "logging":
        if log.logging_dist is None:
            raise ValueError("the log has no `action_dist`: the logging policy is unknown")
        dist = log.logging_dist.astype(np.float64)
        # logs may round probabilities (the reader accepts sums within 1e-3 of 1)
        return dist / dist.sum(axis=1, keepdims=True)
    if name == "uniform":
        return log.candidates / log.candidates.sum(axis=1, keepdims=True)
    if name == "no_contact":
        dist = np.zeros(log.candidates.shape)
        dist[:, 0] = 1.0
        return dist
    raise ValueError(f"unknown baseline policy {name!r}; known: {list(BASELINE_POLICIES)}")


def effective_sample_size(log: LoggedBandit, action_dist: np.ndarray) -> float:
    """Kish effective sample size ``(sum w)^2 / sum w^2`` of the importance weights
    ``w_i = pi(a_i | x_i) / pscore_i`` of a target policy ``action_dist`` ``(n, A)`` on the log.

    How many logged decisions an importance-weighted estimate (IPS, SNIPS, and DR's
    correction) of the policy effectively rests on: ``n`` for the logging policy itself, a
    handful for a policy that mostly picks what the logger rarely did. Intervals built on a
    few effective decisions are not to be trusted, however narrow. NaN without propensities,
    0 when the policy never agrees with a logged action.
    """
    if log.pscore is None or np.isnan(log.pscore).any():
        return float("nan")
    weights = action_dist[np.arange(log.n_rounds), log.action] / log.pscore
    squares = float(np.square(weights).sum())
    return float(weights.sum()) ** 2 / squares if squares > 0 else 0.0


def ess_text(ess: float) -> str:
    """An OPE row's effective sample size as a table shows it: thousands separated, no
    decimals; empty for estimators without importance weights (NaN)."""
    return "" if np.isnan(ess) else f"{ess:,.0f}"


def ope_table(
    log: LoggedBandit,
    policies: Mapping[str, np.ndarray],
    estimators: Mapping[str, OffPolicyEstimator] | None = None,
    estimated_rewards: np.ndarray | None = None,
    alpha: float = 0.05,
    n_bootstrap_samples: int = 1000,
    seed: int = 0,
) -> list[dict[str, float | str]]:
    """Value of each target policy by each estimator, with bootstrap intervals.

    Parameters
    ----------
    log : LoggedBandit
    policies : mapping of name -> action_dist (n, A)
        Target policies. Probability on an action the rules blocked for that round is
        refused (a policy may only choose allowed actions).
    estimators : mapping of name -> estimator, optional
        Default: IPS and SNIPS, plus DM, DR and Switch-DR when ``estimated_rewards`` is given.
    estimated_rewards : (n, A), optional
        A reward model's predictions for every round and action.

    Returns
    -------
    list of dict
        ``policy, estimator, value, lower, upper, ess`` per pair (``ess``: the policy's
        :func:`effective_sample_size` on the rows of :data:`WEIGHTED_ESTIMATORS`, NaN on
        the others); NaN values with a ``note`` where the estimator is
        undefined for that policy (SNIPS with no overlap at all).
    """
    if estimators is None:
        names = ["ips", "snips"] + (
            ["dm", "dr", "switch-dr"] if estimated_rewards is not None else []
        )
        estimators = {
            name: ESTIMATORS[name](lambda_=100.0) if name == "switch-dr" else ESTIMATORS[name]()
            for name in names
        }
    rows: list[dict[str, float | str]] = []
    for policy_name, dist in policies.items():
        blocked_mass = (dist * ~log.candidates).sum(axis=1)
        if (blocked_mass > 1e-9).any():
            i = int(np.flatnonzero(blocked_mass > 1e-9)[0])
            raise ValueError(
                f"policy {policy_name!r} puts probability {blocked_mass[i]:.3g} on actions the "
                f"rules blocked (round {i})"
            )
        ess = effective_sample_size(log, dist)
        for est_name, est in estimators.items():
            row: dict[str, float | str] = {
                "policy": policy_name,
                "estimator": est_name,
                # what the importance weights rest on: IPS, SNIPS and DR's correction; DM has
                # no weights and Switch-DR drops the large ones
                "ess": ess if est_name in WEIGHTED_ESTIMATORS else float("nan"),
            }
            try:
                rounds = est.estimate_round_rewards(
                    log.reward, log.action, dist, log.pscore, estimated_rewards
                )
            except UndefinedEstimateError as exc:
                nan = float("nan")
                rows.append({**row, "value": nan, "lower": nan, "upper": nan, "note": str(exc)})
                continue
            interval = bootstrap_interval(rounds, alpha, n_bootstrap_samples, seed)
            rows.append(
                {
                    **row,
                    "value": float(rounds.mean()),
                    "lower": interval["lower"],
                    "upper": interval["upper"],
                }
            )
    return rows


def model_scores(
    uri: str, tracking_uri: str | None, log: LoggedBandit, download_dir: Path | None = None
) -> tuple[ResolvedModel, np.ndarray]:
    """A model (an ONNX file or ``models:/...``) resolved and its scores on the log's
    contexts, float64 ``(n, A)``.

    Raises
    ------
    ModelSourceError
        If the model cannot be resolved.
    ModelSpecError
        If it reads another feature spec than the log has.
    """
    resolved = resolve_model(uri, tracking_uri, download_dir)
    scorer = OnnxScorer(resolved.path)
    scorer.require_features(log.feature_spec_version, uri, "the log has")
    return resolved, scorer.scores(log.context).astype(np.float64)
