"""What the owner backend does: register models, enrol devices, issue licences, release keys, meter use.

The HTTP layer (api.py) and the CLI only parse and print; every rule lives here, so the rules are
the same whether a request comes over the network or from `modelcloak owner ...` on the owner's
machine. Wire formats (HPKE info, usage MAC input) are defined here and documented byte for byte
in docs/OWNER.md.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import queue
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from sqlalchemy import bindparam, delete, func, insert, literal, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from modelcloak.bundle.errors import BundleError
from modelcloak.bundle.serial import serial_entry
from modelcloak.licensing.protocol import (
    FHE_RESULT_REFUSED,
    HPKE_SUITE,
    MAX_BATCH_QUERIES,
    MAX_SEQUENCE,
    MODEL_KEY_SIZE,
    USAGE_KEY_SIZE,
    RequestRefused,
    binding_digest,
    fhe_request_mac,
    release_info,
    usage_mac,
)
from modelcloak.owner.errors import DatabaseUnavailable, OwnerError
from modelcloak.owner.evidence.base import Claims, EvidenceError
from modelcloak.owner.evidence.registry import KNOWN_KINDS, VerifierRegistry
from modelcloak.owner.integrity import RowColumns, check_row, row_tag, seal_row
from modelcloak.owner.nonces import check_nonce, issue_nonce
from modelcloak.owner.refusals import RefusalLog
from modelcloak.owner.store import (
    AuditEntry,
    Device,
    FheSecret,
    Instance,
    Licence,
    MasterKey,
    Model,
    Nonce,
    Store,
    UsageBatch,
    UsageStream,
    now_utc,
)

NONCE_LIFETIME = timedelta(seconds=120)
_LICENCES, _DEVICES, _MODELS = Licence.__table__, Device.__table__, Model.__table__
_NONCES, _INSTANCES = Nonce.__table__, Instance.__table__
_STREAMS, _BATCHES = UsageStream.__table__, UsageBatch.__table__
# The usage writer's statements, built once: building a statement costs more CPU than SQLAlchemy's
# cached compilation of it (and a statement built once also computes its cache key once).
_LID, _RID = bindparam("b_lid"), bindparam("b_rid")
# FOR NO KEY UPDATE (key_share=True on PostgreSQL): excludes every other writer of the licence row, but not
# the KEY SHARE lock that inserting a row referring to it takes (a key release's spent nonce); with FOR
# UPDATE two releases holding KEY SHARE and both taking an instance slot deadlocked.
_LOCK_LICENCE = select(_LICENCES).where(_LICENCES.c.id == _LID).with_for_update(key_share=True)
_READ_STREAM = select(_STREAMS.c.last_sequence, _STREAMS.c.queries).where(
    _STREAMS.c.licence_id == _LID, _STREAMS.c.reporter_id == _RID
)
_READ_BATCH = select(_BATCHES.c.queries, _BATCHES.c.mac).where(
    _BATCHES.c.licence_id == _LID, _BATCHES.c.reporter_id == _RID, _BATCHES.c.sequence == bindparam("b_seq")
)
_COUNT_LICENCE = (
    update(_LICENCES).where(_LICENCES.c.id == _LID).values(queries_used=bindparam("b_used"), row_tag=bindparam("b_tag"))
)
_NEW_STREAM = insert(_STREAMS).values(
    licence_id=_LID, reporter_id=_RID, last_sequence=bindparam("b_last"), queries=bindparam("b_queries")
)
_ADVANCE_STREAM = (
    update(_STREAMS)
    .where(_STREAMS.c.licence_id == _LID, _STREAMS.c.reporter_id == _RID)
    .values(last_sequence=bindparam("b_last"), queries=bindparam("b_queries"))
)
_NEW_BATCH = insert(_BATCHES)
# The key release's statements, built once for the same reason.
_LICENCE_EXISTS = select(literal(1)).where(_LICENCES.c.id == _LID)
_READ_LICENCE = select(_LICENCES).where(_LICENCES.c.id == _LID)
_READ_DEVICE = select(_DEVICES).where(_DEVICES.c.id == bindparam("b_did"))
_SPEND_NONCE = {
    dialect.__name__.rsplit(".", 1)[-1]: dialect.insert(_NONCES)
    .values(value=bindparam("b_value"), licence_id=_LID, expires_at=bindparam("b_expires"), used_at=bindparam("b_now"))
    .on_conflict_do_nothing(index_elements=["value"])
    .returning(_NONCES.c.value)  # rowcount is -1 here under psycopg: a returned row says it was inserted
    for dialect in (postgresql, sqlite)
}
# PostgreSQL: a key release in two statements, each its own transaction (Store.autocommit), instead of
# BEGIN, four statements and COMMIT. The first reads the licence, the device and whether the nonce was
# spent; after every check, the second spends the nonce and writes the audit entry of the grant in one
# statement, so one synced commit covers both and the audit row exists only if the spend happened.
_AUDIT = AuditEntry.__table__
_RELEASE_READ = (
    select(
        *(column.label(f"l_{column.name}") for column in _LICENCES.c),
        *(column.label(f"d_{column.name}") for column in _DEVICES.c),
        select(literal(1)).where(_NONCES.c.value == bindparam("b_value")).exists().label("nonce_spent"),
    )
    .select_from(_LICENCES.outerjoin(_DEVICES, _DEVICES.c.id == bindparam("b_did")))
    .where(_LICENCES.c.id == _LID)
)
_SPENT = _SPEND_NONCE["postgresql"].cte("spent")
_AUDIT_GRANT = (
    insert(_AUDIT)
    .from_select(
        ["at", "event", "subject", "outcome", "detail"],
        select(
            bindparam("a_at", type_=_AUDIT.c.at.type),
            literal("key.release"),
            _LID,
            literal("ok"),
            bindparam("a_detail", type_=_AUDIT.c.detail.type),
        ).select_from(_SPENT),
    )
    .returning(_AUDIT.c.id)
    .cte("granted")
)
_SPEND_AND_AUDIT = select(func.count()).select_from(_SPENT).add_cte(_AUDIT_GRANT)


# Stale nonces are swept at most this often per process, up to NONCE_SWEEP_ROWS at a time: enough for
# 10,000 nonces/s per worker.
NONCE_SWEEP_SECONDS = 0.5
NONCE_SWEEP_ROWS = 5000
_log = logging.getLogger("modelcloak.owner")

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_HEX = re.compile(r"^[0-9a-f]{2,256}$")


def check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not _ID.match(value):
        raise RequestRefused(f"{what} {value!r} must be 1-128 characters of letters, digits, '_', '.', ':' or '-'", 400)
    return value


def check_measurements(measurements: dict[str, str]) -> dict[str, str]:
    cleaned = {}
    for name, value in measurements.items():
        check_id(name, "measurement name")
        value = value.strip().lower()
        if not _HEX.match(value) or len(value) % 2:
            raise RequestRefused(f"measurement {name} must be an even number of hex digits, got {value!r}", 400)
        cleaned[name] = value
    return cleaned


@dataclass(frozen=True)
class Release:
    """What a granted key release returns to the runtime."""

    licence_id: str
    wrapped_key: bytes  # HPKE enc (32 bytes) || ciphertext of model key || usage key (64 + 16 bytes)
    expires_at: datetime
    revalidate_at: datetime
    offline_until: datetime
    query_quota: int | None
    queries_used: int
    insecure: bool
    min_serial: int | None = None  # the oldest bundle serial the device may run under this licence

    def as_json(self) -> dict[str, Any]:
        import base64

        return {
            "licence_id": self.licence_id,
            "wrapped_key": base64.b64encode(self.wrapped_key).decode(),
            "suite": "X25519/HKDF-SHA256/AES-256-GCM",
            "expires_at": self.expires_at.isoformat(),
            "revalidate_at": self.revalidate_at.isoformat(),
            "offline_until": self.offline_until.isoformat(),
            "query_quota": self.query_quota,
            "queries_used": self.queries_used,
            "insecure_evidence": self.insecure,
            "min_serial": self.min_serial,
        }


@dataclass(frozen=True)
class UsageAck:
    sequence: int
    duplicate: bool
    queries_used: int
    query_quota: int | None

    def as_json(self) -> dict[str, Any]:
        return {
            "acknowledged": self.sequence,
            "duplicate": self.duplicate,
            "queries_used": self.queries_used,
            "query_quota": self.query_quota,
        }


def _check_usage_shape(licence_id: str, reporter_id: str, sequence: int, queries: int) -> None:
    check_id(licence_id, "licence id")
    check_id(reporter_id, "reporter id")
    if not 1 <= sequence <= MAX_SEQUENCE:
        raise RequestRefused(f"sequence must be between 1 and {MAX_SEQUENCE}", 400)
    if not 0 <= queries <= MAX_BATCH_QUERIES:
        raise RequestRefused(f"a batch counts between 0 and {MAX_BATCH_QUERIES} queries", 400)


class _LicenceState:
    """A licence row read under its lock, with the usage the group has added (integrity.row_tag reads
    its attributes like a row's)."""

    def __init__(self, row: Any) -> None:
        self.__dict__.update(row._mapping)
        self.changed = False


class UsageGroup:
    """What one usage group transaction has read and will write, in Core SQL.

    The rows a group touches are read once (the licence under its lock, each stream, a stored batch
    only for a resend) and kept here; the group's writes go out at the end as a few executemany
    statements (licence totals with their new tags, stream rows, batch rows), right before the commit.
    The ORM did the same with an identity map and a flush at several times the CPU."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.licences: dict[str, _LicenceState] = {}
        self.streams: dict[tuple[str, str], list[int]] = {}  # [last sequence, queries]
        self.stored_streams: set[tuple[str, str]] = set()  # streams that already have a row
        self.new_batches: dict[tuple[str, str, int], tuple[int, bytes, datetime]] = {}

    def licence(self, licence_id: str) -> _LicenceState:
        state = self.licences.get(licence_id)
        if state is None:
            row = self.connection.execute(_LOCK_LICENCE, {"b_lid": licence_id}).one_or_none()
            if row is None:
                raise RequestRefused(f"unknown licence {licence_id}", 404)
            state = self.licences[licence_id] = _LicenceState(row)
        return state

    def stream(self, licence_id: str, reporter_id: str) -> list[int]:
        key = (licence_id, reporter_id)
        stream = self.streams.get(key)
        if stream is None:
            row = self.connection.execute(_READ_STREAM, {"b_lid": licence_id, "b_rid": reporter_id}).one_or_none()
            if row is not None:
                self.stored_streams.add(key)
            stream = self.streams[key] = [row.last_sequence, row.queries] if row is not None else [0, 0]
        return stream

    def stored_batch(self, licence_id: str, reporter_id: str, sequence: int) -> tuple[int, bytes] | None:
        new = self.new_batches.get((licence_id, reporter_id, sequence))
        if new is not None:
            return new[0], new[1]
        row = self.connection.execute(
            _READ_BATCH, {"b_lid": licence_id, "b_rid": reporter_id, "b_seq": sequence}
        ).one_or_none()
        return (row.queries, row.mac) if row is not None else None

    def write(self) -> None:
        """Send the group's writes (before the caller commits)."""
        if not self.new_batches:
            return
        connection = self.connection
        changed = [state for state in self.licences.values() if state.changed]
        connection.execute(
            _COUNT_LICENCE, [{"b_lid": s.id, "b_used": s.queries_used, "b_tag": s.row_tag} for s in changed]
        )
        touched = {(licence, reporter) for licence, reporter, _sequence in self.new_batches}
        rows = [
            {
                "b_lid": lid,
                "b_rid": rid,
                "b_last": self.streams[(lid, rid)][0],
                "b_queries": self.streams[(lid, rid)][1],
            }
            for lid, rid in touched
        ]
        fresh = [row for row in rows if (row["b_lid"], row["b_rid"]) not in self.stored_streams]
        known = [row for row in rows if (row["b_lid"], row["b_rid"]) in self.stored_streams]
        if fresh:
            connection.execute(_NEW_STREAM, fresh)
            self.stored_streams.update((row["b_lid"], row["b_rid"]) for row in fresh)
        if known:
            connection.execute(_ADVANCE_STREAM, known)
        connection.execute(
            _NEW_BATCH,
            [
                {
                    "licence_id": lid,
                    "reporter_id": rid,
                    "sequence": seq,
                    "queries": count,
                    "mac": mac,
                    "received_at": at,
                }
                for (lid, rid, seq), (count, mac, at) in self.new_batches.items()
            ],
        )
        self.new_batches.clear()


class GroupCommit:
    """Usage batches from concurrent requests, applied by one thread, many per transaction.

    Each acknowledged batch must be on disk before its answer (a synced commit), and a synced commit
    costs milliseconds; one commit per request would cap the backend at a few hundred reports per
    second. So requests queue here, one writer thread applies whatever is waiting (up to
    `max_group`) in one transaction, commits once, and only then answers each request. A failed
    commit answers every request of its group with an error, so nothing is acknowledged that is not
    stored. Applying in one thread also means the per-licence checks run strictly in order.
    """

    def __init__(self, store: Store, apply: Callable[..., UsageAck], *, max_group: int = 256) -> None:
        self.store = store
        self.apply = apply
        self.max_group = max_group
        self._queue: queue.SimpleQueue[list[Any]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def _ensure_writer(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._start_lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="usage-group-commit", daemon=True)
                    self._thread.start()

    def submit(self, args: tuple[Any, ...]) -> UsageAck:
        """Apply one batch; returns once its group is committed (blocking)."""
        done = threading.Event()
        slot: list[Any] = [args, done.set, None, None]  # args, notify, result, error
        self._ensure_writer()
        self._queue.put(slot)
        done.wait()
        if slot[3] is not None:
            raise slot[3]
        return slot[2]

    async def submit_async(self, args: tuple[Any, ...]) -> UsageAck:
        """The same from an event loop, without tying up a worker thread while the group commits."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def notify() -> None:
            try:
                loop.call_soon_threadsafe(lambda: future.done() or future.set_result(None))
            except RuntimeError:  # the loop closed (server shutting down): nobody is waiting
                pass

        slot: list[Any] = [args, notify, None, None]
        self._ensure_writer()
        self._queue.put(slot)
        await asyncio.shield(future)
        if slot[3] is not None:
            raise slot[3]
        return slot[2]

    def _apply_group(self, group: list[list[Any]]) -> None:
        with self.store.connection() as connection:
            writes = UsageGroup(connection)
            for slot in group:
                slot[2], slot[3] = None, None
                try:
                    slot[2] = self.apply(writes, *slot[0])
                except RequestRefused as exc:
                    slot[3] = exc
            writes.write()

    def _run(self) -> None:
        while True:
            group = [self._queue.get()]
            while len(group) < self.max_group:
                try:
                    group.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            # Licence rows are locked in ascending id order in every worker, so two workers' groups
            # cannot wait on each other in a cycle (the stable sort keeps each reporter's batches in order).
            group.sort(key=lambda slot: slot[0][0])
            try:
                for attempt in range(1, 4):
                    try:
                        self._apply_group(group)
                        break
                    except DatabaseUnavailable as exc:
                        if not exc.retryable or attempt == 3:
                            raise
                        _log.warning("usage group retried after %s", exc)
            except Exception as exc:  # the commit failed: nothing in this group was stored
                _log.error("usage group of %d batches not stored", len(group), exc_info=True)
                failure = exc if isinstance(exc, OwnerError) else DatabaseUnavailable(f"usage not stored: {exc}")
                for slot in group:
                    slot[2], slot[3] = None, slot[3] or failure
            for slot in group:
                slot[1]()


class _ReleaseAsk(NamedTuple):
    """What a device asked for in one key release, in `_grant`'s argument order (both release paths pass it on)."""

    licence_id: str
    device_id: str
    instance_id: str
    nonce: bytes
    ephemeral_public_key: bytes
    evidence_kind: str
    evidence: bytes
    subject: dict[str, str]


class OwnerService:
    """The backend's rules over one store and one master key. `clock` is injectable for expiry tests."""

    def __init__(
        self,
        store: Store,
        master: MasterKey | None,
        *,
        registry: VerifierRegistry | None = None,
        clock: Callable[[], datetime] = now_utc,
    ) -> None:
        self.store = store
        self._master = master
        self.registry = registry or VerifierRegistry()
        self.clock = clock
        self._usage_keys: dict[str, bytes] = {}
        self._model_keys: dict[str, bytes] = {}
        self._sweep_lock = threading.Lock()
        self._known_licences: set[str] = set()
        self._spend_statement = _SPEND_NONCE[store.dialect]
        self._last_sweep = -NONCE_SWEEP_SECONDS
        self._fhe_decryptors: dict[str, Any] = {}  # model id -> OwnerDecryptor (parsing a secret is slow)
        self._fhe_lock = threading.Lock()  # SEAL's decryptor is not documented as thread-safe
        self._usage_committer = GroupCommit(store, self._apply_usage)
        self.refusals = RefusalLog(store)

    @property
    def master(self) -> MasterKey:
        if self._master is None:
            raise OwnerError("this needs the master key: give --master-key-file or --master-key-env")
        return self._master

    # --- owner administration ---------------------------------------------------------------------

    def register_model(self, model_id: str, key: bytes, description: str = "") -> None:
        check_id(model_id, "model id")
        if len(key) != MODEL_KEY_SIZE:
            raise RequestRefused(f"a model key is {MODEL_KEY_SIZE} bytes, got {len(key)}", 400)
        with self.store.transaction() as session:
            if session.get(Model, model_id) is not None:
                raise RequestRefused(f"model {model_id} is already registered", 409)
            session.add(
                Model(
                    id=model_id,
                    description=description,
                    sealed_key=self.master.seal(bytes(key), f"model:{model_id}"),
                    created_at=self.clock(),
                )
            )
            self.store.audit(session, "model.register", model_id, "ok")

    def enroll_device(
        self,
        device_id: str,
        verifier_kind: str,
        measurements: dict[str, str],
        identity: str | None = None,
        *,
        customer: str | None = None,
    ) -> None:
        """Enrol a device; `customer` is the tenant whose instance licences it may use (none: device licences only)."""
        check_id(device_id, "device id")
        if customer is not None:
            check_id(customer, "customer")
        if verifier_kind not in KNOWN_KINDS:
            raise RequestRefused(f"unknown evidence kind {verifier_kind!r}; known: {', '.join(KNOWN_KINDS)}", 400)
        expected = check_measurements(measurements)
        if not expected:
            raise RequestRefused("a device needs at least one expected measurement (name=hex)", 400)
        if identity is None and verifier_kind in ("sim", "tpm"):
            # Without a pinned key, anyone could make sim/tpm evidence for these measurements.
            raise RequestRefused(f"{verifier_kind} devices need their attestation identity (key fingerprint)", 400)
        device = Device(
            id=device_id,
            verifier_kind=verifier_kind,
            identity=identity.lower() if identity else None,
            expected_measurements=json.dumps(expected, sort_keys=True),
            customer=customer,
            created_at=self.clock(),
        )
        seal_row(self.master.row_tag_key, device)
        with self.store.transaction() as session:
            if session.get(Device, device_id) is not None:
                raise RequestRefused(f"device {device_id} is already enrolled", 409)
            session.add(device)
            self.store.audit(
                session, "device.enroll", device_id, "ok", kind=verifier_kind, identity=identity, customer=customer
            )

    def issue_licence(
        self,
        model_id: str,
        *,
        device_id: str | None = None,
        max_instances: int | None = None,
        customer: str | None = None,
        valid_for: timedelta = timedelta(days=365),
        query_quota: int | None = None,
        revalidate_seconds: int = 3600,
        offline_grace_seconds: int = 86400,
        allow_sim: bool = False,
        allow_debug: bool = False,
        measurements: dict[str, str] | None = None,
        min_serial: int | None = None,
    ) -> str:
        """A new licence; `min_serial` pins the oldest bundle serial its devices may run (None: no pin)."""
        if min_serial is not None:
            _check_min_serial(min_serial)
        if (device_id is None) == (max_instances is None):
            raise RequestRefused("a licence is bound to exactly one of a device or an instance count", 400)
        if max_instances is not None and max_instances < 1:
            raise RequestRefused("the instance count must be at least 1", 400)
        if customer is not None:
            check_id(customer, "customer")
        elif max_instances is not None:
            # Without a customer an instance licence would admit every enrolled device of every tenant.
            raise RequestRefused("an instance licence needs the customer whose devices may use it (--customer)", 400)
        if query_quota is not None and query_quota < 0:
            raise RequestRefused("the query quota cannot be negative", 400)
        if valid_for <= timedelta(0):
            raise RequestRefused("a licence must be valid for a positive time", 400)
        if revalidate_seconds < 1 or offline_grace_seconds < 0:
            raise RequestRefused("revalidation period must be >= 1 s and offline grace >= 0 s", 400)
        expected = check_measurements(measurements) if measurements else None
        licence_id = "lic_" + secrets.token_hex(12)
        now = self.clock()
        with self.store.transaction() as session:
            if session.get(Model, model_id) is None:
                raise RequestRefused(f"model {model_id} is not registered", 404)
            if device_id is not None:
                bound = session.get(Device, device_id)
                if bound is None:
                    raise RequestRefused(f"device {device_id} is not enrolled", 404)
                if customer is not None and bound.customer != customer:
                    refusal = f"device {device_id} belongs to customer {bound.customer}, not {customer}"
                    raise RequestRefused(refusal, 400)
                customer = bound.customer
            licence = Licence(
                id=licence_id,
                model_id=model_id,
                device_id=device_id,
                customer=customer,
                max_instances=max_instances,
                expires_at=now + valid_for,
                query_quota=query_quota,
                queries_used=0,
                revalidate_seconds=revalidate_seconds,
                offline_grace_seconds=offline_grace_seconds,
                allow_sim=allow_sim,
                allow_debug=allow_debug,
                expected_measurements=json.dumps(expected, sort_keys=True) if expected else None,
                sealed_usage_key=self.master.seal(secrets.token_bytes(USAGE_KEY_SIZE), f"usage:{licence_id}"),
                created_at=now,
                min_serial=min_serial,
            )
            seal_row(self.master.row_tag_key, licence)
            session.add(licence)
            self.store.audit(
                session,
                "licence.issue",
                licence_id,
                "ok",
                model=model_id,
                device=device_id,
                customer=customer,
                max_instances=max_instances,
                quota=query_quota,
                allow_sim=allow_sim,
                allow_debug=allow_debug,
                min_serial=min_serial,
            )
        return licence_id

    def pin_serial(self, licence_id: str, min_serial: int | None) -> None:
        """Set (or with None, clear) the oldest bundle serial a licence's devices may run; audited.

        Raise it when a new release replaces one that must no longer run: devices learn it at their next
        key release (start-up or revalidation) and refuse an older bundle from then on."""
        if min_serial is not None:
            _check_min_serial(min_serial)
        with self.store.transaction() as session:
            licence = self._locked_licence(session, licence_id)
            check_row(self.master.row_tag_key, licence)
            previous, licence.min_serial = licence.min_serial, min_serial
            seal_row(self.master.row_tag_key, licence)
            self.store.audit(session, "licence.pin", licence_id, "ok", min_serial=min_serial, previous=previous)

    def revoke_licence(self, licence_id: str, reason: str = "revoked by the owner") -> None:
        with self.store.transaction() as session:
            licence = self._locked_licence(session, licence_id)
            check_row(self.master.row_tag_key, licence)
            if licence.revoked_at is not None:
                raise RequestRefused(f"licence {licence_id} is already revoked", 409)
            licence.revoked_at = self.clock()
            licence.revocation_reason = reason
            seal_row(self.master.row_tag_key, licence)
            self.store.audit(session, "licence.revoke", licence_id, "ok", reason=reason)

    def free_instance(self, licence_id: str, instance_id: str) -> None:
        """Give an instance licence's slot back (a device retired or reinstalled); audited."""
        with self.store.transaction() as session:
            licence = self._locked_licence(session, licence_id)
            slot = session.get(Instance, (licence.id, instance_id))
            if slot is None:
                raise RequestRefused(f"licence {licence_id} has no instance {instance_id}", 404)
            session.delete(slot)
            self.store.audit(session, "instance.free", licence_id, "ok", instance=instance_id)

    def instances(self, licence_id: str) -> list[dict[str, Any]]:
        with self.store.transaction() as session:
            rows = session.scalars(
                select(Instance).where(Instance.licence_id == licence_id).order_by(Instance.first_seen)
            )
            return [
                {
                    "instance": row.instance_id,
                    "device": row.device_id,
                    "first_seen": row.first_seen.isoformat(),
                    "last_seen": row.last_seen.isoformat(),
                }
                for row in rows
            ]

    def licences(self) -> list[dict[str, Any]]:
        with self.store.transaction() as session:
            rows = session.scalars(select(Licence).order_by(Licence.created_at)).all()
            instances = {
                lid: count
                for lid, count in session.execute(
                    select(Instance.licence_id, func.count()).group_by(Instance.licence_id)
                )
            }
            return [
                {
                    "id": row.id,
                    "model": row.model_id,
                    "device": row.device_id,
                    "customer": row.customer,
                    "max_instances": row.max_instances,
                    "instances": instances.get(row.id, 0),
                    "expires_at": row.expires_at.isoformat(),
                    "query_quota": row.query_quota,
                    "queries_used": row.queries_used,
                    "revoked": row.revoked_at is not None,
                    "allow_sim": row.allow_sim,
                    "allow_debug": row.allow_debug,
                    "min_serial": row.min_serial,
                }
                for row in rows
            ]

    def usage(self, licence_id: str | None = None) -> list[dict[str, Any]]:
        """Per licence and reporter: acknowledged batches (last sequence number) and queries."""
        with self.store.transaction() as session:
            query = select(UsageStream).order_by(UsageStream.licence_id, UsageStream.reporter_id)
            if licence_id is not None:
                query = query.where(UsageStream.licence_id == licence_id)
            return [
                {
                    "licence": s.licence_id,
                    "reporter": s.reporter_id,
                    "last_sequence": s.last_sequence,
                    "queries": s.queries,
                }
                for s in session.scalars(query)
            ]

    def tag_untagged_rows(self) -> int:
        """Give licences and devices made before row tags existed their tag; returns how many were tagged.

        Run once after upgrading to schema revision 0004, by the owner, on a database they trust at
        that moment: it vouches for whatever those rows hold now.
        """
        tagged = 0
        with self.store.transaction() as session:
            for table in (Licence, Device):
                for row in session.scalars(select(table).where(table.row_tag.is_(None))):
                    seal_row(self.master.row_tag_key, row)
                    tagged += 1
            if tagged:
                self.store.audit(session, "rows.tag", "licences+devices", "ok", tagged=tagged)
        return tagged

    def rotate_master_key(self, new: MasterKey) -> dict[str, int]:
        """Re-seal every stored secret and re-tag every grant row under `new`, in one transaction.

        Every row is first checked under the current key: a secret that does not open or a row whose tag
        does not verify stops the rotation with nothing changed, so a rotation never vouches for a row
        someone altered in the database. Run it with every `serve` stopped: a running server still holds
        the old key, and a row it writes after the rotation would carry the old key's tag (refused).
        Returns how many rows of each kind were rewritten.
        """
        counts = {"models": 0, "fhe_secrets": 0, "licences": 0, "devices": 0}
        with self.store.transaction() as session:
            if self.store.dialect == "postgresql":
                # Servers that are still running wait here instead of writing under the old key mid-rotation.
                session.execute(text("LOCK TABLE models, fhe_secrets, licences, devices IN EXCLUSIVE MODE"))
            for model in session.scalars(select(Model)):
                key = self.master.open(model.sealed_key, f"model:{model.id}")
                model.sealed_key = new.seal(key, f"model:{model.id}")
                counts["models"] += 1
            for secret in session.scalars(select(FheSecret)):
                plain = self.master.open(secret.sealed_secret, f"fhe:{secret.model_id}")
                secret.sealed_secret = new.seal(plain, f"fhe:{secret.model_id}")
                counts["fhe_secrets"] += 1
            for device in session.scalars(select(Device)):
                check_row(self.master.row_tag_key, device)
                seal_row(new.row_tag_key, device)
                counts["devices"] += 1
            for licence in session.scalars(select(Licence)):
                check_row(self.master.row_tag_key, licence)
                usage_key = self.master.open(licence.sealed_usage_key, f"usage:{licence.id}")
                licence.sealed_usage_key = new.seal(usage_key, f"usage:{licence.id}")
                seal_row(new.row_tag_key, licence)
                counts["licences"] += 1
            self.store.audit(session, "master.rotate", "master key", "ok", **counts)
        self._master = new
        self._usage_keys.clear()
        self._model_keys.clear()
        self._fhe_decryptors.clear()
        return counts

    def licence_usage(self) -> list[tuple[str, int, int | None]]:
        """(licence id, queries used, quota) of every licence, for the metrics endpoint."""
        with self.store.connection() as connection:
            rows = connection.execute(
                select(_LICENCES.c.id, _LICENCES.c.queries_used, _LICENCES.c.query_quota).order_by(_LICENCES.c.id)
            )
            return [(row.id, row.queries_used, row.query_quota) for row in rows]

    def queries_used(self, licence_id: str) -> int:
        with self.store.transaction() as session:
            return self._locked_licence(session, licence_id).queries_used

    # --- key release --------------------------------------------------------------------------------

    def new_nonce(self, licence_id: str) -> tuple[bytes, datetime]:
        """A fresh single-use nonce for `licence_id`, valid for NONCE_LIFETIME (owner/nonces.py: nothing is
        stored; the database is asked only whether the licence exists, once per licence and process)."""
        check_id(licence_id, "licence id")
        if not self.knows_licence(licence_id):
            with self.store.connection() as connection:
                if connection.execute(_LICENCE_EXISTS, {"b_lid": licence_id}).first() is None:
                    raise RequestRefused(f"unknown licence {licence_id}", 404)
            if len(self._known_licences) >= 100_000:  # bounded: forgetting only costs a lookup
                self._known_licences.clear()
            self._known_licences.add(licence_id)
        expires_at = self.clock() + NONCE_LIFETIME
        return issue_nonce(self.master.nonce_key, licence_id, expires_at), expires_at

    def knows_licence(self, licence_id: str) -> bool:
        """True when `licence_id` is known to exist, so `new_nonce` needs no database (licences are never deleted)."""
        return licence_id in self._known_licences

    def _sweep_due(self) -> bool:
        """True at most once per NONCE_SWEEP_SECONDS per process: a sweep per nonce was a second
        statement on every request, while stale nonces only accumulate at the rate nonces are issued."""
        moment = time.monotonic()
        with self._sweep_lock:
            if moment - self._last_sweep < NONCE_SWEEP_SECONDS:
                return False
            self._last_sweep = moment
            return True

    def release_key(
        self,
        *,
        licence_id: str,
        device_id: str,
        instance_id: str,
        nonce: bytes,
        ephemeral_public_key: bytes,
        evidence_kind: str,
        evidence: bytes,
    ) -> Release:
        """Check nonce, evidence and licence; return the model key and usage key wrapped to the ephemeral key."""
        check_id(licence_id, "licence id")
        check_id(device_id, "device id")
        check_id(instance_id, "instance id")
        subject = {"licence": licence_id, "device": device_id, "instance": instance_id, "kind": evidence_kind}
        ask = _ReleaseAsk(
            licence_id, device_id, instance_id, nonce, ephemeral_public_key, evidence_kind, evidence, subject
        )
        try:
            now = self.clock()
            # Unknown, forged, foreign and expired nonces are refused by the nonce itself: no database.
            expires_at = check_nonce(self.master.nonce_key, licence_id, nonce, now)
            if self.store.dialect == "postgresql":
                granted = self._release_in_two_statements(ask, expires_at, now)
                if granted is not None:
                    return granted
            refusal: RequestRefused | None = None
            # One transaction, one synced commit per grant: the nonce is spent first (a replay is refused
            # before any evidence work), then everything is checked, and the grant and its audit entry
            # commit with the spend.
            with self.store.connection() as connection:
                if not self._spend_nonce(connection, licence_id, nonce, expires_at, now):
                    refusal = RequestRefused("nonce already used: replayed request")
                else:
                    try:
                        release, detail = self._grant(connection, *ask)
                        self.store.audit_row(connection, "key.release", licence_id, "ok", **detail)
                    except RequestRefused as exc:
                        # Committed anyway, so a refused attempt cannot be retried with the same nonce. Nothing
                        # else was written (every check comes before the only other writes: the instance slot
                        # and the audit entry). Not synced: a spend lost in a crash dies with its nonce.
                        refusal = exc
                        if self.store.dialect == "postgresql":
                            connection.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
                if self._sweep_due():
                    self._sweep_nonces(connection, now)
            if refusal is not None:
                raise refusal
            return release
        except RequestRefused as exc:
            # Queued, not committed here: anyone can cause refusals, so they must not each cost a synced write.
            self.refusals.record("key.release", licence_id, reason=str(exc), **subject)
            exc.audited = True
            raise

    def _release_in_two_statements(self, ask: _ReleaseAsk, expires_at: datetime, now: datetime) -> Release | None:
        """The key release on PostgreSQL without an explicit transaction: read (licence, device, nonce
        already spent?), check everything, then spend and audit in one statement that commits once (synced).
        Of two concurrent spends of one nonce, the second inserts nothing and so writes no audit row and
        grants nothing. None when the licence counts instance slots: taking a slot needs the licence row
        locked in the transaction that grants, so those releases take the transactional path."""
        licence_id, nonce = ask.licence_id, ask.nonce
        with self.store.autocommit() as connection:
            row = connection.execute(
                _RELEASE_READ, {"b_lid": licence_id, "b_did": ask.device_id, "b_value": nonce.hex()}
            ).one_or_none()
            if row is not None and row.nonce_spent:
                raise RequestRefused("nonce already used: replayed request")
            if row is not None and row.l_max_instances is not None:
                return None
            try:
                if row is None:
                    raise RequestRefused(f"unknown licence {licence_id}", 404)
                device = RowColumns(row, "d_", _DEVICES) if row.d_id is not None else None
                release, detail = self._grant(connection, *ask, rows=(RowColumns(row, "l_", _LICENCES), device))
            except RequestRefused as exc:
                refusal: RequestRefused | None = exc
            else:
                refusal = None
                spent = connection.execute(
                    _SPEND_AND_AUDIT,
                    {
                        "b_value": nonce.hex(),
                        "b_lid": licence_id,
                        "b_expires": expires_at,
                        "b_now": now,
                        "a_at": now_utc(),
                        "a_detail": json.dumps(detail, default=str),
                    },
                ).scalar_one()
                if not spent:  # another request spent it between the read and now
                    raise RequestRefused("nonce already used: replayed request")
        if refusal is not None:
            # As on the transactional path: a refused attempt spends its nonce, not synced. On another
            # connection, after this one went back to the pool: a thread never holds two of them.
            self._spend_refused(licence_id, nonce, expires_at, now)
            raise refusal
        if self._sweep_due():
            with self.store.connection() as connection:
                self._sweep_nonces(connection, now)
        return release

    def _spend_refused(self, licence_id: str, nonce: bytes, expires_at: datetime, now: datetime) -> None:
        with self.store.connection() as connection:
            connection.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
            self._spend_nonce(connection, licence_id, nonce, expires_at, now)

    def _grant(
        self,
        connection: Connection,
        licence_id: str,
        device_id: str,
        instance_id: str,
        nonce: bytes,
        ephemeral_public_key: bytes,
        evidence_kind: str,
        evidence: bytes,
        subject: dict[str, str],
        rows: tuple[Any, Any] | None = None,
    ) -> tuple[Release, dict[str, Any]]:
        """Every check after the nonce's spend, then the wrapped keys; returns the release and the detail of
        its audit entry, which the caller writes in the same transaction. `rows`: the licence (not None) and
        device (None: unknown) when the caller has read them already."""
        public_key = _ephemeral_key(ephemeral_public_key)
        try:
            claims = self.registry.get(evidence_kind).verify(evidence, now=self.clock())
        except EvidenceError as exc:
            raise RequestRefused(f"evidence refused: {exc}") from None
        except Exception as exc:  # noqa: BLE001  a parser's surprise on hostile bytes is still the sender's fault
            _log.warning("evidence verifier for %r raised on malformed input", evidence_kind, exc_info=True)
            raise RequestRefused(
                f"evidence refused: malformed {evidence_kind} evidence ({type(exc).__name__})", 400
            ) from None
        if claims.kind != evidence_kind:
            raise RequestRefused(f"evidence claims kind {claims.kind!r}, sent as {evidence_kind!r}")
        expected_binding = binding_digest(nonce, ephemeral_public_key)
        if not hmac.compare_digest(claims.report_data[: len(expected_binding)], expected_binding):
            raise RequestRefused(
                "evidence is not bound to this nonce and key (report data differs): replayed or relayed evidence"
            )
        # Core SQL, not the ORM: this is the hot path, and it keeps none of the rows it reads. No row lock
        # on the licence: a release only reads it, and many devices of one licence release at once. Taking
        # an instance slot locks it (_take_instance_slot).
        if rows is not None:
            licence, device = rows
        else:
            licence = connection.execute(_READ_LICENCE, {"b_lid": licence_id}).one_or_none()
            if licence is None:
                raise RequestRefused(f"unknown licence {licence_id}", 404)
            device = connection.execute(_READ_DEVICE, {"b_did": device_id}).one_or_none()
        # Before _check_release, whose instance slot is the only write a refusal could otherwise follow.
        model_key = self._model_key(connection, licence.model_id)
        self._check_release(connection, licence, device, claims, instance_id)
        usage_key = self._usage_key(licence)
        wrapped = HPKE_SUITE.encrypt(model_key + usage_key, public_key, info=release_info(licence_id, nonce))
        now = self.clock()
        revalidate_at = min(licence.expires_at, now + timedelta(seconds=licence.revalidate_seconds))
        release = Release(
            licence_id=licence.id,
            wrapped_key=wrapped,
            expires_at=licence.expires_at,
            revalidate_at=revalidate_at,
            offline_until=min(licence.expires_at, revalidate_at + timedelta(seconds=licence.offline_grace_seconds)),
            query_quota=licence.query_quota,
            queries_used=licence.queries_used,
            insecure=claims.insecure,
            min_serial=licence.min_serial,
        )
        return release, {**subject, "insecure": claims.insecure, "debug": claims.debug, "identity": claims.identity}

    def _spend_nonce(
        self, connection: Connection, licence_id: str, nonce: bytes, expires_at: datetime, now: datetime
    ) -> bool:
        """Record the nonce as spent; False when it already was (a replay).

        One INSERT on the nonce's primary key: of two concurrent spends, the second waits on the first's
        uncommitted row and then inserts nothing, so exactly one release gets the nonce."""
        spent = connection.execute(
            self._spend_statement,
            {"b_value": nonce.hex(), "b_lid": licence_id, "b_expires": expires_at, "b_now": now},
        )
        return spent.first() is not None

    def _sweep_nonces(self, connection: Connection, now: datetime) -> None:
        """Keep the table of spent nonces small: a row is needed only while its nonce could still be
        accepted (the extra NONCE_LIFETIME allows for clocks that differ between workers). SKIP LOCKED:
        workers cleaning up at the same time each take rows nobody else holds, instead of locking
        overlapping sets in different orders (a deadlock between two workers)."""
        stale = (
            select(_NONCES.c.value)
            .where(_NONCES.c.expires_at < now - NONCE_LIFETIME)
            .limit(NONCE_SWEEP_ROWS)
            .with_for_update(skip_locked=True)
        )
        connection.execute(delete(_NONCES).where(_NONCES.c.value.in_(stale)))

    def _model_key(self, connection: Connection, model_id: str) -> bytes:
        """A model's key, opened once per process: models are never changed or deleted once registered."""
        key = self._model_keys.get(model_id)
        if key is None:
            sealed = connection.execute(select(_MODELS.c.sealed_key).where(_MODELS.c.id == model_id)).scalar()
            if sealed is None:
                raise RequestRefused(f"model {model_id} is not registered", 404)
            key = self._model_keys[model_id] = self.master.open(sealed, f"model:{model_id}")
        return key

    def _check_release(
        self, connection: Connection, licence: Any, device: Any | None, claims: Claims, instance_id: str
    ) -> None:
        """Every rule a release must pass; `licence` and `device` are Core rows of their tables."""
        now = self.clock()
        check_row(self.master.row_tag_key, licence)  # before any of its columns is believed
        if licence.revoked_at is not None:
            raise RequestRefused(f"licence {licence.id} was revoked: {licence.revocation_reason}")
        if licence.expires_at <= now:
            raise RequestRefused(f"licence {licence.id} expired at {licence.expires_at.isoformat()}")
        if device is None:
            raise RequestRefused("unknown device: enrol it with `modelcloak owner device enroll`")
        check_row(self.master.row_tag_key, device)
        if licence.device_id is not None and licence.device_id != device.id:
            raise RequestRefused(f"licence {licence.id} is bound to another device")
        if licence.device_id is None and (licence.customer is None or device.customer != licence.customer):
            # An instance licence admits only its own customer's devices; one without a customer (issued
            # before customers existed) admits nobody until it is reissued.
            raise RequestRefused(f"device {device.id} is not a device of licence {licence.id}'s customer")
        if claims.kind != device.verifier_kind:
            raise RequestRefused(
                f"device {device.id} is enrolled for {device.verifier_kind!r} evidence, not {claims.kind!r}"
            )
        if claims.insecure and not licence.allow_sim:
            raise RequestRefused("insecure sim evidence is refused: this licence does not allow development devices")
        if claims.debug and not licence.allow_debug:
            raise RequestRefused("debug enclave/VM refused: its memory is readable by the host")
        if device.identity is not None and (claims.identity or "").lower() != device.identity:
            raise RequestRefused(f"evidence was signed by {claims.identity}, not device {device.id}'s enrolled key")
        expected = json.loads(licence.expected_measurements or device.expected_measurements)
        for name, value in sorted(expected.items()):
            got = claims.measurements.get(name)
            if got is None or not hmac.compare_digest(got.lower(), value):
                raise RequestRefused(f"measurement {name} is {got or 'missing'}, expected {value}")
        if licence.query_quota is not None and licence.queries_used >= licence.query_quota:
            raise RequestRefused(f"query quota exhausted ({licence.queries_used} of {licence.query_quota})")
        if licence.max_instances is not None:
            self._take_instance_slot(connection, licence, device.id, instance_id, now)

    def _take_instance_slot(
        self, connection: Connection, licence: Any, device_id: str, instance_id: str, now: datetime
    ) -> None:
        """Count `instance_id` against the licence's instances: a known one is seen again, a new one
        takes a free slot or is refused."""
        known = _INSTANCES.c.licence_id == licence.id, _INSTANCES.c.instance_id == instance_id
        if connection.execute(update(_INSTANCES).where(*known).values(last_seen=now)).rowcount == 1:
            return
        # Counting and taking a slot must not interleave with another worker's: lock the licence, then
        # look again (the slot may have been taken while we waited; each statement sees what committed).
        connection.execute(select(_LICENCES.c.id).where(_LICENCES.c.id == licence.id).with_for_update(key_share=True))
        if connection.execute(update(_INSTANCES).where(*known).values(last_seen=now)).rowcount == 1:
            return
        count = connection.execute(
            select(func.count()).select_from(_INSTANCES).where(_INSTANCES.c.licence_id == licence.id)
        ).scalar_one()
        if count >= licence.max_instances:
            raise RequestRefused(f"licence {licence.id} already runs on {count} of {licence.max_instances} instances")
        connection.execute(
            insert(_INSTANCES).values(
                licence_id=licence.id, instance_id=instance_id, device_id=device_id, first_seen=now, last_seen=now
            )
        )

    def _locked_licence(self, session: Session, licence_id: str) -> Licence:
        licence = session.scalars(select(Licence).where(Licence.id == licence_id).with_for_update()).one_or_none()
        if licence is None:
            raise RequestRefused(f"unknown licence {licence_id}", 404)
        return licence

    # --- usage --------------------------------------------------------------------------------------

    def report_usage(self, licence_id: str, reporter_id: str, sequence: int, queries: int, mac: bytes) -> UsageAck:
        """Count one signed batch exactly once. Sequence numbers start at 1 and have no gaps per reporter."""
        _check_usage_shape(licence_id, reporter_id, sequence, queries)
        return self._usage_committer.submit((licence_id, reporter_id, sequence, queries, mac))

    async def report_usage_async(
        self, licence_id: str, reporter_id: str, sequence: int, queries: int, mac: bytes
    ) -> UsageAck:
        """report_usage for an event loop (the HTTP API)."""
        _check_usage_shape(licence_id, reporter_id, sequence, queries)
        return await self._usage_committer.submit_async((licence_id, reporter_id, sequence, queries, mac))

    def _apply_usage(
        self,
        group: UsageGroup,
        licence_id: str,
        reporter_id: str,
        sequence: int,
        queries: int,
        mac: bytes,
        result: bytes | None = None,
    ) -> UsageAck:
        # Every refusal below is raised before anything is written (the group writes at its end), so a
        # refused batch leaves the shared group transaction untouched.
        # The licence row lock (FOR UPDATE on PostgreSQL, BEGIN IMMEDIATE on SQLite) serialises
        # every batch of this licence: the quota check and the count commit as one.
        first_read = licence_id not in group.licences
        licence = group.licence(licence_id)
        if first_read:
            check_row(self.master.row_tag_key, licence)
        if result is None:
            expected_mac = usage_mac(self._usage_key(licence), licence_id, reporter_id, sequence, queries)
        else:
            expected_mac = fhe_request_mac(self._usage_key(licence), licence_id, reporter_id, sequence, queries, result)
        if not hmac.compare_digest(expected_mac, mac):
            raise RequestRefused("usage batch signature does not verify", 401)
        stream = group.stream(licence_id, reporter_id)
        last = stream[0]
        if sequence <= last:
            previous = group.stored_batch(licence_id, reporter_id, sequence)
            # FHE requests with the same count can differ in their result: the MAC tells them apart.
            if previous is None or previous[0] != queries or not hmac.compare_digest(previous[1], mac):
                raise RequestRefused(f"batch {sequence} was already acknowledged with different content", 409)
            # Acknowledged again even after revocation: it was counted before, and the device may drop it.
            return UsageAck(sequence, True, licence.queries_used, licence.query_quota)
        # A new batch is new use: a revoked or expired licence has none, from the moment it is revoked.
        if licence.revoked_at is not None:
            raise RequestRefused(f"licence {licence.id} was revoked: {licence.revocation_reason}")
        if licence.expires_at <= self.clock():
            raise RequestRefused(f"licence {licence.id} expired at {licence.expires_at.isoformat()}")
        if sequence != last + 1:
            raise RequestRefused(f"batch {sequence} arrives after {last}: batches {last + 1}.. are missing", 409)
        if licence.query_quota is not None and licence.queries_used + queries > licence.query_quota:
            raise RequestRefused(
                f"query quota exhausted: {licence.queries_used} of {licence.query_quota} used, batch asks for {queries}"
            )
        stream[0] = sequence
        stream[1] += queries
        licence.queries_used += queries
        licence.row_tag = row_tag(self.master.row_tag_key, licence)
        licence.changed = True
        group.new_batches[(licence_id, reporter_id, sequence)] = (queries, mac, self.clock())
        return UsageAck(sequence, False, licence.queries_used, licence.query_quota)

    # --- FHE decryption (the fhe scheme's owner side) -------------------------------------------------

    def register_fhe_secret(self, model_id: str, owner_secret: bytes) -> str:
        """Store the CKKS secret `protect --scheme fhe` wrote for `model_id`; returns its FHE model id."""
        decryptor = _fhe_decryptor(owner_secret)
        with self.store.transaction() as session:
            if session.get(Model, model_id) is None:
                raise RequestRefused(f"model {model_id} is not registered; register it first", 404)
            if session.get(FheSecret, model_id) is not None:
                raise RequestRefused(f"model {model_id} already has an FHE secret", 409)
            session.add(
                FheSecret(
                    model_id=model_id,
                    fhe_model_id=decryptor.model_id,
                    sealed_secret=self.master.seal(bytes(owner_secret), f"fhe:{model_id}"),
                    created_at=self.clock(),
                )
            )
            self.store.audit(session, "fhe.register", model_id, "ok", fhe_model_id=decryptor.model_id)
        return decryptor.model_id

    def fhe_labels(
        self, licence_id: str, reporter_id: str, sequence: int, queries: int, mac: bytes, result: bytes, top_k: int = 1
    ) -> tuple[list[Any], UsageAck]:
        """Decrypt an encrypted result for a licensed device and return only its labels, metered.

        The request is a usage batch of `queries` samples whose MAC also covers the result. Order:
        check the MAC and the licence (no write), decrypt and check the result, then count the batch
        exactly once like any usage report, whether the result was accepted or not. Every refusal
        of the result itself (another model, malformed, wrong level or scale, a modified or forged
        ciphertext, a wrong sample count) is the same `FHE_RESULT_REFUSED` 422, counted: distinct
        answers, or free ones, would let a device probe the checks (docs/FHE.md). The cause goes to
        the owner's audit log only. A resend of an acknowledged batch is answered again (labels or
        refusal) without being counted twice, and must be byte-identical (its MAC is compared).
        Raw decryptions never leave this method: CKKS decryptions in an evaluator's hands allow key
        recovery (Li and Micciancio 2021).
        """
        _check_usage_shape(licence_id, reporter_id, sequence, queries)
        with self.store.transaction() as session:
            licence = session.get(Licence, licence_id)
            if licence is None:
                raise RequestRefused(f"unknown licence {licence_id}", 404)
            check_row(self.master.row_tag_key, licence)
            expected = fhe_request_mac(self._usage_key(licence), licence_id, reporter_id, sequence, queries, result)
            if not hmac.compare_digest(expected, mac):
                raise RequestRefused("decryption request signature does not verify", 401)
            if licence.revoked_at is not None:  # labels are the model's use: a dead licence gets none
                raise RequestRefused(f"licence {licence.id} was revoked: {licence.revocation_reason}")
            if licence.expires_at <= self.clock():
                raise RequestRefused(f"licence {licence.id} expired at {licence.expires_at.isoformat()}")
            stored_batch = session.get(UsageBatch, (licence_id, reporter_id, sequence))
            if stored_batch is not None and not hmac.compare_digest(stored_batch.mac, mac):
                # Checked before decrypting: another result under an acknowledged sequence is not a resend.
                raise RequestRefused(f"batch {sequence} was already acknowledged with different content", 409)
            decryptor = self._fhe_decryptors.get(licence.model_id)
            if decryptor is None:
                stored = session.get(FheSecret, licence.model_id)
                if stored is None:
                    raise RequestRefused(f"model {licence.model_id} has no FHE secret registered", 404)
                secret = self.master.open(stored.sealed_secret, f"fhe:{licence.model_id}")
                decryptor = self._fhe_decryptors[licence.model_id] = _fhe_decryptor(secret)
        from modelcloak.fhe import FheError

        cause = None
        labels: Any = None
        try:
            with self._fhe_lock:
                labels = decryptor.labels(result, top_k=top_k)
            if len(labels) != queries:
                cause = f"the result holds {len(labels)} samples, the request counts {queries}"
        except FheError as exc:
            cause = str(exc)
        except (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError, MemoryError) as exc:
            # A licensed device's malformed envelope (infinite counts, absurd nesting): refused like any other.
            _log.warning("FHE envelope for licence %s raised while parsing", licence_id, exc_info=True)
            cause = f"malformed envelope ({type(exc).__name__})"
        ack = self._usage_committer.submit((licence_id, reporter_id, sequence, queries, mac, result))
        if cause is not None:
            if not ack.duplicate:
                with self.store.transaction() as session:
                    self.store.audit(session, "fhe.refused", licence_id, "refused", sequence=sequence, cause=cause)
            raise RequestRefused(FHE_RESULT_REFUSED, 422)
        return labels.tolist(), ack

    def _usage_key(self, licence: Licence) -> bytes:
        key = self._usage_keys.get(licence.id)
        if key is None:
            key = self.master.open(licence.sealed_usage_key, f"usage:{licence.id}")
            self._usage_keys[licence.id] = key
        return key


def _check_min_serial(value: Any) -> None:
    try:
        serial_entry(value)  # the bundle room's own rule for serials
    except BundleError:
        raise RequestRefused(f"the minimum serial must be an integer from 0 to 2**53, got {value!r}", 400) from None


_LOW_ORDER_PROBE = X25519PrivateKey.generate()


def _ephemeral_key(raw: bytes) -> X25519PublicKey:
    """The device's ephemeral X25519 key; refuses keys whose shared secret would be all zeros.

    RFC 7748 low-order points (the all-zero key among them) make every key agreement come out as
    zeros, which `cryptography` refuses with ValueError deep in HPKE; checked here, up front, with one
    agreement against a probe key, so the request gets a 400 before any licence state is touched. The
    probe key is made once per process: a low-order point gives zeros with every private key, and the
    agreement's result is thrown away (a new key per request was 5% of a release's server CPU).
    """
    try:
        public_key = X25519PublicKey.from_public_bytes(raw)
        _LOW_ORDER_PROBE.exchange(public_key)
    except ValueError:
        raise RequestRefused("the ephemeral public key is not a usable 32-byte X25519 key", 400) from None
    return public_key


def _fhe_decryptor(owner_secret: bytes) -> Any:
    try:
        from modelcloak.fhe import FheError, OwnerDecryptor
    except ImportError:
        raise OwnerError("FHE decryption needs TenSEAL: pip install 'modelcloak[fhe]'") from None
    try:
        return OwnerDecryptor(owner_secret)
    except FheError as exc:
        raise RequestRefused(f"not an FHE owner secret: {exc}", 400) from None
