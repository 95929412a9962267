"""Scoring-service benchmark: in-process decision time, HTTP throughput and latency.

Run: ``.venv/bin/python benchmarks/serving.py`` (about two minutes). Load comes from wrk (one
thread) in a second process on 127.0.0.1, installed with ``apt-get install -y wrk`` when
missing and possible; otherwise the HTTP figures are null and the reason is printed. Every
request carries a different customer id (a wrk Lua script), so the contact store sees a
realistic spread of customers rather than one customer hitting its caps.

Measured, in the same run:

* ``inproc_decision_us_p50``: one customer through the decision engine (features, rules
  over the full catalogue, ONNX Runtime, exploration), median microseconds.
* ``rps_full``: ``POST /v1/decisions`` of ``nextbest serve``, one worker, 16 connections,
  API key checked, contact store read and written, every decision committed to the journal
  before the answer.
* ``rps_minimal``: the baseline, a minimal FastAPI endpoint on the same server stack that
  validates the same body with the same pydantic model, encodes the features the model
  needs, runs the same ONNX model and returns the top 3 (no rules, no logging).
* ``ratio``: ``rps_full / rps_minimal`` (target >= 0.8).
* ``p99_c1_ms``: p99 latency of ``POST /v1/decisions`` at one connection (target <= 2 ms).
* ``batch_customers_per_s``: customers per second through ``POST /v1/decisions/batch``
  with 10,000 customers per call in the columnar form (``columns`` in the request and
  ``"answer": "columns"``, target >= 100,000), one call at a time, one worker;
  ``batch_objects_customers_per_s`` the same customers as a list of customer objects
  (``customers``) answered with one object per decision, for comparison.
  ``batch_server_cpu_ms``: the server's CPU time (all its threads, from ``/proc``) per
  columnar call, the mean over the measured calls: steadier than the rate on a shared
  machine, to compare code (null where ``/proc`` is missing).
* ``rps_2w_c64``, ``p99_2w_c64_ms``: two workers, 64 connections (target >= 5,000 decisions
  per second with p99 <= 20 ms, every decision journalled).

The last line of output is the JSON of these figures.

``--soak SECONDS`` runs only a memory check instead: one worker under ``wrk -c16`` for that
long, in rounds of 20 seconds, reading the worker's resident memory after each round. Last
line: ``{"soak_s", "decisions", "rss_anon_start_mb", "rss_anon_mid_mb", "rss_anon_end_mb",
"second_half_growth_mb", "state_mb"}`` (``decisions`` from wrk's rates x the rounds' length):
the anonymous memory (the heap, SQLite's page caches)
at the start, half-way and at the end, its growth over the second half (a leak keeps
growing; caches stop at their caps), and the state directory's size on disk.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

# this file is named like the serving package: keep its directory off the import path
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
PSEUDONYM_KEY = "benchmark-pseudonymisation-key-0123456789"
WRK_SECONDS = 8
WARMUP_SECONDS = 2


def customer(customer_id: str) -> dict[str, Any]:
    """A typical customer payload (the API's OpenAPI example, assessed recently), in a time
    zone where it is now midday: the rules on the local hour (quiet hours 21:00-08:00 block
    SMS and calls) would otherwise change the work measured with the time of day."""
    from nextbest.synthetic import midday_timezone
    from serving.schemas import EXAMPLE_CUSTOMER

    return {
        **EXAMPLE_CUSTOMER,
        "customer_id": customer_id,
        "risk_assessed_on": (date.today() - timedelta(days=30)).isoformat(),
        "contact_history": {
            "contacts_30d": {"app_push": 1},
            "last_contact_at": (datetime.now(UTC) - timedelta(days=10)).isoformat(),
        },
        "timezone": midday_timezone(),
    }


def build_model(path: Path) -> Path:
    """A linear scoring model over the default catalogue's features (seeded)."""
    from nextbest.catalog import load_catalog
    from nextbest.features import ContextEncoder
    from nextbest.onnx_scoring import linear_scoring_model, save_scoring_model

    catalog = load_catalog()
    spec = ContextEncoder(catalog).spec
    rng = np.random.default_rng(0)
    weights = rng.normal(0, 0.3, (spec.n_context, catalog.n_actions))
    bias = rng.normal(0, 1.0, catalog.n_actions)
    model = linear_scoring_model(weights, bias, spec, "benchmark_linear")
    return save_scoring_model(model, path, spec, "benchmark_linear")


# --------------------------------------------------------------------------- in process


def inproc_decision_us(model: Path, n: int = 5000) -> float:
    """Median microseconds of one customer through the decision engine."""
    from nextbest.catalog import load_catalog
    from nextbest.compliance import DEFAULT_RULES_PATH, RuleEngine, load_rules
    from nextbest.context import ContextBatch, parse_customer
    from serving.decision_engine import DecisionEngine
    from serving.model_store import ModelStore

    catalog = load_catalog()
    rules = RuleEngine(load_rules(DEFAULT_RULES_PATH, catalog))
    store = ModelStore(str(model))
    engine = DecisionEngine(catalog, rules, store, exploration="epsilon_greedy", epsilon=0.05)
    now = datetime.now(UTC)
    batches = [
        ContextBatch.from_contexts(
            [parse_customer({**customer(f"c{i}"), "age": 20 + i % 60}, catalog)], catalog, now
        )
        for i in range(200)
    ]
    times = np.empty(n)
    for i in range(n):
        batch = batches[i % len(batches)]
        start = time.perf_counter()
        engine.decide(batch, k=3, candidates=None, explain=False)
        times[i] = time.perf_counter() - start
    store.close()
    return float(np.median(times[n // 10 :]) * 1e6)


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_ready(port: int, path: str, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError("the server exited at start")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the server did not become ready in 60 s")


def start_full(model: Path, state: Path, keys: Path, workers: int) -> tuple[Any, int]:
    port = free_port()
    env = {
        **os.environ,
        "NEXTBEST_ENVIRONMENT": "local",
        "NEXTBEST_STATE_DIR": str(state),
        "NEXTBEST_API_KEYS_FILE": str(keys),
        "NEXTBEST_PSEUDONYMISATION_KEY": PSEUDONYM_KEY,
        "NEXTBEST_RELOAD_POLL_SECONDS": "0",
        "NEXTBEST_LOG_LEVEL": "warning",
    }
    command = [
        PYTHON,
        "-m",
        "nextbest",
        "serve",
        "--model",
        str(model),
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    server = subprocess.Popen(command, env=env, cwd=ROOT)
    wait_ready(port, "/readyz", server)
    return server, port


def start_minimal(model: Path) -> tuple[Any, int]:
    port = free_port()
    command = [PYTHON, __file__, "--minimal-server", str(port), "--model", str(model)]
    server = subprocess.Popen(command, cwd=ROOT)
    wait_ready(port, "/healthz", server)
    return server, port


def stop(server: subprocess.Popen[bytes]) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()


def minimal_app(model: Path) -> Any:
    """The baseline: validate the body with the same pydantic model, encode the features,
    run the same ONNX model, return the top 3."""
    from fastapi import FastAPI

    from nextbest.catalog import load_catalog
    from nextbest.context import ContextBatch
    from nextbest.features import ContextEncoder
    from nextbest.onnx_scoring import OnnxScorer
    from serving.schemas import DecisionRequest

    catalog = load_catalog()
    encoder = ContextEncoder(catalog)
    scorer = OnnxScorer(model)
    names = [a.name for a in catalog.actions]
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/minimal")
    async def minimal(body: DecisionRequest) -> dict[str, Any]:
        batch = ContextBatch.from_contexts([body.customer], catalog, datetime.now(UTC))
        scores = scorer.scores(encoder.encode(batch))[0]
        top = np.argpartition(-scores, 3)[:3]
        top = top[np.argsort(-scores[top])]
        return {"actions": [names[a] for a in top], "scores": scores[top].tolist()}

    return app


# --------------------------------------------------------------------------- load


LUA = """
local counter = 0
local threads = {}
local pre = %(pre)s
local post = %(post)s
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
%(auth)s
setup = function(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end
request = function()
  counter = counter + 1
  return wrk.format(nil, nil, nil, pre .. tid .. "-" .. counter .. post)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\\"requests\\": %%d, \\"duration_us\\": %%d, \\"p50_us\\": %%d, " ..
    "\\"p99_us\\": %%d, \\"errors\\": %%d, \\"non2xx\\": %%d}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
"""


def lua_script(directory: Path, key: str | None) -> Path:
    """A wrk script posting the customer payload with a new customer id each request (ids
    never repeat across runs: each script has its own prefix)."""
    marker = "@@ID@@"
    body = json.dumps({"customer": customer(f"{os.urandom(4).hex()}-{marker}"), "k": 3})
    pre, post = body.split(marker)
    auth = f'wrk.headers["X-API-Key"] = "{key}"' if key else ""
    path = directory / ("load_auth.lua" if key else "load.lua")
    # Lua long strings need no escaping of the JSON's quotes
    path.write_text(
        LUA % {"pre": f"[[{pre}]]", "post": f"[[{post}]]", "auth": auth}, encoding="utf-8"
    )
    return path


def ensure_wrk() -> str | None:
    """Path of wrk, installing it with apt-get if missing (None, with a message, if not)."""
    found = shutil.which("wrk")
    if found:
        return found
    if shutil.which("apt-get") and os.geteuid() == 0:
        print("wrk not found: installing it with apt-get install -y wrk", flush=True)
        subprocess.run(["apt-get", "install", "-y", "wrk"], check=False, capture_output=True)
        found = shutil.which("wrk")
        if not found:
            subprocess.run(["apt-get", "update"], check=False, capture_output=True)
            subprocess.run(["apt-get", "install", "-y", "wrk"], check=False, capture_output=True)
            found = shutil.which("wrk")
    if not found:
        print(
            "wrk is not installed and could not be installed (needs root and apt-get): the "
            "HTTP figures are null. Install wrk and run again.",
            flush=True,
        )
    return found


def wrk(binary: str, url: str, script: Path, connections: int, seconds: int) -> dict[str, float]:
    """One wrk run: requests per second, p50 and p99 milliseconds, failures.

    One wrk thread at every connection count (it drives 64 connections at more than the
    server's rate): on this two-core machine a second wrk thread competes with the two
    workers for the cores and measures the load generator as much as the server (2026-11-24,
    two workers at 64 connections, same runs alternated: see BENCHMARKS.md).
    """
    out = subprocess.run(
        [
            binary,
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--timeout",
            "5s",
            "-s",
            str(script),
            url,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("WRKJSON "))
    raw = json.loads(line.removeprefix("WRKJSON "))
    return {
        "rps": raw["requests"] / (raw["duration_us"] / 1e6),
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "failed": raw["errors"] + raw["non2xx"],
    }


def best_of(runs: list[dict[str, float]]) -> dict[str, float]:
    """The run with the most requests per second (the machine is shared and noisy)."""
    return max(runs, key=lambda r: r["rps"])


def batch_body(call: int, customers: int, columnar: bool) -> bytes:
    """A batch request of ``customers`` distinct customers, as columns or as objects."""
    payload = [customer(f"b{call}-{i}") for i in range(customers)]
    if not columnar:
        return json.dumps({"customers": payload, "k": 3}).encode()
    from nextbest.catalog import load_catalog
    from nextbest.context import parse_customer
    from nextbest.customer_columns import CustomerColumns

    catalog = load_catalog()
    columns = CustomerColumns.from_contexts([parse_customer(c, catalog) for c in payload])
    body = b'{"k": 3, "answer": "columns", "columns": '
    return body + columns.model_dump_json(exclude_none=True).encode() + b"}"


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds process ``pid`` has used, all its threads (None without ``/proc``)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch_rate(
    port: int, key: str, columnar: bool, pid: int, customers: int = 10_000, calls: int = 4
) -> tuple[float, float | None]:
    """Customers per second through the batch endpoint (best call of ``calls``), and the
    server's (process ``pid``) CPU milliseconds per measured call."""
    import http.client

    best = 0.0
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    cpu_start = None
    for call in range(calls + 1):
        if call == 1:  # the first call warms up
            cpu_start = process_cpu_s(pid)
        body = batch_body(call + (100 if columnar else 0), customers, columnar)
        start = time.perf_counter()
        conn.request(
            "POST",
            "/v1/decisions/batch",
            body,
            {"Content-Type": "application/json", "X-API-Key": key},
        )
        response = conn.getresponse()
        payload = response.read()
        elapsed = time.perf_counter() - start
        if response.status != 200:
            raise RuntimeError(f"batch call failed: {response.status} {payload[:300]!r}")
        if call:
            best = max(best, customers / elapsed)
    cpu_end = process_cpu_s(pid)
    if cpu_start is None or cpu_end is None:
        return best, None
    return best, 1000 * (cpu_end - cpu_start) / calls


# --------------------------------------------------------------------------- main


def main() -> None:
    from serving.security import create_api_key

    work = Path(tempfile.mkdtemp(prefix="nextbest-bench-"))
    model = build_model(work / "model.onnx")
    keys = work / "keys.json"
    key = create_api_key(keys, "benchmark", ["decide"])
    results: dict[str, float | None] = dict.fromkeys(
        [
            "inproc_decision_us_p50",
            "rps_full",
            "rps_minimal",
            "ratio",
            "p99_c1_ms",
            "batch_customers_per_s",
            "batch_objects_customers_per_s",
            "batch_server_cpu_ms",
            "rps_2w_c64",
            "p99_2w_c64_ms",
        ]
    )
    results["inproc_decision_us_p50"] = round(inproc_decision_us(model), 1)
    print(f"in-process decision: {results['inproc_decision_us_p50']} us (median)", flush=True)

    binary = ensure_wrk()
    full, full_port = start_full(model, work / "state1", keys, workers=1)
    try:
        rate, cpu_ms = batch_rate(full_port, key, True, full.pid)
        results["batch_customers_per_s"] = round(rate)
        results["batch_server_cpu_ms"] = None if cpu_ms is None else round(cpu_ms, 1)
        rate, _ = batch_rate(full_port, key, False, full.pid)
        results["batch_objects_customers_per_s"] = round(rate)
        print(
            f"batch: {results['batch_customers_per_s']:,} customers/s as columns "
            f"({results['batch_server_cpu_ms']} ms of server CPU a call), "
            f"{results['batch_objects_customers_per_s']:,} as customer objects",
            flush=True,
        )
        if binary:
            full_script, minimal_script = lua_script(work, key), lua_script(work, None)
            minimal, minimal_port = start_minimal(model)
            full_url = f"http://127.0.0.1:{full_port}/v1/decisions"
            minimal_url = f"http://127.0.0.1:{minimal_port}/minimal"
            try:
                wrk(binary, full_url, full_script, 16, WARMUP_SECONDS)
                wrk(binary, minimal_url, minimal_script, 16, WARMUP_SECONDS)
                full_runs, minimal_runs = [], []
                for _ in range(2):  # interleaved: both see the same machine
                    full_runs.append(wrk(binary, full_url, full_script, 16, WRK_SECONDS))
                    minimal_runs.append(wrk(binary, minimal_url, minimal_script, 16, WRK_SECONDS))
            finally:
                stop(minimal)
            f16, m16 = best_of(full_runs), best_of(minimal_runs)
            print(f"full c16: {f16}\nminimal c16: {m16}", flush=True)
            results["rps_full"] = round(f16["rps"])
            results["rps_minimal"] = round(m16["rps"])
            results["ratio"] = round(f16["rps"] / m16["rps"], 3)
            c1 = min(
                (wrk(binary, full_url, full_script, 1, WRK_SECONDS) for _ in range(2)),
                key=lambda r: r["p99_ms"],
            )
            print(f"full c1: {c1}", flush=True)
            results["p99_c1_ms"] = round(c1["p99_ms"], 3)
    finally:
        stop(full)
    if binary:
        two, two_port = start_full(model, work / "state2", keys, workers=2)
        try:
            url = f"http://127.0.0.1:{two_port}/v1/decisions"
            wrk(binary, url, lua_script(work, key), 64, WARMUP_SECONDS)
            c64 = best_of(
                [wrk(binary, url, lua_script(work, key), 64, WRK_SECONDS) for _ in range(2)]
            )
        finally:
            stop(two)
        print(f"two workers c64: {c64}", flush=True)
        results["rps_2w_c64"] = round(c64["rps"])
        results["p99_2w_c64_ms"] = round(c64["p99_ms"], 3)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results))


SOAK_ROUND_SECONDS = 20


def rss_anon_mb(pid: int) -> float:
    """Anonymous resident memory of process ``pid`` in MiB (heap and caches, not mapped
    files), from ``/proc``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no RssAnon in /proc/{pid}/status")


def soak(seconds: int) -> None:
    """The ``--soak`` memory check (module docstring)."""
    from serving.security import create_api_key

    binary = ensure_wrk()
    if binary is None:
        raise SystemExit("--soak needs wrk")
    work = Path(tempfile.mkdtemp(prefix="nextbest-soak-"))
    model = build_model(work / "model.onnx")
    keys = work / "keys.json"
    key = create_api_key(keys, "benchmark", ["decide"])
    rounds = max(2, seconds // SOAK_ROUND_SECONDS)
    try:
        server, port = start_full(model, work / "state", keys, workers=1)
        url, script = f"http://127.0.0.1:{port}/v1/decisions", lua_script(work, key)
        try:
            wrk(binary, url, script, 16, WARMUP_SECONDS)
            memory, decisions = [rss_anon_mb(server.pid)], 0
            for i in range(rounds):
                run = wrk(binary, url, script, 16, SOAK_ROUND_SECONDS)
                decisions += round(run["rps"] * SOAK_ROUND_SECONDS)  # wrk's rate x the round
                memory.append(rss_anon_mb(server.pid))
                print(
                    f"round {i + 1}/{rounds}: {run['rps']:,.0f} /s, {memory[-1]:.0f} MiB",
                    flush=True,
                )
        finally:
            stop(server)
        state_mb = sum(f.stat().st_size for f in (work / "state").iterdir()) / 2**20
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mid = memory[len(memory) // 2]
    print(
        json.dumps(
            {
                "soak_s": rounds * SOAK_ROUND_SECONDS,
                "decisions": decisions,
                "rss_anon_start_mb": round(memory[0]),
                "rss_anon_mid_mb": round(mid),
                "rss_anon_end_mb": round(memory[-1]),
                "second_half_growth_mb": round(memory[-1] - mid, 1),
                "state_mb": round(state_mb),
            }
        )
    )


def serve_minimal(port: int, model: Path) -> None:
    """The baseline server (same uvicorn settings as ``nextbest serve``)."""
    import uvicorn

    from serving.http_protocol import CoalescingHttpToolsProtocol

    uvicorn.run(
        minimal_app(model),
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http=CoalescingHttpToolsProtocol,
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minimal-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--soak", type=int, metavar="SECONDS", help="only the memory check, this long"
    )
    args = parser.parse_args()
    if args.minimal_server:
        serve_minimal(args.minimal_server, args.model)
    elif args.soak is not None:
        if args.soak < 2 * SOAK_ROUND_SECONDS:
            parser.error(f"--soak: at least {2 * SOAK_ROUND_SECONDS} seconds, got {args.soak}")
        soak(args.soak)
    else:
        main()
