"""The HTTP protocol ``nextbest serve`` runs: uvicorn's httptools protocol, one write per answer.

uvicorn writes an answer's status line and headers in one ``transport.write`` and its body in
a second. With uvloop each write is a ``send`` system call at once, and on loopback or a fast
network each is a TCP segment the client must read: two per answer where one would do.
:class:`CoalescingHttpToolsProtocol` gives the protocol a transport that holds a lone write
until the next write or the end of the event loop's current pass, whichever comes first. An
answer's head and body, written back to back, leave in one ``send``. Nothing waits longer
than one pass of the loop, and the bytes go out in the order they were written.

Measured with two workers at 64 connections (BENCHMARKS.md): about a tenth less CPU per
decision, between the server and the load generator.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _CoalescingTransport:
    """A transport that joins a write with the one right after it.

    The first write is held and a flush is scheduled with ``call_soon``. A second write before
    that flush goes out together with the held bytes, in one write to the real transport.
    Everything that is not a write is passed to the real transport. Closing it, writing EOF or
    several buffers at once flush the held bytes first.
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
            joined, self._held = self._held + data, None
            self._transport.write(joined)

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
    uvicorn's ``http``)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        coalescing = _CoalescingTransport(transport, asyncio.get_running_loop())
        super().connection_made(coalescing)  # type: ignore[arg-type]
