"""The Vowpal Wabbit learner: its data file reads back through VW's parser, it learns a planted
signal, its ONNX export scores exactly like VW's own predictions, bad configs and logs are
refused with the field named, and ``nextbest train`` runs it end to end."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pytest
import vowpalwabbit
from mlflow import MlflowClient
from typer.testing import CliRunner

from nextbest.catalog import ActionCatalog
from nextbest.cli import app
from nextbest.config_loading import ConfigError
from nextbest.features import ContextEncoder
from nextbest.onnx_scoring import OnnxScorer
from training.config import VwBanditSpec, load_training_config
from training.logged_data import LoggedBandit
from training.vw_bandit import (
    VwBandit,
    check_vw_inputs,
    train_vw_bandit,
    vw_arguments,
    write_vw_data,
)

SEGMENTS = 5
BEST_OFFER = np.array([0, 3, 6, 9, 12])
"""The planted signal: segment ``s`` converts only on offer ``BEST_OFFER[s]``."""


def true_reward(catalog: ActionCatalog, segment: np.ndarray) -> np.ndarray:
    """Expected reward of every action for each decision's segment, ``(n, A)``."""
    offer = catalog.offer_index[None, :]
    return (offer == BEST_OFFER[segment][:, None]).astype(np.float64)


def planted_log(catalog: ActionCatalog, n: int, seed: int) -> tuple[LoggedBandit, np.ndarray]:
    """A uniformly logged synthetic log with the real shapes: ``(log, segment (n,))``."""
    rng = np.random.default_rng(seed)
    n_features = ContextEncoder(catalog).n_features
    segment = rng.integers(0, SEGMENTS, n)
    context = (0.3 * rng.normal(size=(n, n_features))).astype(np.float32)
    context[:, :SEGMENTS] = np.eye(SEGMENTS, dtype=np.float32)[segment]
    candidates = rng.random((n, catalog.n_actions)) < 0.3
    candidates[:, 0] = True
    counts = candidates.sum(axis=1)
    pick = (rng.random(n) * counts).astype(np.int64)
    action = np.array([np.flatnonzero(row)[k] for row, k in zip(candidates, pick, strict=True)])
    reward = true_reward(catalog, segment)[np.arange(n), action] + rng.normal(0, 0.1, n)
    log = LoggedBandit(
        context=context,
        action=action,
        reward=reward,
        pscore=1.0 / counts,
        candidates=candidates,
        logging_dist=None,
        feature_spec_version="test",
        ruleset_version="test",
        catalog_version=catalog.version,
    )
    return log, segment


@pytest.fixture(scope="module")
def planted(catalog):
    return planted_log(catalog, 2500, seed=7)


@pytest.fixture(scope="module")
def model(planted, catalog) -> VwBandit:
    log, _ = planted
    return train_vw_bandit(log, catalog, VwBanditSpec(seed=1))


def random_contexts(n: int, n_features: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, n_features)).astype(np.float32)


def test_train_vw_bandit_beats_uniform_on_planted_signal(model, catalog) -> None:
    fresh, segment = planted_log(catalog, 2000, seed=8)
    truth = true_reward(catalog, segment)
    scores = np.where(fresh.candidates, model.scores(fresh.context), -np.inf)
    learned = truth[np.arange(fresh.n_rounds), scores.argmax(axis=1)].mean()
    oracle = np.where(fresh.candidates, truth, 0).max(axis=1).mean()
    uniform = (truth * fresh.candidates).sum(axis=1) / fresh.candidates.sum(axis=1)
    assert oracle > 0.99
    assert learned > 0.6  # one pass over 2,500 uniformly logged decisions, 20 offers
    assert learned > 10 * uniform.mean()


def test_train_vw_bandit_same_seed_same_weights(planted, catalog) -> None:
    log, _ = planted
    small = log.take(np.arange(400))
    spec = VwBanditSpec(exploration="bag", bag=2, seed=3)
    a = train_vw_bandit(small, catalog, spec)
    b = train_vw_bandit(small, catalog, spec)
    np.testing.assert_array_equal(a.weights, b.weights)
    np.testing.assert_array_equal(a.bias, b.bias)


def test_write_vw_data_reads_back_through_vw_parser(planted, catalog, tmp_path: Path) -> None:
    log, _ = planted
    rows = log.take(np.arange(6))
    context = rows.context.copy()
    context[1] = 0.0  # a decision with no context feature at all
    context[2, 7] = 1.0  # written without a value
    context[3, 4] = 1.2e-16  # float noise (sin(pi)): left out
    path = tmp_path / "decisions.vw"
    cost = -rows.reward / 2.0
    write_vw_data(path, context, rows.candidates, catalog, rows.action, cost, rows.pscore)
    blocks = [b.split("\n") for b in path.read_text().split("\n\n") if b]
    assert len(blocks) == rows.n_rounds

    ws = vowpalwabbit.Workspace(arg_list=[*vw_arguments(VwBanditSpec()), "--quiet"])
    x_space, a_space = ws.hash_space("x"), ws.hash_space("a")
    column = {ws.hash_feature(str(j), x_space): j for j in range(context.shape[1])}
    action_of = {ws.hash_feature(str(a), a_space): a for a in range(catalog.n_actions)}
    for i, block in enumerate(blocks):
        examples = ws.parse(block)
        parsed = np.zeros(context.shape[1], np.float32)
        for k in range(examples[0].num_features_in("x")):
            parsed[column[examples[0].feature("x", k)]] = examples[0].feature_weight("x", k)
        expected = np.where(np.abs(context[i]) < 1e-6, 0.0, context[i])
        np.testing.assert_allclose(parsed, expected, rtol=1e-6, atol=0)
        ids = [action_of[e.feature("a", 0)] for e in examples[1:]]
        assert ids == list(np.flatnonzero(rows.candidates[i]))
        labels = {
            a: e.get_label(vowpalwabbit.LabelType.CONTEXTUAL_BANDIT).costs
            for a, e in zip(ids, examples[1:], strict=True)
        }
        assert [a for a, costs in labels.items() if costs] == [rows.action[i]]
        (label,) = labels[int(rows.action[i])]
        assert label.action == rows.action[i]
        assert label.cost == pytest.approx(cost[i], rel=1e-6, abs=1e-7)
        assert label.probability == pytest.approx(rows.pscore[i], rel=1e-6)
        ws.finish_example(examples)


def test_export_onnx_scores_equal_vw_predictions(model, catalog, tmp_path: Path) -> None:
    spec = ContextEncoder(catalog).spec
    scorer = OnnxScorer(model.export(tmp_path / "vw.onnx", spec))
    assert scorer.model_kind == "vw_bandit"
    context = random_contexts(1000, spec.n_context, seed=11)
    everything = np.ones((len(context), catalog.n_actions), bool)
    onnx_scores = scorer.scores(context)
    vw_costs = model.vw_predictions(context, everything, "costs")
    np.testing.assert_allclose(-onnx_scores / model.cost_scale, vw_costs, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(onnx_scores.argmax(axis=1), vw_costs.argmin(axis=1))
    # and the exploring workspace itself puts its greedy mass on the same actions (shared
    # with any it deems tied, within a relative 1e-4)
    pmf = model.vw_predictions(context[:200], everything[:200], "pmf")
    chosen = pmf[np.arange(200), onnx_scores[:200].argmax(axis=1)]
    np.testing.assert_array_equal(chosen, pmf.max(axis=1))
    assert (chosen > 0.5).mean() > 0.9


@pytest.mark.parametrize(
    "spec",
    [
        VwBanditSpec(exploration="squarecb", interactions=("cx", "xo", "co")),
        VwBanditSpec(exploration="softmax", cb_type="ips", constant=False, bits=16),
        VwBanditSpec(cb_type="dr", interactions=("xa", "xt", "tp"), passes=2),
    ],
    ids=["squarecb-reversed-and-action-pairs", "softmax-ips-noconstant", "dr-identity-2-passes"],
)
def test_readout_matches_vw_costs_across_settings(spec, planted, catalog) -> None:
    log, _ = planted
    model = train_vw_bandit(log.take(np.arange(600)), catalog, spec)
    context = random_contexts(150, log.context.shape[1], seed=12)
    allowed = np.random.default_rng(13).random((150, catalog.n_actions)) < 0.5
    allowed[:, 0] = True
    vw_costs = model.vw_predictions(context, allowed, "costs")
    ours = -model.scores(context) / model.cost_scale
    # VW sums in float32: large costs (per-action weight vectors on random contexts) carry
    # float32 rounding beyond 1e-4, hence the relative term
    np.testing.assert_allclose(ours[allowed], vw_costs[allowed], rtol=1e-6, atol=1e-4)
    assert np.isnan(vw_costs[~allowed]).all()


def test_bag_models_vote_like_vw_pmf(planted, catalog) -> None:
    log, _ = planted
    spec = VwBanditSpec(exploration="bag", bag=3, epsilon=0.0, seed=2)
    model = train_vw_bandit(log.take(np.arange(600)), catalog, spec)
    context = random_contexts(100, log.context.shape[1], seed=14)
    allowed = np.ones((100, catalog.n_actions), bool)
    costs = np.einsum("nf,mfa->mna", context.astype(np.float64), model.cost_weights)
    costs += model.cost_bias[:, None, :]
    # each model votes for its cheapest action; VW splits a model's vote between the actions
    # it deems tied with it: |c - c_min| <= 1e-4 (|c| + |c_min|) (VW::math::are_same_rel)
    low = costs.min(axis=2, keepdims=True)
    best = np.abs(costs - low) <= 1e-4 * (np.abs(costs) + np.abs(low))
    votes = (best / best.sum(axis=2, keepdims=True)).mean(axis=0)
    np.testing.assert_allclose(model.vw_predictions(context, allowed, "pmf"), votes, atol=1e-6)
    np.testing.assert_allclose(model.weights, -model.cost_scale * model.cost_weights.mean(axis=0))
    with pytest.raises(ValueError, match="bag"):
        model.vw_predictions(context, allowed, "costs")


@pytest.mark.parametrize("cb_type", ["ips", "dr", "mtr"])
def test_train_vw_bandit_without_pscore_points_to_dm(planted, catalog, cb_type: str) -> None:
    log, _ = planted
    with pytest.raises(ValueError, match=r"needs `pscore`.*DirectMethod.*cb_type 'dm'"):
        train_vw_bandit(replace(log, pscore=None), catalog, VwBanditSpec(cb_type=cb_type))


def test_train_vw_bandit_dm_needs_no_pscore(planted, catalog) -> None:
    log, _ = planted
    model = train_vw_bandit(
        replace(log.take(np.arange(300)), pscore=None), catalog, VwBanditSpec(cb_type="dm")
    )
    assert np.isfinite(model.weights).all()


def test_check_vw_inputs_refuses_bad_logs(planted, catalog) -> None:
    log, _ = planted
    spec = VwBanditSpec()
    outside = log.candidates.copy()
    outside[3, log.action[3]] = False
    with pytest.raises(ValueError, match="decision 3: the logged action"):
        check_vw_inputs(replace(log, candidates=outside), catalog, spec)
    context = log.context.copy()
    context[5, 2] = np.nan
    with pytest.raises(ValueError, match="`context` must be finite, decision 5"):
        check_vw_inputs(replace(log, context=context), catalog, spec)
    with pytest.raises(ValueError, match="`candidates` has 10 actions"):
        check_vw_inputs(replace(log, candidates=log.candidates[:, :10]), catalog, spec)


@pytest.mark.parametrize(
    ("yaml_section", "key", "reason"),
    [
        ("{interactions: [xx]}", "vw_bandit.interactions", "pairs a namespace with itself"),
        ("{interactions: [xz]}", "vw_bandit.interactions", "two namespace letters"),
        ("{interactions: [xc, cx]}", "vw_bandit.interactions", "twice"),
        ("{epsilon: 1.5}", "vw_bandit.epsilon", "less than or equal to 1"),
        ("{exploration: cover}", "vw_bandit.exploration", "'epsilon'"),
        ("{cb_type: dml}", "vw_bandit.cb_type", "'mtr'"),
        ("{bag: 1}", "vw_bandit.bag", "greater than or equal to 2"),
        ("{bits: 40}", "vw_bandit.bits", "less than or equal to 28"),
        ("{learning_rate: 0}", "vw_bandit.learning_rate", "greater than 0"),
        ("{epochs: 3}", "vw_bandit.epochs", "unknown key"),
        ("{exploration: squarecb, cb_type: ips}", "vw_bandit", "squarecb' needs cb_type 'mtr'"),
    ],
)
def test_vw_bandit_config_errors_name_the_field(
    tmp_path: Path, yaml_section: str, key: str, reason: str
) -> None:
    path = tmp_path / "vw.yaml"
    path.write_text(f"learner: vw_bandit\ndata: {{logs: x}}\nvw_bandit: {yaml_section}\n")
    with pytest.raises(ConfigError, match=reason) as info:
        load_training_config(path)
    assert info.value.key == key


def test_default_vw_bandit_config_loads() -> None:
    config = load_training_config("configs/training/vw_bandit.yaml")
    assert config.learner == "vw_bandit"
    assert config.vw_bandit == VwBanditSpec()


@pytest.fixture(scope="module")
def recipe_log(tmp_path_factory, catalog, engine) -> Path:
    from simulators.ground_truth import SimulationRecipe, simulate_log

    out = tmp_path_factory.mktemp("vw_recipe_log")
    recipe = SimulationRecipe.create(
        Path("configs/scenarios/retail_bank.yaml"), 1500, 4, "playbook", 0.3, 43, catalog, engine
    )
    simulate_log(recipe, catalog, engine, out)
    return out


def test_train_cli_vw_bandit_end_to_end(recipe_log: Path, tmp_path: Path, catalog) -> None:
    config = tmp_path / "vw.yaml"
    config.write_text(
        f"""
learner: vw_bandit
data: {{logs: {recipe_log}, holdout_share: 0.3}}
vw_bandit: {{exploration: squarecb, bits: 16}}
evaluation: {{bootstrap: 20}}
tracking: {{uri: "sqlite:///{tmp_path}/mlflow.db", experiment: vw}}
export: {{dir: {tmp_path}/models}}
"""
    )
    result = CliRunner().invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "0 chosen actions blocked by a rule" in result.output
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = MlflowClient()
    run = client.get_run(client.get_model_version_by_alias("nextbest", "challenger").run_id)
    metrics, params = run.data.metrics, run.data.params
    assert metrics["compliance/blocked_actions_chosen"] == 0
    assert np.isfinite(metrics["losses/vw_progressive_cost"])
    assert np.isfinite(metrics["ope/model/dr/value"])
    assert metrics["truth/model/value"] <= metrics["truth/myopic_oracle/value"] + 1e-9
    assert params["learner"] == "vw_bandit"
    assert params["vw_bandit.exploration"] == "squarecb"
    (onnx_file,) = (tmp_path / "models").glob("*.onnx")
    scorer = OnnxScorer(onnx_file)
    assert scorer.model_kind == "vw_bandit"
    scores = scorer.scores(np.zeros((2, ContextEncoder(catalog).n_features), np.float32))
    assert scores.shape == (2, catalog.n_actions)


def test_train_cli_vw_bandit_without_pscore_exits_2(recipe_log: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nextbest.decision_log import read_decisions

    table = read_decisions(recipe_log)
    column = table.schema.get_field_index("pscore")
    no_pscore = table.set_column(
        column, table.schema.field(column), pa.nulls(table.num_rows, pa.float64())
    )
    logs = tmp_path / "logs.parquet"
    pq.write_table(no_pscore, logs)
    config = tmp_path / "vw.yaml"
    config.write_text(
        f"""
learner: vw_bandit
data: {{logs: {logs}}}
evaluation: {{ground_truth: false}}
tracking: {{uri: "sqlite:///{tmp_path}/mlflow.db"}}
"""
    )
    result = CliRunner().invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 2
    flat = " ".join(result.output.split())
    assert "no propensities (pscore)" in flat  # the learner could train; the evaluation cannot
    assert f"nextbest evaluate --logs {logs} --model" in flat  # a command that works on it
