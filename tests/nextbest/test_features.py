"""The feature encoder: shapes, names, determinism, version, and meaning of key columns."""

from __future__ import annotations

import numpy as np
import pytest

from nextbest.catalog import load_catalog
from nextbest.context import ContextBatch
from nextbest.features import (
    ContextEncoder,
    action_feature_names,
    action_features,
    aligned_context_columns,
)
from nextbest.synthetic import random_context_batch


@pytest.fixture(scope="module")
def encoder() -> ContextEncoder:
    return ContextEncoder(load_catalog())


def test_encode_context_shape_matches_spec(encoder: ContextEncoder) -> None:
    batch = random_context_batch(encoder.catalog, 500, np.random.default_rng(1))
    x = encoder.encode(batch)
    assert x.shape == (500, encoder.spec.n_context)
    assert x.dtype == np.float32
    assert np.isfinite(x).all()
    assert len(set(encoder.spec.context_names)) == encoder.spec.n_context


def test_encode_context_batch_equals_rows(encoder: ContextEncoder) -> None:
    batch = random_context_batch(encoder.catalog, 64, np.random.default_rng(2))
    full = encoder.encode(batch)
    for i in (0, 17, 63):
        np.testing.assert_array_equal(encoder.encode(batch.take([i]))[0], full[i])


def test_encode_row_equals_batch_encoding(encoder: ContextEncoder) -> None:
    """The one-customer path (Python floats) gives the batch path's features within 1e-6,
    on random customers and on every segment boundary (a value equal to a bound belongs to
    the bucket above), unknown login hours, never-seen events (inf) and capped staleness."""
    catalog = encoder.catalog
    batch = random_context_batch(catalog, 3000, np.random.default_rng(12))
    cols = dict(batch.columns)
    edges = {
        "aum_cny": [1_000_000.0, 6_000_000.0, 999_999.99, 0.0],
        "age": [35, 55, 34, 120],
        "app_logins_30d": [2, 4, 0, 10_000],
        "days_since_last_login": [365, 366, np.inf, 0],
        "usual_login_hour": [-1, 0, 23, 12],
        "risk_assessment_age_days": [365, 366, np.inf, 0],
    }
    for name, values in edges.items():
        column = np.array(cols[name])
        column[: len(values)] = values
        cols[name] = column
    batch = ContextBatch.from_columns(catalog, **cols)
    full = encoder.encode(batch)
    rows = np.stack([encoder.encode_row(batch.row(i)) for i in range(batch.n)])
    assert rows.dtype == np.float32 and rows.shape == full.shape
    np.testing.assert_allclose(rows, full, rtol=1e-6, atol=1e-6)
    names = encoder.spec.context_names
    tiers = rows[:3, [names.index(f"value_tier={t}") for t in ("mass", "potential", "hnw")]]
    np.testing.assert_array_equal(tiers, [[0, 1, 0], [0, 0, 1], [1, 0, 0]])


def test_encode_context_columns_carry_their_meaning(encoder: ContextEncoder) -> None:
    batch = random_context_batch(encoder.catalog, 300, np.random.default_rng(3))
    x = encoder.encode(batch)
    names = encoder.spec.context_names
    hnw = x[:, names.index("value_tier=hnw")] == 1.0
    assert np.array_equal(hnw, batch["aum_cny"] >= 6_000_000)
    sms = encoder.catalog.channel_names.index("sms")
    assert np.array_equal(x[:, names.index("consent=sms")] == 1.0, batch["consent"][:, sms])
    unassessed = x[:, names.index("risk_tolerance=unassessed")] == 1.0
    assert np.array_equal(unassessed, batch["risk_tolerance"] == 0)
    one_hot = [n for n in names if n.startswith("lifecycle=")]
    assert np.all(x[:, [names.index(n) for n in one_hot]].sum(axis=1) == 1.0)


def test_spec_version_is_stable_and_tracks_catalogue(encoder: ContextEncoder, tmp_path) -> None:
    assert ContextEncoder(load_catalog()).spec.version == encoder.spec.version
    import shutil

    from nextbest.catalog import DEFAULT_CATALOG_DIR

    shutil.copytree(DEFAULT_CATALOG_DIR, tmp_path / "catalog")
    offers = tmp_path / "catalog" / "offers.yaml"
    offers.write_text(
        offers.read_text()
        + "  - name: gold_savings\n    family: deposit\n    value_cny: 50\n"
        + "    channels: [app_push]\n"
    )
    other = ContextEncoder(load_catalog(tmp_path / "catalog"))
    assert other.spec.version != encoder.spec.version
    assert "holds=gold_savings" in other.spec.context_names


def test_action_features_one_hot_matches_catalogue() -> None:
    catalog = load_catalog()
    feats = action_features(catalog)
    names = action_feature_names(catalog)
    assert feats.shape == (catalog.n_actions, len(names))
    assert feats[0, names.index("no_contact")] == 1.0
    assert feats[0].sum() == 1.0
    a = catalog.action_id("sms:consumer_loan:evening")
    assert feats[a, names.index("channel=sms")] == 1.0
    assert feats[a, names.index("offer=consumer_loan")] == 1.0
    assert feats[a, names.index("timing=evening")] == 1.0
    assert feats[a, names.index("credit")] == 1.0
    r5 = catalog.action_id("app_push:wealth_r5:now")
    assert feats[r5, names.index("risk_level_scaled")] == pytest.approx(1.0)
    assert len({tuple(row) for row in feats}) == catalog.n_actions


def test_encode_login_hour_fits_slot_windows(encoder: ContextEncoder) -> None:
    """``login_hour_fits=<slot>``: the usual login hour inside a slot's window, or within one
    hour of now for the immediate slot; an unknown hour fits nothing."""
    catalog = encoder.catalog
    batch = random_context_batch(catalog, 4, np.random.default_rng(5))
    cols = dict(batch.columns)
    cols["usual_login_hour"] = np.array([9, 20, -1, 14], np.int8)
    cols["local_hour"] = np.array([3, 3, 3, 13], np.int8)
    x = encoder.encode(ContextBatch.from_columns(catalog, **cols))
    names = encoder.spec.context_names
    fits = {
        slot.name: x[:, names.index(f"login_hour_fits={slot.name}")].tolist()
        for slot in catalog.timing
    }
    assert fits["morning"] == [1.0, 0.0, 0.0, 0.0]
    assert fits["evening"] == [0.0, 1.0, 0.0, 0.0]
    assert fits["now"] == [0.0, 0.0, 0.0, 1.0]
    assert x[:, names.index("login_hour_known")].tolist() == [1.0, 1.0, 0.0, 1.0]


def test_encode_offer_views_log_scaled_per_offer(encoder: ContextEncoder) -> None:
    """``log_offer_views_30d=<offer>`` is log1p(views) / 2, in its offer's column only."""
    catalog = encoder.catalog
    batch = random_context_batch(catalog, 3, np.random.default_rng(6))
    cols = dict(batch.columns)
    views = np.zeros((3, catalog.n_offers), np.int32)
    views[1, 0] = 3
    cols["offer_views_30d"] = views
    x = encoder.encode(ContextBatch.from_columns(catalog, **cols))
    column = encoder.spec.context_names.index(f"log_offer_views_30d={catalog.offer_names[0]}")
    np.testing.assert_allclose(x[:, column], [0.0, np.log1p(3.0) / 2.0, 0.0], rtol=1e-6)


def test_aligned_context_columns_pair_each_member_with_its_own_columns(
    encoder: ContextEncoder,
) -> None:
    catalog = encoder.catalog
    spec = encoder.spec
    features = action_features(catalog)
    blocks = {b.factor: b for b in aligned_context_columns(spec, features)}
    assert set(blocks) == {"channel", "offer", "timing"}
    assert blocks["offer"].kinds == ("holds", "log_offer_views_30d")
    assert blocks["timing"].kinds == ("login_hour_fits",)
    assert "log_contacts_7d" in blocks["channel"].kinds
    member_index = {
        "channel": catalog.channel_index,
        "offer": catalog.offer_index,
        "timing": catalog.timing_index,
    }
    names = {
        "channel": catalog.channel_names,
        "offer": catalog.offer_names,
        "timing": catalog.timing_names,
    }
    for factor, block in blocks.items():
        assert block.columns.shape == (len(names[factor]), len(block.kinds))
        for m, member in enumerate(names[factor]):
            got = [spec.context_names[c] for c in block.columns[m]]
            assert got == [f"{kind}={member}" for kind in block.kinds]
        # each action belongs to exactly the member the catalogue gives it; no contact to none
        index = member_index[factor]
        expected = (index[None, :] == np.arange(len(names[factor]))[:, None]) & (index >= 0)
        np.testing.assert_array_equal(block.members, expected.astype(np.float32))
        assert block.members[:, 0].sum() == 0


def test_aligned_context_columns_refuse_other_action_features(encoder: ContextEncoder) -> None:
    features = action_features(encoder.catalog)
    with pytest.raises(ValueError, match="columns"):
        aligned_context_columns(encoder.spec, features[:, :-1])
