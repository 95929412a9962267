"""Random context batches that exercise every compliance rule near its edges.

For demos, benchmarks and property tests of the domain core. This is not a realistic
population (no correlations, no latent traits): that is ``simulators/``.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np

from nextbest.catalog import ActionCatalog
from nextbest.context import INCOME_BANDS, LIFECYCLE_STAGES, ContextBatch


def midday_timezone(now: datetime | None = None) -> str:
    """A time zone where it is between 12:00 and 13:00 at ``now`` (default: now), so that the
    rules on the local hour (quiet hours 21:00-08:00 block SMS and calls) do not make a test's
    or a benchmark's customers depend on when it runs. ``Etc/GMT-N`` is UTC+N."""
    offset = 12 - (now or datetime.now(UTC)).astimezone(UTC).hour  # -11 .. 12
    return f"Etc/GMT{-offset:+d}" if offset else "Etc/UTC"


def random_context_batch(catalog: ActionCatalog, n: int, rng: np.random.Generator) -> ContextBatch:
    """``n`` random customers; roughly half of them hit each contact-pressure edge.

    Parameters
    ----------
    catalog : ActionCatalog
    n : int
        Number of customers.
    rng : numpy.random.Generator
        The only source of randomness.
    """
    c, o = catalog.n_channels, catalog.n_offers
    contacts_30d = rng.poisson(0.7, (n, c)).astype(np.float32)
    contacts_7d = np.minimum(rng.poisson(0.3, (n, c)), contacts_30d).astype(np.float32)
    assessed = rng.random(n) < 0.8
    risk = np.where(assessed, rng.integers(1, 6, n), 0)
    assessment_age = np.where(assessed, rng.integers(0, 500, n), np.inf)
    aum = np.exp(rng.uniform(np.log(1_000), np.log(20_000_000), n))
    aum[rng.random(n) < 0.03] = 0.0
    aum[rng.random(n) < 0.03] = 6_000_000.0
    return ContextBatch.from_columns(
        catalog,
        age=rng.integers(18, 90, n),
        aum_cny=aum,
        income_band=rng.integers(0, len(INCOME_BANDS), n),
        risk_tolerance=risk,
        risk_assessment_age_days=assessment_age,
        lifecycle_stage=rng.integers(0, len(LIFECYCLE_STAGES), n),
        tenure_months=rng.integers(0, 240, n),
        app_logins_30d=rng.poisson(3.0, n),
        litigation=rng.random(n) < 0.03,
        dishonest_debtor=rng.random(n) < 0.03,
        opted_out_all=rng.random(n) < 0.02,
        days_since_complaint=np.where(rng.random(n) < 0.1, rng.uniform(0, 90, n), np.inf),
        hours_since_last_contact=np.where(rng.random(n) < 0.7, rng.uniform(0, 24 * 40, n), np.inf),
        local_hour=rng.integers(0, 24, n),
        local_weekday=rng.integers(0, 7, n),
        mortgage_page_views_7d=rng.poisson(0.3, n),
        days_to_product_maturity=np.where(rng.random(n) < 0.2, rng.integers(0, 60, n), np.inf),
        days_since_last_login=np.where(rng.random(n) < 0.9, rng.integers(0, 200, n), np.inf),
        contacts_7d_total=contacts_7d.sum(axis=1),
        contacts_30d_total=contacts_30d.sum(axis=1),
        consent=rng.random((n, c)) < 0.8,
        opt_out=rng.random((n, c)) < 0.05,
        contacts_7d=contacts_7d,
        contacts_30d=contacts_30d,
        holds=rng.random((n, o)) < 0.1,
        offer_views_30d=rng.poisson(1.0, (n, o)),
        usual_login_hour=np.where(rng.random(n) < 0.8, rng.integers(0, 24, n), -1),
    )
