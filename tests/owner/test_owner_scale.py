"""Several `modelcloak serve` workers on one PostgreSQL: migration at start-up and exact counts.

Issue 12 found two servers on one database deadlocking (`deadlock detected` answered as 400) and
two servers starting together on an empty database crashing on the migration (2 of 3 trials). Here
the servers are real processes on loopback and the database a real PostgreSQL (tests/postgres.py).
"""

from __future__ import annotations

import secrets
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from owner_backend import MEASUREMENT, Backend, ServerProcess
from postgres import postgres_cluster_fixture  # noqa: F401  (fixture "postgres_cluster")
from sqlalchemy import func, select

from modelcloak.keys import generate_key_file
from modelcloak.licensing.client import OwnerClient, UsageReporter, obtain_keys
from modelcloak.licensing.errors import OwnerError
from modelcloak.licensing.protocol import RequestRefused
from modelcloak.owner.store import Nonce, Store, head_revision, schema_revision

pytestmark = pytest.mark.slow


def test_workers_starting_together_on_an_empty_database_all_come_up(postgres_cluster, tmp_path: Path) -> None:
    master = generate_key_file(tmp_path / "master.key").path
    for trial in range(3):
        database = postgres_cluster.new_database()
        servers = [ServerProcess(database, master, tmp_path / f"t{trial}-{i}.log") for i in range(3)]
        starting = [threading.Thread(target=server.start) for server in servers]
        failures: list[BaseException] = []
        for thread in starting:
            thread.start()
        for thread in starting:
            thread.join()
        try:
            for server in servers:
                if server.process is None or server.process.poll() is not None:
                    failures.append(RuntimeError(server.log.read_text()[-800:]))
                else:
                    assert httpx.get(server.url + "/v1/health").status_code == 200
        finally:
            for server in servers:
                server.stop()
        assert not failures, failures
        store = Store(database, migrate_schema=False)  # refuses unless the schema is at head
        assert schema_revision(store.engine) == head_revision()
        store.close()


def test_two_workers_on_one_postgresql_count_exactly_under_mixed_load(postgres_cluster, tmp_path: Path) -> None:
    """8 reporters over 4 licences and 4 key-release loops, spread over two server processes: every
    answer is a 200 (no deadlock surfaces as an error) and every count is exact."""
    backend = Backend(postgres_cluster.new_database(), tmp_path)
    first = backend.server.start()
    second = ServerProcess(backend.server.database, backend.master_file, tmp_path / "second.log").start()
    urls = (first.url, second.url)
    licences = [backend.licence() for _ in range(4)]
    keys = {licence: backend.usage_key(licence) for licence in licences}
    # A deployment that has run a while has stale nonces, which every new nonce's transaction cleans up:
    # two workers cleaning up overlapping rows is one of the ways they can lock each other.
    with backend.service.store.engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO nonces (value, licence_id, expires_at) SELECT md5(g::text) || md5((g + 1)::text),"
            f" '{licences[0]}', now() - interval '1 hour' FROM generate_series(1, 3000) AS g"
        )
    acknowledged: dict[str, int] = {licence: 0 for licence in licences}
    errors: list[str] = []
    lock = threading.Lock()

    def report(index: int) -> None:
        licence = licences[index % 4]
        rng = secrets.SystemRandom()
        with OwnerClient(urls[index % 2]) as client:
            reporter = UsageReporter(
                client, licence_id=licence, reporter_id=f"r{index}", usage_key=keys[licence],
                state_path=tmp_path / f"r{index}.json",
            )  # fmt: skip
            for _ in range(40):
                count = rng.randint(1, 50)
                try:
                    reporter.report(count)
                except Exception as exc:  # noqa: BLE001  every failure is a finding here
                    with lock:
                        errors.append(f"usage: {exc}")
                    return
                with lock:
                    acknowledged[licence] += count

    def release(index: int) -> None:
        for round_ in range(8):
            with OwnerClient(urls[(index + round_) % 2]) as client:
                try:
                    released = obtain_keys(
                        client, licence_id=licences[(index + round_) % 4], device_id="dev1",
                        instance_id=f"i{index}", attester=backend.attester,
                    )  # fmt: skip
                    released.model_key.close()
                except Exception as exc:  # noqa: BLE001
                    with lock:
                        errors.append(f"release: {exc}")

    threads = [threading.Thread(target=report, args=(i,)) for i in range(8)]
    threads += [threading.Thread(target=release, args=(i,)) for i in range(4)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        second.stop()
        first.stop()
    assert errors == []
    for licence in licences:
        assert backend.service.queries_used(licence) == acknowledged[licence]
        assert sum(row["queries"] for row in backend.service.usage(licence)) == acknowledged[licence]
    logs = first.log.read_text() + second.log.read_text()
    assert "deadlock" not in logs.lower() or "retried" in logs
    backend.service.store.close()


def test_read_only_commands_do_not_migrate_and_a_newer_database_is_one_line(postgres_cluster, tmp_path: Path) -> None:
    import sys

    database = postgres_cluster.new_database()
    command = [sys.executable, "-m", "modelcloak", "owner", "usage", "--db", database]
    unmigrated = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert unmigrated.returncode == 2 and "owner migrate" in unmigrated.stderr, unmigrated.stderr
    store = Store(database)  # control: once migrated, the read-only command works
    assert subprocess.run(command, capture_output=True, text=True, timeout=120).returncode == 0
    with store.engine.begin() as connection:
        connection.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    newer = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert newer.returncode == 2 and "newer than this release" in newer.stderr
    assert "Traceback" not in newer.stderr and len(newer.stderr.strip().splitlines()) == 1
    store.close()


class _RecordingClient(OwnerClient):
    """An OwnerClient that remembers the last nonce it was given, so a release cut off by the crash
    can be looked up in the database afterwards (was it granted or not?)."""

    last_nonce: bytes | None = None

    def nonce(self, licence_id: str) -> bytes:
        self.last_nonce = super().nonce(licence_id)
        return self.last_nonce


def test_kill_9_of_one_worker_under_load_loses_and_double_counts_nothing(postgres_cluster, tmp_path: Path) -> None:
    """Two workers on one PostgreSQL; devices report usage and release keys through both. One worker is
    killed with SIGKILL in the middle of the load; its devices fail over to the other (as behind a load
    balancer) and resend what was unacknowledged. Afterwards every acknowledged batch is counted exactly
    once, every granted release has exactly one audit entry (and a release cut off by the kill has one
    exactly when its nonce was spent: grant and audit commit together), instance slots are exact, and the
    survivor served throughout."""
    backend = Backend(postgres_cluster.new_database(), tmp_path)
    victim = backend.server.start()
    survivor = ServerProcess(backend.server.database, backend.master_file, tmp_path / "survivor.log").start()
    backend.service.enroll_device("dev2", "sim", MEASUREMENT, identity=backend.device.identity, customer="acme")
    licences = [backend.licence() for _ in range(2)]
    keys = {licence: backend.usage_key(licence) for licence in licences}
    slots = backend.service.issue_licence("mnist", max_instances=4, customer="acme", allow_sim=True)
    released_before = _granted_releases(backend)

    lock = threading.Lock()
    killed = threading.Event()
    stop = threading.Event()
    errors: list[str] = []
    acked_queries: dict[str, int] = {}
    acked_batches: dict[str, int] = {}
    after_kill = {"batches": 0, "releases": 0}
    failovers = {"usage": 0, "release": 0}
    resends = {"counted": 0, "duplicate": 0}
    granted = 0
    cut_off_nonces: list[bytes] = []

    def report(index: int) -> None:
        name, licence = f"r{index}", licences[index % 2]
        url = victim.url if index % 2 == 0 else survivor.url
        client = OwnerClient(url, timeout=10)
        reporter = UsageReporter(
            client, licence_id=licence, reporter_id=name, usage_key=keys[licence], state_path=tmp_path / f"{name}.json"
        )
        acked_queries[name] = acked_batches[name] = 0
        rng = secrets.SystemRandom()
        while not stop.is_set():
            count = rng.randint(1, 50)
            try:
                reporter.report(count)
            except RequestRefused as exc:
                with lock:
                    errors.append(f"{name}: {exc}")
                return
            except OwnerError:  # the worker died under us: fail over, resend the unacknowledged batch
                if url == survivor.url:
                    with lock:
                        errors.append(f"{name}: the survivor failed")
                    return
                url = survivor.url
                client.close()
                client = reporter.client = OwnerClient(url, timeout=10)
                pending = reporter._state["pending"]
                ack = reporter.flush()
                with lock:
                    failovers["usage"] += 1
                    if ack is not None:
                        resends["duplicate" if ack["duplicate"] else "counted"] += 1
                        acked_queries[name] += pending["queries"]
                        acked_batches[name] += 1
                continue
            with lock:
                acked_queries[name] += count
                acked_batches[name] += 1
                after_kill["batches"] += killed.is_set()
        client.close()

    def release(index: int) -> None:
        nonlocal granted
        url = victim.url if index % 2 == 0 else survivor.url
        while not stop.is_set():
            with _RecordingClient(url, timeout=10) as client:
                try:
                    obtain_keys(
                        client, licence_id=slots, device_id="dev2", instance_id=f"i{index}", attester=backend.attester
                    ).model_key.close()
                except RequestRefused as exc:
                    with lock:
                        errors.append(f"release i{index}: {exc}")
                    return
                except OwnerError:
                    if url == survivor.url:
                        with lock:
                            errors.append(f"release i{index}: the survivor failed")
                        return
                    url = survivor.url
                    with lock:
                        failovers["release"] += 1
                        if client.last_nonce is not None:
                            cut_off_nonces.append(client.last_nonce)
                    continue
            with lock:
                granted += 1
                after_kill["releases"] += killed.is_set()

    threads = [threading.Thread(target=report, args=(i,)) for i in range(6)]
    threads += [threading.Thread(target=release, args=(i,)) for i in range(4)]
    try:
        for thread in threads:
            thread.start()
        _wait_for(lambda: sum(acked_batches.values()) >= 60 and granted >= 8, "load before the kill")
        victim.kill9()
        killed.set()
        _wait_for(lambda: after_kill["batches"] >= 60 and after_kill["releases"] >= 8, "load after the kill")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    print(
        f"crash test: {granted} releases granted, {failovers} failovers, resends {resends},",
        f"cut-off releases {len(cut_off_nonces)}",
    )
    assert errors == []
    # The kill hit a running load: every thread that used the victim failed over (3 reporters, 2 releasers).
    assert failovers == {"usage": 3, "release": 2}

    for licence in licences:
        streams = {row["reporter"]: row for row in backend.service.usage(licence)}
        mine = {name for name in acked_queries if licences[int(name[1:]) % 2] == licence}
        assert {name: streams[name]["queries"] for name in mine} == {name: acked_queries[name] for name in mine}
        # One stored batch per acknowledged batch, numbered without gaps: nothing counted twice.
        assert {name: streams[name]["last_sequence"] for name in mine} == {name: acked_batches[name] for name in mine}
        assert backend.service.queries_used(licence) == sum(acked_queries[name] for name in mine)

    spent = _spent(backend, cut_off_nonces)
    print(f"crash test: {spent} of the cut-off releases were committed (granted, audited) without an answer")
    assert _granted_releases(backend) - released_before == granted + spent
    assert {row["instance"] for row in backend.service.instances(slots)} == {f"i{i}" for i in range(4)}

    # The survivor still serves, and its log shows no error.
    assert httpx.get(survivor.url + "/v1/health").status_code == 200
    survivor.stop()
    log = survivor.log.read_text()
    assert "Traceback" not in log and "deadlock" not in log.lower(), log[-2000:]
    backend.service.store.close()


def _wait_for(condition, what: str, timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _granted_releases(backend: Backend) -> int:
    with backend.service.store.engine.connect() as connection:
        return connection.exec_driver_sql(
            "SELECT count(*) FROM audit_log WHERE event = 'key.release' AND outcome = 'ok'"
        ).scalar_one()


def _spent(backend: Backend, nonces: list[bytes]) -> int:
    if not nonces:
        return 0
    with backend.service.store.engine.connect() as connection:
        return connection.execute(
            select(func.count())
            .select_from(Nonce)
            .where(Nonce.value.in_([n.hex() for n in nonces]), Nonce.used_at.is_not(None))
        ).scalar_one()
