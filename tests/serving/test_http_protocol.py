"""The coalescing HTTP protocol: an answer's head and body leave in one write, in order, and
a real uvicorn server on it answers plain, streamed and keep-alive requests correctly."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from conftest import free_port

from serving.http_protocol import (
    MAX_HEAD_BYTES,
    CoalescingHttpToolsProtocol,
    _CoalescingTransport,
)


class _RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.paused = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.writes.append(bytes(data))

    def writelines(self, chunks: Any) -> None:  # one call, one entry (one writev)
        assert not self.closed, "write after close"
        self.writes.append(b"".join(chunks))

    def write_eof(self) -> None:
        self.writes.append(b"<eof>")

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.paused = True


def _run(check: Any) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        real = _RecordingTransport()
        await check(real, _CoalescingTransport(real, loop))  # type: ignore[arg-type]

    asyncio.run(main())


def test_head_and_body_leave_in_one_write() -> None:
    async def check(real: _RecordingTransport, transport: _CoalescingTransport) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        transport.write(b"{}")
        assert real.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
        await asyncio.sleep(0)  # the scheduled flush finds nothing held
        assert len(real.writes) == 1

    _run(check)


def test_a_lone_write_goes_out_after_one_pass_of_the_loop() -> None:
    async def check(real: _RecordingTransport, transport: _CoalescingTransport) -> None:
        transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        assert real.writes == []
        await asyncio.sleep(0)
        assert real.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]

    _run(check)


def test_writes_keep_their_order_across_flushes() -> None:
    async def check(real: _RecordingTransport, transport: _CoalescingTransport) -> None:
        for chunk in (b"a", b"b", b"c"):
            transport.write(chunk)
        await asyncio.sleep(0)
        transport.writelines([b"d", b"e"])
        await asyncio.sleep(0)
        assert b"".join(real.writes) == b"abcde"
        assert real.writes == [b"ab", b"c", b"de"]

    _run(check)


def test_close_and_eof_flush_what_is_held_first() -> None:
    async def check(real: _RecordingTransport, transport: _CoalescingTransport) -> None:
        transport.write(b"last bytes")
        transport.write_eof()
        assert real.writes == [b"last bytes", b"<eof>"]
        transport.write(b"more")
        transport.close()
        assert real.writes[-1] == b"more" and real.closed
        await asyncio.sleep(0)  # the flush scheduled for "more" must not write after close
        assert real.writes[-1] == b"more"

    _run(check)


def test_a_held_write_is_dropped_when_the_peer_has_gone() -> None:
    async def check(real: _RecordingTransport, transport: _CoalescingTransport) -> None:
        transport.write(b"late")
        real.closed = True  # the connection was lost meanwhile
        await asyncio.sleep(0)
        assert real.writes == []

    _run(check)


def test_other_calls_reach_the_real_transport() -> None:
    async def check(real: _RecordingTransport, transport: _CoalescingTransport) -> None:
        transport.pause_reading()
        assert real.paused
        assert transport.is_closing() is False

    _run(check)


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(3):
            await send({"type": "http.response.body", "body": b"part%d;" % i, "more_body": True})
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b"end"})
        return
    answer = b"echo:" + body
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(len(answer)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": answer})


@contextlib.contextmanager
def _serving() -> Iterator[tuple[uvicorn.Server, int]]:
    """A uvicorn server of :func:`_app` on the protocol, in a thread, and its port."""
    port = free_port()
    config = uvicorn.Config(
        _app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http=CoalescingHttpToolsProtocol,
        log_level="error",
        lifespan="off",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        yield server, port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _exchange(
    port: int, head: bytes, body: bytes = b"", stop_on_answer: bool = True
) -> tuple[bytes, int]:
    """Send ``head`` then ``body`` in 16 KiB writes, stopping when the server answers
    (``stop_on_answer``); everything it answers until it closes the connection, and the
    bytes sent."""
    data = head + body
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sent = 0
        while sent < len(data) and not (stop_on_answer and select.select([sock], [], [], 0)[0]):
            sock.sendall(data[sent : sent + 16384])
            sent += len(data[sent : sent + 16384])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer, sent


def test_a_request_head_over_the_limit_is_431_and_the_server_goes_on() -> None:
    with _serving() as (_, port):
        pad = b"x" * (256 * MAX_HEAD_BYTES)  # 16 MiB
        too_big = b"GET /x HTTP/1.1\r\nHost: a\r\nX-Pad: " + pad + b"\r\n\r\n"
        answer, sent = _exchange(port, too_big)
        assert answer.startswith(b"HTTP/1.1 431 ")
        assert answer.endswith(b"Request header fields too large.")
        assert sent < len(too_big)  # answered before the head was all sent
        # pipelined behind a request still being answered: that answer first, then the 431
        pipelined = b"GET /stream HTTP/1.1\r\nHost: a\r\n\r\n" + too_big[: 16 * MAX_HEAD_BYTES]
        answer, _ = _exchange(port, pipelined, stop_on_answer=False)
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert answer.index(b"\r\nend\r\n0\r\n\r\n") < answer.index(b"HTTP/1.1 431 ")
        assert answer.endswith(b"Request header fields too large.")
        fits = b"x" * (MAX_HEAD_BYTES // 2)  # within the limit, over several reads
        head = b"POST /echo HTTP/1.1\r\nHost: a\r\nX-Pad: " + fits + b"\r\n"
        body = b"y" * (8 * MAX_HEAD_BYTES)  # a big body is not a big head
        head += b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        answer, _ = _exchange(port, head, body)
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert answer.endswith(b"echo:" + body)


def test_uvicorn_on_the_protocol_answers_keep_alive_and_streamed_requests() -> None:
    with _serving() as (server, port):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        for i in range(20):  # one connection, kept alive
            payload = b'{"n": %d}' % i
            connection.request("POST", "/echo", body=payload)
            response = connection.getresponse()
            assert response.status == 200
            assert response.read() == b"echo:" + payload
        connection.request("GET", "/stream")
        response = connection.getresponse()
        assert response.status == 200
        assert response.read() == b"part0;part1;part2;end"
        connection.request("POST", "/echo", body=b"after the stream")
        assert connection.getresponse().read() == b"echo:after the stream"
        protocols = list(server.server_state.connections)  # the open connection's protocol
        assert protocols and all(
            isinstance(p.transport, _CoalescingTransport)  # type: ignore[attr-defined]
            for p in protocols
        )
        connection.close()


def test_a_client_that_never_sends_a_whole_request_is_timed_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connection that sent nothing, or a head without its body, was held for good."""
    import serving.http_protocol

    monkeypatch.setattr(serving.http_protocol, "READ_TIMEOUT_S", 0.5)
    with _serving() as (_, port):
        for partial in (
            b"",  # connected, silent
            b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nonly part",
        ):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(partial)
                started = time.monotonic()
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
                assert answer.startswith(b"HTTP/1.1 408 "), answer
                assert time.monotonic() - started < 5  # closed by the server, not by us
        # a connection kept alive between whole requests is timed out only after its last
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        for _ in range(3):
            connection.request("POST", "/echo", body=b"x")
            assert connection.getresponse().read() == b"echo:x"
            time.sleep(0.3)  # under the timeout each time: the timer restarts per request
        connection.close()
