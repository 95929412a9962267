"""The feature encoder: the one encoding of customers and actions that training and serving use.

``ContextEncoder.encode(batch)`` turns a :class:`ContextBatch` into float32 ``(N, F)``;
``action_features(catalog)`` gives float32 ``(A, F_a)``. The :class:`FeatureSpec` names every
column and carries a version (a hash of the names, the catalogue version and the encoder
revision) that models and logged decisions record, so a model is never fed features it was
not trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from nextbest.catalog import ActionCatalog
from nextbest.config_loading import content_hash
from nextbest.context import (
    INCOME_BANDS,
    LIFECYCLE_STAGES,
    RISK_TOLERANCES,
    ContextBatch,
)
from nextbest.feature_transforms import (
    Decay,
    HourInWindows,
    OneHot,
    Periodic,
    Row,
    Scaled,
    Threshold,
    Transform,
)
from nextbest.segments import (
    DIGITAL_ACTIVITY,
    DIGITAL_ACTIVITY_BOUNDS_LOGINS,
    LIFE_STAGE_BOUNDS_AGE,
    LIFE_STAGES,
    VALUE_TIER_BOUNDS_CNY,
    VALUE_TIERS,
)

ENCODER_REVISION = 2
"""Bump when the encoding of an existing feature changes meaning."""
ASSESSMENT_VALID_DAYS = 365.0


@dataclass(frozen=True)
class FeatureSpec:
    """Names of the context and action feature columns, and their version."""

    context_names: tuple[str, ...]
    action_names: tuple[str, ...]
    catalog_version: str

    @property
    def n_context(self) -> int:
        return len(self.context_names)

    @property
    def n_action(self) -> int:
        return len(self.action_names)

    @cached_property
    def version(self) -> str:
        return content_hash(json.dumps(self.to_dict(include_version=False), sort_keys=True))

    def to_dict(self, include_version: bool = True) -> dict[str, object]:
        """JSON-ready form (stored beside models and in decision-log metadata)."""
        out: dict[str, object] = {
            "encoder_revision": ENCODER_REVISION,
            "catalog_version": self.catalog_version,
            "context_names": list(self.context_names),
            "action_names": list(self.action_names),
        }
        if include_version:
            out["version"] = self.version
        return out


Feature = tuple[str | tuple[str, ...], Transform]
"""A feature block: its column name (or names, one per column of the block) and transform."""


class ContextEncoder:
    """Encodes a :class:`ContextBatch` as float32 features ``(N, F)``, or one customer's row
    as ``(F,)``: the blocks are declared once as transforms, computed by either path."""

    def __init__(self, catalog: ActionCatalog) -> None:
        self.catalog = catalog
        slots = catalog.timing
        ch, of = catalog.channel_names, catalog.offer_names
        self._features: list[Feature] = [
            ("age_scaled", Scaled("age", shift=45.0, scale=15.0)),
            ("log_aum", Scaled("aum_cny", shift=11.0, scale=3.0, log=True)),
            (
                tuple(f"value_tier={t}" for t in VALUE_TIERS),
                OneHot("aum_cny", len(VALUE_TIERS), VALUE_TIER_BOUNDS_CNY),
            ),
            (
                tuple(f"life_stage={s}" for s in LIFE_STAGES),
                OneHot("age", len(LIFE_STAGES), LIFE_STAGE_BOUNDS_AGE),
            ),
            (
                tuple(f"income_band={s}" for s in INCOME_BANDS),
                OneHot("income_band", len(INCOME_BANDS)),
            ),
            (
                ("risk_tolerance=unassessed", *(f"risk_tolerance={r}" for r in RISK_TOLERANCES)),
                OneHot("risk_tolerance", len(RISK_TOLERANCES) + 1),
            ),
            (
                "risk_assessment_valid",
                Threshold("risk_assessment_age_days", "at_most", ASSESSMENT_VALID_DAYS),
            ),
            (
                tuple(f"lifecycle={s}" for s in LIFECYCLE_STAGES),
                OneHot("lifecycle_stage", len(LIFECYCLE_STAGES)),
            ),
            ("log_tenure_months", Scaled("tenure_months", scale=5.0, log=True)),
            ("log_app_logins_30d", Scaled("app_logins_30d", scale=3.0, log=True)),
            (
                tuple(f"digital_activity={d}" for d in DIGITAL_ACTIVITY),
                OneHot("app_logins_30d", len(DIGITAL_ACTIVITY), DIGITAL_ACTIVITY_BOUNDS_LOGINS),
            ),
            ("opted_out_all", Scaled("opted_out_all")),
            ("litigation", Scaled("litigation")),
            ("dishonest_debtor", Scaled("dishonest_debtor")),
            ("complaint_recency", Decay("days_since_complaint", 30.0)),
            ("contact_recency", Decay("hours_since_last_contact", 168.0)),
            ("hour_sin", Periodic("local_hour", 24.0, "sin")),
            ("hour_cos", Periodic("local_hour", 24.0, "cos")),
            ("weekend", Threshold("local_weekday", "at_least", 5)),
            ("log_mortgage_views_7d", Scaled("mortgage_page_views_7d", log=True)),
            ("maturity_soon", Decay("days_to_product_maturity", 30.0)),
            ("login_staleness", Scaled("days_since_last_login", scale=365.0, cap=365.0)),
            ("log_contacts_7d_total", Scaled("contacts_7d_total", log=True)),
            ("log_contacts_30d_total", Scaled("contacts_30d_total", log=True)),
            (tuple(f"consent={c}" for c in ch), Scaled("consent")),
            (tuple(f"opt_out={c}" for c in ch), Scaled("opt_out")),
            (tuple(f"log_contacts_7d={c}" for c in ch), Scaled("contacts_7d", log=True)),
            (tuple(f"log_contacts_30d={c}" for c in ch), Scaled("contacts_30d", log=True)),
            (tuple(f"holds={o}" for o in of), Scaled("holds")),
            (
                tuple(f"log_offer_views_30d={o}" for o in of),
                Scaled("offer_views_30d", scale=2.0, log=True),
            ),
            ("login_hour_known", Threshold("usual_login_hour", "at_least", 0)),
            (
                tuple(f"login_hour_fits={t}" for t in catalog.timing_names),
                # windowed slots by their hours; the immediate slot (-1): within an hour of now
                HourInWindows(
                    "usual_login_hour",
                    "local_hour",
                    tuple(-1 if t.start_hour is None else t.start_hour for t in slots),
                    tuple(-1 if t.end_hour is None else t.end_hour for t in slots),
                ),
            ),
        ]
        names: list[str] = []
        self._slices: list[slice] = []
        for name, _ in self._features:
            width = 1 if isinstance(name, str) else len(name)
            self._slices.append(slice(len(names), len(names) + width))
            names.extend([name] if isinstance(name, str) else name)
        self._scalar_steps = tuple(transform.scalar for _, transform in self._features)
        self.spec = FeatureSpec(tuple(names), action_feature_names(catalog), catalog.version)

    @property
    def n_features(self) -> int:
        return self.spec.n_context

    def encode(self, batch: ContextBatch) -> np.ndarray:
        """Context features.

        Parameters
        ----------
        batch : ContextBatch
            N customers.

        Returns
        -------
        ndarray of float32, shape (N, F)
            ``F = spec.n_context``; column names in ``spec.context_names``.
        """
        out = np.empty((batch.n, self.n_features), np.float32)
        for (_, transform), cols in zip(self._features, self._slices, strict=True):
            values = transform.vector(batch)
            if values.ndim > 1:
                out[:, cols] = values
            else:
                out[:, cols.start] = values
        return out

    def encode_row(self, row: Row) -> np.ndarray:
        """Context features of one customer, float32 ``(F,)``, equal to ``encode`` of a
        one-customer batch (within float32 rounding: this path computes in float64).

        Parameters
        ----------
        row : the customer as :meth:`ContextBatch.row` gives it
        """
        out: list[float] = []
        for step in self._scalar_steps:
            step(row, out)
        return np.array(out, np.float32)


def action_feature_names(catalog: ActionCatalog) -> tuple[str, ...]:
    """Names of the columns of :func:`action_features` for ``catalog``."""
    return (
        "no_contact",
        *(f"channel={c}" for c in catalog.channel_names),
        *(f"offer={o}" for o in catalog.offer_names),
        *(f"timing={t}" for t in catalog.timing_names),
        "risk_level_scaled",
        "credit",
        "hnw_only",
        "log_value_cny",
        "log_cost_cny",
    )


def action_features(catalog: ActionCatalog) -> np.ndarray:
    """Per-action features, float32 ``(A, F_a)``: one-hot channel, offer and timing, plus the
    offer's risk level, credit and HNW flags, and log value and channel cost."""
    a = catalog.n_actions
    c, o, t = catalog.n_channels, catalog.n_offers, len(catalog.timing)
    out = np.zeros((a, len(action_feature_names(catalog))), np.float32)
    contact = catalog.channel_index >= 0
    rows = np.flatnonzero(contact)
    out[~contact, 0] = 1.0
    out[rows, 1 + catalog.channel_index[rows]] = 1.0
    out[rows, 1 + c + catalog.offer_index[rows]] = 1.0
    out[rows, 1 + c + o + catalog.timing_index[rows]] = 1.0
    base = 1 + c + o + t
    risk = np.array([v or 0 for v in catalog.attribute("risk_level")], np.float32)
    out[:, base] = risk / 5.0
    out[:, base + 1] = [bool(v) for v in catalog.attribute("credit")]
    out[:, base + 2] = [bool(v) for v in catalog.attribute("hnw_only")]
    out[:, base + 3] = np.log1p([v or 0.0 for v in catalog.attribute("value_cny")])
    out[:, base + 4] = np.log1p([v or 0.0 for v in catalog.attribute("cost_cny")])
    return out


@dataclass(frozen=True)
class AlignedColumns:
    """The context columns that describe the members of one action factor, column by member.

    The context carries some columns once per channel, offer or timing slot (``holds=<offer>``,
    ``log_offer_views_30d=<offer>``, ``log_contacts_7d=<channel>``, ``login_hour_fits=<slot>``
    ...). For an action, the columns of *its* offer (channel, slot) are the ones that matter, and
    they mean the same thing for every offer: a model can learn one function of them for all
    offers instead of one per offer.
    """

    factor: str
    """The action-feature prefix: ``channel``, ``offer`` or ``timing``."""
    kinds: tuple[str, ...]
    """The aligned context-column prefixes, e.g. ``("holds", "log_offer_views_30d")``."""
    columns: np.ndarray
    """int64 ``(M, K)``: context column of kind ``k`` for member ``m``."""
    members: np.ndarray
    """float32 ``(M, A)``: 1 where action ``a`` has member ``m`` (no contact has none)."""


def aligned_context_columns(
    spec: FeatureSpec, action_features: np.ndarray
) -> tuple[AlignedColumns, ...]:
    """Every action factor whose members each have their own context columns.

    Parameters
    ----------
    spec : FeatureSpec
        Names of the context and action feature columns.
    action_features : float32 ``(A, F_a)``
        :func:`action_features` of the same catalogue (its one-hot factor columns).

    Returns
    -------
    tuple of AlignedColumns
        One per factor (in action-feature order) with at least two members and at least one
        aligned context kind; a kind is aligned when the context has a ``<kind>=<member>``
        column for every member (for channels: consent, opt-out and the contact counts).
    """
    if action_features.shape[1] != spec.n_action:
        raise ValueError(
            f"action_features has {action_features.shape[1]} columns, the spec {spec.n_action}"
        )
    factors: dict[str, list[tuple[int, str]]] = {}
    for j, name in enumerate(spec.action_names):
        prefix, sep, member = name.partition("=")
        if sep:
            factors.setdefault(prefix, []).append((j, member))
    context_index = {name: i for i, name in enumerate(spec.context_names)}
    kinds_in_order = dict.fromkeys(
        name.partition("=")[0] for name in spec.context_names if "=" in name
    )
    out = []
    for factor, entries in factors.items():
        kinds = tuple(
            kind
            for kind in kinds_in_order
            if all(f"{kind}={member}" in context_index for _, member in entries)
        )
        if not kinds or len(entries) < 2:
            continue
        columns = np.array(
            [[context_index[f"{kind}={member}"] for kind in kinds] for _, member in entries],
            np.int64,
        )
        members = np.ascontiguousarray(action_features[:, [j for j, _ in entries]].T, np.float32)
        out.append(AlignedColumns(factor, kinds, columns, members))
    return tuple(out)
