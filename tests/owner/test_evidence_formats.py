"""Offline verification of AWS Nitro, AMD SEV-SNP and Intel SGX DCAP evidence.

Two kinds of input:

- PUBLIC SAMPLES (tests/data/evidence/, sources in its README): real documents signed by real AWS,
  AMD and Intel keys, byte-exact. They verify at a fixed `now` inside their certificates'
  validity; a flipped byte anywhere that matters, or a `now` outside validity, is refused.
- SYNTHETIC evidence built here with our own certificate authorities: it exercises what the
  samples cannot (a debug enclave, our own binding in report data, a broken certificate inside a
  validly signed document), and it is the negative control for root pinning: evidence that is
  perfect except that it chains to our root is refused by the default verifiers and accepted
  only when our root is pinned instead.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from datetime import datetime, timedelta, timezone
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelcloak.owner.evidence import EvidenceError, binding_digest
from modelcloak.owner.evidence._x509 import fingerprint, load_pem_chain
from modelcloak.owner.evidence.nitro import AWS_NITRO_ROOT_G1_SHA256, NitroVerifier
from modelcloak.owner.evidence.sev_snp import AMD_ARK_GENOA_SHA256, AMD_ARK_MILAN_SHA256, SevSnpVerifier
from modelcloak.owner.evidence.sgx_dcap import INTEL_QE_MRSIGNER, INTEL_SGX_ROOT_CA_SHA256, SgxDcapVerifier

DATA = Path(__file__).parent / "data" / "evidence"
BINDING = binding_digest(b"nonce from the owner backend", b"runtime ephemeral x25519 key....")
UTC = timezone.utc


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


# --------------------------------------------------------------------------------------------
# Our own certificate authorities (synthetic evidence)
# --------------------------------------------------------------------------------------------

SYNTH_FROM = datetime(2025, 1, 1, tzinfo=UTC)
SYNTH_NOW = datetime(2026, 1, 1, tzinfo=UTC)


def make_cert(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool,
    extensions: list[x509.ExtensionType] = (),  # type: ignore[assignment]
    days: int = 5 * 365,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, signing_key = (subject, key) if issuer is None else (issuer[0].subject, issuer[1])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(SYNTH_FROM)
        .not_valid_after(SYNTH_FROM + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    hash_algorithm = hashes.SHA384() if isinstance(signing_key.curve, ec.SECP384R1) else hashes.SHA256()
    return builder.sign(signing_key, hash_algorithm)


def make_chain(curve: ec.EllipticCurve, names: tuple[str, str, str], leaf_extensions=()):  # noqa: ANN201
    """root -> intermediate -> leaf, all on `curve`; returns ([leaf, intermediate, root], leaf key)."""
    root_key, mid_key, leaf_key = (ec.generate_private_key(curve) for _ in range(3))
    root = make_cert(names[2], root_key, None, ca=True)
    mid = make_cert(names[1], mid_key, (root, root_key), ca=True)
    leaf = make_cert(names[0], leaf_key, (mid, mid_key), ca=False, extensions=list(leaf_extensions))
    return [leaf, mid, root], leaf_key


def raw_signature(
    key: ec.EllipticCurvePrivateKey, data: bytes, algorithm: hashes.HashAlgorithm, size: int
) -> tuple[bytes, bytes]:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(algorithm)))
    return r.to_bytes(size, "big"), s.to_bytes(size, "big")


def broken_signature(cert: x509.Certificate) -> x509.Certificate:
    """The same certificate with one bit of its signature flipped (still parseable)."""
    raw = der(cert)
    return x509.load_der_x509_certificate(flip(raw, len(raw) - 2))


# --------------------------------------------------------------------------------------------
# AWS Nitro Enclaves
# --------------------------------------------------------------------------------------------

NITRO_SAMPLE = base64.b64decode((DATA / "nitro" / "eternis_example_attestation_2.b64").read_text())
NITRO_NOW = datetime(2024, 7, 31, 21, 0, tzinfo=UTC)  # the enclave certificate lives 20:18:24 .. 23:18:27


def nitro_parts(document: bytes) -> tuple[list, dict]:
    envelope = cbor2.loads(document)
    return envelope, cbor2.loads(envelope[2])


def nitro_repack(envelope: list, payload: dict) -> bytes:
    return cbor2.dumps([envelope[0], envelope[1], cbor2.dumps(payload), envelope[3]])


def test_nitro_public_sample_verifies_at_a_time_inside_its_validity() -> None:
    claims = NitroVerifier().verify(NITRO_SAMPLE, now=NITRO_NOW)
    assert claims.kind == "nitro" and not claims.insecure
    assert claims.report_data == bytes(19) + b"\x01"  # the sample's nonce
    assert claims.measurements["pcr0"].startswith("a6cdfede5b1e7950de33")
    assert [f"pcr{i}" for i in range(16)] == list(claims.measurements)
    assert claims.debug is False  # PCR0..2 are real measurements
    assert claims.details["module_id"] == "i-0809070ca8037095f-enc01910a70380dca7e"
    assert claims.details["root_sha256"] == AWS_NITRO_ROOT_G1_SHA256


def test_nitro_sample_with_a_flipped_byte_is_refused() -> None:
    verifier = NitroVerifier()
    envelope, payload = nitro_parts(NITRO_SAMPLE)
    pcr0 = bytearray(payload["pcrs"][0])
    pcr0[0] ^= 1
    with pytest.raises(EvidenceError, match="signature does not verify"):
        verifier.verify(nitro_repack(envelope, {**payload, "pcrs": {**payload["pcrs"], 0: bytes(pcr0)}}), now=NITRO_NOW)
    with pytest.raises(EvidenceError, match="signature does not verify"):
        verifier.verify(nitro_repack(envelope, {**payload, "nonce": BINDING}), now=NITRO_NOW)
    bundle = list(payload["cabundle"])
    bundle[1] = flip(bundle[1], len(bundle[1]) - 5)
    with pytest.raises(EvidenceError):
        verifier.verify(nitro_repack(envelope, {**payload, "cabundle": bundle}), now=NITRO_NOW)
    tampered_signature = [envelope[0], envelope[1], envelope[2], flip(envelope[3], 10)]
    with pytest.raises(EvidenceError, match="signature does not verify"):
        verifier.verify(cbor2.dumps(tampered_signature), now=NITRO_NOW)
    verifier.verify(nitro_repack(envelope, payload), now=NITRO_NOW)  # control: re-encoded unchanged passes


@pytest.mark.parametrize(
    "now, reason",
    [
        (datetime(2024, 7, 31, 23, 30, tzinfo=UTC), "expired"),
        (datetime(2024, 7, 31, 20, 0, tzinfo=UTC), "not valid yet"),
    ],
)
def test_nitro_sample_outside_its_validity_is_refused(now: datetime, reason: str) -> None:
    with pytest.raises(EvidenceError, match=reason):
        NitroVerifier().verify(NITRO_SAMPLE, now=now)


def build_nitro(*, debug: bool = False, nonce: bytes = BINDING, break_intermediate: bool = False) -> tuple[bytes, str]:
    chain, leaf_key = make_chain(ec.SECP384R1(), ("enclave", "zonal", "test nitro root"))
    leaf, mid, root = chain
    if break_intermediate:
        mid = broken_signature(mid)
    pcrs = {i: (bytes(48) if debug or i > 2 else hashlib.sha384(b"pcr%d" % i).digest()) for i in range(16)}
    payload = cbor2.dumps(
        {
            "module_id": "i-test-enc0",
            "digest": "SHA384",
            "timestamp": 1767225600000,
            "pcrs": pcrs,
            "certificate": der(leaf),
            "cabundle": [der(root), der(mid)],
            "public_key": None,
            "user_data": None,
            "nonce": nonce,
        }
    )
    protected = cbor2.dumps({1: -35})
    r, s = raw_signature(leaf_key, cbor2.dumps(["Signature1", protected, b"", payload]), hashes.SHA384(), 48)
    return cbor2.dumps(cbor2.CBORTag(18, [protected, {}, payload, r + s])), fingerprint(root)


def test_nitro_document_chaining_to_another_root_is_refused_unless_that_root_is_pinned() -> None:
    document, test_root = build_nitro()
    with pytest.raises(EvidenceError, match="not a pinned root"):
        NitroVerifier().verify(document, now=SYNTH_NOW)
    claims = NitroVerifier(pinned_roots=[test_root]).verify(document, now=SYNTH_NOW)
    assert claims.report_data == BINDING and claims.debug is False


def test_nitro_debug_enclave_and_broken_chain() -> None:
    document, test_root = build_nitro(debug=True)
    assert NitroVerifier(pinned_roots=[test_root]).verify(document, now=SYNTH_NOW).debug is True
    # A validly signed document whose intermediate certificate was not issued by its root.
    document, test_root = build_nitro(break_intermediate=True)
    with pytest.raises(EvidenceError, match="is not signed by"):
        NitroVerifier(pinned_roots=[test_root]).verify(document, now=SYNTH_NOW)


# --------------------------------------------------------------------------------------------
# AMD SEV-SNP
# --------------------------------------------------------------------------------------------

SNP_REPORT = bytes.fromhex("".join((DATA / "sev-snp" / "ccf_milan_attestation.hex").read_text().split()))
SNP_CHAIN = [der(c) for c in load_pem_chain((DATA / "sev-snp" / "ccf_milan_endorsements.pem").read_bytes(), "sample")]
SNP_NOW = datetime(2026, 1, 1, tzinfo=UTC)  # VCEK valid 2025-01-28 .. 2032-01-28


def snp_evidence(report: bytes = SNP_REPORT, certs: list[bytes] = SNP_CHAIN) -> bytes:
    return cbor2.dumps({"format": "modelcloak-sev-snp/v1", "report": report, "certs": certs})


def load_snp_sample(product: str) -> tuple[bytes, list[bytes]]:
    report = bytes.fromhex("".join((DATA / "sev-snp" / f"ccf_{product}_attestation.hex").read_text().split()))
    pem = (DATA / "sev-snp" / f"ccf_{product}_endorsements.pem").read_bytes()
    return report, [der(c) for c in load_pem_chain(pem, "sample")]


@pytest.mark.parametrize(
    "product, chip_id, ark",
    [
        ("milan", "4ffb5cb4fd594f3f", AMD_ARK_MILAN_SHA256),
        ("genoa", "b1e24a27bbc3a4d5", AMD_ARK_GENOA_SHA256),
    ],
)
def test_snp_public_samples_verify_at_a_time_inside_their_validity(product: str, chip_id: str, ark: str) -> None:
    report, certs = load_snp_sample(product)
    claims = SevSnpVerifier().verify(snp_evidence(report, certs), now=SNP_NOW)
    assert claims.kind == "sev-snp"
    assert claims.measurements["measurement"].startswith("5feee30d6d7e1a29f403d70a4198237d")
    assert claims.identity is not None and claims.identity.startswith(chip_id)  # CHIP_ID
    assert claims.debug is False  # policy 0x3001f: bit 19 clear
    assert len(claims.report_data) == 64
    assert claims.details["ark_sha256"] == ark
    # Each product line only under its own ARK: the Genoa chain is refused when only Milan is pinned.
    other = AMD_ARK_GENOA_SHA256 if ark == AMD_ARK_MILAN_SHA256 else AMD_ARK_MILAN_SHA256
    with pytest.raises(EvidenceError, match="not a pinned root"):
        SevSnpVerifier(pinned_arks=[other]).verify(snp_evidence(report, certs), now=SNP_NOW)


def test_snp_vcek_of_another_chip_is_refused() -> None:
    genoa_report, genoa_certs = load_snp_sample("genoa")
    # Milan's report with Genoa's (genuine, AMD-signed) VCEK chain: the report signature fails.
    with pytest.raises(EvidenceError, match="signature does not verify"):
        SevSnpVerifier().verify(snp_evidence(SNP_REPORT, genoa_certs), now=SNP_NOW)


def test_snp_sample_with_a_flipped_byte_is_refused() -> None:
    verifier = SevSnpVerifier()
    for index, reason in [
        (0x90, "signature does not verify"),  # measurement
        (0x50, "signature does not verify"),  # report data
        (0x08 + 2, "signature does not verify"),  # policy byte holding the debug bit
        (0x2A0 + 3, "signature does not verify"),  # signature r
    ]:
        with pytest.raises(EvidenceError, match=reason):
            verifier.verify(snp_evidence(report=flip(SNP_REPORT, index)), now=SNP_NOW)
    ask = SNP_CHAIN[1]
    with pytest.raises(EvidenceError):
        verifier.verify(snp_evidence(certs=[SNP_CHAIN[0], flip(ask, len(ask) - 7), SNP_CHAIN[2]]), now=SNP_NOW)
    with pytest.raises(EvidenceError):  # VCEK with a changed public key byte
        verifier.verify(snp_evidence(certs=[flip(SNP_CHAIN[0], 300), *SNP_CHAIN[1:]]), now=SNP_NOW)


@pytest.mark.parametrize(
    "now, reason", [(datetime(2025, 1, 1, tzinfo=UTC), "not valid yet"), (datetime(2032, 6, 1, tzinfo=UTC), "expired")]
)
def test_snp_sample_outside_its_validity_is_refused(now: datetime, reason: str) -> None:
    with pytest.raises(EvidenceError, match=reason):
        SevSnpVerifier().verify(snp_evidence(), now=now)


def build_snp(*, debug: bool = False, hwid_matches: bool = True) -> tuple[bytes, str]:
    chip_id = hashlib.sha512(b"test chip").digest()
    tcb = bytes([4, 0, 0, 0, 0, 0, 24, 219])  # bootloader 4, TEE 0, SNP 24, microcode 219
    spl = {"1": tcb[0], "2": tcb[1], "3": tcb[6], "8": tcb[7]}
    extensions = [
        x509.UnrecognizedExtension(
            x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.4"), chip_id if hwid_matches else bytes(64)
        )
    ] + [
        x509.UnrecognizedExtension(
            x509.ObjectIdentifier(f"1.3.6.1.4.1.3704.1.3.{n}"), bytes([2, 1, v]) if v < 128 else bytes([2, 2, 0, v])
        )
        for n, v in spl.items()
    ]
    chain, vcek_key = make_chain(ec.SECP384R1(), ("SEV-VCEK", "SEV-Test", "ARK-Test"), extensions)
    report = bytearray(0x4A0)
    policy = 0x30000 | (1 << 19 if debug else 0)
    struct.pack_into("<IIQ", report, 0, 3, 1, policy)
    struct.pack_into("<II", report, 0x30, 0, 1)
    report[0x50:0x70] = BINDING
    report[0x90:0xC0] = hashlib.sha384(b"launch digest").digest()
    report[0x180:0x188] = tcb
    report[0x1A0:0x1E0] = chip_id
    r, s = raw_signature(vcek_key, bytes(report[:0x2A0]), hashes.SHA384(), 48)
    report[0x2A0:0x2E8] = r[::-1].ljust(72, b"\0")
    report[0x2E8:0x330] = s[::-1].ljust(72, b"\0")
    return snp_evidence(bytes(report), [der(c) for c in chain]), fingerprint(chain[2])


def test_snp_report_chaining_to_another_root_is_refused_unless_that_root_is_pinned() -> None:
    evidence, test_ark = build_snp()
    with pytest.raises(EvidenceError, match="not a pinned root"):
        SevSnpVerifier().verify(evidence, now=SYNTH_NOW)
    claims = SevSnpVerifier(pinned_arks=[test_ark]).verify(evidence, now=SYNTH_NOW)
    assert claims.report_data[:32] == BINDING and claims.debug is False
    assert claims.measurements["measurement"] == hashlib.sha384(b"launch digest").hexdigest()


def test_snp_debug_policy_and_vcek_of_another_chip() -> None:
    evidence, test_ark = build_snp(debug=True)
    assert SevSnpVerifier(pinned_arks=[test_ark]).verify(evidence, now=SYNTH_NOW).debug is True
    evidence, test_ark = build_snp(hwid_matches=False)
    with pytest.raises(EvidenceError, match="another chip"):
        SevSnpVerifier(pinned_arks=[test_ark]).verify(evidence, now=SYNTH_NOW)


# --------------------------------------------------------------------------------------------
# Intel SGX DCAP
# --------------------------------------------------------------------------------------------

SGX_QUOTE = bytes.fromhex((DATA / "sgx" / "automata_ata-sgx-v3.hex").read_text().strip().removeprefix("0x"))
SGX_NOW = datetime(2026, 1, 1, tzinfo=UTC)  # PCK certificate valid 2025-07-29 .. 2032-07-29
SGX_SIGNATURE_DATA = 48 + 384 + 4
SGX_QE_REPORT = SGX_SIGNATURE_DATA + 128
SGX_CERT_DATA = SGX_QE_REPORT + 384 + 64 + 2 + 32 + 6  # QE report, its signature, auth data (32 bytes)


def test_sgx_public_sample_verifies_at_a_time_inside_its_validity() -> None:
    claims = SgxDcapVerifier().verify(SGX_QUOTE, now=SGX_NOW)
    assert claims.kind == "sgx-dcap"
    assert claims.measurements == {
        "mrenclave": "6b2fb25e0084ad6ecbf6cfcefe09e2fa0fca2b84092f72c01f8fe98e9d7db5cd",
        "mrsigner": "334d8d7c1be636f4a2811c97bb31cb25419acf287f8acd548e1e2adc30b2c7f9",
    }
    assert claims.debug is False  # attributes flags 0x05: INIT | MODE64BIT
    assert claims.report_data[:4].hex() == "c28cac19"
    assert claims.details["root_sha256"] == INTEL_SGX_ROOT_CA_SHA256
    assert "not checked" in claims.details["tcb_status"]
    assert claims.details["qe_mrsigner"] == INTEL_QE_MRSIGNER


def test_sgx_sample_with_a_flipped_byte_is_refused() -> None:
    verifier = SgxDcapVerifier()
    for index, reason in [
        (48 + 64, "signature does not verify"),  # MRENCLAVE
        (48 + 48, "signature does not verify"),  # ATTRIBUTES (the DEBUG flag)
        (48 + 320, "signature does not verify"),  # REPORTDATA
        (SGX_SIGNATURE_DATA + 5, "signature does not verify"),  # the enclave report signature
        (SGX_SIGNATURE_DATA + 64 + 5, "not a point on P-256|signature does not verify"),  # the attestation key
        (SGX_QE_REPORT + 10, "QE report"),  # the QE report (signed by the PCK key)
    ]:
        with pytest.raises(EvidenceError, match=reason):
            verifier.verify(flip(SGX_QUOTE, index), now=SGX_NOW)
    # One character of the PCK Platform CA certificate (inside its signature) changed in the PEM.
    pem_start = SGX_QUOTE.index(b"-----BEGIN CERTIFICATE-----", SGX_QUOTE.index(b"-----END CERTIFICATE-----"))
    target = SGX_QUOTE.index(b"-----END CERTIFICATE-----", pem_start) - 20
    replacement = b"A" if SGX_QUOTE[target : target + 1] != b"A" else b"B"
    broken = SGX_QUOTE[:target] + replacement + SGX_QUOTE[target + 1 :]
    with pytest.raises(EvidenceError):
        verifier.verify(broken, now=SGX_NOW)


@pytest.mark.parametrize(
    "now, reason", [(datetime(2025, 7, 1, tzinfo=UTC), "not valid yet"), (datetime(2032, 8, 1, tzinfo=UTC), "expired")]
)
def test_sgx_sample_outside_its_validity_is_refused(now: datetime, reason: str) -> None:
    with pytest.raises(EvidenceError, match=reason):
        SgxDcapVerifier().verify(SGX_QUOTE, now=now)


def build_sgx(*, debug: bool = False, bind_other_key: bool = False, qe_signer: bytes = b"") -> tuple[bytes, str]:
    chain, pck_key = make_chain(
        ec.SECP256R1(), ("Test SGX PCK Certificate", "Test SGX PCK Platform CA", "Test SGX Root CA")
    )
    attestation_key = ec.generate_private_key(ec.SECP256R1())
    point = attestation_key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )[1:]
    header = struct.pack("<HHIHH", 3, 2, 0, 11, 16) + bytes(16) + bytes(20)
    report = bytearray(384)
    report[48:56] = (0x05 | (0x02 if debug else 0)).to_bytes(8, "little")
    report[64:96] = hashlib.sha256(b"enclave code").digest()
    report[128:160] = hashlib.sha256(b"enclave signer").digest()
    report[320:352] = BINDING
    qe_auth = bytes(range(32))
    qe_report = bytearray(384)
    vouched = point if not bind_other_key else bytes(64)
    qe_report[320:352] = hashlib.sha256(vouched + qe_auth).digest()
    qe_report[128:160] = qe_signer or bytes.fromhex(INTEL_QE_MRSIGNER)
    isv_r, isv_s = raw_signature(attestation_key, header + bytes(report), hashes.SHA256(), 32)
    qe_r, qe_s = raw_signature(pck_key, bytes(qe_report), hashes.SHA256(), 32)
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain) + b"\0"
    signature_data = (
        isv_r
        + isv_s
        + point
        + bytes(qe_report)
        + qe_r
        + qe_s
        + struct.pack("<H", 32)
        + qe_auth
        + struct.pack("<HI", 5, len(pem))
        + pem
    )
    quote = header + bytes(report) + struct.pack("<I", len(signature_data)) + signature_data
    return quote, fingerprint(chain[2])


def test_sgx_quote_chaining_to_another_root_is_refused_unless_that_root_is_pinned() -> None:
    quote, test_root = build_sgx()
    with pytest.raises(EvidenceError, match="not a pinned root"):
        SgxDcapVerifier().verify(quote, now=SYNTH_NOW)
    claims = SgxDcapVerifier(pinned_roots=[test_root]).verify(quote, now=SYNTH_NOW)
    assert claims.report_data[:32] == BINDING and claims.debug is False
    assert claims.measurements["mrenclave"] == hashlib.sha256(b"enclave code").hexdigest()


def test_sgx_debug_enclave_and_qe_not_vouching_for_the_key() -> None:
    quote, test_root = build_sgx(debug=True)
    assert SgxDcapVerifier(pinned_roots=[test_root]).verify(quote, now=SYNTH_NOW).debug is True
    quote, test_root = build_sgx(bind_other_key=True)
    with pytest.raises(EvidenceError, match="does not vouch"):
        SgxDcapVerifier(pinned_roots=[test_root]).verify(quote, now=SYNTH_NOW)


def test_sgx_quote_vouched_for_by_a_non_intel_quoting_enclave_is_refused() -> None:
    rogue_signer = hashlib.sha256(b"platform owner's own quoting enclave").digest()
    quote, test_root = build_sgx(qe_signer=rogue_signer)
    with pytest.raises(EvidenceError, match="not Intel's Quoting Enclave"):
        SgxDcapVerifier(pinned_roots=[test_root]).verify(quote, now=SYNTH_NOW)
    # Control: the same quote passes when that signer is explicitly trusted.
    SgxDcapVerifier(pinned_roots=[test_root], qe_mrsigners=[rogue_signer.hex()]).verify(quote, now=SYNTH_NOW)


# --------------------------------------------------------------------------------------------
# Shared: malformed input and the registry's defaults
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("verifier", [NitroVerifier(), SevSnpVerifier(), SgxDcapVerifier()], ids=lambda v: v.kind)
@pytest.mark.parametrize(
    "evidence",
    [
        b"",
        b"\x00",
        b"\xff" * 10,
        cbor2.dumps({"format": "x"}),
        cbor2.dumps([1, 2, 3, 4]),
        b"\x03\x00" * 40,
        b"\x00" * 70000,
    ],
    ids=["empty", "one-byte", "garbage", "wrong-map", "wrong-array", "short-quote", "oversized"],
)
def test_malformed_evidence_is_an_evidence_error_never_a_crash(verifier, evidence: bytes) -> None:  # noqa: ANN001
    with pytest.raises(EvidenceError):
        verifier.verify(evidence, now=SYNTH_NOW)


def test_truncated_samples_are_refused_with_a_reason() -> None:
    for cut in (10, 500, len(SGX_QUOTE) - 1):
        with pytest.raises(EvidenceError):
            SgxDcapVerifier().verify(SGX_QUOTE[:cut], now=SGX_NOW)
    for cut in (100, 1183):
        with pytest.raises(EvidenceError, match="1184"):
            SevSnpVerifier().verify(snp_evidence(report=SNP_REPORT[:cut]), now=SNP_NOW)
    for cut in (50, len(NITRO_SAMPLE) - 1):
        with pytest.raises(EvidenceError):
            NitroVerifier().verify(NITRO_SAMPLE[:cut], now=NITRO_NOW)


def test_the_registry_builds_the_pinned_defaults() -> None:
    from modelcloak.owner.evidence.registry import VerifierRegistry

    registry = VerifierRegistry()
    assert registry.get("nitro").verify(NITRO_SAMPLE, now=NITRO_NOW).kind == "nitro"
    assert registry.get("sev-snp").verify(snp_evidence(), now=SNP_NOW).kind == "sev-snp"
    assert registry.get("sgx-dcap").verify(SGX_QUOTE, now=SGX_NOW).kind == "sgx-dcap"
    assert registry.get("tpm").kind == "tpm"


FUZZ_CASES = {
    "nitro": (NitroVerifier(), NITRO_SAMPLE, NITRO_NOW),
    "sev-snp": (SevSnpVerifier(), snp_evidence(), SNP_NOW),
    "sgx-dcap": (SgxDcapVerifier(), SGX_QUOTE, SGX_NOW),
}


@pytest.mark.parametrize("kind", sorted(FUZZ_CASES))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_damaged_samples_never_yield_other_claims_or_crash(kind: str, data: st.DataObject) -> None:
    """Random byte changes, cuts and insertions anywhere in real evidence: refused with an
    EvidenceError (never another exception type: cryptography parses certificates lazily, and a
    damaged one must not surface as ValueError or UnsupportedAlgorithm from inside a check), or,
    where the bytes are not covered by any signature (reserved padding, a PEM terminator),
    accepted with exactly the original claims."""
    verifier, sample, now = FUZZ_CASES[kind]
    original = verifier.verify(sample, now=now)
    damaged = bytearray(sample)
    operation = data.draw(st.sampled_from(["overwrite", "truncate", "insert"]))
    position = data.draw(st.integers(0, len(sample) - 1))
    if operation == "overwrite":
        damaged[position] ^= data.draw(st.integers(1, 255))
    elif operation == "truncate":
        del damaged[position:]
    else:
        damaged[position:position] = data.draw(st.binary(min_size=1, max_size=8))
    try:
        claims = verifier.verify(bytes(damaged), now=now)
    except EvidenceError:
        return
    assert claims == original
