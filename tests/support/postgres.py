"""A throwaway PostgreSQL cluster for tests: initdb in a temporary directory, served on loopback.

`PostgresCluster().start()` finds the PostgreSQL binaries (pg_config --bindir, else
/usr/lib/postgresql/*/bin), runs initdb and starts the server on a free 127.0.0.1 port with trust
authentication for local connections only; `stop()` shuts it down and deletes the directory.
PostgreSQL refuses to run as root, so under root it runs as the `postgres` system user (Debian's
package creates it) through runuser. `new_database()` gives each test its own empty database.

`require_postgres()` skips when PostgreSQL is not installed, or fails under MODELCLOAK_REQUIRE_ALL
(CI installs the Debian package `postgresql`, so there a missing one is a broken setup).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

STARTUP_TIMEOUT = 30.0


def _bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            bindir = Path(
                subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
            )
            if (bindir / "initdb").exists():
                return bindir
        except (subprocess.CalledProcessError, OSError):
            pass
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if candidates:
        return Path(candidates[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def require_postgres() -> Path:
    """The binaries' directory; skip (or, under MODELCLOAK_REQUIRE_ALL, fail) when PostgreSQL is missing."""
    problems = []
    bindir = _bindir()
    if bindir is None:
        problems.append("PostgreSQL server binaries (initdb, postgres) not found; apt-get install postgresql")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            problems.append("running as root and there is no `postgres` user to run the server as")
    if problems:
        message = "; ".join(problems)
        if os.environ.get("MODELCLOAK_REQUIRE_ALL"):
            pytest.fail(f"PostgreSQL tests need a PostgreSQL server: {message} (.ci/run installs it)")
        pytest.skip(message)
    assert bindir is not None
    return bindir


def _children(parent: int) -> list[int]:
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            found.append(int(stat.split("/")[2]))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresCluster:
    """One postgres server in its own directory; a context manager."""

    def __init__(self, bindir: Path, *, durable: bool = True) -> None:
        self.bindir = bindir
        self.durable = durable
        self.root: Path | None = None
        self.port = 0
        self.user = "postgres"

    def _as_owner(self, command: list[str]) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *command]
        return command

    def start(self) -> PostgresCluster:
        self.root = Path(tempfile.mkdtemp(prefix="modelcloak-pg-"))
        data = self.root / "data"
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        else:
            self.user = pwd.getpwuid(os.geteuid()).pw_name
        subprocess.run(
            self._as_owner(
                [
                    str(self.bindir / "initdb"),
                    "-D",
                    str(data),
                    "-A",
                    "trust",
                    "-U",
                    self.user,
                    "--no-sync",
                    "-E",
                    "UTF8",
                ]
            ),
            check=True,
            capture_output=True,
        )
        for _attempt in range(3):  # a port can be taken between the probe and the server's bind
            self.port = _free_port()
            started = self._launch()
            if started.returncode == 0 and self._ready():
                return self
        log = (self.root / "log").read_text(errors="replace")[-800:] if (self.root / "log").exists() else ""
        self.stop()
        raise RuntimeError(f"PostgreSQL did not start: {started.stderr.strip()} {log}")

    def _launch(self) -> subprocess.CompletedProcess[str]:
        assert self.root is not None
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c max_connections=200" + (
            "" if self.durable else " -c fsync=off -c synchronous_commit=off"
        )
        return subprocess.run(
            self._as_owner(
                [
                    str(self.bindir / "pg_ctl"),
                    "-D",
                    str(self.root / "data"),
                    "-l",
                    str(self.root / "log"),
                    "-o",
                    options,
                    "-w",
                    "-t",
                    str(int(STARTUP_TIMEOUT)),
                    "start",
                ]
            ),
            capture_output=True,
            text=True,
        )

    def kill9(self) -> None:
        """SIGKILL the postmaster and every backend of it at once: PostgreSQL crashing mid-transaction."""
        assert self.root is not None
        postmaster = int((self.root / "data" / "postmaster.pid").read_text().split()[0])
        family = [postmaster, *_children(postmaster)]
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while any(_alive(pid) for pid in family):
            if time.monotonic() > deadline:
                raise RuntimeError("PostgreSQL processes survived SIGKILL")
            time.sleep(0.05)

    def restart(self) -> None:
        """Start the server again on the same directory and port (crash recovery replays the WAL)."""
        assert self.root is not None
        # A killed postmaster nobody reaped is a zombie, which PostgreSQL's lock-file checks (data directory
        # and socket) take for a running server; the lock files of a postmaster that is gone are stale.
        for lock in (self.root / "data" / "postmaster.pid", self.root / f".s.PGSQL.{self.port}.lock"):
            if lock.exists() and not _alive(int(lock.read_text().split()[0])):
                lock.unlink()
        started = self._launch()
        if started.returncode != 0 or not self._ready():
            log = (self.root / "log").read_text(errors="replace")[-800:] if self.root else ""
            raise RuntimeError(f"PostgreSQL did not restart: {started.stderr.strip()} {log}")

    def _ready(self) -> bool:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh empty database; returns its URL."""
        import psycopg

        name = "t_" + secrets.token_hex(6)
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.root is None:
            return
        data = self.root / "data"
        if (data / "postmaster.pid").exists():
            subprocess.run(
                self._as_owner([str(self.bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                capture_output=True,
            )
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


# --- fixtures: import database_fixture and postgres_cluster_fixture into a test module to use them


@pytest.fixture(scope="session", name="postgres_cluster")
def postgres_cluster_fixture() -> Iterator[PostgresCluster]:
    """One cluster for the whole session (each test still gets its own database)."""
    with PostgresCluster(require_postgres()) as cluster:
        yield cluster


@pytest.fixture(params=["sqlite", "postgresql"], name="database")
def database_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test against a SQLite file and against a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "owner.db")
    cluster = request.getfixturevalue("postgres_cluster")
    return cluster.new_database()
