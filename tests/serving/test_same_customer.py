"""Caps and minimum gaps hold between decisions for one customer made at the same moment:
concurrent requests grouped together, a batch naming the customer twice, a decision made
while another's contact is still being committed; a bad request spoils only itself."""

from __future__ import annotations

import asyncio
from collections import Counter
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from conftest import customer
from fastapi.testclient import TestClient

from nextbest.catalog import ActionCatalog
from nextbest.decision_journal import epoch_us
from nextbest.privacy import pseudonymise
from serving.app import create_app
from serving.contact_store import ContactBatch, SqliteContactStore
from serving.settings import Settings

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
        lookup = store.contacts

        def refuse_poison(keys: list[str], since_us: int):  # type: ignore[no-untyped-def]
            if poison in keys:
                raise ValueError("cannot look this customer up")
            return lookup(keys, since_us)

        monkeypatch.setattr(store, "contacts", refuse_poison)
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

    def then_commit(keys: list[int], since_us: int) -> list[tuple[int, int, int, bool]]:
        found = read_pending(keys, since_us)
        gate.set_result(None)
        recorded.result(10)  # committed, and forgotten by the pending map, right now
        return found

    store._pending_of = then_commit  # type: ignore[method-assign]
    events = store.contacts([key], now_us - 1)
    assert len(events.row) >= 1
    store.close()
