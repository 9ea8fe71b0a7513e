"""Several `modelcloak serve` workers on one PostgreSQL: migration at start-up and exact counts.

Issue 12 found two servers on one database deadlocking (`deadlock detected` answered as 400) and
two servers starting together on an empty database crashing on the migration (2 of 3 trials). Here
the servers are real processes on loopback and the database a real PostgreSQL (tests/postgres.py).
"""

from __future__ import annotations

import secrets
import subprocess
import threading
from pathlib import Path

import httpx
import pytest
from owner_backend import Backend, ServerProcess
from postgres import postgres_cluster_fixture  # noqa: F401  (fixture "postgres_cluster")

from modelcloak.keys import generate_key_file
from modelcloak.licensing.client import OwnerClient, UsageReporter, obtain_keys
from modelcloak.owner.store import Store, head_revision, schema_revision

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
