"""Running the owner backend: open the store (migrating it), read the master key, serve with uvicorn."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from modelcloak.owner.errors import OwnerError
from modelcloak.owner.evidence.registry import VerifierRegistry
from modelcloak.owner.service import OwnerService
from modelcloak.owner.store import MasterKey, Store

DEFAULT_DATABASE = "modelcloak-owner.db"
METRICS_TOKEN_ENV = "MODELCLOAK_METRICS_TOKEN"


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
) -> None:
    """Serve until interrupted. Put TLS in front (or pass a certificate): the API itself authenticates
    devices by evidence and signed batches, but licence ids and usage figures are not secret-free."""
    import uvicorn

    from modelcloak.owner.api import create_app

    if not 0 < port < 65536:
        raise OwnerError(f"port {port} is outside 1..65535")
    service = open_service(database, master_key_provider)
    config = uvicorn.Config(
        # The metrics token comes from the environment only, so it never shows in `ps`.
        create_app(service, metrics_token=os.environ.get(METRICS_TOKEN_ENV) or None),
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
    )
    try:
        uvicorn.Server(config).run()
    finally:
        service.store.close()
