"""The wire formats shared by the backend and the device: key-release HPKE parameters, usage MACs.

Kept free of the server's dependencies (SQLAlchemy, FastAPI) so a device importing the client
needs only `cryptography` and `httpx`. docs/OWNER.md describes these byte for byte.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.hazmat.primitives import hpke

from modelcloak.licensing.errors import OwnerError

MODEL_KEY_SIZE = 32
USAGE_KEY_SIZE = 32
NONCE_SIZE = 32
# The release payload is HPKE base mode, X25519 / HKDF-SHA256 / AES-256-GCM (RFC 9180).
HPKE_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
RELEASE_INFO_LABEL = b"modelcloak key-release v1\x00"
USAGE_MAC_LABEL = b"modelcloak usage v1\x00"
FHE_MAC_LABEL = b"modelcloak fhe-labels v1\x00"
MAX_SEQUENCE = 2**62
MAX_BATCH_QUERIES = 2**40
BINDING_LABEL = b"modelcloak key-release v1\x00"


def binding_digest(nonce: bytes, ephemeral_public_key: bytes) -> bytes:
    """The 32 bytes a runtime puts into its evidence to bind a server nonce and its fresh key."""
    return hashlib.sha256(BINDING_LABEL + nonce + hashlib.sha256(ephemeral_public_key).digest()).digest()


class RequestRefused(OwnerError):
    """A request the backend will not honour; `status` is the HTTP status the API answers with."""

    def __init__(self, reason: str, status: int = 403) -> None:
        super().__init__(reason)
        self.status = status
        self.audited = False  # set once the backend has queued an audit entry for this refusal


def release_info(licence_id: str, nonce: bytes) -> bytes:
    """HPKE `info`: binds the wrapped key to this licence and this nonce."""
    return RELEASE_INFO_LABEL + licence_id.encode() + b"\x00" + nonce


def usage_mac_input(licence_id: str, reporter_id: str, sequence: int, queries: int) -> bytes:
    """The bytes a usage batch's HMAC-SHA256 covers (lengths are 2-byte big-endian, counts 8-byte)."""
    lic, rep = licence_id.encode(), reporter_id.encode()
    return (
        USAGE_MAC_LABEL
        + struct.pack(">H", len(lic))
        + lic
        + struct.pack(">H", len(rep))
        + rep
        + struct.pack(">QQ", sequence, queries)
    )


def usage_mac(usage_key: bytes, licence_id: str, reporter_id: str, sequence: int, queries: int) -> bytes:
    return hmac.new(usage_key, usage_mac_input(licence_id, reporter_id, sequence, queries), hashlib.sha256).digest()


# The one answer (HTTP 422) to every refused FHE result, whatever the cause; the refusal is counted.
FHE_RESULT_REFUSED = "encrypted result refused; the request is counted against the licence's quota"


def fhe_request_mac(
    usage_key: bytes, licence_id: str, reporter_id: str, sequence: int, queries: int, result: bytes
) -> bytes:
    """A decryption request is a usage batch that also names its ciphertext: the MAC covers
    FHE_MAC_LABEL, the usage batch's bytes and SHA-256 of the result envelope, so a result swapped
    in transit, or replayed under another batch, does not verify."""
    covered = FHE_MAC_LABEL + usage_mac_input(licence_id, reporter_id, sequence, queries)
    return hmac.new(usage_key, covered + hashlib.sha256(result).digest(), hashlib.sha256).digest()
