"""SIGKILL in the middle of a load: every acknowledged decision is in the journal after a
restart, and the restarted service serves."""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import customer, free_port, start_server

from nextbest.decision_journal import read_journal


def _load(port: int, acknowledged: list[str], stop: threading.Event, worker: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    i = 0
    while not stop.is_set():
        body = json.dumps({"customer": customer(customer_id=f"kill-{worker}-{i}")})
        try:
            conn.request("POST", "/v1/decisions", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException):
            return  # the server died: whatever was not answered was not acknowledged
        if response.status == 200:
            acknowledged.append(json.loads(payload)["decision_id"])
        i += 1


@pytest.mark.slow
def test_kill_server_keeps_every_acknowledged_decision(api_model: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    port = free_port()
    server = start_server(api_model, state, port)
    acknowledged: list[str] = []
    stop = threading.Event()
    threads = [threading.Thread(target=_load, args=(port, acknowledged, stop, w)) for w in range(8)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(acknowledged) < 300 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        if server.poll() is None:
            server.kill()
    assert len(acknowledged) >= 300
    restarted = start_server(api_model, state, port)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        body = json.dumps({"customer": customer(customer_id="after-restart")})
        conn.request("POST", "/v1/decisions", body, {"Content-Type": "application/json"})
        assert conn.getresponse().status == 200
    finally:
        restarted.send_signal(signal.SIGTERM)
        restarted.wait(timeout=30)
    journalled = set(read_journal(state).column("decision_id").to_pylist())
    missing = [d for d in acknowledged if d not in journalled]
    assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged decisions lost"
