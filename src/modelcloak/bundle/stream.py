"""Chunked authenticated encryption of bundle sections (a STREAM construction).

Each section is split into fixed-size chunks, each sealed with AES-256-GCM. The associated data of
every chunk binds the manifest digest, the section index, the chunk index and a final-chunk flag,
so chunks cannot be reordered, dropped from the end, moved between sections or spliced in from
another bundle. Keys are derived per bundle (random salt) and per section with HKDF, which makes a
deterministic counter nonce safe: no (key, nonce) pair is ever used twice.

Decryption writes straight into a caller-owned buffer (`decrypt_into`), so a multi-GB section
never exists twice in plaintext.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from modelcloak.bundle.errors import TamperedError

TAG_SIZE = 16
KEY_SIZE = 32
_NONCE_PREFIX = b"\x00\x00\x00\x00"
_AD_LAYOUT = struct.Struct(">32sIQB")  # manifest digest, section index, chunk index, final flag


def derive(master_key: bytes | memoryview, salt: bytes, label: str, length: int = KEY_SIZE) -> bytes:
    """HKDF-SHA256 of the master key for one purpose (`label`) within one bundle (`salt`)."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=b"modelcloak/v1/" + label.encode())
    return hkdf.derive(bytes(master_key))


def chunk_count(size: int, chunk_size: int) -> int:
    """Number of chunks for a section; an empty section still has one (empty, final) chunk."""
    return max(1, -(-size // chunk_size))


def ciphertext_size(size: int, chunk_size: int) -> int:
    return size + chunk_count(size, chunk_size) * TAG_SIZE


def _nonce(chunk_index: int) -> bytes:
    return _NONCE_PREFIX + struct.pack(">Q", chunk_index)


def _associated_data(manifest_digest: bytes, section_index: int, chunk_index: int, final: bool) -> bytes:
    return _AD_LAYOUT.pack(manifest_digest, section_index, chunk_index, 1 if final else 0)


def _rechunk(pieces: Iterable[bytes | memoryview], chunk_size: int) -> Iterator[bytes | memoryview]:
    """Regroup arbitrary plaintext pieces into chunk_size blocks (the last may be shorter)."""
    pending = bytearray()
    for piece in pieces:
        view = memoryview(piece).cast("B")
        if not pending and len(view) >= chunk_size:
            whole = len(view) - len(view) % chunk_size
            for start in range(0, whole, chunk_size):
                yield view[start : start + chunk_size]
            view = view[whole:]
        while len(view):
            take = min(chunk_size - len(pending), len(view))
            pending += view[:take]
            view = view[take:]
            if len(pending) == chunk_size:
                yield bytes(pending)
                pending.clear()
    if pending:
        yield bytes(pending)


def encrypt_section(
    section_key: bytes,
    manifest_digest: bytes,
    section_index: int,
    size: int,
    pieces: Iterable[bytes | memoryview],
    chunk_size: int,
) -> Iterator[bytes]:
    """Yield the ciphertext chunks of a section whose plaintext arrives as `pieces` totalling `size`."""
    aead = AESGCM(section_key)
    total = chunk_count(size, chunk_size)
    produced = 0
    index = 0
    for index, chunk in enumerate(_rechunk(pieces, chunk_size)):
        produced += len(chunk)
        ad = _associated_data(manifest_digest, section_index, index, index == total - 1)
        yield aead.encrypt(_nonce(index), bytes(chunk) if isinstance(chunk, memoryview) else chunk, ad)
    if size == 0:
        yield aead.encrypt(_nonce(0), b"", _associated_data(manifest_digest, section_index, 0, True))
        return
    if produced != size or index != total - 1:
        raise ValueError(f"section plaintext was {produced} bytes, the manifest announced {size}")


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
        ad = _associated_data(manifest_digest, section_index, index, index == total - 1)
        try:
            aead.decrypt_into(_nonce(index), sealed, ad, out[start : start + plain_len])
        except InvalidTag:
            raise TamperedError(
                f"section {section_name!r} chunk {index} of {total} failed authentication "
                "(bytes modified, reordered, truncated or spliced from another bundle)"
            ) from None
