"""Prometheus metrics of the scoring service.

Labels are routes, status codes, channels, rule ids and model versions: never a customer
key, decision id or anything else with one value per customer.

With several worker processes, ``nextbest serve`` sets ``PROMETHEUS_MULTIPROC_DIR``
(:func:`multiprocess_dir`: a directory of its own under the state directory) before the
workers import this module, and :func:`render` aggregates every worker's samples.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)

HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
"""Methods labelled by name in the metrics; any other is labelled ``other`` (a server that
accepts arbitrary method names would otherwise let callers add label values without end)."""
REQUESTS = Counter(
    "nextbest_http_requests_total",
    "HTTP requests by route template, method and status code.",
    ["route", "method", "status"],
)
LATENCY = Histogram(
    "nextbest_http_request_duration_seconds",
    "Time from the request's arrival to the end of its response, by route template.",
    ["route"],
    buckets=LATENCY_BUCKETS,
)
DECISIONS = Counter(
    "nextbest_decisions_total", "Decisions served (and journalled), by endpoint.", ["endpoint"]
)
ACTIONS_SERVED = Counter(
    "nextbest_actions_served_total",
    "Chosen actions by channel ('none' for no contact).",
    ["channel"],
)
BLOCKS = Counter(
    "nextbest_blocked_actions_total",
    "Blocked (customer, action) pairs over the full catalogue, by first blocking rule.",
    ["rule"],
)
MODEL_INFO = Gauge(
    "nextbest_model_info",
    "1 for the model version serving now.",
    ["version"],
    multiprocess_mode="liveall",
)
MODEL_RELOADS = Counter("nextbest_model_reloads_total", "Model (re)loads by outcome.", ["outcome"])
DECIDED_AGAIN = Counter(
    "nextbest_decisions_decided_again_total",
    "Customers decided again because another worker contacted them between this worker's "
    "contact-history lookup and its commit.",
)
CONSENTS = Counter(
    "nextbest_consents_total",
    "Consents recorded (POST /v1/consents): stored opt-outs before them stop binding.",
)
JOURNAL_WAIT = Histogram(
    "nextbest_journal_commit_wait_seconds",
    "Time a request waits for its decisions to be committed to the journal.",
    buckets=LATENCY_BUCKETS,
)


class DecisionCounters:
    """Per-decision metric updates with label children resolved once (a hot path).

    Parameters
    ----------
    channel_names : the catalogue's channels (``ACTIONS_SERVED`` labels).
    rule_ids : the rule set's rule ids in order (``BLOCKS`` labels).
    """

    def __init__(self, channel_names: Sequence[str], rule_ids: Sequence[str]) -> None:
        self._channels = [ACTIONS_SERVED.labels(channel=c) for c in channel_names]
        self._no_contact = ACTIONS_SERVED.labels(channel="none")
        self._rules = [BLOCKS.labels(rule=r) for r in rule_ids]
        self._endpoints = {e: DECISIONS.labels(endpoint=e) for e in ("single", "batch")}

    def observe(self, endpoint: str, channel_index: np.ndarray, block_counts: np.ndarray) -> None:
        """Count decisions of one request.

        Parameters
        ----------
        endpoint : ``single`` or ``batch``.
        channel_index : int ``(n,)``
            Channel of each chosen action, -1 for no contact.
        block_counts : int ``(n_rules,)``
            Blocked pairs per rule over the request's customers.
        """
        self._endpoints[endpoint].inc(len(channel_index))
        if len(channel_index) == 1:
            c = int(channel_index[0])
            (self._no_contact if c < 0 else self._channels[c]).inc()
        else:
            counts = np.bincount(channel_index + 1, minlength=len(self._channels) + 1)
            if counts[0]:
                self._no_contact.inc(int(counts[0]))
            for child, count in zip(self._channels, counts[1:].tolist(), strict=True):
                if count:
                    child.inc(count)
        for child, count in zip(self._rules, block_counts.tolist(), strict=False):
            if count:
                child.inc(count)


def set_model_version(version: str | None, previous: str | None) -> None:
    """Point ``nextbest_model_info`` at ``version``."""
    if previous is not None and previous != version:
        MODEL_INFO.remove(previous)
    if version is not None:
        MODEL_INFO.labels(version=version).set(1)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, another user's
        pass
    return True


def multiprocess_dir(state_dir: Path, server_pid: int) -> Path:
    """The directory of one server's worker samples, ``<state_dir>/prometheus/<server_pid>``,
    created empty.

    Another server may share the state directory (its journal and contact store are made
    for that): its samples stay. Directories of servers no longer running are removed.
    """
    root = state_dir / "prometheus"
    root.mkdir(parents=True, exist_ok=True)
    for entry in root.iterdir():
        if entry.is_dir() and entry.name.isdigit() and not _running(int(entry.name)):
            shutil.rmtree(entry, ignore_errors=True)
    own = root / str(server_pid)
    shutil.rmtree(own, ignore_errors=True)  # left by an earlier process with this pid
    own.mkdir()
    return own


def render() -> tuple[bytes, str]:
    """The exposition text of every metric (of every worker in multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


class RequestMetrics:
    """ASGI middleware: request count and latency by route template (not by raw path, so
    nothing a caller puts in a URL becomes a label).

    ``routes``: the routes of the application's routers, to find the template of a request
    answered before routing (a 413 of the body size limit); a path no route matches is
    ``unmatched``.
    """

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute] = ()) -> None:
        self.app = app
        self.routes = routes
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def template(self, scope: Scope) -> str:
        """The route template of the request ``scope`` (``unmatched`` when none fits)."""
        route = scope.get("route")
        if route is None:  # answered before routing
            route = next((r for r in self.routes if r.matches(scope)[0] != Match.NONE), None)
        return getattr(route, "path", None) or "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            template = self.template(scope)
            method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
            key = (template, method, status)
            children = self._children.get(key)
            if children is None:
                children = (
                    REQUESTS.labels(route=template, method=method, status=str(status)),
                    LATENCY.labels(route=template),
                )
                self._children[key] = children
            children[0].inc()
            children[1].observe(time.perf_counter() - start)
