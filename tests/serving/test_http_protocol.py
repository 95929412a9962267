"""The coalescing HTTP protocol: an answer's head and body leave in one write, in order, and
a real uvicorn server on it answers plain, streamed and keep-alive requests correctly."""

from __future__ import annotations

import asyncio
import http.client
import threading
import time
from typing import Any

import uvicorn
from conftest import free_port

from serving.http_protocol import CoalescingHttpToolsProtocol, _CoalescingTransport


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


def test_uvicorn_on_the_protocol_answers_keep_alive_and_streamed_requests() -> None:
    port = free_port()
    config = uvicorn.Config(
        _app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http=CoalescingHttpToolsProtocol,
        log_level="warning",
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
    finally:
        server.should_exit = True
        thread.join(timeout=10)
