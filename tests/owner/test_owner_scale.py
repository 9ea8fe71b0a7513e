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
from postgres import (  # noqa: F401  (fixture "postgres_cluster")
    PostgresCluster,
    postgres_cluster_fixture,
    require_postgres,
)
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
    unmigrated = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert unmigrated.returncode == 2 and "owner migrate" in unmigrated.stderr, unmigrated.stderr
    store = Store(database)  # control: once migrated, the read-only command works
    assert subprocess.run(command, capture_output=True, text=True, timeout=600).returncode == 0
    with store.engine.begin() as connection:
        connection.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    newer = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert newer.returncode == 2 and "newer than this release" in newer.stderr
    assert "Traceback" not in newer.stderr and len(newer.stderr.strip().splitlines()) == 1
    store.close()


class _RecordingClient(OwnerClient):
    """An OwnerClient that remembers the last nonce it was given, so a release cut off by a crash can be
    looked up in the database afterwards (was it granted or not?)."""

    last_nonce: bytes | None = None

    def nonce(self, licence_id: str) -> bytes:
        self.last_nonce = super().nonce(licence_id)
        return self.last_nonce


class _Fatal(Exception):
    """A failure the crash does not excuse."""


class MixedLoad:
    """Devices reporting usage (6 reporters over 2 licences) and releasing keys (4 instances of an instance
    licence) through the given workers, keeping exact ledgers of what was acknowledged.

    After a failure a device does what the client protocol says: a reporter resends its unacknowledged
    batch (the state file keeps it) until it is acknowledged, a release starts over with a fresh nonce.
    What counts as a survivable failure is the test's: `fallback` (an unreachable worker: go there, as
    a load balancer would) and `outage` (503 while the database is down, and a nonce the database lost
    in its crash: retry)."""

    def __init__(self, backend: Backend, urls: list[str], tmp_path: Path, *, fallback: str | None, outage: bool):
        backend.service.enroll_device("dev2", "sim", MEASUREMENT, identity=backend.device.identity, customer="acme")
        self.backend, self.urls, self.tmp_path = backend, urls, tmp_path
        self.fallback, self.outage = fallback, outage
        self.licences = [backend.licence() for _ in range(2)]
        self.keys = {licence: backend.usage_key(licence) for licence in self.licences}
        self.slots = backend.service.issue_licence("mnist", max_instances=4, customer="acme", allow_sim=True)
        self.released_before = _granted_releases(backend)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.crashed = threading.Event()
        self.errors: list[str] = []
        self.acked_queries: dict[str, int] = {}
        self.acked_batches: dict[str, int] = {}
        self.granted = 0
        self.after_crash = {"batches": 0, "releases": 0}
        self.failovers = {"usage": 0, "release": 0}
        self.retries = 0
        self.resends = {"counted": 0, "duplicate": 0}
        self.cut_off_nonces: list[bytes] = []
        self.threads = [threading.Thread(target=self._report, args=(i,)) for i in range(6)]
        self.threads += [threading.Thread(target=self._release, args=(i,)) for i in range(4)]

    def __enter__(self) -> MixedLoad:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def wait_for(self, batches: int, releases: int, *, after_crash: bool = False) -> None:
        def enough() -> bool:
            if after_crash:
                return self.after_crash["batches"] >= batches and self.after_crash["releases"] >= releases
            return sum(self.acked_batches.values()) >= batches and self.granted >= releases

        deadline = time.monotonic() + 40
        while not enough():
            assert not self.errors, self.errors
            assert time.monotonic() < deadline, f"load stalled: {self.summary()}"
            time.sleep(0.05)

    def summary(self) -> str:
        return (
            f"{sum(self.acked_batches.values())} batches and {self.granted} releases acknowledged, "
            f"failovers {self.failovers}, retries {self.retries}, resends {self.resends}, "
            f"{len(self.cut_off_nonces)} releases cut off"
        )

    def _recover(self, exc: Exception, url: str, kind: str) -> str:
        """Where to try again after `exc`; raises _Fatal for a failure the crash does not excuse."""
        if self.stop.is_set():
            raise _Fatal(f"{kind}: still failing when the load ended: {exc}")
        if isinstance(exc, RequestRefused):
            # During the outage only 503s are excused: a 403 for a nonce the crash lost is what issue 12
            # asked to remove (nonces are not stored when issued, so none can be lost).
            if self.outage and exc.status == 503:
                with self.lock:
                    self.retries += 1
                time.sleep(0.1)
                return url
            raise _Fatal(f"{kind}: {exc}")
        if self.fallback is not None and url != self.fallback:
            with self.lock:
                self.failovers[kind] += 1
            return self.fallback
        raise _Fatal(f"{kind} via {url}: {exc}")

    def _report(self, index: int) -> None:
        name, licence = f"r{index}", self.licences[index % 2]
        url = self.urls[index % len(self.urls)]
        reporter = UsageReporter(
            OwnerClient(url, timeout=10), licence_id=licence, reporter_id=name, usage_key=self.keys[licence],
            state_path=self.tmp_path / f"{name}.json",
        )  # fmt: skip
        self.acked_queries[name] = self.acked_batches[name] = 0
        rng = secrets.SystemRandom()
        try:
            while not self.stop.is_set():
                count = rng.randint(1, 50)
                try:
                    reporter.report(count)
                except OwnerError as exc:
                    url = self._recover(exc, url, "usage")
                    self._settle(reporter, url, name)
                    continue
                with self.lock:
                    self.acked_queries[name] += count
                    self.acked_batches[name] += 1
                    self.after_crash["batches"] += self.crashed.is_set()
        except _Fatal as exc:
            with self.lock:
                self.errors.append(str(exc))
        finally:
            reporter.client.close()

    def _settle(self, reporter: UsageReporter, url: str, name: str) -> None:
        """Resend the unacknowledged batch until the backend acknowledges it (counted or duplicate)."""
        while True:
            reporter.client.close()
            reporter.client = OwnerClient(url, timeout=10)
            pending = reporter._state["pending"]
            try:
                ack = reporter.flush()
            except OwnerError as exc:
                url = self._recover(exc, url, "usage")
                continue
            if ack is not None:
                with self.lock:
                    self.resends["duplicate" if ack["duplicate"] else "counted"] += 1
                    self.acked_queries[name] += pending["queries"]
                    self.acked_batches[name] += 1
            return

    def _release(self, index: int) -> None:
        url = self.urls[index % len(self.urls)]
        try:
            while not self.stop.is_set():
                with _RecordingClient(url, timeout=10) as client:
                    try:
                        obtain_keys(
                            client, licence_id=self.slots, device_id="dev2", instance_id=f"i{index}",
                            attester=self.backend.attester,
                        ).model_key.close()  # fmt: skip
                    except OwnerError as exc:
                        if client.last_nonce is not None:
                            with self.lock:
                                self.cut_off_nonces.append(client.last_nonce)
                        url = self._recover(exc, url, "release")
                        continue
                with self.lock:
                    self.granted += 1
                    self.after_crash["releases"] += self.crashed.is_set()
        except _Fatal as exc:
            with self.lock:
                self.errors.append(str(exc))

    def check_exact(self) -> None:
        """Nothing acknowledged lost, nothing counted twice, every grant audited once, slots exact."""
        assert self.errors == []
        service = self.backend.service
        for licence in self.licences:
            streams = {row["reporter"]: row for row in service.usage(licence)}
            mine = [name for name in self.acked_queries if self.licences[int(name[1:]) % 2] == licence]
            assert {n: streams[n]["queries"] for n in mine} == {n: self.acked_queries[n] for n in mine}
            # One stored batch per acknowledged batch, numbered without gaps: nothing counted twice.
            assert {n: streams[n]["last_sequence"] for n in mine} == {n: self.acked_batches[n] for n in mine}
            assert service.queries_used(licence) == sum(self.acked_queries[n] for n in mine)
        # Grant, nonce spend and audit entry commit together: a release cut off by the crash is either
        # wholly there (its nonce spent, one audit entry) or wholly absent.
        spent = _spent(self.backend, self.cut_off_nonces)
        print(f"crash test: {self.summary()}; {spent} cut-off releases had been committed")
        assert _granted_releases(self.backend) - self.released_before == self.granted + spent
        assert {row["instance"] for row in service.instances(self.slots)} == {f"i{i}" for i in range(4)}


def test_kill_9_of_one_worker_under_load_loses_and_double_counts_nothing(postgres_cluster, tmp_path: Path) -> None:
    """Two workers on one PostgreSQL; one is killed with SIGKILL in the middle of the load. Its devices
    fail over to the other (as behind a load balancer) and resend what was unacknowledged; afterwards
    every count is exact and the survivor served throughout."""
    backend = Backend(postgres_cluster.new_database(), tmp_path)
    victim = backend.server.start()
    survivor = ServerProcess(backend.server.database, backend.master_file, tmp_path / "survivor.log").start()
    load = MixedLoad(backend, [victim.url, survivor.url], tmp_path, fallback=survivor.url, outage=False)
    try:
        with load:
            load.wait_for(batches=60, releases=8)
            victim.kill9()
            load.crashed.set()
            load.wait_for(batches=60, releases=8, after_crash=True)
        # The kill hit a running load: every thread that used the victim failed over (3 reporters, 2 loops).
        assert load.failovers == {"usage": 3, "release": 2}
        load.check_exact()
        assert httpx.get(survivor.url + "/v1/health").status_code == 200
    finally:
        survivor.stop()
        backend.service.store.close()
    log = survivor.log.read_text()
    assert "Traceback" not in log and "deadlock" not in log.lower(), log[-2000:]


def test_kill_9_of_postgresql_under_load_loses_and_double_counts_nothing(tmp_path: Path) -> None:
    """Two workers on one PostgreSQL, and PostgreSQL (postmaster and every backend) killed with SIGKILL in
    the middle of the load, then started again on its directory. While it is down the workers answer 503
    and devices retry; afterwards both workers serve again without a restart, and every count is exact."""
    with PostgresCluster(require_postgres()) as cluster:  # its own cluster: this test kills it
        backend = Backend(cluster.new_database(), tmp_path)
        first = backend.server.start()
        second = ServerProcess(backend.server.database, backend.master_file, tmp_path / "second.log").start()
        load = MixedLoad(backend, [first.url, second.url], tmp_path, fallback=None, outage=True)
        try:
            with load:
                load.wait_for(batches=60, releases=8)
                cluster.kill9()
                time.sleep(1.0)  # an outage the devices notice: 503s
                outage_retries = load.retries
                cluster.restart()
                load.crashed.set()
                load.wait_for(batches=60, releases=8, after_crash=True)
            assert outage_retries > 0  # the crash hit a running load: devices were answered 503
            load.check_exact()
            for server in (first, second):
                assert httpx.get(server.url + "/v1/health").status_code == 200
        finally:
            second.stop()
            first.stop()
            backend.service.store.close()
    logs = first.log.read_text() + second.log.read_text()
    assert "unhandled error" not in logs  # outages were 503s, never a 500


def _granted_releases(backend: Backend) -> int:
    with backend.service.store.engine.connect() as connection:
        return connection.exec_driver_sql(
            "SELECT count(*) FROM audit_log WHERE event = 'key.release' AND outcome = 'ok'"
        ).scalar_one()


def _spent(backend: Backend, nonces: list[bytes]) -> int:
    """How many of `nonces` were spent (their release was granted and committed)."""
    if not nonces:
        return 0
    spent = (Nonce.value.in_([nonce.hex() for nonce in nonces]), Nonce.used_at.is_not(None))
    with backend.service.store.engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(Nonce).where(*spent)).scalar_one()
