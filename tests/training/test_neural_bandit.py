"""The neural bandit: learns from a simulated log, acts only on allowed actions, and its ONNX
export scores exactly like the torch model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nextbest.catalog import ActionCatalog
from nextbest.features import ContextEncoder, action_features
from simulators.policies import PlaybookPolicy
from simulators.rollout import run_policy
from simulators.world import BatchSimulator
from training.logged_data import load_logged_bandit
from training.neural_bandit import (
    Economics,
    NeuralBanditConfig,
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
    ("field", "value"), [("epochs", 0), ("learning_rate", 0.0), ("loss", "dr2"), ("ips_clip", 0.5)]
)
def test_neural_bandit_config_bad_value_refused(field: str, value) -> None:
    with pytest.raises(ValueError, match=f"`{field}`"):
        NeuralBanditConfig(**{field: value})


def test_export_onnx_scores_match_torch(trained, catalog, tmp_path: Path) -> None:
    model, _ = trained
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
