"""Cross-fitted reward estimates for DM and DR: no decision is scored by a model that saw its
customer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

import training.train as train_module
from training.config import EvaluationSpec, TrainingConfig
from training.logged_data import LoggedBandit


def _log(n: int, n_actions: int = 5) -> LoggedBandit:
    rng = np.random.default_rng(0)
    return LoggedBandit(
        context=rng.normal(size=(n, 3)).astype(np.float32),
        action=rng.integers(0, n_actions, n),
        reward=rng.normal(size=n),
        pscore=np.full(n, 1.0 / n_actions),
        candidates=np.ones((n, n_actions), bool),
        logging_dist=None,
        feature_spec_version="t",
        ruleset_version="t",
        catalog_version="t",
        customer_key=np.array([f"cust_{i % 40}" for i in range(n)], object),
    )


@dataclass
class _Recorder:
    seen: list[set[str]]

    def __call__(self, config, part: LoggedBandit, catalog, on_epoch=None, acting=True):
        assert not acting
        self.seen.append(set(part.customer_key))
        customers = set(part.customer_key)

        def scores(context: np.ndarray) -> np.ndarray:
            return np.full((len(context), 5), float(len(customers)))

        return train_module.FittedModel("fake", scores, lambda p, s: p, [], {})


def _config(folds: int) -> TrainingConfig:
    return TrainingConfig.model_validate(
        {
            "learner": "neural_bandit",
            "data": {"logs": "unused"},
            "evaluation": {"crossfit_folds": folds},
        }
    )


def _crossfit(config: TrainingConfig, log: LoggedBandit, scores: np.ndarray) -> np.ndarray:
    """``crossfit_rewards`` with the folds ``run_training`` computes before training."""
    fold = train_module.crossfit_folds(config, log)
    return train_module.crossfit_rewards(config, log, None, scores, fold)


def test_crossfit_rewards_never_score_a_customer_seen_in_fitting(monkeypatch) -> None:
    log = _log(400)
    recorder = _Recorder([])
    monkeypatch.setattr(train_module, "fit_model", recorder)
    out = _crossfit(_config(3), log, np.zeros((400, 5)))
    assert len(recorder.seen) == 3
    fold = train_module._fold_of(log, 3, 0)
    for k, seen in enumerate(recorder.seen):
        scored = set(log.customer_key[fold == k])
        assert scored and not (scored & seen)
        np.testing.assert_array_equal(out[fold == k], len(seen))
    # every customer is in exactly one fold
    for key in set(log.customer_key):
        assert len(set(fold[log.customer_key == key])) == 1


def test_crossfit_rewards_off_uses_policy_scores() -> None:
    scores = np.arange(20, dtype=np.float32).reshape(4, 5)
    assert train_module.crossfit_folds(_config(0), _log(4)) is None
    out = _crossfit(_config(0), _log(4), scores)
    np.testing.assert_array_equal(out, scores)
    assert out.dtype == np.float64


def test_crossfit_one_fold_refused() -> None:
    with pytest.raises(ValueError, match="crossfit_folds"):
        EvaluationSpec(crossfit_folds=1)


def test_crossfit_reward_model_takes_the_evaluation_overrides(monkeypatch) -> None:
    seen: list[TrainingConfig] = []

    def record(config, part, catalog, on_epoch=None, acting=True):
        seen.append(config)
        return train_module.FittedModel(
            "fake", lambda c: np.zeros((len(c), 5)), lambda p, s: p, [], {}
        )

    monkeypatch.setattr(train_module, "fit_model", record)
    config = TrainingConfig.model_validate(
        {
            "learner": "neural_bandit",
            "data": {"logs": "unused"},
            "neural_bandit": {"target": "outcomes", "init_bias": True, "train_action_bias": False},
            "evaluation": {"reward_model": {"init_bias": False, "train_action_bias": True}},
        }
    )
    _crossfit(config, _log(400), np.zeros((400, 5)))

    assert len(seen) == 2
    assert all(not c.neural_bandit.init_bias and c.neural_bandit.train_action_bias for c in seen)
    assert all(c.neural_bandit.target == "outcomes" for c in seen)  # the rest kept
    assert config.neural_bandit.init_bias  # the policy's own settings untouched


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            {"reward_model": {"hiden": 8}},
            r"evaluation\.reward_model\.hiden: unknown key",
        ),
        ({"reward_model": {"init_bias": True}}, "need target 'outcomes'"),
        ({"reward_model": {"epochs": 0}}, r"evaluation\.reward_model\.epochs: Input should be"),
        (
            {"reward_model": {"hidden": 8}, "crossfit_folds": 0},
            "reward_model needs evaluation.crossfit_folds >= 2",
        ),
    ],
)
def test_evaluation_reward_model_bad_overrides_refused(section, message) -> None:
    with pytest.raises(ValueError, match=message):
        TrainingConfig.model_validate(
            {"learner": "neural_bandit", "data": {"logs": "unused"}, "evaluation": section}
        )


def test_evaluation_reward_model_for_vw_refused() -> None:
    with pytest.raises(ValueError, match="neural_bandit only"):
        TrainingConfig.model_validate(
            {
                "learner": "vw_bandit",
                "data": {"logs": "unused"},
                "evaluation": {"reward_model": {"hidden": 8}},
            }
        )
