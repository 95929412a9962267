"""The training config refuses, at load and naming the key, values that would only fail (or
worse, pass silently) after training: non-finite floats, booleans for numbers and
unregistrable model names."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import _validate_model_name

from nextbest.config_loading import ConfigError, StrictModel
from training.config import TrainingConfig, load_training_config, registered_model_name_problem
from training.neural_bandit import NeuralBanditConfig


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(f"data: {{logs: x}}\n{body}\n")
    return path


# ``gt=0`` and ``ge=0`` let ``.inf`` through: every float of every section must be finite
NON_FINITE = [
    ("neural_bandit: {learning_rate: .inf}", "neural_bandit.learning_rate"),
    ("neural_bandit: {learning_rate: .nan}", "neural_bandit.learning_rate"),
    ("neural_bandit: {weight_decay: .inf}", "neural_bandit.weight_decay"),
    ("neural_bandit: {ips_clip: .inf}", "neural_bandit.ips_clip"),
    ("vw_bandit: {learning_rate: .inf}", "vw_bandit.learning_rate"),
    ("vw_bandit: {epsilon: .nan}", "vw_bandit.epsilon"),
    ("vw_bandit: {cost_scale_cny: .inf}", "vw_bandit.cost_scale_cny"),
    ("reward: {complaint_penalty_cny: .inf}", "reward.complaint_penalty_cny"),
    ("policy: {kind: softmax, temperature: .inf}", "policy.temperature"),
    ("evaluation: {alpha: .nan}", "evaluation.alpha"),
]


@pytest.mark.parametrize(("section", "key"), NON_FINITE)
def test_load_training_config_non_finite_float_refused_naming_key(
    tmp_path: Path, section: str, key: str
) -> None:
    learner = "vw_bandit" if key.startswith("vw_bandit") else "neural_bandit"
    path = _write(tmp_path, f"learner: {learner}\n{section}")
    with pytest.raises(ConfigError, match="finite number") as info:
        load_training_config(path)
    assert info.value.key == key


def test_load_training_config_non_finite_holdout_share_refused(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("learner: vw_bandit\ndata: {logs: x, holdout_share: .nan}\n")
    with pytest.raises(ConfigError, match="finite number") as info:
        load_training_config(path)
    assert info.value.key == "data.holdout_share"


def test_load_training_config_non_finite_reward_model_override_refused(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "learner: neural_bandit\nevaluation: {reward_model: {learning_rate: .inf}}"
    )
    with pytest.raises(ConfigError, match=r"evaluation\.reward_model\.learning_rate.*finite"):
        load_training_config(path)


def test_neural_bandit_config_non_finite_float_refused() -> None:
    with pytest.raises(ValueError, match="`learning_rate` must be a finite number"):
        NeuralBanditConfig(learning_rate=float("inf"))


def _number_fields() -> list[tuple[str, str, str]]:
    """(section, field, what it expects) for every integer and float field of every section."""
    out = []
    for section, info in TrainingConfig.model_fields.items():
        model = info.annotation
        if not (isinstance(model, type) and issubclass(model, StrictModel)):
            continue
        for name, field in model.model_fields.items():
            members = set(getattr(field.annotation, "__args__", (field.annotation,)))
            if float in members:
                out.append((section, name, "a number"))
            elif int in members:
                out.append((section, name, "an integer"))
    return out


NUMBER_FIELDS = _number_fields()


def test_number_fields_cover_every_section() -> None:
    sections = {section for section, _, _ in NUMBER_FIELDS}
    assert sections == {"data", "reward", "neural_bandit", "vw_bandit", "policy", "evaluation"}
    assert ("neural_bandit", "epochs", "an integer") in NUMBER_FIELDS
    assert ("policy", "max_complaint_ratio", "a number") in NUMBER_FIELDS  # float | None


@pytest.mark.parametrize("value", ["true", "false"])
@pytest.mark.parametrize(("section", "name", "expected"), NUMBER_FIELDS)
def test_load_training_config_boolean_for_a_number_refused_naming_key(
    tmp_path: Path, section: str, name: str, expected: str, value: str
) -> None:
    """YAML's ``true`` would otherwise be read as 1 (``epochs: true`` trains one epoch)."""
    learner = "vw_bandit" if section == "vw_bandit" else "neural_bandit"
    if section == "data":
        path = tmp_path / "train.yaml"
        path.write_text(f"learner: {learner}\ndata: {{logs: x, {name}: {value}}}\n")
    else:
        path = _write(tmp_path, f"learner: {learner}\n{section}: {{{name}: {value}}}")
    with pytest.raises(ConfigError) as info:
        load_training_config(path)
    assert (info.value.key, info.value.reason) == (
        f"{section}.{name}",
        f"expected {expected}, got a boolean",
    )
    assert f"{section}.{name}: expected {expected}, got a boolean" in str(info.value)


def test_load_training_config_boolean_in_reward_model_override_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "learner: neural_bandit\nevaluation: {reward_model: {epochs: true}}")
    with pytest.raises(ConfigError) as info:
        load_training_config(path)
    assert info.value.reason == (
        "evaluation.reward_model.epochs: expected an integer, got a boolean"
    )


def test_load_training_config_booleans_of_boolean_fields_still_read(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "learner: neural_bandit\nneural_bandit: {pair_terms: false, decay_intercepts: false}",
    )
    assert load_training_config(path).neural_bandit.decay_intercepts is False


def test_load_training_config_number_for_a_boolean_refused_naming_key(tmp_path: Path) -> None:
    """``pair_terms: 1`` would otherwise be read as true."""
    path = _write(tmp_path, "learner: neural_bandit\nneural_bandit: {pair_terms: 1}")
    with pytest.raises(ConfigError) as info:
        load_training_config(path)
    assert (info.value.key, info.value.reason) == (
        "neural_bandit.pair_terms",
        "expected a boolean (true or false), got a number",
    )


BAD_NAMES = ["bad/name@x", "a:b", "name@alias", " ", ".", "..x"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_load_training_config_unregistrable_model_name_refused(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path, f"learner: vw_bandit\ntracking: {{registered_model: {name!r}}}")
    with pytest.raises(ConfigError) as info:
        load_training_config(path)
    assert info.value.key == "tracking.registered_model"
    assert repr(name) in info.value.reason


@pytest.mark.parametrize("name", [*BAD_NAMES, "nextbest", "next best.v2", "a..b", "x-1_2"])
def test_registered_model_name_rules_agree_with_mlflow(name: str) -> None:
    """What the config refuses is what MLflow's registry refuses (and ``@``, which a
    ``models:/<name>@<alias>`` URI would read as the alias)."""
    try:
        _validate_model_name(name)
        mlflow_refuses = False
    except MlflowException:
        mlflow_refuses = True
    ours = registered_model_name_problem(name) is not None
    assert ours == (mlflow_refuses or "@" in name)


def test_training_config_finite_defaults_still_load() -> None:
    configs = sorted((Path(__file__).resolve().parents[2] / "configs" / "training").glob("*.yaml"))
    assert len(configs) >= 2  # vw_bandit.yaml, neural_bandit.yaml ...: not an empty glob
    for path in configs:
        assert isinstance(load_training_config(path), TrainingConfig), path


def test_load_training_config_empty_tracking_uri_refused(tmp_path: Path) -> None:
    """An empty URI would make MLflow fall back to a store of its own choosing."""
    path = _write(tmp_path, "learner: neural_bandit\ntracking: {uri: ''}")
    with pytest.raises(ConfigError) as info:
        load_training_config(path)
    assert info.value.key == "tracking.uri"


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("evaluation: {seed: -1}", "evaluation.seed"),
        ("neural_bandit: {seed: 1180591620717411303424}", "neural_bandit.seed"),
        ("data: {logs: x, split_seed: -3}", "data.split_seed"),
        ("evaluation: {bootstrap: 1000000000000}", "evaluation.bootstrap"),
        ("neural_bandit: {hidden: 2000000000}", "neural_bandit.hidden"),
        ("vw_bandit: {cost_scale_cny: 1.0e-300}", "vw_bandit.cost_scale_cny"),
    ],
)
def test_out_of_range_sizes_and_seeds_are_refused_naming_the_key(
    tmp_path: Path, section: str, key: str
) -> None:
    """They crashed deep inside numpy, torch or the bootstrap (a 7 TiB allocation)."""
    path = tmp_path / "c.yaml"
    body = section if section.startswith("data:") else f"data: {{logs: x}}\n{section}"
    path.write_text(f"learner: neural_bandit\n{body}\n")
    with pytest.raises(ConfigError) as info:
        load_training_config(path)
    assert info.value.key == key


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ('tracking: {experiment: "   "}', "tracking.experiment"),
        ('tracking: {registered_model: "a b\\n"}', "tracking.registered_model"),
        ('tracking: {uri: " sqlite:///m.db"}', "tracking.uri"),
    ],
)
def test_tracking_names_with_outer_white_space_are_refused(
    tmp_path: Path, section: str, key: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"learner: neural_bandit\ndata: {{logs: x}}\n{section}\n")
    with pytest.raises(ConfigError, match="white space") as info:
        load_training_config(path)
    assert info.value.key == key


@pytest.mark.parametrize(
    ("window", "key", "reason"),
    [
        ("since: 2026-11-20 00:00:00", "data.since", "timezone"),
        ("since: 2026-11-20", "data.since", "timezone"),
        ("until: soon", "data.until", "datetime"),
        (
            "since: 2026-11-21T00:00:00+08:00, until: 2026-11-20T00:00:00+08:00",
            "data",
            "must come before until",
        ),
    ],
)
def test_load_training_config_time_window_refused_naming_key(
    tmp_path: Path, window: str, key: str, reason: str
) -> None:
    path = tmp_path / "train.yaml"
    path.write_text(f"learner: neural_bandit\ndata: {{logs: x, {window}}}\n")
    with pytest.raises(ConfigError, match=reason) as info:
        load_training_config(path)
    assert info.value.key == key


def test_load_training_config_time_window_with_zones() -> None:
    config = TrainingConfig.model_validate(
        {"learner": "neural_bandit", "data": {"logs": "x", "since": "2026-11-20T00:00:00+08:00"}}
    )
    assert (
        config.data.since is not None and config.data.since.utcoffset().total_seconds() == 8 * 3600
    )
    assert config.data.until is None


@pytest.mark.parametrize(
    ("logs", "reason"),
    [("[]", "at least one decision log"), ("[a.parquet, 3]", "path"), ("{a: b}", "path")],
)
def test_data_logs_one_or_a_list_of_paths(tmp_path: Path, logs: str, reason: str) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("learner: neural_bandit\ndata: {logs: [a.parquet, b]}\n")
    assert load_training_config(path).data.logs == [Path("a.parquet"), Path("b")]
    path.write_text(f"learner: neural_bandit\ndata: {{logs: {logs}}}\n")
    with pytest.raises(ConfigError, match=reason) as info:
        load_training_config(path)
    assert info.value.key.startswith("data.logs")
