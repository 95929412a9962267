"""The contact store: caps and gaps hold across workers, the merge rule, pruning."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from nextbest.catalog import ActionCatalog
from nextbest.compliance import RuleEngine
from nextbest.context import ContactHistory, ContextBatch, parse_customer
from nextbest.privacy import pseudonymise_many
from nextbest.send_schedule import DST_MARGIN_HOURS, SendSchedule
from nextbest.timestamps import epoch_us
from serving.contact_history import (
    ContactBatch,
    ContactEvents,
    ContactStore,
    merge_contact_counts,
    merge_contact_history,
    merge_into_batch,
)
from serving.sqlite_contact_store import (
    _VECTOR_KEYS,
    SqliteContactStore,
    _RowRanges,
    store_key,
    store_keys,
)

NOW = datetime(2026, 1, 5, 4, 0, tzinfo=UTC)  # 12:00 in Asia/Shanghai, outside quiet hours
CHANNELS = ("app_push", "sms", "wechat", "outbound_call", "relationship_manager", "branch_invite")


def ago(days: float = 0.0, hours: float = 0.0) -> datetime:
    return NOW - timedelta(days=days, hours=hours)


def customer(catalog: ActionCatalog, history: dict[str, Any] | None = None) -> Any:
    """A customer every rule lets through on every channel, with ``history``."""
    return parse_customer(
        {
            "customer_id": "c-1",
            "age": 40,
            "aum_cny": 10_000_000.0,
            "income_band": "high",
            "risk_tolerance": "C5",
            "risk_assessed_on": "2025-12-20",
            "lifecycle_stage": "mature",
            "tenure_months": 60,
            "app_logins_30d": 12,
            "consented_channels": list(catalog.channel_names),
            "contact_history": history or {},
        },
        catalog,
    )


def contacts(
    ids: list[str],
    channel: str,
    at: datetime | list[datetime],
    key: str = "cust_a",
    kind: str = "recommended",
) -> ContactBatch:
    stamps = [at] * len(ids) if isinstance(at, datetime) else at
    return ContactBatch(
        contact_id=ids,
        customer_key=[key] * len(ids),
        channel=[channel] * len(ids),
        offer=[None] * len(ids),
        at_us=np.array([epoch_us(t) for t in stamps]),
        kind=kind,  # type: ignore[arg-type]
    )


@pytest.fixture
def store(tmp_path: Path, catalog: ActionCatalog) -> Iterator[SqliteContactStore]:
    with SqliteContactStore(tmp_path, catalog.channel_names) as s:
        yield s


def test_sqlite_contact_store_is_a_contact_store(store: SqliteContactStore) -> None:
    assert isinstance(store, ContactStore)
    assert store.channels == CHANNELS


def _blocking_rules(
    engine: RuleEngine, catalog: ActionCatalog, batch: ContextBatch, channel: str
) -> set[str | None]:
    verdict = engine.evaluate(batch)
    return {verdict.blocking_rule(0, a.id) for a in catalog.actions if a.channel == channel}


def test_channel_cap_holds_across_two_store_instances(
    tmp_path: Path, catalog: ActionCatalog, engine: RuleEngine
) -> None:
    with (
        SqliteContactStore(tmp_path, catalog.channel_names) as worker_1,
        SqliteContactStore(tmp_path, catalog.channel_names) as worker_2,
    ):
        # sms cap is 2 a week; the two contacts are 3 and 4 days old (no gap rule fires)
        worker_1.record(contacts(["d1"], "sms", ago(days=3))).result()
        worker_1.record(contacts(["d2"], "sms", ago(days=4))).result()
        batch = ContextBatch.from_contexts([customer(catalog)], catalog, NOW)

        before = _blocking_rules(engine, catalog, batch, "sms")
        events = worker_2.history(["cust_a"], NOW)
        after = _blocking_rules(engine, catalog, merge_into_batch(batch, events, NOW), "sms")

    assert before == {None}
    assert after == {"contact_cap_channel_7d"}


def test_minimum_gap_holds_across_two_store_instances(
    tmp_path: Path, catalog: ActionCatalog, engine: RuleEngine
) -> None:
    with (
        SqliteContactStore(tmp_path, catalog.channel_names) as worker_1,
        SqliteContactStore(tmp_path, catalog.channel_names) as worker_2,
    ):
        worker_1.record(contacts(["d1"], "app_push", ago(hours=2))).result()
        batch = ContextBatch.from_contexts([customer(catalog)], catalog, NOW)
        merged = merge_into_batch(batch, worker_2.history(["cust_a"], NOW), NOW)

    assert merged["hours_since_last_contact"][0] == pytest.approx(2.0)
    assert _blocking_rules(engine, catalog, merged, "wechat") == {"min_contact_gap"}
    assert engine.allowed_mask(merged)[0].sum() == 1  # only no-contact is left


def test_second_worker_to_commit_for_one_customer_is_refused(
    tmp_path: Path, catalog: ActionCatalog
) -> None:
    with (
        SqliteContactStore(tmp_path, catalog.channel_names) as worker_1,
        SqliteContactStore(tmp_path, catalog.channel_names) as worker_2,
    ):
        worker_1.record(contacts(["old"], "sms", ago(days=3), key="cust_b")).result()
        # both decide for cust_a on the same history: no contact yet
        seen_1 = worker_1.history(["cust_a", "cust_b"], NOW)
        seen_2 = worker_2.history(["cust_a"], NOW)
        assert seen_1.position == seen_2.position == 1

        first = worker_1.record_if_unchanged(
            contacts(["w1"], "sms", ago()), seen_1.position
        ).result()
        second = worker_2.record_if_unchanged(
            contacts(["w2"], "sms", ago()), seen_2.position
        ).result()
        # another customer's contact since the lookup does not refuse
        other = worker_2.record_if_unchanged(
            contacts(["w3"], "sms", ago(), key="cust_c"), seen_2.position
        ).result()
        again = worker_2.history(["cust_a"], NOW)

    assert first == [] and second == ["w2"] and other == []
    assert again.position == 3  # w1 and w3 stored, w2 not
    assert len(again.row) == 1  # only w1: worker 2 decides again on it


def test_a_refused_batch_stores_the_other_customers(
    store: SqliteContactStore, tmp_path: Path, catalog: ActionCatalog
) -> None:
    seen = store.history(["cust_a", "cust_b"], NOW).position
    with SqliteContactStore(tmp_path, catalog.channel_names) as other_worker:
        other_worker.record(contacts(["elsewhere"], "sms", ago(), key="cust_b")).result()
    batch = ContactBatch(
        ["d_a", "d_b"],
        ["cust_a", "cust_b"],
        ["sms", "sms"],
        [None, None],
        epoch_us(ago()),
        "recommended",
    )

    assert store.record_if_unchanged(batch, seen).result() == ["d_b"]
    events = store.history(["cust_a", "cust_b"], NOW)
    assert sorted(events.row.tolist()) == [0, 1]  # d_a, and cust_b's "elsewhere" only


def test_parts_announced_with_more_commit_together_and_an_empty_part_ends_them(
    store: SqliteContactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's parts commit in one transaction; a last part without any contact (every
    customer got "no contact") still ends it, at once rather than after the wait."""
    from nextbest import sqlite_writer

    monkeypatch.setattr(sqlite_writer, "MAX_HOLD_S", 60)
    before = store._writer.commits
    empty = ContactBatch([], [], [], [], epoch_us(ago()), "recommended")
    first = store.record_if_unchanged(contacts(["p1"], "sms", ago()), None, more=True)
    middle = store.record_if_unchanged(empty, None, more=True)
    second = store.record_if_unchanged(
        contacts(["p2"], "wechat", ago(), key="cust_b"), None, more=True
    )
    last = store.record_if_unchanged(empty, None)
    assert [f.result(10) for f in (first, middle, second, last)] == [[], [], [], []]
    assert store._writer.commits == before + 1
    assert sorted(store.history(["cust_a", "cust_b"], NOW).row.tolist()) == [0, 1]
    # no transaction open: an empty part is answered at once, without a write, even one
    # announcing more (nothing is held for it)
    assert store.record_if_unchanged(empty, None, more=True).done()
    assert store.record_if_unchanged(empty, None).done()
    assert store._writer.commits == before + 1
    # a part refused before it was submitted leaves nothing announced
    with pytest.raises(ValueError, match="not among the store's"):
        store.record_if_unchanged(contacts(["p3"], "pigeon", ago()), None, more=True)
    assert store.record_if_unchanged(empty, None).done()
    assert store._writer.commits == before + 1


@pytest.mark.parametrize("n", [1, 10, 200])  # one row; JSON rows; fixed-width records
def test_a_batch_goes_in_in_customer_order_each_row_whole(
    store: SqliteContactStore, n: int
) -> None:
    """Rows are sorted by customer before they are packed: every stored row keeps its own
    customer, channel, offer and times (a column left unsorted would swap them)."""
    rng = np.random.default_rng(n)
    ids = [f"sorted-{n}-{i}" for i in range(n)]
    keys = [f"cust_{k}" for k in rng.permutation(n)]
    channels = tuple(CHANNELS[int(c)] for c in rng.integers(0, len(CHANNELS), n))
    offers = [None if i % 3 == 0 else f"offer_{i}" for i in range(n)]
    at = epoch_us(ago()) + rng.integers(0, 10**9, n)
    latest = np.where(np.arange(n) % 2 == 0, at, at + 3_600_000_000)
    batch = ContactBatch(np.array(ids), keys, channels, offers, at, "recommended", latest)
    assert store.record_if_unchanged(batch, None).result() == []
    conn = sqlite3.connect(store.path)
    rows = conn.execute(
        "SELECT e.contact_id, e.customer, c.name, e.offer, e.at_us, e.latest_us "
        "FROM contact_events AS e JOIN channel_codes AS c ON c.code = e.channel "
        "WHERE e.contact_id LIKE ? ORDER BY e.rowid",
        (f"sorted-{n}-%",),
    ).fetchall()
    conn.close()
    expected = {
        ids[i]: (
            store_key(keys[i], store.key_scheme),
            channels[i],
            offers[i],
            int(at[i]),
            None if latest[i] == at[i] else int(latest[i]),
        )
        for i in range(n)
    }
    assert {row[0]: row[1:] for row in rows} == expected
    assert [row[1] for row in rows] == sorted(row[1] for row in rows)  # customer order


def test_a_delivery_changing_a_stored_contact_since_the_lookup_refuses(
    tmp_path: Path, catalog: ActionCatalog
) -> None:
    """A delivery replaces its recommendation in place (another channel, another time): the
    replaced row is as new to the check as a new row."""
    with (
        SqliteContactStore(tmp_path, catalog.channel_names) as worker_1,
        SqliteContactStore(tmp_path, catalog.channel_names) as worker_2,
    ):
        worker_2.record(contacts(["d0", "other"], "sms", ago(days=1))).result()
        seen = worker_1.history(["cust_a"], NOW).position
        # the platform reports d0 went out by WeChat this morning, to worker 2
        assert worker_2.record(contacts(["d0"], "wechat", ago(hours=2), kind="delivered")).result()
        refused = worker_1.record_if_unchanged(contacts(["d1"], "wechat", ago()), seen).result()

    assert refused == ["d1"]
    conn = sqlite3.connect(tmp_path / "contacts.db")
    try:
        rows = conn.execute(
            "SELECT rowid, contact_id, kind FROM contact_events ORDER BY rowid"
        ).fetchall()
    finally:
        conn.close()
    assert rows[-1] == (seen + 1, "d0", 1)  # d0 moved to a new last row id; d1 not stored


def test_row_ids_of_a_write_that_did_not_commit_are_not_the_stores(
    tmp_path: Path, catalog: ActionCatalog
) -> None:
    """A transaction rolled back at COMMIT leaves its row ids to other writers: the store
    must not skip its check for rows another worker then takes."""
    fail_commit = {"next": False}

    class FailingCommit(sqlite3.Connection):
        def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
            if sql == "COMMIT" and fail_commit["next"]:
                fail_commit["next"] = False
                raise sqlite3.OperationalError("disk I/O error (simulated)")
            return super().execute(sql, *args)  # type: ignore[arg-type]

    connect = sqlite3.connect
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sqlite3, "connect", lambda *a, **k: connect(*a, factory=FailingCommit, **k))
        worker_1 = SqliteContactStore(tmp_path, catalog.channel_names)
    with worker_1, SqliteContactStore(tmp_path, catalog.channel_names) as worker_2:
        fail_commit["next"] = True
        failed = worker_1.record_if_unchanged(contacts(["lost"], "sms", ago(), key="cust_y"), 0)
        with pytest.raises(sqlite3.OperationalError, match="simulated"):
            failed.result()
        seen_1 = worker_1.history(["cust_a"], NOW).position
        seen_2 = worker_2.history(["cust_a"], NOW).position
        assert worker_2.record_if_unchanged(contacts(["w2"], "sms", ago()), seen_2).result() == []
        # row 1 is worker 2's, though worker 1's failed write had it for a moment
        assert worker_1.record_if_unchanged(contacts(["w1"], "sms", ago()), seen_1).result() == [
            "w1"
        ]


def test_rows_the_store_itself_stored_since_the_lookup_are_not_checked(
    store: SqliteContactStore, tmp_path: Path, catalog: ActionCatalog
) -> None:
    """A process's own later rows were counted by its lookup (pending then) or were
    submitted after the contact being stored: only other processes' rows refuse."""
    seen = store.history(["cust_a"], NOW).position
    store.record(contacts(["mine"], "sms", ago())).result()
    assert store.record_if_unchanged(contacts(["d1"], "sms", ago()), seen).result() == []

    seen = store.history(["cust_a"], NOW).position
    with SqliteContactStore(tmp_path, catalog.channel_names) as other_worker:
        other_worker.record(contacts(["theirs"], "sms", ago(), key="cust_z")).result()
    store.record(contacts(["mine2"], "sms", ago())).result()
    # another process wrote since (for another customer): the check runs, and finds mine2
    assert store.record_if_unchanged(contacts(["d2"], "sms", ago()), seen).result() == ["d2"]


def test_row_ranges_merge_and_cover() -> None:
    ranges = _RowRanges()
    ranges.add(10, 20)
    ranges.add(20, 25)  # adjacent: one range (10, 25]
    ranges.add(30, 30)  # nothing inserted
    ranges.add(40, 41)
    assert ranges.cover(12, 25) and ranges.cover(40, 41) and ranges.cover(50, 50)
    assert not ranges.cover(9, 20)  # row 10 is not this store's
    assert not ranges.cover(20, 41)  # rows 26..40 are not
    for lo in range(100, 100 + 2 * _RowRanges.KEPT, 2):
        ranges.add(lo, lo + 1)
    assert not ranges.cover(12, 25)  # forgotten: checked again, never skipped wrongly


def test_rows_of_the_same_transaction_are_the_stores_and_others_still_refuse(
    tmp_path: Path, catalog: ActionCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two writes committed in one transaction (a batch's parts): the second does not check
    the first's rows, yet still refuses for a row another worker stored before."""
    checks: list[bool] = []
    cover = _RowRanges.cover

    def counting(self: _RowRanges, lo: int, hi: int) -> bool:
        checks.append(not cover(self, lo, hi))
        return cover(self, lo, hi)

    monkeypatch.setattr(_RowRanges, "cover", counting)
    with (
        SqliteContactStore(tmp_path, catalog.channel_names) as worker_1,
        SqliteContactStore(tmp_path, catalog.channel_names) as worker_2,
    ):
        for raced in (False, True):
            seen = worker_1.history(["cust_a", "cust_b"], NOW).position
            if raced:
                worker_2.record(contacts([f"theirs-{raced}"], "sms", ago(), key="cust_b")).result()
            gate = Future[None]()
            worker_1._writer.submit(lambda conn, gate=gate: gate.result(10))  # one group next
            first = worker_1.record_if_unchanged(
                contacts([f"a-{raced}"], "sms", ago(), key="cust_a"), seen
            )
            second = worker_1.record_if_unchanged(
                contacts([f"b-{raced}"], "sms", ago(), key="cust_b"), seen
            )
            gate.set_result(None)
            assert first.result() == [] and worker_1._writer.commits > 0
            assert second.result() == ([f"b-{raced}"] if raced else [])

    assert checks == [False, False, True, True]  # no check without another worker's row


def test_record_if_unchanged_without_position_stores_everything(
    store: SqliteContactStore,
) -> None:
    store.record(contacts(["d1"], "sms", ago())).result()
    assert store.record_if_unchanged(contacts(["d2"], "sms", ago()), None).result() == []
    assert len(store.history(["cust_a"], NOW).row) == 2
    with pytest.raises(ValueError, match="delivered"):
        store.record_if_unchanged(contacts(["d3"], "sms", ago(), kind="delivered"), 0)


def test_prune_keeps_the_last_row_so_row_ids_only_grow(
    store: SqliteContactStore, tmp_path: Path, catalog: ActionCatalog
) -> None:
    store.record(contacts(["d1", "d2"], "sms", ago(days=40))).result()
    seen = store.history(["cust_a"], NOW).position

    assert store.prune(epoch_us(ago(days=30))).result() == 1  # d1; d2 is the last row
    # had d2 gone, the next row would take its row id and pass for seen at ``seen``
    with SqliteContactStore(tmp_path, catalog.channel_names) as other_worker:
        other_worker.record(contacts(["d3"], "sms", ago())).result()
    assert store.record_if_unchanged(contacts(["d4"], "sms", ago()), seen).result() == ["d4"]


def test_contacts_one_query_for_a_batch(store: SqliteContactStore) -> None:
    keys = [f"cust_{i}" for i in range(500)]
    store.record(
        ContactBatch(keys, keys, ["sms"] * 500, [None] * 500, epoch_us(ago(days=1)), "delivered")
    ).result()
    statements: list[str] = []
    store._reader().set_trace_callback(statements.append)

    events = store.history(keys[::-1], NOW)

    assert sum(s.lstrip().upper().startswith("SELECT") for s in statements) == 1
    assert events.n == 500
    np.testing.assert_array_equal(np.sort(events.row), np.arange(500))
    assert (events.channel == CHANNELS.index("sms")).all()
    assert events.delivered.all()


def test_recorded_customers_are_found_whichever_path_read_their_keys(
    store: SqliteContactStore,
) -> None:
    """Keys are read with numpy for a batch of more than ``_VECTOR_KEYS``, in Python for
    fewer: contacts recorded one way are found when looked up the other way."""
    many = pseudonymise_many([f"customer-{i}" for i in range(_VECTOR_KEYS + 4)], b"k" * 32)
    store.record(  # one batch: numpy
        ContactBatch(
            many,
            many,
            ["sms"] * len(many),
            [None] * len(many),
            epoch_us(ago(days=1)),
            "recommended",
        )
    ).result()
    alone = pseudonymise_many(["customer-alone"], b"k" * 32)[0]
    store.record(contacts(["c-alone"], "wechat", ago(days=2), key=alone)).result()  # Python
    sms, wechat = CHANNELS.index("sms"), CHANNELS.index("wechat")

    few = store.history([many[3], alone, "cust_unknown"], NOW)  # Python
    assert sorted(zip(few.row.tolist(), few.channel.tolist(), strict=True)) == [
        (0, sms),
        (1, wechat),
    ]
    everyone = store.history([alone, *many], NOW)  # numpy
    assert sorted(everyone.row.tolist()) == list(range(len(many) + 1))
    assert everyone.channel[everyone.row == 0].tolist() == [wechat]
    rows = sqlite3.connect(store.path).execute("SELECT customer FROM contact_events").fetchall()
    assert sorted(r[0] for r in rows) == sorted(store_key(k, "digest") for k in [*many, alone])


def test_contacts_of_unknown_customers_and_old_contacts_are_empty(
    store: SqliteContactStore,
) -> None:
    store.record(contacts(["old"], "sms", ago(days=31))).result()
    events = store.history(["cust_a", "cust_b"], NOW)
    assert events.n == 2
    assert len(events.row) == 0
    assert store.history([], NOW).n == 0


def test_delivery_replaces_its_recommendation(store: SqliteContactStore) -> None:
    store.record(contacts(["d1"], "sms", ago(days=2))).result()
    store.record(contacts(["d1"], "sms", ago(days=1), kind="delivered")).result()
    store.record(contacts(["d1"], "sms", ago(days=3))).result()  # a retried recommendation

    events = store.history(["cust_a"], NOW)

    assert len(events.row) == 1
    assert events.delivered[0]
    assert events.at_us[0] == epoch_us(ago(days=1))


def test_contacts_on_channels_the_store_does_not_know_are_left_out(
    tmp_path: Path, catalog: ActionCatalog
) -> None:
    with SqliteContactStore(tmp_path, ["fax", *catalog.channel_names]) as old:
        old.record(contacts(["d1"], "fax", ago(days=1))).result()
        old.record(contacts(["d2"], "sms", ago(days=1))).result()
    with SqliteContactStore(tmp_path, catalog.channel_names) as store:
        events = store.history(["cust_a"], NOW)
    assert events.channel.tolist() == [CHANNELS.index("sms")]


def test_channel_added_by_a_later_catalogue_is_left_out_until_reopened(
    tmp_path: Path, catalog: ActionCatalog
) -> None:
    """A worker started on a newer catalogue adds a channel code; a store opened before it
    leaves that channel's contacts out, a store opened after it sees them."""
    with SqliteContactStore(tmp_path, catalog.channel_names) as early:
        with SqliteContactStore(tmp_path, [*catalog.channel_names, "fax"]) as newer:
            newer.record(contacts(["d1"], "fax", ago(days=1))).result()
            newer.record(contacts(["d2"], "sms", ago(days=1))).result()
            assert sorted(newer.history(["cust_a"], NOW).channel.tolist()) == [
                CHANNELS.index("sms"),
                len(CHANNELS),
            ]
        assert early.history(["cust_a"], NOW).channel.tolist() == [CHANNELS.index("sms")]


def test_record_refuses_a_channel_the_store_does_not_have(store: SqliteContactStore) -> None:
    with pytest.raises(ValueError, match=r"\['fax'\] not among"):
        store.record(contacts(["d1"], "fax", ago(days=1)))


LEGACY_DDL = (
    """CREATE TABLE contacts (contact_id TEXT PRIMARY KEY, customer_key TEXT NOT NULL,
        channel TEXT NOT NULL, offer TEXT, at_us INTEGER NOT NULL, kind INTEGER NOT NULL)""",
    "CREATE INDEX contacts_by_customer ON contacts (customer_key, at_us, channel, kind)",
)
"""The store's first layout (text customer keys and channel names)."""


def test_store_in_the_first_layout_is_moved_to_integer_keys(
    tmp_path: Path, catalog: ActionCatalog
) -> None:
    """A contacts file written by the text-keyed layout opens with every contact kept
    (deliveries still replace their recommendations) and the old table gone."""
    now = datetime.now(UTC)  # the first record prunes by the real clock

    def before(days: float) -> int:
        return epoch_us(now - timedelta(days=days))

    conn = sqlite3.connect(tmp_path / "contacts.db")
    for statement in LEGACY_DDL:
        conn.execute(statement)
    conn.executemany(
        "INSERT INTO contacts VALUES (?, ?, ?, ?, ?, ?)",
        [
            ("d1", "cust_a", "sms", "fund_sip", before(2), 0),
            ("d2", "cust_a", "wechat", None, before(1), 1),
            ("d3", "cust_b", "sms", None, before(5), 0),
            ("d4", "cust_b", "fax", None, before(3), 1),
            ("d5", "cust_b", "sms", None, before(45), 1),  # past the retention: dropped
        ],
    )
    conn.commit()
    conn.close()
    with SqliteContactStore(tmp_path, catalog.channel_names) as store:
        events = store.history(["cust_a", "cust_b"], now)
        got = sorted(
            zip(
                events.row.tolist(),
                [CHANNELS[c] for c in events.channel],
                events.delivered.tolist(),
                strict=True,
            )
        )
        assert got == [(0, "sms", False), (0, "wechat", True), (1, "sms", False)]
        delivered = contacts(["d1"], "sms", now - timedelta(hours=3), kind="delivered")
        store.record(delivered).result()
        assert sorted(store.history(["cust_a"], now).delivered.tolist()) == [True, True]
    with SqliteContactStore(tmp_path, [*catalog.channel_names, "fax"]) as with_fax:
        assert len(with_fax.history(["cust_b"], now).row) == 2  # the fax contact was kept
        assert len(with_fax.contacts(["cust_b"], 0).row) == 2  # d5 was not moved
    conn = sqlite3.connect(tmp_path / "contacts.db")
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()
    assert "contacts" not in tables


def test_two_workers_opening_a_first_layout_store_at_once_move_it_once(
    tmp_path: Path, catalog: ActionCatalog
) -> None:
    """Workers start together: one moves the contacts, the other waits and finds it done."""
    now = datetime.now(UTC)
    conn = sqlite3.connect(tmp_path / "contacts.db")
    for statement in LEGACY_DDL:
        conn.execute(statement)
    conn.executemany(
        "INSERT INTO contacts VALUES (?, ?, 'sms', NULL, ?, 0)",
        [(f"d{i}", f"cust_{i % 50}", epoch_us(now - timedelta(hours=i))) for i in range(500)],
    )
    conn.commit()
    conn.close()
    start = threading.Barrier(2)

    def open_store() -> SqliteContactStore:
        start.wait()
        return SqliteContactStore(tmp_path, catalog.channel_names)

    with ThreadPoolExecutor(2) as pool:
        stores = list(pool.map(lambda _: open_store(), range(2)))
    try:
        for store in stores:
            events = store.history([f"cust_{i}" for i in range(50)], now)
            assert len(events.row) == 500
            assert np.bincount(events.row).tolist() == [10] * 50
    finally:
        for store in stores:
            store.close()


def test_store_keys_are_63_bit_and_stable() -> None:
    """Stored contacts are found by these integers: neither scheme may ever change."""
    pseudonyms = pseudonymise_many([f"customer-{i}" for i in range(1000)], b"k" * 32)
    ints = store_keys(pseudonyms, "digest")
    # digest: a pseudonym's first 16 hex digits, the last bit dropped
    assert ints[0] == int(pseudonyms[0][5:21], 16) >> 1
    assert ints.dtype == np.int64 and len(set(ints.tolist())) == 1000
    assert ((ints >= 0) & (ints < 2**63)).all()

    # any other key, and every key of a file in the hashed scheme: a keyed hash
    def hashed(key: str) -> int:
        digest = hashlib.blake2b(key.encode(), digest_size=8, person=b"nextbest-contact")
        return int.from_bytes(digest.digest()) >> 1

    assert store_key("cust_a", "digest") == hashed("cust_a")
    assert store_key(pseudonyms[0], "hashed") == hashed(pseudonyms[0])
    assert store_keys(pseudonyms[:30], "hashed").tolist() == [
        store_key(k, "hashed") for k in pseudonyms[:30]
    ]


def test_store_keys_of_a_batch_equal_each_key_alone() -> None:
    """The batch reads pseudonyms with numpy, a key alone in Python: the same integers,
    whatever the mix (a key that only looks like a pseudonym is hashed in both)."""
    pseudonyms = pseudonymise_many([f"customer-{i}" for i in range(40)], b"k" * 32)
    hexes = "0123456789abcdef"
    odd = [
        "cust_" + "A" * 24,  # upper-case digits
        "cust_" + "0" * 23,  # one digit short
        "cust_" + "0" * 25,  # one too many
        "cust_" + "0" * 23 + "g",
        "cust-" + "0" * 24,
        "x" * 29,
        "cust_\u00e9" + "0" * 23,  # non-ASCII, 29 characters
        "cust_ 0" + "0" * 22,  # int() would skip the space
        "cust_" + "0_" * 12,  # and the underscores
        "",
        # 28 + 30 characters: concatenated, two 29-character pseudonyms
        "cust_" + hexes[:23],
        "a" + "cust_" + hexes * 1 + hexes[:8],
    ]
    rng = np.random.default_rng(0)
    for trial in range(20):
        mixed = pseudonyms + odd[: trial % len(odd) + 1]
        order = rng.permutation(len(mixed))
        keys = [mixed[i] for i in order]
        assert store_keys(keys, "digest").tolist() == [store_key(k, "digest") for k in keys]
    # only pseudonyms, every length of batch around the switch to numpy
    for n in (1, 35, 36, 37, 40):
        assert store_keys(pseudonyms[:n], "digest").tolist() == [
            store_key(k, "digest") for k in pseudonyms[:n]
        ]
    # side by side, enough of them for numpy: the misaligned pair is hashed there too
    assert _VECTOR_KEYS < 40
    assert (
        store_keys(odd[-2:] * 20, "digest").tolist()
        == [store_key(k, "digest") for k in odd[-2:]] * 20
    )
    assert store_keys([], "digest").shape == (0,)


def test_a_new_file_reads_pseudonyms_and_an_older_one_keeps_hashing(tmp_path: Path) -> None:
    """The key scheme is fixed per file: a file with contacts from before the digest scheme
    keeps finding them by their hashes, and a new file reads pseudonyms."""
    key = pseudonymise_many(["customer-1"], b"k" * 32)[0]
    with SqliteContactStore(tmp_path / "new.db", CHANNELS) as store:
        assert store.key_scheme == "digest"
        store.record(contacts(["d1"], "sms", ago(hours=2), key=key)).result()
    with SqliteContactStore(tmp_path / "new.db", CHANNELS) as store:
        assert store.key_scheme == "digest"
        assert len(store.contacts([key], epoch_us(ago(days=1))).row) == 1
    stored = sqlite3.connect(tmp_path / "new.db").execute("SELECT customer FROM contact_events")
    assert stored.fetchall() == [(store_key(key, "digest"),)]

    old = tmp_path / "old.db"
    with SqliteContactStore(old, CHANNELS) as store:
        store.record(contacts(["d1"], "sms", ago(hours=2), key=key)).result()
    conn = sqlite3.connect(old)  # as a file written before the scheme was kept
    conn.execute("DROP TABLE store_meta")
    conn.execute("UPDATE contact_events SET customer = ?", (store_key(key, "hashed"),))
    conn.commit()
    conn.close()
    with SqliteContactStore(old, CHANNELS) as store:
        assert store.key_scheme == "hashed"
        assert len(store.contacts([key], epoch_us(ago(days=1))).row) == 1
        store.record(contacts(["d2"], "wechat", ago(hours=1), key=key)).result()
        assert len(store.contacts([key] * 20, epoch_us(ago(days=1))).row) == 40
    with SqliteContactStore(old, CHANNELS) as store:
        assert store.key_scheme == "hashed"
    conn = sqlite3.connect(old)
    conn.execute("UPDATE store_meta SET value = 'rot13'")
    conn.commit()
    conn.close()
    with pytest.raises(ValueError, match="unknown customer key scheme 'rot13'"):
        SqliteContactStore(old, CHANNELS)


def test_recommended_contacts_of_decisions_skip_no_contact(catalog: ActionCatalog) -> None:
    sms = next(a for a in catalog.actions if a.channel == "sms")
    batch = ContactBatch.recommended(
        ["d0", "d1", "d2"], ["k0", "k1", "k2"], np.array([0, sms.id, 0]), catalog, NOW
    )
    assert list(batch.contact_id) == ["d1"]
    assert list(batch.channel) == ["sms"]
    assert list(batch.offer) == [sms.offer]
    assert batch.kind == "recommended"


@pytest.mark.parametrize(
    ("timing", "hour", "weekday", "hours_later"),
    [
        ("now", 8, 0, 0),
        ("evening", 8, 0, 21 - 8),  # Monday 08:xx: tonight's window ends at 21:00
        ("evening", 20, 0, 1),  # inside the window: its end
        ("evening", 21, 0, 24),  # ended: tomorrow's
        ("morning", 23, 2, 11 - 23 + 24),
        ("weekend", 9, 3, 2 * 24 + 12 - 9),  # Thursday: Saturday's window
        ("weekend", 11, 5, 1),  # Saturday inside the window
        ("weekend", 12, 5, 7 * 24),  # Saturday after it: next Saturday's
        ("weekend", 9, 6, 6 * 24 + 12 - 9),  # Sunday
    ],
)
def test_a_scheduled_contact_may_be_sent_until_the_end_of_its_next_window(
    catalog: ActionCatalog, timing: str, hour: int, weekday: int, hours_later: int
) -> None:
    action = next(a for a in catalog.actions if a.channel == "sms" and a.timing == timing)
    schedule = SendSchedule.of(catalog)
    at = schedule.latest_send_us(np.array([action.id]), NOW, np.array([hour]), np.array([weekday]))
    margin = 0 if timing == "now" else DST_MARGIN_HOURS  # a daylight-saving change meanwhile
    assert int(at[0]) == epoch_us(NOW) + (hours_later + margin) * 3_600_000_000


@pytest.mark.parametrize(
    ("zone", "decided", "timing", "window_end"),
    [  # fall-back nights: the window's end comes an hour later in UTC than at the decision
        ("America/New_York", datetime(2027, 11, 6, 22, 0), "morning", datetime(2027, 11, 7, 11)),
        ("Europe/London", datetime(2027, 10, 30, 22, 0), "morning", datetime(2027, 10, 31, 11)),
        ("Australia/Lord_Howe", datetime(2027, 4, 3, 22, 0), "morning", datetime(2027, 4, 4, 11)),
        ("America/New_York", datetime(2027, 11, 6, 13, 30), "weekend", datetime(2027, 11, 13, 12)),
        ("America/New_York", datetime(2027, 3, 13, 22, 0), "morning", datetime(2027, 3, 14, 11)),
    ],
)
def test_a_scheduled_contact_is_never_counted_before_its_window_ends_across_dst(
    catalog: ActionCatalog, zone: str, decided: datetime, timing: str, window_end: datetime
) -> None:
    tz = ZoneInfo(zone)
    now = decided.replace(tzinfo=tz)
    action = next(a for a in catalog.actions if a.channel == "sms" and a.timing == timing)
    at = SendSchedule.of(catalog).latest_send_us(
        np.array([action.id]), now, np.array([now.hour]), np.array([now.weekday()])
    )
    end = epoch_us(window_end.replace(tzinfo=tz))
    assert end <= int(at[0]) <= end + 2 * 3_600_000_000


def test_a_scheduled_contact_gaps_count_from_its_latest_send_its_counts_do_not_move() -> None:
    """An evening SMS decided at 08:30 may go out until 21:00. The next morning a platform
    that sends its own history (one SMS, last at 19:30, the real send) must not see it twice;
    and the gap to a next contact counts from 21:00, not from 08:30."""
    decided = epoch_us(datetime(2026, 3, 2, 0, 30, tzinfo=UTC))  # 08:30 in Shanghai
    latest = decided + 12 * 3_600_000_000 + 30 * 60_000_000  # 21:00
    sent = decided + 11 * 3_600_000_000  # 19:30, as the platform reports it
    now = decided + 24 * 3_600_000_000 + 30 * 60_000_000  # 09:00 the next day
    sms = CHANNELS.index("sms")
    request = np.zeros((1, len(CHANNELS)))
    request[0, sms] = 1
    events = _scheduled_sms(decided, latest)
    c7, c30, last = merge_contact_counts(request, request, np.array([float(sent)]), events, now)
    assert (c7[0, sms], c30[0, sms]) == (1, 1)
    assert last[0] == latest


def test_a_store_without_latest_times_gains_them_on_open(
    tmp_path: Path, catalog: ActionCatalog
) -> None:
    """A file of the layout before scheduled contacts' latest time: the column is added,
    the covering index replaced, and its contacts read with their latest time = their time."""
    path = tmp_path / "contacts.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE channel_codes (code INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)")
    conn.execute(
        "CREATE TABLE contact_events (contact_id TEXT PRIMARY KEY, customer INTEGER NOT NULL, "
        "channel INTEGER NOT NULL, offer TEXT, at_us INTEGER NOT NULL, kind INTEGER NOT NULL)"
    )
    conn.execute(
        "CREATE INDEX contact_events_by_customer ON contact_events (customer, at_us, channel, kind)"
    )
    conn.execute("INSERT INTO channel_codes (name) VALUES ('sms')")
    at = epoch_us(ago(hours=2))
    conn.execute(
        "INSERT INTO contact_events VALUES ('d1', ?, 1, NULL, ?, 0)",
        (store_key("cust_old", "digest"), at),
    )
    conn.commit()
    conn.close()
    with SqliteContactStore(path, CHANNELS) as store:
        events = store.contacts(["cust_old"], epoch_us(ago(days=1)))
        assert list(events.at_us) == [at] and list(events.latest_us) == [at]
    conn = sqlite3.connect(path)
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    conn.close()
    assert "contact_events_by_customer_latest" in indexes
    assert "contact_events_by_customer" not in indexes


def test_contact_batch_bad_arrays_refused() -> None:
    with pytest.raises(ValueError, match="channel has 1 rows"):
        ContactBatch(["a", "b"], ["k", "k"], ["sms"], [None, None], 0, "delivered")
    with pytest.raises(ValueError, match="kind"):
        ContactBatch(["a"], ["k"], ["sms"], [None], 0, "sent")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the merge rule


def _scheduled_sms(decided_us: int, latest_us: int) -> ContactEvents:
    """One customer's SMS recommended at ``decided_us``, to be sent by ``latest_us``."""
    return ContactEvents(
        1,
        np.array([0]),
        np.array([CHANNELS.index("sms")]),
        np.array([decided_us]),
        np.array([False]),
        np.array([latest_us]),
    )


def _events(*contacts_: tuple[str, datetime, bool]) -> ContactEvents:
    """Stored contacts of one customer: (channel, at, delivered)."""
    m = len(contacts_)
    return ContactEvents(
        1,
        np.zeros(m, np.int64),
        np.array([CHANNELS.index(c) for c, _, _ in contacts_], np.int64),
        np.array([epoch_us(t) for _, t, _ in contacts_], np.int64),
        np.array([d for _, _, d in contacts_], bool),
    )


MERGES = [
    # (request history, stored contacts, count_recommended, sms 7d, sms 30d, last contact)
    pytest.param({}, [], True, 0, 0, None, id="nothing"),
    pytest.param(
        {},
        [("sms", ago(days=1), True), ("sms", ago(days=10), False)],
        True,
        1,
        2,
        ago(days=1),
        id="stored-only, by window",
    ),
    pytest.param(
        {"contacts_7d": {"sms": 1}, "contacts_30d": {"sms": 1}, "last_contact_at": ago(days=2)},
        [("sms", ago(days=2), True)],
        True,
        1,
        1,
        ago(days=2),
        id="the same contact in both: counted once",
    ),
    pytest.param(
        {"contacts_7d": {"sms": 1}, "contacts_30d": {"sms": 1}, "last_contact_at": ago(days=2)},
        [("sms", ago(days=1), False)],
        True,
        2,
        2,
        ago(days=1),
        id="stored after the caller's last contact: added",
    ),
    pytest.param(
        {"contacts_7d": {"sms": 1}, "contacts_30d": {"sms": 3}, "last_contact_at": ago(days=2)},
        [("sms", ago(days=5), True), ("sms", ago(days=6), True)],
        True,
        2,
        3,
        ago(days=2),
        id="stored before the caller's last contact: maximum",
    ),
    pytest.param(
        {},
        [("sms", ago(days=1), False), ("sms", ago(days=3), True)],
        False,
        1,
        1,
        ago(days=3),
        id="recommendations not counted when asked",
    ),
]


@pytest.mark.parametrize(
    ("request_history", "stored", "count_recommended", "sms_7d", "sms_30d", "last"), MERGES
)
def test_merge_contact_history(
    request_history: dict[str, Any],
    stored: list[tuple[str, datetime, bool]],
    count_recommended: bool,
    sms_7d: int,
    sms_30d: int,
    last: datetime | None,
) -> None:
    merged = merge_contact_history(
        ContactHistory(**request_history), _events(*stored), 0, CHANNELS, NOW, count_recommended
    )
    assert merged.contacts_7d.get("sms", 0) == sms_7d
    assert merged.contacts_30d.get("sms", 0) == sms_30d
    assert merged.last_contact_at == last


@pytest.mark.parametrize(
    ("request_history", "stored", "count_recommended", "sms_7d", "sms_30d", "last"), MERGES
)
def test_merge_into_batch_follows_the_same_rule(
    catalog: ActionCatalog,
    request_history: dict[str, Any],
    stored: list[tuple[str, datetime, bool]],
    count_recommended: bool,
    sms_7d: int,
    sms_30d: int,
    last: datetime | None,
) -> None:
    history = {**request_history}
    if "last_contact_at" in history:
        history["last_contact_at"] = history["last_contact_at"].isoformat()
    batch = ContextBatch.from_contexts([customer(catalog, history)], catalog, NOW)

    merged = merge_into_batch(batch, _events(*stored), NOW, count_recommended=count_recommended)

    sms = CHANNELS.index("sms")
    assert merged["contacts_7d"][0, sms] == sms_7d
    assert merged["contacts_30d"][0, sms] == sms_30d
    assert merged["contacts_7d_total"][0] == sms_7d
    expected_hours = np.inf if last is None else (NOW - last) / timedelta(hours=1)
    assert merged["hours_since_last_contact"][0] == pytest.approx(expected_hours, rel=1e-5)


def test_merge_into_batch_random_customers_agrees_with_one_at_a_time(
    catalog: ActionCatalog,
) -> None:
    rng = np.random.default_rng(7)
    n, m = 40, 300
    events = ContactEvents(
        n,
        rng.integers(0, n, m),
        rng.integers(0, len(CHANNELS), m),
        np.array([epoch_us(ago(days=d)) for d in rng.uniform(0, 29, m)]),
        rng.random(m) < 0.5,
    )
    histories = []
    for i in range(n):
        c30 = {ch: int(k) for ch, k in zip(CHANNELS, rng.integers(0, 3, 6), strict=True) if k}
        c7 = {ch: min(k, int(rng.integers(0, 2))) for ch, k in c30.items()}
        last = ago(days=float(rng.uniform(0, 20))) if i % 3 else None
        if last is None:  # counted contacts need a last one: a third count none (no horizon)
            c30, c7 = {}, {}
        histories.append(
            {
                "contacts_7d": c7,
                "contacts_30d": c30,
                "last_contact_at": None if last is None else last.isoformat(),
            }
        )
    batch = ContextBatch.from_contexts([customer(catalog, h) for h in histories], catalog, NOW)

    merged = merge_into_batch(batch, events, NOW)

    for i, history in enumerate(histories):
        one = merge_contact_history(ContactHistory(**history), events, i, CHANNELS, NOW)
        expected = ContextBatch.from_contexts(
            [customer(catalog, one.model_dump(mode="json"))], catalog, NOW
        )
        for column in ("contacts_7d", "contacts_30d", "contacts_30d_total"):
            np.testing.assert_array_equal(merged[column][i], expected[column][0])
        np.testing.assert_allclose(
            merged["hours_since_last_contact"][i],
            expected["hours_since_last_contact"][0],
            rtol=1e-5,
        )


def test_merge_contact_counts_events_of_another_batch_refused() -> None:
    with pytest.raises(ValueError, match="events are for 2 customers"):
        merge_contact_counts(
            np.zeros((1, 6)),
            np.zeros((1, 6)),
            np.array([-np.inf]),
            ContactEvents.empty(2),
            epoch_us(NOW),
        )


# --------------------------------------------------------------------------- retention


def test_prune_deletes_only_contacts_older_than_the_cut(store: SqliteContactStore) -> None:
    store.record(contacts(["old1", "old2"], "sms", ago(days=40))).result()
    store.record(contacts(["new"], "sms", ago(days=29))).result()

    deleted = store.prune(epoch_us(ago(days=30))).result()

    assert deleted == 2
    assert len(store.contacts(["cust_a"], 0).row) == 1


def test_prune_walks_the_table_in_chunks(
    store: SqliteContactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("serving.sqlite_contact_store._PRUNE_CHUNK_ROWS", 3)
    stamps = [ago(days=40 if i % 2 else 1) for i in range(11)]
    store.record(contacts([f"d{i}" for i in range(11)], "sms", stamps)).result()

    assert store.prune(epoch_us(ago(days=30))).result() == 5
    assert len(store.contacts(["cust_a"], 0).row) == 6


def test_record_prunes_rows_past_the_retention(tmp_path: Path, catalog: ActionCatalog) -> None:
    long_ago = datetime.now(UTC) - timedelta(days=45)
    with SqliteContactStore(tmp_path, catalog.channel_names, prune_every=timedelta(0)) as store:
        store.record(contacts(["old"], "sms", long_ago)).result()
        store.record(contacts(["new"], "sms", datetime.now(UTC))).result()
        store.record(contacts(["newer"], "sms", datetime.now(UTC))).result()
        store.flush()
        # pruned before the third write (the last row is never pruned: row ids only grow)
        assert store.contacts(["cust_a"], 0).row.tolist() == [0, 0]


def test_retention_shorter_than_the_longest_window_refused(
    tmp_path: Path, catalog: ActionCatalog
) -> None:
    with pytest.raises(ValueError, match="longest window"):
        SqliteContactStore(tmp_path, catalog.channel_names, retention=timedelta(days=7))


def test_contact_store_writes_survive_reopen(tmp_path: Path, catalog: ActionCatalog) -> None:
    with SqliteContactStore(tmp_path, catalog.channel_names) as store:
        future = store.record(contacts(["d1", "d2"], "wechat", ago(days=1)))
    assert future.result() == 2
    with SqliteContactStore(tmp_path, catalog.channel_names) as store:
        assert len(store.history(["cust_a"], NOW).row) == 2
    conn = sqlite3.connect(tmp_path / "contacts.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_one_customer_merge_keeps_the_latest_send_time() -> None:
    decided, latest = epoch_us(ago(hours=12)), epoch_us(ago(hours=2))
    merged = merge_contact_history(
        ContactHistory(), _scheduled_sms(decided, latest), 0, CHANNELS, NOW
    )
    assert merged.contacts_7d == {"sms": 1}
    assert merged.last_contact_at is not None and epoch_us(merged.last_contact_at) == latest


def test_a_scheduled_contact_counts_towards_a_cap_while_it_may_still_be_sent() -> None:
    """A weekend call decided last Monday may go out on Saturday: this Monday, 7 days after
    the decision, it still counts in the 7-day window (it would not by its decision time),
    and two days later it no longer does."""
    decided = epoch_us(ago(days=7, hours=1))
    latest = epoch_us(ago(days=2))  # Saturday's window end
    sms = CHANNELS.index("sms")
    none = np.zeros((1, len(CHANNELS)))
    events = _scheduled_sms(decided, latest)
    c7, c30, _ = merge_contact_counts(none, none, np.array([-np.inf]), events, epoch_us(NOW))
    assert (c7[0, sms], c30[0, sms]) == (1, 1)
    later = epoch_us(NOW + timedelta(days=5, hours=1))
    c7, c30, _ = merge_contact_counts(none, none, np.array([-np.inf]), events, later)
    assert (c7[0, sms], c30[0, sms]) == (0, 1)


def test_the_store_finds_and_keeps_a_contact_while_it_may_still_be_sent(
    store: SqliteContactStore,
) -> None:
    """Read back and pruned by the latest time it may be sent, not by its decision time:
    pending in this store, committed, and after a prune."""
    batch = ContactBatch(
        ["late"],
        ["cust_a"],
        ["sms"],
        [None],
        epoch_us(ago(days=31)),
        "recommended",
        latest_us=np.array([epoch_us(ago(days=25))]),
    )
    window_start = epoch_us(ago(days=30))
    gate = threading.Event()
    store._writer.submit(lambda conn: gate.wait(10))  # hold the writer: the contact pends
    written = store.record(batch)
    assert len(store.contacts(["cust_a"], window_start).row) == 1  # pending
    gate.set()
    written.result()
    assert len(store.contacts(["cust_a"], window_start).row) == 1  # committed
    store.record(contacts(["last"], "sms", ago())).result()  # the prune keeps the last row
    assert store.prune(window_start).result() == 0
    assert len(store.contacts(["cust_a"], window_start).row) == 2
    assert store.prune(epoch_us(ago(days=24))).result() == 1


def test_restrictions_are_stored_per_customer_kept_and_merged(
    store: SqliteContactStore, catalog: ActionCatalog, tmp_path: Path
) -> None:
    from serving.customer_restrictions import Restriction, apply_restrictions

    keys = ["cust_a", "cust_b", "cust_c"]
    assert len(store.restrictions(keys)) == 0  # nothing stored: one cheap query
    early, late = epoch_us(ago(days=40)), epoch_us(ago(days=2))
    written = store.restrict(
        [
            Restriction("cust_a", "opt_out", "sms", early),
            Restriction("cust_a", "complaint", None, late),
            Restriction("cust_b", "opt_out", None, early),
        ]
    ).result()
    assert written == 3
    # a repeat changes nothing; an older one does not move the latest, a later one does
    assert store.restrict([Restriction("cust_a", "opt_out", "sms", early)]).result() == 0
    assert store.restrict([Restriction("cust_a", "complaint", None, early)]).result() == 0
    assert store.restrict([Restriction("cust_b", "opt_out", None, late)]).result() == 1
    store.prune(epoch_us(NOW)).result()  # contacts are pruned, restrictions kept
    with SqliteContactStore(tmp_path, catalog.channel_names) as other:  # another worker
        found = other.restrictions(keys)
        events, together = other.lookup(keys, 0)  # what a decision reads: both at once
    for name in ("row", "kind", "channel", "at_us"):
        np.testing.assert_array_equal(getattr(together, name), getattr(found, name))
    assert events.n == 3 and together.n == 3
    assert found.n == 3 and len(found) == 3
    assert set(found.row.tolist()) == {0, 1}  # cust_c has none
    batch = ContextBatch.from_contexts([customer(catalog)] * 3, catalog, NOW)
    merged = apply_restrictions(batch, found, NOW)
    sms = catalog.channel_names.index("sms")
    assert merged["opt_out"][0, sms] and merged["opt_out"][0].sum() == 1
    assert merged["opted_out_all"].tolist() == [False, True, False]
    assert merged["days_since_complaint"][0] == 2.0  # the latest of the two complaints
    assert np.isinf(merged["days_since_complaint"][1:]).all()
    # the request's own restrictions are never removed: its wechat opt-out stays beside a
    # stored SMS one, and its complaint of yesterday beats a stored one of 40 days ago
    own = {"opt_outs": ["wechat"], "last_complaint_at": ago(days=1)}
    opted = ContextBatch.from_contexts(
        [parse_customer({**customer(catalog).model_dump(), **own}, catalog)], catalog, NOW
    )
    stored = type(found)(
        1,
        np.array([0, 0]),
        np.array([0, 1]),  # kinds: opt-out, complaint
        np.array([sms, -1]),
        np.array([epoch_us(ago(days=40))] * 2),
    )
    kept = apply_restrictions(opted, stored, NOW)
    wechat = catalog.channel_names.index("wechat")
    assert kept["opt_out"][0, wechat] and kept["opt_out"][0, sms]
    assert kept["days_since_complaint"][0] == pytest.approx(1.0, abs=1e-4)


def test_a_stored_opt_out_binds_until_a_later_consent_and_again_after_a_later_opt_out(
    store: SqliteContactStore, catalog: ActionCatalog
) -> None:
    """Per channel, the latest opt-out (of it or of every channel) against the latest
    consent (to it or to every channel); a tie keeps the opt-out."""
    from serving.customer_restrictions import Restriction, apply_restrictions, opt_outs_in_force

    channels = catalog.channel_names
    sms, push = channels.index("sms"), channels.index("app_push")
    t = [epoch_us(ago(days=d)) for d in (30, 20, 10, 5)]

    def in_force(key: str) -> tuple[list[str], bool]:
        found = opt_outs_in_force(store.restrictions([key]), len(channels))
        if not len(found.rows):
            return [], False
        return [c for c, on in zip(channels, found.channels[0], strict=True) if on], bool(
            found.every[0]
        )

    store.restrict([Restriction("cust_a", "opt_out", "sms", t[1])]).result()
    assert in_force("cust_a") == (["sms"], False)
    store.restrict([Restriction("cust_a", "consent", "sms", t[0])]).result()  # before it
    assert in_force("cust_a") == (["sms"], False)
    store.restrict([Restriction("cust_a", "consent", "app_push", t[2])]).result()  # elsewhere
    assert in_force("cust_a") == (["sms"], False)
    store.restrict([Restriction("cust_a", "consent", "sms", t[1])]).result()  # a tie
    assert in_force("cust_a") == (["sms"], False)
    store.restrict([Restriction("cust_a", "consent", None, t[2])]).result()  # every channel
    assert in_force("cust_a") == ([], False)
    store.restrict([Restriction("cust_a", "opt_out", "sms", t[3])]).result()  # opted out again
    assert in_force("cust_a") == (["sms"], False)

    store.restrict([Restriction("cust_b", "opt_out", None, t[1])]).result()
    assert in_force("cust_b") == (list(channels), True)
    store.restrict([Restriction("cust_b", "consent", "app_push", t[2])]).result()
    assert in_force("cust_b") == ([c for c in channels if c != "app_push"], False)

    keys = ["cust_a", "cust_b", "cust_c"]
    batch = ContextBatch.from_contexts([customer(catalog)] * 3, catalog, NOW)
    merged = apply_restrictions(batch, store.restrictions(keys), NOW)
    assert merged["opt_out"][0].tolist() == [i == sms for i in range(len(channels))]
    assert merged["opt_out"][1].tolist() == [i != push for i in range(len(channels))]
    assert not merged["opt_out"][2].any() and not merged["opted_out_all"].any()
