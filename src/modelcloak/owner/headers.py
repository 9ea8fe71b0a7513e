"""A deadline for request headers (slowloris), which uvicorn does not have.

uvicorn's `timeout_keep_alive` runs only between requests, from the moment a response is complete,
and any byte the client sends cancels it; nothing bounds how long a request's header block may take
to arrive. So a client that opens a connection and sends a header line now and then holds that
connection (and one of `limit_concurrency`'s slots) for ever: a few hundred such clients lock
everybody else out. uvicorn 0.55 has no option for it (its Config offers `timeout_keep_alive`,
`h11_max_incomplete_event_size`, `limit_concurrency`, none of which is a header deadline).

`header_deadline_protocol()` is uvicorn's httptools protocol with one timer more: armed when a
connection opens and when a request's first byte arrives, disarmed when its headers are complete.
When it fires the client gets 408 and the connection is closed. Bodies have their own deadline
(`api.BodyLimit`), and idle keep-alive connections uvicorn's.

The same protocol also sends a response's status line, headers and body as one segment: uvicorn
writes the head and the body separately, and on loopback each write is a send() that runs the
receiver's TCP processing inline. `_CoalescingTransport` joins the writes made in one turn of the
event loop: a key release (two requests) took about a fifth less server CPU, and the client less
too (docs/BENCHMARKS.md, issue 12 round 6).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

HEADER_TIMEOUT = 10.0


class _CoalescingTransport:
    """The connection's transport, with the writes made in one turn of the event loop sent as one.

    The first write of a turn is held and a flush is scheduled for the end of the turn; later writes
    of the same turn join it. Everything else (close, pause_reading, get_extra_info, ...) goes to the
    real transport, and close() flushes first, so nothing is reordered or lost."""

    __slots__ = ("_transport", "_loop", "_pending")

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if self._pending is None:
            self._pending = [data]
            self._loop.call_soon(self.flush)
        else:
            self._pending.append(data)

    def flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def header_deadline_protocol(
    timeout: float, on_timeout: Callable[[tuple[str, int] | None], None]
) -> type[asyncio.Protocol] | None:
    """uvicorn's httptools protocol with a header deadline of `timeout` seconds (0: none); `on_timeout(client)`
    is called for each connection cut off. Responses go out in one write each (_CoalescingTransport).
    None when httptools is missing (uvicorn then has no deadline)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None
    body = json.dumps({"error": f"request headers not received within {timeout:g} s"}).encode()
    answer = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        + body
    )

    class HeaderDeadlineProtocol(HttpToolsProtocol):  # type: ignore[misc]
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            # Every later use of self.transport (each request's response cycle included) goes through it.
            self.transport = _CoalescingTransport(transport, self.loop)
            self._arm_header_deadline()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm_header_deadline()

        def on_headers_complete(self) -> None:
            self._disarm_header_deadline()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_deadline()
            super().connection_lost(exc)

        def _arm_header_deadline(self) -> None:
            self._disarm_header_deadline()
            if timeout > 0:
                self._header_timer = self.loop.call_later(timeout, self._headers_late)

        def _disarm_header_deadline(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            on_timeout(self.client)
            self.transport.write(answer)
            self.transport.close()

    return HeaderDeadlineProtocol
