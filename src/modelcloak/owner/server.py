"""Running the owner backend: open the store (migrating it), read the master key, serve with uvicorn."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modelcloak.owner.errors import OwnerError
from modelcloak.owner.evidence.registry import VerifierRegistry
from modelcloak.owner.headers import HEADER_TIMEOUT, header_deadline_protocol
from modelcloak.owner.refusals import SHUTDOWN_FLUSH_TIMEOUT
from modelcloak.owner.service import OwnerService
from modelcloak.owner.store import MasterKey, Store

DEFAULT_DATABASE = "modelcloak-owner.db"
METRICS_TOKEN_ENV = "MODELCLOAK_METRICS_TOKEN"
_log = logging.getLogger("modelcloak.owner")


def open_service(
    database: str | Path, master_key_provider: Any, *, registry: VerifierRegistry | None = None
) -> OwnerService:
    """An OwnerService over `database` (SQLite path or postgresql:// URL), schema migrated to the newest revision."""
    master = MasterKey.from_provider(master_key_provider)
    store = Store(database)
    return OwnerService(store, master, registry=registry)


def serve(
    database: str | Path,
    master_key_provider: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8443,
    log_level: str = "warning",
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    header_timeout: float = HEADER_TIMEOUT,
    trusted_proxies: Sequence[str] = (),
) -> None:
    """Serve until interrupted. Put TLS in front (or pass a certificate): the API itself authenticates
    devices by evidence and signed batches, but licence ids and usage figures are not secret-free.

    `header_timeout`: seconds a request's headers may take to arrive (408 after; 0 turns the deadline off,
    for a backend behind a proxy that has its own).

    `trusted_proxies`: addresses whose X-Forwarded-For / X-Forwarded-Proto headers are believed. None
    by default: uvicorn's own default believes them from loopback, so any local client could choose the
    address that per-address rate limits and audit entries see."""
    import uvicorn

    from modelcloak.owner.api import create_app

    if not 0 < port < 65536:
        raise OwnerError(f"port {port} is outside 1..65535")
    if not 0 <= header_timeout <= 3600:
        raise OwnerError(f"header timeout {header_timeout:g} s is outside 0..3600 (0: no deadline)")
    service = open_service(database, master_key_provider)
    # The metrics token comes from the environment only, so it never shows in `ps`.
    app = create_app(service, metrics_token=os.environ.get(METRICS_TOKEN_ENV) or None)

    def headers_late(client: tuple[str, int] | None) -> None:
        address = client[0] if client else None
        service.refusals.record("http.refused", "(headers)", status=408, reason="header timeout", client=address)
        app.metrics.refusals.labels("other", "header_timeout").inc()

    protocol = header_deadline_protocol(header_timeout, headers_late)
    if protocol is None and header_timeout > 0:
        _log.warning("httptools is not installed: request headers have no deadline (pip install httptools)")
    config = uvicorn.Config(
        app,
        http=protocol or "auto",
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        timeout_keep_alive=30,
        backlog=1024,
        # Beyond this many open connections and requests, new ones get 503 at once instead of
        # holding memory (issue 12: 800 half-sent requests were all held open).
        limit_concurrency=1024,
        proxy_headers=bool(trusted_proxies),
        forwarded_allow_ips=list(trusted_proxies) or None,
    )
    try:
        uvicorn.Server(config).run()
    finally:
        # The app's lifespan wrote queued refusal entries at a signalled stop; this covers other exits.
        service.refusals.close(timeout=SHUTDOWN_FLUSH_TIMEOUT)
        service.store.close()
