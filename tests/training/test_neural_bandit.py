"""The neural bandit: learns from a simulated log, acts only on allowed actions, and its ONNX
export scores exactly like the torch model."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from nextbest.catalog import ActionCatalog
from nextbest.features import (
    AlignedColumns,
    ContextEncoder,
    action_features,
    aligned_context_columns,
)
from simulators.policies import PlaybookPolicy
from simulators.rollout import run_policy
from simulators.world import BatchSimulator
from training.config import load_training_config
from training.logged_data import LoggedBandit, load_logged_bandit, split_log
from training.neural_bandit import (
    Economics,
    NeuralBanditConfig,
    RewardModel,
    _fit_loss,
    _training_tensors,
    action_factors,
    greedy_policy,
    guard_complaints,
    predict_complaints,
    predict_rewards,
    softmax_policy,
    train_reward_model,
)
from training.onnx_export import OnnxScorer, export_reward_model


@pytest.fixture(scope="module")
def log(tmp_path_factory, catalog, engine, scenario):
    out = tmp_path_factory.mktemp("nblog")
    sim = BatchSimulator(scenario, catalog, engine, 4000, seed=21)
    run_policy(sim, PlaybookPolicy(catalog, 0.3), 8, np.random.default_rng(22), log_dir=str(out))
    return load_logged_bandit(out, catalog.n_actions)


@pytest.fixture(scope="module")
def trained(log, catalog: ActionCatalog):
    config = NeuralBanditConfig(epochs=4, batch_size=2048, hidden=32, embedding=16, seed=3)
    return train_reward_model(log, action_features(catalog), config)


@pytest.fixture(scope="module")
def trained_factorised(log, catalog: ActionCatalog):
    config = NeuralBanditConfig(
        epochs=2,
        batch_size=2048,
        hidden=32,
        target="outcomes",
        architecture="factorised",
        pair_terms=True,
        depth=2,
        aligned_hidden=8,
        decay_intercepts=False,
        seed=3,
    )
    economics = Economics.from_catalog(catalog, 300.0)
    features = action_features(catalog)
    aligned = aligned_context_columns(ContextEncoder(catalog).spec, features)
    return train_reward_model(log, features, config, None, economics, aligned)


def test_train_reward_model_loss_decreases(trained) -> None:
    _, history = trained
    losses = [e["losses/direct"] for e in history.epochs]
    assert len(losses) == 4
    assert losses[-1] < losses[0]


def test_train_reward_model_same_seed_same_model(log, catalog) -> None:
    config = NeuralBanditConfig(epochs=1, batch_size=4096, hidden=16, embedding=8, seed=5)
    a, _ = train_reward_model(log, action_features(catalog), config)
    b, _ = train_reward_model(log, action_features(catalog), config)
    np.testing.assert_array_equal(
        predict_rewards(a, log.context[:50]), predict_rewards(b, log.context[:50])
    )


def test_greedy_and_softmax_policies_choose_only_allowed(trained, log) -> None:
    model, _ = trained
    scores = predict_rewards(model, log.context)
    for dist in (
        greedy_policy(scores, log.candidates),
        softmax_policy(scores, log.candidates, 0.5),
    ):
        assert (dist[~log.candidates] == 0).all()
        np.testing.assert_allclose(dist.sum(axis=1), 1.0)


def test_train_reward_model_ips_loss_needs_pscore(log, catalog) -> None:
    from dataclasses import replace

    no_pscore = replace(log, pscore=None)
    with pytest.raises(ValueError, match="ips loss needs `pscore`"):
        train_reward_model(no_pscore, action_features(catalog), NeuralBanditConfig(loss="ips"))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", 0),
        ("learning_rate", 0.0),
        ("loss", "dr2"),
        ("ips_clip", 0.5),
        ("aligned_hidden", -1),
    ],
)
def test_neural_bandit_config_bad_value_refused(field: str, value) -> None:
    with pytest.raises(ValueError, match=f"`{field}`"):
        NeuralBanditConfig(**{field: value})


@pytest.mark.parametrize("fitted", ["trained", "trained_factorised"])
def test_export_onnx_scores_match_torch(fitted, request, catalog, tmp_path: Path) -> None:
    model, _ = request.getfixturevalue(fitted)
    spec = ContextEncoder(catalog).spec
    path = export_reward_model(model, tmp_path / "model.onnx", spec)
    scorer = OnnxScorer(path)
    assert scorer.spec["version"] == spec.version
    rng = np.random.default_rng(0)
    context = rng.normal(0, 1, (1000, spec.n_context)).astype(np.float32)
    torch_scores = predict_rewards(model, context)
    onnx_scores = scorer.scores(context)
    np.testing.assert_allclose(
        onnx_scores, torch_scores, rtol=1e-5, atol=1e-5 * np.abs(torch_scores).max()
    )
    allowed = rng.random(torch_scores.shape) < 0.3
    allowed[:, 0] = True
    np.testing.assert_array_equal(
        greedy_policy(onnx_scores, allowed).argmax(axis=1),
        greedy_policy(torch_scores, allowed).argmax(axis=1),
    )


def test_export_leaves_out_the_exporters_notes(
    trained, catalog, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``nextbest train`` and the demo print results, not the exporter's notes on operators
    it skips (one line each without torchvision); its logger's level is given back."""
    model, _ = trained
    before = logging.getLogger("torch.onnx").level
    with caplog.at_level(logging.INFO):
        export_reward_model(model, tmp_path / "model.onnx", ContextEncoder(catalog).spec)
    assert not [r for r in caplog.records if r.name.startswith("torch.onnx")]
    assert logging.getLogger("torch.onnx").level == before


def test_economics_reproduce_the_logged_reward(log, catalog) -> None:
    economics = Economics.from_catalog(catalog, complaint_penalty=300.0)
    assert economics.residual(log) < 1e-3
    assert Economics.from_catalog(catalog, complaint_penalty=0.0).residual(log) > 1e-3 or (
        not log.complaint.any()
    )


def test_train_reward_model_outcomes_target_scores_in_cny(log, catalog) -> None:
    economics = Economics.from_catalog(catalog, 300.0)
    config = NeuralBanditConfig(
        epochs=2, batch_size=2048, hidden=16, embedding=8, target="outcomes", seed=1
    )
    model, history = train_reward_model(log, action_features(catalog), config, None, economics)
    scores = predict_rewards(model, log.context[:200])
    # priced heads: a contact can earn at most its offer's value and lose at least its cost
    upper = economics.value - economics.cost
    lower = -economics.cost - economics.complaint_penalty
    assert (scores <= upper + 1e-3).all() and (scores >= lower - 1e-3).all()
    np.testing.assert_allclose(scores[:, 0], 0.0, atol=1e-6)  # no contact earns nothing
    assert [set(e) & {"losses/direct"} for e in history.epochs] == [{"losses/direct"}] * 2


def test_train_reward_model_outcomes_without_economics_refused(log, catalog) -> None:
    with pytest.raises(ValueError, match="economics"):
        train_reward_model(log, action_features(catalog), NeuralBanditConfig(target="outcomes"))


def test_train_reward_model_phases_warm_start_then_dr(log, catalog) -> None:
    config = NeuralBanditConfig(
        epochs=3,
        batch_size=4096,
        hidden=16,
        embedding=8,
        loss="dr",
        dr_warmup_epochs=1,
        warm_start_epochs=2,
        seed=2,
    )
    _, history = train_reward_model(log, action_features(catalog), config)
    phases = [next(k for k in e if k.startswith("losses/")) for e in history.epochs]
    assert phases == ["losses/clone"] * 2 + ["losses/direct"] + ["losses/dr"] * 2


def test_warm_start_clones_the_playbook(log, catalog) -> None:
    """Behaviour cloning alone makes the greedy policy agree with the logged choices far more
    often than chance among the allowed actions."""
    config = NeuralBanditConfig(
        epochs=1, batch_size=2048, hidden=32, embedding=16, warm_start_epochs=4, seed=4
    )
    half = log.n_rounds // 2
    head = log.take(np.arange(half, log.n_rounds))
    head = head.take(head.candidates.sum(axis=1) > 1)  # a choice to make: no-contact alone is none

    def agreement(warm_start_epochs: int) -> float:
        cfg = NeuralBanditConfig(**{**config.__dict__, "warm_start_epochs": warm_start_epochs})
        model, _ = train_reward_model(log.take(np.arange(half)), action_features(catalog), cfg)
        scores = predict_rewards(model, head.context)
        chosen = greedy_policy(scores, head.candidates).argmax(axis=1)
        return float((chosen == head.action).mean())

    # one direct epoch follows the cloning; the playbook's choices still dominate
    chance = float((1.0 / head.candidates.sum(axis=1)).mean())
    cloned = agreement(4)
    assert cloned > 3 * chance
    assert cloned > agreement(0) + 0.05


def test_guard_complaints_bounds_predicted_complaint_rate(log, catalog) -> None:
    economics = Economics.from_catalog(catalog, 300.0)
    config = NeuralBanditConfig(
        epochs=2, batch_size=2048, hidden=16, embedding=8, target="outcomes", seed=6
    )
    model, _ = train_reward_model(log, action_features(catalog), config, None, economics)
    complaints = predict_complaints(model, log.context)
    logged = float(complaints[np.arange(log.n_rounds), log.action].mean())

    def greedy_rate() -> float:
        chosen = greedy_policy(predict_rewards(model, log.context), log.candidates).argmax(axis=1)
        return float(complaints[np.arange(log.n_rounds), chosen].mean())

    assert guard_complaints(model, log, max_ratio=1e6) == 0.0
    before = greedy_rate()
    assert before > 0.0
    ratio = 0.5 * before / logged  # binds: half the unguarded policy's complaint rate
    price = guard_complaints(model, log, max_ratio=ratio, sample=log.n_rounds)
    assert price > 0.0
    assert float(model.complaint_penalty) == pytest.approx(300.0 + price)
    assert greedy_rate() <= ratio * logged + 1e-9


def test_predict_complaints_needs_outcome_heads(trained) -> None:
    model, _ = trained
    with pytest.raises(ValueError, match="outcome heads"):
        predict_complaints(model, np.zeros((1, model.context_net[0].in_features), np.float32))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"architecture": "transformer"},
            "`architecture` must be one of 'embedding', 'factorised'",
        ),
        ({"pair_terms": True}, "pair_terms needs architecture 'factorised'"),
        ({"depth": 0}, "`depth`"),
    ],
)
def test_neural_bandit_config_bad_architecture_refused(changes, message) -> None:
    with pytest.raises(ValueError, match=message):
        NeuralBanditConfig(**changes)


def test_training_config_unknown_architecture_names_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "learner: neural_bandit\ndata: {logs: x}\nneural_bandit: {architecture: transformer}\n"
    )
    with pytest.raises(Exception, match=r"neural_bandit\.architecture") as caught:
        load_training_config(path)
    assert "factorised" in str(caught.value)


def test_action_factors_of_the_catalogue(catalog: ActionCatalog) -> None:
    features = action_features(catalog)
    singles = action_factors(features)
    contact = catalog.channel_index >= 0
    # no contact, every channel, offer and timing slot; credit and HNW offers unless a flag
    # has the same members as one offer
    lower = 1 + catalog.n_channels + catalog.n_offers + len(catalog.timing)
    assert lower <= singles.shape[0] <= lower + 2
    assert set(np.unique(singles)) <= {0.0, 1.0}
    # every contact action has its channel, offer and timing factor; no contact only its own
    assert (singles[:, contact].sum(axis=0) >= 3).all()
    assert singles[:, ~contact].sum() == 1
    pairs = action_factors(features, pair_terms=True)
    np.testing.assert_array_equal(pairs[: len(singles)], singles)
    members = {row.tobytes() for row in pairs.astype(bool)}
    assert len(members) == len(pairs)  # no factor repeats another's members
    # every channel x offer (and channel x timing, offer x timing) combination is a factor
    for first, second in (
        (catalog.channel_index, catalog.offer_index),
        (catalog.channel_index, catalog.timing_index),
        (catalog.offer_index, catalog.timing_index),
    ):
        for i, j in {
            (int(x), int(y)) for x, y in zip(first[contact], second[contact], strict=True)
        }:
            assert (contact & (first == i) & (second == j)).tobytes() in members


@pytest.mark.parametrize("architecture", ["embedding", "factorised"])
def test_logged_outputs_equal_the_full_score_column(architecture: str, catalog) -> None:
    features = action_features(catalog)
    economics = Economics.from_catalog(catalog, 300.0)
    spec = ContextEncoder(catalog).spec
    model = RewardModel(
        spec.n_context,
        features,
        24,
        8,
        economics,
        architecture=architecture,
        pair_terms=architecture == "factorised",
        depth=2,
        aligned=aligned_context_columns(spec, features),
        aligned_hidden=4,
    )
    assert len(model.aligned_nets) == 3
    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(0)
    context = torch.randn(64, spec.n_context, generator=generator)
    action = torch.randint(0, catalog.n_actions, (64,), generator=generator)
    with torch.no_grad():
        model.action_bias.normal_(generator=generator)
        full = model.head_logits(context)
        logged = model.logged_outputs(context, action)
    torch.testing.assert_close(logged, full[torch.arange(64), :, action], atol=1e-5, rtol=1e-5)


SMALL_FACTORISED = NeuralBanditConfig(
    epochs=4, batch_size=512, hidden=32, target="outcomes", architecture="factorised", seed=0
)
"""The factorised outcome model the synthetic-log tests train (seconds on 30-40k rows)."""


def _additive_logit_log(n: int, seed: int):
    """A log whose conversion logit is a sum of context-dependent channel, offer and timing
    terms (the simulator's funnel in log space); actions chosen uniformly at random."""
    rng = np.random.default_rng(seed)
    n_context, channels, offers, slots = 6, 3, 4, 2
    combos = [(c, o, t) for c in range(channels) for o in range(offers) for t in range(slots)]
    n_actions = 1 + len(combos)
    features = np.zeros((n_actions, 1 + channels + offers + slots + 1), np.float32)
    features[0, 0] = 1.0
    for a, (c, o, t) in enumerate(combos, start=1):
        features[a, [1 + c, 1 + channels + o, 1 + channels + offers + t]] = 1.0
        features[a, -1] = 0.3 * o + 0.1  # a non-indicator attribute
    weights = rng.normal(0, 0.8, (channels + offers + slots, n_context))
    membership = features[:, 1:-1].T  # (terms, A)

    def true_logit(x: np.ndarray) -> np.ndarray:
        logit = -2.0 + np.maximum(x @ weights.T, -1.0) @ membership
        logit[:, 0] = -30.0  # no contact never converts
        return logit

    context = rng.normal(0, 1, (n, n_context)).astype(np.float32)
    action = rng.integers(1, n_actions, n)
    log, economics = _outcome_log(context, action, true_logit, rng)
    return log, features, economics, true_logit


def _outcome_log(
    context: np.ndarray,
    action: np.ndarray,
    true_logit: Callable[[np.ndarray], np.ndarray],
    rng: np.random.Generator,
) -> tuple[LoggedBandit, Economics]:
    """A synthetic log of ``action`` at ``context``: conversions drawn from ``true_logit``,
    1% complaints, every contact worth 100 and costing 1, a complaint 300, no-contact action 0."""
    n, n_actions = len(action), true_logit(context[:1]).shape[1]
    p = 1 / (1 + np.exp(-true_logit(context)[np.arange(n), action]))
    converted = rng.random(n) < p
    complaint = rng.random(n) < 0.01
    value = np.r_[0.0, np.full(n_actions - 1, 100.0)].astype(np.float32)
    cost = np.r_[0.0, np.full(n_actions - 1, 1.0)].astype(np.float32)
    log = LoggedBandit(
        context=context,
        action=action.astype(np.int64),
        reward=(value[action] * converted - cost[action] - 300.0 * complaint).astype(np.float64),
        pscore=np.full(n, 1.0 / (n_actions - 1)),
        candidates=np.ones((n, n_actions), bool),
        logging_dist=None,
        feature_spec_version="synthetic",
        ruleset_version="synthetic",
        catalog_version="synthetic",
        converted=converted,
        complaint=complaint,
    )
    return log, Economics(value, cost, 300.0, np.arange(n_actions) > 0)


def test_factorised_model_fits_an_additive_logit_funnel() -> None:
    """Trained from bandit feedback (one random action per row), the factorised model's
    conversion probabilities of ALL actions on fresh contexts are far closer to the truth
    than the log's base rate, and its greedy choice earns most of the best action's value."""
    log, features, economics, true_logit = _additive_logit_log(30_000, seed=0)
    config = replace(SMALL_FACTORISED, weight_decay=1e-4)
    model, _ = train_reward_model(log, features, config, None, economics)
    fresh = np.random.default_rng(1).normal(0, 1, (2000, log.context.shape[1])).astype(np.float32)
    truth = 1 / (1 + np.exp(-true_logit(fresh)[:, 1:]))
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        logits = model.head_logits(torch.from_numpy(fresh))[:, 0, 1:]
    predicted = torch.sigmoid(logits).numpy()

    def excess_loss(p: np.ndarray) -> float:
        """Soft-label cross-entropy above the truth's own entropy (a KL divergence)."""
        p = np.clip(p, 1e-6, 1 - 1e-6)
        cross = -(truth * np.log(p) + (1 - truth) * np.log(1 - p))
        own = -(truth * np.log(truth) + (1 - truth) * np.log(1 - truth))
        return float((cross - own).mean())

    constant = np.full_like(truth, float(log.converted.mean()))
    assert excess_loss(predicted) < 0.2 * excess_loss(constant)
    value = truth * 100.0
    best, chosen = value.max(axis=1), value[np.arange(len(value)), predicted.argmax(axis=1)]
    random_choice = value.mean(axis=1)
    assert (chosen.mean() - random_choice.mean()) > 0.8 * (best.mean() - random_choice.mean())


def test_init_bias_starts_at_the_logged_base_rates(log, catalog) -> None:
    economics = Economics.from_catalog(catalog, 300.0)
    base = dict(epochs=1, batch_size=4096, hidden=16, target="outcomes", seed=2)
    base |= dict(architecture="factorised", learning_rate=1e-9)
    rates = np.array([log.converted.mean(), log.complaint.mean()])
    assert (rates > 0).all()
    features = action_features(catalog)
    model, _ = train_reward_model(
        log, features, NeuralBanditConfig(**base, init_bias=True), None, economics
    )
    bias = model.action_bias.detach().numpy()
    np.testing.assert_allclose(
        bias, np.log(rates / (1 - rates))[:, None].repeat(bias.shape[1], 1), rtol=1e-4
    )
    # the predicted rates of the logged actions start near the logged ones; without it at 0.5
    logits = model.logged_outputs(
        torch.from_numpy(log.context[:2000]), torch.from_numpy(log.action[:2000])
    )
    predicted = torch.sigmoid(logits).mean(dim=0).detach().numpy()
    np.testing.assert_allclose(predicted, rates, rtol=0.5)
    plain, _ = train_reward_model(log, features, NeuralBanditConfig(**base), None, economics)
    assert np.abs(plain.action_bias.detach().numpy()).max() < 1e-6


def test_untrained_action_bias_stays_at_its_start_while_the_rest_learns(log, catalog) -> None:
    economics = Economics.from_catalog(catalog, 300.0)
    config = NeuralBanditConfig(
        epochs=2,
        batch_size=2048,
        hidden=16,
        target="outcomes",
        architecture="factorised",
        init_bias=True,
        train_action_bias=False,
        weight_decay=1e-3,
        seed=3,
    )
    features = action_features(catalog)
    # the same start (same seed), but no training at all
    start, _ = train_reward_model(
        log, features, replace(config, epochs=1, learning_rate=1e-30), None, economics
    )
    model, _ = train_reward_model(log, features, config, None, economics)

    # not moved by the gradient nor by the weight decay, unlike every other parameter
    np.testing.assert_array_equal(
        model.action_bias.detach().numpy(), start.action_bias.detach().numpy()
    )
    assert not model.action_bias.requires_grad
    moved = [
        name
        for (name, p), (_, q) in zip(
            model.named_parameters(), start.named_parameters(), strict=True
        )
        if name != "action_bias" and not torch.equal(p, q)
    ]
    assert moved == [n for n, _ in model.named_parameters() if n != "action_bias"]


def test_value_weighting_weights_the_conversion_loss_by_offer_value(log, catalog) -> None:
    economics = Economics.from_catalog(catalog, 300.0)
    config = NeuralBanditConfig(target="outcomes", value_weighting=1.0)
    heads = _training_tensors(log, config, economics, 1.0)["heads"].numpy()
    value = economics.value[log.action]
    mean = economics.value[economics.value > 0].mean()
    contact = value > 0
    np.testing.assert_allclose(heads[contact, 0], value[contact] / mean, rtol=1e-5)
    np.testing.assert_allclose(heads[~contact, 0], 1.0)
    np.testing.assert_allclose(heads[:, 1], 1.0)  # complaints unweighted
    half = NeuralBanditConfig(target="outcomes", value_weighting=0.5)
    heads_half = _training_tensors(log, half, economics, 1.0)["heads"].numpy()
    np.testing.assert_allclose(heads_half[contact, 0], np.sqrt(value[contact] / mean), rtol=1e-5)


def test_early_stopping_keeps_the_best_validation_epoch(log, catalog) -> None:
    economics = Economics.from_catalog(catalog, 300.0)
    config = NeuralBanditConfig(
        epochs=8,
        batch_size=512,
        hidden=64,
        learning_rate=0.03,
        target="outcomes",
        architecture="factorised",
        validation_share=0.3,
        patience=1,
        seed=4,
    )
    model, history = train_reward_model(log, action_features(catalog), config, None, economics)
    losses = [e["losses/validation"] for e in history.epochs]
    best = int(np.argmin(losses))
    # stops after `patience` epochs without improvement (or at `epochs`)
    assert len(losses) == min(best + 1 + config.patience, config.epochs)
    fit, held, _ = split_log(log, config.validation_share, config.seed, "validation")
    assert 0.2 < held.n_rounds / log.n_rounds < 0.4
    assert not set(held.customer_key) & set(fit.customer_key)  # held out by customer
    data = _training_tensors(held, config, economics, float(np.std(log.reward)))
    with torch.no_grad():
        again = float(_fit_loss(model, data, torch.arange(held.n_rounds), config, False))
    assert again == pytest.approx(losses[best], rel=1e-4)  # the best epoch's weights


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"init_bias": True}, "need target 'outcomes'"),
        ({"value_weighting": 1.0}, "need target 'outcomes'"),
        ({"value_weighting": -1.0, "target": "outcomes"}, "must not be negative"),
        ({"validation_share": 1.0}, "validation_share"),
        ({"patience": 0}, "patience"),
    ],
)
def test_neural_bandit_config_bad_training_options_refused(changes, message) -> None:
    with pytest.raises(ValueError, match=message):
        NeuralBanditConfig(**changes)


def _aligned_views_log(n: int, seed: int):
    """A log whose conversion logit rises with the context column aligned with the action's
    offer (say, the customer's page views of that offer), the same slope for every offer, at
    each offer's own level; offer 5 is logged in 2% of the rows only."""
    rng = np.random.default_rng(seed)
    generic, channels, offers = 3, 2, 6
    combos = [(c, o) for c in range(channels) for o in range(offers)]
    n_actions = 1 + len(combos)
    features = np.zeros((n_actions, 1 + channels + offers), np.float32)
    features[0, 0] = 1.0
    for a, (c, o) in enumerate(combos, start=1):
        features[a, [1 + c, 1 + channels + o]] = 1.0
    offer_of = np.array([-1] + [o for _, o in combos])
    level = np.array([0.0, 0.5, -0.5, 0.3, -0.2, 1.0])

    def true_logit(x: np.ndarray) -> np.ndarray:
        logit = np.full((len(x), n_actions), -30.0)  # no contact never converts
        for a, (c, o) in enumerate(combos, start=1):
            logit[:, a] = -3.5 + level[o] + 1.2 * x[:, generic + o] + 0.4 * c * x[:, 0]
        return logit

    context = rng.normal(0, 1, (n, generic + offers)).astype(np.float32)
    share = np.r_[np.full(offers - 1, 0.98 / (offers - 1)), 0.02]
    action = 1 + rng.integers(0, channels, n) * offers + rng.choice(offers, n, p=share)
    log, economics = _outcome_log(context, action, true_logit, rng)
    members = (offer_of[None, :] == np.arange(offers)[:, None]).astype(np.float32)
    views = AlignedColumns(
        "offer", ("views",), (generic + np.arange(offers))[:, None].astype(np.int64), members
    )
    return log, features, economics, true_logit, views, offer_of


RARE_OFFER_CONFIG = replace(
    SMALL_FACTORISED, weight_decay=1e-3, init_bias=True, train_action_bias=False
)


@pytest.fixture(scope="module")
def aligned_views():
    """The log, the rare offer's actions (bool ``(A,)``) and 3,000 fresh contexts."""
    log, features, economics, true_logit, views, offer_of = _aligned_views_log(40_000, seed=0)
    fresh = np.random.default_rng(1).normal(0, 1, (3000, log.context.shape[1])).astype(np.float32)
    return log, features, economics, true_logit, views, offer_of == 5, fresh


def _conversion_logits(model: RewardModel, context: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.head_logits(torch.from_numpy(context))[:, 0, :].numpy()


def test_aligned_columns_teach_a_rare_offer_the_slope_learned_on_all_offers(
    aligned_views,
) -> None:
    """The rare offer's ~100 conversions cannot teach the plain factorised model how its own
    column matters; the aligned network learns one slope from every offer's conversions."""
    log, features, economics, true_logit, views, rare, fresh = aligned_views
    config = RARE_OFFER_CONFIG
    truth = true_logit(fresh)[:, rare].ravel()

    def fit(config: NeuralBanditConfig) -> float:
        model, _ = train_reward_model(log, features, config, None, economics, [views])
        return float(np.corrcoef(_conversion_logits(model, fresh)[:, rare].ravel(), truth)[0, 1])

    plain = fit(config)  # aligned_hidden 0: the columns are given but not used
    aligned = fit(replace(config, aligned_hidden=8))
    assert aligned > 0.9
    assert aligned > plain + 0.15


def test_spared_intercepts_keep_a_rare_offer_at_its_own_level(aligned_views) -> None:
    """Under strong weight decay the rare offer's predicted conversion rate is pulled to the
    common rate; with ``decay_intercepts`` off its intercept stays near its own level."""
    log, features, economics, true_logit, _, rare, fresh = aligned_views
    config = replace(RARE_OFFER_CONFIG, weight_decay=3e-2, learning_rate=1e-2)
    true_rate = float((1 / (1 + np.exp(-true_logit(fresh)[:, rare]))).mean())

    def error(config: NeuralBanditConfig) -> float:
        model, _ = train_reward_model(log, features, config, None, economics)
        rate = float((1 / (1 + np.exp(-_conversion_logits(model, fresh)[:, rare]))).mean())
        return abs(np.log(rate / true_rate))

    decayed = error(config)
    spared = error(replace(config, decay_intercepts=False))
    assert decayed > 0.4
    assert spared < 0.5 * decayed


def test_cosine_schedule_lowers_the_learning_rate_every_epoch(log, catalog) -> None:
    config = NeuralBanditConfig(epochs=4, batch_size=4096, hidden=8, learning_rate=0.01, seed=0)
    rates = {}
    for schedule in ("constant", "cosine"):
        _, history = train_reward_model(
            log, action_features(catalog), replace(config, lr_schedule=schedule)
        )
        rates[schedule] = [e["charts/learning_rate"] for e in history.epochs]
    assert rates["constant"] == [0.01] * 4
    cosine = rates["cosine"]
    assert cosine[0] == pytest.approx(0.01)
    assert all(later < earlier for earlier, later in itertools.pairwise(cosine))
    # half way through the steps, half the rate (the cosine's midpoint)
    assert cosine[2] == pytest.approx(0.005, rel=0.05)


def test_aligned_terms_need_matching_columns(aligned_views, catalog) -> None:
    log, features, economics, _, views, _, _ = aligned_views
    with pytest.raises(ValueError, match="aligned_hidden > 0 needs the aligned context columns"):
        train_reward_model(
            log, features, replace(RARE_OFFER_CONFIG, aligned_hidden=4), None, economics
        )
    n_context = log.context.shape[1]
    with pytest.raises(ValueError, match=f"the context has {n_context - 1}"):
        RewardModel(n_context - 1, features, 8, 4, economics, aligned=[views])
    # the catalogue's blocks against another action set
    spec = ContextEncoder(catalog).spec
    blocks = aligned_context_columns(spec, action_features(catalog))
    with pytest.raises(ValueError, match=f"members cover {catalog.n_actions} actions"):
        RewardModel(spec.n_context, features, 8, 4, economics, aligned=blocks)
