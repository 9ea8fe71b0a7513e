"""The bundle manifest: what a bundle holds, readable without the key.

The manifest is canonical JSON (sorted keys, no spaces) so the bytes that are authenticated and
signed are exactly the bytes that are parsed. Parsing is strict: every field is type-checked and
bounded, because the manifest is read before anything is authenticated and may be hostile.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from typing import Any

from modelcloak.bundle.errors import ManifestError

MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_SECTIONS = 64
MIN_CHUNK_SIZE = 4 * 1024
MAX_CHUNK_SIZE = 64 * 1024 * 1024
DEFAULT_CHUNK_SIZE = 1024 * 1024
SALT_SIZE = 32
KEY_SCOPES = ("host", "enclave")
# The digest an owner signature covers, by bundle format version (signing.py).
SIGNATURE_DIGESTS = {1: "SHA-256", 2: "BLAKE3"}
_SECTION_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: Any, what: str, size: int | None = None) -> bytes:
    if not isinstance(text, str):
        raise ManifestError(f"manifest field {what} must be base64 text")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ManifestError(f"manifest field {what} is not valid base64") from None
    if size is not None and len(data) != size:
        raise ManifestError(f"manifest field {what} must be {size} bytes, found {len(data)}")
    return data


@dataclass(frozen=True)
class SectionEntry:
    """One encrypted section: its name, plaintext size and chunking."""

    name: str
    size: int
    key: str = "host"  # "host": the model key; "enclave": the key only the enclave receives


@dataclass(frozen=True)
class Manifest:
    """The parsed manifest. `document` is the full JSON object, kept for scheme-specific fields."""

    format_version: int
    scheme: str
    key: dict[str, Any]
    salt: bytes
    chunk_size: int
    sections: tuple[SectionEntry, ...]
    signer_public_key: bytes | None
    document: dict[str, Any] = field(repr=False)

    @property
    def key_id(self) -> str:
        return self.key["id"]

    def section(self, name: str) -> SectionEntry:
        for entry in self.sections:
            if entry.name == name:
                return entry
        raise ManifestError(f"bundle has no section {name!r} (it has: {', '.join(s.name for s in self.sections)})")

    def to_bytes(self) -> bytes:
        return canonical_json(self.document)


def canonical_json(document: dict[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def build_manifest(
    *,
    format_version: int,
    scheme: str,
    key_spec: dict[str, Any],
    salt: bytes,
    chunk_size: int,
    sections: list[SectionEntry],
    signer_public_key: bytes | None,
    extra: dict[str, Any],
) -> Manifest:
    """Assemble a manifest for writing; `extra` carries model signature, policy and creation info."""
    document: dict[str, Any] = dict(extra)
    document.update(
        {
            "format": "modelcloak-bundle",
            "format_version": format_version,
            "scheme": scheme,
            "key": key_spec,
            "encryption": {
                "aead": "AES-256-GCM",
                "kdf": "HKDF-SHA256",
                "salt": b64encode(salt),
                "chunk_size": chunk_size,
            },
            "sections": [
                {"name": s.name, "size": s.size, **({"key": s.key} if s.key != "host" else {})} for s in sections
            ],
            "signature": None
            if signer_public_key is None
            else {
                "algorithm": "Ed25519",
                **({"digest": SIGNATURE_DIGESTS[format_version]} if format_version >= 2 else {}),
                "public_key": b64encode(signer_public_key),
            },
        }
    )
    # Round-trip through the parser so a writer can never produce a bundle its reader rejects.
    return parse_manifest(canonical_json(document), format_version)


def _require(document: dict[str, Any], name: str, kind: type | tuple[type, ...], where: str = "manifest") -> Any:
    value = document.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ManifestError(f"{where} field {name!r} is missing or not {expected}")
    return value


def parse_manifest(raw: bytes, format_version: int) -> Manifest:
    """Parse and validate manifest bytes; every failure is a ManifestError naming the field."""
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"manifest is not valid UTF-8 JSON ({exc.__class__.__name__})") from None
    if not isinstance(document, dict):
        raise ManifestError("manifest must be a JSON object")
    if document.get("format") != "modelcloak-bundle":
        raise ManifestError("manifest field 'format' must be 'modelcloak-bundle'")
    if _require(document, "format_version", int) != format_version:
        raise ManifestError("manifest format_version disagrees with the file header")
    scheme = _require(document, "scheme", str)
    key = _require(document, "key", dict)
    key_id = _require(key, "id", str, "manifest key")
    if not re.fullmatch(r"[0-9a-f]{16}", key_id):
        raise ManifestError("manifest key id must be 16 lowercase hex digits")
    _require(key, "provider", str, "manifest key")
    encryption = _require(document, "encryption", dict)
    if encryption.get("aead") != "AES-256-GCM" or encryption.get("kdf") != "HKDF-SHA256":
        raise ManifestError("manifest names an unsupported cipher (expected AES-256-GCM with HKDF-SHA256)")
    salt = b64decode(encryption.get("salt"), "encryption.salt", SALT_SIZE)
    chunk_size = _require(encryption, "chunk_size", int, "manifest encryption")
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ManifestError(f"manifest chunk_size {chunk_size} is outside {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
    raw_sections = _require(document, "sections", list)
    if not 1 <= len(raw_sections) <= MAX_SECTIONS:
        raise ManifestError(f"manifest must list 1..{MAX_SECTIONS} sections")
    sections: list[SectionEntry] = []
    for entry in raw_sections:
        if not isinstance(entry, dict):
            raise ManifestError("manifest section entries must be objects")
        name = _require(entry, "name", str, "manifest section")
        size = _require(entry, "size", int, "manifest section")
        if not _SECTION_NAME.match(name):
            raise ManifestError(f"manifest section name {name!r} is not allowed")
        if size < 0 or size > 1 << 50:
            raise ManifestError(f"manifest section {name!r} has an impossible size {size}")
        if any(s.name == name for s in sections):
            raise ManifestError(f"manifest lists section {name!r} twice")
        scope = entry.get("key", "host")
        if scope not in KEY_SCOPES:
            raise ManifestError(f"manifest section {name!r} names an unknown key scope {scope!r}")
        sections.append(SectionEntry(name, size, scope))
    if any(s.key == "enclave" for s in sections):
        enclave_key = _require(document, "enclave_key", dict)
        if not re.fullmatch(r"[0-9a-f]{16}", str(enclave_key.get("id", ""))):
            raise ManifestError("manifest enclave_key id must be 16 lowercase hex digits")
    signature = document.get("signature")
    signer: bytes | None = None
    if signature is not None:
        if not isinstance(signature, dict) or signature.get("algorithm") != "Ed25519":
            raise ManifestError("manifest signature must be null or an Ed25519 descriptor")
        # Version 1 signs SHA-256 digests and names none; version 2 must name BLAKE3. Any other
        # pairing is refused here, before a digest is computed (docs/FORMAT.md, "Signature trailer").
        expected_digest = SIGNATURE_DIGESTS.get(format_version)
        if signature.get("digest") != (expected_digest if format_version >= 2 else None):
            raise ManifestError(
                f"manifest signature digest {signature.get('digest')!r} does not match bundle format version "
                f"{format_version} (which signs {expected_digest} digests)"
            )
        signer = b64decode(signature.get("public_key"), "signature.public_key", 32)
    return Manifest(
        format_version=format_version,
        scheme=scheme,
        key=key,
        salt=salt,
        chunk_size=chunk_size,
        sections=tuple(sections),
        signer_public_key=signer,
        document=document,
    )
