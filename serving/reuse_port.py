"""A listening socket per worker (``SO_REUSEPORT``), so the kernel spreads connections evenly.

uvicorn's multi-worker mode binds one socket in the parent and every worker accepts from it.
The worker that wakes first takes every pending connection. A client that opens its
connection pool at once can then land wholly on one worker while the others idle: measured
here (BENCHMARKS.md), 64 connections of a load run went 64/0 once, 44/20 another time.
Marketing platforms hold pools of keep-alive connections, so the skew lasts as long as the
pool does.

With :class:`ReusePortListener` in place of that socket, each worker binds its own socket to
the address with ``SO_REUSEPORT``, and the kernel assigns every new connection to one of
them by a hash of its addresses. A worker that uvicorn's supervisor restarts binds its own
socket the same way. This is Linux's behaviour. Elsewhere :func:`reuse_port_supported` is
false and the caller keeps uvicorn's shared socket.

How the worker gets its socket: uvicorn hands the parent's sockets to each worker by
pickling them. A :class:`ReusePortListener` pickles as a call to :func:`bind_reuse_port`, so
it arrives in the worker as a new socket bound there.

Two differences from a shared socket:

* connections still waiting in a worker's queue when the worker stops (a restart on SIGHUP,
  a crash, the end of a graceful stop) are reset instead of being accepted by another
  worker; Linux's ``net.ipv4.tcp_migrate_req = 1`` moves them to the other workers' queues;
* while no worker listens (all of them restarting at once), the port is not held: another
  program may take it, and the workers then fail to start. The supervisor stops, and
  ``nextbest serve`` exits with the start-up failure code (3).
"""

from __future__ import annotations

import logging
import socket
import sys
from typing import Any

from uvicorn.config import STARTUP_FAILURE  # a worker's exit code: the supervisor then stops

log = logging.getLogger(__name__)


def reuse_port_supported() -> bool:
    """Whether the kernel balances connections over sockets sharing a port (Linux)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def check_port_free(host: str, port: int) -> None:
    """Bind ``host:port`` once without ``SO_REUSEPORT`` and release it.

    Sockets that share a port must all set ``SO_REUSEPORT``. Without this check, a second
    ``nextbest serve`` on the same port would quietly join the first one's group and take
    half of its connections.

    Raises
    ------
    OSError
        If anything listens on the address (or it cannot be bound), naming the address.
    """
    with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None


def bind_reuse_port(host: str, port: int) -> socket.socket:
    """A new socket bound to ``host:port`` with ``SO_REUSEPORT`` (not yet listening).

    Runs in the worker, as the worker unpickles its :class:`ReusePortListener`. A failure
    exits the worker with uvicorn's start-up failure code, so that the supervisor stops
    rather than restart it in a loop.
    """
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        log.error("cannot listen on %s:%d: %s", host, port, exc)
        sys.exit(STARTUP_FAILURE)
    return sock


class ReusePortListener:
    """Stands in for the listening socket given to uvicorn's ``Multiprocess`` supervisor: in
    each worker it becomes a socket of its own (:func:`bind_reuse_port`)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port

    def __reduce__(self) -> tuple[Any, tuple[str, int]]:
        return bind_reuse_port, (self.host, self.port)
