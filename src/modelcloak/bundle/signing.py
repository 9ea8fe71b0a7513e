"""Owner signatures (Ed25519) over a bundle's header and every section's ciphertext.

The signature covers ciphertext digests, not just the manifest, because devices hold the
symmetric key: without that, any key holder could re-encrypt different weights under a
manifest the owner signed.

The digest depends on the bundle format version: SHA-256 in version 1, BLAKE3 in version 2
(about twice as fast here, and hashed beside the decryption, docs/FORMAT.md). Each version's signed
message starts with its own context string, which names the digest, so a signature made for one
version never verifies as the other.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import blake3
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from modelcloak.bundle.errors import BundleError, SignatureError
from modelcloak.bundle.manifest import SIGNATURE_DIGESTS

TRAILER_MAGIC = b"MCSG"
TRAILER_SIZE = len(TRAILER_MAGIC) + 32 + 64
_CONTEXTS = {1: b"modelcloak/v1/signature\x00", 2: b"modelcloak/v2/signature\x00BLAKE3\x00"}


def new_digest(format_version: int) -> Any:
    """A fresh hash object of the digest that bundles of `format_version` sign (hashlib-like API)."""
    name = SIGNATURE_DIGESTS.get(format_version)
    if name == "SHA-256":
        return hashlib.sha256()
    if name == "BLAKE3":
        return blake3.blake3()
    raise BundleError(f"bundle format version {format_version} has no signature digest")


def signed_message(header_digest: bytes, section_digests: Sequence[bytes], format_version: int = 1) -> bytes:
    """The bytes an owner signs: the version's context, the header's digest, each section's digest."""
    if format_version not in _CONTEXTS:
        raise BundleError(f"bundle format version {format_version} has no signature format")
    return _CONTEXTS[format_version] + header_digest + b"".join(section_digests)


def check_trailer_form(trailer: bytes, expected_public_key: bytes) -> None:
    """The cheap part of verification: a trailer of the right shape naming the manifest's signer."""
    if len(trailer) != TRAILER_SIZE or trailer[:4] != TRAILER_MAGIC:
        raise SignatureError("bundle says it is signed but its signature trailer is missing or damaged")
    if trailer[4:36] != expected_public_key:
        raise SignatureError("signature trailer names a different key than the manifest")


def make_trailer(signer: Ed25519PrivateKey, message: bytes) -> bytes:
    public = signer.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return TRAILER_MAGIC + public + signer.sign(message)


def verify_trailer(trailer: bytes, expected_public_key: bytes, message: bytes) -> None:
    check_trailer_form(trailer, expected_public_key)
    try:
        Ed25519PublicKey.from_public_bytes(expected_public_key).verify(trailer[36:], message)
    except InvalidSignature:
        raise SignatureError("owner signature is invalid: the bundle was modified after signing") from None


def fingerprint(public_key: bytes) -> str:
    """A short, stable name for a signing key, shown by `inspect` and accepted as a trust anchor."""
    return "ed25519:" + hashlib.sha256(public_key).hexdigest()[:32]


def generate_signing_key(private_path: Path, *, overwrite: bool = False) -> bytes:
    """Write a new Ed25519 private key (PEM, mode 0600) and its public key beside it (.pub); return the public key."""
    private_path = Path(private_path)
    public_path = private_path.with_suffix(private_path.suffix + ".pub")
    for path in (private_path, public_path):
        if path.exists() and not overwrite:
            raise BundleError(f"{path} already exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    fd = os.open(private_path, flags, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    public_path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return public


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"cannot read signing key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(source: Path | str | bytes) -> bytes:
    """Read a trusted signer from a PEM public key file (or take raw 32-byte key material)."""
    if isinstance(source, bytes) and len(source) == 32:
        return source
    if isinstance(source, bytes):
        raise SignatureError(f"a raw signer key is 32 bytes, got {len(source)}")
    try:
        data = Path(source).read_bytes()
        key = serialization.load_pem_public_key(data)
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"cannot read signer public key {source}: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{source} is not an Ed25519 public key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
