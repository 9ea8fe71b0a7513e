"""Who the backend thinks a client is: X-Forwarded-For is believed only from a configured proxy.

uvicorn believes X-Forwarded-For from loopback by default, so any local client could choose the
address that the per-address rate limit and the audit entries see. `serve` believes it from no one
unless `--trusted-proxy` names the proxy; the control is the same forged header through a server
that trusts loopback as its proxy, where the forged address is taken.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
from owner_backend import ServerProcess
from sqlalchemy import select

from modelcloak.keys import generate_key_file
from modelcloak.owner.store import AuditEntry, Store

FORGED = "203.0.113.9"  # TEST-NET-3: never a real client here


def _audited_client(tmp_path: Path, name: str, args: list[str]) -> str | None:
    """The client address in the audit entry of one refused request carrying a forged X-Forwarded-For."""
    master = tmp_path / "master.key"
    if not master.exists():
        generate_key_file(master)
    database = str(tmp_path / f"{name}.db")
    server = ServerProcess(database, master, tmp_path / f"{name}.log", args=args).start()
    try:
        answer = httpx.post(
            server.url + "/v1/release",
            content=b"{}",
            headers={"content-type": "application/json", "x-forwarded-for": FORGED},
        )
        assert 400 <= answer.status_code < 500, answer.text
        store = Store(database)
        try:
            deadline = time.monotonic() + 60  # refusal entries are written in batches
            while time.monotonic() < deadline:
                with store.transaction() as session:
                    details = list(session.scalars(select(AuditEntry.detail).where(AuditEntry.event == "http.refused")))
                if details:
                    return json.loads(details[-1]).get("client")
                time.sleep(0.2)
        finally:
            store.close()
        raise AssertionError("the refusal was never audited")
    finally:
        server.stop()


def test_a_forged_forwarded_for_from_a_local_client_is_not_believed(tmp_path: Path) -> None:
    assert _audited_client(tmp_path, "default", []) == "127.0.0.1"


def test_control_a_trusted_proxy_forwarded_for_is_taken(tmp_path: Path) -> None:
    assert _audited_client(tmp_path, "proxied", ["--trusted-proxy", "127.0.0.1"]) == FORGED
