"""AMD SEV-SNP attestation reports (kind "sev-snp"), verified offline against AMD's pinned roots.

Evidence is a CBOR map, format "modelcloak-sev-snp/v1":

    "format": "modelcloak-sev-snp/v1"
    "report": bytes, the 1184-byte ATTESTATION_REPORT from the guest's SNP_GET_REPORT
    "certs":  [VCEK, ASK, ARK] as DER certificates (from AMD's KDS, or the host's extended report)

The report layout is AMD's "SEV Secure Nested Paging Firmware ABI Specification" (56860),
table "ATTESTATION_REPORT Structure"; report versions 2 and 3 (Milan and Genoa) are read.

Checked:
- signature_algo is 1 (ECDSA P-384 with SHA-384) and the report was signed by a VCEK
  (key selection 0 in bits 4:2 of the key-info word; VLEK-signed reports are refused);
- the signature at 0x2A0 (r and s, 72 bytes each, little-endian) verifies over bytes 0..0x29F with
  the VCEK certificate's key;
- the VCEK certificate is for this chip and this TCB: its hwID extension equals CHIP_ID and its
  bootloader/TEE/SNP/microcode SPL extensions equal REPORTED_TCB (a VCEK is per chip and per TCB);
- VCEK -> ASK -> ARK: each inside its validity at `now`, RSA-PSS signatures, the ARK self-signed
  and pinned by SHA-256 fingerprint (default: AMD ARK-Milan
  69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd and ARK-Genoa
  4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1; `pinned_arks` replaces them,
  e.g. to add Turin, whose report layout for the TCB also differs and is not read here).

Not checked: AMD's CRLs and whether REPORTED_TCB is current enough (a TCB policy); VLEK chains;
the ID block / author key (the policy can compare id_key_digest from details).

Returned claims: measurements {"measurement": launch digest, "host_data": ...}; report_data = the
64-byte REPORT_DATA (binding_digest(...) in its first 32 bytes); debug = guest policy bit 19
(DEBUG allowed: the hypervisor can read and write guest memory); identity = CHIP_ID (hex).
"""

from __future__ import annotations

import struct
from collections.abc import Collection
from datetime import datetime
from typing import Any

from cryptography import x509
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

__all__ = [
    "AMD_ARK_GENOA_SHA256",
    "AMD_ARK_MILAN_SHA256",
    "EVIDENCE_FORMAT",
    "REPORT_SIZE",
    "SevSnpVerifier",
    "parse_report",
]

EVIDENCE_FORMAT = "modelcloak-sev-snp/v1"
AMD_ARK_MILAN_SHA256 = "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd"
AMD_ARK_GENOA_SHA256 = "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1"
REPORT_SIZE = 0x4A0  # 1184
SIGNED_SIZE = 0x2A0
POLICY_DEBUG_BIT = 19
# AMD's VCEK certificate extensions (KDS specification 57230).
_OID_BL_SPL = "1.3.6.1.4.1.3704.1.3.1"
_OID_TEE_SPL = "1.3.6.1.4.1.3704.1.3.2"
_OID_SNP_SPL = "1.3.6.1.4.1.3704.1.3.3"
_OID_UCODE_SPL = "1.3.6.1.4.1.3704.1.3.8"
_OID_HWID = "1.3.6.1.4.1.3704.1.4"


def parse_report(report: bytes) -> dict[str, Any]:
    """The fields of an SNP ATTESTATION_REPORT (versions 2 and 3) the verifier uses."""
    if len(report) != REPORT_SIZE:
        raise EvidenceError(f"SEV-SNP report is {len(report)} bytes, expected {REPORT_SIZE}")
    version, guest_svn, policy = struct.unpack_from("<IIQ", report, 0x00)
    if version not in (2, 3):
        raise EvidenceError(f"SEV-SNP report version {version} is not supported (2 and 3 are)")
    vmpl, signature_algo = struct.unpack_from("<II", report, 0x30)
    (key_info,) = struct.unpack_from("<I", report, 0x48)
    return {
        "version": version,
        "guest_svn": guest_svn,
        "policy": policy,
        "family_id": report[0x10:0x20],
        "image_id": report[0x20:0x30],
        "vmpl": vmpl,
        "signature_algo": signature_algo,
        "signing_key": (key_info >> 2) & 0x7,
        "report_data": report[0x50:0x90],
        "measurement": report[0x90:0xC0],
        "host_data": report[0xC0:0xE0],
        "id_key_digest": report[0xE0:0x110],
        "author_key_digest": report[0x110:0x140],
        "reported_tcb": report[0x180:0x188],
        "chip_id": report[0x1A0:0x1E0],
        "signature_r": report[0x2A0:0x2E8],
        "signature_s": report[0x2E8:0x330],
    }


def _der_content(value: bytes, tag: int, what: str) -> bytes:
    """The content of one short DER element (INTEGER or OCTET STRING) of an extension value."""
    if len(value) < 2 or value[0] != tag:
        raise EvidenceError(f"SEV-SNP VCEK extension {what} is not encoded as expected")
    length, start = value[1], 2
    if length & 0x80:
        count = length & 0x7F
        length, start = int.from_bytes(value[2 : 2 + count], "big"), 2 + count
    content = value[start : start + length]
    if len(content) != length:
        raise EvidenceError(f"SEV-SNP VCEK extension {what} is truncated")
    return content


def _extension(cert: x509.Certificate, oid: str) -> bytes:
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid))
    except x509.ExtensionNotFound:
        raise EvidenceError(f"SEV-SNP VCEK certificate lacks AMD extension {oid}") from None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise EvidenceError(f"SEV-SNP VCEK extension {oid} has an unexpected type")
    return value.value


def _check_vcek_matches(vcek: x509.Certificate, fields: dict[str, Any]) -> None:
    hwid = _extension(vcek, _OID_HWID)  # AMD stores the 64 raw bytes as the extension value, no inner DER
    if hwid != fields["chip_id"]:
        raise EvidenceError("SEV-SNP VCEK certificate belongs to another chip (hwID differs from the report's CHIP_ID)")
    tcb = fields["reported_tcb"]
    # Milan/Genoa TCB_VERSION: byte 0 bootloader, 1 TEE, 6 SNP firmware, 7 microcode.
    expected = {_OID_BL_SPL: tcb[0], _OID_TEE_SPL: tcb[1], _OID_SNP_SPL: tcb[6], _OID_UCODE_SPL: tcb[7]}
    for oid, value in expected.items():
        spl = int.from_bytes(_der_content(_extension(vcek, oid), 0x02, oid), "big")
        if spl != value:
            raise EvidenceError(
                f"SEV-SNP VCEK certificate is for another TCB (extension {oid} is {spl}, the report says {value})"
            )


class SevSnpVerifier:
    """Checks SEV-SNP reports with their VCEK chain (see the module docstring)."""

    kind = "sev-snp"

    def __init__(self, pinned_arks: Collection[str] | None = None) -> None:
        self.pinned_arks = (
            frozenset(f.lower() for f in pinned_arks)
            if pinned_arks
            else frozenset({AMD_ARK_MILAN_SHA256, AMD_ARK_GENOA_SHA256})
        )

    def verify(self, evidence: bytes, *, now: datetime) -> Claims:
        import cbor2

        check_size(evidence, "SEV-SNP")
        try:
            document = cbor2.loads(bytes(evidence))
        except Exception:  # cbor2 raises several types for malformed input; all mean the same here
            raise EvidenceError("SEV-SNP evidence is not valid CBOR") from None
        if not isinstance(document, dict) or document.get("format") != EVIDENCE_FORMAT:
            raise EvidenceError(f"SEV-SNP evidence is not a CBOR map of format {EVIDENCE_FORMAT!r}")
        report, certs = document.get("report"), document.get("certs")
        if not isinstance(report, bytes):
            raise EvidenceError("SEV-SNP evidence field 'report' is missing or not bytes")
        if not isinstance(certs, list) or len(certs) != 3:
            raise EvidenceError("SEV-SNP evidence field 'certs' must be [VCEK, ASK, ARK]")
        chain = [load_der(der, f"SEV-SNP {name} certificate") for der, name in zip(certs, ("VCEK", "ASK", "ARK"))]
        fields = parse_report(report)
        if fields["signature_algo"] != 1:
            raise EvidenceError(f"SEV-SNP report signature algorithm {fields['signature_algo']} is not ECDSA P-384 (1)")
        if fields["signing_key"] != 0:
            raise EvidenceError(
                "SEV-SNP report is not signed by a VCEK (VLEK or no key); only VCEK chains are supported"
            )

        verify_ecdsa(
            chain[0].public_key(),
            raw_to_der(fields["signature_r"], fields["signature_s"], byteorder="little"),
            report[:SIGNED_SIZE],
            hashes.SHA384(),
            "SEV-SNP report",
        )
        verify_chain(chain, now=now, pinned_roots=self.pinned_arks, what="SEV-SNP")
        _check_vcek_matches(chain[0], fields)

        policy = fields["policy"]
        return Claims(
            kind=self.kind,
            measurements={"measurement": fields["measurement"].hex(), "host_data": fields["host_data"].hex()},
            report_data=fields["report_data"],
            debug=bool(policy >> POLICY_DEBUG_BIT & 1),
            identity=fields["chip_id"].hex(),
            details={
                "version": str(fields["version"]),
                "policy": f"{policy:#x}",
                "vmpl": str(fields["vmpl"]),
                "guest_svn": str(fields["guest_svn"]),
                "reported_tcb": fields["reported_tcb"][::-1].hex(),
                "family_id": fields["family_id"].hex(),
                "image_id": fields["image_id"].hex(),
                "id_key_digest": fields["id_key_digest"].hex(),
                "ark_sha256": fingerprint(chain[2]),
                "tcb_policy": "not checked (reported TCB is returned, not judged)",
                "revocation": "not checked (offline)",
            },
        )
