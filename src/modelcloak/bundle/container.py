"""The bundle file: layout, writing and authenticated reading.

Layout (all integers big-endian; docs/FORMAT.md is the normative description):

    magic        8 bytes   b"\\x89MCLOAK\\n"
    version      u16       format version (1 or 2: 2 signs BLAKE3 digests, 1 SHA-256)
    length       u32       manifest length in bytes
    manifest     length    canonical JSON (see manifest.py)
    header MAC   32        HMAC-SHA256 over everything above, key derived from the model key
    sections               each section's chunks in manifest order (stream.py)
    trailer      100       only when the manifest names a signer: b"MCSG" + public key + signature

A bundle is read with positional reads through one chunk-sized buffer, so neither the file nor
its ciphertext becomes resident, and decryption writes straight into the caller's buffer.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import struct
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from modelcloak.bundle import signing, stream
from modelcloak.bundle.errors import (
    BundleError,
    NotABundleError,
    SignatureError,
    TamperedError,
    UnsupportedVersionError,
    WrongKeyError,
)
from modelcloak.bundle.manifest import (
    DEFAULT_CHUNK_SIZE,
    MAX_MANIFEST_BYTES,
    SALT_SIZE,
    Manifest,
    SectionEntry,
    build_manifest,
    parse_manifest,
)

MAGIC = b"\x89MCLOAK\n"
FORMAT_VERSION = 2  # the newest version written; signed bundles get it (write_bundle)
SUPPORTED_VERSIONS = (1, 2)
_PREFIX = struct.Struct(">8sHI")
MAC_SIZE = 32


def key_id(master_key: bytes | memoryview) -> str:
    """Public identifier of a model key: lets a device pick the right key without revealing it."""
    return stream.derive(master_key, b"", "key-id", 8).hex()


@dataclass(frozen=True)
class SectionSource:
    """Plaintext for one section, produced lazily so large models are streamed, not held twice."""

    name: str
    size: int
    pieces: Callable[[], Iterable[bytes | memoryview]]
    key: str = "host"  # "enclave": sealed under the enclave key instead of the model key
    # A host section sealed under a key derived from the model key rather than the model key itself
    # (the device lock: model key + the device's lock key, modelcloak.lock.layout.lock_section_key).
    derive_key: Callable[[memoryview], bytes] | None = None


def write_bundle(
    path: str | Path,
    *,
    master_key: bytes | memoryview,
    key_spec: dict[str, Any],
    scheme: str,
    sections: Sequence[SectionSource],
    extra: dict[str, Any],
    signer: Ed25519PrivateKey | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Callable[[int], None] | None = None,
    enclave_key: bytes | memoryview | None = None,
    enclave_key_spec: dict[str, Any] | None = None,
    format_version: int | None = None,
) -> Manifest:
    """Encrypt `sections` into a new bundle at `path`; the file appears only once complete.

    Sections whose `key` is "enclave" are sealed under `enclave_key`, which the host never holds;
    the enclave authenticates the manifest through those sections' associated data.

    `format_version` defaults to 2 for a signed bundle (BLAKE3 section digests) and to 1 otherwise:
    the two differ only in the signature, so an unsigned bundle stays readable by older readers,
    and bundles with enclave sections stay at 1 because the enclaves read version 1 headers only.
    """
    from cryptography.hazmat.primitives import serialization

    if len(master_key) != stream.KEY_SIZE:
        raise BundleError(f"model key must be {stream.KEY_SIZE} bytes, got {len(master_key)}")
    needs_enclave_key = any(s.key == "enclave" for s in sections)
    if needs_enclave_key and (enclave_key is None or len(enclave_key) != stream.KEY_SIZE):
        raise BundleError(f"sections sealed for the enclave need a {stream.KEY_SIZE}-byte enclave key")
    if format_version is None:
        format_version = 2 if signer is not None and not needs_enclave_key else 1
    if format_version not in SUPPORTED_VERSIONS:
        raise BundleError(f"cannot write bundle format version {format_version}; this modelcloak writes 1 or 2")
    if format_version != 1 and needs_enclave_key:
        raise BundleError("bundles with sections sealed for the enclave are written as format version 1")
    if needs_enclave_key:
        assert enclave_key is not None  # checked just above
        extra = {**extra, "enclave_key": {**(enclave_key_spec or {}), "id": key_id(enclave_key)}}
    salt = os.urandom(SALT_SIZE)
    signer_public = (
        signer.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) if signer else None
    )
    manifest = build_manifest(
        format_version=format_version,
        scheme=scheme,
        key_spec={**key_spec, "id": key_id(master_key)},
        salt=salt,
        chunk_size=chunk_size,
        sections=[SectionEntry(s.name, s.size, s.key) for s in sections],
        signer_public_key=signer_public,
        extra=extra,
    )
    manifest_bytes = manifest.to_bytes()
    if len(manifest_bytes) > MAX_MANIFEST_BYTES:
        raise BundleError(f"manifest is {len(manifest_bytes)} bytes, over the {MAX_MANIFEST_BYTES} limit")
    header = _PREFIX.pack(MAGIC, format_version, len(manifest_bytes)) + manifest_bytes
    mac = hmac.new(stream.derive(master_key, salt, "header-mac"), header, hashlib.sha256).digest()
    manifest_digest = hashlib.sha256(header).digest()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".partial", delete=False)
    try:
        with handle:
            handle.write(header)
            handle.write(mac)
            section_digests = []
            for index, source in enumerate(sections):
                digest = signing.new_digest(format_version)
                scope_key = enclave_key if source.key == "enclave" and enclave_key is not None else master_key
                if source.derive_key is not None:
                    scope_key = source.derive_key(memoryview(master_key))
                section_key = stream.derive(scope_key, salt, "section/" + source.name)
                for chunk in stream.encrypt_section(
                    section_key, manifest_digest, index, source.size, source.pieces(), chunk_size
                ):
                    handle.write(chunk)
                    digest.update(chunk)
                    if progress:
                        progress(len(chunk) - stream.TAG_SIZE)
                section_digests.append(digest.digest())
            if signer is not None:
                header_digest = signing.new_digest(format_version)
                header_digest.update(header + mac)
                message = signing.signed_message(header_digest.digest(), section_digests, format_version)
                handle.write(signing.make_trailer(signer, message))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return manifest


class _Source:
    """Positional reads from a file (pread: ciphertext never becomes resident) or from bytes."""

    def __init__(self, fd: int | None, data: memoryview | None, size: int) -> None:
        self._fd, self._data, self.size = fd, data, size

    def read_into(self, offset: int, destination: memoryview) -> None:
        if self._data is not None:
            destination[:] = self._data[offset : offset + len(destination)]
            return
        if self._fd is None:
            raise BundleError("bundle source has neither a file nor bytes")
        done = 0
        while done < len(destination):
            count = os.preadv(self._fd, [destination[done:]], offset + done)
            if count <= 0:
                raise TamperedError("bundle file shrank while it was being read")
            done += count

    def read(self, offset: int, length: int) -> bytes:
        buffer = bytearray(length)
        self.read_into(offset, memoryview(buffer))
        return bytes(buffer)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._data is not None:
            self._data.release()
            self._data = None


_HASH_BLOCK = 1 << 20


@dataclass
class _PendingSignature:
    """A streamed signature check: the trailer read, the section digests gathered as decrypted."""

    signer: bytes
    trailer: bytes
    digests: dict[str, bytes] = field(default_factory=dict)
    failure: str | None = None


class Bundle:
    """A parsed bundle whose layout has been checked; nothing is decrypted until asked."""

    def __init__(self, source: _Source, name: str) -> None:
        self._source = source
        self.source = name
        self._pending: _PendingSignature | None = None
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, path: str | Path) -> "Bundle":
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise BundleError(f"bundle file {path} does not exist") from None
        except IsADirectoryError:
            raise BundleError(f"{path} is a directory, not a bundle file") from None
        except PermissionError:
            raise BundleError(f"no permission to read {path}") from None
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):  # O_RDONLY opens a directory on Linux; reading it fails later
            os.close(fd)
            raise BundleError(f"{path} is a directory, not a bundle file")
        size = info.st_size
        if size == 0:
            os.close(fd)
            raise NotABundleError(f"{path} is empty, not a modelcloak bundle")
        return cls(_Source(fd, None, size), str(path))

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<memory>") -> "Bundle":
        return cls(_Source(None, memoryview(data), len(data)), source)

    def _parse(self) -> None:
        size = self._source.size
        if size < _PREFIX.size:
            raise NotABundleError(f"{self.source} is not a modelcloak bundle (too short)")
        prefix = self._source.read(0, _PREFIX.size)
        if prefix[:8] != MAGIC:
            raise NotABundleError(f"{self.source} is not a modelcloak bundle (bad magic bytes)")
        _, version, manifest_len = _PREFIX.unpack(prefix)
        if version not in SUPPORTED_VERSIONS:
            raise UnsupportedVersionError(
                f"{self.source} uses bundle format version {version}; this modelcloak reads version(s) "
                f"{', '.join(map(str, SUPPORTED_VERSIONS))}"
            )
        if manifest_len > MAX_MANIFEST_BYTES:
            raise TamperedError(
                f"{self.source}: manifest length {manifest_len} exceeds the {MAX_MANIFEST_BYTES}-byte limit"
            )
        header_end = _PREFIX.size + manifest_len
        if size < header_end + MAC_SIZE:
            raise TamperedError(f"{self.source} is truncated inside its header ({size} bytes)")
        self.header = prefix + self._source.read(_PREFIX.size, manifest_len)
        self.mac = self._source.read(header_end, MAC_SIZE)
        self.manifest: Manifest = parse_manifest(self.header[_PREFIX.size :], version)
        self._manifest_digest = hashlib.sha256(self.header).digest()

        offset = header_end + MAC_SIZE
        self._ranges: dict[str, tuple[int, int, int]] = {}
        for index, entry in enumerate(self.manifest.sections):
            length = stream.ciphertext_size(entry.size, self.manifest.chunk_size)
            self._ranges[entry.name] = (index, offset, length)
            offset += length
        expected = offset + (signing.TRAILER_SIZE if self.manifest.signer_public_key else 0)
        if size < expected:
            raise TamperedError(
                f"{self.source} is truncated: the manifest describes {expected} bytes, the file has {size}"
            )
        if size > expected:
            raise TamperedError(f"{self.source} has {size - expected} unexpected bytes after its last section")
        self._sections_end = offset

    def layout(self) -> list[tuple[str, int, int]]:
        """(part, start, end) byte ranges of the file, for `inspect` and for tamper tests."""
        header_end = len(self.header)
        parts = [
            ("prefix", 0, _PREFIX.size),
            ("manifest", _PREFIX.size, header_end),
            ("header-mac", header_end, header_end + MAC_SIZE),
        ]
        parts += [(f"section:{name}", start, start + length) for name, (_, start, length) in self._ranges.items()]
        if self.signed:
            parts.append(("signature", self._sections_end, self._source.size))
        return parts

    @property
    def signed(self) -> bool:
        return self.manifest.signer_public_key is not None

    def _digest(self, start: int, length: int) -> bytes:
        digest = signing.new_digest(self.manifest.format_version)
        block = bytearray(min(length, _HASH_BLOCK))
        view = memoryview(block)
        for offset in range(0, length, _HASH_BLOCK):
            part = view[: min(_HASH_BLOCK, length - offset)]
            self._source.read_into(start + offset, part)
            digest.update(part)
        return bytes(digest.digest())

    def verify_signature(
        self, trusted: Sequence[bytes] | None = None, require: bool = False, *, streamed: bool = False
    ) -> str | None:
        """Check the owner signature; return the signer's fingerprint.

        `trusted` lists acceptable signer public keys; when given (or when `require` is set), an
        unsigned bundle or one signed by another key is refused. Without it, a signed bundle is
        still checked for integrity against the key it names.

        By default every section's ciphertext is hashed and the signature verified here, before
        any decryption. With `streamed` (honoured for format version 2 only; version 1 bundles are
        always checked first, as before), only the signer, the trust decision and the trailer's
        form are checked now; each section is then hashed from the very bytes
        `decrypt_section_into` decrypts (one read of the file, the hash on a worker thread beside
        the decryption), and `finish_verification()` verifies the signature. Until it has, the
        caller keeps decrypted plaintext in its guarded buffers, unparsed and unused, and wipes it
        if the check fails; `section_ciphertext()` finishes the check itself.
        """
        signer = self.manifest.signer_public_key
        if signer is None:
            if trusted or require:
                raise SignatureError(f"{self.source} is not signed, and this device requires an owner signature")
            return None
        if trusted and signer not in trusted:
            raise SignatureError(
                f"{self.source} is signed by {signing.fingerprint(signer)}, which is not a trusted signer"
            )
        trailer = self._source.read(self._sections_end, self._source.size - self._sections_end)
        signing.check_trailer_form(trailer, signer)
        self._pending = _PendingSignature(signer, trailer)
        if not (streamed and self.manifest.format_version >= 2):
            self.finish_verification()
        return signing.fingerprint(signer)

    @property
    def verification_pending(self) -> bool:
        """True between a streamed `verify_signature` and the `finish_verification` that checks it."""
        return self._pending is not None

    def finish_verification(self) -> None:
        """Verify the signature of a pending check (no-op when none is pending).

        Sections not decrypted since `verify_signature` are hashed from the file now. Raises
        SignatureError when the signature does not match; the check then stays failed (every later
        call raises again).
        """
        pending = self._pending
        if pending is None:
            return
        if pending.failure is not None:
            raise SignatureError(pending.failure)
        version = self.manifest.format_version
        digests = []
        for name, (_, start, length) in self._ranges.items():
            digest = pending.digests.get(name)
            if digest is None:
                digest = pending.digests[name] = self._digest(start, length)
            digests.append(digest)
        header_digest = signing.new_digest(version)
        header_digest.update(self.header + self.mac)
        message = signing.signed_message(header_digest.digest(), digests, version)
        try:
            signing.verify_trailer(pending.trailer, pending.signer, message)
        except SignatureError as exc:
            pending.failure = str(exc)
            raise
        self._pending = None

    def check_key(self, master_key: bytes | memoryview) -> None:
        """Authenticate the header with the key; tell a wrong key apart from a modified header."""
        offered = key_id(master_key) if len(master_key) == stream.KEY_SIZE else "invalid"
        mac_key = stream.derive(master_key, self.manifest.salt, "header-mac")
        if hmac.compare_digest(hmac.new(mac_key, self.header, hashlib.sha256).digest(), self.mac):
            return
        if offered != self.manifest.key_id:
            raise WrongKeyError(
                f"wrong key for {self.source}: the bundle names key id {self.manifest.key_id}, "
                f"the key offered has id {offered} (or the manifest's key id was altered)"
            )
        raise TamperedError(f"{self.source}: header authentication failed (the manifest or its MAC was modified)")

    def decrypt_section_into(self, name: str, master_key: bytes | memoryview, out: memoryview) -> None:
        """Decrypt section `name` into `out` (exactly its plaintext size). Call check_key first."""
        entry = self.manifest.section(name)
        if entry.key != "host":
            raise BundleError(f"section {name!r} is sealed for the enclave; the host cannot decrypt it")
        if len(out) != entry.size:
            raise BundleError(f"buffer for section {name!r} is {len(out)} bytes, the section holds {entry.size}")
        index, start, length = self._ranges[name]
        section_key = stream.derive(master_key, self.manifest.salt, "section/" + name)

        def read(offset: int, destination: memoryview) -> None:
            self._source.read_into(start + offset, destination)

        pending = self._pending
        if pending is None:
            stream.decrypt_section_into(
                section_key, self._manifest_digest, index, name, read, out, self.manifest.chunk_size
            )
            return
        if pending.failure is not None:
            raise SignatureError(pending.failure)
        try:
            digest = stream.decrypt_section_hashing(
                section_key,
                self._manifest_digest,
                index,
                name,
                read,
                length,
                out,
                self.manifest.chunk_size,
                signing.new_digest(self.manifest.format_version),
            )
        except TamperedError:
            # Report it as a check before decryption would: changed after the owner signed it.
            self.finish_verification()
            raise
        if pending.digests.setdefault(name, digest) != digest:
            pending.failure = f"{self.source}: section {name!r} changed between two reads of the file"
            raise SignatureError(pending.failure)

    def section_ciphertext(self, name: str) -> bytes:
        """The raw sealed chunks of a section, to hand to the enclave that holds its key."""
        self.finish_verification()  # nothing leaves this process before the signature matched
        _, start, length = self._ranges[self.manifest.section(name).name]
        return self._source.read(start, length)

    def section_index(self, name: str) -> int:
        return self._ranges[self.manifest.section(name).name][0]

    def close(self) -> None:
        self._source.close()

    def __enter__(self) -> "Bundle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
