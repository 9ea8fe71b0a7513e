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

from collections.abc import Callable, Iterable, Iterator

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from modelcloak.bundle.errors import TamperedError
from modelcloak.enclave import chunks
from modelcloak.enclave.chunks import KEY_SIZE, TAG_SIZE, chunk_count, ciphertext_size, derive

__all__ = [
    "KEY_SIZE",
    "TAG_SIZE",
    "chunk_count",
    "ciphertext_size",
    "decrypt_section_into",
    "derive",
    "encrypt_section",
]


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
        ad = chunks.associated_data(manifest_digest, section_index, index, index == total - 1)
        yield aead.encrypt(chunks.nonce(index), bytes(chunk) if isinstance(chunk, memoryview) else chunk, ad)
    if size == 0:
        yield aead.encrypt(chunks.nonce(0), b"", chunks.associated_data(manifest_digest, section_index, 0, True))
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
    """The enclave's chunk decryption, with failures reported as the bundle room's TamperedError."""
    try:
        chunks.decrypt_section_into(
            section_key, manifest_digest, section_index, section_name, read_ciphertext, out, chunk_size
        )
    except chunks.ChunkAuthenticationError as exc:
        raise TamperedError(str(exc)) from None
