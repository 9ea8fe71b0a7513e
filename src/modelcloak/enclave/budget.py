"""A query budget that outlives the enclave process: sealed state, optionally anchored in a TPM counter.

The policy's `budget_counter` says where the budget's count lives (docs/ENCLAVE.md, "Budgets that
survive restarts"):

- `session`: in this process only (bundles from before the field; the native enclave);
- `sealed`: in a state blob this enclave seals (AES-256-GCM under a key derived from the enclave
  key, bound to the bundle's header digest) and the host stores. The host cannot edit or forge
  it, but it can hand back an older blob or none at all: that rolls the count back;
- `tpm`: the same blob, plus a TPM 2.0 NV counter (TPM_NT_COUNTER, which only ever goes up).
  Each answered batch increments the counter and the blob records the value it reached, so a
  blob older than the counter, a missing blob for a counter that exists, or two sessions on one
  counter are refused.

The TPM is spoken to directly, with raw TPM 2.0 commands over the descriptor it was opened on
before the sandbox (a `/dev/tpmrm0` node or swtpm's TCP port), so this module stays small and
imports nothing but the standard library and `cryptography`. The channel is not authenticated:
a process that can answer in the TPM's place can roll the count back (see the docs for what
each platform gives).
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

COUNTERS = ("session", "sealed", "tpm")
STATE_VERSION = 1
_STATE = struct.Struct(">B32sQQI")  # version, header digest, samples served, TPM counter value, NV index
_AD = b"modelcloak/v1/budget-state"
_NONCE_SIZE = 12
SEALED_STATE_SIZE = _NONCE_SIZE + _STATE.size + 16


class BudgetStateError(Exception):
    """The budget's state cannot be trusted (forged, from another bundle, rolled back) or kept."""


@dataclass(frozen=True)
class BudgetState:
    digest: bytes  # sha256 of the bundle header: a state belongs to exactly one bundle
    served: int
    counter: int = 0  # the TPM counter value this state was written at (0 without a TPM)
    nv_index: int = 0


def seal_state(key: bytes, state: BudgetState) -> bytes:
    nonce = os.urandom(_NONCE_SIZE)
    plain = _STATE.pack(STATE_VERSION, state.digest, state.served, state.counter, state.nv_index)
    return nonce + AESGCM(key).encrypt(nonce, plain, _AD)


def open_state(key: bytes, blob: bytes, digest: bytes) -> BudgetState:
    if len(blob) != SEALED_STATE_SIZE:
        raise BudgetStateError(f"the budget state is {len(blob)} bytes, not {SEALED_STATE_SIZE}")
    try:
        plain = AESGCM(key).decrypt(blob[:_NONCE_SIZE], blob[_NONCE_SIZE:], _AD)
    except InvalidTag:
        raise BudgetStateError("the budget state was modified, or sealed for another bundle or enclave key") from None
    version, sealed_for, served, counter, nv_index = _STATE.unpack(plain)
    if version != STATE_VERSION:
        raise BudgetStateError(f"budget state version {version} is not supported")
    if sealed_for != digest:
        raise BudgetStateError("the budget state belongs to another bundle")
    return BudgetState(sealed_for, served, counter, nv_index)


def nv_index_for(digest: bytes) -> int:
    """The bundle's NV index in the owner range 0x01800000-0x01BFFFFF, from its header digest."""
    return 0x01800000 | (int.from_bytes(digest[:3], "big") & 0x3FFFFF)


# --------------------------------------------------------------------------------------------
# TPM 2.0: the four commands a monotonic counter needs, with an empty-password session

_TPM_ST_NO_SESSIONS = 0x8001
_TPM_ST_SESSIONS = 0x8002
_TPM_RS_PW = 0x40000009
_TPM_RH_OWNER = 0x40000001
_CC_NV_DEFINE_SPACE = 0x12A
_CC_NV_INCREMENT = 0x134
_CC_NV_READ = 0x14E
_CC_NV_READ_PUBLIC = 0x169
_RC_SUCCESS = 0
_RC_NV_UNINITIALIZED = 0x14A
_RC_HANDLE = 0x8B  # format-one handle error, any handle position: the index is not defined
_ALG_SHA256 = 0x000B
# TPMA_NV: AUTHWRITE | TPM_NT_COUNTER | OWNERREAD | AUTHREAD | NO_DA. Not ORDERLY: a counter kept in
# RAM would jump ahead after a power cut and lock the budget out.
_COUNTER_ATTRIBUTES = 0x00000004 | 0x00000010 | 0x00020000 | 0x00040000 | 0x02000000
_PW_SESSION = struct.pack(">IHBH", _TPM_RS_PW, 0, 0, 0)  # handle, empty nonce, attributes, empty password


class TpmError(BudgetStateError):
    pass


class TpmCounter:
    """One NV counter, over a descriptor opened before the sandbox (connect/open are denied after)."""

    def __init__(self, fd: int, nv_index: int) -> None:
        self.fd = fd
        self.nv_index = nv_index

    @classmethod
    def open(cls, tcti: str, nv_index: int) -> TpmCounter:
        """`tcti` as tpm2-tools spell it: `device:/dev/tpmrm0`, a device path, or `swtpm:host=H,port=P`."""
        kind, _, rest = tcti.partition(":")
        try:
            if kind == "swtpm":
                options = dict(part.split("=", 1) for part in rest.split(",") if "=" in part)
                conn = socket.create_connection((options.get("host", "127.0.0.1"), int(options["port"])), timeout=10)
                conn.settimeout(None)
                return cls(conn.detach(), nv_index)
            path = rest if kind == "device" else tcti
            return cls(os.open(path, os.O_RDWR | os.O_CLOEXEC), nv_index)
        except (OSError, KeyError, ValueError) as exc:
            raise TpmError(f"cannot reach the TPM at {tcti!r}: {exc}") from None

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass

    def _command(self, code: int, handles: tuple[int, ...], params: bytes, session: bool) -> tuple[int, bytes]:
        body = struct.pack(f">{len(handles)}I", *handles)
        if session:
            body += struct.pack(">I", len(_PW_SESSION)) + _PW_SESSION
        body += params
        tag = _TPM_ST_SESSIONS if session else _TPM_ST_NO_SESSIONS
        command = struct.pack(">HII", tag, 10 + len(body), code) + body
        try:
            os.write(self.fd, command)
            response = self._read_response()
        except OSError as exc:
            raise TpmError(f"the TPM connection failed: {exc}") from None
        _, _, rc = struct.unpack(">HII", response[:10])
        return rc, response[10:]

    def _read_response(self) -> bytes:
        data = b""
        size = 10
        while len(data) < size:
            chunk = os.read(self.fd, max(size - len(data), 4096))
            if not chunk:
                raise OSError("the TPM closed the connection")
            data += chunk
            if len(data) >= 10:
                size = struct.unpack(">I", data[2:6])[0]
                if not 10 <= size <= 1 << 16:
                    raise OSError(f"the TPM sent a response of {size} bytes")
        return data[:size]

    def exists(self) -> bool:
        rc, _ = self._command(_CC_NV_READ_PUBLIC, (self.nv_index,), b"", session=False)
        if rc == _RC_SUCCESS:
            return True
        if rc & 0xBF == _RC_HANDLE:
            return False
        raise TpmError(f"TPM2_NV_ReadPublic failed (rc 0x{rc:x})")

    def define(self) -> None:
        public = struct.pack(">IHIHH", self.nv_index, _ALG_SHA256, _COUNTER_ATTRIBUTES, 0, 8)
        params = struct.pack(">H", 0) + struct.pack(">H", len(public)) + public
        rc, _ = self._command(_CC_NV_DEFINE_SPACE, (_TPM_RH_OWNER,), params, session=True)
        if rc != _RC_SUCCESS:
            raise TpmError(f"TPM2_NV_DefineSpace of the budget counter 0x{self.nv_index:08x} failed (rc 0x{rc:x})")

    def increment(self) -> None:
        rc, _ = self._command(_CC_NV_INCREMENT, (self.nv_index, self.nv_index), b"", session=True)
        if rc != _RC_SUCCESS:
            raise TpmError(f"TPM2_NV_Increment of the budget counter failed (rc 0x{rc:x})")

    def read(self) -> int | None:
        """The counter's value; None before its first increment."""
        rc, rest = self._command(_CC_NV_READ, (self.nv_index, self.nv_index), struct.pack(">HH", 8, 0), session=True)
        if rc == _RC_NV_UNINITIALIZED:
            return None
        if rc != _RC_SUCCESS or len(rest) < 14:
            raise TpmError(f"TPM2_NV_Read of the budget counter failed (rc 0x{rc:x})")
        # parameterSize (u32), TPM2B_MAX_NV_BUFFER (u16 size + 8 bytes), then the session's reply
        (size,) = struct.unpack(">H", rest[4:6])
        if size != 8:
            raise TpmError(f"the budget counter holds {size} bytes, not 8")
        return int.from_bytes(rest[6:14], "big")


# --------------------------------------------------------------------------------------------


class PersistentBudget:
    """Where a `sealed` or `tpm` budget's count comes from and goes to, for one loaded bundle.

    `resume(blob)` gives the samples already served; `advance(served)` is called before a batch's
    answer leaves the enclave and returns the sealed state the host must store first, or None when
    the stored state already covers `served`. Storing costs an fsync (and a TPM NV write), so the
    stored count runs ahead of the served one by a reservation of up to `reserve` samples
    (1/64 of the budget, at most 1024): a session that ends cleanly stores its exact count
    (`settle`), one that is killed is charged for at most `reserve` samples it never answered.
    """

    def __init__(
        self, counter_kind: str, key: bytes, digest: bytes, tpm: TpmCounter | None, budget: int | None = None
    ) -> None:
        if counter_kind == "tpm" and tpm is None:
            raise BudgetStateError(
                "this bundle's query budget is kept by a TPM counter; start the enclave with --tpm "
                "(e.g. device:/dev/tpmrm0)"
            )
        self.kind = counter_kind
        self._key = bytearray(key)
        self.digest = digest
        self.tpm = tpm if counter_kind == "tpm" else None
        self.counter = 0
        self.budget = budget
        self.reserve = max(1, min(1024, budget // 64)) if budget else 1
        self.stored = 0  # the count in the state the host holds now

    def resume(self, blob: bytes | None) -> tuple[int, bytes]:
        """(samples already served, the state to store now) from the host's last stored state."""
        state = open_state(bytes(self._key), blob, self.digest) if blob else None
        if self.tpm is None:
            served = state.served if state else 0
            self.stored = served
            return served, self._seal(served)
        index = self.tpm.nv_index
        if not self.tpm.exists():
            if state is not None:
                raise BudgetStateError(
                    f"the TPM counter 0x{index:08x} that anchors this budget is gone (TPM cleared or counter "
                    "deleted); the count cannot be verified"
                )
            self.tpm.define()
        value = self.tpm.read()
        if state is None:
            if value is not None:
                raise BudgetStateError(
                    f"the TPM counter 0x{index:08x} shows this bundle was used before, but no budget state was "
                    "given; restore the latest state file"
                )
            self.tpm.increment()
            self.counter = self._read_exact(None)
            return 0, self._seal(0)
        if state.nv_index != index or value != state.counter:
            raise BudgetStateError(
                f"the budget state was rolled back: it was written at TPM count {state.counter}, the counter "
                f"is at {value}"
            )
        self.counter = state.counter
        self.stored = state.served
        return state.served, self._seal(state.served)

    def advance(self, served: int) -> bytes | None:
        if served <= self.stored:
            return None
        ahead = served + self.reserve - 1
        return self._store(min(ahead, self.budget) if self.budget is not None else ahead)

    def settle(self, served: int) -> bytes | None:
        """The exact count, when it differs from the stored (reserved) one: sent at SHUTDOWN."""
        return None if served == self.stored else self._store(served)

    def _store(self, count: int) -> bytes:
        if self.tpm is not None:
            self.tpm.increment()
            self.counter = self._read_exact(self.counter)
        self.stored = count
        return self._seal(count)

    def _read_exact(self, previous: int | None) -> int:
        value = self.tpm.read() if self.tpm is not None else None
        if value is None or (previous is not None and value != previous + 1):
            raise BudgetStateError(
                "the TPM budget counter moved outside this session (another session uses this bundle's budget); refused"
            )
        return value

    def _seal(self, served: int) -> bytes:
        index = self.tpm.nv_index if self.tpm is not None else 0
        return seal_state(bytes(self._key), BudgetState(self.digest, served, self.counter, index))

    def close(self) -> None:
        self._key[:] = bytes(len(self._key))
        if self.tpm is not None:
            self.tpm.close()
