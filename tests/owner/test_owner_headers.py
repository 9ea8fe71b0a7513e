"""Slowloris: a client that sends its request headers a few bytes at a time must not hold a connection.

uvicorn has no header timeout (its keep-alive timer is cancelled by any byte), so `serve` installs
one (modelcloak/owner/headers.py). The attack runs against a live `modelcloak serve`, on a fresh
connection and on a kept-alive one after a complete request; the control is the same attack
against the same server with the deadline turned off (`--header-timeout 0`), which holds the
connection well past the deadline, as plain uvicorn does.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import pytest
from owner_backend import ServerProcess

from modelcloak.keys import generate_key_file

pytestmark = pytest.mark.slow

DEADLINE = 1.0
HEALTH = b"GET /v1/health HTTP/1.1\r\nhost: owner\r\n\r\n"


def _server(tmp_path: Path, name: str, deadline: float) -> ServerProcess:
    master = tmp_path / "master.key"
    if not master.exists():
        generate_key_file(master)
    return ServerProcess(
        str(tmp_path / "owner.db"), master, tmp_path / f"{name}.log", args=["--header-timeout", f"{deadline:g}"]
    ).start()


def _read_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length (what the backend always sends)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length"))
    while len(rest) < length:
        rest += sock.recv(4096)
    return head + b"\r\n\r\n" + rest


def _trickle(sock: socket.socket, seconds: float) -> tuple[float, bytes]:
    """Send a request's header lines a few bytes at a time for up to `seconds`; returns how long the
    server kept the connection and what it sent (b"" while still open at the end)."""
    sock.settimeout(0.25)
    started = time.monotonic()
    sock.sendall(b"GET /v1/health HTTP/1.1\r\nhost: owner\r\n")
    line = 0
    while time.monotonic() - started < seconds:
        try:
            sock.sendall(b"x-slow-%d: %d\r\n" % (line, line))
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - started, b"(closed)"
        line += 1
        try:
            answer = sock.recv(4096)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - started, b"(reset)"
        return time.monotonic() - started, answer or b"(closed)"
    return time.monotonic() - started, b""


def test_slow_or_missing_headers_are_cut_off_with_408_and_without_the_deadline_they_are_held(tmp_path: Path) -> None:
    server = _server(tmp_path, "deadline", DEADLINE)
    try:
        # A fresh connection that never finishes its headers.
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            held, answer = _trickle(sock, 30)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert json.loads(answer.partition(b"\r\n\r\n")[2]) == {"error": "request headers not received within 1 s"}
        assert held >= DEADLINE  # cut off by the deadline, not by something else early
        # A kept-alive connection: a complete request first (answered), then the next one trickles.
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(HEALTH)
            assert _read_response(sock).startswith(b"HTTP/1.1 200")
            _held, answer = _trickle(sock, 30)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        # A connection that sends nothing at all.
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.settimeout(30)
            assert sock.recv(4096).startswith(b"HTTP/1.1 408")
        # Requests that send their headers at once are untouched, and the cut-offs are counted.
        metrics = httpx.get(server.url + "/metrics").text
        assert 'modelcloak_refusals_total{reason="header_timeout",route="other"} 3.0' in metrics
    finally:
        server.stop()

    control = _server(tmp_path, "no-deadline", 0)
    try:
        with socket.create_connection(("127.0.0.1", control.port)) as sock:
            held, answer = _trickle(sock, 4 * DEADLINE)
            assert answer == b"", answer  # still open four deadlines later: the attack works without it
            assert held >= 4 * DEADLINE
            sock.settimeout(30)
            sock.sendall(b"\r\n")  # the headers finally end: the request is served
            assert _read_response(sock).startswith(b"HTTP/1.1 200")
    finally:
        control.stop()
