"""The campaigns file: what a campaign may recommend, and a bad file refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from nextbest.catalog import ActionCatalog
from nextbest.config_loading import ConfigError
from serving.campaigns import load_campaigns
from serving.settings import DEFAULT_CAMPAIGNS_PATH


def test_the_shipped_campaigns_limit_their_offers(catalog: ActionCatalog) -> None:
    campaigns = load_campaigns(DEFAULT_CAMPAIGNS_PATH, catalog)
    assert campaigns.ids and not campaigns.open
    for cid in campaigns.ids:
        mask = campaigns.mask(cid)
        assert mask is None or (mask[0] and mask.sum() > 1)  # waiting, and some offer
    assert "no-such-campaign" not in campaigns


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("campaigns: []", "campaigns", "at least 1"),
        ("campaigns:\n  - {id: spring, offers: []}", "campaigns.0.offers", "at least 1"),
        (
            "campaigns:\n  - {id: spring, offers: [fund_sip, fund_sip]}",
            "campaigns.0.offers",
            "'fund_sip' is listed twice",
        ),
        (
            "campaigns:\n  - {id: spring}\n  - {id: spring}",
            "campaigns.1.id",
            "duplicate campaign id 'spring'",
        ),
        ("campaigns:\n  - {id: spring, offers: [nope]}", "campaigns.0.offers", "unknown offer"),
    ],
)
def test_a_bad_campaigns_file_is_refused_naming_the_key(
    tmp_path: Path, catalog: ActionCatalog, text: str, key: str, reason: str
) -> None:
    path = tmp_path / "campaigns.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=reason) as info:
        load_campaigns(path, catalog)
    assert info.value.key == key
