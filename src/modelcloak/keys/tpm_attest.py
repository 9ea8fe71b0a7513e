"""TPM 2.0 attestation: this machine's attestation key (AK) and quotes over its PCRs.

The AK is a primary key of the TPM's endorsement hierarchy made from a fixed template (ECC P-256,
ECDSA-SHA256, restricted signing, fixedTPM, no dictionary-attack lockout, empty auth). The TPM
derives a primary key from its endorsement seed and the template, so the same TPM re-creates the
same AK on every call and nothing is stored on disk; TPM2_Clear changes only the owner seed and
leaves the AK as it was. Restricted means the TPM signs with it only data the TPM itself produced
(quotes, certifications: structures starting with TPM_GENERATED_VALUE); a device operator cannot
make it sign a forged quote.

Enrolment: the owner records `attestation_identity().public_key_der` (or its fingerprint) for the
device while the owner still trusts the machine (at provisioning). From then on a quote verifies
only with that key. Binding the AK to the TPM's endorsement key certificate (credential activation)
is not done here; see docs/EVIDENCE.md.

Evidence bytes (what `quote` returns and `modelcloak.owner.evidence.tpm_quote` reads) are a CBOR
map, format "modelcloak-tpm-quote/v1":

    "format":    "modelcloak-tpm-quote/v1"
    "attest":    bytes, the TPMS_ATTEST structure the TPM signed (TPM byte order)
    "signature": bytes, the AK's ECDSA-P256-SHA256 signature over "attest", DER (X9.62)
    "pcr_bank":  "sha256"
    "pcrs":      map int -> bytes, the PCR values the quote covers, read right after the quote
    "ak":        bytes, the AK public key, DER SubjectPublicKeyInfo

The qualifying data (TPMS_ATTEST.extraData) is what the caller passes: for key release,
`binding_digest(nonce, ephemeral_public_key)`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from modelcloak.keys.errors import KeyProviderError
from modelcloak.keys.tpm import PCR_BANK, default_tcti, esapi, flush, pcr_selection, pytss, read_pcrs

__all__ = [
    "AK_TEMPLATE",
    "DEFAULT_QUOTE_PCRS",
    "EVIDENCE_FORMAT",
    "AttestationIdentity",
    "TpmAttester",
    "ak_fingerprint",
    "attestation_identity",
    "quote",
]

EVIDENCE_FORMAT = "modelcloak-tpm-quote/v1"
# Named so that a later template change can be told apart from a different TPM.
AK_TEMPLATE = "ecc-p256-ecdsa-sha256-restricted-ek-primary/v1"
# Firmware code, firmware config, option ROMs, their config, bootloader, bootloader config, Secure Boot policy.
DEFAULT_QUOTE_PCRS: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 7)
MAX_QUALIFYING_DATA = 64  # TPM2B_DATA holds at most a TPMT_HA: 2 + 64 bytes on sha512 TPMs; keep to 64


@dataclass(frozen=True)
class AttestationIdentity:
    """The public half of this TPM's attestation key: what the owner enrols for the device."""

    public_key_der: bytes  # DER SubjectPublicKeyInfo
    fingerprint: str  # sha256 of public_key_der, lowercase hex (== Claims.identity of its quotes)
    template: str = AK_TEMPLATE


def ak_fingerprint(public_key_der: bytes) -> str:
    """The hex SHA-256 of an AK's DER SubjectPublicKeyInfo; the verifier reports the same value."""
    return hashlib.sha256(public_key_der).hexdigest()


def _ak_template(tss: ModuleType) -> Any:
    a = tss.TPMA_OBJECT
    template = tss.TPM2B_PUBLIC.parse(
        "ecc256:ecdsa-sha256",
        objectAttributes=a.RESTRICTED
        | a.SIGN_ENCRYPT
        | a.FIXEDTPM
        | a.FIXEDPARENT
        | a.SENSITIVEDATAORIGIN
        | a.USERWITHAUTH
        | a.NODA,
    )
    # A signing key has no symmetric algorithm; the parser's default (AES for restricted keys) is refused.
    template.publicArea.parameters.eccDetail.symmetric.algorithm = tss.TPM2_ALG.NULL
    return template


def _create_ak(tss: ModuleType, ectx: Any) -> tuple[Any, bytes]:
    """Create (re-create) the AK; returns its handle and its DER public key."""
    try:
        handle, public, _, _, _ = ectx.create_primary(
            tss.TPM2B_SENSITIVE_CREATE(), _ak_template(tss), primary_handle=tss.ESYS_TR.ENDORSEMENT
        )
    except tss.TSS2_Exception as exc:
        if exc.error in (tss.TPM2_RC.BAD_AUTH, tss.TPM2_RC.AUTH_FAIL):
            raise KeyProviderError(
                "the TPM's endorsement hierarchy has a password; modelcloak needs to create its attestation "
                "key there with empty endorsement authorisation"
            ) from None
        raise KeyProviderError(f"the TPM refused to create its attestation key ({exc})") from None
    return handle, public.publicArea.to_der()


def attestation_identity(*, tcti: str | None = None) -> AttestationIdentity:
    """This TPM's attestation key, public part only (no state is written)."""
    tss = pytss()
    with esapi(tcti or default_tcti()) as ectx:
        handle, public_der = _create_ak(tss, ectx)
        flush(ectx, handle)
    return AttestationIdentity(public_key_der=public_der, fingerprint=ak_fingerprint(public_der))


def _check_pcrs(pcrs: Sequence[int]) -> list[int]:
    selected = sorted(set(pcrs))
    if not selected:
        raise KeyProviderError("a TPM quote needs at least one PCR")
    bad = [p for p in selected if not isinstance(p, int) or not 0 <= p <= 23]
    if bad:
        raise KeyProviderError(f"PCR indices must be 0..23, got {bad}")
    return selected


def quote(
    qualifying_data: bytes,
    pcrs: Sequence[int] = DEFAULT_QUOTE_PCRS,
    *,
    tcti: str | None = None,
) -> bytes:
    """A TPM2_Quote by the AK over `pcrs` (sha256 bank) with `qualifying_data`, as evidence bytes.

    The PCRs are read again right after the quote; if something extended one in between, the
    verifier refuses the evidence (the values do not match the signed digest) and the caller retries.
    """
    import cbor2

    if not isinstance(qualifying_data, bytes) or not 1 <= len(qualifying_data) <= MAX_QUALIFYING_DATA:
        raise KeyProviderError(f"qualifying data must be 1..{MAX_QUALIFYING_DATA} bytes")
    selected = _check_pcrs(pcrs)
    tss = pytss()
    with esapi(tcti or default_tcti()) as ectx:
        handle, public_der = _create_ak(tss, ectx)
        try:
            try:
                attest, signature = ectx.quote(handle, pcr_selection(tss, selected), tss.TPM2B_DATA(qualifying_data))
                values = read_pcrs(tss, ectx, selected)
            except tss.TSS2_Exception as exc:
                raise KeyProviderError(f"the TPM refused to quote {PCR_BANK} PCRs {selected} ({exc})") from None
        finally:
            flush(ectx, handle)
    if signature.sigAlg != tss.TPM2_ALG.ECDSA:
        raise KeyProviderError(f"the TPM signed the quote with {signature.sigAlg}, expected ECDSA")
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    ecdsa = signature.signature.ecdsa
    der_signature = encode_dss_signature(
        int.from_bytes(bytes(ecdsa.signatureR), "big"), int.from_bytes(bytes(ecdsa.signatureS), "big")
    )
    evidence = {
        "format": EVIDENCE_FORMAT,
        "attest": attest.marshal()[2:],  # drop TPM2B_ATTEST's size prefix: the TPM signs the bare structure
        "signature": der_signature,
        "pcr_bank": PCR_BANK,
        "pcrs": {int(index): bytes.fromhex(value) for index, value in values.items()},
        "ak": public_der,
    }
    return cbor2.dumps(evidence, canonical=True)


class TpmAttester:
    """Evidence for the owner backend's key release (`modelcloak.licensing.client.Attester`): TPM quotes.

    The owner enrols the device with kind "tpm", identity = `attestation_identity().fingerprint`
    and the expected PCR values as measurements ({"pcr7": hex, ...}).
    """

    kind = "tpm"

    def __init__(self, pcrs: Sequence[int] = DEFAULT_QUOTE_PCRS, *, tcti: str | None = None) -> None:
        self.pcrs = tuple(_check_pcrs(pcrs))
        self.tcti = tcti

    def evidence(self, report_data: bytes) -> bytes:
        return quote(report_data, self.pcrs, tcti=self.tcti)
