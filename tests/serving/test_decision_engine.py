"""The in-process decision: never a blocked action, exact propensities, seeded draws, the
same answer for a batch as for its customers one by one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nextbest.catalog import NO_CONTACT_ID, ActionCatalog
from nextbest.compliance import ALLOWED, RuleEngine
from nextbest.features import ContextEncoder
from nextbest.onnx_scoring import linear_scoring_model, save_scoring_model
from nextbest.synthetic import random_context_batch
from serving.decision_engine import DecisionEngine, ModelNotReadyError
from serving.model_store import ModelStore


def write_model(catalog: ActionCatalog, path: Path, seed: int = 0) -> Path:
    """A random linear scoring model of the catalogue's shapes."""
    spec = ContextEncoder(catalog).spec
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(spec.n_context, catalog.n_actions)).astype(np.float32)
    bias = rng.normal(size=catalog.n_actions).astype(np.float32)
    return save_scoring_model(linear_scoring_model(weights, bias, spec, "test"), path, spec, "test")


@pytest.fixture(scope="module")
def store(tmp_path_factory, catalog: ActionCatalog) -> ModelStore:
    path = write_model(catalog, tmp_path_factory.mktemp("model") / "m.onnx")
    spec = ContextEncoder(catalog).spec
    return ModelStore(str(path), expected_spec_version=spec.version, n_actions=catalog.n_actions)


@pytest.fixture(scope="module")
def batch(catalog: ActionCatalog):
    return random_context_batch(catalog, 3000, np.random.default_rng(11))


def engine_for(catalog, engine: RuleEngine, store, **kwargs) -> DecisionEngine:
    return DecisionEngine(catalog, engine, store, **{"seed": 5, **kwargs})


@pytest.mark.parametrize("exploration", ["epsilon_greedy", "softmax"])
def test_decide_never_returns_a_blocked_action(catalog, engine, store, batch, exploration) -> None:
    decisions = engine_for(catalog, engine, store, exploration=exploration, epsilon=0.5).decide(
        batch, k=5
    )
    rows = np.arange(batch.n)
    blocked_by = engine.blocked_by(batch)
    chosen_ok = (blocked_by[rows, decisions.action] == ALLOWED) | (
        decisions.action == NO_CONTACT_ID
    )
    assert chosen_ok.all()
    ranked = decisions.ranked
    assert (
        (ranked == -1)
        | (blocked_by[rows[:, None], np.maximum(ranked, 0)] == ALLOWED)
        | (ranked == NO_CONTACT_ID)
    ).all()
    blocked_mass = (decisions.action_dist * (blocked_by != ALLOWED)).sum(axis=1)
    blocked_mass -= decisions.action_dist[:, NO_CONTACT_ID] * (
        blocked_by[:, NO_CONTACT_ID] != ALLOWED
    )
    assert np.abs(blocked_mass).max() == 0.0


@pytest.mark.parametrize("exploration", ["epsilon_greedy", "softmax"])
def test_journal_batch_logs_the_distribution_drawn_from(
    catalog, engine, store, batch, exploration
) -> None:
    """The journalled probabilities are the acting distribution's on the allowed actions,
    to the bit: epsilon-greedy never builds the dense ``(n, A)`` distribution for it."""
    from nextbest.decision_batch import DecisionBatch

    d = engine_for(catalog, engine, store, exploration=exploration, epsilon=0.3).decide(batch)
    assert (d.dist is None) == (exploration == "epsilon_greedy")
    fields = {
        "decision_id": [f"d{i}" for i in range(batch.n)],
        "timestamp_us": 0,
        "customer_key": ["k"] * batch.n,
        "context": d.features,
        "policy": exploration,
        "model_version": d.model_version,
        "ruleset_version": "r",
        "catalog_version": "c",
        "feature_spec_version": d.feature_spec_version,
    }
    logged = d.journal_batch(**fields)
    dense = DecisionBatch.from_mask(d.allowed, d.action_dist, d.action, **fields)
    np.testing.assert_array_equal(logged.candidates(), dense.candidates())
    np.testing.assert_array_equal(logged.action_dist, dense.action_dist)
    np.testing.assert_array_equal(logged.pscore, dense.pscore)
    assert logged.action_dist.dtype == np.float32


def test_decide_propensity_is_the_distribution_of_the_chosen(catalog, engine, store, batch) -> None:
    d = engine_for(catalog, engine, store, epsilon=0.2).decide(batch)
    np.testing.assert_allclose(d.action_dist.sum(axis=1), 1.0)
    np.testing.assert_array_equal(d.pscore, d.action_dist[np.arange(batch.n), d.action])
    greedy = np.where(d.allowed, d.scores, -np.inf).argmax(axis=1)
    np.testing.assert_array_equal(d.ranked[:, 0], greedy)
    n_allowed = d.allowed.sum(axis=1)
    np.testing.assert_allclose(
        d.action_dist[np.arange(batch.n), greedy], 0.8 + 0.2 / n_allowed, rtol=1e-12
    )
    assert (d.action_dist[~d.allowed] == 0).all()


def test_decide_draws_follow_the_distribution(catalog, engine, store, batch) -> None:
    """One customer decided 20,000 times: the empirical frequencies match action_dist."""
    one = batch.take(np.repeat(7, 20_000))
    for exploration in ("epsilon_greedy", "softmax"):
        d = engine_for(
            catalog, engine, store, exploration=exploration, epsilon=0.3, temperature=2.0
        ).decide(one)
        freq = np.bincount(d.action, minlength=catalog.n_actions) / len(d.action)
        expected = d.action_dist[0]
        assert np.abs(freq - expected).max() < 0.02
        assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(expected))


def test_decide_softmax_follows_scores(catalog, engine, store, batch) -> None:
    d = engine_for(catalog, engine, store, exploration="softmax", temperature=0.5).decide(batch)
    i = 3
    allowed = np.flatnonzero(d.allowed[i])
    logits = d.scores[i, allowed].astype(np.float64) / 0.5
    expected = np.exp(logits - logits.max())
    np.testing.assert_allclose(d.action_dist[i, allowed], expected / expected.sum(), rtol=1e-6)


def test_decide_same_seed_same_decisions(catalog, engine, store, batch) -> None:
    a = engine_for(catalog, engine, store, epsilon=0.5).decide(batch)
    b = engine_for(catalog, engine, store, epsilon=0.5).decide(batch)
    np.testing.assert_array_equal(a.action, b.action)
    c = engine_for(catalog, engine, store, epsilon=0.5, seed=6).decide(batch)
    assert (a.action != c.action).any()


def test_decide_batch_equals_one_by_one(catalog, engine, store, batch) -> None:
    eng = engine_for(catalog, engine, store, epsilon=0.0)
    full = eng.decide(batch.take(np.arange(40)), k=4, explain=True)
    for i in range(40):
        one = eng.decide(batch.take([i]), k=4, explain=True)
        # one customer is encoded from Python floats (float64, rounded once): within 1e-6
        np.testing.assert_allclose(one.features[0], full.features[i], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(one.blocked_by[0], full.blocked_by[i])
        np.testing.assert_allclose(one.scores[0], full.scores[i], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(one.ranked[0], full.ranked[i])
        assert one.action[0] == full.action[i]
        assert one.blocked[0] == full.blocked[i]


def test_decide_candidates_restrict_and_no_contact_remains(catalog, engine, store, batch) -> None:
    sms = catalog.channel_names.index("sms")
    candidates = catalog.channel_index == sms
    d = engine_for(catalog, engine, store, epsilon=1.0).decide(batch, candidates=candidates)
    chosen_channel = catalog.channel_index[d.action]
    assert ((chosen_channel == sms) | (d.action == NO_CONTACT_ID)).all()
    nothing = np.zeros(catalog.n_actions, bool)
    d = engine_for(catalog, engine, store).decide(batch.take([0, 1]), candidates=nothing)
    np.testing.assert_array_equal(d.action, [NO_CONTACT_ID, NO_CONTACT_ID])
    np.testing.assert_array_equal(d.pscore, [1.0, 1.0])
    assert (d.ranked[:, 1:] == -1).all()
    one = engine_for(catalog, engine, store).decide(batch.take([0]), k=3, candidates=nothing)
    np.testing.assert_array_equal(one.ranked, [[NO_CONTACT_ID, -1, -1]])  # the one-row path


def test_decide_explain_names_the_first_blocking_rule(catalog, engine, store, batch) -> None:
    d = engine_for(catalog, engine, store).decide(batch.take(np.arange(20)), explain=True)
    verdict = engine.evaluate(batch.take(np.arange(20)))
    for i in range(20):
        expected = [
            (int(a), verdict.blocking_rule(i, int(a))) for a in np.flatnonzero(~verdict.allowed[i])
        ]
        assert d.blocked[i] == expected
    assert any(d.blocked)


def test_decide_without_model_raises(catalog, engine, tmp_path: Path) -> None:
    empty = ModelStore(str(tmp_path / "missing.onnx"))
    assert empty.current is None
    with pytest.raises(ModelNotReadyError):
        DecisionEngine(catalog, engine, empty).decide(
            random_context_batch(catalog, 1, np.random.default_rng(0))
        )


def test_engine_bad_exploration_refused(catalog, engine, store) -> None:
    with pytest.raises(ValueError, match="epsilon"):
        DecisionEngine(catalog, engine, store, epsilon=1.5)
    with pytest.raises(ValueError, match="unknown exploration"):
        DecisionEngine(catalog, engine, store, exploration="thompson")
