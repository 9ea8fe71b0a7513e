"""Refusal audit entries queued when `serve` is stopped are written before it exits (issue 12).

Refusals are audited by a background writer (owner/refusals.py). To have entries provably queued
at the moment of the signal, the test holds SQLite's write lock from outside while it sends
refusals that need no database (releases with forged nonces): the writer waits on the lock with
every entry in hand or in its queue. Then the server gets SIGTERM, the lock is let go, and every
entry must be in the audit log. The control does the same with SIGKILL: nothing is written, so
the entries were really still queued, and it is the shutdown flush that writes them.
"""

from __future__ import annotations

import base64
import secrets
import signal
import sqlite3
import time
from pathlib import Path

import httpx
import pytest
from owner_backend import Backend

REFUSALS = 20


def _refused_releases(database: Path) -> int:
    with sqlite3.connect(database) as connection:
        return connection.execute(
            "SELECT count(*) FROM audit_log WHERE event = 'key.release' AND outcome = 'refused'"
        ).fetchone()[0]


def _queue_refusals_then(backend: Backend, licence: str, database: Path, sig: signal.Signals) -> int:
    """Refusals while the database is locked, `sig` to the server, then the lock let go; returns how
    many of the refusals reached the audit log."""
    server = backend.server.start()
    before = _refused_releases(database)
    blocker = sqlite3.connect(database, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the refusal writer now waits (busy timeout 30 s)
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for _ in range(REFUSALS):
                body = {
                    "licence_id": licence,
                    "device_id": "dev1",
                    "instance_id": "i1",
                    "nonce": base64.b64encode(secrets.token_bytes(32)).decode(),  # forged: refused by its tag
                    "ephemeral_public_key": base64.b64encode(secrets.token_bytes(32)).decode(),
                    "evidence_kind": "sim",
                    "evidence": base64.b64encode(b"{}").decode(),
                }
                answer = client.post("/v1/release", json=body)
                assert answer.status_code == 403 and "unknown nonce" in answer.json()["error"]
        assert server.process is not None
        server.process.send_signal(sig)
        time.sleep(0.5)  # SIGTERM: uvicorn stops and the flush waits on the lock; SIGKILL: gone
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert server.process is not None
    server.process.wait(timeout=60)
    server.process = None
    return _refused_releases(database) - before


@pytest.mark.slow  # two server starts: about 6 s on the shared machine
def test_refusals_queued_at_sigterm_are_written_and_lost_only_to_sigkill(tmp_path: Path) -> None:
    database = tmp_path / "owner.db"
    backend = Backend(str(database), tmp_path)
    licence = backend.licence()
    try:
        assert _queue_refusals_then(backend, licence, database, signal.SIGTERM) == REFUSALS
        # Control: the same refusals, killed instead of stopped: none of them had been written.
        assert _queue_refusals_then(backend, licence, database, signal.SIGKILL) == 0
    finally:
        backend.server.stop()
        backend.service.store.close()
