"""/readyz, /metrics, model hot-swap under load, and pseudonymised customer keys only."""

from __future__ import annotations

import logging
import os
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import customer, write_model
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from nextbest.catalog import ActionCatalog
from serving.app import create_app
from serving.settings import Settings


def test_get_readyz_reports_the_model(api_client: TestClient, api_settings: Settings) -> None:
    body = api_client.get("/readyz").json()
    assert body["ready"] is True
    assert body["model_uri"] == api_settings.model_uri
    assert body["model_version"].startswith("file:")
    assert body["last_error"] is None


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition text (0 if absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def test_get_metrics_counts_requests_actions_and_blocks(
    api_client: TestClient, auth: dict[str, dict[str, str]]
) -> None:
    before = api_client.get("/metrics", headers=auth["metrics"]).text
    for i in range(5):
        payload = {"customer": customer(customer_id=f"m-{i}", risk_tolerance="C1")}
        assert api_client.post("/v1/decisions", json=payload, headers=auth["decide"]).is_success
    text = api_client.get("/metrics", headers=auth["metrics"]).text
    route = {"route": "/v1/decisions", "method": "POST", "status": "200"}
    requests = "nextbest_http_requests_total"
    assert _sample(text, requests, **route) - _sample(before, requests, **route) == 5
    assert _sample(text, "nextbest_http_request_duration_seconds_count", route="/v1/decisions")
    decisions = "nextbest_decisions_total"
    assert (
        _sample(text, decisions, endpoint="single") - _sample(before, decisions, endpoint="single")
        == 5
    )
    served = sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "nextbest_actions_served_total"
    )
    assert served >= 5
    blocks = "nextbest_blocked_actions_total"
    assert _sample(text, blocks, rule="suitability_risk") > _sample(
        before, blocks, rule="suitability_risk"
    )
    version = api_client.get("/readyz").json()["model_version"]
    assert _sample(text, "nextbest_model_info", version=version) == 1


def test_metrics_label_an_unknown_method_as_other(
    api_client: TestClient, auth: dict[str, dict[str, str]]
) -> None:
    """A server that accepts any method name must not let callers add label values."""
    method = "PROPFIND" + "X" * 50
    assert api_client.request(method, "/healthz").status_code == 405
    text = api_client.get("/metrics", headers=auth["metrics"]).text
    assert method not in text
    route = {"route": "/healthz", "method": "other", "status": "405"}
    assert _sample(text, "nextbest_http_requests_total", **route) >= 1


def test_post_reload_swaps_the_model_without_failing_requests_in_flight(
    api_client: TestClient,
    api_settings: Settings,
    auth: dict[str, dict[str, str]],
    catalog: ActionCatalog,
    tmp_path: Path,
) -> None:
    model = Path(api_settings.model_uri)
    original = model.read_bytes()
    before = api_client.get("/readyz").json()["model_version"]
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        i = 0
        while not stop.is_set():
            payload = {"customer": customer(customer_id=f"swap-{threading.get_ident()}-{i}")}
            statuses.append(
                api_client.post("/v1/decisions", json=payload, headers=auth["decide"]).status_code
            )
            i += 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        fresh = write_model(catalog, tmp_path / "fresh.onnx", seed=1)
        os.replace(fresh, model)  # atomic, as `nextbest export` writes it
        swapped = api_client.post("/v1/admin/reload", headers=auth["admin"]).json()
        assert swapped["changed"] is True and swapped["last_error"] is None
        (tmp_path / "broken.onnx").write_bytes(b"not an onnx model")
        os.replace(tmp_path / "broken.onnx", model)
        broken = api_client.post("/v1/admin/reload", headers=auth["admin"]).json()
    finally:
        stop.set()
        for t in threads:
            t.join()
        model.write_bytes(original)
    assert broken["changed"] is False and broken["last_error"]
    ready = api_client.get("/readyz").json()
    assert ready["ready"] is True
    assert ready["model_version"] == swapped["model_version"] != before
    assert ready["last_error"]
    assert statuses and set(statuses) == {200}
    after = api_client.post(
        "/v1/decisions", json={"customer": customer()}, headers=auth["decide"]
    ).json()
    assert after["model_version"] == swapped["model_version"]


def test_post_decision_logs_only_pseudonymised_keys(
    api_client: TestClient,
    api_settings: Settings,
    auth: dict[str, dict[str, str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    raw = "RAW-CUSTOMER-ID-7f3e9a"
    caplog.set_level(logging.DEBUG)
    decision = api_client.post(
        "/v1/decisions",
        json={"customer": customer(customer_id=raw), "explain": True},
        headers=auth["decide"],
    ).json()
    api_client.post(
        "/v1/decisions/batch",
        json={"customers": [customer(customer_id=raw), customer(customer_id=raw + "-2")]},
        headers=auth["decide"],
    )
    api_client.post(
        "/v1/rewards",
        json={"decision_id": decision["decision_id"], "converted": True},
        headers=auth["reward"],
    )
    delivered = api_client.post(
        "/v1/deliveries",
        json={
            "customer_id": raw,
            "decision_id": decision["decision_id"],
            "channel": decision["chosen"]["channel"] or "app_push",
            "delivered_at": datetime.now(UTC).isoformat(),
        },
        headers=auth["reward"],
    )
    assert delivered.status_code == 200, delivered.text  # stored: its key is checked below
    consented = api_client.post(
        "/v1/consents",
        json={"customer_id": raw, "channels": ["sms"], "given_at": datetime.now(UTC).isoformat()},
        headers=auth["consent"],
    )
    assert consented.status_code == 200, consented.text  # stored as well
    api_client.post(
        "/v1/decisions",
        json={"customer": customer(customer_id=raw, age=-1)},
        headers=auth["decide"],
    )
    metrics = api_client.get("/metrics", headers=auth["metrics"]).text
    api_client.app.state.service.journal.flush()
    stored = b"".join(p.read_bytes() for p in api_settings.state_dir.rglob("*") if p.is_file())
    assert b"cust_" in stored  # the pseudonyms are there
    assert raw.encode() not in stored
    assert raw not in caplog.text
    assert raw not in metrics


def test_service_starts_on_a_catalogue_without_the_example_channel(
    api_settings: Settings, auth: dict[str, dict[str, str]], tmp_path: Path
) -> None:
    """Start-up warms the columnar path with a customer that names no channel or offer:
    a bank without WeChat still starts and decides."""
    import shutil

    import yaml

    from nextbest.catalog import DEFAULT_CATALOG_DIR, load_catalog
    from nextbest.compliance import DEFAULT_RULES_PATH

    directory = tmp_path / "catalog"
    shutil.copytree(DEFAULT_CATALOG_DIR, directory)
    channels = yaml.safe_load((directory / "channels.yaml").read_text())
    channels["channels"] = [c for c in channels["channels"] if c["name"] != "wechat"]
    (directory / "channels.yaml").write_text(yaml.safe_dump(channels))
    offers = yaml.safe_load((directory / "offers.yaml").read_text())
    for offer in offers["offers"]:
        offer["channels"] = [c for c in offer.get("channels", []) if c != "wechat"]
    (directory / "offers.yaml").write_text(yaml.safe_dump(offers))
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        DEFAULT_RULES_PATH.read_text().replace("wechat: 2, ", "").replace("wechat: 4, ", "")
    )
    small = load_catalog(directory)
    settings = api_settings.model_copy(
        update={
            "catalog_dir": directory,
            "rules_path": rules,
            "model_uri": str(write_model(small, tmp_path / "small.onnx")),
        }
    )

    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz")
        decided = client.post(
            "/v1/decisions/batch",
            json={
                "customers": [
                    customer(consented_channels=["sms"], holdings=[], contact_history={}, events={})
                ]
            },
            headers=auth["decide"],
        )

    assert ready.status_code == 200, ready.text
    assert decided.status_code == 200, decided.text


def test_metrics_label_a_body_refused_before_routing_with_its_route(
    api_settings: Settings, auth: dict[str, dict[str, str]]
) -> None:
    """The size limit answers 413 before the router runs; the request still counts under
    the route it was sent to, and a path no route has stays ``unmatched``."""
    settings = api_settings.model_copy(update={"max_body_bytes": 64})
    with TestClient(create_app(settings)) as client:
        body = b'{"customers": []}' + b" " * 100
        headers = {**auth["decide"], "Content-Type": "application/json"}
        assert client.post("/v1/decisions/batch", content=body, headers=headers).status_code == 413
        assert client.post("/v1/nowhere", content=body, headers=headers).status_code == 413
        text = client.get("/metrics", headers=auth["metrics"]).text
    batch = {"route": "/v1/decisions/batch", "method": "POST", "status": "413"}
    assert _sample(text, "nextbest_http_requests_total", **batch) >= 1
    nowhere = {"route": "unmatched", "method": "POST", "status": "413"}
    assert _sample(text, "nextbest_http_requests_total", **nowhere) >= 1
