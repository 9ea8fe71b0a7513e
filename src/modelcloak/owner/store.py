"""The owner backend's SQL store: tables, engines for SQLite and PostgreSQL, migrations, sealing.

One schema serves both databases. SQLite (a file, the zero-set-up default) takes every
transaction with BEGIN IMMEDIATE, so read-check-write sequences (quota, usage sequence numbers,
instance counts) are serialised by the database's write lock; PostgreSQL takes a row lock on the
licence (SELECT ... FOR UPDATE) for the same sequences. Either way the check and the write commit
together or not at all, which is what keeps counts exact across threads, processes and restarts.

Secrets (model keys, usage-report keys) are stored as AES-256-GCM ciphertexts under a master key
that never enters the database; the associated data names the row, so a ciphertext moved to
another row does not decrypt. The audit log is append-only: the engine refuses any UPDATE or
DELETE of it, and a trigger in the database refuses it for anyone else who connects.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    create_engine,
    event,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, InvalidatePoolError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator

from modelcloak.owner.errors import DatabaseUnavailable, OwnerError

MASTER_KEY_SIZE = 32
MIGRATION_LOCK_ID = 0x6D63_6F77_6E72  # "mcownr": the PostgreSQL advisory lock migrations take
_SEAL_LABEL = b"modelcloak owner secret v1\x00"
_MIGRATIONS = Path(__file__).with_name("migrations")


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both databases (SQLite keeps no zone; we put UTC back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise OwnerError("internal: naive datetime given to the store")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class Model(Base):
    __tablename__ = "models"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    description: Mapped[str] = mapped_column(Text, default="")
    sealed_key: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class FheSecret(Base):
    """The CKKS secret of a model protected with the fhe scheme; only the decryption service opens it."""

    __tablename__ = "fhe_secrets"
    model_id: Mapped[str] = mapped_column(String(128), ForeignKey("models.id"), primary_key=True)
    fhe_model_id: Mapped[str] = mapped_column(String(64))
    sealed_secret: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class Device(Base):
    __tablename__ = "devices"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    verifier_kind: Mapped[str] = mapped_column(String(32))
    identity: Mapped[str | None] = mapped_column(String(256), nullable=True)
    expected_measurements: Mapped[str] = mapped_column(Text, default="{}")  # JSON name -> hex
    customer: Mapped[str | None] = mapped_column(String(128), nullable=True)  # the tenant the device belongs to
    row_tag: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # owner/integrity.py
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)

    def measurements(self) -> dict[str, str]:
        return json.loads(self.expected_measurements)


class Licence(Base):
    __tablename__ = "licences"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"))
    device_id: Mapped[str | None] = mapped_column(ForeignKey("devices.id"), nullable=True)
    customer: Mapped[str | None] = mapped_column(String(128), nullable=True)  # whose devices may use it
    max_instances: Mapped[int | None] = mapped_column(Integer, nullable=True)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    query_quota: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    queries_used: Mapped[int] = mapped_column(BigInteger, default=0)
    revalidate_seconds: Mapped[int] = mapped_column(Integer)
    offline_grace_seconds: Mapped[int] = mapped_column(Integer)
    allow_sim: Mapped[bool] = mapped_column(Boolean, default=False)
    allow_debug: Mapped[bool] = mapped_column(Boolean, default=False)
    expected_measurements: Mapped[str | None] = mapped_column(Text, nullable=True)  # overrides the device's
    sealed_usage_key: Mapped[bytes] = mapped_column(LargeBinary)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    revocation_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    row_tag: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # owner/integrity.py
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    # The oldest bundle serial a device may run under this licence (rollback pin; checked on the device).
    min_serial: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class Instance(Base):
    """A runtime instance that has received a licence's key (counted against max_instances)."""

    __tablename__ = "instances"
    licence_id: Mapped[str] = mapped_column(ForeignKey("licences.id"), primary_key=True)
    instance_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    first_seen: Mapped[datetime] = mapped_column(UtcDateTime)
    last_seen: Mapped[datetime] = mapped_column(UtcDateTime)


class Nonce(Base):
    __tablename__ = "nonces"
    value: Mapped[str] = mapped_column(String(64), primary_key=True)  # hex
    licence_id: Mapped[str] = mapped_column(ForeignKey("licences.id"))
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    used_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class UsageStream(Base):
    """One reporter's sequence of batches for one licence: the last acknowledged number and its total."""

    __tablename__ = "usage_streams"
    licence_id: Mapped[str] = mapped_column(ForeignKey("licences.id"), primary_key=True)
    reporter_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    last_sequence: Mapped[int] = mapped_column(BigInteger, default=0)
    queries: Mapped[int] = mapped_column(BigInteger, default=0)


class UsageBatch(Base):
    __tablename__ = "usage_batches"
    licence_id: Mapped[str] = mapped_column(ForeignKey("licences.id"), primary_key=True)
    reporter_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    sequence: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    queries: Mapped[int] = mapped_column(BigInteger)
    mac: Mapped[bytes] = mapped_column(LargeBinary)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime)


class AuditEntry(Base):
    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime)
    event: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(256))
    outcome: Mapped[str] = mapped_column(String(16))  # "ok" or "refused"
    detail: Mapped[str] = mapped_column(Text, default="{}")


# Built once: building an INSERT with its values costs more CPU per audit row than sending it.
_AUDIT_INSERT = AuditEntry.__table__.insert()


def now_utc() -> datetime:
    return datetime.now(UTC)


# --- engines -------------------------------------------------------------------------------------

_AUDIT_WRITE = re.compile(r"^\s*(UPDATE\s+\"?audit_log\"?|DELETE\s+FROM\s+\"?audit_log\"?)\b", re.IGNORECASE)


def database_url(location: str | Path) -> str:
    """A SQLAlchemy URL for `location`: a URL as given (postgresql:// uses psycopg 3), or a SQLite file path."""
    text = str(location)
    if "://" not in text:
        return f"sqlite:///{Path(text).expanduser().resolve()}"
    if text.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + text.split("://", 1)[1]
    return text


def redacted(location: str | Path) -> str:
    """`location` with any password in it replaced by ***."""
    text = str(location)
    if "://" not in text:
        return text
    try:
        return make_url(database_url(text)).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable database URL>"


def make_engine(location: str | Path) -> Engine:
    """An engine for a SQLite file or a PostgreSQL URL, with the transaction discipline described above."""
    url_text = database_url(location)
    try:
        url = make_url(url_text)
    except ArgumentError:
        raise OwnerError(f"database {redacted(location)} is neither a file path nor a database URL") from None
    backend = url.get_backend_name()
    if backend == "sqlite":
        if url.database in (None, "", ":memory:"):
            raise OwnerError("an in-memory SQLite database would lose every licence on restart; give a file")
        parent = Path(url.database).parent
        if not parent.is_dir():
            raise OwnerError(f"directory {parent} for the database does not exist")
        # Licences, audit log and usage are the owner's business: a new file is 0600 (SQLite gives its
        # -wal and -shm files the same mode).
        with contextlib.suppress(FileExistsError):
            os.close(os.open(url.database, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=16)
        _sqlite_discipline(engine)
    elif backend == "postgresql":
        engine = create_engine(url, pool_size=16, max_overflow=8)
        _ping_idle_connections(engine)
    else:
        raise OwnerError(f"database {backend!r} is not supported; use a SQLite file or a postgresql:// URL")
    event.listen(engine, "before_cursor_execute", _refuse_audit_rewrite, retval=False)
    return engine


# A pooled PostgreSQL connection idle longer than this is pinged before use.
IDLE_PING_SECONDS = 1.0


def _ping_idle_connections(engine: Engine) -> None:
    """SQLAlchemy's pool_pre_ping, but only for connections idle more than IDLE_PING_SECONDS.

    pool_pre_ping sends a `SELECT 1` on every checkout: a third of a key release's round trips on
    PostgreSQL. A connection used within the last second needs no ping: if the server died since,
    the statement fails, SQLAlchemy recognises the disconnect and invalidates the pool, and the
    client gets 503 as it would for a crash mid-statement. After an outage seen by an idle backend
    (the case pre-ping is for), a dead connection is still found here and the whole pool replaced
    (InvalidatePoolError, what pre-ping raises), so the request gets a fresh connection."""

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.pop("idle_since", None)
        if idle_since is None or time.monotonic() - idle_since < IDLE_PING_SECONDS:
            return  # a fresh connection, or one in use a moment ago
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as error:
            if engine.dialect.is_disconnect(error, dbapi_connection, None):
                raise InvalidatePoolError() from error
            raise


def _sqlite_discipline(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" below issue BEGIN IMMEDIATE instead of pysqlite's deferred BEGIN.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit (an acknowledged usage batch) survives power loss, not only a killed process.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _refuse_audit_rewrite(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
    if _AUDIT_WRITE.match(statement):
        raise OwnerError("the audit log is append-only; UPDATE and DELETE of it are refused")


def _guard_audit_flush(session: Session, _context: Any, _instances: Any) -> None:
    for obj in list(session.dirty) + list(session.deleted):
        if isinstance(obj, AuditEntry) and (obj in session.deleted or session.is_modified(obj)):
            raise OwnerError("the audit log is append-only; UPDATE and DELETE of it are refused")


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (Alembic; the scripts ship inside the package)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    check_schema(engine, allow_behind=True)
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                # Several workers starting together on one database: one migrates, the others wait here
                # and then find the schema at head (on SQLite, BEGIN IMMEDIATE serialises the same way).
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_ID})")
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    except OperationalError as exc:
        raise DatabaseUnavailable(f"cannot reach or migrate the database: {_first_line(exc)}") from None


def head_revision() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def check_schema(engine: Engine, *, allow_behind: bool) -> None:
    """Refuse a database this release cannot use: one from a newer release, or (unless allowed) one not migrated."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    try:
        current = schema_revision(engine)
    except OperationalError as exc:
        raise DatabaseUnavailable(f"cannot reach the database: {_first_line(exc)}") from None
    known = {script.revision for script in ScriptDirectory.from_config(config).walk_revisions()}
    head = head_revision()
    if current is not None and current not in known:
        raise OwnerError(
            f"the database is at schema revision {current}, newer than this release knows (newest {head}): "
            "upgrade modelcloak, or point --db at this release's database"
        )
    if current != head and not allow_behind:
        raise OwnerError(
            f"the database is at schema revision {current or 'none'}, this release needs {head}: "
            "run `modelcloak owner migrate --master-key-file ...` first"
        )


def backup_sqlite(location: str | Path, destination: Path) -> None:
    """Copy a SQLite owner database consistently while servers keep writing (SQLite's online backup).

    The copy holds sealed secrets only, like the database; without the master key it releases nothing.
    PostgreSQL has its own tools (pg_dump, or base backups with WAL archiving), see docs/OWNER.md."""
    import sqlite3

    url = make_url(database_url(location))
    if url.get_backend_name() != "sqlite":
        raise OwnerError("`owner backup` copies SQLite files; back up PostgreSQL with pg_dump (docs/OWNER.md)")
    source = Path(url.database or "")
    if not source.is_file():
        raise OwnerError(f"database {source} does not exist")
    if destination.exists():
        raise OwnerError(f"{destination} exists; give a new file name")
    os.close(os.open(destination, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    reader = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    writer = sqlite3.connect(destination)
    try:
        reader.backup(writer)
    finally:
        writer.close()
        reader.close()


def schema_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


class Store:
    """An engine plus a session factory; `transaction()` is the only way code writes."""

    def __init__(self, location: str | Path, *, migrate_schema: bool = True) -> None:
        self.url = database_url(location)
        self.engine = make_engine(location)
        self.dialect = self.engine.dialect.name
        if migrate_schema:
            migrate(self.engine)
        else:
            check_schema(self.engine, allow_behind=False)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        event.listen(self._sessions, "before_flush", _guard_audit_flush)
        # SQLite has one writer at a time, and a connection that finds the lock taken sleeps in
        # SQLite's busy handler with growing back-offs (long latency tails under load). Queueing our
        # own threads on a lock first leaves the busy handler for other processes only.
        self._local_writer = threading.RLock() if self.dialect == "sqlite" else contextlib.nullcontext()

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on any exception."""
        with self._local_writer, self._sessions() as session:
            try:
                with session.begin():
                    yield session
            except OperationalError as exc:
                failure = DatabaseUnavailable(f"database error: {_first_line(exc)}")
                # Deadlock or serialisation failure between workers: nothing was written, the caller may retry.
                failure.retryable = getattr(getattr(exc, "orig", None), "sqlstate", None) in ("40P01", "40001")
                raise failure from None

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        """A Core connection in one transaction, like `transaction()` without the ORM's unit of work.

        For the hot paths (key release, nonces, usage): an ORM session costs several times the CPU of
        the SQL it sends, and those paths read and write a handful of rows they do not keep."""
        with self._local_writer:
            try:
                with self.engine.begin() as connection:
                    yield connection
            except OperationalError as exc:
                failure = DatabaseUnavailable(f"database error: {_first_line(exc)}")
                failure.retryable = getattr(getattr(exc, "orig", None), "sqlstate", None) in ("40P01", "40001")
                raise failure from None

    @contextmanager
    def autocommit(self) -> Iterator[Connection]:
        """A Core connection on which every statement is its own transaction: no BEGIN and COMMIT round
        trips. For the key release on PostgreSQL, whose grant is one statement (service._SPEND_AND_AUDIT)."""
        with self._local_writer:
            try:
                with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                    yield connection
            except OperationalError as exc:
                raise DatabaseUnavailable(f"database error: {_first_line(exc)}") from None

    def audit_row(self, connection: Connection, event_name: str, subject: str, outcome: str, **detail: Any) -> None:
        """`audit` for a Core connection."""
        connection.execute(
            _AUDIT_INSERT,
            {
                "at": now_utc(),
                "event": event_name,
                "subject": subject,
                "outcome": outcome,
                "detail": json.dumps(detail, default=str),
            },
        )

    @contextmanager
    def reader(self) -> Iterator[Session]:
        """A session for reads only: nothing is committed, so nothing is synced. (On SQLite every transaction
        still takes the write lock, so it queues on our local writer lock like the others.)"""
        with self._local_writer, self._sessions() as session:
            try:
                yield session
            except OperationalError as exc:
                raise DatabaseUnavailable(f"database error: {_first_line(exc)}") from None
            finally:
                session.rollback()

    def audit(self, session: Session, event_name: str, subject: str, outcome: str, **detail: Any) -> None:
        session.add(
            AuditEntry(
                at=now_utc(), event=event_name, subject=subject, outcome=outcome, detail=json.dumps(detail, default=str)
            )
        )

    def ping(self) -> None:
        """Raise DatabaseUnavailable unless the database answers a trivial query."""
        try:
            with self.engine.connect() as connection:
                connection.exec_driver_sql("SELECT 1")
        except OperationalError as exc:
            raise DatabaseUnavailable(f"database error: {_first_line(exc)}") from None

    def close(self) -> None:
        self.engine.dispose()


# --- sealing secrets under the master key ----------------------------------------------------------


class MasterKey:
    """AES-256-GCM under the owner's master key, which lives in a key file or variable, never in the database."""

    def __init__(self, key: bytes | bytearray | memoryview) -> None:
        if len(key) != MASTER_KEY_SIZE:
            raise OwnerError(f"master key must be {MASTER_KEY_SIZE} bytes, got {len(key)}")
        self._aead = AESGCM(bytes(key))
        # A separate key for row integrity tags, so no MAC and no ciphertext ever share a key.
        self.row_tag_key = HKDF(hashes.SHA256(), 32, salt=None, info=b"modelcloak owner row tags v1").derive(bytes(key))
        # And one for key-release nonces (owner/nonces.py), which every worker must issue and accept alike.
        self.nonce_key = HKDF(hashes.SHA256(), 32, salt=None, info=b"modelcloak owner nonces v1").derive(bytes(key))

    @classmethod
    def from_provider(cls, provider: Any) -> MasterKey:
        """Read the key through a modelcloak.keys provider (KeyFile, EnvKey, ...)."""
        from modelcloak.keys import KeyProviderError

        try:
            with provider.key_for({}) as buffer:
                return cls(buffer.view())
        except KeyProviderError as exc:
            raise OwnerError(f"master key: {exc}") from None

    def seal(self, secret: bytes, row: str) -> bytes:
        nonce = secrets.token_bytes(12)
        return nonce + self._aead.encrypt(nonce, secret, _SEAL_LABEL + row.encode())

    def open(self, sealed: bytes, row: str) -> bytes:
        try:
            return self._aead.decrypt(sealed[:12], sealed[12:], _SEAL_LABEL + row.encode())
        except (InvalidTag, ValueError):
            raise OwnerError(
                f"cannot decrypt the secret of {row}: wrong master key, or the database was tampered with"
            ) from None
