"""Caps and minimum gaps hold between decisions for one customer made at the same moment:
concurrent requests grouped together, a batch naming the customer twice, a decision made
while another's contact is still being committed; a bad request spoils only itself."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections import Counter
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import customer
from fastapi import HTTPException
from fastapi.testclient import TestClient

from nextbest.catalog import ActionCatalog
from nextbest.decision_journal import read_journal
from nextbest.privacy import pseudonymise
from nextbest.timestamps import epoch_us
from serving import metrics
from serving.app import create_app
from serving.contact_history import ContactBatch, ContactEvents
from serving.schemas import BatchDecisionRequest, DecisionRequest, DecisionResponse
from serving.service import ScoringService
from serving.settings import Settings
from serving.sqlite_contact_store import SqliteContactStore

SMS = "sms:health_insurance:now"
"""An action the test model ranks first for the example customer; the SMS rules allow one
such contact a day (minimum gap 24 h)."""


@pytest.fixture
def greedy_settings(api_settings: Settings) -> Settings:
    """No exploration: every decision is the best allowed action."""
    return api_settings.model_copy(update={"epsilon": 0.0})


def _post_together(
    client: TestClient, bodies: list[dict[str, object]], headers: dict[str, str]
) -> list[httpx.Response]:
    """Send ``bodies`` to /v1/decisions at once, in one event loop (so the service groups
    them), through the app ``client`` started."""

    async def send() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=client.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await asyncio.gather(
                *(http.post("/v1/decisions", json=b, headers=headers) for b in bodies)
            )

    return asyncio.run(send())


def test_concurrent_requests_for_one_customer_get_one_contact(
    greedy_settings: Settings, auth: dict[str, dict[str, str]]
) -> None:
    body = {"customer": customer(customer_id="same-1"), "candidates": [SMS]}
    with TestClient(create_app(greedy_settings)) as client:
        first = client.post("/v1/decisions", json=body, headers=auth["decide"]).json()
        assert first["chosen"]["action"] == SMS  # else the test proves nothing
        client.app.state.service.contacts.flush()
        other = {"customer": customer(customer_id="same-2"), "candidates": [SMS]}
        answers = _post_together(client, [other] * 6, auth["decide"])
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    chosen = Counter(a.json()["chosen"]["action"] for a in answers)
    assert chosen == Counter({SMS: 1, "no_contact": 5})


def test_a_batch_naming_a_customer_twice_is_refused(
    api_client: TestClient, auth: dict[str, dict[str, str]]
) -> None:
    customers = [customer(customer_id="a"), customer(customer_id="b"), customer(customer_id="a")]
    response = api_client.post(
        "/v1/decisions/batch", json={"customers": customers}, headers=auth["decide"]
    )
    assert response.status_code == 422
    assert "customer_id of row 2 repeats row 0" in response.text


def test_a_bad_request_grouped_with_good_ones_fails_alone(
    greedy_settings: Settings, auth: dict[str, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that passes validation but breaks its group's decision (here the contact
    store refuses its customer) must not take the requests grouped with it down."""
    poison = pseudonymise("poison-1", greedy_settings.pseudonym_key)
    with TestClient(create_app(greedy_settings)) as client:
        store = client.app.state.service.contacts
        lookup = store.lookup  # what a decision reads

        def refuse_poison(keys: list[str], since_us: int):  # type: ignore[no-untyped-def]
            if poison in keys:
                raise ValueError("cannot look this customer up")
            return lookup(keys, since_us)

        monkeypatch.setattr(store, "lookup", refuse_poison)
        bodies = [{"customer": customer(customer_id=f"good-{i}")} for i in range(3)]
        bodies.append({"customer": customer(customer_id="poison-1")})
        answers = _post_together(client, bodies, auth["decide"])
    assert [a.status_code for a in answers] == [200, 200, 200, 500]


def test_lookup_counts_contacts_not_yet_committed(tmp_path: Path, catalog: ActionCatalog) -> None:
    """A decision made while an earlier decision's contact is still being committed sees
    that contact; once committed it is counted once, from the store."""
    store = SqliteContactStore(tmp_path, catalog.channel_names)
    key = pseudonymise("pending-1", b"k" * 32)
    now_us = epoch_us(datetime.now(UTC))
    gate = Future[None]()
    store._writer.submit(lambda conn: gate.result(10))  # holds the writer thread
    recorded = store.record(
        ContactBatch(["d1"], [key], ["sms"], ["health_insurance"], now_us, "recommended")
    )
    pending = store.contacts([key, "cust_other"], now_us - 1)
    assert not recorded.done()
    assert (list(pending.row), list(pending.at_us), list(pending.delivered)) == (
        [0],
        [now_us],
        [False],
    )
    assert store.channels[pending.channel[0]] == "sms"
    gate.set_result(None)
    assert recorded.result(10) == 1
    committed = store.contacts([key], now_us - 1)
    assert list(committed.row) == [0]  # from the store now, not twice
    store.close()


def test_lookup_counts_every_pending_write_once_per_row_it_is_asked_for(
    tmp_path: Path, catalog: ActionCatalog
) -> None:
    """Several writes pending at once: a customer's contacts from each of them, for each
    row the customer takes in the lookup; none older than the window, none of others."""
    store = SqliteContactStore(tmp_path, catalog.channel_names)
    a, b, c = (pseudonymise(f"pending-{i}", b"k" * 32) for i in "abc")
    now_us = epoch_us(datetime.now(UTC))
    gate = Future[None]()
    store._writer.submit(lambda conn: gate.result(10))  # holds the writer thread
    writes = [
        store.record(
            ContactBatch(
                ["d1", "d2", "d3"],
                [a, b, a],
                ["sms", "app_push", "outbound_call"],
                ["health_insurance", None, "car_loan"],
                np.array([now_us, now_us, now_us - 10_000_000]),
                "recommended",
                latest_us=np.array([now_us + 3_600_000_000, now_us, now_us - 10_000_000]),
            )
        ),
        store.record(ContactBatch(["m1"], [b], ["sms"], [None], now_us + 5, "delivered")),
        store.record(ContactBatch(["m2"], [c], ["sms"], [None], now_us + 6, "delivered")),
    ]
    events = store.contacts([b, a, "nobody", a], now_us - 1)  # d3 is older: left out
    found = sorted(
        zip(
            events.row.tolist(),
            [store.channels[i] for i in events.channel],
            events.at_us.tolist(),
            events.delivered.tolist(),
            np.asarray(events.latest_us).tolist(),
            strict=True,
        )
    )
    assert found == [
        (0, "app_push", now_us, False, now_us),
        (0, "sms", now_us + 5, True, now_us + 5),
        (1, "sms", now_us, False, now_us + 3_600_000_000),
        (3, "sms", now_us, False, now_us + 3_600_000_000),
    ]
    gate.set_result(None)
    assert [w.result(10) for w in writes] == [3, 1, 1]
    store.flush(10)  # a write's done-callbacks (forgetting it) run after its result is set
    assert store._pending == {}
    committed = store.contacts([b, a, "nobody", a], now_us - 1)
    assert sorted(committed.row.tolist()) == [0, 0, 1, 3]  # from the store now, not twice
    store.close()


def test_a_failed_write_is_not_counted(tmp_path: Path, catalog: ActionCatalog) -> None:
    store = SqliteContactStore(tmp_path, catalog.channel_names)
    key = pseudonymise("failed-1", b"k" * 32)
    now_us = epoch_us(datetime.now(UTC))
    store._writer.submit(lambda conn: conn.execute("DROP TABLE contact_events")).result(10)
    failed = store.record(
        ContactBatch(["d1"], [key], ["sms"], ["health_insurance"], now_us, "recommended")
    )
    with pytest.raises(Exception, match="contact_events"):
        failed.result(10)
    store.flush(10)  # a write's done-callbacks (forgetting it) run after its result is set
    assert store._pending == {}
    store.close()


def test_a_contact_committed_during_a_lookup_is_not_missed(
    tmp_path: Path, catalog: ActionCatalog
) -> None:
    """The write commits after the lookup read the pending contacts and before it queries
    the store: counted (twice at worst), never lost between the two."""
    store = SqliteContactStore(tmp_path, catalog.channel_names)
    key = pseudonymise("racing-1", b"k" * 32)
    now_us = epoch_us(datetime.now(UTC))
    gate = Future[None]()
    store._writer.submit(lambda conn: gate.result(10))
    recorded = store.record(
        ContactBatch(["d1"], [key], ["sms"], ["health_insurance"], now_us, "recommended")
    )
    read_pending = store._pending_of

    def then_commit(keys: list[int], since_us: int) -> ContactEvents | None:
        found = read_pending(keys, since_us)
        gate.set_result(None)
        recorded.result(10)  # committed, and forgotten by the pending map, right now
        return found

    store._pending_of = then_commit  # type: ignore[method-assign]
    events = store.contacts([key], now_us - 1)
    assert len(events.row) >= 1
    store.close()


# --------------------------------------------------------------------------- across workers


def _other_worker_decides_during_lookup(
    first: ScoringService, second: ScoringService, body: dict[str, object]
) -> list[DecisionResponse]:
    """Make ``second`` decide ``body`` (in its own thread and event loop, as another worker
    process would) right after ``first``'s next contact-store lookup: both then decide on
    the same history. Returns ``second``'s answer, once ``first``'s lookup has returned."""
    answers: list[DecisionResponse] = []
    lookup = first.contacts.lookup  # what a decision reads

    def lookup_then_other_worker(keys: list[str], since_us: int) -> tuple[Any, Any]:
        events = lookup(keys, since_us)
        if not answers:
            if "customers" in body:  # a batch: its body, decoded
                batch = BatchDecisionRequest.model_validate(body)
                decide = lambda: json.loads(asyncio.run(second.decide_batch(batch)))  # noqa: E731
            else:
                request = DecisionRequest.model_validate(body)
                decide = lambda: asyncio.run(second.decide(request))  # noqa: E731
            worker = threading.Thread(target=lambda: answers.append(decide()))
            worker.start()
            worker.join(30)
        return events

    first.contacts.lookup = lookup_then_other_worker  # type: ignore[method-assign]
    return answers


def _decided_again() -> float:
    return metrics.DECIDED_AGAIN._value.get()  # type: ignore[attr-defined]


def test_two_workers_deciding_one_customer_at_once_contact_once(
    greedy_settings: Settings,
) -> None:
    body = {"customer": customer(customer_id="raced-1"), "candidates": [SMS]}
    first, second = ScoringService.start(greedy_settings), ScoringService.start(greedy_settings)
    before = _decided_again()
    try:
        theirs = _other_worker_decides_during_lookup(first, second, body)
        mine = asyncio.run(first.decide(DecisionRequest.model_validate(body)))
    finally:
        first.close()
        second.close()

    assert theirs[0].chosen.action == SMS  # committed first
    assert mine.chosen.action == "no_contact"  # decided again, on the history with that SMS
    assert _decided_again() == before + 1
    journal = read_journal(greedy_settings.state_dir)
    served = dict(
        zip(journal["decision_id"].to_pylist(), journal["action"].to_pylist(), strict=True)
    )
    no_contact = first.catalog.action_id("no_contact")
    assert served == {
        theirs[0].decision_id: first.catalog.action_id(SMS),
        mine.decision_id: no_contact,
    }
    key = pseudonymise("raced-1", greedy_settings.pseudonym_key)
    with SqliteContactStore(greedy_settings.state_dir, first.catalog.channel_names) as store:
        assert len(store.contacts([key], 0).row) == 1
    conn = sqlite3.connect(first.journal.path)
    try:  # the refused first decision was journalled, then withdrawn
        (withdrawn,) = conn.execute("SELECT decision_id FROM withdrawn").fetchone()
        (stored,) = conn.execute("SELECT count(*) FROM decisions").fetchone()
    finally:
        conn.close()
    assert stored == 3 and withdrawn not in served


def _batch_racing_another_worker(
    settings: Settings, ids: list[str], raced: str
) -> tuple[DecisionResponse, bytes | HTTPException]:
    """A batch of ``ids`` decided by one service while another decides ``raced`` alone on
    the same history (SMS only); the other's answer, and the batch's body or its error."""
    batch = BatchDecisionRequest.model_validate(
        {"customers": [customer(customer_id=i) for i in ids], "candidates": [SMS]}
    )
    first, second = ScoringService.start(settings), ScoringService.start(settings)
    try:
        theirs = _other_worker_decides_during_lookup(
            first, second, {"customer": customer(customer_id=raced), "candidates": [SMS]}
        )
        try:
            mine: bytes | HTTPException = asyncio.run(first.decide_batch(batch))
        except HTTPException as exc:
            mine = exc
    finally:
        first.close()
        second.close()
    (their_answer,) = theirs
    return their_answer, mine


def test_a_batch_decides_again_only_the_customers_another_worker_contacted(
    greedy_settings: Settings, catalog: ActionCatalog
) -> None:
    ids = [f"batch-raced-{i}" for i in range(4)]
    theirs, body = _batch_racing_another_worker(greedy_settings, ids, ids[2])
    assert isinstance(body, bytes)
    mine = json.loads(body)["decisions"]

    assert theirs.chosen.action == SMS
    assert [d["action"] for d in mine] == [SMS, SMS, "no_contact", SMS]
    journal = read_journal(greedy_settings.state_dir)
    assert sorted(journal["decision_id"].to_pylist()) == sorted(
        [theirs.decision_id, *(d["decision_id"] for d in mine)]
    )
    keys = [pseudonymise(i, greedy_settings.pseudonym_key) for i in ids]
    with SqliteContactStore(greedy_settings.state_dir, catalog.channel_names) as store:
        assert np.bincount(store.contacts(keys, 0).row, minlength=4).tolist() == [1, 1, 1, 1]


def test_customers_refused_every_round_fail_the_batch_and_none_of_it_stays_journalled(
    greedy_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rounds-1 is refused in the one round there is: the batch fails (503), so rounds-0's
    decision, committed in the same part, is not served either and is withdrawn."""
    monkeypatch.setattr("serving.service.MAX_DECISION_ROUNDS", 1)
    ids = ["rounds-0", "rounds-1"]
    batch_served = metrics.DECISIONS.labels(endpoint="batch")
    before = batch_served._value.get()  # type: ignore[attr-defined]
    theirs, refused = _batch_racing_another_worker(greedy_settings, ids, ids[1])

    assert isinstance(refused, HTTPException) and refused.status_code == 503
    assert theirs.chosen.action == SMS
    journal = read_journal(greedy_settings.state_dir)
    assert journal["decision_id"].to_pylist() == [theirs.decision_id]
    assert batch_served._value.get() == before  # type: ignore[attr-defined]  # none served


def test_a_failure_deciding_again_withdraws_the_whole_part(
    greedy_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rounds-1 is refused and deciding it again fails (its lookup raises): the batch fails,
    and rounds-0's decision, committed in the same part, is withdrawn with it."""
    lookups = []
    merge_stored = ScoringService._merge_stored

    def third_lookup_fails(self: ScoringService, *args: object) -> object:
        lookups.append(1)  # the batch's, the other worker's, then the batch's second round
        if len(lookups) == 3:
            raise RuntimeError("contact store unreachable")
        return merge_stored(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(ScoringService, "_merge_stored", third_lookup_fails)
    ids = ["again-0", "again-1"]
    with pytest.raises(RuntimeError, match="unreachable"):
        _batch_racing_another_worker(greedy_settings, ids, ids[1])

    journal = read_journal(greedy_settings.state_dir)
    theirs_only = [pseudonymise(ids[1], greedy_settings.pseudonym_key)]
    assert journal["customer_key"].to_pylist() == theirs_only
    assert len(lookups) == 3


def test_a_request_refused_every_round_fails_alone(
    greedy_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two requests decided in one group; another worker contacts the first one's customer
    meanwhile, and one round is all there is: the first gets 503, the second its answer."""
    monkeypatch.setattr("serving.service.MAX_DECISION_ROUNDS", 1)
    bodies = [
        {"customer": customer(customer_id=f"group-{i}"), "candidates": [SMS]} for i in range(2)
    ]
    first, second = ScoringService.start(greedy_settings), ScoringService.start(greedy_settings)

    async def both() -> list[DecisionResponse | BaseException]:
        requests = [DecisionRequest.model_validate(b) for b in bodies]
        return await asyncio.gather(*(first.decide(r) for r in requests), return_exceptions=True)

    try:
        theirs = _other_worker_decides_during_lookup(first, second, bodies[0])
        refused, served = asyncio.run(both())
    finally:
        first.close()
        second.close()

    assert isinstance(refused, HTTPException) and refused.status_code == 503
    assert isinstance(served, DecisionResponse) and served.chosen.action == SMS
    journal = read_journal(greedy_settings.state_dir)
    assert sorted(journal["decision_id"].to_pylist()) == sorted(
        [theirs[0].decision_id, served.decision_id]
    )


def test_every_part_of_a_failed_batch_withdraws_its_refused_decisions(
    greedy_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch in parts of one customer, both contacted by another worker meanwhile, one
    round allowed: the batch fails, and neither part leaves its unserved SMS in the journal
    (the second part too, settled though the first already failed)."""
    monkeypatch.setattr("serving.service.MAX_DECISION_ROUNDS", 1)
    monkeypatch.setattr("serving.service.PIPELINE_ROWS", 1)
    body = {"customers": [customer(customer_id=f"part-{i}") for i in range(2)], "candidates": [SMS]}
    first, second = ScoringService.start(greedy_settings), ScoringService.start(greedy_settings)
    try:
        theirs = _other_worker_decides_during_lookup(first, second, body)
        with pytest.raises(HTTPException) as refused:
            asyncio.run(first.decide_batch(BatchDecisionRequest.model_validate(body)))
    finally:
        first.close()
        second.close()

    assert refused.value.status_code == 503
    journal = read_journal(greedy_settings.state_dir)
    served = [d["decision_id"] for d in theirs[0]["decisions"]]  # type: ignore[index]
    assert sorted(journal["decision_id"].to_pylist()) == sorted(served)


def test_a_batch_in_parts_decides_again_in_the_right_rows(
    greedy_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("serving.service.PIPELINE_ROWS", 2)
    ids = [f"parts-{i}" for i in range(5)]
    theirs, body = _batch_racing_another_worker(greedy_settings, ids, ids[3])
    assert isinstance(body, bytes)
    mine = json.loads(body)["decisions"]

    assert [d["action"] for d in mine] == [SMS, SMS, SMS, "no_contact", SMS]
    journal = read_journal(greedy_settings.state_dir)
    by_id = dict(
        zip(journal["decision_id"].to_pylist(), journal["customer_key"].to_pylist(), strict=True)
    )
    keys = [pseudonymise(i, greedy_settings.pseudonym_key) for i in ids]
    assert [by_id[d["decision_id"]] for d in mine] == keys
    assert by_id[theirs.decision_id] == keys[3]


def test_a_decision_whose_contact_cannot_be_stored_is_not_left_in_the_journal(
    greedy_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal commits, the contact store fails: the request fails, and the journal
    does not keep a decision nobody was answered."""
    service = ScoringService.start(greedy_settings)

    def failing(*args: object, **kwargs: object) -> Future[list[str]]:
        failed: Future[list[str]] = Future()
        failed.set_exception(sqlite3.OperationalError("disk I/O error (simulated)"))
        return failed

    monkeypatch.setattr(service.contacts, "record_if_unchanged", failing)
    body = {"customer": customer(customer_id="unstored-1"), "candidates": [SMS]}
    try:
        with pytest.raises(sqlite3.OperationalError, match="simulated"):
            asyncio.run(service.decide(DecisionRequest.model_validate(body)))
        service.journal.flush()
        conn = sqlite3.connect(service.journal.path)
        try:
            (stored,) = conn.execute("SELECT count(*) FROM decisions").fetchone()
        finally:
            conn.close()
    finally:
        service.close()

    assert stored == 1  # it was journalled, side by side with the failed contact write
    assert len(read_journal(greedy_settings.state_dir)) == 0  # and then withdrawn


# --------------------------------------------------------------------------- failing writes


def test_a_contact_write_refused_at_once_withdraws_the_journalled_decisions(
    greedy_settings: Settings,
) -> None:
    """The contact store refuses the write before queueing it (its writer is closed) after
    the journal took the decisions: the requests fail and no decision stays journalled, for a
    single request and for a batch."""
    service = ScoringService.start(greedy_settings)
    service.contacts._writer.close()  # the journal's writer is still up
    single = DecisionRequest.model_validate(
        {"customer": customer(customer_id="refused-at-once"), "candidates": [SMS]}
    )
    batch = BatchDecisionRequest.model_validate(
        {"customers": [customer(customer_id=f"refused-{i}") for i in range(3)]}
    )
    try:
        with pytest.raises(RuntimeError, match="closed"):
            asyncio.run(service.decide(single))
        with pytest.raises(RuntimeError, match="closed"):
            asyncio.run(service.decide_batch(batch))
        service.journal.flush()
        with sqlite3.connect(service.journal.path) as conn:
            stored = conn.execute("SELECT count(*) FROM decisions").fetchone()[0]
    finally:
        service.close()
    assert stored == 4  # journalled, then withdrawn
    assert read_journal(greedy_settings.state_dir).num_rows == 0


def test_a_second_round_contact_write_refused_at_once_withdraws_it(
    greedy_settings: Settings,
) -> None:
    """Refused in the first round (another worker stored an old delivery for the customer
    after the lookup), decided again, and that round's contact write is refused at once: the
    request fails and neither round's decision stays journalled."""
    first, second = ScoringService.start(greedy_settings), ScoringService.start(greedy_settings)
    key = pseudonymise("redo-1", greedy_settings.pseudonym_key)
    lookup, record = first.contacts.lookup, first.contacts.record_if_unchanged
    writes: list[int] = []

    def lookup_then_other_worker(keys: list[str], since_us: int) -> tuple[Any, Any]:
        events = lookup(keys, since_us)
        if not writes:
            old = epoch_us(datetime.now(UTC)) - 48 * 3_600_000_000
            delivered = ContactBatch(["msg-1"], [key], ["sms"], [None], old, "delivered")
            second.contacts.record(delivered).result(10)
        return events

    def second_write_refused(*args: Any, **kwargs: Any) -> Future[list[str]]:
        writes.append(1)
        if len(writes) == 2:
            raise RuntimeError("contact store closed")
        return record(*args, **kwargs)

    first.contacts.lookup = lookup_then_other_worker  # type: ignore[method-assign]
    first.contacts.record_if_unchanged = second_write_refused  # type: ignore[method-assign]
    body = {"customer": customer(customer_id="redo-1"), "candidates": [SMS]}
    try:
        with pytest.raises(RuntimeError, match="closed"):
            asyncio.run(first.decide(DecisionRequest.model_validate(body)))
        journal = read_journal(greedy_settings.state_dir)
    finally:
        first.close()
        second.close()
    assert len(writes) == 2
    assert journal.num_rows == 0


def test_a_refused_decision_that_cannot_be_withdrawn_still_lets_the_others_be_served(
    greedy_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Two requests decided together; another worker contacts the first one's customer; the
    journal fails to withdraw the refused decision: both requests are still answered (the
    first decided again), and the failure is logged."""
    first, second = ScoringService.start(greedy_settings), ScoringService.start(greedy_settings)
    bodies = [{"customer": customer(customer_id=f"wd-{i}"), "candidates": [SMS]} for i in range(2)]
    theirs = _other_worker_decides_during_lookup(first, second, bodies[0])
    withdraw = first.journal.withdraw
    calls: list[list[str]] = []

    def first_withdrawal_fails(ids: list[str]) -> Future[int]:
        calls.append(list(ids))
        if len(calls) == 1:
            failed: Future[int] = Future()
            failed.set_exception(sqlite3.OperationalError("database is locked"))
            return failed
        return withdraw(ids)

    first.journal.withdraw = first_withdrawal_fails  # type: ignore[method-assign]

    async def both() -> list[DecisionResponse | BaseException]:
        requests = [DecisionRequest.model_validate(b) for b in bodies]
        return await asyncio.gather(*(first.decide(r) for r in requests), return_exceptions=True)

    try:
        answers = asyncio.run(both())
    finally:
        first.close()
        second.close()
    assert theirs and theirs[0].chosen.action == SMS
    assert all(isinstance(a, DecisionResponse) for a in answers), answers
    assert len(calls) == 1
    assert "could not withdraw 1 unserved decisions" in caplog.text
