"""Device-bound lock keys: what every device key source shares, and the software-only source.

A device holds one 32-byte secret from enrolment on. Where that secret lives is the difference
between the sources: sealed inside the TPM (`modelcloak.keys.tpm`, the strong one) or in a 0600
file tied to the machine's identifiers (`SoftwareDeviceKey` here, the weak one). Everything above
the secret is shared:

    root      = HKDF-SHA256(secret, salt=none,      info="modelcloak/v1/device-lock-root" 0 fingerprint)
    model key = HKDF-SHA256(root,   salt=spec salt, info="modelcloak/v1/device-lock" 0 fingerprint)

`root` is what a device hands its owner, once, at enrolment (`export_lock_key`): the owner keeps
it like a model key and locks models for that device with `DeviceLockKey`, without the device;
the device derives the same model key from its secret when it loads the model. The two-step
derivation means the owner never holds the device secret itself, only a key labelled for model
locking, and that every model gets its own key from its own salt.

Trust assumption, stated plainly: the export happens in a setting the owner trusts (the owner's
provisioning step, before the device is handed over). The TPM releases the secret to whoever runs
on the device with the enrolled boot state, so root on an authorised, running device can export
the root again or read unlocked weights from memory. What the lock does give: a copied bundle,
state directory or disk image is useless on other hardware, and (with PCR binding) on this
hardware booted into something else. A later issue replaces the export with a public wrapping
path (the device publishes a key, the owner wraps model keys to it), so no secret ever leaves.

Model key specs in the manifest look like
``{"provider": "device-lock", "device": FINGERPRINT, "kdf": {"name": "hkdf-sha256", "salt": B64,
"info": "modelcloak/v1/device-lock"}}``; any of the three providers here and in `tpm` can resolve a
spec for its own fingerprint.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import secrets
import tempfile
from abc import abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from modelcloak.hygiene import SecureBuffer, secret_buffer
from modelcloak.keys.errors import KeyProviderError
from modelcloak.keys.providers import KEY_SIZE, KeyProvider, parse_key_text

__all__ = [
    "DEVICE_FILE",
    "LOCK_INFO",
    "SPEC_PROVIDER",
    "DeviceIdentity",
    "DeviceKeyBase",
    "DeviceLockKey",
    "SoftwareDeviceKey",
    "enroll_software_device",
    "load_identity",
    "unwrap_lock_key",
    "wrap_lock_key",
    "write_lock_key_file",
]

DEVICE_FILE = "device.json"
SOFTWARE_SECRET_FILE = "device.secret"
STATE_VERSION = 1
SPEC_PROVIDER = "device-lock"
LOCK_INFO = "modelcloak/v1/device-lock"
ROOT_INFO = "modelcloak/v1/device-lock-root"
SALT_SIZE = 16


@dataclass(frozen=True)
class DeviceIdentity:
    """A device's public identity: nothing here is secret.

    `device_id` names the hardware (the TPM's storage primary key, or the machine identifiers);
    `fingerprint` names this enrolment on it (it also commits to the enrolled secret), and is what
    a model is locked to. Re-enrolling the same machine gives the same device_id and a new
    fingerprint, so models locked to the old enrolment fail with a clear message, not silently.
    """

    kind: str  # "tpm" or "software"
    device_id: str  # 64 hex digits
    fingerprint: str  # "tpm:xxxx-xxxx-..." / "sw:xxxx-..."
    pcr_bank: str | None = None
    pcrs: tuple[int, ...] = ()
    details: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "device_id": self.device_id,
            "fingerprint": self.fingerprint,
            "pcr_bank": self.pcr_bank,
            "pcrs": list(self.pcrs),
        }


def make_fingerprint(kind: str, device_id: str, commitment: bytes) -> str:
    """Human-typable enrolment fingerprint: 128 bits of SHA-256(device id, secret commitment)."""
    digest = hashlib.sha256(b"modelcloak/v1/enrolment\0" + bytes.fromhex(device_id) + commitment).hexdigest()
    prefix = {"tpm": "tpm", "software": "sw"}[kind]
    return prefix + ":" + "-".join(digest[i : i + 4] for i in range(0, 32, 4))


# --------------------------------------------------------------------------------------------
# State directory helpers
# --------------------------------------------------------------------------------------------


def prepare_state_dir(state_dir: Path, *, force: bool) -> None:
    """Create the state directory (0700) and refuse to overwrite an enrolment unless forced."""
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyProviderError(f"cannot create device state directory {state_dir}: {exc.strerror}") from None
    existing = state_dir / DEVICE_FILE
    if existing.exists() and not force:
        try:
            fingerprint = json.loads(existing.read_text()).get("fingerprint", "?")
        except (OSError, ValueError, AttributeError):
            fingerprint = "?"
        raise KeyProviderError(
            f"{state_dir} already holds an enrolled device ({fingerprint}); re-enrolling makes every model "
            "locked to it unusable (pass force=True to do it anyway)"
        )


def write_private(path: Path, data: bytes) -> None:
    """Write a file with mode 0600 whatever the umask, atomically (temp file + rename)."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise


def read_state(state_dir: Path, kind: str | None = None) -> dict[str, Any]:
    """The enrolment record of `state_dir`, with a clear error when it is missing or not of `kind`."""
    path = state_dir / DEVICE_FILE
    if state_dir.exists() and not state_dir.is_dir():
        raise KeyProviderError(f"{state_dir} is {_file_kind(state_dir)}, not a device state directory; {_STATE_HINT}")
    if not state_dir.is_dir():
        raise KeyProviderError(f"device state directory {state_dir} does not exist; enroll this device first")
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise KeyProviderError(
            f"{state_dir} holds no enrolment ({DEVICE_FILE} is missing); enroll this device first"
        ) from None
    except (OSError, ValueError) as exc:
        raise KeyProviderError(f"cannot read {path}: {exc}") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise KeyProviderError(f"{path} is not a modelcloak device record of version {STATE_VERSION}")
    missing = [field for field in _STATE_FIELDS if not isinstance(state.get(field), str) or not state[field]]
    if missing:
        raise KeyProviderError(
            f"{path} lacks {', '.join(missing)}: the enrolment record is damaged or was edited; "
            "restore it from a backup or enroll this device again"
        )
    if state["kind"] not in DEVICE_KINDS:
        raise KeyProviderError(
            f"{path} records a device of kind {state['kind']!r}; this version knows {', '.join(DEVICE_KINDS)}"
        )
    if kind is not None and state.get("kind") != kind:
        raise KeyProviderError(f"{state_dir} holds a {state.get('kind')!r} enrolment, not a {kind!r} one")
    return state


DEVICE_KINDS = ("tpm", "software")
_STATE_FIELDS = ("kind", "device_id", "fingerprint")
_STATE_HINT = "--device-state takes the directory given to `modelcloak device enroll --state`"


def _file_kind(path: Path) -> str:
    """What a file given where a state directory belongs is, for the error message."""
    try:
        document = json.loads(path.read_bytes()[:65536])
    except (OSError, ValueError):
        return "a file"
    if isinstance(document, dict) and {"fingerprint", "lock_key"} <= document.keys():
        return "an exported device lock key file (the owner's side, for --lock-to)"
    if isinstance(document, dict) and "kind" in document and "device_id" in document:
        return f"a device record ({DEVICE_FILE}); give the directory that holds it"
    return "a file"


def read_private(path: Path, what: str, *, missing: str | None = None) -> bytes:
    """Read a state file, refusing one that other users can read (like KeyFile does).

    `missing` replaces the default "the enrolment in DIR is incomplete" when the file is absent.
    """
    try:
        info = path.stat()
        if info.st_mode & 0o077:
            mode = info.st_mode & 0o777
            raise KeyProviderError(f"{what} {path} is readable by other users (mode {mode:o}); chmod 600 it")
        return path.read_bytes()
    except FileNotFoundError:
        reason = missing or f"the enrolment in {path.parent} is incomplete"
        raise KeyProviderError(f"{what} {path} is missing; {reason}") from None
    except IsADirectoryError:
        raise KeyProviderError(f"{what} {path} is a directory, not a file") from None
    except PermissionError:
        raise KeyProviderError(f"no permission to read {what} {path}") from None


def identity_from_state(state: dict[str, Any]) -> DeviceIdentity:
    try:
        return DeviceIdentity(
            kind=str(state["kind"]),
            device_id=str(state["device_id"]),
            fingerprint=str(state["fingerprint"]),
            pcr_bank=state.get("pcr_bank"),
            pcrs=tuple(int(p) for p in state.get("pcrs", [])),
            details={k: v for k, v in state.items() if k not in {"kind", "device_id", "fingerprint"}},
        )
    except (KeyError, TypeError, ValueError):
        raise KeyProviderError("the device record is incomplete (kind, device_id, fingerprint)") from None


def load_identity(state_dir: str | Path) -> DeviceIdentity:
    """The public identity recorded in an enrolled state directory (no TPM access needed)."""
    return identity_from_state(read_state(Path(state_dir)))


# --------------------------------------------------------------------------------------------
# Key derivation shared by every device source
# --------------------------------------------------------------------------------------------


def _hkdf(material: bytes | memoryview, salt: bytes | None, info: str, fingerprint: str) -> SecureBuffer:
    derived = HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_SIZE,
        salt=salt,
        info=info.encode() + b"\0" + fingerprint.encode(),
    ).derive(material)
    out = secret_buffer(KEY_SIZE)
    out.view()[:] = derived
    return out


def derive_root(secret: SecureBuffer, fingerprint: str) -> SecureBuffer:
    """The per-device lock root from the enrolled secret."""
    return _hkdf(secret.view(), None, ROOT_INFO, fingerprint)


def derive_model_key(root: SecureBuffer, salt: bytes, fingerprint: str) -> SecureBuffer:
    """The 256-bit key for one model (one salt) from the device lock root."""
    return _hkdf(root.view(), salt, LOCK_INFO, fingerprint)


def new_spec(fingerprint: str) -> tuple[dict[str, Any], bytes]:
    salt = secrets.token_bytes(SALT_SIZE)
    spec = {
        "provider": SPEC_PROVIDER,
        "device": fingerprint,
        "kdf": {"name": "hkdf-sha256", "salt": base64.b64encode(salt).decode(), "info": LOCK_INFO},
    }
    return spec, salt


def spec_salt(spec: dict[str, Any], fingerprint: str) -> bytes:
    """Check that a bundle's key spec is a device lock for `fingerprint` and return its salt."""
    if spec.get("provider") != SPEC_PROVIDER:
        raise KeyProviderError(
            f"this bundle's key comes from {spec.get('provider')!r}, not from a device lock; use that key source"
        )
    device = spec.get("device")
    if device != fingerprint:
        raise KeyProviderError(f"this bundle is locked to device {device}, and this device is {fingerprint}")
    kdf = spec.get("kdf")
    if not isinstance(kdf, dict) or kdf.get("name") != "hkdf-sha256" or kdf.get("info") != LOCK_INFO:
        raise KeyProviderError("this bundle's device-lock key derivation is not hkdf-sha256 with the v1 label")
    try:
        salt = base64.b64decode(kdf.get("salt", ""), validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise KeyProviderError("this bundle's device-lock salt is not valid base64") from None
    if len(salt) < SALT_SIZE:
        raise KeyProviderError(f"this bundle's device-lock salt is shorter than {SALT_SIZE} bytes")
    return salt


class DeviceKeyBase(KeyProvider):
    """A key provider backed by one enrolled device secret (TPM-sealed or a file)."""

    state_dir: Path

    @property
    @abstractmethod
    def identity(self) -> DeviceIdentity:
        """The enrolment's public identity."""

    @abstractmethod
    def _open_secret(self) -> SecureBuffer:
        """The 32-byte enrolled secret; the caller closes it."""

    def _root(self) -> SecureBuffer:
        secret = self._open_secret()
        try:
            return derive_root(secret, self.identity.fingerprint)
        finally:
            secret.close()

    def new_key(self) -> tuple[SecureBuffer, dict[str, Any]]:
        """A fresh model key for this device (owner side, when the owner has the device at hand)."""
        spec, salt = new_spec(self.identity.fingerprint)
        root = self._root()
        try:
            return derive_model_key(root, salt, self.identity.fingerprint), spec
        finally:
            root.close()

    def key_for(self, spec: dict[str, Any]) -> SecureBuffer:
        salt = spec_salt(spec, self.identity.fingerprint)
        root = self._root()
        try:
            return derive_model_key(root, salt, self.identity.fingerprint)
        finally:
            root.close()

    def export_lock_key(self, *, again: bool = False) -> SecureBuffer:
        """The device lock root, for the owner to lock models to this device without it.

        Meant to be called once, at enrolment, in a setting the owner trusts (see the module
        docstring). The state records that it happened and a second call is refused unless
        `again=True`; that guards against scripts exporting it routinely, it is not a security
        boundary (root on the device can edit the record).
        """
        state = read_state(self.state_dir)
        if state.get("exported") and not again:
            raise KeyProviderError(
                f"the lock key of {self.identity.fingerprint} was already exported; pass again=True to export it again"
            )
        root = self._root()
        state["exported"] = True
        write_private(self.state_dir / DEVICE_FILE, _state_bytes(state))
        return root


def _state_bytes(state: dict[str, Any]) -> bytes:
    return (json.dumps(state, indent=2, sort_keys=True) + "\n").encode()


# --------------------------------------------------------------------------------------------
# Owner side: a device's exported lock root
# --------------------------------------------------------------------------------------------


class DeviceLockKey(KeyProvider):
    """The owner's handle on one enrolled device: its exported lock root and fingerprint.

    `new_key()` gives a fresh model key (and spec) that the device will re-derive from its TPM or
    software secret; keep the root as secret as a model key (file mode 0600, not in the bundle).
    """

    name: ClassVar[str] = SPEC_PROVIDER

    def __init__(self, root: bytes | bytearray | SecureBuffer, fingerprint: str) -> None:
        self._root = secret_buffer(KEY_SIZE)
        material = root.view() if isinstance(root, SecureBuffer) else memoryview(root)
        if material.nbytes != KEY_SIZE:
            self._root.close()
            raise KeyProviderError(f"a device lock key is {KEY_SIZE} bytes, got {material.nbytes}")
        self._root.view()[:] = material
        self.fingerprint = fingerprint

    @classmethod
    def from_file(cls, path: str | Path) -> DeviceLockKey:
        """Read a lock-key file written by `write_lock_key_file` (refuses group/world-readable files)."""
        path = Path(path)
        raw = read_private(
            path,
            "device lock key file",
            missing="the device exports it with `modelcloak device export-lock-key --state DIR --out FILE`",
        )
        try:
            document = json.loads(raw)
            fingerprint = str(document["fingerprint"])
            root = parse_key_text(str(document["lock_key"]).encode(), f"device lock key file {path}")
        except (ValueError, KeyError, TypeError):
            raise KeyProviderError(f"{path} is not a device lock key file (fingerprint, lock_key)") from None
        try:
            return cls(root, fingerprint)
        finally:
            root[:] = bytes(len(root))

    def describe(self) -> str:
        return f"device lock key for {self.fingerprint}"

    def new_key(self) -> tuple[SecureBuffer, dict[str, Any]]:
        spec, salt = new_spec(self.fingerprint)
        return derive_model_key(self._root, salt, self.fingerprint), spec

    def key_for(self, spec: dict[str, Any]) -> SecureBuffer:
        return derive_model_key(self._root, spec_salt(spec, self.fingerprint), self.fingerprint)

    def close(self) -> None:
        self._root.close()


def write_lock_key_file(path: str | Path, root: SecureBuffer, identity: DeviceIdentity) -> Path:
    """Write an exported lock root for the owner: JSON with the fingerprint and the key in hex, mode 0600."""
    path = Path(path)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyProviderError(f"cannot create {path.parent}: {exc.strerror}") from None
    document = {"fingerprint": identity.fingerprint, "device_id": identity.device_id, "lock_key": root.view().hex()}
    write_private(path, (json.dumps(document, indent=2) + "\n").encode())
    return path


# --------------------------------------------------------------------------------------------
# One lock key for several devices
# --------------------------------------------------------------------------------------------


def wrap_lock_key(lock_key: SecureBuffer, devices: Sequence[DeviceLockKey]) -> list[dict[str, Any]]:
    """Entries that let each of `devices` (and nobody else) recover `lock_key`; they are public.

    Each device gets a fresh model key from its lock root (a new salt per bundle and device) and
    the entry stores lock_key XOR that key: a one-time pad, because the derived key is used once.
    XOR and not an authenticated key wrap on purpose: a wrong device must recover a wrong lock
    key without noticing, so the weights it unlocks look real (docs/LOCK.md); an AEAD wrap would
    hand an attacker a free check of every guess.
    """
    if not devices:
        raise KeyProviderError("lock the model to at least one device (an exported device lock key)")
    entries = []
    for device in devices:
        derived, spec = device.new_key()
        try:
            wrapped = _xor(lock_key, derived)
        finally:
            derived.close()
        entries.append({"device": device.fingerprint, "key": spec, "wrapped": base64.b64encode(wrapped).decode()})
    return entries


def unwrap_lock_key(entries: Any, device: DeviceKeyBase) -> SecureBuffer:
    """The lock key from the entry for `device`; a clear error when the bundle names other devices."""
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise KeyProviderError("the bundle's device lock entries are malformed")
    fingerprint = device.identity.fingerprint
    mine = [e for e in entries if e.get("device") == fingerprint]
    if not mine:
        named = ", ".join(str(e.get("device")) for e in entries) or "no device"
        raise KeyProviderError(f"this bundle is locked to {named}; this device is {fingerprint}")
    try:
        wrapped = base64.b64decode(mine[0]["wrapped"], validate=True)
    except (KeyError, binascii.Error, ValueError, TypeError):
        raise KeyProviderError("the bundle's device lock entry has no valid wrapped key") from None
    if len(wrapped) != KEY_SIZE:
        raise KeyProviderError(f"the bundle's wrapped lock key is {len(wrapped)} bytes, not {KEY_SIZE}")
    derived = device.key_for(mine[0].get("key") or {})
    try:
        key = secret_buffer(KEY_SIZE)
        # XOR in place, so the lock key exists only inside the secret buffer.
        np.bitwise_xor(
            np.frombuffer(derived.view(), dtype=np.uint8),
            np.frombuffer(wrapped, dtype=np.uint8),
            out=np.frombuffer(key.view(), dtype=np.uint8),
        )
        return key
    finally:
        derived.close()


def _xor(a: SecureBuffer, b: SecureBuffer) -> bytes:
    """a XOR b as public bytes (only used to make wrapped entries)."""
    return (np.frombuffer(a.view(), dtype=np.uint8) ^ np.frombuffer(b.view(), dtype=np.uint8)).tobytes()


# --------------------------------------------------------------------------------------------
# Software-only device key (no TPM)
# --------------------------------------------------------------------------------------------

# Identifiers that name a machine and survive reboots and OS updates. Paths are relative to the
# identity root ("/" normally). DMI serials and product_uuid are usually root-only.
_ID_FILES = {
    "machine-id": "etc/machine-id",
    "dmi-product-uuid": "sys/class/dmi/id/product_uuid",
    "dmi-product-serial": "sys/class/dmi/id/product_serial",
    "dmi-board-serial": "sys/class/dmi/id/board_serial",
    "dmi-board-vendor": "sys/class/dmi/id/board_vendor",
    "dmi-board-name": "sys/class/dmi/id/board_name",
    "dmi-product-name": "sys/class/dmi/id/product_name",
    "dmi-sys-vendor": "sys/class/dmi/id/sys_vendor",
    "devicetree-serial": "proc/device-tree/serial-number",
}
# /proc/cpuinfo fields that describe the processor model (x86 and Arm); not per-core counters.
_CPU_FIELDS = ("vendor_id", "cpu family", "model", "model name", "CPU implementer", "CPU part", "Hardware", "Serial")


def read_machine_identifiers(root: Path) -> dict[str, str]:
    """The machine identifiers readable here, by name (unreadable or empty ones are left out)."""
    found: dict[str, str] = {}
    for name, relative in _ID_FILES.items():
        try:
            value = (root / relative).read_bytes().replace(b"\0", b"").decode("utf-8", "replace").strip()
        except OSError:
            continue
        if value and value.lower() not in {"none", "to be filled by o.e.m.", "default string", "not specified"}:
            found[name] = value
    try:
        cpuinfo = (root / "proc/cpuinfo").read_text(errors="replace")
    except OSError:
        cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in _CPU_FIELDS and value and f"cpu-{key}" not in found:
            found[f"cpu-{key}"] = value
    return found


def _software_device_id(identifiers: dict[str, str]) -> str:
    canonical = json.dumps(identifiers, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(b"modelcloak/v1/software-device\0" + canonical).hexdigest()


def _commitment(secret: SecureBuffer) -> bytes:
    """A public commitment to the software secret (SHA-256 of it under a label), for the fingerprint."""
    digest = hashlib.sha256(b"modelcloak/v1/secret-commitment\0")
    digest.update(secret.view())
    return digest.digest()


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def enroll_software_device(
    state_dir: str | Path, *, identity_root: str | Path = "/", force: bool = False
) -> DeviceIdentity:
    """Enrol this machine without a TPM: a random secret in a 0600 file, bound to the machine's identifiers.

    Weaker than a TPM, and documented so: whoever copies the state directory and reports the
    same identifiers (machine-id, DMI strings and CPU model are all easy to fake in a VM or with
    a bind mount) has the key. It stops casual copying of a bundle to another machine, no more.
    """
    state_dir = Path(state_dir)
    root = Path(identity_root)
    identifiers = read_machine_identifiers(root)
    if "machine-id" not in identifiers and not any(k.startswith("dmi-") for k in identifiers):
        raise KeyProviderError(
            f"no machine identifier is readable under {root} (etc/machine-id, sys/class/dmi/id/*); "
            "a software device key needs at least one"
        )
    prepare_state_dir(state_dir, force=force)
    secret = secret_buffer(KEY_SIZE)
    try:
        secret.view()[:] = secrets.token_bytes(KEY_SIZE)
        commitment = _commitment(secret)
        write_private(state_dir / SOFTWARE_SECRET_FILE, secret.view().hex().encode() + b"\n")
    finally:
        secret.close()
    device_id = _software_device_id(identifiers)
    fingerprint = make_fingerprint("software", device_id, commitment)
    state = {
        "version": STATE_VERSION,
        "kind": "software",
        "device_id": device_id,
        "fingerprint": fingerprint,
        # Digests, so a mismatch can be named without storing the identifiers themselves.
        "identifiers": {name: _digest(value) for name, value in sorted(identifiers.items())},
    }
    write_private(state_dir / DEVICE_FILE, _state_bytes(state))
    return identity_from_state(state)


class SoftwareDeviceKey(DeviceKeyBase):
    """Device lock keys from a secret file plus the machine's identifiers (no TPM; weaker, see above)."""

    name: ClassVar[str] = "software-device"

    def __init__(self, state_dir: str | Path, *, identity_root: str | Path = "/") -> None:
        self.state_dir = Path(state_dir)
        self.identity_root = Path(identity_root)
        self._state = read_state(self.state_dir, "software")
        self._identity = identity_from_state(self._state)

    @property
    def identity(self) -> DeviceIdentity:
        return self._identity

    def describe(self) -> str:
        return f"software device key {self._identity.fingerprint} ({self.state_dir})"

    def _open_secret(self) -> SecureBuffer:
        recorded: dict[str, str] = self._state.get("identifiers", {})
        current = read_machine_identifiers(self.identity_root)
        changed = _changed(recorded, current)
        if changed:
            raise KeyProviderError(
                f"this machine's identifiers differ from enrolment ({', '.join(changed)}): this is another "
                f"machine, or the state in {self.state_dir} was copied here; a software device key only works "
                "on the machine it was enrolled on"
            )
        device_id = _software_device_id({k: current[k] for k in recorded})
        if device_id != self._identity.device_id:
            raise KeyProviderError(f"the device record in {self.state_dir} does not match its identifiers")
        raw = read_private(self.state_dir / SOFTWARE_SECRET_FILE, "device secret file")
        material = parse_key_text(raw, f"device secret file {self.state_dir / SOFTWARE_SECRET_FILE}")
        secret = secret_buffer(KEY_SIZE)
        secret.view()[:] = material
        material[:] = bytes(len(material))
        commitment = _commitment(secret)
        if make_fingerprint("software", device_id, commitment) != self._identity.fingerprint:
            secret.close()
            raise KeyProviderError(f"the device secret in {self.state_dir} does not belong to its enrolment record")
        return secret


def _changed(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    """Names of identifiers recorded at enrolment that are now different or unreadable."""
    out: list[str] = []
    for name, digest in sorted(recorded.items()):
        if name not in current:
            out.append(f"{name} unreadable")
        elif _digest(current[name]) != digest:
            out.append(f"{name} differs")
    return out


def _iter_pcrs(pcrs: Iterable[int] | None) -> tuple[int, ...]:
    """Validate a PCR list: distinct indices 0..23, sorted."""
    if pcrs is None:
        return ()
    out = sorted({int(p) for p in pcrs})
    if any(p < 0 or p > 23 for p in out):
        raise KeyProviderError(f"PCR indices must be 0..23, got {list(pcrs)}")
    return tuple(out)
