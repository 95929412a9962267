"""POST /v1/decisions and /v1/decisions/batch: answers, bad input, compliance over HTTP."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import customer, in_one_utc_hour
from fastapi.testclient import TestClient

from nextbest.catalog import ActionCatalog
from nextbest.compliance import RuleEngine
from nextbest.context import ContextBatch, parse_customer
from serving.app import create_app
from serving.settings import Settings


def test_post_decision_returns_ranked_allowed_actions(
    api_client: TestClient, auth: dict[str, dict[str, str]]
) -> None:
    response = api_client.post(
        "/v1/decisions", json={"customer": customer(), "k": 3}, headers=auth["decide"]
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["decision_id"]) == 32
    assert 1 <= len(body["ranked"]) <= 3
    scores = [r["score"] for r in body["ranked"]]
    assert scores == sorted(scores, reverse=True)
    assert 0 < body["chosen"]["propensity"] <= 1
    assert body["exploration"] == "epsilon_greedy"
    assert body["model_version"].startswith("file:")
    assert body["blocked"] is None


def test_post_decision_explain_lists_blocked_actions_with_rules(
    api_client: TestClient, auth: dict[str, dict[str, str]], catalog: ActionCatalog
) -> None:
    payload = {"customer": customer(risk_tolerance="C1"), "k": 50, "explain": True}
    body = api_client.post("/v1/decisions", json=payload, headers=auth["decide"]).json()
    blocked = {b["action"]: b["rule"] for b in body["blocked"]}
    served = {r["action"] for r in body["ranked"]} | {body["chosen"]["action"]}
    assert not served & set(blocked)
    assert blocked["app_push:wealth_r5:now"] == "suitability_risk"
    assert blocked["outbound_call:fund_sip:now"] == "consent"
    assert len(blocked) + len(served) <= catalog.n_actions


def test_post_decision_never_serves_a_blocked_action(
    api_client: TestClient,
    auth: dict[str, dict[str, str]],
    catalog: ActionCatalog,
    engine: RuleEngine,
) -> None:
    rng = np.random.default_rng(3)
    channels = list(catalog.channel_names)
    for i in range(60):
        data = customer(
            customer_id=f"never-blocked-{i}",
            age=int(rng.integers(18, 90)),
            aum_cny=float(np.exp(rng.uniform(5, 16))),
            risk_tolerance=["C1", "C2", "C3", "C4", "C5"][i % 5],
            consented_channels=[c for c in channels if rng.random() < 0.5],
            opt_outs=[c for c in channels if rng.random() < 0.2],
            litigation=bool(rng.random() < 0.2),
            opted_out_all=bool(i % 17 == 0),
            contact_history={},
        )
        response = api_client.post(
            "/v1/decisions", json={"customer": data, "k": 50}, headers=auth["decide"]
        )
        assert response.status_code == 200, response.text
        body = response.json()
        batch = ContextBatch.from_contexts(
            [parse_customer(data, catalog)], catalog, datetime.now(UTC)
        )
        allowed = engine.allowed_mask(batch)[0]
        for action in [body["chosen"]] + body["ranked"]:
            assert allowed[action["action_index"]], action["action"]


def test_post_decision_schema_violation_names_fields(
    api_client: TestClient, auth: dict[str, dict[str, str]]
) -> None:
    payload = {"customer": customer(age=-3, consented_channels=["carrier_pigeon"]), "k": 0}
    response = api_client.post("/v1/decisions", json=payload, headers=auth["decide"])
    assert response.status_code == 422
    locs = {tuple(e["loc"]) for e in response.json()["detail"]}
    assert ("body", "customer", "age") in locs
    assert ("body", "customer", "consented_channels") in locs
    assert ("body", "k") in locs
    assert "c-0001" not in response.text  # offending values are not echoed back


def test_post_decision_malformed_json_is_422(
    api_client: TestClient, auth: dict[str, dict[str, str]]
) -> None:
    response = api_client.post(
        "/v1/decisions",
        content=b'{"customer": ',
        headers={**auth["decide"], "Content-Type": "application/json"},
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["type"] == "json_invalid"


def test_post_decision_unknown_action_id_is_400(
    api_client: TestClient, auth: dict[str, dict[str, str]]
) -> None:
    payload = {"customer": customer(), "candidates": ["sms:fund_sip:now", "sms:moon:now"]}
    response = api_client.post("/v1/decisions", json=payload, headers=auth["decide"])
    assert response.status_code == 400
    assert "sms:moon:now" in response.json()["detail"]


def test_post_decision_unknown_campaign_is_400(
    api_client: TestClient, auth: dict[str, dict[str, str]]
) -> None:
    payload = {"customer": customer(), "campaign_id": "no_such_campaign"}
    response = api_client.post("/v1/decisions", json=payload, headers=auth["decide"])
    assert response.status_code == 400
    assert "no_such_campaign" in response.json()["detail"]


def test_post_decision_unknown_channel_option_is_400(
    api_client: TestClient, auth: dict[str, dict[str, str]]
) -> None:
    payload = {"customer": customer(), "channels": ["fax"]}
    response = api_client.post("/v1/decisions", json=payload, headers=auth["decide"])
    assert response.status_code == 400


def test_post_decision_candidates_campaign_and_channels_limit_the_answer(
    api_client: TestClient, auth: dict[str, dict[str, str]]
) -> None:
    payload = {
        "customer": customer(),
        "campaign_id": "pension_drive",
        "channels": ["app_push"],
        "k": 50,
    }
    body = api_client.post("/v1/decisions", json=payload, headers=auth["decide"]).json()
    for action in [body["chosen"], *body["ranked"]]:
        assert action["action"] == "no_contact" or (
            action["channel"] == "app_push"
            and action["offer"] in {"personal_pension", "investor_education"}
        )
    only = {"customer": customer(), "candidates": ["app_push:fund_sip:now"], "k": 5}
    body = api_client.post("/v1/decisions", json=only, headers=auth["decide"]).json()
    assert {r["action"] for r in body["ranked"]} <= {"app_push:fund_sip:now", "no_contact"}


def test_post_batch_decides_every_customer_in_order(
    api_client: TestClient, auth: dict[str, dict[str, str]]
) -> None:
    customers = [customer(customer_id=f"batch-{i}", age=20 + i) for i in range(50)]
    response = api_client.post(
        "/v1/decisions/batch", json={"customers": customers, "k": 2}, headers=auth["decide"]
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["decisions"]) == 50
    assert len({d["decision_id"] for d in body["decisions"]}) == 50
    for d in body["decisions"]:
        assert 1 <= len(d["ranked"]) <= 2
        assert len(d["scores"]) == len(d["ranked"])
        assert 0 < d["propensity"] <= 1


@pytest.mark.parametrize("invalid", [False, True])
def test_post_batch_oversized_is_413(
    api_settings: Settings, auth: dict[str, dict[str, str]], invalid: bool
) -> None:
    settings = api_settings.model_copy(update={"max_batch": 5})
    with TestClient(create_app(settings)) as client:
        customers = [customer(customer_id=f"big-{i}") for i in range(6)]
        if invalid:  # refused for its size whatever else is wrong: 413, not 422
            customers[-1]["age"] = 999
        response = client.post(
            "/v1/decisions/batch", json={"customers": customers}, headers=auth["decide"]
        )
    assert response.status_code == 413
    assert response.json()["detail"] == "batch of 6 customers; at most 5 per request"


def test_post_decision_oversized_body_is_413(
    api_settings: Settings, auth: dict[str, dict[str, str]]
) -> None:
    settings = api_settings.model_copy(update={"max_body_bytes": 2048})
    with TestClient(create_app(settings)) as client:
        customers = [customer(customer_id=f"big-{i}") for i in range(20)]
        declared = client.post(
            "/v1/decisions/batch", json={"customers": customers}, headers=auth["decide"]
        )
        chunks = (part for part in [b'{"customers": [', b" " * 4096, b"]}"])
        chunked = client.post(
            "/v1/decisions/batch",
            content=chunks,
            headers={**auth["decide"], "Content-Type": "application/json"},
        )
    assert declared.status_code == 413
    assert chunked.status_code == 413


def _columns(customers: list[dict[str, object]], catalog: ActionCatalog) -> dict[str, object]:
    from nextbest.customer_columns import CustomerColumns

    parsed = [parse_customer(c, catalog) for c in customers]
    return CustomerColumns.from_contexts(parsed).model_dump(mode="json", exclude_none=True)


def test_post_batch_as_columns_ranks_as_the_customer_objects(
    api_client: TestClient,
    auth: dict[str, dict[str, str]],
    catalog: ActionCatalog,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The columnar body is another spelling of the same customers: same ranked actions and
    scores as the objects validated one by one (the service would turn them into columns
    too: not here), with other ids (the first call's recommended contacts would cap the
    second's), both calls in one hour (the local hour is a feature)."""

    def both(attempt: int) -> tuple[httpx.Response, httpx.Response]:
        customers = [
            customer(
                customer_id=f"col-{attempt}-{i}", age=20 + 3 * i, risk_tolerance=f"C{1 + i % 5}"
            )
            for i in range(12)
        ]
        twins = [{**c, "customer_id": f"twin-{c['customer_id']}"} for c in customers]
        with monkeypatch.context() as objects_only:
            objects_only.setattr("serving.deps._objects_as_columns", lambda model, body: None)
            as_rows = api_client.post(
                "/v1/decisions/batch",
                json={"customers": customers, "k": 4},
                headers=auth["decide"],
            )
        as_columns = api_client.post(
            "/v1/decisions/batch",
            json={"columns": _columns(twins, catalog), "k": 4},
            headers=auth["decide"],
        )
        return as_rows, as_columns

    as_rows, as_columns = in_one_utc_hour(both)
    assert as_rows.status_code == as_columns.status_code == 200, as_columns.text
    rows, cols = as_rows.json()["decisions"], as_columns.json()["decisions"]
    assert [d["ranked"] for d in cols] == [d["ranked"] for d in rows]
    assert [d["scores"] for d in cols] == [d["scores"] for d in rows]
    assert len({d["decision_id"] for d in rows + cols}) == 24


def _as_rows(columns: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """A columnar batch answer as the object form's ``decisions``."""
    return [
        dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)
    ]


def test_post_batch_columns_answer_holds_the_object_answers_values(
    api_client: TestClient, auth: dict[str, dict[str, str]], catalog: ActionCatalog
) -> None:
    """``"answer": "columns"`` gives the same ranked actions and scores as the object form,
    one array per field, with shorter lists where fewer actions are allowed than asked (both
    calls in one hour: the local hour is a feature)."""
    offer = catalog.offer_names[0]
    candidates = [a.name for a in catalog.actions if a.offer == offer][:2]
    request = {"k": 4, "candidates": candidates}

    def both(attempt: int) -> tuple[httpx.Response, httpx.Response]:
        customers = [customer(customer_id=f"ans-{attempt}-{i}", age=25 + 4 * i) for i in range(9)]
        twins = [{**c, "customer_id": f"twin-{c['customer_id']}"} for c in customers]
        objects = api_client.post(
            "/v1/decisions/batch", json={**request, "customers": customers}, headers=auth["decide"]
        )
        columns = api_client.post(
            "/v1/decisions/batch",
            json={**request, "customers": twins, "answer": "columns"},
            headers=auth["decide"],
        )
        return objects, columns

    objects, columns = in_one_utc_hour(both)
    assert objects.status_code == columns.status_code == 200, columns.text
    body = columns.json()
    assert "decisions" not in body
    assert set(body["columns"]) == {"decision_id", "action", "propensity", "ranked", "scores"}
    assert all(len(values) == 9 for values in body["columns"].values())
    as_rows, rows = _as_rows(body["columns"]), objects.json()["decisions"]
    assert [d["ranked"] for d in as_rows] == [d["ranked"] for d in rows]
    assert [d["scores"] for d in as_rows] == [d["scores"] for d in rows]
    assert max(len(d["ranked"]) for d in rows) == 3  # two candidates and no contact
    assert all(d["action"] in {*candidates, "no_contact"} for d in as_rows)
    for key in ("exploration", "model_version", "ruleset_version", "catalog_version"):
        assert body[key] == objects.json()[key]


@pytest.mark.parametrize("answer", ["decisions", "columns"])
@pytest.mark.parametrize(("part_rows", "n"), [(7, 20), (70, 141)])
def test_post_batch_in_parts_journals_every_decision_as_answered(
    api_settings: Settings,
    auth: dict[str, dict[str, str]],
    catalog: ActionCatalog,
    monkeypatch: pytest.MonkeyPatch,
    part_rows: int,
    n: int,
    answer: str,
) -> None:
    """A batch decided in parts answers in request order, and the journal holds each
    answered decision with its action and propensity (parts of 7 commit inline on the
    request's thread, parts of 70 queue for the writers' threads)."""
    from nextbest.decision_journal import read_journal
    from serving import service

    assert (part_rows <= service.INLINE_COMMIT_ROWS) == (part_rows == 7)
    monkeypatch.setattr(service, "PIPELINE_ROWS", part_rows)
    customers = [customer(customer_id=f"part-{i}", age=18 + i % 60) for i in range(n)]
    with TestClient(create_app(api_settings)) as client:
        response = client.post(
            "/v1/decisions/batch",
            json={"columns": _columns(customers, catalog), "k": 2, "answer": answer},
            headers=auth["decide"],
        )
    assert response.status_code == 200, response.text
    body = response.json()
    answered = body["decisions"] if answer == "decisions" else _as_rows(body["columns"])
    journal = read_journal(api_settings.state_dir).to_pylist()
    assert [r["decision_id"] for r in journal] == [d["decision_id"] for d in answered]
    assert [catalog.actions[r["action"]].name for r in journal] == [d["action"] for d in answered]
    assert [r["pscore"] for r in journal] == [d["propensity"] for d in answered]
    assert len({r["model_version"] for r in journal}) == 1
    assert all(r["action"] in r["candidate_actions"] for r in journal)


def test_post_batch_failing_part_withdraws_the_parts_before_it_once_committed(
    api_settings: Settings,
    auth: dict[str, dict[str, str]],
    catalog: ActionCatalog,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When a later part fails, the answer is an error only once the parts already handed to
    the writers are committed, and then withdrawn: the file holds whole parts, never a torn
    one, and no reader sees a decision of the failed request."""
    import sqlite3

    from nextbest.decision_journal import JOURNAL_FILENAME, read_journal
    from serving import service

    monkeypatch.setattr(service, "PIPELINE_ROWS", 70)
    with TestClient(create_app(api_settings), raise_server_exceptions=False) as client:
        engine = client.app.state.service.engine
        decide, calls = engine.decide, []
        journal = client.app.state.service.journal
        submit = journal.submit

        def slow_submit(decisions: Any, inline: bool = False, more: bool = False) -> Future[int]:
            """The journal commits 0.3 s late: an answer that did not wait for it would
            come before the first part is in the journal."""
            done: Future[int] = Future()

            def later() -> None:
                time.sleep(0.3)
                try:
                    done.set_result(submit(decisions, more=more).result())
                except Exception as exc:
                    done.set_exception(exc)

            threading.Thread(target=later, daemon=True).start()
            return done

        monkeypatch.setattr(journal, "submit", slow_submit)

        def failing_second_part(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("model crashed")
            return decide(*args, **kwargs)

        monkeypatch.setattr(engine, "decide", failing_second_part)
        customers = [customer(customer_id=f"fail-{i}") for i in range(141)]
        response = client.post(
            "/v1/decisions/batch", json={"customers": customers}, headers=auth["decide"]
        )
        visible = read_journal(api_settings.state_dir).num_rows
        with sqlite3.connect(api_settings.state_dir / JOURNAL_FILENAME) as conn:
            stored, withdrawn = conn.execute(
                "SELECT (SELECT count(*) FROM decisions), (SELECT count(*) FROM withdrawn)"
            ).fetchone()

    assert response.status_code == 500
    assert (stored, withdrawn, visible) == (70, 70, 0)


def test_post_batch_parts_commit_in_one_transaction_per_store(
    api_settings: Settings, auth: dict[str, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parts of a batch, handed to the writers one by one, commit once in each store
    (a commit rewrites every index page its transaction touched: once, not once a part),
    and the answer does not wait for a part that never comes."""
    from nextbest import sqlite_writer
    from serving import service

    monkeypatch.setattr(service, "PIPELINE_ROWS", 70)
    monkeypatch.setattr(sqlite_writer, "MAX_HOLD_S", 60)  # however slow the machine
    with TestClient(create_app(api_settings)) as client:
        scoring = client.app.state.service
        writers = (scoring.journal._writer, scoring.contacts._writer)
        # the store's first write prunes (a job of its own, which would end a wait early)
        first = {"customer": customer(customer_id="parts-first")}
        assert client.post("/v1/decisions", json=first, headers=auth["decide"]).status_code == 200
        for writer in writers:
            writer.flush()
        before = [w.commits for w in writers]
        started = time.monotonic()
        customers = [customer(customer_id=f"parts-{i}") for i in range(141)]
        response = client.post(
            "/v1/decisions/batch", json={"customers": customers}, headers=auth["decide"]
        )
        elapsed = time.monotonic() - started
        after = [w.commits for w in writers]
        ids = [d["decision_id"] for d in response.json()["decisions"]]
    assert response.status_code == 200 and len(set(ids)) == 141
    assert after == [b + 1 for b in before]
    assert elapsed < 30


def test_post_batch_columns_errors_name_the_field(
    api_client: TestClient, auth: dict[str, dict[str, str]], catalog: ActionCatalog
) -> None:
    columns = _columns([customer(customer_id=f"bad-{i}") for i in range(4)], catalog)
    columns["age"] = [30, 40, 50, 121]
    bad_age = api_client.post(
        "/v1/decisions/batch", json={"columns": columns}, headers=auth["decide"]
    )
    assert bad_age.status_code == 422
    assert ["body", "columns", "age", 3] in [e["loc"] for e in bad_age.json()["detail"]]
    both = {"columns": {**columns, "age": [30] * 4}, "customers": [customer()]}
    for payload, got in (({}, "neither"), (both, "both")):
        response = api_client.post("/v1/decisions/batch", json=payload, headers=auth["decide"])
        assert response.status_code == 422
        assert f"exactly one of `customers` and `columns` is required, got {got}" in response.text


@pytest.mark.parametrize("invalid", [False, True])
def test_post_batch_columns_oversized_is_413(
    api_settings: Settings, auth: dict[str, dict[str, str]], catalog: ActionCatalog, invalid: bool
) -> None:
    settings = api_settings.model_copy(update={"max_batch": 5})
    columns = _columns([customer(customer_id=f"big-{i}") for i in range(6)], catalog)
    if invalid:  # refused for its size whatever else is wrong: 413, not 422
        columns["age"][-1] = 999
        columns["customer_id"][-1] = columns["customer_id"][0]
    with TestClient(create_app(settings)) as client:
        response = client.post(
            "/v1/decisions/batch", json={"columns": columns}, headers=auth["decide"]
        )
    assert response.status_code == 413
    assert response.json()["detail"] == "batch of 6 customers; at most 5 per request"


def test_the_schema_examples_are_customers_a_rule_set_can_serve(
    api_client: TestClient, auth: dict[str, dict[str, str]]
) -> None:
    """The OpenAPI examples are what a new user sends first: they must be accepted, and not
    have every product blocked by an expired risk assessment (they are dated from the day
    the service started)."""
    components = api_client.get("/openapi.json").json()["components"]["schemas"]
    (single,) = components["DecisionRequest"]["examples"]
    decided = api_client.post("/v1/decisions", json=single, headers=auth["decide"])
    assert decided.status_code == 200, decided.text
    rules = {b["rule"] for b in decided.json()["blocked"]}
    assert "suitability_no_assessment" not in rules and "suitability_risk" in rules
    for body in components["BatchDecisionRequest"]["examples"]:
        batch = api_client.post("/v1/decisions/batch", json=body, headers=auth["decide"])
        assert batch.status_code == 200, batch.text
