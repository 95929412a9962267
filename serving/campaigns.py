"""Campaigns the service knows (``configs/serving/campaigns.yaml``).

A decision request may name a campaign; a campaign that lists offers limits the candidate
actions to those offers. A campaign id not in the file is refused (HTTP 400), so every
logged decision carries a campaign the bank can trace.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from nextbest.catalog import ActionCatalog
from nextbest.config_loading import ConfigError, StrictModel, load_model

CAMPAIGN_ID_PATTERN = r"^[A-Za-z0-9_.:-]+$"
"""What a campaign id may hold (letters, digits, ``_ . : -``): also checked in requests
when the service accepts any campaign."""


class Campaign(StrictModel):
    """One marketing campaign."""

    id: str = Field(min_length=1, max_length=64, pattern=CAMPAIGN_ID_PATTERN)
    description: str = ""
    offers: tuple[str, ...] | None = Field(default=None, min_length=1)
    """Offers the campaign may recommend (None: every offer; an empty list, which would
    allow only waiting, is refused)."""

    @field_validator("offers")
    @classmethod
    def _known_offers(
        cls, value: tuple[str, ...] | None, info: ValidationInfo
    ) -> tuple[str, ...] | None:
        catalog: ActionCatalog | None = (info.context or {}).get("catalog")
        if value is not None and catalog is not None:
            unknown = [o for o in value if o not in catalog.offer_names]
            if unknown:
                raise ValueError(f"unknown offer {unknown[0]!r}")
        repeated = next((o for i, o in enumerate(value or ()) if o in (value or ())[:i]), None)
        if repeated is not None:
            raise ValueError(f"offer {repeated!r} is listed twice")
        return value


class CampaignsFile(StrictModel):
    """The campaigns file."""

    campaigns: tuple[Campaign, ...] = Field(min_length=1)
    """At least one (to accept any campaign id, run without a campaigns file)."""


class Campaigns:
    """Known campaigns and the candidate mask each implies.

    Parameters
    ----------
    campaigns : the campaigns; None accepts any campaign id (without restriction).
    catalog : the action catalogue.
    """

    def __init__(self, campaigns: tuple[Campaign, ...] | None, catalog: ActionCatalog) -> None:
        self.open = campaigns is None
        self._masks: dict[str, np.ndarray | None] = {}
        for campaign in campaigns or ():
            if campaign.offers is None:
                self._masks[campaign.id] = None
                continue
            offers = [catalog.offer_names.index(o) for o in campaign.offers]
            mask = np.isin(catalog.offer_index, offers)
            mask[0] = True  # waiting is always a candidate
            mask.flags.writeable = False
            self._masks[campaign.id] = mask

    def __contains__(self, campaign_id: str) -> bool:
        return self.open or campaign_id in self._masks

    def mask(self, campaign_id: str) -> np.ndarray | None:
        """bool ``(A,)`` of the actions the campaign may recommend; None for no restriction."""
        return self._masks.get(campaign_id)

    @property
    def ids(self) -> tuple[str, ...]:
        """The known campaign ids (empty when any id is accepted)."""
        return tuple(self._masks)


def load_campaigns(path: str | Path | None, catalog: ActionCatalog) -> Campaigns:
    """Read the campaigns file (None: accept any campaign id).

    Raises
    ------
    ConfigError
        Naming the file, the key and the reason (duplicate ids, unknown offers ...).
    """
    if path is None:
        return Campaigns(None, catalog)
    spec = load_model(path, CampaignsFile, context={"catalog": catalog})
    ids = [c.id for c in spec.campaigns]
    for i, cid in enumerate(ids):
        if cid in ids[:i]:
            raise ConfigError(path, f"campaigns.{i}.id", f"duplicate campaign id {cid!r}")
    return Campaigns(spec.campaigns, catalog)
