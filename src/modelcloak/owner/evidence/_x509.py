"""Certificate chains and signature helpers shared by the hardware evidence verifiers.

Every chain is walked leaf -> root: each certificate must be inside its validity at the
verifier's `now`, be signed by the next one (`verify_directly_issued_by`: issuer name and
signature, RSA-PKCS1, RSA-PSS and ECDSA alike), and every issuer must be a CA. The last one must
be self-signed and its SHA-256 fingerprint (of the DER certificate) must be one of the pinned
roots: a chain that verifies perfectly up to any other root is refused. Revocation lists and the
vendors' TCB collateral are not fetched (the verifiers run offline); see docs/EVIDENCE.md.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Collection, Sequence
from datetime import datetime, timezone
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from modelcloak.owner.evidence.base import EvidenceError

MAX_EVIDENCE_BYTES = 64 * 1024  # real documents are 1-10 KB; refuse anything that could be a memory attack


def utc(now: datetime) -> datetime:
    """`now` as an aware UTC datetime (a naive one is taken to be UTC already)."""
    if now.tzinfo is None:
        return now.replace(tzinfo=timezone.utc)
    return now.astimezone(timezone.utc)


def check_size(evidence: bytes, what: str) -> None:
    if not isinstance(evidence, (bytes, bytearray)):
        raise EvidenceError(f"{what} evidence must be bytes, got {type(evidence).__name__}")
    if not evidence:
        raise EvidenceError(f"{what} evidence is empty")
    if len(evidence) > MAX_EVIDENCE_BYTES:
        raise EvidenceError(f"{what} evidence is {len(evidence)} bytes, more than the {MAX_EVIDENCE_BYTES} allowed")


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, lowercase hex (what `openssl x509 -fingerprint -sha256` prints)."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def spki_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER SubjectPublicKeyInfo, lowercase hex."""
    der = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _parse_fully(cert: x509.Certificate, what: str) -> x509.Certificate:
    """Touch every part the verifiers use now: `cryptography` parses lazily and would otherwise
    raise one of several exception types (ValueError, UnsupportedAlgorithm, InvalidVersion, ...)
    deep inside a check on a damaged certificate."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cert.version  # noqa: B018
            cert.public_key()
            cert.subject  # noqa: B018
            cert.issuer  # noqa: B018
            cert.not_valid_before_utc  # noqa: B018
            cert.not_valid_after_utc  # noqa: B018
            for _extension in cert.extensions:
                pass
    except Exception as exc:  # any failure here means a damaged or unsupported certificate
        raise EvidenceError(f"{what} cannot be parsed ({type(exc).__name__}: {exc})"[:300]) from None
    return cert


def load_der(der: Any, what: str) -> x509.Certificate:
    if not isinstance(der, (bytes, bytearray)):
        raise EvidenceError(f"{what} is not a DER certificate")
    try:
        with warnings.catch_warnings():
            # AMD's VCEK certificates carry serial number 0, which RFC 5280 disallows; they are still AMD's.
            warnings.simplefilter("ignore")
            cert = x509.load_der_x509_certificate(bytes(der))
    except (ValueError, x509.InvalidVersion):
        raise EvidenceError(f"{what} is not a parseable DER certificate") from None
    return _parse_fully(cert, what)


def load_pem_chain(pem: bytes, what: str) -> list[x509.Certificate]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            chain = x509.load_pem_x509_certificates(pem)
    except (ValueError, x509.InvalidVersion):
        raise EvidenceError(f"{what} is not a parseable PEM certificate chain") from None
    return [_parse_fully(cert, what) for cert in chain]


def _name(cert: x509.Certificate) -> str:
    try:
        common = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        if common:
            return str(common[0].value)
        return cert.subject.rfc4514_string() or "(no subject)"
    except ValueError:
        return "(unreadable subject)"


def check_validity(cert: x509.Certificate, now: datetime, what: str) -> None:
    moment = utc(now)
    if moment < cert.not_valid_before_utc:
        raise EvidenceError(
            f"{what} certificate {_name(cert)!r} is not valid yet at {moment.isoformat()} "
            f"(valid from {cert.not_valid_before_utc.isoformat()})"
        )
    if moment > cert.not_valid_after_utc:
        raise EvidenceError(
            f"{what} certificate {_name(cert)!r} expired at {cert.not_valid_after_utc.isoformat()} "
            f"(checked at {moment.isoformat()})"
        )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def verify_chain(
    chain: Sequence[x509.Certificate],
    *,
    now: datetime,
    pinned_roots: Collection[str],
    what: str,
) -> None:
    """Check `chain` (leaf first, root last) as described in the module docstring; EvidenceError if not."""
    if len(chain) < 2:
        raise EvidenceError(f"{what} certificate chain has {len(chain)} certificate(s); a leaf and a root are needed")
    for cert in chain:
        check_validity(cert, now, what)
    for child, issuer in zip(chain[:-1], chain[1:]):
        if not _is_ca(issuer):
            raise EvidenceError(f"{what} certificate {_name(issuer)!r} signs another certificate but is not a CA")
        try:
            child.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            raise EvidenceError(
                f"{what} certificate {_name(child)!r} is not signed by {_name(issuer)!r} (forged or altered)"
            ) from None
    root = chain[-1]
    try:
        root.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        raise EvidenceError(f"{what} root certificate {_name(root)!r} is not validly self-signed") from None
    if fingerprint(root) not in pinned_roots:
        raise EvidenceError(
            f"{what} chain ends at {_name(root)!r} (sha256 {fingerprint(root)}), which is not a pinned root"
        )


def verify_ecdsa(
    public_key: Any,
    signature_der: bytes,
    data: bytes,
    hash_algorithm: hashes.HashAlgorithm,
    what: str,
) -> None:
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise EvidenceError(f"{what}: the signing key is not an elliptic-curve key")
    try:
        public_key.verify(signature_der, data, ec.ECDSA(hash_algorithm))
    except InvalidSignature:
        raise EvidenceError(f"{what}: the signature does not verify (forged or altered evidence)") from None


def raw_to_der(r: bytes, s: bytes, *, byteorder: str = "big") -> bytes:
    """An ECDSA signature given as its two integers' bytes, as DER."""
    return encode_dss_signature(int.from_bytes(r, byteorder), int.from_bytes(s, byteorder))  # type: ignore[arg-type]
