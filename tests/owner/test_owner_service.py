"""Owner backend rules, in process, against SQLite and a real PostgreSQL: key release policy, licences,
usage idempotency, sealing under the master key and the append-only audit log.

Each refusal test also shows the same request succeeding when only the attacked detail is put
right (the negative control), so a test cannot pass because everything is refused.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from postgres import database_fixture, postgres_cluster_fixture  # noqa: F401  (fixtures "database", "postgres_cluster")
from sqlalchemy import select, text

from modelcloak.licensing.protocol import HPKE_SUITE, RequestRefused, binding_digest, release_info, usage_mac
from modelcloak.owner.errors import OwnerError
from modelcloak.owner.evidence.registry import VerifierRegistry
from modelcloak.owner.evidence.sim import SimDevice, SimVerifier
from modelcloak.owner.service import OwnerService
from modelcloak.owner.store import AuditEntry, MasterKey, Model, Store

MEASUREMENT = {"app": "ab" * 32}


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@dataclass
class World:
    service: OwnerService
    clock: Clock
    device: SimDevice
    model_key: bytes
    licence: str
    tmp: Path
    extra: dict = field(default_factory=dict)

    def release(
        self,
        *,
        licence: str | None = None,
        device_id: str = "dev1",
        instance: str = "i1",
        evidence_of=None,
        measurements: dict[str, str] | None = None,
        debug: bool = False,
        nonce: bytes | None = None,
        kind: str = "sim",
    ) -> bytes:
        licence = licence or self.licence
        nonce = nonce if nonce is not None else self.service.new_nonce(licence)[0]
        ephemeral = X25519PrivateKey.generate()
        public = ephemeral.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        binding = binding_digest(nonce, public)
        if evidence_of is not None:
            evidence = evidence_of(binding)
        else:
            evidence = self.device.evidence(binding, measurements or MEASUREMENT, debug=debug)
        granted = self.service.release_key(
            licence_id=licence,
            device_id=device_id,
            instance_id=instance,
            nonce=nonce,
            ephemeral_public_key=public,
            evidence_kind=kind,
            evidence=evidence,
        )
        plain = HPKE_SUITE.decrypt(granted.wrapped_key, ephemeral, info=release_info(licence, nonce))
        return plain


@pytest.fixture
def world(database: str, tmp_path: Path) -> World:
    clock = Clock()
    store = Store(database)
    service = OwnerService(store, MasterKey(secrets.token_bytes(32)), clock=clock)
    model_key = secrets.token_bytes(32)
    service.register_model("mnist", model_key)
    device = SimDevice.create(tmp_path / "dev1.pem")
    service.enroll_device("dev1", "sim", MEASUREMENT, identity=device.identity, customer="acme")
    licence = service.issue_licence("mnist", device_id="dev1", allow_sim=True, valid_for=timedelta(days=30))
    yield World(service, clock, device, model_key, licence, tmp_path)
    store.close()


def refused(match: str):
    return pytest.raises(RequestRefused, match=match)


def test_release_returns_the_model_key_wrapped_to_the_ephemeral_key(world: World) -> None:
    plain = world.release()
    assert plain[:32] == world.model_key and len(plain) == 64


def test_replayed_nonce_is_refused(world: World) -> None:
    nonce = world.service.new_nonce(world.licence)[0]
    world.release(nonce=nonce)  # first use: granted
    with refused("nonce already used"):
        world.release(nonce=nonce)


# PostgreSQL only: SQLite releases hold the database's write lock from the spend on, so there is no window to race.
@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_a_nonce_spent_while_its_release_is_checked_grants_nothing(world: World, monkeypatch) -> None:
    """PostgreSQL releases read, check, then spend the nonce and write the grant's audit entry in one
    statement (service._SPEND_AND_AUDIT). A concurrent request that spends the nonce in between (here:
    while the evidence is being verified) must leave this release refused with no key and no "ok"
    audit entry. Control: the same release without the interloper is granted and audited once."""
    verifier = world.service.registry.get("sim")
    real_verify = verifier.verify
    nonce = world.service.new_nonce(world.licence)[0]

    def verify_after_an_interloper_spent_the_nonce(evidence: bytes, *, now: datetime):
        with world.service.store.connection() as connection:
            world.service._spend_nonce(connection, world.licence, nonce, now + timedelta(minutes=2), now)
        return real_verify(evidence, now=now)

    def grants() -> int:
        return sum(1 for e in _audit(world) if e.event == "key.release" and e.outcome == "ok")

    monkeypatch.setattr(verifier, "verify", verify_after_an_interloper_spent_the_nonce)
    before = grants()
    with refused("nonce already used"):
        world.release(nonce=nonce)
    assert grants() == before
    monkeypatch.setattr(verifier, "verify", real_verify)
    assert world.release()[:32] == world.model_key
    assert grants() == before + 1


def test_unknown_or_foreign_or_expired_nonce_is_refused(world: World) -> None:
    with refused("unknown nonce"):
        world.release(nonce=secrets.token_bytes(32))
    other = world.service.issue_licence("mnist", device_id="dev1", allow_sim=True)
    with refused("different licence"):
        world.release(nonce=world.service.new_nonce(other)[0])
    forged = bytearray(world.service.new_nonce(world.licence)[0])
    forged[:8] = (2**62).to_bytes(8, "big")  # a later expiry under the same tag: the tag covers it
    with refused("unknown nonce"):
        world.release(nonce=bytes(forged))
    stale = world.service.new_nonce(world.licence)[0]
    world.clock.now += timedelta(minutes=5)
    with refused("nonce expired"):
        world.release(nonce=stale)
    world.release()  # control: a fresh nonce at the new time works


def test_evidence_bound_to_another_nonce_is_refused(world: World) -> None:
    other_binding = binding_digest(secrets.token_bytes(32), secrets.token_bytes(32))
    with refused("not bound to this nonce and key"):
        world.release(evidence_of=lambda _binding: world.device.evidence(other_binding, MEASUREMENT))
    world.release(evidence_of=lambda binding: world.device.evidence(binding, MEASUREMENT))


def test_wrong_measurement_is_refused(world: World) -> None:
    with refused("measurement app is cd"):
        world.release(measurements={"app": "cd" * 32})
    with refused("measurement app is missing"):
        world.release(measurements={"other": "ab" * 32})
    assert world.release(measurements=MEASUREMENT)[:32] == world.model_key


def test_a_refused_attempt_spends_its_nonce(world: World) -> None:
    """A refused release spends its nonce (on PostgreSQL after the checks, on another connection), so the
    same nonce cannot be tried again with other evidence. Control: a fresh nonce is granted."""
    nonce = world.service.new_nonce(world.licence)[0]
    with refused("measurement app is cd"):
        world.release(nonce=nonce, measurements={"app": "cd" * 32})
    with refused("nonce already used"):
        world.release(nonce=nonce)
    assert world.release()[:32] == world.model_key


def test_licence_measurements_override_the_devices(world: World) -> None:
    licence = world.service.issue_licence("mnist", device_id="dev1", allow_sim=True, measurements={"app": "ef" * 32})
    with refused("expected efef"):
        world.release(licence=licence)
    world.release(licence=licence, measurements={"app": "ef" * 32})


def test_debug_evidence_is_refused_unless_the_licence_allows_it(world: World) -> None:
    with refused("debug enclave"):
        world.release(debug=True)
    lenient = world.service.issue_licence("mnist", device_id="dev1", allow_sim=True, allow_debug=True)
    world.release(licence=lenient, debug=True)


def test_sim_evidence_is_refused_unless_the_licence_allows_it(world: World) -> None:
    strict = world.service.issue_licence("mnist", device_id="dev1")
    with refused("insecure sim evidence"):
        world.release(licence=strict)


def test_tampered_sim_evidence_is_refused(world: World) -> None:
    def tampered(binding: bytes) -> bytes:
        outer = cbor2.loads(world.device.evidence(binding, {"app": "cd" * 32}))
        # Claim the enrolled measurement without re-signing.
        outer["statement"] = cbor2.dumps({"report_data": binding, "measurements": MEASUREMENT, "debug": False})
        return cbor2.dumps(outer)

    with refused("signature does not verify"):
        world.release(evidence_of=tampered)

    def flipped(binding: bytes) -> bytes:
        data = bytearray(world.device.evidence(binding, MEASUREMENT))
        data[-5] ^= 1  # inside the signature
        return bytes(data)

    with refused("evidence refused"):
        world.release(evidence_of=flipped)
    with refused("not valid CBOR"):
        world.release(evidence_of=lambda binding: b"\xff\x00garbage")


def test_evidence_from_another_sim_key_is_refused(world: World) -> None:
    impostor = SimDevice.create(world.tmp / "impostor.pem")
    with refused("not device dev1's enrolled key"):
        world.release(evidence_of=lambda binding: impostor.evidence(binding, MEASUREMENT))


def test_unknown_device_and_other_device_are_refused(world: World) -> None:
    with refused("unknown device"):
        world.release(device_id="ghost")
    second = SimDevice.create(world.tmp / "dev2.pem")
    world.service.enroll_device("dev2", "sim", MEASUREMENT, identity=second.identity)
    with refused("bound to another device"):
        world.release(device_id="dev2", evidence_of=lambda b: second.evidence(b, MEASUREMENT))


def test_expired_licence_is_refused(world: World) -> None:
    world.release()
    world.clock.now += timedelta(days=31)
    with refused("expired at"):
        world.release()


def test_revoked_licence_is_refused_with_its_reason(world: World) -> None:
    world.release()
    world.service.revoke_licence(world.licence, "customer stopped paying")
    with refused("revoked: customer stopped paying"):
        world.release()
    entries = _audit(world)
    assert ("licence.revoke", "ok") in [(e.event, e.outcome) for e in entries]
    assert any(e.outcome == "refused" and "customer stopped paying" in e.detail for e in entries)


def test_unknown_evidence_kind_is_refused(world: World) -> None:
    with refused("unknown evidence kind"):
        world.release(kind="magic")


def test_registry_loads_known_kinds_lazily_and_refuses_missing_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    from modelcloak.owner.evidence import registry as registry_module
    from modelcloak.owner.evidence.base import EvidenceError

    monkeypatch.setitem(registry_module.KNOWN_KINDS, "future", ("modelcloak.owner.evidence.not_written_yet", "X"))
    registry = VerifierRegistry()
    with pytest.raises(EvidenceError, match="'future' is not available"):
        registry.get("future")
    with pytest.raises(EvidenceError, match="unknown evidence kind"):
        registry.get("nonsense")
    assert registry.get("sim").kind == "sim"  # control: a present module loads
    injected = SimVerifier()
    assert VerifierRegistry({"sim": injected}).get("sim") is injected


def test_instance_count_limit(world: World) -> None:
    licence = world.service.issue_licence("mnist", max_instances=2, customer="acme", allow_sim=True)
    world.release(licence=licence, instance="a")
    world.release(licence=licence, instance="b")
    world.release(licence=licence, instance="a")  # a known instance comes back: not a new one
    with refused("2 of 2 instances"):
        world.release(licence=licence, instance="c")


def test_instance_licence_of_another_customer_releases_nothing(world: World) -> None:
    """The cross-tenant attack: dev1 (customer acme, licensed for mnist) asks for model m2's key through
    customer globex's instance licence. Control: globex's own device gets it, and so does dev1 through
    an acme instance licence for m2."""
    m2_key = secrets.token_bytes(32)
    world.service.register_model("m2", m2_key)
    globex = world.service.issue_licence("m2", max_instances=5, customer="globex", allow_sim=True)
    with refused("not a device of licence"):
        world.release(licence=globex, device_id="dev1", instance="x")
    other = SimDevice.create(world.tmp / "globex.pem")
    world.service.enroll_device("gx1", "sim", MEASUREMENT, identity=other.identity, customer="globex")
    world.device, mine = other, world.device
    assert world.release(licence=globex, device_id="gx1", instance="g")[:32] == m2_key  # control
    world.device = mine
    acme = world.service.issue_licence("m2", max_instances=5, customer="acme", allow_sim=True)
    assert world.release(licence=acme, device_id="dev1", instance="x")[:32] == m2_key  # control
    assert _refused_slots(world, globex) == 1  # the refused attempt took no slot


def _refused_slots(world: World, licence: str) -> int:
    return next(row["instances"] for row in world.service.licences() if row["id"] == licence)


def test_instance_licences_need_a_customer_and_device_licences_keep_theirs(world: World) -> None:
    with refused("needs the customer"):
        world.service.issue_licence("mnist", max_instances=2, allow_sim=True)
    with refused("belongs to customer acme, not globex"):
        world.service.issue_licence("mnist", device_id="dev1", customer="globex")
    licence = world.service.issue_licence("mnist", device_id="dev1", allow_sim=True)
    assert next(row for row in world.service.licences() if row["id"] == licence)["customer"] == "acme"
    # A device without a customer only ever uses licences bound to it by id.
    loner = SimDevice.create(world.tmp / "loner.pem")
    world.service.enroll_device("loner", "sim", MEASUREMENT, identity=loner.identity)
    pooled = world.service.issue_licence("mnist", max_instances=9, customer="acme", allow_sim=True)
    world.device = loner
    with refused("not a device of licence"):
        world.release(licence=pooled, device_id="loner")
    own = world.service.issue_licence("mnist", device_id="loner", allow_sim=True)
    assert world.release(licence=own, device_id="loner")[:32] == world.model_key


# --- row integrity: database write access alone must not grant anything ------------------------------


def _sql(world: World, statement: str, **params) -> None:
    """A raw write with the database's own driver, as someone holding only database credentials would."""
    with world.service.store.engine.begin() as connection:
        connection.execute(text(statement), params)


def _fresh(world: World) -> str:
    return world.service.issue_licence("mnist", device_id="dev1", allow_sim=True, query_quota=5)


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE licences SET revoked_at = NULL, revocation_reason = NULL WHERE id = :id",
        "UPDATE licences SET expires_at = :far WHERE id = :id",
        "UPDATE licences SET queries_used = 0 WHERE id = :id",
        "UPDATE licences SET query_quota = NULL WHERE id = :id",
        "UPDATE licences SET model_id = 'm2' WHERE id = :id",
    ],
)
def test_licence_rows_changed_by_sql_release_nothing(world: World, statement: str) -> None:
    """Attack: a licence that releases nothing (revoked, expired, quota used up) is 'repaired', or pointed
    at another model, by an SQL UPDATE without the master key. Control: a licence written after it,
    untouched, is released; the audit log names the refusal."""
    world.service.register_model("m2", secrets.token_bytes(32))
    victim = _fresh(world)
    key = _usage_key(world, victim)
    _report(world, key, 1, 5, licence=victim)  # quota used up
    with refused("quota exhausted"):
        world.release(licence=victim)
    world.service.revoke_licence(victim, "contract ended")
    world.clock.now += timedelta(days=400)  # and expired
    far = world.clock.now + timedelta(days=3650)
    _sql(world, statement, id=victim, far=far)
    with refused(f"licence {victim} failed its integrity check"):
        world.release(licence=victim)
    control = world.service.issue_licence("mnist", device_id="dev1", allow_sim=True)
    assert world.release(licence=control)[:32] == world.model_key
    refusals = [e for e in _audit(world) if e.event == "key.release" and e.outcome == "refused"]
    assert "integrity check" in refusals[-1].detail


@pytest.mark.parametrize(
    ("statement", "measurements"),
    [
        ("UPDATE devices SET expected_measurements = :cd WHERE id = 'dev1'", {"app": "cd" * 32}),
        ("UPDATE devices SET identity = :other WHERE id = 'dev1'", MEASUREMENT),
        ("UPDATE devices SET customer = 'globex' WHERE id = 'dev1'", MEASUREMENT),
    ],
)
def test_device_rows_changed_by_sql_release_nothing(world: World, statement: str, measurements: dict) -> None:
    """Attack: the device's expected measurements, pinned key or customer are rewritten to match a
    modified device (or another tenant's licence). Control: before the UPDATE the same release works,
    and a second device's untouched row still releases afterwards."""
    intruder = SimDevice.create(world.tmp / "intruder.pem")
    if "identity" in statement:
        world.device = intruder
        with refused("not device dev1's enrolled key"):  # what the UPDATE is meant to get around
            world.release(licence=world.licence)
    else:
        assert world.release(licence=world.licence)[:32] == world.model_key
    _sql(world, statement, cd=json.dumps({"app": "cd" * 32}), other=intruder.identity)
    with refused("device dev1 failed its integrity check"):
        world.release(licence=world.licence, measurements=measurements)
    second = SimDevice.create(world.tmp / "second.pem")
    world.service.enroll_device("dev2", "sim", MEASUREMENT, identity=second.identity)
    world.device = second
    licence = world.service.issue_licence("mnist", device_id="dev2", allow_sim=True)
    assert world.release(licence=licence, device_id="dev2")[:32] == world.model_key


def test_usage_on_a_tampered_licence_is_refused_and_untouched_rows_count(world: World) -> None:
    victim = _fresh(world)
    key = _usage_key(world, victim)
    _report(world, key, 1, 5, licence=victim)
    _sql(world, "UPDATE licences SET queries_used = 0 WHERE id = :id", id=victim)
    with refused("integrity check"):
        _report(world, key, 2, 5, licence=victim)
    control = _fresh(world)
    control_key = _usage_key(world, control)
    assert _report(world, control_key, 1, 3, licence=control).queries_used == 3
    assert _report(world, control_key, 2, 2, licence=control).queries_used == 5  # the tag follows the count


def test_rows_from_before_tags_are_refused_until_the_owner_tags_them(world: World) -> None:
    _sql(world, "UPDATE licences SET row_tag = NULL WHERE id = :id", id=world.licence)
    with refused("no integrity tag"):
        world.release()
    assert world.service.tag_untagged_rows() == 1
    assert world.release()[:32] == world.model_key
    assert world.service.tag_untagged_rows() == 0


def test_a_row_tag_made_under_another_master_key_does_not_verify(world: World) -> None:
    other = OwnerService(world.service.store, MasterKey(secrets.token_bytes(32)), clock=world.clock)
    with refused("integrity check"):
        other.revoke_licence(world.licence)
    world.service.revoke_licence(world.licence)  # control: the right key revokes


class _Exploding:
    """A verifier whose parser fails the way third-party parsers do on hostile bytes."""

    kind = "sim"

    def verify(self, evidence: bytes, *, now: datetime):
        raise OverflowError("cannot convert float infinity to integer")


def test_a_parser_error_on_hostile_evidence_is_a_4xx_with_an_audit_entry(world: World) -> None:
    world.service.registry = VerifierRegistry({"sim": _Exploding()})
    with refused("malformed sim evidence") as caught:
        world.release()
    assert caught.value.status == 400
    assert "malformed sim evidence" in _audit(world)[-1].detail
    world.service.registry = VerifierRegistry({"sim": SimVerifier()})
    assert world.release()[:32] == world.model_key  # control


@pytest.mark.parametrize("bad_key", [bytes(32), bytes([1]) + bytes(31), bytes(31)])
def test_low_order_and_short_ephemeral_keys_are_400_before_anything_is_spent(world: World, bad_key: bytes) -> None:
    nonce = world.service.new_nonce(world.licence)[0]
    with refused("X25519") as caught:
        world.service.release_key(
            licence_id=world.licence,
            device_id="dev1",
            instance_id="i1",
            nonce=nonce,
            ephemeral_public_key=bad_key,
            evidence_kind="sim",
            evidence=world.device.evidence(binding_digest(nonce, bad_key), MEASUREMENT),
        )
    assert caught.value.status == 400
    assert world.release()[:32] == world.model_key  # control: a real ephemeral key


def test_licence_terms_are_validated(world: World) -> None:
    with refused("exactly one of a device or an instance count"):
        world.service.issue_licence("mnist")
    with refused("not registered"):
        world.service.issue_licence("nope", device_id="dev1")
    with refused("even number of hex digits"):
        world.service.enroll_device("dev9", "sim", {"app": "xyz"}, identity="00")


# --- usage -------------------------------------------------------------------------------------------


def _usage_key(world: World, licence: str | None = None) -> bytes:
    return world.release(licence=licence)[32:]


def _report(world: World, key: bytes, sequence: int, queries: int, *, reporter: str = "r1", licence: str | None = None):
    licence = licence or world.licence
    return world.service.report_usage(
        licence, reporter, sequence, queries, usage_mac(key, licence, reporter, sequence, queries)
    )


def test_usage_batches_count_once_and_resends_are_acknowledged(world: World) -> None:
    key = _usage_key(world)
    assert _report(world, key, 1, 10).duplicate is False
    assert _report(world, key, 2, 5).queries_used == 15
    resent = _report(world, key, 2, 5)
    assert resent.duplicate is True and resent.queries_used == 15
    assert world.service.queries_used(world.licence) == 15
    with refused("different content"):
        _report(world, key, 2, 6)
    with refused("batches 3.. are missing"):
        _report(world, key, 4, 1)
    _report(world, key, 1, 7, reporter="r2")  # another reporter has its own sequence
    assert world.service.queries_used(world.licence) == 22
    assert {(u["reporter"], u["queries"]) for u in world.service.usage(world.licence)} == {("r1", 15), ("r2", 7)}


def test_revocation_and_expiry_stop_usage_reports_at_once(world: World) -> None:
    """Attack: a runtime keeps reporting (and so keeps being allowed to answer) after its licence was
    revoked or expired. Control: the same reporter's batch just before is counted, and a resend of an
    acknowledged batch is still acknowledged (not counted again) so the device can drop it."""
    key = _usage_key(world)
    assert _report(world, key, 1, 3).queries_used == 3  # control
    world.service.revoke_licence(world.licence, "contract ended")
    with refused("was revoked: contract ended"):
        _report(world, key, 2, 1)
    assert _report(world, key, 1, 3).duplicate is True
    assert world.service.queries_used(world.licence) == 3

    expiring = world.service.issue_licence("mnist", device_id="dev1", allow_sim=True, valid_for=timedelta(hours=1))
    other = _usage_key(world, expiring)
    assert _report(world, other, 1, 2, licence=expiring).queries_used == 2  # control, before expiry
    world.clock.now += timedelta(hours=1)
    with refused("expired at"):
        _report(world, other, 2, 1, licence=expiring)
    assert world.service.queries_used(expiring) == 2


def test_usage_with_a_bad_signature_is_refused(world: World) -> None:
    key = _usage_key(world)
    with refused("signature does not verify"):
        world.service.report_usage(
            world.licence, "r1", 1, 10, usage_mac(secrets.token_bytes(32), world.licence, "r1", 1, 10)
        )
    with refused("signature does not verify"):  # a MAC over another count
        world.service.report_usage(world.licence, "r1", 1, 1000, usage_mac(key, world.licence, "r1", 1, 10))
    assert world.service.queries_used(world.licence) == 0
    _report(world, key, 1, 10)
    assert world.service.queries_used(world.licence) == 10


def test_quota_is_enforced_on_usage_and_release(world: World) -> None:
    licence = world.service.issue_licence("mnist", device_id="dev1", allow_sim=True, query_quota=10)
    key = _usage_key(world, licence)
    _report(world, key, 1, 8, licence=licence)
    with refused("quota exhausted"):
        _report(world, key, 2, 3, licence=licence)
    _report(world, key, 2, 2, licence=licence)  # exactly up to the quota
    with refused("quota exhausted"):
        world.release(licence=licence)


# --- store ---------------------------------------------------------------------------------------------


def _audit(world: World) -> list[AuditEntry]:
    world.service.refusals.flush()  # refusal entries are written in batches, off the request path
    with world.service.store.transaction() as session:
        return list(session.scalars(select(AuditEntry).order_by(AuditEntry.id)))


def test_audit_log_is_append_only(world: World) -> None:
    store = world.service.store
    before = len(_audit(world))
    assert before >= 3  # register, enrol, issue
    with pytest.raises(OwnerError, match="append-only"):
        with store.transaction() as session:
            entry = session.scalars(select(AuditEntry)).first()
            entry.outcome = "refused"
    with pytest.raises(OwnerError, match="append-only"):
        with store.transaction() as session:
            session.delete(session.scalars(select(AuditEntry)).first())
    with pytest.raises(OwnerError, match="append-only"):
        with store.transaction() as session:
            session.execute(text("DELETE FROM audit_log"))
    # Someone bypassing our engine meets the database trigger.
    from sqlalchemy import create_engine

    bypass = create_engine(store.url)
    with pytest.raises(Exception, match="append-only"):
        with bypass.begin() as connection:
            connection.exec_driver_sql("UPDATE audit_log SET outcome = 'x'")
    bypass.dispose()
    # Control: appending still works, and nothing was changed or lost.
    with store.transaction() as session:
        store.audit(session, "test", "subject", "ok")
    entries = _audit(world)
    assert len(entries) == before + 1 and all(e.outcome in ("ok", "refused") for e in entries)


def test_model_keys_are_sealed_under_the_master_key(world: World, database: str) -> None:
    with world.service.store.transaction() as session:
        sealed = session.get(Model, "mnist").sealed_key
    assert world.model_key not in sealed
    if not database.startswith("postgresql"):
        assert world.model_key not in Path(database).read_bytes()
    wrong = OwnerService(world.service.store, MasterKey(secrets.token_bytes(32)), clock=world.clock)
    wrong.registry = VerifierRegistry({"sim": SimVerifier()})
    # Rows tagged by the wrong key itself (a device enrolled and a licence issued with it) pass their
    # integrity checks, so what is left to refuse is opening the model key sealed under the right one.
    wrong.enroll_device("devw", "sim", MEASUREMENT, identity=world.device.identity)
    licence = wrong.issue_licence("mnist", device_id="devw", allow_sim=True)  # sealing works with any key...
    with pytest.raises(OwnerError, match="wrong master key"):
        world.service.master.open(sealed, "model:other")  # ...a ciphertext moved to another row does not open
    world.service.master.open(sealed, "model:mnist")
    nonce = wrong.new_nonce(licence)[0]
    ephemeral = (
        X25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    with pytest.raises(OwnerError, match="wrong master key"):
        wrong.release_key(
            licence_id=licence,
            device_id="devw",
            instance_id="i",
            nonce=nonce,
            ephemeral_public_key=ephemeral,
            evidence_kind="sim",
            evidence=world.device.evidence(binding_digest(nonce, ephemeral), MEASUREMENT),
        )


def test_migrations_are_idempotent_and_data_survives_reopening(world: World) -> None:
    url = world.service.store.url
    again = Store(url)
    try:
        service = OwnerService(again, world.service.master, clock=world.clock)
        assert [row["id"] for row in service.licences()] == [world.licence]
    finally:
        again.close()


def test_bad_database_locations_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(OwnerError, match="does not exist"):
        Store(tmp_path / "missing" / "owner.db")
    with pytest.raises(OwnerError, match="not supported"):
        Store("mysql://localhost/x")
    with pytest.raises(OwnerError, match="cannot reach"):
        Store("postgresql://nobody@127.0.0.1:1/none")


def test_concurrent_resends_of_one_batch_count_once(world: World) -> None:
    import threading

    key = _usage_key(world)
    answers = []

    def send() -> None:
        answers.append(_report(world, key, 1, 9))

    threads = [threading.Thread(target=send) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(a.duplicate for a in answers) == [False] + [True] * 11
    assert world.service.queries_used(world.licence) == 9


def test_wrapped_key_opens_only_with_the_requests_key_licence_and_nonce(world: World) -> None:
    from cryptography.exceptions import InvalidTag

    nonce = world.service.new_nonce(world.licence)[0]
    ephemeral = X25519PrivateKey.generate()
    public = ephemeral.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    granted = world.service.release_key(
        licence_id=world.licence,
        device_id="dev1",
        instance_id="i1",
        nonce=nonce,
        ephemeral_public_key=public,
        evidence_kind="sim",
        evidence=world.device.evidence(binding_digest(nonce, public), MEASUREMENT),
    )
    assert len(granted.wrapped_key) == 32 + 64 + 16 and world.model_key not in granted.wrapped_key
    for private, info in [
        (ephemeral, release_info("lic_other", nonce)),
        (ephemeral, release_info(world.licence, secrets.token_bytes(32))),
        (X25519PrivateKey.generate(), release_info(world.licence, nonce)),
    ]:
        with pytest.raises(InvalidTag):
            HPKE_SUITE.decrypt(granted.wrapped_key, private, info=info)
    plain = HPKE_SUITE.decrypt(granted.wrapped_key, ephemeral, info=release_info(world.licence, nonce))
    assert plain[:32] == world.model_key


def test_release_states_revalidation_and_offline_grace(world: World) -> None:
    licence = world.service.issue_licence(
        "mnist",
        device_id="dev1",
        allow_sim=True,
        valid_for=timedelta(hours=5),
        revalidate_seconds=3600,
        offline_grace_seconds=7200,
    )
    nonce = world.service.new_nonce(licence)[0]
    public = (
        X25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    granted = world.service.release_key(
        licence_id=licence,
        device_id="dev1",
        instance_id="i1",
        nonce=nonce,
        ephemeral_public_key=public,
        evidence_kind="sim",
        evidence=world.device.evidence(binding_digest(nonce, public), MEASUREMENT),
    )
    start = world.clock.now
    assert granted.revalidate_at == start + timedelta(hours=1)
    assert granted.offline_until == start + timedelta(hours=3)  # revalidation + grace
    assert granted.expires_at == start + timedelta(hours=5) and granted.insecure is True


# --- master-key rotation and backup -------------------------------------------------------------------


def test_master_key_rotation_reseals_everything_and_the_old_key_opens_nothing(world: World) -> None:
    """After a rotation the new key serves every licence (same model and usage keys, counts kept); a
    service holding the old key opens no secret and accepts no row (control for the refusal test below)."""
    key = _usage_key(world)
    _report(world, key, 1, 4)
    old = world.service.master
    new = MasterKey(secrets.token_bytes(32))
    counts = world.service.rotate_master_key(new)
    assert counts == {"models": 1, "fhe_secrets": 0, "licences": 1, "devices": 1}
    plain = world.release()
    assert plain[:32] == world.model_key and plain[32:] == key  # the device's keys do not change
    assert _report(world, key, 2, 3).queries_used == 7
    stale = OwnerService(world.service.store, old, clock=world.clock)
    with pytest.raises((RequestRefused, OwnerError), match="integrity check|cannot decrypt"):
        World(stale, world.clock, world.device, world.model_key, world.licence, world.tmp).release()
    with pytest.raises(OwnerError, match="cannot decrypt"):
        stale.rotate_master_key(MasterKey(secrets.token_bytes(32)))


def test_rotation_refuses_a_row_altered_in_the_database_and_changes_nothing(world: World) -> None:
    """Attack: lift a quota by SQL, then wait for the owner's next rotation to re-tag (launder) the row.
    The rotation checks every row first and stops; the old key still serves the untouched licences."""
    victim = _fresh(world)
    _sql(world, "UPDATE licences SET query_quota = NULL WHERE id = :id", id=victim)
    with refused(f"licence {victim} failed its integrity check"):
        world.service.rotate_master_key(MasterKey(secrets.token_bytes(32)))
    assert world.release()[:32] == world.model_key  # nothing was re-sealed: the old key still works
    with refused("integrity check"):
        world.release(licence=victim)


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_backup_restores_with_the_master_key_and_releases_nothing_without_it(world: World, tmp_path: Path) -> None:
    """An online backup of a live SQLite database restores to the state at the copy: licences release the
    model key and counts are those of the moment of the copy. The copy without the master key (a stolen
    backup) releases nothing."""
    from modelcloak.owner.store import backup_sqlite

    key = _usage_key(world)
    _report(world, key, 1, 4)
    copy = tmp_path / "backup.db"
    backup_sqlite(world.service.store.url.removeprefix("sqlite:///"), copy)
    assert copy.stat().st_mode & 0o077 == 0
    _report(world, key, 2, 3)  # after the copy: not in it
    restored = OwnerService(Store(str(copy)), world.service.master, clock=world.clock)
    try:
        assert restored.queries_used(world.licence) == 4
        again = World(restored, world.clock, world.device, world.model_key, world.licence, world.tmp)
        assert again.release()[:32] == world.model_key
        thief = World(
            OwnerService(restored.store, MasterKey(secrets.token_bytes(32)), clock=world.clock),
            world.clock, world.device, world.model_key, world.licence, world.tmp,
        )  # fmt: skip
        with pytest.raises((RequestRefused, OwnerError), match="integrity check|cannot decrypt"):
            thief.release()
    finally:
        restored.store.close()
    with pytest.raises(OwnerError, match="exists"):
        backup_sqlite(world.service.store.url.removeprefix("sqlite:///"), copy)
