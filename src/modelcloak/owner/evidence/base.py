"""What every evidence verifier promises the key-release service.

A verifier only answers "is this evidence authentic, and what does it say?". It checks the
format's signature chain and returns the claims; it does NOT compare measurements with a licence
or check the key binding, because the service does that once for every format. Keeping the policy
out of the verifiers is what lets published sample documents (whose report data we do not choose)
verify in tests with an injected clock.

Key binding: the runtime puts `binding_digest(nonce, ephemeral_public_key)` into the format's
report-data field (SGX/SNP REPORTDATA, the TPM quote's qualifying data, the Nitro document's
nonce); the verifier returns that field as `Claims.report_data` and the service compares.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from modelcloak.owner.errors import OwnerError


class EvidenceError(OwnerError):
    """Evidence is malformed, forged, expired or from an unknown signer; the message says which."""


@dataclass(frozen=True)
class Claims:
    """What authentic evidence says about the runtime that produced it."""

    kind: str  # "sim", "tpm", "nitro", "sev-snp", "sgx-dcap"
    measurements: dict[str, str]  # name -> lowercase hex, e.g. {"mrenclave": ...} or {"pcr0": ...}
    report_data: bytes  # the field that carries binding_digest(...) (may be longer; compare a prefix)
    debug: bool  # a debuggable enclave/VM: its memory is readable by the host
    insecure: bool = False  # True only for the development "sim" verifier
    identity: str | None = None  # hex fingerprint of the attesting key/chip, where the format has one
    details: dict[str, str] = field(default_factory=dict)  # format-specific extras for the audit log


class Verifier(Protocol):
    """One evidence format."""

    kind: str

    def verify(self, evidence: bytes, *, now: datetime) -> Claims:
        """Check authenticity at time `now` (certificate validity) and return the claims.

        Raises EvidenceError with a one-line reason for anything not authentic or not parseable.
        """
        ...
