"""Key providers: passphrase (scrypt), key file and environment variable."""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import stat
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from modelcloak.enclave.sandbox import KeyUnavailable
from modelcloak.enclave.sandbox import parse_key_text as enclave_parse_key_text
from modelcloak.hygiene import SecureBuffer, remove_environment_variable, secret_buffer
from modelcloak.keys.errors import KeyProviderError

KEY_SIZE = 32

# OWASP's recommended minimum for scrypt (N=2^17, r=8, p=1: 128 MiB, a fraction of a second).
SCRYPT_DEFAULTS = {"n": 2**17, "r": 8, "p": 1}
# Bounds on parameters read from a (possibly hostile) manifest, so a bundle cannot make a device
# spend gigabytes or minutes before the key is even checked.
_SCRYPT_MAX = {"n": 2**22, "r": 32, "p": 16}
_SCRYPT_MIN_N = 2**14


def _into_secret(material: bytes | bytearray) -> SecureBuffer:
    buffer = secret_buffer(len(material))
    buffer.view()[:] = material
    if isinstance(material, bytearray):
        material[:] = bytes(len(material))
    return buffer


def parse_key_text(text: bytes, origin: str) -> bytearray:
    """Accept a key as 32 raw bytes, 64 hex digits or base64 of 32 bytes (surrounding whitespace ignored).

    The enclave owns the parser (it may not import host code); the host reuses it.
    """
    try:
        return enclave_parse_key_text(text, origin)
    except KeyUnavailable as exc:
        raise KeyProviderError(str(exc)) from None


class KeyProvider(ABC):
    """Source of model keys. Returned keys live in a SecureBuffer that the caller closes."""

    name: ClassVar[str]

    @abstractmethod
    def new_key(self) -> tuple[SecureBuffer, dict[str, Any]]:
        """A fresh key for sealing, and the public spec to store in the manifest."""

    @abstractmethod
    def key_for(self, spec: dict[str, Any]) -> SecureBuffer:
        """The key for a bundle whose manifest carries `spec`."""

    def describe(self) -> str:
        return self.name


class _RawKeyProvider(KeyProvider):
    """A provider that holds one raw key: sealing with it reuses that key."""

    def _read(self) -> bytearray:
        raise NotImplementedError

    def new_key(self) -> tuple[SecureBuffer, dict[str, Any]]:
        return _into_secret(self._read()), {"provider": self.name, "kdf": None}

    def key_for(self, spec: dict[str, Any]) -> SecureBuffer:
        return _into_secret(self._read())


class KeyFile(_RawKeyProvider):
    """A key kept in a file (raw, hex or base64). Refuses files other users can read."""

    name = "keyfile"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def describe(self) -> str:
        return f"key file {self.path}"

    def _read(self) -> bytearray:
        try:
            info = self.path.stat()
            if stat.S_ISDIR(info.st_mode):
                raise KeyProviderError(f"key file {self.path} is a directory")
            if info.st_mode & 0o077:
                raise KeyProviderError(
                    f"key file {self.path} is readable by other users (mode {info.st_mode & 0o777:o}); chmod 600 it"
                )
            return parse_key_text(self.path.read_bytes(), f"key file {self.path}")
        except FileNotFoundError:
            raise KeyProviderError(f"key file {self.path} does not exist") from None
        except IsADirectoryError:
            raise KeyProviderError(f"key file {self.path} is a directory") from None
        except PermissionError:
            raise KeyProviderError(f"no permission to read key file {self.path}") from None


def generate_key_file(path: str | Path, *, overwrite: bool = False) -> KeyFile:
    """Write a fresh random 256-bit key as hex to `path` with mode 0600 and return its provider."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise KeyProviderError(f"{path} already exists; refusing to overwrite a key (use --force)") from None
    except OSError as exc:
        raise KeyProviderError(f"cannot create key file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(secrets.token_bytes(KEY_SIZE).hex().encode() + b"\n")
    os.chmod(path, 0o600)
    return KeyFile(path)


class EnvKey(_RawKeyProvider):
    """A key passed in an environment variable (hex or base64).

    The variable is removed from the environment on first read (and wiped from the block
    /proc/PID/environ shows), so child processes, the enclave included, never inherit it; the key
    stays in a secret buffer of this provider for later reads.
    """

    name = "env"

    def __init__(self, variable: str = "MODELCLOAK_KEY") -> None:
        self.variable = variable
        self._held: SecureBuffer | None = None

    def describe(self) -> str:
        return f"environment variable {self.variable}"

    def _read(self) -> bytearray:
        if self._held is None:
            value = remove_environment_variable(self.variable)
            if not value:
                raise KeyProviderError(f"environment variable {self.variable} is not set")
            self._held = _into_secret(parse_key_text(value.encode(), f"environment variable {self.variable}"))
        return bytearray(self._held.view())


class Passphrase(KeyProvider):
    """A key derived from a passphrase with scrypt; salt and cost are stored in the manifest."""

    name = "passphrase"

    def __init__(self, passphrase: str | bytes, **scrypt_params: int) -> None:
        if not passphrase:
            raise KeyProviderError("passphrase is empty")
        self._passphrase = passphrase.encode() if isinstance(passphrase, str) else bytes(passphrase)
        self._params = {**SCRYPT_DEFAULTS, **scrypt_params}

    def _derive(self, salt: bytes, n: int, r: int, p: int) -> SecureBuffer:
        try:
            derived = Scrypt(salt=salt, length=KEY_SIZE, n=n, r=r, p=p).derive(self._passphrase)
        except (ValueError, MemoryError) as exc:
            raise KeyProviderError(f"scrypt failed with n={n}, r={r}, p={p}: {exc}") from None
        return _into_secret(derived)

    def new_key(self) -> tuple[SecureBuffer, dict[str, Any]]:
        salt = secrets.token_bytes(16)
        spec = {
            "provider": self.name,
            "kdf": {"name": "scrypt", "salt": base64.b64encode(salt).decode(), **self._params},
        }
        return self._derive(salt, **self._params), spec

    def key_for(self, spec: dict[str, Any]) -> SecureBuffer:
        kdf = spec.get("kdf")
        if not isinstance(kdf, dict) or kdf.get("name") != "scrypt":
            raise KeyProviderError(
                "this bundle was not sealed with a passphrase; use the key file or key variable it was sealed with"
            )
        params = {}
        for name, ceiling in _SCRYPT_MAX.items():
            value = kdf.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= ceiling:
                raise KeyProviderError(f"bundle's scrypt parameter {name}={value!r} is outside the accepted range")
            params[name] = value
        if params["n"] < _SCRYPT_MIN_N or params["n"] & (params["n"] - 1):
            raise KeyProviderError(
                f"bundle's scrypt parameter n={params['n']} must be a power of two >= {_SCRYPT_MIN_N}"
            )
        try:
            salt = base64.b64decode(kdf.get("salt", ""), validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise KeyProviderError("bundle's scrypt salt is not valid base64") from None
        if len(salt) < 16:
            raise KeyProviderError("bundle's scrypt salt is shorter than 16 bytes")
        return self._derive(salt, **params)
