"""nextbest train and promote end to end on a small simulated log, with a local MLflow store."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from nextbest.cli import app
from simulators.policies import PlaybookPolicy
from simulators.rollout import run_policy
from simulators.world import BatchSimulator
from training.onnx_export import OnnxScorer

runner = CliRunner()


@pytest.fixture(scope="module")
def sim_log(tmp_path_factory, catalog, engine, scenario) -> Path:
    out = tmp_path_factory.mktemp("trainlog")
    sim = BatchSimulator(scenario, catalog, engine, 3000, seed=31)
    run_policy(sim, PlaybookPolicy(catalog, 0.3), 6, np.random.default_rng(32), log_dir=str(out))
    return out


def write_config(tmp_path: Path, logs: Path, **overrides: str) -> Path:
    text = f"""
learner: neural_bandit
data: {{logs: {logs}, holdout_share: 0.3}}
neural_bandit: {{hidden: 16, embedding: 8, epochs: 2, batch_size: 1024}}
evaluation: {{bootstrap: 50}}
tracking: {{uri: "sqlite:///{tmp_path}/mlflow.db", experiment: test}}
export: {{dir: {tmp_path}/models}}
"""
    for old, new in overrides.items():
        text = text.replace(old, new)
    path = tmp_path / "train.yaml"
    path.write_text(text)
    return path


PROMOTABLE = {"epochs: 2,": "epochs: 6,"}
"""Enough epochs that the small model beats the playbook's log by its DR lower bound, as the
tests of promote need (with 2 its interval reaches below the playbook's value)."""


@pytest.fixture(scope="module")
def trained_run(sim_log, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow")
    config = write_config(tmp, sim_log, **PROMOTABLE)
    result = runner.invoke(app, ["train", "--config", str(config)])
    return tmp, result


def test_train_registers_challenger_with_artifacts(trained_run, sim_log, catalog) -> None:
    tmp, result = trained_run
    assert result.exit_code == 0, result.output
    assert "0 chosen actions blocked by a rule" in result.output
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    client = MlflowClient()
    version = client.get_model_version_by_alias("nextbest", "challenger")
    run = client.get_run(version.run_id)
    metrics = run.data.metrics
    assert metrics["compliance/blocked_actions_chosen"] == 0
    assert any(key.startswith("losses/") for key in metrics)
    for key in ("ope/model/dr/value", "ope/model/dr/lower", "ope/logging/ips/value"):
        assert np.isfinite(metrics[key]), key
    # the logging policy's importance weights are all 1: every held-out decision counts
    assert 0 < metrics["ope/model/ess"] <= metrics["ope/logging/ess"]
    rounds = int(run.data.tags["data.rounds"])  # ~30% held out: the logging policy's ESS
    assert 0.15 * rounds < metrics["ope/logging/ess"] < 0.45 * rounds
    assert run.data.params["neural_bandit.epochs"] == "6"
    from simulators.ground_truth import read_recipe
    from training.logged_data import load_logged_bandit

    read = load_logged_bandit(sim_log, catalog.n_actions)
    recipe = read_recipe(sim_log)  # a simulated log's recipe is part of its data
    assert run.data.tags["data.fingerprint"] == read.fingerprint(
        None if recipe is None else recipe.model_dump_json()
    )
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    expected = {"config.json", "ope_table.json", "model_card.md", "plots", "model_spec"}
    assert expected | {"choice_evidence.json"} <= artifacts
    assert 0 <= metrics["evidence/thin_share"] <= 1
    assert_evidence_counts_training_split(client, run.info.run_id, tmp)
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/value_with_intervals.png" in plots
    assert "plots/action_mix_by_segment.png" in plots


def assert_evidence_counts_training_split(client: MlflowClient, run_id: str, tmp: Path) -> None:
    """The run's evidence counts the logged decisions and conversions of its training split
    (the customers not held out), offer by offer."""
    from nextbest.catalog import load_catalog
    from training.logged_data import load_logged_bandit, split_log

    config = json.loads(
        Path(client.download_artifacts(run_id, "config.json", str(tmp))).read_text()
    )
    catalog = load_catalog()
    log = load_logged_bandit(config["data"]["logs"], catalog.n_actions)
    train, _, _ = split_log(log, config["data"]["holdout_share"], config["data"]["split_seed"])
    evidence = json.loads(
        Path(client.download_artifacts(run_id, "choice_evidence.json", str(tmp))).read_text()
    )
    assert evidence
    offers = catalog.offer_index[train.action]
    for row in evidence:
        index = catalog.offer_names.index(row["offer"])
        assert row["logged"] == int((offers == index).sum()), row
        assert row["conversions"] == int(((offers == index) & train.converted).sum()), row


def test_train_onnx_file_scores_catalogue(trained_run, catalog) -> None:
    tmp, _ = trained_run
    (model_file,) = (tmp / "models").glob("*.onnx")
    scorer = OnnxScorer(model_file)
    scores = scorer.scores(np.zeros((3, len(scorer.spec["context_names"])), np.float32))
    assert scores.shape == (3, catalog.n_actions)


def test_promote_first_challenger_then_keeps_champion(trained_run) -> None:
    tmp, _ = trained_run
    uri = f"sqlite:///{tmp}/mlflow.db"
    first = runner.invoke(app, ["promote", "--tracking-uri", uri])
    assert first.exit_code == 0, first.output
    assert "promoted" in first.output
    again = runner.invoke(app, ["promote", "--tracking-uri", uri])
    assert again.exit_code == 1
    assert "already the champion" in again.output


def test_promote_unknown_model_is_a_bad_argument(tmp_path: Path) -> None:
    """A mistyped --model is exit 2 naming it, not the exit 1 of a refusal on evidence."""
    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(uri)
    client.create_registered_model("nextbest")  # a store, with another model
    result = runner.invoke(app, ["promote", "--tracking-uri", uri, "--model", "nope"])
    assert result.exit_code == 2
    assert "bad --model 'nope': no such registered model" in " ".join(result.output.split())
    kept = runner.invoke(app, ["promote", "--tracking-uri", uri])  # no challenger: a refusal
    assert kept.exit_code == 1 and "no 'challenger' version" in kept.output


def test_train_log_without_propensities_refused_before_a_run(sim_log, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(sim_log)
    for name in ("pscore", "action_dist"):
        column = table.schema.get_field_index(name)
        table = table.set_column(
            column, name, pa.nulls(table.num_rows, table.schema.field(name).type)
        )
    logs = tmp_path / "nops"
    logs.mkdir()
    pq.write_table(table, logs / "part-0.parquet")
    result = runner.invoke(app, ["train", "--config", str(write_config(tmp_path, logs))])
    assert result.exit_code == 2
    flat = " ".join(result.output.split())
    assert "no propensities" in flat
    assert f"nextbest evaluate --logs {logs} --model" in flat  # a command that works on it
    assert not (tmp_path / "mlflow.db").exists()  # no run was opened


def test_train_bad_config_exits_2_naming_key(sim_log, tmp_path: Path) -> None:
    path = write_config(tmp_path, sim_log, **{"epochs: 2": "epochs: -1"})
    result = runner.invoke(app, ["train", "--config", str(path)])
    assert result.exit_code == 2
    flat = " ".join(result.output.split())
    assert "neural_bandit.epochs" in flat


def test_train_epochs_option_validated_with_its_section(sim_log, tmp_path: Path) -> None:
    path = write_config(
        tmp_path, sim_log, **{"epochs: 2": "epochs: 4, loss: dr, dr_warmup_epochs: 2"}
    )
    result = runner.invoke(app, ["train", "--config", str(path), "--epochs", "2"])
    assert result.exit_code == 2
    flat = " ".join(result.output.split())
    assert "--epochs 2" in flat and "dr_warmup_epochs" in flat


def test_train_epochs_option_validated_with_the_ope_reward_model(sim_log, tmp_path: Path) -> None:
    """--epochs also reaches the DM/DR reward model's settings: a DR warm-up that the new
    epochs no longer leave room for is refused before any training, naming where it is."""
    path = write_config(
        tmp_path,
        sim_log,
        **{
            "epochs: 2, batch_size: 1024": "epochs: 4, batch_size: 1024",
            "evaluation: {bootstrap: 50}": (
                "evaluation: {bootstrap: 50, reward_model: {loss: dr, dr_warmup_epochs: 2}}"
            ),
        },
    )
    result = runner.invoke(app, ["train", "--config", str(path), "--epochs", "2"])
    assert result.exit_code == 2
    flat = " ".join(result.output.split())
    assert "--epochs 2" in flat and "evaluation.reward_model" in flat
    assert not (tmp_path / "mlflow.db").exists()  # refused before a run was opened


def test_train_epochs_option_sets_vw_passes(sim_log, tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        sim_log,
        **{
            "learner: neural_bandit": "learner: vw_bandit",
            "epochs: 2, batch_size: 1024": "epochs: 2",
        },
    )
    result = runner.invoke(app, ["train", "--config", str(path), "--epochs", "2"])
    assert result.exit_code == 0, result.output
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert runs[0].data.params["vw_bandit.passes"] == "2"


def test_train_missing_log_exits_2(tmp_path: Path) -> None:
    path = write_config(tmp_path, tmp_path / "missing")
    result = runner.invoke(app, ["train", "--config", str(path)])
    assert result.exit_code == 2
    assert "no such file" in result.output


def test_train_learns_from_several_logs_as_one(sim_log, tmp_path: Path, catalog) -> None:
    """``data.logs`` may list logs (a journal and its archive): one run over all their
    decisions, named in its parameters and model card."""
    import pyarrow.parquet as pq

    from nextbest.decision_log import read_decisions

    whole = read_decisions(sim_log, n_actions=catalog.n_actions)
    parts = [tmp_path / "older", tmp_path / "newer"]
    for i, part in enumerate(parts):
        part.mkdir()
        half = whole.num_rows // 2
        rows = whole.slice(0, half) if i == 0 else whole.slice(half)
        pq.write_table(rows, part / "part.parquet")
    config = write_config(tmp_path, tmp_path / "unused")
    config.write_text(
        config.read_text().replace(
            f"logs: {tmp_path / 'unused'}", f"logs: [{parts[0]}, {parts[1]}]"
        )
    )
    result = runner.invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 0, result.output
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri, registry_uri=uri)
    run = client.get_run(client.get_model_version_by_alias("nextbest", "challenger").run_id)
    assert run.data.params["data.logs"] == str([str(parts[0]), str(parts[1])])
    assert run.data.tags["data.rounds"] == str(whole.num_rows)
    card = Path(client.download_artifacts(run.info.run_id, "model_card.md", str(tmp_path)))
    assert f"`{parts[0]} + {parts[1]}` ({whole.num_rows:,} decisions" in card.read_text()


@pytest.fixture(scope="module")
def recipe_log(tmp_path_factory, catalog, engine):
    from simulators.ground_truth import SimulationRecipe, simulate_log

    out = tmp_path_factory.mktemp("recipe_log")
    recipe = SimulationRecipe.create(
        Path("configs/scenarios/retail_bank.yaml"), 3000, 6, "playbook", 0.3, 41, catalog, engine
    )
    simulate_log(recipe, catalog, engine, out)
    return out


def test_train_refuses_the_ground_truth_of_a_simulated_log_among_others(
    recipe_log, sim_log, tmp_path: Path
) -> None:
    """The replay reruns one simulated log, whole: with another log beside it, the run is
    refused before it opens, saying how to go on."""
    config = str(write_config(tmp_path, recipe_log))
    result = runner.invoke(
        app, ["train", "--config", config, "--logs", str(recipe_log), "--logs", str(sim_log)]
    )
    assert result.exit_code == 2, result.output
    assert "reruns one simulated log" in result.output
    assert "evaluation.ground_truth" in result.output
    assert not (tmp_path / "mlflow.db").exists() or not MlflowClient(
        f"sqlite:///{tmp_path}/mlflow.db"
    ).search_runs(["0"])


def test_the_champion_gets_its_true_value_next_to_its_estimates(recipe_log, tmp_path: Path) -> None:
    """On a simulated log the run replays the champion too. The same config trained twice
    gives the same model: the champion's true value is then the new model's, to the digit
    (which also shows each held-out decision read the champion's own row)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = str(write_config(tmp_path, recipe_log))
    assert runner.invoke(app, ["train", "--config", config]).exit_code == 0
    client = MlflowClient(uri, registry_uri=uri)
    client.set_registered_model_alias("nextbest", "champion", "1")
    second = runner.invoke(app, ["train", "--config", config])
    assert second.exit_code == 0, second.output
    run = client.get_run(client.get_model_version_by_alias("nextbest", "challenger").run_id)
    metrics = run.data.metrics
    assert metrics["truth/champion/value"] == pytest.approx(metrics["truth/model/value"], abs=1e-9)
    assert metrics["truth/champion/blocked_mass"] == 0.0
    truth_file = client.download_artifacts(run.info.run_id, "ground_truth.json", str(tmp_path))
    assert "champion" in {r["policy"] for r in json.loads(Path(truth_file).read_text())}


def test_train_simulated_log_logs_ground_truth(recipe_log, tmp_path: Path, catalog) -> None:
    result = runner.invoke(app, ["train", "--config", str(write_config(tmp_path, recipe_log))])
    assert result.exit_code == 0, result.output
    assert "Ground truth" in result.output
    assert "DR with an exact reward model" in " ".join(result.output.split())
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = MlflowClient()
    run = client.get_run(client.get_model_version_by_alias("nextbest", "challenger").run_id)
    metrics = run.data.metrics
    oracle = metrics["truth/myopic_oracle/value"]
    for policy in ("model", "logging", "uniform", "no_contact"):
        value = metrics[f"truth/{policy}/value"]
        assert value <= oracle + 1e-9, policy  # nothing beats the best allowed action
        assert metrics[f"truth/{policy}/regret"] == pytest.approx(oracle - value)
        assert metrics[f"truth/{policy}/blocked_mass"] == 0.0
    assert metrics["truth/model/reference_blocked"] == 0.0
    assert metrics["compliance/blocked_actions_chosen"] == 0.0
    assert metrics["compliance/mask_disagreements"] == 0.0
    assert 0 < metrics["compliance/reference_checked"] <= 1_000  # spread over the replay
    assert metrics["truth/no_contact/value"] == 0.0
    from simulators.ground_truth import read_recipe
    from training.logged_data import load_logged_bandit

    read = load_logged_bandit(recipe_log, catalog.n_actions)
    fingerprint = run.data.tags["data.fingerprint"]  # the recipe is part of the data
    assert fingerprint == read.fingerprint(read_recipe(recipe_log).model_dump_json())
    assert fingerprint != read.fingerprint()
    # the oracle's own KPIs, not only its value
    assert 0 < metrics["truth/myopic_oracle/contact_rate"] <= 1
    assert 0 < metrics["truth/myopic_oracle/conversion_rate"] < 1
    assert 0 <= metrics["truth/myopic_oracle/complaint_rate"] < 0.05
    assert metrics["data/reward_economics_residual"] < 1e-6
    # DR with the simulator's exact reward model: its interval holds the model's true value
    exact = [metrics[f"truth/model/dr_exact_{k}"] for k in ("lower", "value", "upper")]
    assert exact[0] <= metrics["truth/model/value"] <= exact[2], exact
    assert exact[0] < exact[1] < exact[2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"ground_truth.json", "ground_truth_by_segment.json"} <= artifacts
    card = Path(client.download_artifacts(run.info.run_id, "model_card.md", str(tmp_path)))
    text = card.read_text()
    assert "## Ground truth" in text
    assert f"at {exact[1]:.4f} [{exact[0]:.4f}, {exact[2]:.4f}]" in " ".join(text.split())
    # every offer the policy chooses is listed with the evidence behind it, as in the artifact
    evidence_file = client.download_artifacts(
        run.info.run_id, "choice_evidence.json", str(tmp_path)
    )
    evidence = json.loads(Path(evidence_file).read_text())
    assert evidence, "the policy contacted nobody"
    assert sum(row["policy_share"] for row in evidence) <= 1 + 1e-9
    for row in evidence:
        assert f"| {row['offer']} | {row['policy_share']:.1%} | {row['logged']:,} |" in text


def test_the_replay_gives_the_logged_actions_expected_reward(recipe_log, catalog, engine) -> None:
    """The replay gives each decision's expected reward of its logged action (a draw of the
    logging policy, so on average the policy's value), and the exact-model DR of the logging
    policy itself, whose weights are all 1, is its true value plus the rewards' noise. (That
    the rewards' noise averages 0 needs more decisions than a test's: 35,105 gave 0.47 with
    a standard error of 0.83.)"""
    from simulators.ground_truth import read_recipe, replay_truth
    from training.logged_data import load_logged_bandit

    log = load_logged_bandit(recipe_log, catalog.n_actions)
    rows = np.ones(log.n_rounds, bool)
    dist = log.logging_dist
    assert dist is not None and log.pscore is not None

    def logged(r: np.ndarray, context: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        """The policy that takes the logged action: its value is the logged action's."""
        return np.eye(catalog.n_actions)[log.action[r]]

    # a sample of the rows: the table's rows must be the selected log rows, in order
    some = np.random.default_rng(3).random(log.n_rounds) < 0.3
    sampled = replay_truth(
        read_recipe(recipe_log),
        catalog,
        engine,
        some,
        {"logged": logged},
        log.context,
        logged_action=log.action,
    )
    assert sampled.logged_q is not None and len(sampled.logged_q) == some.sum()
    np.testing.assert_array_equal(sampled.value[:, 0], sampled.logged_q)
    truth = replay_truth(
        read_recipe(recipe_log),
        catalog,
        engine,
        rows,
        {"logging": lambda r, context, allowed: dist[r]},
        log.context,
        logged_action=log.action,
    )
    assert truth.logged_q is not None and truth.logged_q.shape == (log.n_rounds,)
    # the logged action is a draw of the logging policy, whose expected reward is its value
    drawn = truth.logged_q - truth.value[:, 0]
    assert abs(drawn.mean()) < 4 * drawn.std() / np.sqrt(len(drawn)), drawn.mean()
    noise = log.reward - truth.logged_q
    weight = dist[np.arange(log.n_rounds), log.action] / log.pscore
    np.testing.assert_allclose(weight, 1.0, rtol=1e-6)
    terms = truth.exact_model_dr("logging", weight, log.reward)
    np.testing.assert_allclose(terms, truth.value[:, 0] + noise, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"must be \("):
        truth.exact_model_dr("logging", weight[1:], log.reward)
    without = replay_truth(
        read_recipe(recipe_log), catalog, engine, rows, {"logging": lambda r, c, a: dist[r]}
    )
    with pytest.raises(ValueError, match="no logged_q"):
        without.exact_model_dr("logging", weight, log.reward)


def test_train_replay_refuses_log_that_differs_from_recipe(
    recipe_log, tmp_path: Path, catalog, engine
) -> None:
    import json
    import shutil

    from simulators.ground_truth import RECIPE_FILE

    copy = tmp_path / "log"
    shutil.copytree(recipe_log, copy)
    recipe = json.loads((copy / RECIPE_FILE).read_text())
    recipe["seed"] += 1  # another world: the replayed contexts cannot match the log
    (copy / RECIPE_FILE).write_text(json.dumps(recipe))
    result = runner.invoke(app, ["train", "--config", str(write_config(tmp_path, copy))])
    assert result.exit_code == 2
    assert "does not match its simulation recipe" in " ".join(result.output.split())


def test_a_log_of_an_older_simulator_is_refused_before_a_run_opens(
    recipe_log, tmp_path: Path
) -> None:
    """It failed after training, in its run, as a log that 'does not match its recipe'."""
    import json
    import shutil

    from simulators.ground_truth import RECIPE_FILE

    copy = tmp_path / "log"
    shutil.copytree(recipe_log, copy)
    recipe = json.loads((copy / RECIPE_FILE).read_text())
    del recipe["simulator_revision"]  # as recipes written before revisions were recorded
    (copy / RECIPE_FILE).write_text(json.dumps(recipe))
    result = runner.invoke(app, ["train", "--config", str(write_config(tmp_path, copy))])
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert "made by simulator revision 0" in output and "ground_truth: false" in output
    assert not (tmp_path / "mlflow.db").exists() or not MlflowClient(
        f"sqlite:///{tmp_path}/mlflow.db"
    ).search_runs(["0"])


def _evaluate(tmp: Path, logs: Path, model: str):
    uri = f"sqlite:///{tmp}/mlflow.db"
    args = ["--logs", str(logs), "--model", model, "--tracking-uri", uri, "--bootstrap", "20"]
    return runner.invoke(app, ["evaluate", *args])


def test_evaluate_registered_model_prints_dr_row(trained_run, sim_log) -> None:
    tmp, result = trained_run
    assert result.exit_code == 0, result.output
    out = _evaluate(tmp, sim_log, "models:/nextbest@challenger")
    assert out.exit_code == 0, out.output
    assert re.search(r"model nextbest/\d+", out.output), out.output
    for estimator in ("ips", "snips", "dm", "dr", "switch-dr"):
        assert estimator in out.output


def test_evaluate_unknown_alias_names_it(trained_run, sim_log) -> None:
    tmp, _ = trained_run
    out = _evaluate(tmp, sim_log, "models:/nextbest@nosuchalias")
    assert out.exit_code == 2
    assert "nosuchalias" in out.output


def test_export_registered_model_scores_like_the_run(trained_run, tmp_path: Path) -> None:
    tmp, result = trained_run
    assert result.exit_code == 0, result.output
    target = tmp_path / "deploy" / "model.onnx"
    out = runner.invoke(
        app,
        [
            "export",
            "--model",
            "models:/nextbest@challenger",
            "--out",
            str(target),
            "--tracking-uri",
            f"sqlite:///{tmp}/mlflow.db",
        ],
    )
    assert out.exit_code == 0, out.output
    assert (tmp_path / "deploy" / "model.spec.json").exists()
    exported = OnnxScorer(target)
    original = OnnxScorer(next((tmp / "models").glob("*.onnx")))
    context = np.random.default_rng(0).normal(size=(64, len(exported.spec["context_names"])))
    np.testing.assert_array_equal(exported.scores(context), original.scores(context))
    # the file says where it came from; a service serving it reports that version
    from serving.model_store import ModelStore

    registry = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    version = f"nextbest/{registry.get_model_version_by_alias('nextbest', 'challenger').version}"
    assert exported.exported_from == version and original.exported_from is None
    served = ModelStore(str(target), n_actions=exported.scores(context).shape[1])
    try:
        assert served.current is not None
        assert re.fullmatch(rf"{version} \(file:[0-9a-f]+\)", served.current.version)
    finally:
        served.close()


def test_registry_downloads_are_removed_after_export_and_evaluate(
    trained_run, sim_log, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    tmp, _ = trained_run
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    uri = f"sqlite:///{tmp}/mlflow.db"
    model = "models:/nextbest@challenger"
    out = tmp_path / "m.onnx"
    exported = runner.invoke(
        app, ["export", "--model", model, "--out", str(out), "--tracking-uri", uri]
    )
    assert exported.exit_code == 0, exported.output
    evaluated = _evaluate(tmp, sim_log, model)
    assert evaluated.exit_code == 0, evaluated.output
    assert list(scratch.iterdir()) == []  # each registry download lived for its command only


def test_export_model_of_another_feature_spec_refused(tmp_path: Path, catalog) -> None:
    from nextbest.features import ContextEncoder
    from nextbest.onnx_scoring import linear_scoring_model, save_scoring_model

    spec = ContextEncoder(catalog).spec
    stale = type(spec)(spec.context_names[:-1], spec.action_names, spec.catalog_version)
    weights = np.zeros((stale.n_context, catalog.n_actions), np.float32)
    model = linear_scoring_model(weights, np.zeros(catalog.n_actions, np.float32), stale, "test")
    path = save_scoring_model(model, tmp_path / "stale.onnx", stale, "test")
    out = runner.invoke(app, ["export", "--model", str(path), "--out", str(tmp_path / "x.onnx")])
    assert out.exit_code == 2
    assert "reads features" in out.output
    assert not (tmp_path / "x.onnx").exists()


def test_a_second_model_is_valued_against_the_champion_on_its_own_held_out_decisions(
    sim_log, tmp_path: Path
) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = write_config(tmp_path, sim_log, **PROMOTABLE)
    first = runner.invoke(app, ["train", "--config", str(config)])
    assert first.exit_code == 0, first.output
    promoted = runner.invoke(app, ["promote", "--tracking-uri", uri])
    assert "promoted" in promoted.output, promoted.output

    other_split = {"holdout_share: 0.3}": "holdout_share: 0.3, split_seed: 11}", **PROMOTABLE}
    second = runner.invoke(
        app, ["train", "--config", str(write_config(tmp_path, sim_log, **other_split))]
    )
    assert second.exit_code == 0, second.output
    assert "champion" in second.output  # rows of the printed OPE table
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    champion = client.get_model_version_by_alias("nextbest", "champion")
    challenger = client.get_model_version_by_alias("nextbest", "challenger")
    own = client.get_run(champion.run_id).data.metrics
    run = client.get_run(challenger.run_id)
    assert str(challenger.version) == "2" and run.data.tags["champion.version"] == "1"
    # valued on the second run's held-out customers, not on those of its own run
    on_new_data = run.data.metrics["ope/champion/dr/value"]
    assert np.isfinite(on_new_data) and on_new_data != own["ope/model/dr/value"]
    again = runner.invoke(app, ["promote", "--tracking-uri", uri])
    lower = run.data.metrics["ope/model/dr/lower"]
    assert ("promoted" in again.output) == (lower > on_new_data), again.output
    assert f"{on_new_data:.4f}" in again.output


def test_train_and_promote_use_the_registry_of_the_tracking_uri(
    sim_log, tmp_path: Path, monkeypatch
) -> None:
    """The challenger is registered, valued and promoted in ``tracking.uri``'s own registry,
    whatever process-wide registry ``MLFLOW_REGISTRY_URI`` names (the service reads there)."""
    elsewhere = tmp_path / "elsewhere.db"
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{elsewhere}")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = write_config(tmp_path, sim_log, **PROMOTABLE)
    trained = runner.invoke(app, ["train", "--config", str(config)])
    assert trained.exit_code == 0, trained.output
    promoted = runner.invoke(app, ["promote", "--tracking-uri", uri])
    assert "promoted" in promoted.output, promoted.output
    client = MlflowClient(uri, registry_uri=uri)
    challenger = client.get_model_version_by_alias("nextbest", "challenger")
    assert client.get_model_version_by_alias("nextbest", "champion").version == challenger.version
    assert client.get_run(challenger.run_id).data.metrics["compliance/blocked_actions_chosen"] == 0
    assert not elsewhere.exists()


def test_train_computes_the_crossfit_folds_once(
    sim_log, tmp_path: Path, monkeypatch, catalog
) -> None:
    """The folds checked before training are the folds the DM/DR reward models use."""
    import training.train as train_module

    def linear(config, train, catalog_, on_epoch=None, acting=True):
        return train_module.FittedModel(
            kind="neural_bandit",
            scores=lambda context: np.zeros((len(context), catalog.n_actions)),
            export=lambda path, spec: _linear_model(path, catalog),
            history=[{"losses/train": 0.0}],
            params={},
        )

    computed = []
    fold_of = train_module._fold_of

    def counted(*args, **kwargs):
        computed.append(args[1:])
        return fold_of(*args, **kwargs)

    monkeypatch.setattr(train_module, "fit_model", linear)
    monkeypatch.setattr(train_module, "_fold_of", counted)
    result = runner.invoke(app, ["train", "--config", str(write_config(tmp_path, sim_log))])
    assert result.exit_code == 0, result.output
    assert computed == [(2, 0)]  # evaluation.crossfit_folds 2, evaluation.seed 0


def _no_training(*args, **kwargs):
    raise AssertionError("training started although the inputs could be refused before it")


def _log_without_propensities(sim_log: Path, out: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(sim_log).slice(0, 400)
    for name in ("pscore", "action_dist"):
        column = table.schema.get_field_index(name)
        table = table.set_column(
            column, name, pa.nulls(table.num_rows, table.schema.field(name).type)
        )
    out.mkdir()
    pq.write_table(table, out / "part-0.parquet")
    return out


def _linear_model(path: Path, catalog) -> Path:
    """A small valid scoring model of this catalogue's features (no training needed)."""
    from nextbest.features import ContextEncoder
    from nextbest.onnx_scoring import linear_scoring_model, save_scoring_model

    spec = ContextEncoder(catalog).spec
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(spec.n_context, catalog.n_actions)).astype(np.float32)
    model = linear_scoring_model(weights, np.zeros(catalog.n_actions, np.float32), spec, "test")
    return save_scoring_model(model, path, spec, "test")


def test_train_non_finite_scores_refused_before_registering(
    sim_log, tmp_path: Path, monkeypatch
) -> None:
    """A model that diverged (NaN scores) fails its run and moves no alias."""
    import training.train as train_module

    def diverged(config, train, catalog, on_epoch=None, acting=True):
        return train_module.FittedModel(
            kind="neural_bandit",
            scores=lambda context: np.full((len(context), catalog.n_actions), np.nan),
            export=_no_training,
            history=[],
            params={},
        )

    monkeypatch.setattr(train_module, "fit_model", diverged)
    result = runner.invoke(app, ["train", "--config", str(write_config(tmp_path, sim_log))])
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert "non-finite scores" in flat and "neural_bandit.learning_rate" in flat
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.search_registered_models() == []
    (run,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert run.info.status == "FAILED"


INFINITE_LEARNING_RATE = {
    "neural_bandit": {"batch_size: 1024}": "batch_size: 1024, learning_rate: .inf}"},
    "vw_bandit": {"learner: neural_bandit": "learner: vw_bandit\nvw_bandit: {learning_rate: .inf}"},
}


@pytest.mark.parametrize("learner", sorted(INFINITE_LEARNING_RATE))
def test_train_infinite_learning_rate_refused_at_load(sim_log, tmp_path: Path, learner) -> None:
    path = write_config(tmp_path, sim_log, **INFINITE_LEARNING_RATE[learner])
    result = runner.invoke(app, ["train", "--config", str(path)])
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert f"{learner}.learning_rate: Input should be a finite number" in flat
    assert not (tmp_path / "mlflow.db").exists()


def test_train_export_dir_that_is_a_file_refused_before_training(
    sim_log, tmp_path: Path, monkeypatch
) -> None:
    import training.train as train_module

    monkeypatch.setattr(train_module, "fit_model", _no_training)
    taken = tmp_path / "taken"
    taken.write_text("")
    config = str(write_config(tmp_path, sim_log))
    for export_dir, reason in ((taken, "is a file"), (taken / "sub", f"is below {taken}")):
        result = runner.invoke(app, ["train", "--config", config, "--export-dir", str(export_dir)])
        assert result.exit_code == 2, result.output
        flat = " ".join(result.output.split())
        assert f"export.dir {export_dir}" in flat and reason in flat
    assert not (tmp_path / "mlflow.db").exists()  # no run was opened


def test_train_unregistrable_model_name_refused_at_load(sim_log, tmp_path: Path) -> None:
    path = write_config(
        tmp_path, sim_log, **{"experiment: test}": 'experiment: test, registered_model: "a/b@x"}'}
    )
    result = runner.invoke(app, ["train", "--config", str(path)])
    assert result.exit_code == 2, result.output
    assert "tracking.registered_model" in result.output
    assert not (tmp_path / "mlflow.db").exists()


def test_train_too_few_held_out_customers_for_crossfit_refused_before_training(
    sim_log, tmp_path: Path, monkeypatch
) -> None:
    """Two decisions of two customers: one held out, too few for two cross-fitting folds."""
    import pyarrow.parquet as pq

    import training.train as train_module
    from training.logged_data import customer_unit

    monkeypatch.setattr(train_module, "fit_model", _no_training)
    table = pq.read_table(sim_log)
    held = customer_unit(table.column("customer_key").to_numpy(zero_copy_only=False), "0") < 0.3
    rows = [int(np.flatnonzero(held)[0]), int(np.flatnonzero(~held)[0])]
    logs = tmp_path / "two"
    logs.mkdir()
    pq.write_table(table.take(rows), logs / "part-0.parquet")
    result = runner.invoke(app, ["train", "--config", str(write_config(tmp_path, logs))])
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert "too few for evaluation.crossfit_folds = 2" in flat
    assert not (tmp_path / "mlflow.db").exists()


def test_train_and_promote_unusable_tracking_uri_exit_2(sim_log, tmp_path: Path, monkeypatch):
    import training.train as train_module

    monkeypatch.setattr(train_module, "fit_model", _no_training)
    config = str(write_config(tmp_path, sim_log))
    trained = runner.invoke(app, ["train", "--config", config, "--tracking-uri", "bogus://x"])
    promoted = runner.invoke(app, ["promote", "--tracking-uri", "bogus://x"])
    for result, verb in ((trained, "train"), (promoted, "promote")):
        assert result.exit_code == 2, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
        flat = " ".join(result.output.split())
        assert f"cannot {verb}: tracking URI 'bogus://x' cannot be used" in flat


def test_evaluate_log_without_propensities_uses_dm_and_says_what_was_left_out(
    sim_log, tmp_path: Path, catalog
) -> None:
    logs = _log_without_propensities(sim_log, tmp_path / "nops")
    model = str(_linear_model(tmp_path / "m.onnx", catalog))
    base = ["evaluate", "--logs", str(logs), "--bootstrap", "20"]
    result = runner.invoke(app, [*base, "--model", model])
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "│ dm" in result.output and "│ ips" not in result.output
    assert "left out ips, snips, dr, switch-dr: the log has no propensities" in flat
    assert "`pscore`" in flat
    # nothing can value a policy without a model; an estimator asked for by name is refused
    for extra, reason in (
        ([], "no estimator can value a policy on this log"),
        (["--model", model, "--estimator", "dr"], "--estimator dr: the log has no propensities"),
        (["--estimator", "nope"], "bad --estimator 'nope'"),
    ):
        refused = runner.invoke(app, [*base, *extra])
        assert refused.exit_code == 2, refused.output
        assert reason in " ".join(refused.output.split())


def test_evaluate_estimator_option_limits_the_table(sim_log, tmp_path: Path, catalog) -> None:
    model = str(_linear_model(tmp_path / "m.onnx", catalog))
    args = ["evaluate", "--logs", str(sim_log), "--bootstrap", "20", "--model", model]
    result = runner.invoke(app, [*args, "--estimator", "snips", "--estimator", "dm"])
    assert result.exit_code == 0, result.output
    assert "│ snips" in result.output and "│ dm" in result.output
    assert "│ ips" not in result.output and "│ dr" not in result.output
    assert "left out" not in result.output


def test_export_out_at_directory_or_below_file_refused(tmp_path: Path, catalog) -> None:
    model = str(_linear_model(tmp_path / "m.onnx", catalog))
    (tmp_path / "dir.onnx").mkdir()
    (tmp_path / "afile").write_text("")
    for out, reason in (
        (tmp_path / "dir.onnx", "is a directory"),
        (tmp_path / "afile" / "x.onnx", "is a file, not a directory"),
    ):
        result = runner.invoke(app, ["export", "--model", model, "--out", str(out)])
        assert result.exit_code == 2, result.output
        assert reason in " ".join(result.output.split())
    assert not list(tmp_path.glob("*.partial"))


def test_train_drop_pending_option_sets_the_config(sim_log, tmp_path: Path, monkeypatch) -> None:
    import training.train as train_module

    seen = []

    def stop(config, *args, **kwargs):
        seen.append(config.data.drop_pending)
        raise ValueError("stopped before training")

    monkeypatch.setattr(train_module, "run_training", stop)
    config = str(write_config(tmp_path, sim_log))
    for extra in ([], ["--drop-pending"]):
        result = runner.invoke(app, ["train", "--config", config, *extra])
        assert result.exit_code == 2 and "stopped before training" in result.output
    assert seen == [False, True]


def test_commands_that_read_a_registry_refuse_a_missing_sqlite_store(tmp_path: Path) -> None:
    """MLflow would create an empty store at a mistyped path and answer "no such model": the
    readers name the missing file instead, and create nothing."""
    missing = tmp_path / "nope.db"
    uri = f"sqlite:///{missing}"
    promoted = runner.invoke(app, ["promote", "--tracking-uri", uri])
    exported = runner.invoke(
        app,
        [
            "export",
            "--model",
            "models:/nextbest@champion",
            "--out",
            str(tmp_path / "m.onnx"),
            "--tracking-uri",
            uri,
        ],
    )
    for result in (promoted, exported):
        assert result.exit_code == 2, result.output
        flat = " ".join(result.output.split())
        assert f"tracking URI '{uri}': no MLflow store at {missing}" in flat
    assert not missing.exists()


def test_a_rule_engine_that_blocks_nothing_is_caught_by_the_reference_check(
    catalog, engine, tmp_path: Path, monkeypatch
) -> None:
    """A bypassed mask (the engine allowing everything) makes a log, a replay and a policy
    that agree with each other: only the rules' reference semantics, checked at a sample
    of the replayed decisions, see the blocked actions, and the run fails its compliance
    check (exit 1), so promote would refuse it."""
    from nextbest.compliance import RuleEngine
    from nextbest.compliance.engine import ALLOWED
    from simulators.ground_truth import SimulationRecipe, simulate_log

    def allow_everything(self, batch):
        return np.full((len(batch), self.n_actions), ALLOWED, np.uint8)

    monkeypatch.setattr(RuleEngine, "blocked_by", allow_everything)
    out = tmp_path / "log"
    recipe = SimulationRecipe.create(
        Path("configs/scenarios/retail_bank.yaml"), 800, 4, "playbook", 0.3, 43, catalog, engine
    )
    simulate_log(recipe, catalog, engine, out)
    result = runner.invoke(app, ["train", "--config", str(write_config(tmp_path, out))])
    assert result.exit_code == 1, result.output
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(client.get_model_version_by_alias("nextbest", "challenger").run_id)
    metrics = run.data.metrics
    assert metrics["truth/model/blocked_mass"] == 0.0  # the engine sees nothing
    assert metrics["truth/model/reference_blocked"] > 0
    assert metrics["compliance/mask_disagreements"] > 0  # the engine's masks, checked whole
    assert metrics["compliance/blocked_actions_chosen"] == (
        metrics["truth/model/reference_blocked"] + metrics["compliance/mask_disagreements"]
    )


def test_a_log_of_another_rule_set_is_tagged_and_said(
    sim_log, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nextbest.decision_log import read_decisions

    table = read_decisions(sim_log)
    column = table.schema.get_field_index("ruleset_version")
    table = table.set_column(column, "ruleset_version", pa.array(["older"] * table.num_rows))
    pq.write_table(table, tmp_path / "log.parquet")
    result = runner.invoke(
        app, ["train", "--config", str(write_config(tmp_path, tmp_path / "log.parquet"))]
    )
    assert result.exit_code == 0, result.output
    assert "made by rule set older, not the current" in caplog.text
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(client.get_model_version_by_alias("nextbest", "challenger").run_id)
    assert run.data.tags["compliance.ruleset_mismatch"].startswith("older != ")


def test_a_terminated_training_ends_its_run_as_failed(tmp_path: Path) -> None:
    """SIGTERM (a scheduler stopping the job) left the MLflow run RUNNING for good; with
    train's handler it ends FAILED, as after Ctrl-C."""
    import subprocess
    import sys
    import textwrap

    uri = f"sqlite:///{tmp_path}/m.db"
    script = textwrap.dedent(
        f"""
        import os, signal, mlflow
        from nextbest.cli import _terminated
        signal.signal(signal.SIGTERM, _terminated)
        mlflow.set_tracking_uri({uri!r})
        with mlflow.start_run() as run:
            print(run.info.run_id, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            signal.pause()
        """
    )
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # the suite's
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 128 + 15, done.stderr
    run_id = done.stdout.split()[0]
    assert MlflowClient(uri).get_run(run_id).info.status == "FAILED"


def test_a_deleted_experiment_is_named_not_a_traceback(sim_log, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    client.delete_experiment(client.create_experiment("gone"))
    config = write_config(tmp_path, sim_log, **{"experiment: test}": "experiment: gone}"})
    result = runner.invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert "'gone' was deleted" in " ".join(result.output.split())


def test_train_learns_from_a_time_window_of_the_log(recipe_log, tmp_path: Path, catalog) -> None:
    """``--since`` keeps the later decisions (recorded in the run's config); on a simulated
    log the ground-truth replay needs the whole log, so a window needs it off; a window the
    wrong way round, or without a time zone, is refused before a run opens."""
    import pyarrow.compute as pc

    from nextbest.decision_log import read_decisions

    stamps = read_decisions(recipe_log, n_actions=catalog.n_actions).column("timestamp")
    first, last = (v.as_py() for v in pc.min_max(stamps).values())
    middle = first + (last - first) / 2
    since = middle.isoformat()
    expected = int(pc.sum(pc.greater_equal(stamps, pa.scalar(middle, stamps.type))).as_py())
    config = write_config(tmp_path, recipe_log)
    refused = runner.invoke(app, ["train", "--config", str(config), "--since", since])
    assert refused.exit_code == 2
    assert "ground_truth: false" in " ".join(refused.output.split())
    config = write_config(
        tmp_path, recipe_log, **{"bootstrap: 50}": "bootstrap: 50, ground_truth: false}"}
    )
    result = runner.invoke(app, ["train", "--config", str(config), "--since", since])
    assert result.exit_code == 0, result.output
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(client.get_model_version_by_alias("nextbest", "challenger").run_id)
    assert run.data.tags["data.rounds"] == str(expected) and 0 < expected < len(stamps)
    assert run.data.params["data.since"].startswith(since[:19])
    backwards = runner.invoke(
        app,
        ["train", "--config", str(config), "--since", since, "--until", first.isoformat()],
    )
    assert backwards.exit_code == 2 and "must come before until" in backwards.output
    naive = runner.invoke(app, ["train", "--config", str(config), "--since", "2026-01-07"])
    assert naive.exit_code == 2 and "bad --since" in naive.output
