"""Intel SGX DCAP quotes, version 3 with ECDSA P-256 (kind "sgx-dcap"), verified offline.

Evidence is the quote exactly as the Quoting Enclave returns it (sgx_qe_get_quote), with the PCK
certificate chain inside it (certification data type 5); layout from Intel's "SGX ECDSA Quote
Library API" (Appendix A, Quote Format):

    header (48) | ISV enclave report body (384) | signature data length (4) | signature data:
      ISV report signature (64, r||s) | attestation key (64, x||y) | QE report body (384) |
      QE report signature (64) | QE auth data (2 + n) | certification data (2 type, 4 size, PEM chain)

Checked:
- version 3, attestation key type 2 (ECDSA-256 with P-256), TEE type 0 (SGX);
- the attestation key's signature over header || ISV report (ECDSA P-256, SHA-256);
- the QE report's signature by the PCK certificate's key;
- the QE report data binds the attestation key: its first 32 bytes equal
  SHA-256(attestation key || QE auth data) and the other 32 are zero;
- the QE report comes from Intel's Quoting Enclave (MRSIGNER pinned, default
  8c4f5775d796503e96137f77c68a829a0056ac8ded70140b081b094490c57bff) and not a debug one;
- PCK certificate -> PCK Platform/Processor CA -> Intel SGX Root CA: each inside its validity at
  `now`, each signature, the root pinned by SHA-256 fingerprint (default
  44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3).

Not checked (needs Intel's PCS collateral, fetched online and signed separately): TCB info (is the
platform's CPUSVN/PCESVN up to date, TCB status such as OutOfDate or SWHardeningNeeded), the rest of QE
identity (the QE's ISVSVN against Intel's current QE identity), PCK CRLs. `details` says so, and reports the
QE's MRSIGNER and the PCE/QE SVNs for an auditor.

Returned claims: measurements {"mrenclave", "mrsigner"}; report_data = the 64-byte REPORTDATA
(binding_digest(...) in its first 32 bytes); debug = ATTRIBUTES.DEBUG (flags bit 1: the enclave's
memory is readable through the debug interface); identity = SHA-256 of the PCK certificate's
public key (one per platform and TCB).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Collection
from datetime import datetime

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from modelcloak.owner.evidence._x509 import (
    check_size,
    fingerprint,
    load_pem_chain,
    raw_to_der,
    spki_fingerprint,
    verify_chain,
    verify_ecdsa,
)
from modelcloak.owner.evidence.base import Claims, EvidenceError

__all__ = ["INTEL_QE_MRSIGNER", "INTEL_SGX_ROOT_CA_SHA256", "SgxDcapVerifier"]

INTEL_SGX_ROOT_CA_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
# The MRSIGNER of Intel's Quoting Enclave (the one Intel's QE identity collateral names). On
# flexible-launch-control platforms any enclave can be given the provisioning key and have its
# report signed by the PCK key, so a QE report not from Intel's QE proves nothing about the AK.
INTEL_QE_MRSIGNER = "8c4f5775d796503e96137f77c68a829a0056ac8ded70140b081b094490c57bff"
HEADER_SIZE = 48
REPORT_SIZE = 384
ATTESTATION_KEY_ECDSA_P256 = 2
TEE_TYPE_SGX = 0
CERT_DATA_PCK_CHAIN = 5
ATTRIBUTE_DEBUG = 0x2


class _Reader:
    """Little-endian reads over the quote; running off the end is an EvidenceError."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def take(self, size: int, what: str) -> bytes:
        if size < 0 or self.offset + size > len(self.data):
            raise EvidenceError(f"SGX quote is truncated in its {what}")
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def u16(self, what: str) -> int:
        return int(struct.unpack("<H", self.take(2, what))[0])

    def u32(self, what: str) -> int:
        return int(struct.unpack("<I", self.take(4, what))[0])


def _report_fields(body: bytes) -> dict[str, bytes]:
    return {
        "cpusvn": body[0:16],
        "attributes": body[48:64],
        "mrenclave": body[64:96],
        "mrsigner": body[128:160],
        "isv_prod_id": body[256:258],
        "isv_svn": body[258:260],
        "report_data": body[320:384],
    }


def _p256_key(raw: bytes) -> ec.EllipticCurvePublicKey:
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw)
    except ValueError:
        raise EvidenceError("SGX quote attestation key is not a point on P-256") from None


class SgxDcapVerifier:
    """Checks SGX DCAP v3 quotes with their embedded PCK chain (see the module docstring)."""

    kind = "sgx-dcap"

    def __init__(
        self,
        pinned_roots: Collection[str] | None = None,
        qe_mrsigners: Collection[str] | None = None,
    ) -> None:
        self.pinned_roots = (
            frozenset(f.lower() for f in pinned_roots) if pinned_roots else frozenset({INTEL_SGX_ROOT_CA_SHA256})
        )
        self.qe_mrsigners = (
            frozenset(m.lower() for m in qe_mrsigners) if qe_mrsigners else frozenset({INTEL_QE_MRSIGNER})
        )

    def verify(self, evidence: bytes, *, now: datetime) -> Claims:
        check_size(evidence, "SGX")
        quote = bytes(evidence)
        reader = _Reader(quote)
        header = reader.take(HEADER_SIZE, "header")
        version, key_type, tee_type = struct.unpack_from("<HHI", header, 0)
        qe_svn, pce_svn = struct.unpack_from("<HH", header, 8)
        if version != 3:
            raise EvidenceError(f"SGX quote version {version} is not supported (version 3 is)")
        if key_type != ATTESTATION_KEY_ECDSA_P256:
            raise EvidenceError(f"SGX quote attestation key type {key_type} is not ECDSA P-256 (2)")
        if tee_type != TEE_TYPE_SGX:
            raise EvidenceError(f"SGX quote TEE type {tee_type:#x} is not SGX (0)")
        isv_report = reader.take(REPORT_SIZE, "enclave report")
        signature_size = reader.u32("signature data length")
        if signature_size != len(quote) - reader.offset:
            raise EvidenceError(
                f"SGX quote signature data length is {signature_size} but {len(quote) - reader.offset} bytes follow"
            )
        isv_signature = reader.take(64, "enclave report signature")
        attestation_key = reader.take(64, "attestation key")
        qe_report = reader.take(REPORT_SIZE, "QE report")
        qe_signature = reader.take(64, "QE report signature")
        qe_auth = reader.take(reader.u16("QE auth data size"), "QE auth data")
        cert_type = reader.u16("certification data type")
        cert_data = reader.take(reader.u32("certification data size"), "certification data")
        if reader.offset != len(quote):
            raise EvidenceError(f"SGX quote has {len(quote) - reader.offset} unexpected trailing bytes")
        if cert_type != CERT_DATA_PCK_CHAIN:
            raise EvidenceError(
                f"SGX quote certification data type is {cert_type}; only 5 (PCK certificate chain inside the quote) "
                "is supported"
            )

        verify_ecdsa(
            _p256_key(attestation_key),
            raw_to_der(isv_signature[:32], isv_signature[32:]),
            header + isv_report,
            hashes.SHA256(),
            "SGX quote (attestation key over header and enclave report)",
        )
        chain = load_pem_chain(cert_data.rstrip(b"\x00"), "SGX PCK certificate chain")
        if len(chain) != 3:
            raise EvidenceError(f"SGX PCK certificate chain has {len(chain)} certificates, expected 3 (PCK, CA, root)")
        verify_ecdsa(
            chain[0].public_key(),
            raw_to_der(qe_signature[:32], qe_signature[32:]),
            qe_report,
            hashes.SHA256(),
            "SGX QE report (PCK key over the Quoting Enclave's report)",
        )
        qe_fields = _report_fields(qe_report)
        expected = hashlib.sha256(attestation_key + qe_auth).digest() + bytes(32)
        if qe_fields["report_data"] != expected:
            raise EvidenceError("SGX QE report does not vouch for this attestation key (QE report data mismatch)")
        verify_chain(chain, now=now, pinned_roots=self.pinned_roots, what="SGX PCK")
        if qe_fields["mrsigner"].hex() not in self.qe_mrsigners:
            raise EvidenceError(
                f"SGX QE report comes from an enclave signed by {qe_fields['mrsigner'].hex()}, "
                "not Intel's Quoting Enclave"
            )
        if int.from_bytes(qe_fields["attributes"][:8], "little") & ATTRIBUTE_DEBUG:
            raise EvidenceError("SGX Quoting Enclave runs in debug mode; its signatures prove nothing")

        fields = _report_fields(isv_report)
        flags = int.from_bytes(fields["attributes"][:8], "little")
        return Claims(
            kind=self.kind,
            measurements={"mrenclave": fields["mrenclave"].hex(), "mrsigner": fields["mrsigner"].hex()},
            report_data=fields["report_data"],
            debug=bool(flags & ATTRIBUTE_DEBUG),
            identity=spki_fingerprint(chain[0]),
            details={
                "isv_prod_id": str(int.from_bytes(fields["isv_prod_id"], "little")),
                "isv_svn": str(int.from_bytes(fields["isv_svn"], "little")),
                "attributes": fields["attributes"].hex(),
                "cpusvn": fields["cpusvn"].hex(),
                "qe_svn": str(qe_svn),
                "pce_svn": str(pce_svn),
                "qe_mrsigner": qe_fields["mrsigner"].hex(),
                "root_sha256": fingerprint(chain[-1]),
                "tcb_status": "not checked (TCB info, QE identity and CRLs need Intel PCS collateral)",
            },
        )
