"""Several workers: each listens on a socket of its own (``SO_REUSEPORT``), connections
spread over them, a second server on the same port is refused, and the pickling that gives a
worker its socket."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from conftest import customer, free_port, server_env, start_server, stop_server

from nextbest.decision_journal import read_journal
from serving.metrics import multiprocess_dir
from serving.reuse_port import (
    STARTUP_FAILURE,
    ReusePortListener,
    bind_reuse_port,
    check_port_free,
    reuse_port_supported,
)

linux_only = pytest.mark.skipif(not reuse_port_supported(), reason="SO_REUSEPORT balancing")


def _sockets_on_port(port: int) -> dict[int, str]:
    """Inode -> TCP state (hex, ``0A`` listening) of every IPv4 socket with local ``port``
    (the tests serve on 127.0.0.1: ``/proc/net/tcp`` holds them all)."""
    out = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port:
            out[int(fields[9])] = fields[3]
    return out


def _owner_of_inodes(pids: list[int]) -> dict[int, int]:
    """Socket inode -> the pid among ``pids`` holding it open."""
    owner = {}
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        for fd in fd_dir.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                owner[int(target[8:-1])] = pid
    return owner


def _workers(server: subprocess.Popen[bytes]) -> list[int]:
    """The worker processes of ``server`` (its spawned children, not the resource tracker)."""
    children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
    return [int(c) for c in children if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]


def _connection_peers(port: int, clients: list[socket.socket]) -> list[int]:
    """For each client socket, the inode of the server-side socket it is connected to (0
    while no worker has accepted it yet)."""
    wanted = {c.getsockname()[1] for c in clients}
    by_peer = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == port and int(remote.split(":")[1], 16) in wanted:
            by_peer[int(remote.split(":")[1], 16)] = int(fields[9])
    return [by_peer[c.getsockname()[1]] for c in clients]


@linux_only
def test_a_listener_pickles_into_a_socket_bound_with_reuse_port() -> None:
    port = free_port()
    first = pickle.loads(pickle.dumps(ReusePortListener("127.0.0.1", port)))
    second = pickle.loads(pickle.dumps(ReusePortListener("127.0.0.1", port)))
    try:
        for sock in (first, second):
            assert isinstance(sock, socket.socket)
            assert sock.getsockname() == ("127.0.0.1", port)
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
            sock.listen()  # both listen on the one port
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            check_port_free("127.0.0.1", port)
    finally:
        first.close()
        second.close()
    check_port_free("127.0.0.1", port)  # free again


@linux_only
def test_a_worker_that_cannot_bind_exits_with_the_start_up_failure_code() -> None:
    with socket.socket() as taken:  # a listener without SO_REUSEPORT holds the port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exit_info:
            bind_reuse_port("127.0.0.1", port)
        assert exit_info.value.code == STARTUP_FAILURE


Served = tuple[subprocess.Popen[bytes], int]
"""A ``nextbest serve`` process and its port."""


def slow_on_linux(test: Callable[..., None]) -> Callable[..., None]:
    """Marks a test that starts servers with several workers: slow, and Linux only."""
    return linux_only(pytest.mark.slow(test))


@pytest.fixture
def two_workers(api_model: Path, tmp_path: Path) -> Iterator[Served]:
    """``nextbest serve --workers 2`` on a free port (state in ``tmp_path / "state"``)."""
    port = free_port()
    server = start_server(api_model, tmp_path / "state", port, workers=2)
    try:
        yield server, port
    finally:
        stop_server(server)


@slow_on_linux
def test_two_workers_listen_apart_share_connections_and_journal_every_decision(
    two_workers: Served, api_model: Path, tmp_path: Path
) -> None:
    server, port = two_workers
    clients: list[socket.socket] = []
    try:
        workers = _workers(server)
        assert len(workers) == 2
        deadline = time.monotonic() + 60
        while True:  # /readyz answered: one worker is up, the other may still be loading
            listening = [i for i, state in _sockets_on_port(port).items() if state == "0A"]
            if len(listening) == 2:
                break
            assert time.monotonic() < deadline, f"{len(listening)} listening sockets, not 2"
            time.sleep(0.1)
        owners = _owner_of_inodes(workers)
        assert sorted(owners[i] for i in listening) == sorted(workers), "a socket per worker"

        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(64)]
        deadline = time.monotonic() + 30
        while 0 in (served_by := _connection_peers(port, clients)):  # not all accepted yet
            assert time.monotonic() < deadline, "the workers did not accept every connection"
            time.sleep(0.05)
        owners = _owner_of_inodes(workers)
        per_worker = [sum(owners.get(inode) == pid for inode in served_by) for pid in workers]
        assert sum(per_worker) == 64
        # a hash over 64 connections: each worker holds at least 8 (P < 1e-9 otherwise)
        assert min(per_worker) >= 8, per_worker

        ids = []
        for i in range(20):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            body = json.dumps({"customer": customer(customer_id=f"two-workers-{i}")})
            conn.request("POST", "/v1/decisions", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            assert response.status == 200
            ids.append(json.loads(response.read())["decision_id"])
            conn.close()

        second = subprocess.run(
            [sys.executable, "-m", "nextbest", "serve", "--port", str(port), "--workers", "2"],
            env={**server_env(tmp_path / "other"), "NEXTBEST_MODEL_URI": str(api_model)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == STARTUP_FAILURE
        assert f"cannot listen on 127.0.0.1:{port}" in second.stdout + second.stderr
        assert not (tmp_path / "other" / "prometheus").exists()  # refused before writing
    finally:
        for c in clients:
            c.close()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    assert server.returncode == 0
    journal = read_journal(tmp_path / "state")
    assert set(ids) <= set(journal.column("decision_id").to_pylist())


@slow_on_linux
def test_workers_that_cannot_come_back_stop_the_server_with_the_failure_code(
    two_workers: Served,
) -> None:
    server, port = two_workers
    squatter = socket.socket()
    os.kill(server.pid, signal.SIGSTOP)  # the supervisor cannot restart them until SIGCONT
    try:
        for pid in _workers(server):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:  # the port is free once both workers are gone: another program takes it
            try:
                squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                squatter.bind(("127.0.0.1", port))
                squatter.listen()
                break
            except OSError:
                assert time.monotonic() < deadline, "the killed workers still hold the port"
                time.sleep(0.05)
        os.kill(server.pid, signal.SIGCONT)
        assert server.wait(timeout=60) == STARTUP_FAILURE  # restarts fail: not a clean exit
    finally:
        if server.poll() is None:
            os.kill(server.pid, signal.SIGCONT)  # never leave it stopped
        squatter.close()


def test_metrics_dirs_of_servers_no_longer_running_are_removed(tmp_path: Path) -> None:
    dead_pid = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_pid.wait()
    root = tmp_path / "prometheus"
    (root / str(dead_pid.pid)).mkdir(parents=True)
    (root / str(dead_pid.pid) / "counter_1.db").write_bytes(b"old")
    (root / str(os.getppid())).mkdir()  # a running server's (the test runner's parent)
    (root / str(os.getppid()) / "counter_2.db").write_bytes(b"live")
    (root / str(os.getpid())).mkdir()  # an earlier process that had this pid
    (root / str(os.getpid()) / "counter_3.db").write_bytes(b"stale")

    own = multiprocess_dir(tmp_path, os.getpid())

    assert own == root / str(os.getpid()) and list(own.iterdir()) == []
    assert not (root / str(dead_pid.pid)).exists()
    assert (root / str(os.getppid()) / "counter_2.db").read_bytes() == b"live"


@slow_on_linux
def test_a_second_server_on_the_same_state_leaves_the_first_ones_metrics(
    two_workers: Served, api_model: Path, tmp_path: Path
) -> None:
    first, first_port = two_workers
    own = tmp_path / "state" / "prometheus" / str(first.pid)
    assert own.is_dir()
    second = start_server(api_model, tmp_path / "state", free_port(), workers=2)
    try:
        assert own.is_dir()  # the second server has its own directory
        assert (tmp_path / "state" / "prometheus" / str(second.pid)).is_dir()
        connection = http.client.HTTPConnection("127.0.0.1", first_port, timeout=10)
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        assert response.status == 200 and b"nextbest_model_info" in response.read()
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=60)


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie has)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


@slow_on_linux
def test_workers_stop_when_their_supervisor_is_killed(two_workers: Served) -> None:
    """SIGKILL to the supervisor: its workers get SIGTERM from the kernel and shut down,
    rather than serving on, orphaned, with the port."""
    server, port = two_workers
    workers = _workers(server)
    assert len(workers) == 2 and all(_running(w) for w in workers)
    os.kill(server.pid, signal.SIGKILL)
    server.wait(timeout=10)
    deadline = time.monotonic() + 30
    while any(_running(w) for w in workers):
        assert time.monotonic() < deadline, "workers still running after their supervisor died"
        time.sleep(0.1)
    with pytest.raises(OSError):  # nobody serves the port any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


@slow_on_linux
def test_two_workers_asked_at_once_about_the_same_customers_contact_each_once(
    two_workers: Served, tmp_path: Path
) -> None:
    """64 connections (spread over both workers) ask about 8 customers 12 times each, all at
    once, offering only an SMS that the rules allow once a day: each customer gets one SMS
    at most, in the answers, the journal and the contact store."""
    server, port = two_workers
    sms = "sms:health_insurance:now"
    bodies = [
        json.dumps({"customer": customer(customer_id=f"hot-{i % 8}"), "candidates": [sms]})
        for i in range(96)
    ]

    async def ask_all() -> list[dict[str, object]]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits) as http:
            answers = await asyncio.gather(
                *(
                    http.post(
                        "/v1/decisions", content=b, headers={"Content-Type": "application/json"}
                    )
                    for b in bodies
                )
            )
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        return [a.json() for a in answers]

    try:
        answers = asyncio.run(ask_all())
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    sent = Counter(
        json.loads(b)["customer"]["customer_id"]
        for b, a in zip(bodies, answers, strict=True)
        if a["chosen"]["action"] == sms
    )  # type: ignore[index]
    assert sent and max(sent.values()) == 1, sent
    journal = read_journal(tmp_path / "state")
    by_key = Counter(
        k
        for k, a in zip(
            journal["customer_key"].to_pylist(), journal["action"].to_pylist(), strict=True
        )
        if a != 0
    )
    assert len(journal) == 96 and max(by_key.values()) == 1, by_key
