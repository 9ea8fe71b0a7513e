"""TPM 2.0 quotes (kind "tpm"): PCR values signed by a device's enrolled attestation key.

Evidence is the CBOR map that `modelcloak.keys.tpm_attest.quote` writes (format
"modelcloak-tpm-quote/v1"; fields in that module's docstring). The verifier checks:

1. the AK signature (ECDSA P-256, SHA-256) over the TPMS_ATTEST bytes, with the AK public key
   carried in the evidence;
2. that those bytes are a TPM-generated quote: magic TPM_GENERATED_VALUE (0xff544347) and type
   TPM_ST_ATTEST_QUOTE (0x8018). The AK is a restricted signing key, so the TPM signs structures
   starting with that magic only when it made them itself;
3. that the signed PCR selection is exactly the reported PCR indices on the sha256 bank, and that
   SHA-256 over the reported values (in selection order) equals the signed pcrDigest;
4. with `trusted_aks` given: that the AK is one of them.

Who the device is: `Claims.identity` is the AK fingerprint (SHA-256 of its DER
SubjectPublicKeyInfo, as `tpm_attest.attestation_identity().fingerprint`). The default verifier
(no `trusted_aks`, what the registry builds) accepts any AK whose signature checks, so the
key-release service MUST compare `identity` with the AK fingerprint enrolled for the device: a
quote from a software TPM is authentic in form but comes from an unknown key. A TPM has no
certificate chain to a vendor here (endorsement-key credential activation is not implemented), so
the owner enrols the AK while it trusts the machine. `now` is not used: quotes carry no
certificates; the TPM clock in the quote is reported in details, not compared.

Returned claims: measurements {"pcr0": hex, ...} (sha256 bank), report_data = extraData
(the qualifying data: binding_digest(...) for key release), debug = False (a TPM quote says
nothing about debuggability; the PCRs measure the boot chain), identity = AK fingerprint.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from modelcloak.owner.evidence._x509 import check_size, verify_ecdsa
from modelcloak.owner.evidence.base import Claims, EvidenceError

__all__ = ["EVIDENCE_FORMAT", "ParsedQuote", "TpmQuoteVerifier", "ak_fingerprint", "parse_tpms_attest"]

EVIDENCE_FORMAT = "modelcloak-tpm-quote/v1"
TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018
TPM_ALG_SHA256 = 0x000B


def ak_fingerprint(public_key_der: bytes) -> str:
    """Hex SHA-256 of an AK's DER SubjectPublicKeyInfo (equal to tpm_attest.ak_fingerprint)."""
    return hashlib.sha256(public_key_der).hexdigest()


@dataclass(frozen=True)
class ParsedQuote:
    """The fields of a TPMS_ATTEST of type quote that the verifier uses."""

    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    selection: list[tuple[int, list[int]]]  # [(hash algorithm id, [pcr indices ascending])]
    pcr_digest: bytes


class _Reader:
    """Big-endian reads over the TPM's marshalled structures; running off the end is an EvidenceError."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def take(self, size: int) -> bytes:
        if self.offset + size > len(self.data):
            raise EvidenceError("TPM quote structure is truncated")
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def sized(self) -> bytes:  # a TPM2B_*: 16-bit size, then that many bytes
        return self.take(self.u16())


def parse_tpms_attest(attest: bytes) -> ParsedQuote:
    """Parse a marshalled TPMS_ATTEST that must be a quote (TPM 2.0 Part 2, 10.12)."""
    reader = _Reader(attest)
    magic = reader.u32()
    if magic != TPM_GENERATED_VALUE:
        raise EvidenceError(f"TPM quote does not start with TPM_GENERATED_VALUE (magic {magic:#010x})")
    kind = reader.u16()
    if kind != TPM_ST_ATTEST_QUOTE:
        raise EvidenceError(f"TPM attestation is of type {kind:#06x}, not a quote ({TPM_ST_ATTEST_QUOTE:#06x})")
    qualified_signer = reader.sized()
    extra_data = reader.sized()
    clock, reset_count, restart_count, safe = reader.u64(), reader.u32(), reader.u32(), reader.u8()
    firmware_version = reader.u64()
    selection: list[tuple[int, list[int]]] = []
    count = reader.u32()
    if count > 16:
        raise EvidenceError(f"TPM quote selects {count} PCR banks; at most 16 are possible")
    for _ in range(count):
        algorithm = reader.u16()
        bitmap = reader.take(reader.u8())
        indices = [byte * 8 + bit for byte, value in enumerate(bitmap) for bit in range(8) if value >> bit & 1]
        selection.append((algorithm, indices))
    pcr_digest = reader.sized()
    if reader.offset != len(attest):
        raise EvidenceError(f"TPM quote has {len(attest) - reader.offset} unexpected trailing bytes")
    return ParsedQuote(
        qualified_signer,
        extra_data,
        clock,
        reset_count,
        restart_count,
        bool(safe),
        firmware_version,
        selection,
        pcr_digest,
    )


def _decode(evidence: bytes) -> dict[str, Any]:
    import cbor2

    try:
        document = cbor2.loads(evidence)
    except Exception:  # cbor2 raises several types for malformed input; all mean the same here
        raise EvidenceError("TPM evidence is not valid CBOR") from None
    if not isinstance(document, dict):
        raise EvidenceError("TPM evidence is not a CBOR map")
    if document.get("format") != EVIDENCE_FORMAT:
        raise EvidenceError(f"TPM evidence format is {document.get('format')!r}, expected {EVIDENCE_FORMAT!r}")
    for name in ("attest", "signature", "ak"):
        if not isinstance(document.get(name), bytes):
            raise EvidenceError(f"TPM evidence field {name!r} is missing or not bytes")
    if document.get("pcr_bank") != "sha256":
        raise EvidenceError(f"TPM evidence PCR bank is {document.get('pcr_bank')!r}; only 'sha256' is supported")
    pcrs = document.get("pcrs")
    if not isinstance(pcrs, dict) or not pcrs:
        raise EvidenceError("TPM evidence field 'pcrs' is missing or empty")
    for index, value in pcrs.items():
        if not isinstance(index, int) or not 0 <= index <= 23 or not isinstance(value, bytes) or len(value) != 32:
            raise EvidenceError(f"TPM evidence PCR entry {index!r} is not an index 0..23 with a 32-byte sha256 value")
    return document


def _load_ak(der: bytes) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm):  # a well-formed key of an algorithm we do not know
        raise EvidenceError("TPM evidence attestation key is not a DER public key of a known algorithm") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise EvidenceError("TPM evidence attestation key is not an ECC P-256 key")
    return key


def _normalise_ak(key: bytes | str) -> str:
    """A trusted AK given as DER or PEM public key bytes, or as a hex fingerprint."""
    if isinstance(key, str):
        text = key.strip().lower()
        if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
            return text
        key = key.encode()
    try:
        public = (
            serialization.load_pem_public_key(key)
            if key.lstrip().startswith(b"-----")
            else serialization.load_der_public_key(key)
        )
    except (ValueError, UnsupportedAlgorithm):
        raise EvidenceError("a trusted attestation key is neither a PEM/DER public key nor a hex fingerprint") from None
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return ak_fingerprint(der)


class TpmQuoteVerifier:
    """Checks TPM 2.0 quotes (see the module docstring for what is and is not checked)."""

    kind = "tpm"

    def __init__(self, trusted_aks: Iterable[bytes | str] | None = None) -> None:
        self._trusted: frozenset[str] | None = (
            None if trusted_aks is None else frozenset(_normalise_ak(key) for key in trusted_aks)
        )

    def verify(self, evidence: bytes, *, now: datetime) -> Claims:
        check_size(evidence, "TPM")
        document = _decode(bytes(evidence))
        ak_der: bytes = document["ak"]
        key = _load_ak(ak_der)
        identity = ak_fingerprint(
            key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        if self._trusted is not None and identity not in self._trusted:
            raise EvidenceError(f"TPM quote is signed by attestation key {identity}, which is not enrolled")
        attest: bytes = document["attest"]
        # Signature first: nothing in an unsigned structure deserves to be parsed for meaning.
        verify_ecdsa(key, document["signature"], attest, hashes.SHA256(), "TPM quote")
        quote = parse_tpms_attest(attest)

        pcrs: dict[int, bytes] = document["pcrs"]
        selected = [(algorithm, indices) for algorithm, indices in quote.selection if indices]
        if len(selected) != 1 or selected[0][0] != TPM_ALG_SHA256:
            raise EvidenceError("TPM quote must cover PCRs of exactly one bank, sha256")
        indices = selected[0][1]
        if sorted(pcrs) != indices:
            raise EvidenceError(f"TPM quote covers PCRs {indices} but the evidence reports PCRs {sorted(pcrs)}")
        digest = hashlib.sha256(b"".join(pcrs[index] for index in indices)).digest()
        if digest != quote.pcr_digest:
            raise EvidenceError(
                "reported PCR values do not match the digest the TPM signed (altered values, or a PCR was "
                "extended between the quote and the read; quote again)"
            )
        return Claims(
            kind=self.kind,
            measurements={f"pcr{index}": pcrs[index].hex() for index in indices},
            report_data=quote.extra_data,
            debug=False,
            identity=identity,
            details={
                "pcr_bank": "sha256",
                "qualified_signer": quote.qualified_signer.hex(),
                "clock_ms": str(quote.clock),
                "reset_count": str(quote.reset_count),
                "restart_count": str(quote.restart_count),
                "firmware_version": f"{quote.firmware_version:#018x}",
                "ak_enrolment": "pinned" if self._trusted is not None else "caller must match identity",
            },
        )
