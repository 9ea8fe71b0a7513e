"""Key-release nonces across a PostgreSQL crash (issue 12): a release cut off by the crash is a 503 with
Retry-After, and its nonce still works afterwards, because issued nonces are not stored (owner/nonces.py).

Before, nonces were stored when issued, without a sync: one issued shortly before a crash could be
gone afterwards, and the device's release was refused with a 403 ("unknown nonce") instead of
being told to retry. Whether a given nonce survived depended on when PostgreSQL's WAL writer last
flushed, so that failure could not be provoked on demand; what is tested here is the property that
replaces it, deterministically: the same nonce before, during and after a kill -9 of PostgreSQL.
"""

from __future__ import annotations

import base64
import secrets
import time
from pathlib import Path

import pytest
from owner_backend import MEASUREMENT, release_body
from postgres import PostgresCluster, require_postgres
from starlette.testclient import TestClient

from modelcloak.licensing.protocol import HPKE_SUITE, release_info
from modelcloak.owner.api import create_app
from modelcloak.owner.evidence.sim import SimDevice
from modelcloak.owner.service import OwnerService
from modelcloak.owner.store import MasterKey, Store


@pytest.mark.slow
def test_a_release_cut_off_by_a_postgresql_crash_is_503_and_its_nonce_works_after(tmp_path: Path) -> None:
    with PostgresCluster(require_postgres()) as cluster:  # its own cluster: this test kills it
        store = Store(cluster.new_database())
        service = OwnerService(store, MasterKey(secrets.token_bytes(32)))
        model_key = secrets.token_bytes(32)
        service.register_model("m", model_key)
        device = SimDevice.create(tmp_path / "dev1.pem")
        service.enroll_device("dev1", "sim", MEASUREMENT, identity=device.identity)
        licence = service.issue_licence("m", device_id="dev1", allow_sim=True)
        client = TestClient(create_app(service, rate=0), raise_server_exceptions=False)
        try:

            def nonce() -> bytes:
                answer = client.post("/v1/nonce", json={"licence_id": licence})
                assert answer.status_code == 200, answer.text
                return base64.b64decode(answer.json()["nonce"])

            spent, kept = nonce(), nonce()
            body, _ = release_body(device, licence, spent)
            assert client.post("/v1/release", json=body).status_code == 200  # committed (synced) before the crash

            cluster.kill9()
            body, ephemeral = release_body(device, licence, kept)
            cut_off = client.post("/v1/release", json=body)
            assert cut_off.status_code == 503, cut_off.text  # retryable, not a 403
            assert cut_off.headers["retry-after"]
            assert "5432" not in cut_off.text and str(cluster.port) not in cut_off.text  # no internals

            cluster.restart()
            retried = client.post("/v1/release", json=body)  # the same request, the same nonce
            assert retried.status_code == 200, retried.text
            wrapped = base64.b64decode(retried.json()["wrapped_key"])
            assert HPKE_SUITE.decrypt(wrapped, ephemeral, info=release_info(licence, kept))[:32] == model_key

            # Controls: the spend of the release granted before the crash survived it (a replay is refused),
            # and the retried release spent its nonce as well.
            for used in (spent, kept):
                body, _ = release_body(device, licence, used)
                replay = client.post("/v1/release", json=body)
                assert replay.status_code == 403 and "already used" in replay.json()["error"]
        finally:
            client.close()
            store.close()


@pytest.mark.slow
def test_after_a_postgresql_restart_an_idle_backend_pings_its_pool_and_answers(tmp_path: Path, monkeypatch) -> None:
    """Pooled connections idle over store.IDLE_PING_SECONDS are pinged before use (every checkout was,
    with pool_pre_ping, at a round trip per release). After PostgreSQL restarts under an idle backend,
    the ping finds the dead connection, the pool is replaced and the first release is granted. Control:
    with the ping turned off (an idle limit no connection reaches), the same first release is a 503."""
    from modelcloak.owner import store as store_module

    idle = store_module.IDLE_PING_SECONDS + 0.2
    with PostgresCluster(require_postgres()) as cluster:  # its own cluster: this test kills it
        store = Store(cluster.new_database())
        service = OwnerService(store, MasterKey(secrets.token_bytes(32)))
        service.register_model("m", secrets.token_bytes(32))
        device = SimDevice.create(tmp_path / "dev1.pem")
        service.enroll_device("dev1", "sim", MEASUREMENT, identity=device.identity)
        licence = service.issue_licence("m", device_id="dev1", allow_sim=True)
        client = TestClient(create_app(service, rate=0), raise_server_exceptions=False)

        def release_after_restart() -> int:
            answer = client.post("/v1/nonce", json={"licence_id": licence})
            body, _ = release_body(device, licence, base64.b64decode(answer.json()["nonce"]))
            assert client.post("/v1/release", json=body).status_code == 200  # the pool holds live connections
            cluster.kill9()
            cluster.restart()
            time.sleep(idle)  # the backend sat idle through it
            answer = client.post("/v1/nonce", json={"licence_id": licence})
            body, _ = release_body(device, licence, base64.b64decode(answer.json()["nonce"]))
            return client.post("/v1/release", json=body).status_code

        try:
            assert release_after_restart() == 200
            monkeypatch.setattr(store_module, "IDLE_PING_SECONDS", 3600.0)
            assert release_after_restart() == 503
        finally:
            client.close()
            store.close()
