"""Off-policy evaluation of target policies on a decision log: the OPE table."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nextbest.model_source import ResolvedModel, resolve_model
from nextbest.onnx_scoring import OnnxScorer
from training.logged_data import LoggedBandit
from training.ope import ESTIMATORS, OffPolicyEstimator, bootstrap_interval
from training.ope.inputs import UndefinedEstimateError

if TYPE_CHECKING:
    from simulators.ground_truth import TruthTable

WEIGHTED_ESTIMATORS = ("ips", "snips", "dr")
"""Estimators whose value rests on the importance weights (their rows carry the ESS)."""
BASELINE_POLICIES = ("logging", "uniform", "no_contact")
"""Target policies every log can be evaluated against without a model."""
SWITCH_DR_LAMBDA = 100.0
"""Importance weight above which Switch-DR drops DR's correction term."""


def make_estimator(name: str) -> OffPolicyEstimator:
    """The estimator of :data:`training.ope.ESTIMATORS` called ``name``, with this table's
    settings (Switch-DR at :data:`SWITCH_DR_LAMBDA`)."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; known: {list(ESTIMATORS)}")
    return ESTIMATORS[name](lambda_=SWITCH_DR_LAMBDA) if name == "switch-dr" else ESTIMATORS[name]()


MISSING_PSCORE = "the log has no propensities (its `pscore` column is empty)"
"""Why an estimator with ``needs_pscore`` was left out."""
MISSING_REWARD_MODEL = "no reward model's scores were given"
"""Why an estimator with ``needs_reward_model`` was left out."""


def choose_estimators(
    names: Sequence[str], log: LoggedBandit, has_reward_model: bool
) -> tuple[dict[str, OffPolicyEstimator], dict[str, str]]:
    """The estimators among ``names`` that this log can feed, and the others with the reason.

    An estimator with ``needs_pscore`` needs the log's propensities (its ``pscore`` column,
    :data:`MISSING_PSCORE`); one with ``needs_reward_model`` needs a reward model's scores
    for every action (:data:`MISSING_REWARD_MODEL`).

    Returns
    -------
    usable : dict of name -> estimator, in the order of ``names``
    left_out : dict of name -> reason

    Raises
    ------
    ValueError
        If a name is unknown.
    """
    usable: dict[str, OffPolicyEstimator] = {}
    left_out: dict[str, str] = {}
    for name in dict.fromkeys(names):
        estimator = make_estimator(name)
        if estimator.needs_pscore and log.pscore is None:
            left_out[name] = MISSING_PSCORE
        elif estimator.needs_reward_model and not has_reward_model:
            left_out[name] = MISSING_REWARD_MODEL
        else:
            usable[name] = estimator
    return usable, left_out


def reasons_left_out(left_out: Mapping[str, str]) -> dict[str, list[str]]:
    """The estimators :func:`choose_estimators` left out, grouped by reason (reason -> names)."""
    grouped: dict[str, list[str]] = {}
    for name, why in left_out.items():
        grouped.setdefault(why, []).append(name)
    return grouped


def no_estimator_message(left_out: Mapping[str, str]) -> str:
    """Why no estimator can value a policy, from what :func:`choose_estimators` left out."""
    reasons = "; ".join(
        f"{', '.join(names)}: {why}" for why, names in reasons_left_out(left_out).items()
    )
    return f"no estimator can value a policy on this log: {reasons}"


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
    with np.errstate(over="ignore"):  # propensities below 1e-308: handled as infinite below
        weights = action_dist[np.arange(log.n_rounds), log.action] / log.pscore
    top = float(weights.max()) if log.n_rounds else 0.0
    if not top > 0:
        return 0.0
    # the ratio is scale-free: scaled to at most 1, tiny propensities (1e-300) cannot overflow
    # the squares; infinite weights (propensities below 1e-308) are the ones that count
    weights = np.isinf(weights).astype(np.float64) if np.isinf(top) else weights / top
    return float(weights.sum() ** 2 / np.square(weights).sum())


def ess_text(ess: float) -> str:
    """An OPE row's effective sample size as a table shows it: thousands separated, no
    decimals; empty for estimators without importance weights (NaN)."""
    return "" if np.isnan(ess) else f"{ess:,.0f}"


def ope_table(
    log: LoggedBandit,
    policies: Mapping[str, np.ndarray | Callable[[], np.ndarray]],
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
    policies : mapping of name -> action_dist (n, A), or a function making it
        Target policies. Probability on an action the rules blocked for that round is
        refused (a policy may only choose allowed actions). A function is called when its
        policy's turn comes, and its array dropped after: one (n, A) float64 array at a
        time (3.7 GB each for 1.3 million decisions over 361 actions).
    estimators : mapping of name -> estimator, optional
        Default: every estimator of :data:`training.ope.ESTIMATORS` the inputs support (see
        :func:`choose_estimators`): IPS and SNIPS when the log has propensities, DM
        when ``estimated_rewards`` is given, DR and Switch-DR when both are.
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
        estimators, left_out = choose_estimators(
            tuple(ESTIMATORS), log, estimated_rewards is not None
        )
        if not estimators:
            raise ValueError(no_estimator_message(left_out))
    rows: list[dict[str, float | str]] = []
    for policy_name, given in policies.items():
        dist = given() if callable(given) else given
        blocked_mass = _blocked_mass(dist, log.candidates)
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
                rounds, normaliser = est.estimate_round_terms(
                    log.reward, log.action, dist, log.pscore, estimated_rewards
                )
            except UndefinedEstimateError as exc:
                nan = float("nan")
                rows.append({**row, "value": nan, "lower": nan, "upper": nan, "note": str(exc)})
                continue
            interval = bootstrap_interval(rounds, alpha, n_bootstrap_samples, seed, normaliser)
            rows.append(
                {
                    **row,
                    "value": float(rounds.mean()),
                    "lower": interval["lower"],
                    "upper": interval["upper"],
                }
            )
        del dist  # before the next policy's array is made
    return rows


def exact_model_dr(
    truth: TruthTable,
    policy: str,
    dist: np.ndarray,
    log: LoggedBandit,
    alpha: float,
    n_bootstrap_samples: int,
    seed: int,
) -> dict[str, float]:
    """The doubly robust estimate of ``policy`` on a simulated log had its reward model been
    exact (:meth:`~simulators.ground_truth.TruthTable.exact_model_dr`), with its bootstrap
    interval: ``dr_exact_value``, ``dr_exact_lower``, ``dr_exact_upper``. Its distance from
    the true value is the importance-weighted correction's noise alone; no reward model makes
    DR closer on this log than about this interval's half-width.

    ``dist``: the policy's action distribution ``(n, A)`` on ``log``'s rounds, which are
    ``truth``'s decision points in order; ``log`` needs propensities.
    """
    if log.pscore is None:
        raise ValueError(MISSING_PSCORE)
    rounds = np.arange(log.n_rounds)
    weight = dist[rounds, log.action] / log.pscore
    samples = truth.exact_model_dr(policy, weight, log.reward)
    interval = bootstrap_interval(samples, alpha, n_bootstrap_samples, seed)
    return {
        "dr_exact_value": float(samples.mean()),
        "dr_exact_lower": interval["lower"],
        "dr_exact_upper": interval["upper"],
    }


def _blocked_mass(dist: np.ndarray, allowed: np.ndarray, rows: int = 65_536) -> np.ndarray:
    """Probability each round of ``dist`` (n, A) puts on actions ``allowed`` (n, A) blocks,
    ``(n,)``, in blocks of ``rows`` (no (n, A) temporary)."""
    out = np.empty(len(dist))
    for start in range(0, len(dist), rows):
        block = slice(start, start + rows)
        out[block] = np.where(allowed[block], 0.0, dist[block]).sum(axis=1)
    return out


def model_scores(
    uri: str, tracking_uri: str | None, log: LoggedBandit, download_dir: Path | None = None
) -> tuple[ResolvedModel, np.ndarray]:
    """A model (an ONNX file or ``models:/...``) resolved and its scores on the log's
    contexts, float64 ``(n, A)``. A registry model is downloaded into ``download_dir``, or
    into a temporary directory removed before returning (the result's ``path`` is then gone).

    Raises
    ------
    ModelSourceError
        If the model cannot be resolved.
    ModelSpecError
        If it reads another feature spec than the log has.
    """
    if download_dir is None:  # a registry model's download is removed once it has scored
        with tempfile.TemporaryDirectory(prefix="nextbest-model-") as scratch:
            return model_scores(uri, tracking_uri, log, Path(scratch))
    resolved = resolve_model(uri, tracking_uri, download_dir)
    scorer = OnnxScorer(resolved.path, content=resolved.content)
    scorer.require_features(log.feature_spec_version, uri, "the log has")
    return resolved, scorer.scores(log.context).astype(np.float64)
