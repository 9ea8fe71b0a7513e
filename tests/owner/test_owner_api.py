"""The owner backend over HTTP: a real `modelcloak serve` process (uvicorn) on loopback, SQLite and PostgreSQL.

Covers the device side end to end (the key provider opening a sealed bundle), exact quota under
concurrent reporters, kill -9 of the server in the middle of a usage load run, and malformed,
oversized and unauthenticated requests (4xx, never 500), including a hypothesis fuzz of the bodies.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import make_mlp, reference_outputs
from owner_backend import MEASUREMENT, Backend, ServerProcess, _free_port  # noqa: F401
from postgres import database_fixture, postgres_cluster_fixture  # noqa: F401  (fixtures "database", "postgres_cluster")

from modelcloak.keys import KeyProviderError
from modelcloak.licensing.client import OwnerBackendKey, OwnerClient, SimAttester, UsageReporter
from modelcloak.licensing.protocol import RequestRefused
from modelcloak.owner.errors import OwnerError


@pytest.fixture
def backend(database: str, tmp_path: Path):
    made = Backend(database, tmp_path)
    made.server.start()
    yield made
    made.server.stop()
    made.service.store.close()


def test_runtime_opens_a_sealed_bundle_with_the_backend_as_key_provider(backend: Backend, tmp_path: Path) -> None:
    from modelcloak.inference import load
    from modelcloak.protector import protect

    model = make_mlp()
    protect(model, tmp_path / "m.mcb", key=backend.model_key_file)
    licence = backend.licence()
    provider = OwnerBackendKey(backend.server.url, licence_id=licence, device_id="dev1", attester=backend.attester)
    assert "INSECURE" in provider.describe()
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    with load(tmp_path / "m.mcb", key=provider) as session:
        np.testing.assert_allclose(session.run(x)["logits"], reference_outputs(model, x), rtol=1e-5, atol=1e-5)
    assert provider.usage_key is not None and provider.terms["insecure_evidence"] is True
    # The reason for a refusal reaches the device.
    backend.service.revoke_licence(licence, "contract ended")
    with pytest.raises(KeyProviderError, match="contract ended"):
        with load(tmp_path / "m.mcb", key=provider):
            pass
    # Wrong measurement: refused, with the reason.
    liar = OwnerBackendKey(
        backend.server.url,
        licence_id=backend.licence(),
        device_id="dev1",
        attester=SimAttester(backend.device, {"app": "cd" * 32}),
    )
    with pytest.raises(KeyProviderError, match="measurement app"):
        liar.key_for({})


def _licensed_session(backend: Backend, tmp_path: Path, licence: str, clock=None):
    from modelcloak.inference import load
    from modelcloak.options import Metering
    from modelcloak.protector import protect

    if not (tmp_path / "m.mcb").exists():
        protect(make_mlp(), tmp_path / "m.mcb", key=backend.model_key_file)
    provider = OwnerBackendKey(backend.server.url, licence_id=licence, device_id="dev1", attester=backend.attester)
    return load(tmp_path / "m.mcb", key=provider, metering=Metering(tmp_path / f"usage-{licence}.json", clock=clock))


def test_a_quota_of_10_answers_at_most_10(backend: Backend, tmp_path: Path) -> None:
    """Issue 12: a quota of 10 answered 20. Now each run reserves its samples before it answers; a
    refused reservation answers nothing. Control: a licence without a quota answers all 20 and has
    them counted when the session closes."""
    from modelcloak.runtime.errors import SessionError

    x = np.random.default_rng(2).standard_normal((4, 16)).astype(np.float32)
    licence = backend.licence(query_quota=10)
    answered = 0
    session = _licensed_session(backend, tmp_path, licence)
    with session:
        for batch in (x, x, x, x[:2], x[:1]):
            try:
                answered += len(session.run(batch)["logits"])
            except SessionError as exc:
                assert "quota" in str(exc)
    assert answered == 10 and backend.service.queries_used(licence) == 10
    unlimited = backend.licence()
    with _licensed_session(backend, tmp_path, unlimited) as session:
        answered = sum(len(session.run(x)["logits"]) for _ in range(5))
    assert answered == 20 and backend.service.queries_used(unlimited) == 20


@pytest.mark.slow
def test_usage_waits_out_a_backend_outage_within_the_offline_grace(backend: Backend, tmp_path: Path) -> None:
    """Issue 12: `run` failed as soon as a batch was due while the backend was down. Now runs go on
    until `offline_until`, their counts kept in the usage state file and reported, exactly, when the
    backend is back; after the grace the session stops (control)."""
    from datetime import UTC, datetime, timedelta

    from modelcloak.runtime.errors import SessionError

    now = [datetime.now(UTC)]
    x = np.random.default_rng(3).standard_normal((3, 16)).astype(np.float32)
    licence = backend.licence(query_quota=1000, revalidate_seconds=3600, offline_grace_seconds=3600)
    session = _licensed_session(backend, tmp_path, licence, clock=lambda: now[0])
    with session:
        session.run(x)
        assert backend.service.queries_used(licence) == 3
        backend.server.stop()
        session.run(x)  # its batch is pending in the state file
        session.run(x[:2])  # deferred behind it
        backend.server.start()
        session.run(x[:1])  # resends the pending batch, then reports 2 + 1
        assert backend.service.queries_used(licence) == 3 + 3 + 3
        backend.server.stop()
        now[0] += timedelta(hours=3)  # past revalidate_at + grace
        with pytest.raises(SessionError, match="offline grace ended"):
            session.run(x)
        backend.server.start()
    assert backend.service.queries_used(licence) == 9


def test_an_instance_is_one_device_installation_and_the_owner_can_free_its_slot(backend: Backend) -> None:
    """Issue 12: each process took a new random instance id, so a 2-instance licence refused its third
    start on the same device. Control: three distinct installations do hit the limit, until the
    owner frees a slot."""
    from modelcloak.owner.evidence.sim import SimDevice

    other = SimDevice.create(backend.tmp / "pool.pem")
    backend.service.enroll_device("pool1", "sim", MEASUREMENT, identity=other.identity, customer="acme")
    licence = backend.service.issue_licence("mnist", max_instances=2, customer="acme", allow_sim=True)
    attester = SimAttester(other, MEASUREMENT)

    def start(instance_id: str | None = None) -> None:
        provider = OwnerBackendKey(
            backend.server.url, licence_id=licence, device_id="pool1", attester=attester, instance_id=instance_id
        )
        provider.key_for({}).close()

    for _ in range(3):  # three process starts on one installation: one slot
        start()
    assert [row["instance"] for row in backend.service.instances(licence)] == ["pool1"]
    start("second-install")
    with pytest.raises(KeyProviderError, match="2 of 2 instances"):
        start("third-install")
    backend.service.free_instance(licence, "second-install")
    start("third-install")


def test_revalidation_and_offline_grace_on_the_device(backend: Backend) -> None:
    from datetime import UTC, datetime, timedelta

    licence = backend.licence(revalidate_seconds=60, offline_grace_seconds=600)
    provider = OwnerBackendKey(backend.server.url, licence_id=licence, device_id="dev1", attester=backend.attester)
    provider.key_for({}).close()
    now = datetime.now(UTC)
    assert provider.revalidate(now) is True  # not due yet: no request
    assert provider.revalidate(now + timedelta(seconds=61)) is True  # due: released again
    backend.server.stop()
    later = datetime.fromisoformat(provider.terms["revalidate_at"]) + timedelta(seconds=1)
    assert provider.revalidate(later) is False  # unreachable, inside the grace: keep going
    with pytest.raises(OwnerError, match="offline grace ended"):
        provider.revalidate(later + timedelta(seconds=600))
    backend.server.start()
    backend.service.revoke_licence(licence, "moved to another site")
    with pytest.raises(RequestRefused, match="moved to another site"):
        provider.revalidate(later)  # reachable and refused: stop at once, grace or not


def test_sql_update_under_a_running_server_releases_nothing(backend: Backend) -> None:
    """Issue 12's attack on the live server: a revoked licence un-revoked, extended and lifted to an
    unlimited quota by raw SQL (database credentials only) stays refused; control: an untouched
    licence is released by the same server."""
    from sqlalchemy import create_engine, text

    victim = backend.licence(query_quota=1)
    backend.service.revoke_licence(victim, "contract ended")
    raw = create_engine(backend.service.store.url)
    with raw.begin() as connection:
        connection.execute(
            text(
                "UPDATE licences SET revoked_at = NULL, revocation_reason = NULL, query_quota = NULL,"
                " allow_debug = TRUE WHERE id = :id"
            ),
            {"id": victim},
        )
    raw.dispose()
    with pytest.raises(RequestRefused, match="failed its integrity check") as refusal:
        backend.usage_key(victim)
    assert refusal.value.status == 403
    assert len(backend.usage_key(backend.licence())) == 32  # control


def test_quota_is_exact_under_concurrent_reporters(backend: Backend) -> None:
    quota = 60
    licence = backend.licence(query_quota=quota)
    usage_key = backend.usage_key(licence)
    acknowledged = []
    refusals = []
    lock = threading.Lock()

    def reporter(index: int) -> None:
        with backend.client() as client:
            batches = UsageReporter(
                client,
                licence_id=licence,
                reporter_id=f"r{index}",
                usage_key=usage_key,
                state_path=backend.tmp / f"r{index}.json",
            )
            for _ in range(15):  # 8 x 15 x 1 = 120 attempts for a quota of 60
                try:
                    batches.report(1)
                    with lock:
                        acknowledged.append(1)
                except RequestRefused as exc:
                    assert exc.status == 403 and "quota exhausted" in str(exc)
                    with lock:
                        refusals.append(1)

    threads = [threading.Thread(target=reporter, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(acknowledged) == quota
    assert len(refusals) == 120 - quota
    assert backend.service.queries_used(licence) == quota
    assert sum(row["queries"] for row in backend.service.usage(licence)) == quota


@pytest.mark.slow
def test_quota_is_exact_across_two_server_processes(backend: Backend) -> None:
    # Two backends on one database: the in-process writer thread cannot serialise them, only the
    # database's locks can (FOR UPDATE on PostgreSQL, BEGIN IMMEDIATE on SQLite).
    second = ServerProcess(backend.server.database, backend.master_file, backend.tmp / "second.log").start()
    try:
        quota = 80
        licence = backend.licence(query_quota=quota)
        usage_key = backend.usage_key(licence)
        acknowledged = []

        def reporter(index: int) -> None:
            url = (backend.server.url, second.url)[index % 2]
            with OwnerClient(url) as client:
                batches = UsageReporter(
                    client,
                    licence_id=licence,
                    reporter_id=f"r{index}",
                    usage_key=usage_key,
                    state_path=backend.tmp / f"two{index}.json",
                )
                for _ in range(20):  # 8 x 20 x 1 = 160 attempts for a quota of 80
                    try:
                        batches.report(1)
                        acknowledged.append(1)
                    except RequestRefused as exc:
                        assert exc.status == 403, exc

        threads = [threading.Thread(target=reporter, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        second.stop()
    assert len(acknowledged) == quota
    assert backend.service.queries_used(licence) == quota
    assert sum(row["queries"] for row in backend.service.usage(licence)) == quota


@pytest.mark.slow
def test_kill_9_during_usage_load_loses_and_duplicates_nothing(backend: Backend) -> None:
    licence = backend.licence()
    usage_key = backend.usage_key(licence)
    stop = threading.Event()
    acked: dict[str, int] = {}
    reporters: dict[str, UsageReporter] = {}
    rng = np.random.default_rng(7)
    sizes = {f"r{i}": [int(n) for n in rng.integers(1, 50, 10_000)] for i in range(4)}

    def run(name: str) -> None:
        client = OwnerClient(backend.server.url, timeout=5)
        batches = UsageReporter(
            client, licence_id=licence, reporter_id=name, usage_key=usage_key, state_path=backend.tmp / f"{name}.json"
        )
        reporters[name] = batches
        acked[name] = 0
        for size in sizes[name]:
            if stop.is_set():
                return
            try:
                batches.report(size)
                acked[name] += size
            except OwnerError:
                return  # the server died under us: the batch stays pending in the state file

    threads = [threading.Thread(target=run, args=(name,)) for name in sizes]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    backend.server.kill9()
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert sum(acked.values()) > 0, "the load run acknowledged nothing before the kill"
    backend.server.start()  # restart on the same database

    server_totals = {row["reporter"]: row["queries"] for row in backend.service.usage(licence)}
    for name, reporter in reporters.items():
        pending = reporter._state["pending"]
        in_flight = pending["queries"] if pending else 0
        # Committed but unacknowledged at the kill is at most the one in-flight batch.
        assert server_totals.get(name, 0) in (acked[name], acked[name] + in_flight)
        with OwnerClient(backend.server.url) as client:
            reporter.client = client
            ack = reporter.flush()  # resend: counted if it never landed, acknowledged again if it did
        if ack is not None:
            acked[name] += in_flight
        reporter.client = OwnerClient(backend.server.url)
    server_totals = {row["reporter"]: row["queries"] for row in backend.service.usage(licence)}
    assert server_totals == {name: total for name, total in acked.items() if total}
    assert backend.service.queries_used(licence) == sum(acked.values())


# --- malformed, oversized, unauthenticated ------------------------------------------------------------


def _status(backend: Backend, method: str, path: str, **kwargs) -> tuple[int, dict]:
    response = httpx.request(method, backend.server.url + path, timeout=10, **kwargs)
    try:
        body = response.json()
    except ValueError:
        body = {}
    return response.status_code, body


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_bad_requests_get_4xx_with_a_reason(backend: Backend) -> None:
    licence = backend.licence()
    good_mac = base64.b64encode(secrets.token_bytes(32)).decode()
    cases = [
        ("POST", "/v1/nonce", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 422),
        ("POST", "/v1/nonce", {"json": []}, 422),
        ("POST", "/v1/nonce", {"json": {"licence_id": "../../etc"}}, 422),
        ("POST", "/v1/nonce", {"json": {"licence_id": "lic_none"}}, 404),
        ("POST", "/v1/nonce", {"json": {"licence_id": licence, "extra": 1}}, 422),
        ("POST", "/v1/nonce", {"content": b"licence_id=x"}, 422),
        (
            "POST",
            "/v1/usage",
            {"json": {"licence_id": licence, "reporter_id": "r", "sequence": 1, "queries": 1, "mac": good_mac}},
            401,
        ),
        (
            "POST",
            "/v1/usage",
            {"json": {"licence_id": licence, "reporter_id": "r", "sequence": "1", "queries": 1, "mac": good_mac}},
            422,
        ),
        (
            "POST",
            "/v1/usage",
            {"json": {"licence_id": licence, "reporter_id": "r", "sequence": 1, "queries": -5, "mac": good_mac}},
            422,
        ),
        (
            "POST",
            "/v1/usage",
            {"json": {"licence_id": licence, "reporter_id": "r", "sequence": 1, "queries": 1, "mac": "!!!"}},
            400,
        ),
        (
            "POST",
            "/v1/release",
            {
                "json": {
                    "licence_id": licence,
                    "device_id": "dev1",
                    "instance_id": "i",
                    "nonce": "AA==",
                    "ephemeral_public_key": "AA==",
                    "evidence_kind": "sim",
                    "evidence": "AA==",
                }
            },
            400,
        ),
        ("POST", "/v1/release", {"json": {"licence_id": licence}}, 422),
        ("POST", "/v1/nonce", {"content": b"{" * 100_000, "headers": {"content-type": "application/json"}}, 422),
        ("POST", "/v1/nonce", {"content": b"x" * (300 * 1024)}, 413),
        ("GET", "/v1/usage", {}, 405),
        ("GET", "/v1/nope", {}, 404),
    ]
    for method, path, kwargs, expected in cases:
        status, body = _status(backend, method, path, **kwargs)
        assert status == expected, (path, kwargs.get("json"), status, body)
        assert isinstance(body.get("error"), str) and "\n" not in body["error"]

    # Oversized without a Content-Length (chunked) is cut off too.
    def chunks():
        for _ in range(100):
            yield b"x" * 4096

    status, _ = _status(backend, "POST", "/v1/nonce", content=chunks())
    assert status == 413
    # Unauthenticated release: a valid nonce but evidence from nobody enrolled.
    nonce = backend.client().nonce(licence)
    status, body = _status(
        backend,
        "POST",
        "/v1/release",
        json={
            "licence_id": licence,
            "device_id": "dev1",
            "instance_id": "i",
            "nonce": base64.b64encode(nonce).decode(),
            "ephemeral_public_key": base64.b64encode(secrets.token_bytes(32)).decode(),
            "evidence_kind": "sim",
            "evidence": base64.b64encode(b"forged").decode(),
        },
    )
    assert status == 403 and "evidence refused" in body["error"]
    assert _status(backend, "GET", "/v1/health")[0] == 200  # control: the server is alive and answers 200


_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=40),
    st.sampled_from(["sim", "AA==", "lic_x", "dev1", "", "\x00", "A" * 200]),
)
_json = st.recursive(
    _json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=12,
)
_fields = [
    "licence_id",
    "device_id",
    "instance_id",
    "nonce",
    "ephemeral_public_key",
    "evidence_kind",
    "evidence",
    "reporter_id",
    "sequence",
    "queries",
    "mac",
]
_bodies = st.one_of(_json, st.dictionaries(st.sampled_from(_fields), _json_leaf, max_size=len(_fields)))


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_fuzzed_bodies_never_get_a_5xx(backend: Backend) -> None:
    client = httpx.Client(base_url=backend.server.url, timeout=10)
    seen: set[int] = set()

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(path=st.sampled_from(["/v1/nonce", "/v1/release", "/v1/usage"]), body=_bodies, raw=st.booleans())
    def check(path: str, body: object, raw: bool) -> None:
        content = json.dumps(body).encode()
        if raw:
            content = content[: len(content) // 2]  # truncated JSON
        response = client.post(path, content=content, headers={"content-type": "application/json"})
        seen.add(response.status_code)
        assert 400 <= response.status_code < 500, (path, body, response.status_code, response.text[:200])

    check()
    client.close()
    assert seen & {400, 422}  # the fuzz did reach the validators


def test_cli_run_takes_its_key_from_the_backend_and_reports_usage(backend: Backend, tmp_path: Path) -> None:
    """`modelcloak run --owner-url`: attested release, the model runs, its samples are counted, quota stops it."""
    from modelcloak.protector import protect

    model = make_mlp()
    protect(model, tmp_path / "m.mcb", key=backend.model_key_file)
    x = np.random.default_rng(0).standard_normal((7, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    licence = backend.licence(query_quota=10)
    measurement = [f"--measurement={name}={value}" for name, value in MEASUREMENT.items()]
    command = [sys.executable, "-m", "modelcloak", "run", "--allow-unsigned",
    str(tmp_path / "m.mcb"), str(tmp_path / "x.npy"),
               "--owner-url", backend.server.url, "--licence", licence, "--device-id", "dev1", "--attest", "sim",
               "--sim-key", str(tmp_path / "device.pem"), *measurement, "--usage-state", str(tmp_path / "usage.json"),
               "-o", str(tmp_path / "y.npz")]  # fmt: skip
    ran = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr
    assert "INSECURE" in ran.stderr
    assert np.array_equal(np.load(tmp_path / "y.npz")["logits"], reference_outputs(model, x))
    assert backend.service.queries_used(licence) == 7

    again = subprocess.run(command, capture_output=True, text=True, timeout=600)  # 7 more would pass 10
    assert again.returncode == 2, again.stderr
    assert "quota" in again.stderr and "Traceback" not in again.stderr
    assert backend.service.queries_used(licence) == 7

    backend.service.revoke_licence(licence, "device decommissioned")
    revoked = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert revoked.returncode == 2 and "device decommissioned" in revoked.stderr
