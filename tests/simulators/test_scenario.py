"""Scenario files: the shipped ones load; each kind of bad value fails at load naming file,
dotted key and reason."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from nextbest.catalog import ActionCatalog
from nextbest.compliance import RuleEngine
from nextbest.config_loading import ConfigError
from nextbest.segments import LIFE_STAGES
from simulators.population import sample_population
from simulators.scenario import DEFAULT_SCENARIO, Scenario, load_scenario
from simulators.world import BatchSimulator

SCENARIO_FILES = sorted(DEFAULT_SCENARIO.parent.glob("*.yaml"))
Edit = Callable[[dict[str, Any]], None]


def _node(data: dict[str, Any], dotted: str) -> tuple[dict[str, Any], str]:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data[part]
    return data, last


def _set(dotted: str, value: Any) -> Edit:
    def edit(data: dict[str, Any]) -> None:
        parent, last = _node(data, dotted)
        parent[last] = value

    return edit


def _drop(dotted: str) -> Edit:
    def edit(data: dict[str, Any]) -> None:
        parent, last = _node(data, dotted)
        del parent[last]

    return edit


def _rename(dotted: str, new_name: str) -> Edit:
    def edit(data: dict[str, Any]) -> None:
        parent, last = _node(data, dotted)
        parent[new_name] = parent.pop(last)

    return edit


def _write(tmp_path: Path, edit: Edit) -> Path:
    data = yaml.safe_load(DEFAULT_SCENARIO.read_text(encoding="utf-8"))
    edit(data)
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# (edit, dotted key, reason pattern)
BAD_SCENARIOS = [
    pytest.param(_set("colour", "blue"), "colour", "unknown key", id="unknown_top_level_key"),
    pytest.param(
        _set("behaviour.fatigue.halflife", 7),
        "behaviour.fatigue.halflife",
        "unknown key",
        id="unknown_nested_key",
    ),
    pytest.param(
        _set("population.life_stages.young.colour", "red"),
        "population.life_stages.young.colour",
        "unknown key",
        id="unknown_key_in_life_stage",
    ),
    pytest.param(
        _set("population.consent_rates.sms", 1.5),
        "population.consent_rates.sms",
        "less than or equal to 1",
        id="consent_rate_above_1",
    ),
    pytest.param(
        _set("behaviour.channel_funnel.wechat.click", -0.1),
        "behaviour.channel_funnel.wechat.click",
        "greater than or equal to 0",
        id="funnel_click_negative",
    ),
    pytest.param(
        _set("behaviour.offer_need.senior.fund_sip", 1.2),
        "behaviour.offer_need.senior.fund_sip",
        "less than or equal to 1",
        id="offer_need_above_1",
    ),
    pytest.param(
        _set("behaviour.decision_rate", 2),
        "behaviour.decision_rate",
        "less than or equal to 1",
        id="decision_rate_above_1",
    ),
    pytest.param(
        _set("bank_customers", -5), "bank_customers", "greater than 0", id="negative_size"
    ),
    pytest.param(
        _set("population.life_stages.middle.aum_median_cny", 0),
        "population.life_stages.middle.aum_median_cny",
        "greater than 0",
        id="zero_aum_median",
    ),
    pytest.param(
        _set("behaviour.fatigue.half_life_days", -7),
        "behaviour.fatigue.half_life_days",
        "greater than 0",
        id="negative_half_life",
    ),
    pytest.param(
        _set("population.life_stages.young.share", 0.30),
        "population.life_stages",
        "shares must sum to 1, got 0.96",
        id="life_stage_shares_not_1",
    ),
    pytest.param(
        _set("population.income_band_shares.high", 0.25),
        "population.income_band_shares",
        "shares must sum to 1, got 1.05",
        id="income_band_shares_not_1",
    ),
    pytest.param(
        _drop("population.income_band_shares.very_high"),
        "population.income_band_shares",
        r"missing income band \['very_high'\]",
        id="income_band_missing",
    ),
    pytest.param(
        _rename("population.lifecycle_shares.decline", "declining"),
        "population.lifecycle_shares",
        "unknown lifecycle stage 'declining'",
        id="unknown_lifecycle_stage",
    ),
    pytest.param(
        _set("population.risk_tolerance_shares.middle", [0.25, 0.25, 0.25, 0.25]),
        "population.risk_tolerance_shares",
        r"middle: needs 5 shares \(C1..C5\), got 4",
        id="risk_tolerance_4_shares",
    ),
    pytest.param(
        _set("population.risk_tolerance_shares.senior", [0.5, 0.5, 0.2, 0.0, 0.0]),
        "population.risk_tolerance_shares",
        "senior: shares must sum to 1, got 1.2",
        id="risk_tolerance_not_1",
    ),
    pytest.param(
        _set("population.consent_rates.fax", 0.5),
        "population.consent_rates",
        "unknown channel 'fax'",
        id="unknown_channel_in_consent_rates",
    ),
    pytest.param(
        _drop("behaviour.channel_funnel.sms"),
        "behaviour.channel_funnel",
        r"missing channel\(s\) \['sms'\]",
        id="missing_channel_in_funnel",
    ),
    pytest.param(
        _drop("behaviour.complaint.base_rate.branch_invite"),
        "behaviour.complaint.base_rate",
        r"missing channel\(s\) \['branch_invite'\]",
        id="missing_channel_in_complaint_rate",
    ),
    pytest.param(
        _set("behaviour.offer_need.young.bitcoin", 0.1),
        "behaviour.offer_need",
        "young: unknown offer 'bitcoin'",
        id="unknown_offer_in_offer_need",
    ),
    pytest.param(
        _drop("behaviour.channel_affinity.senior.wechat"),
        "behaviour.channel_affinity",
        r"senior: missing channel\(s\) \['wechat'\]",
        id="missing_channel_in_affinity",
    ),
    pytest.param(
        _set("population.holding_rates.bitcoin", 0.1),
        "population.holding_rates",
        "unknown offer 'bitcoin'",
        id="unknown_offer_in_holdings",
    ),
    pytest.param(
        _set("behaviour.human_channel_boost.crypto", 2.0),
        "behaviour.human_channel_boost",
        "unknown offer family 'crypto'",
        id="unknown_family_in_human_boost",
    ),
    pytest.param(
        _set("behaviour.adoption.app_open_factor", [0.0, 0.5, 1.0]),
        "behaviour.adoption.app_open_factor.3",
        "Field required",
        id="adoption_factor_3_stages",
    ),
    pytest.param(
        _set("behaviour.adoption.activation_need_factor", [1.5, -2.0, 0.7, 0.2]),
        "behaviour.adoption.activation_need_factor.1",
        "greater than or equal to 0",
        id="adoption_factor_negative",
    ),
    pytest.param(
        _set("calibration.monthly_churn", [0.03, 0.005]),
        "calibration",
        "monthly_churn: lower bound 0.03 is above upper bound 0.005",
        id="calibration_lower_above_upper",
    ),
    pytest.param(
        _set("behaviour.decision_hours", [22, 8]),
        "behaviour.decision_hours",
        r"must satisfy 0 <= from < to <= 24, got \[22, 8\]",
        id="decision_hours_wrapping",
    ),
    pytest.param(
        _set("behaviour.decision_hours", [8, 25]),
        "behaviour.decision_hours",
        r"must satisfy 0 <= from < to <= 24, got \[8, 25\]",
        id="decision_hours_past_midnight",
    ),
    pytest.param(
        _set("population.life_stages.senior.age", [85, 55]),
        "population.life_stages.senior.age",
        r"age range must satisfy 0 <= from < to <= 121, got \[85, 55\]",
        id="age_range_reversed",
    ),
    pytest.param(
        _set("population.timezone", "Mars/Olympus"),
        "population.timezone",
        "unknown time zone 'Mars/Olympus'",
        id="unknown_time_zone",
    ),
    pytest.param(
        _drop("behaviour.churn.monthly_base.growth"),
        "behaviour.churn.monthly_base",
        "needs exactly the lifecycle stages",
        id="churn_missing_lifecycle_stage",
    ),
    pytest.param(_drop("reward"), "reward", "Field required", id="missing_section"),
    pytest.param(_set("name", ""), "name", "at least 1 character", id="empty_name"),
]


def test_load_scenario_default_values(catalog: ActionCatalog, scenario: Scenario) -> None:
    assert scenario.name == "retail_bank"
    assert scenario.bank_customers == 1_000_000
    assert sum(s.share for s in scenario.population.life_stages.values()) == pytest.approx(1.0)
    assert set(scenario.population.consent_rates) == set(catalog.channel_names)
    assert set(scenario.behaviour.channel_funnel) == set(catalog.channel_names)
    assert scenario.behaviour.decision_hours == (8, 22)
    for name in ("conversion_per_contact", "complaints_per_contact", "monthly_churn"):
        lo, hi = getattr(scenario.calibration, name)
        assert 0.0 <= lo <= hi <= 1.0


@pytest.mark.parametrize("path", SCENARIO_FILES, ids=[p.stem for p in SCENARIO_FILES])
def test_load_scenario_every_shipped_file(
    catalog: ActionCatalog, engine: RuleEngine, path: Path
) -> None:
    world = load_scenario(path, catalog)
    assert world.name == path.stem
    sim = BatchSimulator(world, catalog, engine, 50, seed=0)
    assert sim.n == 50


@pytest.mark.parametrize(("edit", "key", "reason"), BAD_SCENARIOS)
def test_load_scenario_bad_file_raises_config_error(
    catalog: ActionCatalog, tmp_path: Path, edit: Edit, key: str, reason: str
) -> None:
    path = _write(tmp_path, edit)
    with pytest.raises(ConfigError, match=reason) as info:
        load_scenario(path, catalog)
    assert info.value.path == str(path)
    assert info.value.key == key
    assert str(info.value).startswith(f"{path}: {key}: ")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        pytest.param("name: x\npopulation: {life_stages: [\n", "malformed YAML at line", id="yaml"),
        pytest.param("", "file is empty", id="empty"),
        pytest.param("- retail_bank\n", "top level must be a mapping, got list", id="list"),
    ],
)
def test_load_scenario_unparsable_file_raises_config_error(
    catalog: ActionCatalog, tmp_path: Path, text: str, reason: str
) -> None:
    path = tmp_path / "scenario.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=reason) as info:
        load_scenario(path, catalog)
    assert (info.value.path, info.value.key) == (str(path), "")


def test_load_scenario_missing_file_raises(catalog: ActionCatalog, tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match="file not found") as info:
        load_scenario(path, catalog)
    assert (info.value.path, info.value.key) == (str(path), "")


def test_load_scenario_error_lists_every_mistake(catalog: ActionCatalog, tmp_path: Path) -> None:
    def two_mistakes(data: dict[str, Any]) -> None:
        data["population"]["consent_rates"]["sms"] = 1.5
        data["behaviour"]["decision_rate"] = -1

    with pytest.raises(ConfigError) as info:
        load_scenario(_write(tmp_path, two_mistakes), catalog)
    assert info.value.key == "population.consent_rates.sms"
    assert "(also: behaviour.decision_rate: " in info.value.reason


def test_load_scenario_float_rounded_shares_load_and_sample(
    catalog: ActionCatalog, tmp_path: Path
) -> None:
    shares = {"low": 0.3, "middle": 0.3, "high": 0.3, "very_high": 0.1}
    assert sum(shares.values()) != 1.0  # float rounding, well inside the tolerance
    world = load_scenario(_write(tmp_path, _set("population.income_band_shares", shares)), catalog)
    pop = sample_population(world, catalog, 1000, np.random.default_rng(0))
    assert np.bincount(pop.income_band, minlength=4)[3] > 0


def test_sample_population_shares_accepted_at_load_sample(
    catalog: ActionCatalog, tmp_path: Path
) -> None:
    path = _write(tmp_path, _set("population.income_band_shares.low", 0.3000005))
    world = load_scenario(path, catalog)  # accepted: |sum - 1| = 5e-7 <= 1e-6
    pop = sample_population(world, catalog, 100, np.random.default_rng(0))
    assert pop.n == 100


def test_load_scenario_mortgage_views_unknown_stage_raises(
    catalog: ActionCatalog, tmp_path: Path
) -> None:
    path = _write(tmp_path, _rename("behaviour.events.mortgage_views_per_day.young", "yung"))
    with pytest.raises(ConfigError, match="yung") as info:
        load_scenario(path, catalog)
    assert info.value.key == "behaviour.events.mortgage_views_per_day"


def test_load_scenario_aum_gain_unknown_family_raises(
    catalog: ActionCatalog, tmp_path: Path
) -> None:
    path = _write(tmp_path, _rename("reward.aum_gain_cny.investment", "investmnet"))
    with pytest.raises(ConfigError, match="investmnet") as info:
        load_scenario(path, catalog)
    assert info.value.key.startswith("reward.aum_gain_cny")


@pytest.mark.parametrize("stage", LIFE_STAGES)
def test_load_scenario_life_stage_missing_raises(
    catalog: ActionCatalog, tmp_path: Path, stage: str
) -> None:
    with pytest.raises(ConfigError, match=rf"missing life stage \['{stage}'\]") as info:
        load_scenario(_write(tmp_path, _drop(f"population.life_stages.{stage}")), catalog)
    assert info.value.key == "population.life_stages"
