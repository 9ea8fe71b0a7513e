"""No 5xx from the owner backend, and an audit entry for every refusal: schemathesis over the live API.

The server is a real `modelcloak serve` process on loopback (SQLite); schemathesis reads the
OpenAPI schema the server publishes and generates valid and invalid requests for every operation.
Besides "never a 5xx", each operation's run checks that the audit log gained exactly one entry per
4xx answer. The hand-written cases below are the 500s issue 12 found (TPM evidence with an
attestation key of an unknown algorithm, an all-zero X25519 key), each with a control that
shows the same request passing once the attacked detail is put right.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from pathlib import Path

import cbor2
import httpx
import pytest
import schemathesis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, settings
from owner_backend import MEASUREMENT, Backend
from schemathesis.checks import not_a_server_error
from sqlalchemy import func, select

from modelcloak.licensing.protocol import binding_digest
from modelcloak.owner.store import AuditEntry


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("fuzz")
    made = Backend(str(tmp / "owner.db"), tmp)
    made.server.start()
    made.fuzz_licence = made.licence(query_quota=1000)
    yield made
    made.server.stop()
    made.service.store.close()


def _refusals(backend: Backend) -> int:
    with backend.service.store.transaction() as session:
        return session.scalar(select(func.count()).select_from(AuditEntry).where(AuditEntry.outcome == "refused"))


def _timeouts(backend: Backend) -> int:
    """Refusals for a body that never arrived (408). Counted apart from the other refusals: the
    fuzzing tests before this one can still have entries in the batch writer's queue."""
    with backend.service.store.transaction() as session:
        details = session.scalars(select(AuditEntry.detail).where(AuditEntry.event == "http.refused"))
        return sum(1 for detail in details if json.loads(detail).get("status") == 408)


def _wait_for(count: Callable[[Backend], int], backend: Backend, at_least: int, timeout: float = 30.0) -> int:
    """The server writes refusal entries in batches (every 0.2 s); wait for them, then count exactly."""
    deadline = time.monotonic() + timeout
    while count(backend) < at_least and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # anything beyond the expected count would show up now
    return count(backend)


def _wait_for_refusals(backend: Backend, at_least: int, timeout: float = 30.0) -> int:
    return _wait_for(_refusals, backend, at_least, timeout)


@pytest.fixture
def api_schema(live: Backend):
    return schemathesis.openapi.from_url(live.server.url + "/v1/openapi.json")


@pytest.fixture
def audited(live: Backend):
    """Counts this operation's 4xx answers; afterwards the audit log must hold one entry for each."""
    before = _refusals(live)
    answers = {"4xx": 0}
    yield answers
    assert _wait_for_refusals(live, before + answers["4xx"]) - before == answers["4xx"]


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@pytest.mark.slow
def test_no_operation_answers_5xx_and_every_refusal_is_audited(case, audited, live: Backend) -> None:
    # Generated licence ids are all unknown (404 at the first check); half the bodies get a real one,
    # so the fuzz also reaches the checks behind it (nonce, evidence, MAC, sequence, decryption).
    if isinstance(case.body, dict) and isinstance(case.body.get("licence_id"), str) and len(repr(case.body)) % 2:
        case.body["licence_id"] = live.fuzz_licence
    response = case.call(timeout=30)
    case.validate_response(response, checks=[not_a_server_error])
    if 400 <= response.status_code < 500:
        audited["4xx"] += 1


def _release_body(backend: Backend, licence: str, *, public: bytes | None = None, evidence=None, kind="sim") -> dict:
    with backend.client() as client:
        nonce = client.nonce(licence)
    ephemeral = (
        X25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    public = ephemeral if public is None else public
    if evidence is None:
        evidence = backend.device.evidence(binding_digest(nonce, public), MEASUREMENT)
    return {
        "licence_id": licence,
        "device_id": "dev1",
        "instance_id": "i1",
        "nonce": base64.b64encode(nonce).decode(),
        "ephemeral_public_key": base64.b64encode(public).decode(),
        "evidence_kind": kind,
        "evidence": base64.b64encode(evidence).decode(),
    }


def _unknown_algorithm_key() -> bytes:
    """A well-formed SubjectPublicKeyInfo whose algorithm OID (1.3.6.1.4.1.99999.1) no library knows."""
    oid = bytes([0x06, 0x09, 0x2B, 0x06, 0x01, 0x04, 0x01, 0x86, 0x8D, 0x1F, 0x01])
    algorithm = bytes([0x30, len(oid)]) + oid
    bits = bytes([0x03, 0x21, 0x00]) + bytes(range(32))
    body = algorithm + bits
    return bytes([0x30, len(body)]) + body


def test_malformed_evidence_and_keys_get_4xx_with_an_audit_entry(live: Backend, tmp_path: Path) -> None:
    licence = live.licence()
    before = _refusals(live)
    tpm = cbor2.dumps(
        {
            "format": "modelcloak-tpm-quote/v1",
            "attest": b"\x00" * 64,
            "signature": b"\x00" * 64,
            "ak": _unknown_algorithm_key(),
            "pcr_bank": "sha256",
            "pcrs": {0: b"\x00" * 32},
        }
    )
    unknown_ak = httpx.post(
        live.server.url + "/v1/release", json=_release_body(live, licence, evidence=tpm, kind="tpm")
    )
    assert unknown_ak.status_code == 403 and "known algorithm" in unknown_ak.json()["error"], unknown_ak.text
    zero = httpx.post(live.server.url + "/v1/release", json=_release_body(live, licence, public=bytes(32)))
    assert zero.status_code == 400 and "X25519" in zero.json()["error"], zero.text
    assert _wait_for_refusals(live, before + 2) == before + 2
    with live.server.log.open() as log:
        assert "Traceback" not in log.read()
    # Control: the same request with a real key and sim evidence is granted.
    granted = httpx.post(live.server.url + "/v1/release", json=_release_body(live, licence))
    assert granted.status_code == 200, granted.text


def test_405_names_the_allowed_method_and_the_schema_lists_error_codes(live: Backend) -> None:
    answer = httpx.get(live.server.url + "/v1/usage")
    assert answer.status_code == 405 and answer.headers["allow"] == "POST"
    spec = httpx.get(live.server.url + "/v1/openapi.json").json()
    usage = spec["paths"]["/v1/usage"]["post"]["responses"]
    assert {"200", "401", "403", "409", "413", "422", "503"} <= set(usage)


# --- hygiene and bounds (issue 12 items 8 and 9) ------------------------------------------------------


def test_a_half_sent_body_is_cut_off_with_408_and_audited(live: Backend) -> None:
    import socket

    from modelcloak.owner.api import BODY_TIMEOUT

    before = _timeouts(live)
    with socket.create_connection(("127.0.0.1", live.server.port), timeout=BODY_TIMEOUT * 4) as slow:
        slow.sendall(
            b"POST /v1/nonce HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        answer = slow.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert _wait_for(_timeouts, live, before + 1) == before + 1
    assert httpx.post(live.server.url + "/v1/nonce", json={"licence_id": live.fuzz_licence}).status_code == 200


def test_one_address_over_its_rate_gets_429_and_others_do_not(live: Backend) -> None:
    """The limit is per client address (here the ASGI app in process, with a limit of 5 in a burst,
    so the test does not depend on how fast this machine can send)."""
    from starlette.testclient import TestClient

    from modelcloak.owner.api import create_app

    app = create_app(live.service, rate=0.001, burst=5)
    noisy = TestClient(app, client=("203.0.113.7", 1234))
    quiet = TestClient(app, client=("203.0.113.8", 1234))
    statuses = [noisy.get("/v1/health").status_code for _ in range(8)]
    assert statuses == [200] * 5 + [429] * 3
    assert noisy.get("/v1/health").headers["retry-after"] == "1"
    assert quiet.get("/v1/health").status_code == 200  # control: another address is unaffected


def test_a_database_outage_is_503_without_internals_and_logged(tmp_path: Path) -> None:
    from postgres import PostgresCluster, require_postgres

    with PostgresCluster(require_postgres()) as cluster:
        backend = Backend(cluster.new_database(), tmp_path)
        backend.server.start()
        try:
            assert httpx.get(backend.server.url + "/v1/health").status_code == 200  # control
            licence = backend.licence()
            backend.service.store.close()
            cluster.stop()
            for path, body in (("/v1/health", None), ("/v1/nonce", {"licence_id": licence})):
                answer = httpx.request("GET" if body is None else "POST", backend.server.url + path, json=body)
                assert answer.status_code == 503, answer.text
                assert str(cluster.port) not in answer.text and "127.0.0.1" not in answer.text
                assert answer.headers["retry-after"]
        finally:
            backend.server.stop()
    log = backend.server.log.read_text()
    assert "database unavailable" in log and str(cluster.port) in log


def test_printed_database_urls_hide_the_password_and_sqlite_files_are_private(tmp_path: Path) -> None:
    import os
    import stat

    from modelcloak.owner.store import Store, redacted

    shown = redacted("postgresql://owner:s3cret-pw@db.internal:5432/licences")
    assert "s3cret-pw" not in shown and "db.internal" in shown
    assert redacted("postgresql://owner@db.internal/licences").endswith("/licences")  # control: nothing to hide
    old_umask = os.umask(0o022)
    try:
        Store(tmp_path / "owner.db").close()
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "owner.db").stat().st_mode) == 0o600
