"""The chunk AEAD of the bundle format (docs/FORMAT.md): keys, nonces, encrypt and decrypt, owned by the trusted side.

They live here, not in `modelcloak.bundle`, because the enclave must open its own section without
importing host code; the host's bundle room imports these same functions, so there is one
implementation of the format's cryptography.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

TAG_SIZE = 16
KEY_SIZE = 32
_NONCE_PREFIX = b"\x00\x00\x00\x00"
_AD_LAYOUT = struct.Struct(">32sIQB")  # manifest digest, section index, chunk index, final flag


class ChunkAuthenticationError(Exception):
    """A chunk failed AEAD authentication; carries where, so callers can say so."""

    def __init__(self, section: str, index: int, total: int) -> None:
        super().__init__(
            f"section {section!r} chunk {index} of {total} failed authentication "
            "(bytes modified, reordered, truncated or spliced from another bundle)"
        )
        self.section, self.index, self.total = section, index, total


def derive(master_key: bytes | memoryview, salt: bytes, label: str, length: int = KEY_SIZE) -> bytes:
    """HKDF-SHA256 of the master key for one purpose (`label`) within one bundle (`salt`)."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=b"modelcloak/v1/" + label.encode())
    return hkdf.derive(bytes(master_key))


def chunk_count(size: int, chunk_size: int) -> int:
    """Number of chunks for a section; an empty section still has one (empty, final) chunk."""
    return max(1, -(-size // chunk_size))


def ciphertext_size(size: int, chunk_size: int) -> int:
    return size + chunk_count(size, chunk_size) * TAG_SIZE


def nonce(chunk_index: int) -> bytes:
    return _NONCE_PREFIX + struct.pack(">Q", chunk_index)


def associated_data(manifest_digest: bytes, section_index: int, chunk_index: int, final: bool) -> bytes:
    return _AD_LAYOUT.pack(manifest_digest, section_index, chunk_index, 1 if final else 0)


def decrypt_section_into(
    section_key: bytes,
    manifest_digest: bytes,
    section_index: int,
    section_name: str,
    read_ciphertext: Callable[[int, memoryview], None],
    out: memoryview,
    chunk_size: int,
) -> None:
    """Decrypt a whole section into `out` (exactly the plaintext size), chunk by chunk, in place.

    `read_ciphertext(offset, destination)` fills `destination` with the section's ciphertext from
    `offset`; reading through one reused chunk buffer keeps the ciphertext out of resident memory.
    """
    aead = AESGCM(section_key)
    size = len(out)
    total = chunk_count(size, chunk_size)
    sealed_buffer = bytearray(min(size, chunk_size) + TAG_SIZE)
    for index in range(total):
        start = index * chunk_size
        plain_len = min(chunk_size, size - start)
        sealed = memoryview(sealed_buffer)[: plain_len + TAG_SIZE]
        read_ciphertext(index * (chunk_size + TAG_SIZE), sealed)
        ad = associated_data(manifest_digest, section_index, index, index == total - 1)
        try:
            aead.decrypt_into(nonce(index), sealed, ad, out[start : start + plain_len])
        except InvalidTag:
            raise ChunkAuthenticationError(section_name, index, total) from None
