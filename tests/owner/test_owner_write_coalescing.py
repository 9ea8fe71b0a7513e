"""A response's head and body leave in one write (modelcloak/owner/headers.py, _CoalescingTransport).

uvicorn writes the status line and headers, then the body, as two sends; the backend's protocol joins
the writes of one event-loop turn. These tests drive the transport wrapper on a real event loop with
a transport that records what reaches the socket: order and content are kept, close() flushes first,
writes of different turns stay separate, and nothing is written after the transport is closing.
"""

from __future__ import annotations

import asyncio

from modelcloak.owner.headers import _CoalescingTransport


class RecordingTransport:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed = False
        self.extra = {"peername": ("127.0.0.1", 4242)}

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.sent.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> object:
        return self.extra.get(name)


async def _turns() -> tuple[list[bytes], list[bytes], RecordingTransport]:
    loop = asyncio.get_running_loop()
    real = RecordingTransport()
    transport = _CoalescingTransport(real, loop)
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    transport.write(b"{}")
    during_turn = list(real.sent)
    await asyncio.sleep(0)  # the end of the turn: one send with both
    transport.write(b"second")
    await asyncio.sleep(0)
    after = list(real.sent)
    transport.write(b"last words")
    transport.close()  # flushes before closing
    transport.write(b"after close")
    await asyncio.sleep(0)
    return during_turn, after, real


def test_writes_of_one_turn_are_one_send_in_order_and_close_flushes_first() -> None:
    during_turn, after, real = asyncio.run(_turns())
    assert during_turn == []  # held until the turn ends
    assert after == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}", b"second"]
    assert real.sent == [*after, b"last words"]  # nothing after close reaches the socket
    assert real.closed


def test_everything_else_goes_to_the_real_transport() -> None:
    real = RecordingTransport()
    transport = _CoalescingTransport(real, asyncio.new_event_loop())
    assert transport.get_extra_info("peername") == ("127.0.0.1", 4242)
    assert not transport.is_closing()
