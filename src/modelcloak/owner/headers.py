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
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

HEADER_TIMEOUT = 10.0


def header_deadline_protocol(
    timeout: float, on_timeout: Callable[[tuple[str, int] | None], None]
) -> type[asyncio.Protocol] | None:
    """uvicorn's httptools protocol with a header deadline of `timeout` seconds; `on_timeout(client)` is
    called for each connection cut off. None when httptools is missing (uvicorn then has no deadline)."""
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
