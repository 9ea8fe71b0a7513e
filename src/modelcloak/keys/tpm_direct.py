"""The per-load TPM unseal, spoken to the TPM directly with the session crypto done in `cryptography`.

Why: libtss2 3.2's ESAPI does the same session crypto through an OpenSSL 3 backend that builds
and frees a whole OpenSSL library context for every hash, HMAC, KDF and random draw (8 per
unseal, ~1.1 ms of CPU each), which kept a locked EfficientNet-Lite0 load about 10% over its
sealed load in CPU. Here the same commands are marshalled by hand and sent through the TCTI that
tpm2-pytss opens; the crypto is `cryptography`'s (one OpenSSL context for the process).

The security properties are those of the ESAPI path in `modelcloak.keys.tpm`, command for command:

- the session is salted with the storage primary's ECC key (TPM 2.0 Part 1, 11.4.10.3 KDFe and
  Part 3, 11.1 StartAuthSession), so only that TPM can compute the session key;
- the Unseal's response parameter (the secret) is AES-128-CFB encrypted on the wire (Part 1,
  21.3) and its response HMAC is verified before the secret is used (Part 1, 19.6, HMAC computation);
- a PCR-bound enrolment runs PolicyPCR in the same session before the Unseal (Part 3, 23.7);
- the storage primary is re-created with the fixed template and compared with the enrolment's
  device id (in `modelcloak.keys.tpm`), or reloaded from a context this TPM saved (Part 1, context
  management: only the saving TPM, under the same hierarchy proof, accepts it).

Any TPM error response raises `TpmCommandError`: the caller then re-runs the unseal through ESAPI,
whose path names the cause (another TPM, a cleared one, a damaged file, a moved PCR). A response
that fails its HMAC raises `TpmIntegrityError` and is never retried quietly.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

try:  # cryptography 47+ keeps CFB among the "decrepit" modes; the TPM's parameter encryption is CFB
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - cryptography < 47
    from cryptography.hazmat.primitives.ciphers.modes import CFB  # type: ignore[assignment,no-redef]

from modelcloak.keys.errors import KeyProviderError

__all__ = ["PrimaryKey", "TpmCommandError", "TpmConnection", "TpmIntegrityError", "object_name"]

# TPM 2.0 Part 2 constants (TPM_ST, TPM_CC, TPM_RH / TPM_RS, TPM_ALG_ID, TPM_SE).
_ST_NO_SESSIONS = 0x8001
_ST_SESSIONS = 0x8002
_CC_CREATE_PRIMARY = 0x131
_CC_LOAD = 0x157
_CC_UNSEAL = 0x15E
_CC_CONTEXT_LOAD = 0x161
_CC_CONTEXT_SAVE = 0x162
_CC_FLUSH_CONTEXT = 0x165
_CC_START_AUTH_SESSION = 0x176
_CC_POLICY_PCR = 0x17F
_RH_OWNER = 0x40000001
_RH_NULL = 0x40000007
_RS_PW = 0x40000009
_ALG_SHA256 = 0x000B
_ALG_AES = 0x0006
_ALG_CFB = 0x0043
_SE_HMAC = 0x00
_SE_POLICY = 0x01
# TPMA_SESSION (Part 2): encrypt the response's first parameter; continueSession left clear
# so the TPM ends the session with the Unseal.
_ATTR_ENCRYPT = 0x40
_NONCE_SIZE = 32  # the session hash's digest size (Part 3, 11.1: 16 bytes at least)
_MAX_RESPONSE = 4096
# An empty password authorisation (Part 1, password authorizations): TPM_RS_PW, empty nonce, no
# attributes, empty password. Used where the ESAPI path uses ESYS_TR.PASSWORD (owner hierarchy,
# the primary).
_PASSWORD_AUTH = struct.pack(">IHBH", _RS_PW, 0, 0, 0)


class TpmCommandError(KeyProviderError):
    """The TPM answered a command with an error code."""

    def __init__(self, command: int, code: int) -> None:
        super().__init__(f"the TPM refused command 0x{command:x} (response code 0x{code:x})")
        self.command = command
        self.code = code


class TpmIntegrityError(KeyProviderError):
    """A TPM response failed its HMAC or is malformed: the bus (or the TPM) is not what it should be."""


@dataclass(frozen=True)
class PrimaryKey:
    """A loaded storage primary: its TPM handle, its marshalled TPM2B_PUBLIC and its ECC public point."""

    handle: int
    public: bytes
    x: bytes
    y: bytes


def object_name(public: bytes) -> bytes:
    """The Name of an object with a SHA-256 name algorithm from its marshalled TPM2B_PUBLIC (Part 1, 16)."""
    return struct.pack(">H", _ALG_SHA256) + hashlib.sha256(public[2:]).digest()


def _tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def _kdfa(key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int) -> bytes:
    """KDFa with HMAC-SHA256 (Part 1, 11.4.10.2: SP 800-108 counter mode; label ends in one zero byte)."""
    out = b""
    counter = 1
    while len(out) * 8 < bits:
        message = struct.pack(">I", counter) + label + b"\0" + context_u + context_v + struct.pack(">I", bits)
        out += hmac.digest(key, message, "sha256")
        counter += 1
    return out[: bits // 8]


def _kdfe(z: bytes, label: bytes, party_u: bytes, party_v: bytes, bits: int) -> bytes:
    """KDFe with SHA-256 (Part 1, 11.4.10.3: SP 800-56A one-step KDF; label ends in one zero byte)."""
    out = b""
    counter = 1
    while len(out) * 8 < bits:
        out += hashlib.sha256(struct.pack(">I", counter) + z + label + b"\0" + party_u + party_v).digest()
        counter += 1
    return out[: bits // 8]


class _Reader:
    """Unmarshals big-endian fields from a response body, refusing one that is too short."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, size: int) -> bytes:
        if self.at + size > len(self.data):
            raise TpmIntegrityError("a TPM response is shorter than its fields say (malformed)")
        chunk = self.data[self.at : self.at + size]
        self.at += size
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def tpm2b(self) -> bytes:
        return self.take(self.u16())


class TpmConnection:
    """One TCTI connection and the few commands a per-load unseal needs."""

    def __init__(self, tcti: Any) -> None:
        self._tcti = tcti  # a tpm2_pytss TCTI (TCTILdr), owned and closed by the caller

    def _command(self, tag: int, code: int, body: bytes) -> tuple[int, _Reader]:
        self._tcti.transmit(struct.pack(">HII", tag, 10 + len(body), code) + body)
        response = self._tcti.receive(_MAX_RESPONSE)
        if len(response) < 10:
            raise TpmIntegrityError("a TPM response is shorter than its header (malformed)")
        response_tag, size, rc = struct.unpack(">HII", response[:10])
        if size != len(response):
            raise TpmIntegrityError("a TPM response's size field does not match its length (malformed)")
        if rc != 0:
            raise TpmCommandError(code, rc)
        if response_tag != tag:
            raise TpmIntegrityError(f"a TPM response to command 0x{code:x} has tag 0x{response_tag:x}")
        return response_tag, _Reader(response[10:])

    def create_primary(self, template: bytes) -> PrimaryKey:
        """TPM2_CreatePrimary under the owner hierarchy with an empty password (Part 3, 24.1)."""
        sensitive = _tpm2b(_tpm2b(b"") + _tpm2b(b""))  # TPM2B_SENSITIVE_CREATE: empty userAuth and data
        body = (
            struct.pack(">II", _RH_OWNER, len(_PASSWORD_AUTH))
            + _PASSWORD_AUTH
            + sensitive
            + template
            + _tpm2b(b"")  # outsideInfo
            + struct.pack(">I", 0)  # creationPCR: none
        )
        _, reader = self._command(_ST_SESSIONS, _CC_CREATE_PRIMARY, body)
        handle = reader.u32()
        reader.u32()  # parameterSize
        start = reader.at
        area = _Reader(reader.tpm2b())
        public = reader.data[start : reader.at]
        reader.tpm2b()  # creationData
        reader.tpm2b()  # creationHash
        reader.take(6)  # creationTicket: tag, hierarchy
        reader.tpm2b()  # creationTicket.digest
        # As ESAPI does: the Name the TPM reports must be the one its public area gives.
        if reader.tpm2b() != object_name(public):
            self._flush_quietly(handle)
            raise TpmIntegrityError("the TPM's CreatePrimary response names another object than its public area")
        return PrimaryKey(handle, public, *_ecc_point(area))

    def load(self, parent: int, private: bytes, public: bytes) -> int:
        """TPM2_Load of a sealed object under `parent` (empty password) from its marshalled blobs (Part 3, 12.2)."""
        body = struct.pack(">II", parent, len(_PASSWORD_AUTH)) + _PASSWORD_AUTH + private + public
        _, reader = self._command(_ST_SESSIONS, _CC_LOAD, body)
        handle = reader.u32()
        reader.u32()  # parameterSize
        # As ESAPI does: the loaded object's Name must be the sealed public area's (its cpHash uses it).
        if reader.tpm2b() != object_name(public):
            self._flush_quietly(handle)
            raise TpmIntegrityError("the TPM's Load response names another object than sealed.pub")
        return handle

    def context_save(self, handle: int) -> bytes:
        """TPM2_ContextSave: the marshalled TPMS_CONTEXT, encrypted and MACed by the TPM (Part 3, 28.2)."""
        _, reader = self._command(_ST_NO_SESSIONS, _CC_CONTEXT_SAVE, struct.pack(">I", handle))
        return reader.data

    def context_load(self, context: bytes) -> int:
        """TPM2_ContextLoad of a context from `context_save` (Part 3, 28.3)."""
        _, reader = self._command(_ST_NO_SESSIONS, _CC_CONTEXT_LOAD, context)
        return reader.u32()

    def flush(self, handle: int) -> None:
        """TPM2_FlushContext (Part 3, 28.4): transient objects outlive a connection without a resource manager."""
        self._command(_ST_NO_SESSIONS, _CC_FLUSH_CONTEXT, struct.pack(">I", handle))

    def _flush_quietly(self, handle: int) -> None:
        try:
            self.flush(handle)
        except Exception:  # best effort: the error being raised matters more
            pass

    def unseal(self, primary: PrimaryKey, sealed: int, sealed_name: bytes, pcr_selection: bytes | None) -> bytearray:
        """Unseal `sealed` over a session salted with `primary`, response encrypted and HMAC-checked.

        `pcr_selection` (a marshalled TPML_PCR_SELECTION) makes it a policy session with PolicyPCR
        over the current values of those PCRs; None an HMAC session (the object's empty password).
        The session ends with the Unseal, or is flushed if the Unseal fails.
        """
        session, session_key, nonce_tpm = self._start_salted_session(primary, pcr_selection is not None)
        try:
            if pcr_selection is not None:
                # PolicyPCR with an empty pcrDigest: the TPM uses the current values (Part 3, 23.7).
                self._command(_ST_NO_SESSIONS, _CC_POLICY_PCR, struct.pack(">I", session) + _tpm2b(b"") + pcr_selection)
            return self._unseal_in_session(session, session_key, nonce_tpm, sealed, sealed_name)
        except BaseException:
            self._flush_quietly(session)  # unless a successful Unseal already ended it
            raise

    def _start_salted_session(self, primary: PrimaryKey, policy: bool) -> tuple[int, bytes, bytes]:
        """TPM2_StartAuthSession salted with the primary's ECC key, AES-128-CFB, SHA-256 (Part 3, 11.1)."""
        # The salt: an ephemeral ECDH with the primary's public point, fed to KDFe with label
        # "SECRET" and both x-coordinates (Part 1, 11.4.10.3 and annex C, ECC secret sharing with
        # ECDH). Only the TPM holding the primary's private key recovers it.
        curve = ec.SECP256R1()
        ephemeral = ec.generate_private_key(curve)
        tpm_key = ec.EllipticCurvePublicNumbers(
            int.from_bytes(primary.x, "big"), int.from_bytes(primary.y, "big"), curve
        ).public_key()
        z = ephemeral.exchange(ec.ECDH(), tpm_key)
        numbers = ephemeral.public_key().public_numbers()
        ephemeral_x = numbers.x.to_bytes(32, "big")
        ephemeral_y = numbers.y.to_bytes(32, "big")
        salt = _kdfe(z, b"SECRET", ephemeral_x, primary.x, 256)
        encrypted_salt = _tpm2b(_tpm2b(ephemeral_x) + _tpm2b(ephemeral_y))  # TPM2B_ENCRYPTED_SECRET of a TPMS_ECC_POINT
        nonce_caller = secrets.token_bytes(_NONCE_SIZE)
        body = (
            struct.pack(">II", primary.handle, _RH_NULL)
            + _tpm2b(nonce_caller)
            + encrypted_salt
            + struct.pack(">B", _SE_POLICY if policy else _SE_HMAC)
            + struct.pack(">HHH", _ALG_AES, 128, _ALG_CFB)
            + struct.pack(">H", _ALG_SHA256)
        )
        _, reader = self._command(_ST_NO_SESSIONS, _CC_START_AUTH_SESSION, body)
        session = reader.u32()
        nonce_tpm = reader.tpm2b()
        # Unbound: sessionKey = KDFa(authHash, salt, "ATH", nonceTPM, nonceCaller, 256) (Part 1, 19.6,
        # sessionKey creation).
        return session, _kdfa(salt, b"ATH", nonce_tpm, nonce_caller, 256), nonce_tpm

    def _unseal_in_session(
        self, session: int, session_key: bytes, nonce_tpm: bytes, sealed: int, sealed_name: bytes
    ) -> bytearray:
        """TPM2_Unseal (Part 3, 12.7) authorised by `session`; returns the decrypted, authenticated secret."""
        # The sealed object's authValue is empty (enrolment), so the HMAC and CFB keys are the
        # session key alone (Part 1, 19.6, HMAC computation: the key is sessionKey || authValue).
        nonce_caller = secrets.token_bytes(_NONCE_SIZE)
        attributes = bytes([_ATTR_ENCRYPT])
        # cpHash = H(commandCode || Name(itemHandle) || parameters) (Part 1, 18.7); Unseal has none.
        cp_hash = hashlib.sha256(struct.pack(">I", _CC_UNSEAL) + sealed_name).digest()
        # Command HMAC over cpHash || nonceNewer (caller) || nonceOlder (TPM) || attributes (Part 1, 19.6).
        command_hmac = hmac.digest(session_key, cp_hash + nonce_caller + nonce_tpm + attributes, "sha256")
        auth = struct.pack(">I", session) + _tpm2b(nonce_caller) + attributes + _tpm2b(command_hmac)
        _, reader = self._command(_ST_SESSIONS, _CC_UNSEAL, struct.pack(">II", sealed, len(auth)) + auth)
        parameters = reader.take(reader.u32())
        response_nonce = reader.tpm2b()
        response_attributes = reader.take(1)
        response_hmac = reader.tpm2b()
        if reader.at != len(reader.data):
            raise TpmIntegrityError("the TPM's Unseal response has trailing bytes (malformed)")
        # rpHash = H(responseCode || commandCode || parameters) (Part 1, 18.8); the response HMAC over
        # rpHash || nonceNewer (TPM) || nonceOlder (caller) || attributes (Part 1, 19.6).
        rp_hash = hashlib.sha256(struct.pack(">II", 0, _CC_UNSEAL) + parameters).digest()
        expected = hmac.digest(session_key, rp_hash + response_nonce + nonce_caller + response_attributes, "sha256")
        if not hmac.compare_digest(expected, response_hmac):
            raise TpmIntegrityError(
                "the TPM's Unseal response fails its HMAC: it was altered between the TPM and this process "
                "(or does not come from the TPM the session was salted to); the device secret is not used"
            )
        if response_attributes[0] & _ATTR_ENCRYPT == 0:
            raise TpmIntegrityError("the TPM answered the Unseal without encrypting the secret")
        data = _Reader(parameters)
        ciphertext = data.tpm2b()
        if data.at != len(parameters):
            raise TpmIntegrityError("the TPM's Unseal response parameters have trailing bytes (malformed)")
        # Response parameter encryption, CFB mode: key and IV from KDFa(sessionKey, "CFB",
        # nonceNewer = the response's nonceTPM, nonceOlder = nonceCaller) (Part 1, 21.3).
        key_iv = _kdfa(session_key, b"CFB", response_nonce, nonce_caller, 256)
        decryptor = Cipher(algorithms.AES(key_iv[:16]), CFB(key_iv[16:])).decryptor()
        secret = bytearray(len(ciphertext))
        written = decryptor.update_into(ciphertext, secret)
        decryptor.finalize()
        if written != len(ciphertext):
            raise TpmIntegrityError("the TPM's Unseal response could not be decrypted")
        return secret


def _ecc_point(area: _Reader) -> tuple[bytes, bytes]:
    """The unique (x, y) of an ECC TPMT_PUBLIC whose scheme and KDF are NULL (the storage template)."""
    area.u16()  # type
    area.u16()  # nameAlg
    area.u32()  # objectAttributes
    area.tpm2b()  # authPolicy
    if area.u16() == _ALG_AES:  # TPMT_SYM_DEF_OBJECT: keyBits and mode follow a non-NULL algorithm
        area.u16()
        area.u16()
    if area.u16() != 0x0010:  # TPM_ALG_NULL scheme: the template's (a restricted decryption key)
        raise TpmIntegrityError("the TPM's storage key has an unexpected ECC scheme")
    area.u16()  # curveID
    if area.u16() != 0x0010:  # TPM_ALG_NULL KDF
        raise TpmIntegrityError("the TPM's storage key has an unexpected KDF")
    return area.tpm2b(), area.tpm2b()


def pcr_selection_bytes(pcrs: Sequence[int]) -> bytes:
    """A marshalled TPML_PCR_SELECTION of `pcrs` (0..23) in the SHA-256 bank (Part 2, TPMS_PCR_SELECTION)."""
    bitmap = bytearray(3)
    for index in pcrs:
        bitmap[index // 8] |= 1 << (index % 8)
    return struct.pack(">IHB", 1, _ALG_SHA256, 3) + bytes(bitmap)
