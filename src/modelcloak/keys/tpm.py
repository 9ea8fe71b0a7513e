"""TPM 2.0 device keys: a secret sealed to this machine's TPM, optionally to its boot state (PCRs).

Enrolment (`enroll_device`) asks the TPM's owner hierarchy for its storage primary key with a
fixed template, so the same TPM re-creates the same key on every call without storing it; a
clear of the TPM (a new owner seed) changes it. Under it, a sealed data object holds 32 random
bytes. Only its public and private blobs go to the state directory: the private blob is
encrypted and integrity-protected by the primary key, so it can be loaded by this TPM and no
other. With `pcrs`, the object's only authorisation is a PolicyPCR over those PCRs' sha256
values at enrolment: a different firmware, bootloader, kernel or Secure Boot state, anything that
extends those PCRs differently, and the TPM refuses to unseal.

Commands that carry the secret run in an AES-128-CFB encrypted session salted with the primary
key, so the secret does not cross the bus (or the swtpm socket) in clear.

Each unseal is the TPM's own work: a `TpmDeviceKey` never keeps the secret between loads. It does
keep the TPM's saved contexts of the primary and the sealed object after its first unseal, so a
later load sends ContextLoad twice instead of CreatePrimary and Load (the TPM only accepts its own
contexts, and none after a clear); the salted session and the Unseal run every time.

A load sends those commands itself (`modelcloak.keys.tpm_direct`, the session crypto in
`cryptography`): ESAPI's libtss2 3.2 crypto cost 6-9 ms of CPU per load. ESAPI stays for
enrolment and re-runs any unseal the TPM refused, so the refusal names its cause.

`TpmDeviceKey` turns the unsealed secret into model keys (see `modelcloak.keys.device` for the
derivation, the owner's export and the trust assumption). The TCTI (how to reach the TPM) is
`tcti`, else $TPM2TOOLS_TCTI, else $TSS2_TCTI, else "device:/dev/tpmrm0" (the kernel's resource
manager). Tests use swtpm: "swtpm:host=127.0.0.1,port=2321".

tpm2-pytss (the `tpm` extra) compiles against the system's libtss2 (Debian: libtss2-dev); it is
imported only when a TPM is actually used.
"""

from __future__ import annotations

import functools
import hashlib
import os
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

from modelcloak.hygiene import SecureBuffer, secret_buffer
from modelcloak.keys.device import (
    DEVICE_FILE,
    STATE_VERSION,
    DeviceIdentity,
    DeviceKeyBase,
    _iter_pcrs,
    _state_bytes,
    identity_from_state,
    make_fingerprint,
    prepare_state_dir,
    read_private,
    read_state,
    write_private,
)
from modelcloak.keys.errors import KeyProviderError
from modelcloak.keys.providers import KEY_SIZE
from modelcloak.keys.tpm_direct import (
    PrimaryKey,
    TpmCommandError,
    TpmConnection,
    TpmIntegrityError,
    object_name,
    pcr_selection_bytes,
)

__all__ = ["DEFAULT_TCTI", "PRIMARY_TEMPLATE", "TpmDeviceKey", "default_tcti", "enroll_device", "tpm_available"]

DEFAULT_TCTI = "device:/dev/tpmrm0"
PCR_BANK = "sha256"
# Named in the state so a later version that changes the template can still find old enrolments.
PRIMARY_TEMPLATE = "ecc-p256-aes128cfb-srk/v1"
SEALED_PUBLIC = "sealed.pub"
SEALED_PRIVATE = "sealed.priv"
_INSTALL_HINT = "pip install 'modelcloak[tpm]' (needs the system's libtss2: apt-get install libtss2-dev)"


def default_tcti() -> str:
    """$TPM2TOOLS_TCTI, else $TSS2_TCTI, else the kernel resource manager device."""
    return _environment_tcti() or DEFAULT_TCTI


def _environment_tcti() -> str | None:
    return os.environ.get("TPM2TOOLS_TCTI") or os.environ.get("TSS2_TCTI") or None


def pytss() -> ModuleType:
    try:
        import tpm2_pytss
    except ImportError as exc:
        raise KeyProviderError(f"tpm2-pytss is not installed or cannot load libtss2 ({exc}); {_INSTALL_HINT}") from None
    return tpm2_pytss


def tpm_available(tcti: str | None = None) -> tuple[bool, str]:
    """(True, "") if a TPM answers through the TCTI, else (False, the reason); for `doctor`-style checks."""
    try:
        with esapi(tcti or default_tcti()):
            return True, ""
    except KeyProviderError as exc:
        return False, str(exc)


@contextmanager
def esapi(tcti: str) -> Iterator[Any]:
    """An ESAPI context on `tcti`, closed afterwards; connection failures become one clear line."""
    tss = pytss()
    # libtss2 logs every TPM error response to stderr; our exceptions say it better, once.
    # setdefault: a user who asked for TSS2 logging keeps it.
    os.environ.setdefault("TSS2_LOG", "all+NONE")
    try:
        ectx = tss.ESAPI(tcti)
    except tss.TSS2_Exception as exc:
        raise KeyProviderError(
            f"no TPM reachable through TCTI {tcti!r} ({exc}); set TPM2TOOLS_TCTI or pass tcti=..., "
            "or use a software device key on machines without a TPM"
        ) from None
    try:
        yield ectx
    finally:
        ectx.close()


@functools.cache
def _primary_template(tss: ModuleType) -> Any:
    """The storage primary key template: ECC P-256, AES-128-CFB, restricted decrypt, no DA, empty auth.

    Fixed and deterministic: the TPM derives the key from its owner seed and this template, so the
    same TPM gives the same key (and the same device id) until it is cleared. Built once per
    process: parsing it took 0.35 ms of CPU per load, and CreatePrimary only reads it.
    """
    a = tss.TPMA_OBJECT
    return tss.TPM2B_PUBLIC.parse(
        "ecc256:aes128cfb",
        objectAttributes=a.RESTRICTED
        | a.DECRYPT
        | a.FIXEDTPM
        | a.FIXEDPARENT
        | a.SENSITIVEDATAORIGIN
        | a.USERWITHAUTH
        | a.NODA,
    )


def _create_primary(tss: ModuleType, ectx: Any) -> tuple[Any, bytes]:
    """Create (re-create) the storage primary; returns its handle and its marshalled public area."""
    try:
        handle, public, _, _, _ = ectx.create_primary(tss.TPM2B_SENSITIVE_CREATE(), _primary_template(tss))
    except tss.TSS2_Exception as exc:
        if exc.error in (tss.TPM2_RC.BAD_AUTH, tss.TPM2_RC.AUTH_FAIL):
            raise KeyProviderError(
                "the TPM's owner hierarchy has a password; modelcloak needs to create its storage key "
                "there with empty owner authorisation"
            ) from None
        raise KeyProviderError(f"the TPM refused to create its storage primary key ({exc})") from None
    return handle, public.marshal()


def _open_tcti(tss: ModuleType, tcti: str) -> Any:
    """A bare TCTI connection (no ESAPI context) for `modelcloak.keys.tpm_direct`; close it after use."""
    return tss.TCTILdr.parse(tcti)


@functools.cache
def _primary_template_bytes(tss: ModuleType) -> bytes:
    return bytes(_primary_template(tss).marshal())


def _device_id(primary_public: bytes) -> str:
    return hashlib.sha256(b"modelcloak/v1/tpm-device\0" + primary_public).hexdigest()


def _encrypted_session(tss: ModuleType, ectx: Any, primary: Any, session_type: Any, attributes: Any) -> Any:
    """An AES-128-CFB session salted with the primary key (parameter encryption on the wire).

    The caller's first nonce comes from the OS CSPRNG here: libtss2 3.2 would draw it through a
    freshly created OpenSSL library context, about 1 ms of CPU per session for the same 32 random
    bytes.
    """
    symmetric = tss.TPMT_SYM_DEF(
        algorithm=tss.TPM2_ALG.AES,
        keyBits=tss.TPMU_SYM_KEY_BITS(aes=128),
        mode=tss.TPMU_SYM_MODE(aes=tss.TPM2_ALG.CFB),
    )
    session = ectx.start_auth_session(
        primary,
        tss.ESYS_TR.NONE,
        session_type,
        symmetric,
        tss.TPM2_ALG.SHA256,
        nonce_caller=tss.TPM2B_NONCE(secrets.token_bytes(32)),
    )
    ectx.trsess_set_attributes(session, attributes)
    return session


def _flush_direct(tpm: TpmConnection, *handles: int | None) -> None:
    # As `flush`: best effort, the original error matters more.
    for handle in handles:
        if handle is None:
            continue
        try:
            tpm.flush(handle)
        except Exception:
            pass


def pcr_selection(tss: ModuleType, pcrs: Sequence[int]) -> Any:
    return tss.TPML_PCR_SELECTION.parse(f"{PCR_BANK}:" + ",".join(str(p) for p in pcrs))


def read_pcrs(tss: ModuleType, ectx: Any, pcrs: Sequence[int]) -> dict[str, str]:
    values: dict[str, str] = {}
    for index in pcrs:
        _, _, digests = ectx.pcr_read(pcr_selection(tss, [index]))
        if len(digests) != 1:
            raise KeyProviderError(f"the TPM has no {PCR_BANK} bank for PCR {index}")
        values[str(index)] = bytes(digests[0]).hex()
    return values


def _policy_digest(tss: ModuleType, ectx: Any, pcrs: Sequence[int]) -> bytes:
    """The policy digest of PolicyPCR(current values of `pcrs`), computed by the TPM in a trial session."""
    trial = ectx.start_auth_session(
        tss.ESYS_TR.NONE,
        tss.ESYS_TR.NONE,
        tss.TPM2_SE.TRIAL,
        tss.TPMT_SYM_DEF(algorithm=tss.TPM2_ALG.NULL),
        tss.TPM2_ALG.SHA256,
    )
    try:
        ectx.policy_pcr(trial, tss.TPM2B_DIGEST(), pcr_selection(tss, pcrs))
        return bytes(ectx.policy_get_digest(trial))
    finally:
        ectx.flush_context(trial)


def flush(ectx: Any, *handles: Any) -> None:
    # Over a raw swtpm or /dev/tpm0 (no resource manager) transient objects outlive the connection
    # and the TPM has only a few slots: always flush what we loaded.
    for handle in handles:
        if handle is None:
            continue
        try:
            ectx.flush_context(handle)
        except Exception:  # best effort: the original error matters more
            pass


def enroll_device(
    state_dir: str | Path,
    *,
    tcti: str | None = None,
    pcrs: Sequence[int] | None = None,
    force: bool = False,
) -> DeviceIdentity:
    """Seal a fresh 32-byte secret to this TPM (and to `pcrs`' current sha256 values) and save the blobs.

    Returns the public identity; its fingerprint is what models are locked to. The state directory
    gets device.json, sealed.pub and sealed.priv (mode 0600, directory 0700); none of them is
    secret outside this TPM. Refuses an already enrolled directory unless `force`.
    """
    tss = pytss()
    tcti = tcti or default_tcti()
    state_dir = Path(state_dir)
    selected = _iter_pcrs(pcrs)
    with esapi(tcti) as ectx:
        prepare_state_dir(state_dir, force=force)
        primary, primary_public = _create_primary(tss, ectx)
        session = None
        try:
            auth_policy = b""
            pcr_values: dict[str, str] = {}
            if selected:
                try:
                    pcr_values = read_pcrs(tss, ectx, selected)
                    auth_policy = _policy_digest(tss, ectx, selected)
                except tss.TSS2_Exception as exc:
                    raise KeyProviderError(
                        f"cannot build a policy over {PCR_BANK} PCRs {list(selected)}: {exc}"
                    ) from None
            a = tss.TPMA_OBJECT
            attributes = a.FIXEDTPM | a.FIXEDPARENT | a.NODA
            if not selected:
                attributes |= a.USERWITHAUTH  # empty password, over an HMAC session (see TpmDeviceKey)
            template = tss.TPMT_PUBLIC(
                type=tss.TPM2_ALG.KEYEDHASH,
                nameAlg=tss.TPM2_ALG.SHA256,
                objectAttributes=attributes,
                authPolicy=tss.TPM2B_DIGEST(auth_policy),
            )
            template.parameters.keyedHashDetail.scheme.scheme = tss.TPM2_ALG.NULL  # sealed data, not an HMAC key
            # Entropy from both sides: a weak OS RNG or a weak TPM RNG alone does not make a weak secret.
            secret = secret_buffer(KEY_SIZE)
            try:
                tpm_random = bytes(ectx.get_random(KEY_SIZE))
                mixed = hashlib.sha256(b"modelcloak/v1/device-secret\0" + secrets.token_bytes(32) + tpm_random)
                secret.view()[:] = mixed.digest()
                sensitive = tss.TPM2B_SENSITIVE_CREATE(
                    tss.TPMS_SENSITIVE_CREATE(data=tss.TPM2B_SENSITIVE_DATA(bytes(secret.view())))
                )
                session = _encrypted_session(tss, ectx, primary, tss.TPM2_SE.HMAC, tss.TPMA_SESSION.DECRYPT)
                private, public, _, _, _ = ectx.create(primary, sensitive, tss.TPM2B_PUBLIC(template), session1=session)
                session = None  # without continueSession the TPM ended it with the command
            except tss.TSS2_Exception as exc:
                raise KeyProviderError(f"the TPM refused to seal the device secret ({exc})") from None
            finally:
                secret.close()
        finally:
            flush(ectx, session, primary)

    sealed_public = public.marshal()
    device_id = _device_id(primary_public)
    fingerprint = make_fingerprint("tpm", device_id, hashlib.sha256(sealed_public).digest())
    write_private(state_dir / SEALED_PUBLIC, sealed_public)
    write_private(state_dir / SEALED_PRIVATE, private.marshal())
    state = {
        "version": STATE_VERSION,
        "kind": "tpm",
        "device_id": device_id,
        "fingerprint": fingerprint,
        "primary_template": PRIMARY_TEMPLATE,
        "pcr_bank": PCR_BANK if selected else None,
        "pcrs": list(selected),
        # Public measurements at enrolment, so a refusal can say which PCR moved.
        "pcr_values": pcr_values,
        "tcti": tcti,
    }
    write_private(state_dir / DEVICE_FILE, _state_bytes(state))
    return identity_from_state(state)


@dataclass(frozen=True)
class _SavedObjects:
    """TPM2_ContextSave blobs of a loaded primary and sealed object, and the sealed files they came from."""

    blobs: tuple[bytes, bytes]
    primary: PrimaryKey  # its public point salts the session; its handle is the one at save time
    primary_context: bytes  # marshalled TPMS_CONTEXT, encrypted and integrity-protected by the TPM
    sealed_context: bytes


class _NotTheEnrolledTpm(Exception):
    """The direct path met a storage key other than the enrolled one; the ESAPI path names the cause."""


class TpmDeviceKey(DeviceKeyBase):
    """Model lock keys derived from a secret that only this TPM (in the enrolled boot state) unseals."""

    name: ClassVar[str] = "tpm"

    def __init__(self, state_dir: str | Path, *, tcti: str | None = None, direct: bool = True) -> None:
        """`direct=False` runs every unseal through ESAPI (libtss2's crypto): slower by ~6 ms of CPU,
        kept for comparison and as a way round a TPM or TCTI the direct path does not suit."""
        self.state_dir = Path(state_dir)
        self.direct = direct
        self._state = read_state(self.state_dir, "tpm")
        self.tcti = tcti or _environment_tcti() or self._recorded_tcti() or DEFAULT_TCTI
        if self._state.get("primary_template") != PRIMARY_TEMPLATE:
            raise KeyProviderError(
                f"{self.state_dir} was enrolled with primary template {self._state.get('primary_template')!r}, "
                f"this version knows {PRIMARY_TEMPLATE!r}"
            )
        self._identity = identity_from_state(self._state)
        # TPM contexts of the primary and the sealed object, kept after the first unseal so later
        # loads skip CreatePrimary and Load (see _unseal_direct); in this process's memory only.
        self._saved: _SavedObjects | None = None
        # Importing tpm2-pytss costs ~50 ms of CPU; paid here, once, rather than inside the first load.
        # A missing install is reported when the TPM is first used, as before.
        try:
            pytss()
        except KeyProviderError:
            pass

    def _recorded_tcti(self) -> str | None:
        recorded = self._state.get("tcti")
        return recorded if isinstance(recorded, str) and recorded else None

    @property
    def identity(self) -> DeviceIdentity:
        return self._identity

    def describe(self) -> str:
        return f"TPM device key {self._identity.fingerprint} (TCTI {self.tcti})"

    def _open_secret(self) -> SecureBuffer:
        tss = pytss()
        public_blob = read_private(self.state_dir / SEALED_PUBLIC, "sealed object")
        private_blob = read_private(self.state_dir / SEALED_PRIVATE, "sealed object")
        fingerprint = self._identity.fingerprint
        if make_fingerprint("tpm", self._identity.device_id, hashlib.sha256(public_blob).digest()) != fingerprint:
            raise KeyProviderError(f"{SEALED_PUBLIC} in {self.state_dir} does not belong to enrolment {fingerprint}")
        blobs = (public_blob, private_blob)
        try:
            if not self.direct:
                raise _NotTheEnrolledTpm()  # not a refusal: the caller asked for ESAPI
            raw = self._unseal_direct(tss, blobs)
        except TpmIntegrityError:
            raise  # an altered response is refused, never retried quietly
        except (TpmCommandError, _NotTheEnrolledTpm, tss.TSS2_Exception):
            # A refusal (or no TPM at all): ESAPI's full path runs the same commands again and
            # names the cause. Only refusals pay for it.
            self._saved = None
            raw = self._unseal_esys(tss, blobs)
        secret = secret_buffer(KEY_SIZE)
        try:
            if len(raw) != KEY_SIZE:
                secret.close()
                raise KeyProviderError(f"the sealed device secret in {self.state_dir} has the wrong size")
            secret.view()[:] = raw
        finally:
            raw[:] = bytes(len(raw))
        return secret

    def _unseal_direct(self, tss: ModuleType, blobs: tuple[bytes, bytes]) -> bytearray:
        """The unseal through `modelcloak.keys.tpm_direct`: session crypto in `cryptography`, not libtss2.

        Later loads of this key object reload the TPM's saved contexts of the primary and the
        sealed object instead of CreatePrimary and Load. TPM2_ContextLoad checks a saved context's
        integrity with a key derived from the owner hierarchy's proof value: only the TPM that saved
        it accepts it, and not after TPM2_Clear (a new proof) or a TPM Reset. So a context that
        loads is the same enrolled TPM the full path checked, and the Unseal still runs in the TPM
        each time, under the same policy. Sealed files changed on disk since take the full path.
        """
        os.environ.setdefault("TSS2_LOG", "all+NONE")
        pcrs = self._identity.pcrs
        with _open_tcti(tss, self.tcti) as tcti:
            tpm = TpmConnection(tcti)
            primary: PrimaryKey | None = None
            sealed: int | None = None
            fresh: _SavedObjects | None = None
            try:
                saved = self._saved
                if saved is not None and saved.blobs == blobs:
                    try:
                        primary = replace(saved.primary, handle=tpm.context_load(saved.primary_context))
                        sealed = tpm.context_load(saved.sealed_context)
                    except TpmCommandError:
                        self._saved = None  # not this TPM's contexts (any more): the full path decides
                        _flush_direct(tpm, primary.handle if primary else None)
                        primary = None
                if primary is None:
                    primary = tpm.create_primary(_primary_template_bytes(tss))
                    if _device_id(primary.public) != self._identity.device_id:
                        raise _NotTheEnrolledTpm()
                    sealed = tpm.load(primary.handle, blobs[1], blobs[0])
                    try:
                        fresh = _SavedObjects(
                            blobs, primary, tpm.context_save(primary.handle), tpm.context_save(sealed)
                        )
                    except TpmCommandError:
                        fresh = None  # the TPM declined: only later loads are slower
                assert sealed is not None
                selection = pcr_selection_bytes(pcrs) if pcrs else None
                raw = tpm.unseal(primary, sealed, object_name(blobs[0]), selection)
                if fresh is not None:
                    self._saved = fresh
                return raw
            finally:
                _flush_direct(tpm, sealed, primary.handle if primary else None)

    def _unseal_esys(self, tss: ModuleType, blobs: tuple[bytes, bytes]) -> bytearray:
        """The full unseal through ESAPI: CreatePrimary, Load, salted session, Unseal; every refusal named."""
        pcrs = self._identity.pcrs
        with esapi(self.tcti) as ectx:
            primary = sealed = session = None
            try:
                primary, sealed = self._load_objects(tss, ectx, blobs)
                if pcrs:
                    session = _encrypted_session(tss, ectx, primary, tss.TPM2_SE.POLICY, tss.TPMA_SESSION.ENCRYPT)
                    ectx.policy_pcr(session, tss.TPM2B_DIGEST(), pcr_selection(tss, pcrs))
                else:
                    session = _encrypted_session(tss, ectx, primary, tss.TPM2_SE.HMAC, tss.TPMA_SESSION.ENCRYPT)
                try:
                    # Without continueSession the TPM ends the session with the Unseal: no FlushContext.
                    data = ectx.unseal(sealed, session1=session)
                    session = None
                except tss.TSS2_Exception as exc:
                    if pcrs and exc.error in (tss.TPM2_RC.POLICY_FAIL, tss.TPM2_RC.PCR_CHANGED, tss.TPM2_RC.VALUE):
                        raise KeyProviderError(self._pcr_refusal(tss, ectx)) from None
                    raise KeyProviderError(f"the TPM refused to unseal the device secret ({exc})") from None
            finally:
                flush(ectx, session, sealed, primary)
        return bytearray(bytes(data))

    def _load_objects(self, tss: ModuleType, ectx: Any, blobs: tuple[bytes, bytes]) -> tuple[Any, Any]:
        """Re-create the storage primary, check it is the enrolled TPM's, and load the sealed object."""
        fingerprint = self._identity.fingerprint
        try:
            public, _ = tss.TPM2B_PUBLIC.unmarshal(blobs[0])
            private, _ = tss.TPM2B_PRIVATE.unmarshal(blobs[1])
        except Exception:  # any unmarshal failure means a damaged file
            raise KeyProviderError(f"the sealed object in {self.state_dir} is damaged (cannot be parsed)") from None
        cleared = (
            f"the TPM behind TCTI {self.tcti!r} is not the one {fingerprint} was enrolled on, or it has been "
            "cleared since (its storage key differs); models locked to this enrolment cannot be unlocked here"
        )
        primary, primary_public = _create_primary(tss, ectx)
        try:
            if _device_id(primary_public) != self._identity.device_id:
                raise KeyProviderError(cleared)
            try:
                return primary, ectx.load(primary, private, public)
            except tss.TSS2_Exception:
                # The private blob is bound to the primary that sealed it: another TPM, or this
                # one after TPM2_Clear, fails the blob's integrity check here. The storage key
                # was just found to be the enrolled one, so unless that comparison is switched
                # off (tests do, to see the TPM refuse on its own) the blob itself is damaged.
                if _device_id(primary_public) == self._identity.device_id:
                    raise KeyProviderError(
                        f"the TPM behind TCTI {self.tcti!r} is the one {fingerprint} was enrolled on, but it "
                        f"refuses {SEALED_PRIVATE} in {self.state_dir}: the file fails the TPM's integrity "
                        "check (damaged or altered); restore the state directory from a backup, or enroll "
                        "again and re-lock the models"
                    ) from None
                raise KeyProviderError(cleared) from None
        except BaseException:
            flush(ectx, primary)
            raise

    def _pcr_refusal(self, tss: ModuleType, ectx: Any) -> str:
        pcrs = self._identity.pcrs
        before: dict[str, str] = self._state.get("pcr_values", {})
        try:
            now = read_pcrs(tss, ectx, pcrs)
            moved = [p for p in pcrs if before.get(str(p)) != now.get(str(p))]
        except (KeyProviderError, tss.TSS2_Exception):
            moved = []
        which = f"PCR {', '.join(map(str, moved))} changed" if moved else f"PCRs {list(pcrs)} differ"
        return (
            f"the TPM refused to unseal the device secret: {which} since enrolment ({PCR_BANK} bank); "
            "this machine booted a different firmware, bootloader, kernel or Secure Boot state than the one "
            "it was enrolled in"
        )
