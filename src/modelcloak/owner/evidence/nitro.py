"""AWS Nitro Enclaves attestation documents (kind "nitro"), verified offline.

Evidence is the document exactly as the Nitro Secure Module returns it: a COSE_Sign1 structure
(RFC 9052; CBOR array [protected, unprotected, payload, signature], optionally with tag 18) whose
payload is a CBOR map with module_id, digest, timestamp, pcrs, certificate, cabundle, public_key,
user_data and nonce (AWS, "Verifying the root of trust" for Nitro Enclaves).

Checked:
- the protected header names ES384 (alg -35) and the signature (96 bytes, r || s) verifies with
  ECDSA P-384 / SHA-384 over the COSE Sig_structure ["Signature1", protected, b"", payload] under
  the key of the document's `certificate`;
- the chain certificate -> cabundle (given root first, walked in reverse) ends at a pinned root:
  by default the AWS Nitro Enclaves Root G1 (CN=aws.nitro-enclaves), SHA-256 fingerprint
  641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b; every certificate is inside its
  validity at `now` (the enclave's own certificate lives about three hours, which is what makes a
  document fresh);
- digest is "SHA384" and every PCR is 48 bytes.

Not checked: AWS's certificate revocation lists (not published for these certificates).

Returned claims: measurements {"pcr0": ..., "pcr15": ...} as present; report_data = the `nonce`
field (the runtime puts binding_digest(...) there; b"" when absent); debug = PCR0, PCR1 and PCR2
all zero (an enclave started in debug mode reports zeroed PCRs); identity = None (the platform
has no stable per-device key; the enclave is identified by its PCRs); details: module_id,
timestamp, user_data and public_key (hex).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives import hashes

from modelcloak.owner.evidence._x509 import (
    check_size,
    fingerprint,
    load_der,
    raw_to_der,
    verify_chain,
    verify_ecdsa,
)
from modelcloak.owner.evidence.base import Claims, EvidenceError

__all__ = ["AWS_NITRO_ROOT_G1_SHA256", "NitroVerifier"]

AWS_NITRO_ROOT_G1_SHA256 = "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"
COSE_ALG_ES384 = -35
COSE_SIGN1_TAG = 18
PCR_SIZE = 48  # SHA-384
P384_SCALAR = 48  # each of the COSE signature's r and s
DEBUG_PCRS = (0, 1, 2)


def _cbor(data: bytes, what: str) -> Any:
    import cbor2

    try:
        return cbor2.loads(data)
    except Exception:  # cbor2 raises several types for malformed input; all mean the same here
        raise EvidenceError(f"Nitro {what} is not valid CBOR") from None


def _bytes_or_empty(value: Any, name: str) -> bytes:
    if value is None:
        return b""
    if not isinstance(value, bytes):
        raise EvidenceError(f"Nitro attestation document field {name!r} is not bytes")
    return value


class NitroVerifier:
    """Checks AWS Nitro Enclaves attestation documents against pinned roots (AWS's by default)."""

    kind = "nitro"

    def __init__(self, pinned_roots: Collection[str] | None = None) -> None:
        self.pinned_roots = (
            frozenset(r.lower() for r in pinned_roots) if pinned_roots else frozenset({AWS_NITRO_ROOT_G1_SHA256})
        )

    def verify(self, evidence: bytes, *, now: datetime) -> Claims:
        import cbor2

        check_size(evidence, "Nitro")
        envelope = _cbor(bytes(evidence), "attestation document")
        if isinstance(envelope, cbor2.CBORTag):
            if envelope.tag != COSE_SIGN1_TAG:
                raise EvidenceError(f"Nitro attestation document has CBOR tag {envelope.tag}, not COSE_Sign1 (18)")
            envelope = envelope.value
        if not isinstance(envelope, (list, tuple)) or len(envelope) != 4:
            raise EvidenceError("Nitro attestation document is not a COSE_Sign1 array of four elements")
        protected, _unprotected, payload, signature = envelope
        if not all(isinstance(part, bytes) for part in (protected, payload, signature)):
            raise EvidenceError("Nitro COSE_Sign1 protected header, payload and signature must be byte strings")
        header = _cbor(protected, "protected header") if protected else {}
        if not isinstance(header, Mapping) or header.get(1) != COSE_ALG_ES384:
            raise EvidenceError("Nitro COSE_Sign1 protected header does not name ES384 (alg -35)")
        if len(signature) != 2 * P384_SCALAR:
            raise EvidenceError(f"Nitro COSE signature is {len(signature)} bytes, expected 96 (P-384 r || s)")

        document = _cbor(payload, "payload")
        if not isinstance(document, Mapping):
            raise EvidenceError("Nitro attestation document payload is not a CBOR map")
        for name in ("module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle"):
            if name not in document:
                raise EvidenceError(f"Nitro attestation document lacks the mandatory field {name!r}")
        leaf = load_der(document["certificate"], "Nitro enclave certificate")
        cabundle = document["cabundle"]
        if not isinstance(cabundle, (list, tuple)) or not cabundle:
            raise EvidenceError("Nitro attestation document cabundle is not a non-empty list")
        chain = [leaf] + [load_der(der, "Nitro cabundle entry") for der in reversed(cabundle)]

        # Signature and chain before any claim is read: fields of an unsigned payload mean nothing.
        to_be_signed = cbor2.dumps(["Signature1", protected, b"", payload])
        verify_ecdsa(
            leaf.public_key(),
            raw_to_der(signature[:P384_SCALAR], signature[P384_SCALAR:]),
            to_be_signed,
            hashes.SHA384(),
            "Nitro attestation document",
        )
        verify_chain(chain, now=now, pinned_roots=self.pinned_roots, what="Nitro")

        if document["digest"] != "SHA384":
            raise EvidenceError(f"Nitro attestation document digest is {document['digest']!r}, expected 'SHA384'")
        pcrs = document["pcrs"]
        if not isinstance(pcrs, Mapping) or not pcrs:
            raise EvidenceError("Nitro attestation document has no PCRs")
        for index, value in pcrs.items():
            if (
                not isinstance(index, int)
                or not 0 <= index < 32
                or not isinstance(value, bytes)
                or len(value) != PCR_SIZE
            ):
                raise EvidenceError(f"Nitro PCR entry {index!r} is not an index 0..31 with a 48-byte value")
        measurements = {f"pcr{index}": pcrs[index].hex() for index in sorted(pcrs)}
        missing = [i for i in DEBUG_PCRS if f"pcr{i}" not in measurements]
        if missing:
            raise EvidenceError(f"Nitro attestation document lacks PCR {missing}")
        debug = all(set(bytes.fromhex(measurements[f"pcr{i}"])) == {0} for i in DEBUG_PCRS)

        nonce = _bytes_or_empty(document.get("nonce"), "nonce")
        user_data = _bytes_or_empty(document.get("user_data"), "user_data")
        public_key = _bytes_or_empty(document.get("public_key"), "public_key")
        module_id = document["module_id"]
        timestamp = document["timestamp"]
        if not isinstance(module_id, str) or not isinstance(timestamp, int):
            raise EvidenceError("Nitro attestation document module_id or timestamp has the wrong type")
        return Claims(
            kind=self.kind,
            measurements=measurements,
            report_data=nonce,
            debug=debug,
            identity=None,
            details={
                "module_id": module_id,
                "timestamp_ms": str(timestamp),
                "user_data": user_data.hex(),
                "public_key": public_key.hex(),
                "root_sha256": fingerprint(chain[-1]),
                "revocation": "not checked (offline)",
            },
        )
