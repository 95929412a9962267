"""Fixtures of the scoring-API tests: a small ONNX model, API keys, settings, a client."""

from __future__ import annotations

import contextlib
import copy
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from fastapi.testclient import TestClient

from nextbest.catalog import ActionCatalog
from nextbest.features import ContextEncoder
from nextbest.onnx_scoring import linear_scoring_model, save_scoring_model
from nextbest.synthetic import midday_timezone
from serving.app import create_app
from serving.schemas import EXAMPLE_CUSTOMER
from serving.security import SCOPES, create_api_key
from serving.settings import Settings

PSEUDONYM_KEY = "test-pseudonymisation-key-0123456789"

T = TypeVar("T")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def server_env(state: Path) -> dict[str, str]:
    """The environment of a ``nextbest serve`` subprocess keeping its state in ``state``."""
    return {
        **os.environ,
        "NEXTBEST_ENVIRONMENT": "local",
        "NEXTBEST_STATE_DIR": str(state),
        "NEXTBEST_PSEUDONYMISATION_KEY": PSEUDONYM_KEY,
        "NEXTBEST_RELOAD_POLL_SECONDS": "0",
        "NEXTBEST_LOG_LEVEL": "warning",
    }


def start_server(model: Path, state: Path, port: int, workers: int = 1) -> subprocess.Popen[bytes]:
    """``nextbest serve`` of ``model`` on 127.0.0.1:``port`` in a subprocess, once ready."""
    env = server_env(state)
    command = [
        sys.executable,
        "-m",
        "nextbest",
        "serve",
        "--port",
        str(port),
        "--model",
        str(model),
        "--workers",
        str(workers),
    ]
    # a session of its own: stop_server() can end the workers too, whatever the supervisor did
    server = subprocess.Popen(command, env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            stop_server(server)  # its workers too, if any were started
            raise AssertionError("the service exited at start")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return server
        except OSError:
            time.sleep(0.1)
    stop_server(server)
    raise AssertionError("the service did not become ready")


def stop_server(server: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Stop a server of :func:`start_server` and every process it started: SIGTERM (the
    supervisor stops its workers), then SIGKILL to the whole session if it has not ended
    within ``timeout`` seconds. A SIGKILL to a multi-worker supervisor alone would leave its
    workers running (serving the port) after the test."""
    if server.poll() is None:
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):  # workers left behind by a killed supervisor
        os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=10)


def write_model(catalog: ActionCatalog, path: Path, seed: int = 0) -> Path:
    """A linear scoring model over the catalogue's features, random weights of ``seed``."""
    spec = ContextEncoder(catalog).spec
    rng = np.random.default_rng(seed)
    weights = rng.normal(0, 0.3, (spec.n_context, catalog.n_actions))
    bias = rng.normal(0, 1.0, catalog.n_actions)
    return save_scoring_model(
        linear_scoring_model(weights, bias, spec, "test_linear"), path, spec, "test_linear"
    )


def _utc_hour(moment: datetime) -> datetime:
    """The UTC hour (date included) of ``moment``."""
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def in_one_utc_hour(attempt: Callable[[int], T]) -> T:
    """``attempt(0)``, or ``attempt(1)`` if the UTC hour turned while ``attempt(0)`` ran.

    For a test that compares answers the service gave at different moments: it reads the
    clock for each decision, and the customer's local hour (model features; quiet hours) and
    the UTC date (the latest risk-assessment date accepted) change when the UTC hour turns.
    The service reads the clock between this function's two readings, so when both are in
    one hour every answer of the attempt was given in that hour (with the same local hour
    and date), and the test can compare them exactly.

    ``attempt`` builds its customers (:func:`customer`: midday for the hour it runs in) and
    makes the requests, and returns what they answered, asserting nothing that depends on
    the time: an attempt that straddled the turn is thrown away. Its argument is the
    attempt's number, to name customers the first attempt did not contact (its recommended
    contacts count towards their caps). An attempt takes seconds, so the second one runs
    within one hour.
    """
    for number in range(2):
        start = datetime.now(UTC)
        result = attempt(number)
        if _utc_hour(datetime.now(UTC)) == _utc_hour(start):
            return result
    raise AssertionError("the UTC hour turned during both attempts")


def customer(**overrides: Any) -> dict[str, Any]:
    """The OpenAPI example customer, assessed 30 days ago, with no contact history and at
    midday local time (:func:`~nextbest.synthetic.midday_timezone`), so the answer does not
    depend on today's date or the time of day; with ``overrides``. Its local hour is 13 for a
    decision made after the UTC hour turned: a test comparing two decisions makes them
    :func:`in_one_utc_hour`."""
    data = copy.deepcopy(EXAMPLE_CUSTOMER)
    data["risk_assessed_on"] = (date.today() - timedelta(days=30)).isoformat()
    data["contact_history"] = {}
    data["timezone"] = midday_timezone()
    data.update(overrides)
    return data


@pytest.fixture(scope="session")
def api_model(catalog: ActionCatalog, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small scoring model file (built with nextbest.onnx_scoring, no training)."""
    return write_model(catalog, tmp_path_factory.mktemp("model") / "model.onnx")


@pytest.fixture(scope="session")
def api_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A keys file and one clear key per scope (:data:`~serving.security.SCOPES`)."""
    path = tmp_path_factory.mktemp("keys") / "api_keys.json"
    keys = {scope: create_api_key(path, f"test-{scope}", [scope]) for scope in SCOPES}
    return path, keys


@pytest.fixture
def api_settings(
    tmp_path: Path, api_model: Path, api_keys: tuple[Path, dict[str, str]]
) -> Settings:
    """Local settings over the test model, a fresh state directory and the test keys."""
    return Settings(
        environment="local",
        model_uri=str(api_model),
        state_dir=tmp_path / "state",
        api_keys_file=api_keys[0],
        pseudonymisation_key=PSEUDONYM_KEY,
        reload_poll_seconds=0,
        seed=0,
    )


@pytest.fixture
def api_client(api_settings: Settings) -> Iterator[TestClient]:
    """A client of the app (lifespan run: model loaded, stores open)."""
    with TestClient(create_app(api_settings)) as client:
        yield client


@pytest.fixture
def auth(api_keys: tuple[Path, dict[str, str]]) -> dict[str, dict[str, str]]:
    """Headers carrying the key of each scope: ``auth["decide"]``."""
    return {scope: {"X-API-Key": key} for scope, key in api_keys[1].items()}
