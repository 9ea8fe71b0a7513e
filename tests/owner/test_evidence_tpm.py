"""TPM 2.0 quotes against a real software TPM (swtpm): the device makes them, the owner checks them.

Each test gets its own swtpm process. The refusals come from real signatures over real TPM
structures: a flipped byte, another TPM's key, PCR values that are not the signed ones.
"""

from __future__ import annotations

import hashlib
import struct
from datetime import datetime, timezone
from pathlib import Path

import cbor2
import pytest
import swtpm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from modelcloak.keys import KeyProviderError
from modelcloak.owner.evidence import EvidenceError, binding_digest
from modelcloak.owner.evidence.tpm_quote import TpmQuoteVerifier, parse_tpms_attest

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
PCRS = (0, 1, 7)
BINDING = binding_digest(b"server nonce 0123456789", b"ephemeral x25519 public key.....")

from swtpm import StartTpm  # noqa: E402,F401 - fixtures start_tpm and tpm live in conftest.py


def attest_api():
    from modelcloak.keys import tpm_attest

    return tpm_attest


def edit(evidence: bytes, **fields: object) -> bytes:
    document = cbor2.loads(evidence)
    document.update(fields)
    return cbor2.dumps(document)


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def test_genuine_quote_verifies_and_reports_pcrs_binding_and_ak(tpm: swtpm.SwTpm) -> None:
    t = attest_api()
    identity = t.attestation_identity(tcti=tpm.tcti)
    assert t.attestation_identity(tcti=tpm.tcti) == identity  # same TPM, same AK, nothing stored

    evidence = t.quote(BINDING, PCRS, tcti=tpm.tcti)
    claims = TpmQuoteVerifier([identity.public_key_der]).verify(evidence, now=NOW)

    assert claims.kind == "tpm" and not claims.insecure and not claims.debug
    assert claims.report_data == BINDING
    assert claims.identity == identity.fingerprint
    assert set(claims.measurements) == {"pcr0", "pcr1", "pcr7"}
    assert all(len(value) == 64 for value in claims.measurements.values())
    # The default verifier (what the registry builds) accepts it too and names the AK for the backend.
    assert TpmQuoteVerifier().verify(evidence, now=NOW).identity == identity.fingerprint
    # A trusted AK may also be given as PEM or as its fingerprint.
    pem = serialization.load_der_public_key(identity.public_key_der).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert TpmQuoteVerifier([pem]).verify(evidence, now=NOW).report_data == BINDING
    assert TpmQuoteVerifier([identity.fingerprint]).verify(evidence, now=NOW).report_data == BINDING


def test_extended_pcr_after_enrolment_changes_the_measurement(tpm: swtpm.SwTpm) -> None:
    t = attest_api()
    verifier = TpmQuoteVerifier([t.attestation_identity(tcti=tpm.tcti).public_key_der])
    before = verifier.verify(t.quote(BINDING, PCRS, tcti=tpm.tcti), now=NOW).measurements

    swtpm.extend_pcr(tpm.tcti, 7, b"a different Secure Boot policy")
    after = verifier.verify(t.quote(BINDING, PCRS, tcti=tpm.tcti), now=NOW).measurements

    # Still an authentic quote (the verifier's job), but PCR 7 moved: the licence's expected
    # measurements no longer match, which is what the key-release policy compares.
    assert after["pcr7"] != before["pcr7"]
    assert after["pcr0"] == before["pcr0"] and after["pcr1"] == before["pcr1"]
    expected = hashlib.sha256(
        bytes.fromhex(before["pcr7"]) + hashlib.sha256(b"a different Secure Boot policy").digest()
    )
    assert after["pcr7"] == expected.hexdigest()


def test_tampered_quote_and_signature_are_refused(tpm: swtpm.SwTpm) -> None:
    t = attest_api()
    evidence = t.quote(BINDING, PCRS, tcti=tpm.tcti)
    document = cbor2.loads(evidence)
    verifier = TpmQuoteVerifier()
    verifier.verify(evidence, now=NOW)  # control: untouched evidence passes

    attest: bytes = document["attest"]
    extra_offset = 4 + 2 + 2 + struct.unpack(">H", attest[6:8])[0] + 2  # magic, type, signer name, extraData size
    for index in (0, 5, extra_offset, len(attest) - 1):  # magic, type, the binding, the PCR digest
        with pytest.raises(EvidenceError, match="signature does not verify"):
            verifier.verify(edit(evidence, attest=flip(attest, index)), now=NOW)
    signature: bytes = document["signature"]
    with pytest.raises(EvidenceError):
        verifier.verify(edit(evidence, signature=flip(signature, len(signature) - 3)), now=NOW)


def test_another_tpms_key_is_refused(start_tpm: StartTpm, tmp_path: Path) -> None:
    t = attest_api()
    tpm_a, tpm_b = start_tpm(tmp_path / "a"), start_tpm(tmp_path / "b")
    ak_a, ak_b = t.attestation_identity(tcti=tpm_a.tcti), t.attestation_identity(tcti=tpm_b.tcti)
    assert ak_a.fingerprint != ak_b.fingerprint

    evidence_b = t.quote(BINDING, PCRS, tcti=tpm_b.tcti)
    with pytest.raises(EvidenceError, match="not enrolled"):
        TpmQuoteVerifier([ak_a.public_key_der]).verify(evidence_b, now=NOW)
    # Claiming to be A by swapping in A's public key: B's signature does not verify under it.
    with pytest.raises(EvidenceError, match="signature does not verify"):
        TpmQuoteVerifier([ak_a.public_key_der]).verify(edit(evidence_b, ak=ak_a.public_key_der), now=NOW)
    # Control: B's quote under B's enrolment passes.
    assert TpmQuoteVerifier([ak_b.public_key_der]).verify(evidence_b, now=NOW).identity == ak_b.fingerprint


def test_pcr_values_that_do_not_match_the_signed_digest_are_refused(tpm: swtpm.SwTpm) -> None:
    t = attest_api()
    evidence = t.quote(BINDING, PCRS, tcti=tpm.tcti)
    pcrs = dict(cbor2.loads(evidence)["pcrs"])
    verifier = TpmQuoteVerifier()

    lied = dict(pcrs, **{}) | {7: hashlib.sha256(b"the value the licence expects").digest()}
    with pytest.raises(EvidenceError, match="do not match the digest"):
        verifier.verify(edit(evidence, pcrs=lied), now=NOW)
    fewer = {index: value for index, value in pcrs.items() if index != 7}
    with pytest.raises(EvidenceError, match="covers PCRs"):
        verifier.verify(edit(evidence, pcrs=fewer), now=NOW)
    verifier.verify(edit(evidence, pcrs=pcrs), now=NOW)  # control: re-encoded but equal values pass


def _software_quote(magic: int, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A TPMS_ATTEST signed by a key outside any TPM, as an unrestricted key could sign anything."""
    pcr_value = bytes(32)
    attest = (
        struct.pack(">IH", magic, 0x8018)
        + struct.pack(">H", 0)
        + struct.pack(">H", len(BINDING))
        + BINDING
        + struct.pack(">QIIB", 1, 0, 0, 1)
        + struct.pack(">Q", 0)
        + struct.pack(">IHB", 1, 0x000B, 3)
        + bytes([0x01, 0x00, 0x00])
        + struct.pack(">H", 32)
        + hashlib.sha256(pcr_value).digest()
    )
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cbor2.dumps(
        {
            "format": "modelcloak-tpm-quote/v1",
            "attest": attest,
            "signature": key.sign(attest, ec.ECDSA(hashes.SHA256())),
            "pcr_bank": "sha256",
            "pcrs": {0: pcr_value},
            "ak": public,
        }
    )


def test_a_quote_made_outside_a_tpm_is_refused_by_magic_or_by_enrolment(tpm: swtpm.SwTpm) -> None:
    rogue = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(EvidenceError, match="TPM_GENERATED_VALUE"):
        TpmQuoteVerifier().verify(_software_quote(0x12345678, rogue), now=NOW)
    forged = _software_quote(0xFF544347, rogue)
    # Well-formed and self-consistent: only the enrolled AK tells it apart from a real TPM's quote.
    claims = TpmQuoteVerifier().verify(forged, now=NOW)
    assert parse_tpms_attest(cbor2.loads(forged)["attest"]).extra_data == BINDING
    enrolled = attest_api().attestation_identity(tcti=tpm.tcti)
    assert claims.identity != enrolled.fingerprint
    with pytest.raises(EvidenceError, match="not enrolled"):
        TpmQuoteVerifier([enrolled.public_key_der]).verify(forged, now=NOW)


@pytest.mark.parametrize(
    "evidence, reason",
    [
        (b"", "empty"),
        (b"\xff\x00not cbor", "not valid CBOR"),
        (cbor2.dumps([1, 2]), "not a CBOR map"),
        (cbor2.dumps({"format": "other"}), "format"),
        (b"\x00" * (65 * 1024), "more than"),
    ],
)
def test_malformed_evidence_gets_one_clear_reason(evidence: bytes, reason: str) -> None:
    with pytest.raises(EvidenceError, match=reason):
        TpmQuoteVerifier().verify(evidence, now=NOW)


def test_bad_quote_requests_are_refused_before_the_tpm(tpm: swtpm.SwTpm) -> None:
    t = attest_api()
    with pytest.raises(KeyProviderError, match="qualifying data"):
        t.quote(b"", PCRS, tcti=tpm.tcti)
    with pytest.raises(KeyProviderError, match="0..23"):
        t.quote(BINDING, (0, 24), tcti=tpm.tcti)


# --------------------------------------------------------------------------------------------
# End to end: the owner backend releases a key to a TPM-attested device, and only to it
# --------------------------------------------------------------------------------------------


def test_owner_backend_releases_keys_only_to_the_enrolled_tpm_in_its_enrolled_state(
    start_tpm: StartTpm, tmp_path: Path
) -> None:
    import secrets
    from datetime import timedelta

    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from modelcloak.owner.service import HPKE_SUITE, OwnerService, RequestRefused, release_info
    from modelcloak.owner.store import MasterKey, Store

    t = attest_api()
    device_tpm, other_tpm = start_tpm(tmp_path / "device"), start_tpm(tmp_path / "other")
    identity = t.attestation_identity(tcti=device_tpm.tcti)
    attester = t.TpmAttester(PCRS, tcti=device_tpm.tcti)
    enrolled_pcrs = TpmQuoteVerifier().verify(attester.evidence(BINDING), now=NOW).measurements

    store = Store(str(tmp_path / "owner.db"))
    try:
        service = OwnerService(store, MasterKey(secrets.token_bytes(32)))
        model_key = secrets.token_bytes(32)
        service.register_model("model", model_key)
        service.enroll_device("edge1", "tpm", enrolled_pcrs, identity=identity.fingerprint)
        licence = service.issue_licence("model", device_id="edge1", valid_for=timedelta(days=1))

        def release(evidence_for) -> bytes:  # noqa: ANN001
            nonce = service.new_nonce(licence)[0]
            ephemeral = X25519PrivateKey.generate()
            public = ephemeral.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            granted = service.release_key(
                licence_id=licence,
                device_id="edge1",
                instance_id="i1",
                nonce=nonce,
                ephemeral_public_key=public,
                evidence_kind="tpm",
                evidence=evidence_for(binding_digest(nonce, public)),
            )
            return HPKE_SUITE.decrypt(granted.wrapped_key, ephemeral, info=release_info(licence, nonce))

        assert release(attester.evidence)[:32] == model_key
        # Another TPM with the same (default) PCR values: its AK is not the enrolled one.
        with pytest.raises(RequestRefused, match="not device edge1's enrolled key"):
            release(t.TpmAttester(PCRS, tcti=other_tpm.tcti).evidence)
        # The enrolled TPM after a boot component changed: PCR 7 no longer matches.
        swtpm.extend_pcr(device_tpm.tcti, 7, b"unsigned bootloader")
        with pytest.raises(RequestRefused, match="measurement pcr7 is"):
            release(attester.evidence)
    finally:
        store.close()
