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
    NeuralBanditConfig,
    greedy_policy,
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
