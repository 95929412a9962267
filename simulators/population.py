"""The simulated population: observable state (what a bank knows) and latent traits.

All arrays are indexed by customer (first axis ``N``); per-channel arrays are ``(N, C)`` and
per-offer arrays ``(N, O)`` in catalogue order. Sampling is vectorised and draws only from the
``numpy.random.Generator`` it is given.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from nextbest.catalog import ActionCatalog
from nextbest.context import INCOME_BANDS, LIFECYCLE_STAGES
from nextbest.segments import LIFE_STAGES
from nextbest.send_schedule import LONGEST_WAIT
from simulators.scenario import Scenario, SignalSpec

CONTACT_WINDOW_DAYS = 30
DAYS_AHEAD = LONGEST_WAIT.days
"""How many days after its decision a contact may go out at the latest
(:data:`nextbest.send_schedule.LONGEST_WAIT`)."""
CONTACT_RING_DAYS = CONTACT_WINDOW_DAYS + DAYS_AHEAD + 1
"""Days of the contact ring: the 30 of the longest window, the day before them (a contact of
that day still counts until the hour it went out, as the service's rolling windows count
it), and the days a scheduled contact's send day may lie ahead of today (its slot must not
be the one being recycled)."""


@dataclass
class Population:
    """State of N customers. Mutated in place by the dynamics, one day at a time."""

    # observable
    age: np.ndarray  # (N,) float32
    aum_cny: np.ndarray  # (N,) float64
    income_band: np.ndarray  # (N,) int8
    risk_tolerance: np.ndarray  # (N,) int8, 0 = never assessed
    risk_assessment_age_days: np.ndarray  # (N,) float32, inf = never
    lifecycle_stage: np.ndarray  # (N,) int8
    tenure_months: np.ndarray  # (N,) float32
    app_logins_30d: np.ndarray  # (N,) float32
    litigation: np.ndarray  # (N,) bool
    dishonest_debtor: np.ndarray  # (N,) bool
    opted_out_all: np.ndarray  # (N,) bool
    days_since_complaint: np.ndarray  # (N,) float32, inf = never
    last_contact_hour: np.ndarray  # (N,) float64, simulation hour the last contact goes out
    # at the latest (its sending window's end: may lie ahead), -inf
    mortgage_page_views_7d: np.ndarray  # (N,) float32
    offer_views_30d: np.ndarray  # (N, O) float32 product-page views per offer, last 30 days
    usual_login_hour: np.ndarray  # (N,) int8 usual local app-login hour, -1 without logins
    days_to_product_maturity: np.ndarray  # (N,) float32, inf = nothing maturing
    days_since_last_login: np.ndarray  # (N,) float32, inf = never
    consent: np.ndarray  # (N, C) bool
    opt_out: np.ndarray  # (N, C) bool
    holds: np.ndarray  # (N, O) bool
    contact_ring: np.ndarray  # (CONTACT_RING_DAYS, N, C) uint8: contacts by the day they go out
    send_hour_ring: np.ndarray  # (N, CONTACT_RING_DAYS) uint8: by the ring's days, the latest
    # hour of the day one of the customer's contacts goes out at the latest (0 without one)
    contacts_7d: np.ndarray  # (N, C) int16
    contacts_30d: np.ndarray  # (N, C) int16
    # latent
    life_stage: np.ndarray  # (N,) int8 index into LIFE_STAGES (fixed over a 90-day run)
    affinity: np.ndarray  # (N, C) float32 channel affinity multiplier
    need: np.ndarray  # (N, O) float32 conversion probability given a click, before boosts
    preferred_hour: np.ndarray  # (N,) int8 local hour the customer reads messages
    fatigue_sensitivity: np.ndarray  # (N,) float32
    fatigue: np.ndarray  # (N,) float32, decays with the configured half-life
    days_since_conversion: np.ndarray  # (N,) float32, inf = never
    active: np.ndarray  # (N,) bool, False once churned

    @property
    def n(self) -> int:
        return len(self.age)

    def copy(self) -> Population:
        """Deep copy (ground-truth look-ahead without touching the live state)."""
        return Population(**{f.name: getattr(self, f.name).copy() for f in fields(self)})


def _probabilities(values: list[float]) -> np.ndarray:
    """Shares as probabilities; the config allows a rounding slack numpy's sampler does not."""
    p = np.asarray(values, np.float64)
    return p / p.sum()


def sample_population(
    scenario: Scenario, catalog: ActionCatalog, n: int, rng: np.random.Generator
) -> Population:
    """Draw ``n`` customers from the scenario's population.

    Correlations built in: AUM, app use, risk tolerance, channel affinity, needs and reading
    hour all depend on the life stage (seniors hold more and log in less; the young are
    app-first and read in the evening); AUM also rises with income band and tenure.
    """
    if n < 0:
        raise ValueError(f"n must not be negative, got {n}")
    pop = scenario.population
    beh = scenario.behaviour
    c, o = catalog.n_channels, catalog.n_offers
    stage_specs = [pop.life_stages[s] for s in LIFE_STAGES]
    stage = rng.choice(
        len(LIFE_STAGES), size=n, p=_probabilities([s.share for s in stage_specs])
    ).astype(np.int8)
    lo = np.array([s.age[0] for s in stage_specs], np.float64)[stage]
    hi = np.array([s.age[1] for s in stage_specs], np.float64)[stage]
    age = np.floor(rng.uniform(lo, hi)).astype(np.float32)

    income = rng.choice(
        len(INCOME_BANDS),
        size=n,
        p=_probabilities([pop.income_band_shares[b] for b in INCOME_BANDS]),
    ).astype(np.int8)
    lifecycle = rng.choice(
        len(LIFECYCLE_STAGES),
        size=n,
        p=_probabilities([pop.lifecycle_shares[s] for s in LIFECYCLE_STAGES]),
    ).astype(np.int8)
    tenure_lo = np.array([0, 6, 24, 12], np.float32)[lifecycle]
    tenure_hi = np.array([6, 24, 180, 180], np.float32)[lifecycle]
    tenure = rng.uniform(tenure_lo, tenure_hi).astype(np.float32)

    median = np.array([s.aum_median_cny for s in stage_specs])[stage]
    sigma = np.array([s.aum_sigma for s in stage_specs])[stage]
    income_factor = np.array([0.5, 1.0, 2.2, 5.0])[income]
    aum = median * income_factor * np.exp(sigma * rng.standard_normal(n))
    aum = np.round(aum, 2)

    logins_mean = np.array([s.app_logins_mean for s in stage_specs], np.float32)[stage]
    logins = rng.poisson(logins_mean * np.where(lifecycle == 3, 0.2, 1.0)).astype(np.float32)
    since_login = np.where(
        logins > 0,
        rng.uniform(0, 30.0 / np.maximum(logins, 1)),
        np.where(rng.random(n) < 0.5, rng.uniform(30, 400, n), np.inf),
    ).astype(np.float32)

    assessed = rng.random(n) < pop.assessed_share
    shares = np.array([_probabilities(list(pop.risk_tolerance_shares[s])) for s in LIFE_STAGES])
    cum = np.cumsum(shares, axis=1)[stage]
    tolerance = (rng.random(n)[:, None] > cum).sum(axis=1) + 1
    tolerance = np.where(assessed, np.minimum(tolerance, 5), 0).astype(np.int8)
    assessment_age = np.where(
        assessed, rng.uniform(0, pop.assessment_age_days_max, n), np.inf
    ).astype(np.float32)

    consent = rng.random((n, c)) < np.array([pop.consent_rates[ch] for ch in catalog.channel_names])
    holding = np.array([pop.holding_rates.get(of, 0.0) for of in catalog.offer_names])
    holds = rng.random((n, o)) < holding
    maturing = rng.random(n) < pop.maturing_product_rate
    maturity = np.where(maturing, rng.integers(0, 60, n), np.inf).astype(np.float32)

    affinity_mean = np.array(
        [[beh.channel_affinity[s][ch] for ch in catalog.channel_names] for s in LIFE_STAGES],
        np.float32,
    )[stage]
    affinity = affinity_mean * np.exp(
        beh.affinity_spread * rng.standard_normal((n, c)) - beh.affinity_spread**2 / 2
    ).astype(np.float32)
    need_mean = np.array(
        [[beh.offer_need[s][of] for of in catalog.offer_names] for s in LIFE_STAGES], np.float32
    )[stage]
    need = np.clip(
        need_mean * np.exp(beh.need_spread * rng.standard_normal((n, o)) - beh.need_spread**2 / 2),
        0.0,
        0.95,
    ).astype(np.float32)
    hour_centre = np.array([20.0, 12.0, 9.5], np.float32)[stage]
    hour_spread = np.array([1.5, 5.0, 1.5], np.float32)[stage]
    preferred = np.clip(np.round(hour_centre + hour_spread * rng.standard_normal(n)), 7, 22)
    sensitivity = np.exp(
        beh.fatigue.sensitivity_spread * rng.standard_normal(n)
        - beh.fatigue.sensitivity_spread**2 / 2
    ).astype(np.float32)
    views, login_hour = _observed_signals(beh.signals, need, need_mean, logins, preferred, rng)

    return Population(
        age=age,
        aum_cny=aum,
        income_band=income,
        risk_tolerance=tolerance,
        risk_assessment_age_days=assessment_age,
        lifecycle_stage=lifecycle,
        tenure_months=tenure,
        app_logins_30d=logins,
        litigation=rng.random(n) < pop.litigation_rate,
        dishonest_debtor=rng.random(n) < pop.dishonest_debtor_rate,
        opted_out_all=np.zeros(n, bool),
        days_since_complaint=np.full(n, np.inf, np.float32),
        last_contact_hour=np.full(n, -np.inf),
        mortgage_page_views_7d=np.zeros(n, np.float32),
        offer_views_30d=views,
        usual_login_hour=login_hour,
        days_to_product_maturity=maturity,
        days_since_last_login=since_login,
        consent=consent,
        opt_out=np.zeros((n, c), bool),
        holds=holds,
        contact_ring=np.zeros((CONTACT_RING_DAYS, n, c), np.uint8),
        send_hour_ring=np.zeros((n, CONTACT_RING_DAYS), np.uint8),
        contacts_7d=np.zeros((n, c), np.int16),
        contacts_30d=np.zeros((n, c), np.int16),
        life_stage=stage,
        affinity=affinity,
        need=need,
        preferred_hour=preferred.astype(np.int8),
        fatigue_sensitivity=sensitivity,
        fatigue=np.zeros(n, np.float32),
        days_since_conversion=np.full(n, np.inf, np.float32),
        active=np.ones(n, bool),
    )


def _observed_signals(
    signals: SignalSpec,
    need: np.ndarray,
    need_mean: np.ndarray,
    logins: np.ndarray,
    preferred: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """What analytics record of the latent need and reading hour.

    Product-page views per offer are Poisson with a mean proportional to the customer's need
    relative to their life stage's mean need (customers browse what they want); customers
    without app logins browse less. The usual app-login hour is the reading hour plus noise,
    unknown (-1) for customers who never log in.

    Returns
    -------
    views : float32 ``(N, O)``
    login_hour : int8 ``(N,)``
    """
    app_user = logins > 0
    rate = signals.offer_views_per_30d * need / np.maximum(need_mean, 1e-9)
    rate = rate * np.where(app_user, 1.0, signals.offline_view_factor)[:, None]
    views = rng.poisson(rate).astype(np.float32)
    noisy = np.round(preferred + signals.login_hour_noise_sd * rng.standard_normal(len(logins)))
    login_hour = np.where(app_user, np.clip(noisy, 0, 23), -1).astype(np.int8)
    return views, login_hour
