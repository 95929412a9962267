"""The HTTP protocol ``nextbest serve`` runs: uvicorn's httptools protocol, one write per answer.

uvicorn writes an answer's status line and headers in one ``transport.write`` and its body in
a second. With uvloop each write is a ``send`` system call at once, and on loopback or a fast
network each is a TCP segment the client must read: two per answer where one would do.
:class:`CoalescingHttpToolsProtocol` gives the protocol a transport that holds a lone write
until the next write, or until the event loop's next pass if none comes first. An answer's
head and body, written back to back, leave together (one ``writev``, without copying the
body). Nothing waits longer than one pass of the loop, and the bytes go out in the order
they were written.

Measured with two workers at 64 connections (BENCHMARKS.md): 12% less CPU per decision,
server and load generator together, and 14% more decisions per second.

The protocol also caps a request's head (request line and headers): httptools reads a header
whole before handing it over, with no limit of its own, so one request with a 100 MB header
held ~200 MB of memory and stalled the worker for seconds. A head still incomplete after
:data:`MAX_HEAD_BYTES` is answered 431 and its connection closed.

And it times out slow clients: a connection that has not sent a whole request (head and
body) within :data:`READ_TIMEOUT_S` of its start, or of its previous request's answer, is
answered 408 and closed. uvicorn times out an idle connection only after an answer, so a
new connection that sent nothing, or a request whose body never ended, was held for good
(the security audit held 1,000 such connections for a minute, and a worker has ~20,000).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024
"""The most bytes a request's head (request line and headers) may take: ~2x nginx's
default (4 buffers of 8 KiB). The bytes of the read that began the request are not counted,
so a head is refused somewhere between this and this plus one read (at most 256 KiB)."""
READ_TIMEOUT_S = 60.0
"""Seconds a connection may take to send a whole request: a 10,000-customer batch (1.4 MB as
columns, 5.2 MB as objects) takes a fraction of that on any network the service is meant
for."""
_TIMED_OUT = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: 22\r\n"
    b"connection: close\r\n\r\n"
    b"Request not sent whole."
)
LINGER_S = 1.0
"""How long a connection whose head was refused stays open, reading and dropping, after
the 431 is sent."""
_HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: 32\r\n"
    b"connection: close\r\n\r\n"
    b"Request header fields too large."
)


class _CoalescingTransport:
    """A transport that joins a write with the one right after it.

    A write with nothing held is held, and a flush is scheduled with ``call_soon``. A write
    while bytes are held goes out together with them, in one ``writelines`` call on the real
    transport. ``writelines`` counts as one write. Closing and writing EOF send the held bytes
    first. Everything else (``is_closing``, flow control, ``get_extra_info`` ...) is passed
    to the real transport.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._held is None:
            self._held = bytes(data)
            self._loop.call_soon(self._flush)
        else:
            held, self._held = self._held, None
            self._transport.writelines((held, data))

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def _flush(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:  # is_closing, pause_reading, get_extra_info ...
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a :class:`_CoalescingTransport` (pass the class as
    uvicorn's ``http``), refusing a head of more than :data:`MAX_HEAD_BYTES` (431)."""

    _head_bytes = 0
    """Bytes read since the current request began, while its head is incomplete."""
    _in_head = False
    _began = False
    """A request began in the read being parsed."""
    _refused = False
    """The connection's request head was refused: what arrives is dropped until it closes."""

    _in_message = False
    """A request began and has not arrived whole."""
    _read_timer: asyncio.TimerHandle | None = None
    """Fires :meth:`_read_timed_out` unless a whole request arrives first."""

    def connection_made(self, transport: asyncio.Transport) -> None:
        coalescing = _CoalescingTransport(transport, asyncio.get_running_loop())
        super().connection_made(coalescing)  # type: ignore[arg-type]
        self._start_read_timer()

    def _start_read_timer(self) -> None:
        self._stop_read_timer()
        self._read_timer = self.loop.call_later(READ_TIMEOUT_S, self._read_timed_out)

    def _stop_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        """No whole request in time: 408 and close. Between requests, an answer still being
        made restarts the timer when it completes; a request whose body is still arriving
        (its app waiting to read it) is timed out whatever its state."""
        self._read_timer = None
        if self.transport.is_closing() or (not self._in_message and self._answering()):
            return
        self._refused = True  # what else arrives is dropped
        self.transport.write(_TIMED_OUT)
        self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_read_timer()
        super().connection_lost(exc)

    def on_message_complete(self) -> None:
        self._in_message = False
        self._stop_read_timer()  # the request is whole: its answer is uvicorn's to time
        super().on_message_complete()

    def data_received(self, data: bytes) -> None:
        if self._refused:  # the rest of a refused head: read and dropped, not parsed
            return
        self._began = False
        super().data_received(data)
        if not self._in_head:
            return
        if not self._began:  # every byte of this read belongs to the head
            self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            self._refuse_head()

    def _refuse_head(self) -> None:
        """Refuse the head being read: from now on the connection's bytes are dropped, and
        the 431 goes out once the requests before it on the connection (pipelined) are
        answered, so that theirs are not lost or taken for it."""
        log.warning("request head over %d bytes refused (431)", MAX_HEAD_BYTES)
        self._refused = True
        if not self._answering():
            self._send_refusal()

    def _answering(self) -> bool:
        """An earlier request of the connection is still being answered, or waiting to be."""
        return (self.cycle is not None and not self.cycle.response_complete) or bool(self.pipeline)

    def _send_refusal(self) -> None:
        """Answer 431, end the sending side, and close :data:`LINGER_S` later: closing at
        once, with the client's unread bytes still arriving, would reset the connection and
        could discard the answer before the client reads it."""
        self.transport.write(_HEAD_TOO_LARGE)
        self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._refused and not self._answering() and not self.transport.is_closing():
            self._send_refusal()
        elif not self.transport.is_closing():
            self._start_read_timer()  # the next request, if any, must come whole in time

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._began, self._head_bytes = True, True, 0
        self._in_message = True

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()
