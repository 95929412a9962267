"""Scenario configs (``configs/scenarios/*.yaml``): the population and its behaviour.

Validated once at load: unknown keys, probabilities outside [0, 1], negative sizes, shares
that do not sum to 1, and channel or offer names the catalogue does not have are refused with
the file, the key and the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, ValidationInfo, field_validator, model_validator

from nextbest.catalog import ActionCatalog
from nextbest.config_loading import ConfigError, StrictModel, load_model
from nextbest.context import INCOME_BANDS, LIFECYCLE_STAGES
from nextbest.segments import LIFE_STAGES

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Positive = Annotated[float, Field(gt=0.0)]
NonNegative = Annotated[float, Field(ge=0.0)]
SHARE_TOLERANCE = 1e-6
DEFAULT_SCENARIO = (
    Path(__file__).resolve().parents[1] / "configs" / "scenarios" / "retail_bank.yaml"
)


def _shares(value: dict[str, float], names: tuple[str, ...], what: str) -> dict[str, float]:
    missing = [n for n in names if n not in value]
    unknown = [n for n in value if n not in names]
    if unknown:
        raise ValueError(f"unknown {what} {unknown[0]!r}; expected {list(names)}")
    if missing:
        raise ValueError(f"missing {what} {missing}")
    _sum_to_one(list(value.values()))
    return value


def _sum_to_one(values: list[float]) -> None:
    if any(v < 0 for v in values):
        raise ValueError("shares must not be negative")
    total = sum(values)
    if abs(total - 1.0) > SHARE_TOLERANCE:
        raise ValueError(f"shares must sum to 1, got {total:.6g}")


class LifeStageSpec(StrictModel):
    share: Probability
    age: tuple[int, int]
    aum_median_cny: Positive
    aum_sigma: NonNegative
    app_logins_mean: NonNegative

    @field_validator("age")
    @classmethod
    def _age(cls, value: tuple[int, int]) -> tuple[int, int]:
        lo, hi = value
        if not 0 <= lo < hi <= 121:
            raise ValueError(f"age range must satisfy 0 <= from < to <= 121, got {list(value)}")
        return value


class PopulationSpec(StrictModel):
    life_stages: dict[str, LifeStageSpec]
    income_band_shares: dict[str, Probability]
    risk_tolerance_shares: dict[str, tuple[Probability, ...]]
    assessed_share: Probability
    assessment_age_days_max: Positive
    lifecycle_shares: dict[str, Probability]
    consent_rates: dict[str, Probability]
    litigation_rate: Probability
    dishonest_debtor_rate: Probability
    holding_rates: dict[str, Probability]
    maturing_product_rate: Probability
    timezone: str
    """IANA zone of the simulated customers (one zone per scenario)."""

    @field_validator("life_stages")
    @classmethod
    def _stages(cls, value: dict[str, LifeStageSpec]) -> dict[str, LifeStageSpec]:
        _shares({k: v.share for k, v in value.items()}, LIFE_STAGES, "life stage")
        return value

    @field_validator("income_band_shares")
    @classmethod
    def _income(cls, value: dict[str, float]) -> dict[str, float]:
        return _shares(value, INCOME_BANDS, "income band")

    @field_validator("lifecycle_shares")
    @classmethod
    def _lifecycle(cls, value: dict[str, float]) -> dict[str, float]:
        return _shares(value, LIFECYCLE_STAGES, "lifecycle stage")

    @field_validator("risk_tolerance_shares")
    @classmethod
    def _risk(cls, value: dict[str, tuple[float, ...]]) -> dict[str, tuple[float, ...]]:
        if sorted(value) != sorted(LIFE_STAGES):
            raise ValueError(f"needs exactly the life stages {list(LIFE_STAGES)}")
        for stage, shares in value.items():
            if len(shares) != 5:
                raise ValueError(f"{stage}: needs 5 shares (C1..C5), got {len(shares)}")
            try:
                _sum_to_one(list(shares))
            except ValueError as exc:
                raise ValueError(f"{stage}: {exc}") from None
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @field_validator("consent_rates")
    @classmethod
    def _consents(cls, value: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        return _known(value, info, "channels", every=True)

    @field_validator("holding_rates")
    @classmethod
    def _holdings(cls, value: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        return _known(value, info, "offers", every=False)


def _known(value: dict, info: ValidationInfo, kind: str, every: bool) -> dict:
    names = (info.context or {}).get(kind)
    if names is None:
        return value
    unknown = [k for k in value if k not in names]
    if unknown:
        raise ValueError(f"unknown {kind[:-1]} {unknown[0]!r}")
    if every:
        missing = [n for n in names if n not in value]
        if missing:
            raise ValueError(f"missing {kind[:-1]}(s) {missing}")
    return value


class FunnelSpec(StrictModel):
    deliver: Probability
    open: Probability
    click: Probability


class AdoptionSpec(StrictModel):
    """Effects of the e-channel adoption stage (never, lapsed, occasional, frequent)."""

    app_open_factor: tuple[NonNegative, NonNegative, NonNegative, NonNegative]
    activation_need_factor: tuple[NonNegative, NonNegative, NonNegative, NonNegative]


class TimingSpec(StrictModel):
    preferred_window_boost: Positive
    off_window_factor: Positive
    now_off_hours_factor: Positive


class TriggerSpec(StrictModel):
    mortgage_views_threshold: Positive
    mortgage_offer_boost: Positive
    maturity_days: Positive
    maturity_renewal_boost: Positive
    dormant_winback_boost: Positive


class FatigueSpec(StrictModel):
    per_contact: NonNegative
    half_life_days: Positive
    response_drop: NonNegative
    sensitivity_spread: NonNegative


class IncidentSpec(StrictModel):
    """Complaints or opt-outs: a per-contact base rate by channel, raised by fatigue."""

    base_rate: dict[str, Probability]
    fatigue_factor: NonNegative
    off_hours_factor: Positive = 1.0
    all_channels_share: Probability = 0.0

    @field_validator("base_rate")
    @classmethod
    def _channels(cls, value: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        return _known(value, info, "channels", every=True)


class ChurnSpec(StrictModel):
    monthly_base: dict[str, Probability]
    neglect_days: Positive
    neglect_factor: Positive
    fatigue_factor: NonNegative
    complaint_factor: Positive
    conversion_factor: Positive

    @field_validator("monthly_base")
    @classmethod
    def _stages(cls, value: dict[str, float]) -> dict[str, float]:
        if sorted(value) != sorted(LIFECYCLE_STAGES):
            raise ValueError(f"needs exactly the lifecycle stages {list(LIFECYCLE_STAGES)}")
        return value


class EventSpec(StrictModel):
    mortgage_views_per_day: dict[str, NonNegative]
    new_maturity_per_day: Probability

    @field_validator("mortgage_views_per_day")
    @classmethod
    def _stages(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = [k for k in value if k not in LIFE_STAGES]
        if unknown:
            raise ValueError(f"unknown life stage {unknown[0]!r}; expected {list(LIFE_STAGES)}")
        if sorted(value) != sorted(LIFE_STAGES):
            raise ValueError(f"needs exactly the life stages {list(LIFE_STAGES)}")
        return value


class SignalSpec(StrictModel):
    """Observable traces of latent traits, as a bank's app and web analytics record them."""

    offer_views_per_30d: NonNegative
    """Mean product-page views per offer over 30 days at average need (views scale with need)."""
    offline_view_factor: Probability
    """View-rate multiplier for customers without app logins (web and branch kiosks only)."""
    login_hour_noise_sd: NonNegative
    """Hours of noise between the usual app-login hour and the hour messages get read."""


class BehaviourSpec(StrictModel):
    channel_affinity: dict[str, dict[str, Positive]]
    affinity_spread: NonNegative
    offer_need: dict[str, dict[str, Probability]]
    need_spread: NonNegative
    held_need_factor: Probability
    channel_funnel: dict[str, FunnelSpec]
    human_channel_boost: dict[str, Positive]
    app_push_needs_app_user: bool
    adoption: AdoptionSpec
    timing: TimingSpec
    triggers: TriggerSpec
    fatigue: FatigueSpec
    complaint: IncidentSpec
    opt_out: IncidentSpec
    churn: ChurnSpec
    events: EventSpec
    signals: SignalSpec
    decision_rate: Probability
    decision_hours: tuple[int, int]

    @field_validator("channel_affinity", "offer_need")
    @classmethod
    def _by_stage(cls, value: dict[str, dict[str, float]], info: ValidationInfo) -> dict:
        if sorted(value) != sorted(LIFE_STAGES):
            raise ValueError(f"needs exactly the life stages {list(LIFE_STAGES)}")
        kind = "channels" if info.field_name == "channel_affinity" else "offers"
        for stage, table in value.items():
            try:
                _known(table, info, kind, every=True)
            except ValueError as exc:
                raise ValueError(f"{stage}: {exc}") from None
        return value

    @field_validator("channel_funnel")
    @classmethod
    def _funnel(cls, value: dict[str, FunnelSpec], info: ValidationInfo) -> dict:
        return _known(value, info, "channels", every=True)

    @field_validator("decision_hours")
    @classmethod
    def _hours(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= value[0] < value[1] <= 24:
            raise ValueError(f"must satisfy 0 <= from < to <= 24, got {list(value)}")
        return value


class RewardSpec(StrictModel):
    complaint_penalty_cny: NonNegative
    aum_gain_cny: dict[str, NonNegative]


class CalibrationSpec(StrictModel):
    conversion_per_contact: tuple[Probability, Probability]
    complaints_per_contact: tuple[Probability, Probability]
    monthly_churn: tuple[Probability, Probability]

    @model_validator(mode="after")
    def _ordered(self) -> CalibrationSpec:
        for name in ("conversion_per_contact", "complaints_per_contact", "monthly_churn"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name}: lower bound {lo} is above upper bound {hi}")
        return self


class Scenario(StrictModel):
    """A simulated world: who the customers are and how they respond."""

    name: str = Field(min_length=1)
    description: str = ""
    bank_customers: int = Field(gt=0)
    population: PopulationSpec
    behaviour: BehaviourSpec
    reward: RewardSpec
    calibration: CalibrationSpec


def load_scenario(path: str | Path, catalog: ActionCatalog) -> Scenario:
    """Load a scenario, checking channel and offer names against ``catalog``.

    Raises
    ------
    ConfigError
        With the file, the dotted key and the reason.
    """
    context = {"channels": set(catalog.channel_names), "offers": set(catalog.offer_names)}
    scenario = load_model(path, Scenario, context=context)
    families = {o.family for o in catalog.offers}
    for key, table in (
        ("behaviour.human_channel_boost", scenario.behaviour.human_channel_boost),
        ("reward.aum_gain_cny", scenario.reward.aum_gain_cny),
    ):
        unknown = [f for f in table if f not in families]
        if unknown:
            raise ConfigError(
                path, key, f"unknown offer family {unknown[0]!r}; known: {sorted(families)}"
            )
    return scenario
