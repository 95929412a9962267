"""The action catalogue: stable ids, append-only growth, content version, bad config files."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from nextbest.catalog import (
    DEFAULT_CATALOG_DIR,
    NO_CONTACT,
    NO_CONTACT_ID,
    ActionCatalog,
    load_catalog,
)
from nextbest.config_loading import ConfigError

NEW_OFFER = """
  - name: gold_savings
    family: deposit
    description: Gold savings account.
    min_aum_cny: 1000
    value_cny: 50
    channels: [branch_invite, app_push]
"""


@pytest.fixture
def catalog_dir(tmp_path: Path) -> Path:
    """A writable copy of configs/catalog."""
    target = tmp_path / "catalog"
    shutil.copytree(DEFAULT_CATALOG_DIR, target)
    return target


def _names(catalog: ActionCatalog) -> dict[int, str]:
    return {a.id: a.name for a in catalog.actions}


def test_load_catalog_ids_stable_across_loads(catalog: ActionCatalog) -> None:
    again = load_catalog()
    assert _names(again) == _names(catalog)
    assert again.version == catalog.version
    np.testing.assert_array_equal(again.channel_index, catalog.channel_index)
    np.testing.assert_array_equal(again.offer_index, catalog.offer_index)
    np.testing.assert_array_equal(again.timing_index, catalog.timing_index)


def test_load_catalog_size_at_least_300(catalog: ActionCatalog) -> None:
    assert catalog.n_actions >= 300
    assert catalog.n_actions == len(catalog.actions)
    n_contact = sum(len(o.channels) * len(catalog.timing) for o in catalog.offers)
    assert catalog.n_actions == 1 + n_contact
    assert len({a.name for a in catalog.actions}) == catalog.n_actions


def test_lookup_action_id_no_contact_zero(catalog: ActionCatalog) -> None:
    assert NO_CONTACT_ID == 0
    assert catalog.action_id(NO_CONTACT) == 0
    first = catalog.actions[0]
    assert first.name == NO_CONTACT
    assert not first.is_contact
    assert (first.channel, first.offer, first.timing) == (None, None, None)
    assert catalog.channel_index[0] == catalog.offer_index[0] == catalog.timing_index[0] == -1
    assert all(a.is_contact for a in catalog.actions[1:])


def test_number_actions_documented_order(catalog: ActionCatalog) -> None:
    # Offer by offer in file order, channels in channel-file order, then timing slots.
    assert catalog.actions[1].name == "app_push:fund_sip:now"
    assert catalog.actions[2].name == "app_push:fund_sip:morning"
    assert catalog.actions[5].name == "sms:fund_sip:now"
    for action in catalog.actions:
        assert catalog.action_id(action.name) == action.id
        assert catalog.actions[action.id] is action
    offer_pos = catalog.offer_index[1:].astype(int)
    assert np.all(np.diff(offer_pos) >= 0)


def test_lookup_action_id_unknown_name(catalog: ActionCatalog) -> None:
    with pytest.raises(KeyError, match="unknown action 'telegram:fund_sip:now'"):
        catalog.action_id("telegram:fund_sip:now")


def test_write_index_array_refused(catalog: ActionCatalog) -> None:
    with pytest.raises(ValueError, match="read-only"):
        catalog.channel_index[1] = 3


def test_read_attribute_per_action(catalog: ActionCatalog) -> None:
    risk = catalog.attribute("risk_level")
    assert risk[0] is None
    assert risk[catalog.action_id("app_push:wealth_r5:now")] == 5
    assert risk[catalog.action_id("sms:consumer_loan:now")] == 0
    remote = catalog.attribute("remote")
    assert remote[catalog.action_id("relationship_manager:fund_sip:now")] is False
    assert catalog.attribute("immediate")[catalog.action_id("sms:fund_sip:evening")] is False
    with pytest.raises(KeyError, match="unknown action attribute 'colour'"):
        catalog.attribute("colour")


def test_append_offer_keeps_existing_ids(catalog: ActionCatalog, catalog_dir: Path) -> None:
    offers = catalog_dir / "offers.yaml"
    offers.write_text(offers.read_text(encoding="utf-8") + NEW_OFFER, encoding="utf-8")
    grown = load_catalog(catalog_dir)
    old, new = _names(catalog), _names(grown)
    assert {i: new[i] for i in old} == old
    added = [new[i] for i in range(catalog.n_actions, grown.n_actions)]
    # branch_invite comes after app_push in channels.yaml, whatever order the offer lists.
    assert added == [
        f"{channel}:gold_savings:{slot}"
        for channel in ("app_push", "branch_invite")
        for slot in catalog.timing_names
    ]
    assert grown.version != catalog.version


def test_hash_catalog_version_content_change(catalog: ActionCatalog, catalog_dir: Path) -> None:
    assert load_catalog(catalog_dir).version == catalog.version
    offers = catalog_dir / "offers.yaml"
    text = offers.read_text(encoding="utf-8")
    assert "value_cny: 20000" in text
    offers.write_text(text.replace("value_cny: 20000", "value_cny: 20001"), encoding="utf-8")
    changed = load_catalog(catalog_dir)
    assert _names(changed) == _names(catalog)
    assert changed.version != catalog.version


def test_hash_catalog_version_ignores_comments(catalog: ActionCatalog, catalog_dir: Path) -> None:
    channels = catalog_dir / "channels.yaml"
    channels.write_text("# a new comment\n" + channels.read_text(encoding="utf-8"))
    assert load_catalog(catalog_dir).version == catalog.version


def _replace(file: str, old: str, new: str, count: int = 1) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        path = directory / file
        text = path.read_text(encoding="utf-8")
        assert old in text, f"{old!r} not in {file}"
        path.write_text(text.replace(old, new, count), encoding="utf-8")

    return edit


def _write(file: str, text: str) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        (directory / file).write_text(text, encoding="utf-8")

    return edit


def _delete(file: str) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        (directory / file).unlink()

    return edit


FUND_SIP_CHANNELS = "channels: [app_push, sms, wechat, outbound_call, relationship_manager]"

# (edit of a copy of configs/catalog, file, key, reason pattern)
BAD_CATALOGS = [
    pytest.param(
        _replace("offers.yaml", FUND_SIP_CHANNELS, "channels: [app_push, telegram]"),
        "offers.yaml",
        "offers.0.channels",
        r"unknown channel 'telegram'; known: \[",
        id="unknown_channel_in_offer",
    ),
    pytest.param(
        _replace("offers.yaml", "name: wealth_r1", "name: fund_sip"),
        "offers.yaml",
        "offers",
        "duplicate offer name 'fund_sip'",
        id="duplicate_offer_name",
    ),
    pytest.param(
        _replace("offers.yaml", FUND_SIP_CHANNELS, "channels: [sms, app_push, sms]"),
        "offers.yaml",
        "offers.0.channels",
        "lists a channel twice",
        id="duplicate_channel_in_offer",
    ),
    pytest.param(
        _replace("channels.yaml", "name: wechat", "name: sms"),
        "channels.yaml",
        "channels",
        "duplicate channel name 'sms'",
        id="duplicate_channel_name",
    ),
    pytest.param(
        _replace("timing.yaml", "name: evening", "name: morning"),
        "timing.yaml",
        "timing",
        "duplicate timing slot name 'morning'",
        id="duplicate_timing_slot",
    ),
    pytest.param(
        _replace("offers.yaml", "name: wealth_r1", "name: no_contact"),
        "offers.yaml",
        "offers",
        "reserved for the no-contact action",
        id="reserved_offer_name",
    ),
    pytest.param(
        _replace("offers.yaml", "risk_level: R5", "risk_level: R7"),
        "offers.yaml",
        "offers.5.risk_level",
        "must be one of R1..R5 or null, got 'R7'",
        id="risk_level_r7",
    ),
    pytest.param(
        _replace("offers.yaml", "family: deposit", "family: crypto"),
        "offers.yaml",
        "offers.6.family",
        "'investment'",
        id="unknown_family",
    ),
    pytest.param(
        _write("offers.yaml", "offers:\n  - name: fund_sip\n    channels: [sms\n"),
        "offers.yaml",
        "",
        "malformed YAML at line",
        id="malformed_yaml",
    ),
    pytest.param(
        _replace(
            "offers.yaml", "    min_aum_cny: 100\n", "    min_aum_cny: 100\n    colour: red\n"
        ),
        "offers.yaml",
        "offers.0.colour",
        "unknown key",
        id="unknown_key_in_offer",
    ),
    pytest.param(
        _replace("channels.yaml", "channels:", "channel:"),
        "channels.yaml",
        "channels",
        r"Field required \(also: channel: unknown key\)",
        id="unknown_top_level_key",
    ),
    pytest.param(
        _replace(
            "offers.yaml", "    min_age: 22\n    max_age: 60", "    min_age: 61\n    max_age: 60"
        ),
        "offers.yaml",
        "offers.8",
        r"max_age \(60\) is below min_age \(61\)",
        id="max_age_below_min_age",
    ),
    pytest.param(
        _replace("offers.yaml", "min_aum_cny: 100\n", "min_aum_cny: -100\n"),
        "offers.yaml",
        "offers.0.min_aum_cny",
        "greater than or equal to 0",
        id="negative_min_aum",
    ),
    pytest.param(
        _replace("offers.yaml", FUND_SIP_CHANNELS, "channels: []"),
        "offers.yaml",
        "offers.0.channels",
        "at least 1 item",
        id="offer_without_channels",
    ),
    pytest.param(
        _replace(
            "timing.yaml", "start_hour: 19\n    end_hour: 21", "start_hour: 21\n    end_hour: 19"
        ),
        "timing.yaml",
        "timing.2",
        r"end_hour \(19\) must be after start_hour \(21\)",
        id="timing_window_reversed",
    ),
    pytest.param(
        _replace("timing.yaml", "    end_hour: 11\n", ""),
        "timing.yaml",
        "timing.1",
        "start_hour and end_hour must be given together",
        id="timing_window_half_open",
    ),
    pytest.param(
        _replace("channels.yaml", "    remote: true\n", "", count=1),
        "channels.yaml",
        "channels.0.remote",
        "Field required",
        id="missing_required_field",
    ),
    pytest.param(
        _write("offers.yaml", "- fund_sip\n- wealth_r1\n"),
        "offers.yaml",
        "",
        "top level must be a mapping, got list",
        id="top_level_list",
    ),
    pytest.param(
        _write("timing.yaml", "# nothing here\n"),
        "timing.yaml",
        "",
        "file is empty",
        id="empty_file",
    ),
    pytest.param(
        _write("offers.yaml", "offers: []\n"),
        "offers.yaml",
        "offers",
        "at least 1 item",
        id="no_offers",
    ),
    pytest.param(
        _delete("channels.yaml"),
        "channels.yaml",
        "",
        "file not found",
        id="missing_file",
    ),
]


@pytest.mark.parametrize(("edit", "file", "key", "reason"), BAD_CATALOGS)
def test_load_catalog_bad_file_raises_config_error(
    catalog_dir: Path, edit: Callable[[Path], None], file: str, key: str, reason: str
) -> None:
    edit(catalog_dir)
    with pytest.raises(ConfigError, match=reason) as info:
        load_catalog(catalog_dir)
    error = info.value
    assert error.path == str(catalog_dir / file)
    assert error.key == key
    assert str(error).startswith(f"{catalog_dir / file}: ")
    if key:
        assert f": {key}: " in str(error)


def test_load_catalog_missing_directory_names_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found") as info:
        load_catalog(tmp_path / "nowhere")
    assert info.value.path == str(tmp_path / "nowhere" / "channels.yaml")


def test_load_catalog_several_errors_listed_in_reason(catalog_dir: Path) -> None:
    _replace("offers.yaml", "risk_level: R5", "risk_level: R7")(catalog_dir)
    _replace("offers.yaml", "family: deposit", "family: crypto")(catalog_dir)
    with pytest.raises(ConfigError) as info:
        load_catalog(catalog_dir)
    assert info.value.key == "offers.5.risk_level"
    assert "also: offers.6.family" in info.value.reason


@pytest.mark.parametrize("value", [".inf", ".nan", "-.inf"])
def test_a_non_finite_figure_is_refused_naming_it(catalog_dir: Path, value: str) -> None:
    """A cost of .inf made every simulated reward infinite, and the log was then refused
    for its rewards, far from the cause."""
    path = catalog_dir / "channels.yaml"
    path.write_text(path.read_text().replace("cost_cny: 0.05", f"cost_cny: {value}", 1))
    with pytest.raises(ConfigError, match="finite number") as info:
        load_catalog(catalog_dir)
    assert info.value.key == "channels.1.cost_cny"
