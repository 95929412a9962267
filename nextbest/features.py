"""The feature encoder: the one encoding of customers and actions that training and serving use.

``ContextEncoder.encode(batch)`` turns a :class:`ContextBatch` into float32 ``(N, F)``;
``action_features(catalog)`` gives float32 ``(A, F_a)``. The :class:`FeatureSpec` names every
column and carries a version (a hash of the names, the catalogue version and the encoder
revision) that models and logged decisions record, so a model is never fed features it was
not trained on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
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
from nextbest.segments import (
    DIGITAL_ACTIVITY,
    LIFE_STAGES,
    VALUE_TIERS,
    digital_activity,
    life_stage,
    value_tier,
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


_IDENTITY = {width: np.eye(width, dtype=np.float32) for width in range(1, 17)}
"""Identity matrices by width: a one-hot block is one row gather from them."""


def _one_hot(index: np.ndarray, width: int) -> np.ndarray:
    """float32 ``(n, width)`` with a 1 at ``index`` (int ``(n,)``) in each row."""
    identity = _IDENTITY.get(width)
    if identity is None:
        identity = np.eye(width, dtype=np.float32)
    return identity[index]


def _decay(elapsed: np.ndarray, scale: float) -> np.ndarray:
    """exp(-elapsed / scale): 1 just now, 0 for never (inf)."""
    return np.exp(-np.asarray(elapsed, np.float32) / np.float32(scale))


Block = tuple[str | tuple[str, ...], Callable[[ContextBatch], np.ndarray]]


class ContextEncoder:
    """Encodes a :class:`ContextBatch` as float32 features ``(N, F)``."""

    def __init__(self, catalog: ActionCatalog) -> None:
        self.catalog = catalog
        slots = catalog.timing
        # timing-slot windows (start -1: the immediate slot), (1, T), built once
        self._slot_start = np.array([-1 if t.start_hour is None else t.start_hour for t in slots])[
            None, :
        ]
        self._slot_end = np.array([-1 if t.end_hour is None else t.end_hour for t in slots])[
            None, :
        ]
        ch, of = catalog.channel_names, catalog.offer_names
        self._blocks: list[Block] = [
            ("age_scaled", lambda b: (b["age"] - 45.0) / 15.0),
            ("log_aum", lambda b: (np.log1p(b["aum_cny"]) - 11.0) / 3.0),
            (
                tuple(f"value_tier={t}" for t in VALUE_TIERS),
                lambda b: _one_hot(value_tier(b["aum_cny"]), len(VALUE_TIERS)),
            ),
            (
                tuple(f"life_stage={s}" for s in LIFE_STAGES),
                lambda b: _one_hot(life_stage(b["age"]), len(LIFE_STAGES)),
            ),
            (
                tuple(f"income_band={s}" for s in INCOME_BANDS),
                lambda b: _one_hot(b["income_band"], len(INCOME_BANDS)),
            ),
            (
                ("risk_tolerance=unassessed", *(f"risk_tolerance={r}" for r in RISK_TOLERANCES)),
                lambda b: _one_hot(b["risk_tolerance"], len(RISK_TOLERANCES) + 1),
            ),
            (
                "risk_assessment_valid",
                lambda b: b["risk_assessment_age_days"] <= ASSESSMENT_VALID_DAYS,
            ),
            (
                tuple(f"lifecycle={s}" for s in LIFECYCLE_STAGES),
                lambda b: _one_hot(b["lifecycle_stage"], len(LIFECYCLE_STAGES)),
            ),
            ("log_tenure_months", lambda b: np.log1p(b["tenure_months"]) / 5.0),
            ("log_app_logins_30d", lambda b: np.log1p(b["app_logins_30d"]) / 3.0),
            (
                tuple(f"digital_activity={d}" for d in DIGITAL_ACTIVITY),
                lambda b: _one_hot(digital_activity(b["app_logins_30d"]), len(DIGITAL_ACTIVITY)),
            ),
            ("opted_out_all", lambda b: b["opted_out_all"]),
            ("litigation", lambda b: b["litigation"]),
            ("dishonest_debtor", lambda b: b["dishonest_debtor"]),
            ("complaint_recency", lambda b: _decay(b["days_since_complaint"], 30.0)),
            ("contact_recency", lambda b: _decay(b["hours_since_last_contact"], 168.0)),
            ("hour_sin", lambda b: np.sin(b["local_hour"] * (2 * np.pi / 24))),
            ("hour_cos", lambda b: np.cos(b["local_hour"] * (2 * np.pi / 24))),
            ("weekend", lambda b: b["local_weekday"] >= 5),
            ("log_mortgage_views_7d", lambda b: np.log1p(b["mortgage_page_views_7d"])),
            ("maturity_soon", lambda b: _decay(b["days_to_product_maturity"], 30.0)),
            ("login_staleness", lambda b: np.minimum(b["days_since_last_login"], 365.0) / 365.0),
            ("log_contacts_7d_total", lambda b: np.log1p(b["contacts_7d_total"])),
            ("log_contacts_30d_total", lambda b: np.log1p(b["contacts_30d_total"])),
            (tuple(f"consent={c}" for c in ch), lambda b: b["consent"]),
            (tuple(f"opt_out={c}" for c in ch), lambda b: b["opt_out"]),
            (tuple(f"log_contacts_7d={c}" for c in ch), lambda b: np.log1p(b["contacts_7d"])),
            (tuple(f"log_contacts_30d={c}" for c in ch), lambda b: np.log1p(b["contacts_30d"])),
            (tuple(f"holds={o}" for o in of), lambda b: b["holds"]),
            (
                tuple(f"log_offer_views_30d={o}" for o in of),
                lambda b: np.log1p(b["offer_views_30d"]) / 2.0,
            ),
            ("login_hour_known", lambda b: b["usual_login_hour"] >= 0),
            (
                tuple(f"login_hour_fits={t}" for t in catalog.timing_names),
                self._login_hour_fits,
            ),
        ]
        names: list[str] = []
        self._slices: list[slice] = []
        for name, _ in self._blocks:
            width = 1 if isinstance(name, str) else len(name)
            self._slices.append(slice(len(names), len(names) + width))
            names.extend([name] if isinstance(name, str) else name)
        self.spec = FeatureSpec(tuple(names), action_feature_names(catalog), catalog.version)

    @property
    def n_features(self) -> int:
        return self.spec.n_context

    def _login_hour_fits(self, batch: ContextBatch) -> np.ndarray:
        """Whether the usual login hour falls in each timing slot, bool ``(N, T)``.

        A windowed slot fits when the hour is inside its window; the immediate slot fits when
        the hour is within one hour of the local decision hour. Unknown hours fit nothing.
        """
        usual = batch["usual_login_hour"].astype(np.int16)[:, None]
        now = batch["local_hour"].astype(np.int16)[:, None]
        start, end = self._slot_start, self._slot_end
        fits = np.where(start < 0, np.abs(now - usual) <= 1, (usual >= start) & (usual < end))
        return fits & (usual >= 0)

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
        for (_, fn), cols in zip(self._blocks, self._slices, strict=True):
            values = fn(batch)
            if values.ndim > 1:
                out[:, cols] = values
            else:
                out[:, cols.start] = values
        return out


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
