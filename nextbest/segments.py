"""Customer segments from the domain brief, as vectorised functions of context columns.

Thresholds are the brief's: value tier by AUM (HNW >= 6,000,000 CNY; potential >= 1,000,000),
life stage by age (young < 35, middle 35-55, senior 55+), digital activity by app logins a
month (high >= 4, low < 2).
"""

from __future__ import annotations

import numpy as np

VALUE_TIERS = ("mass", "potential", "hnw")
VALUE_TIER_BOUNDS_CNY = (1_000_000.0, 6_000_000.0)
LIFE_STAGES = ("young", "middle", "senior")
LIFE_STAGE_BOUNDS_AGE = (35.0, 55.0)
DIGITAL_ACTIVITY = ("low", "medium", "high")
DIGITAL_ACTIVITY_BOUNDS_LOGINS = (2.0, 4.0)


def value_tier(aum_cny: np.ndarray) -> np.ndarray:
    """Index into :data:`VALUE_TIERS`, shape ``(N,)`` int8, from AUM in CNY ``(N,)``."""
    return np.searchsorted(VALUE_TIER_BOUNDS_CNY, aum_cny, side="right").astype(np.int8)


def life_stage(age: np.ndarray) -> np.ndarray:
    """Index into :data:`LIFE_STAGES`, shape ``(N,)`` int8, from age in years ``(N,)``."""
    return np.searchsorted(LIFE_STAGE_BOUNDS_AGE, age, side="right").astype(np.int8)


def digital_activity(app_logins_30d: np.ndarray) -> np.ndarray:
    """Index into :data:`DIGITAL_ACTIVITY`, shape ``(N,)`` int8, from monthly app logins."""
    return np.searchsorted(DIGITAL_ACTIVITY_BOUNDS_LOGINS, app_logins_30d, side="right").astype(
        np.int8
    )


BEHAVIOURAL_SEGMENTS = ("potential", "active", "dormant")
DORMANT_AFTER_DAYS = 60.0
"""No app login for 2 months: the brief's churn-warning trigger, used here for dormancy."""


def behavioural_segment(
    aum_cny: np.ndarray, days_since_last_login: np.ndarray, lifecycle_stage: np.ndarray
) -> np.ndarray:
    """Index into :data:`BEHAVIOURAL_SEGMENTS`, shape ``(N,)`` int8.

    Dormant: no login for more than :data:`DORMANT_AFTER_DAYS` (60) days or in the decline
    lifecycle stage (index 3); potential: AUM of 1,000,000 CNY or more (asset growth);
    active: everyone else (cross-sell).
    """
    dormant = (days_since_last_login > DORMANT_AFTER_DAYS) | (lifecycle_stage == 3)
    potential = aum_cny >= VALUE_TIER_BOUNDS_CNY[0]
    return np.where(dormant, 2, np.where(potential, 0, 1)).astype(np.int8)
