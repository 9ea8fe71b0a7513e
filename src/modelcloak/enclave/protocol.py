"""The host <-> enclave wire protocol: frames, tensors and message payloads (docs/ENCLAVE.md).

Both sides use this module: the enclave server and the host's `EnclaveClient`. Everything is
explicit bytes with fixed-width integers, so the same messages can travel over a socket pair, a
vsock (Nitro) or an ecall buffer (SGX); nothing is pickled and no Python object crosses the
boundary.

Frame layout (big-endian):

    u32 length      bytes that follow the length field: 1 + 8 + len(payload)
    u8  type        MsgType
    u64 request id  chosen by the host, echoed by the enclave; 0 = not tied to a request
    ... payload     len = length - 9

Tensors carry their data little-endian whatever the machine, with ONNX TensorProto dtype codes.
Every decoder here bounds what it reads and raises `ProtocolError` carrying an `ErrorCode`, so a
malformed payload becomes an ERROR reply, never a crash.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from modelcloak.enclave.policy import OutputPolicy

PROTOCOL_VERSION = 1

FRAME_HEADER = struct.Struct(">IBQ")  # length, type, request id
HEADER_SIZE = FRAME_HEADER.size  # 13
FRAME_OVERHEAD = 9  # type + request id, counted in `length`
DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024
MIN_MAX_FRAME_BYTES = 64 * 1024
MAX_MAX_FRAME_BYTES = 0xFFFF_FFFF  # the length field is a u32
MAX_ERROR_MESSAGE_BYTES = 1024
MAX_RANK = 32
MAX_TENSORS = 1024
NO_LIMIT = 0xFFFF_FFFF_FFFF_FFFF  # u64 "unlimited" in STATS and policy encodings


class MsgType(IntEnum):
    # host -> enclave
    LOAD = 0x01
    LOAD_DATA = 0x02
    INFER = 0x03
    STATS = 0x04
    PING = 0x05
    SHUTDOWN = 0x06
    # enclave -> host
    HELLO = 0x81
    READY = 0x82
    RESULT = 0x83
    STATS_REPLY = 0x84
    PONG = 0x85
    BYE = 0x86
    # The sealed budget state (budget.py) the host must store before it uses the RESULT or READY
    # that follows with the same request id. Only enclaves that announce CAP_BUDGET_STATE send it.
    BUDGET_STATE = 0x87
    ERROR = 0xFF


HOST_TO_ENCLAVE = frozenset(
    {MsgType.LOAD, MsgType.LOAD_DATA, MsgType.INFER, MsgType.STATS, MsgType.PING, MsgType.SHUTDOWN}
)
ENCLAVE_TO_HOST = frozenset(set(MsgType) - HOST_TO_ENCLAVE)


class ErrorCode(IntEnum):
    MALFORMED_FRAME = 1  # frame shorter than its header, or a payload that does not parse
    UNKNOWN_TYPE = 2
    FRAME_TOO_LARGE = 3
    BAD_STATE = 4  # message not allowed now (INFER before LOAD, a second LOAD, stray LOAD_DATA)
    BAD_TENSOR = 5  # tensor encoding is invalid (dtype code, rank, sizes, trailing bytes)
    BAD_INPUT = 6  # tensors are well formed but do not match the private part's inputs
    BAD_HEADER = 7  # the bundle header cannot be parsed or names no enclave section
    WRONG_KEY = 8
    AUTH_FAILED = 9  # a chunk failed AEAD authentication: header or ciphertext was altered
    BAD_MODEL = 10  # decrypted, but onnxruntime refused it or the policy cannot apply to it
    BAD_POLICY = 11  # the manifest's policy object is not understood: refuse rather than guess
    BUDGET_EXHAUSTED = 12
    RATE_LIMITED = 13
    INFERENCE_FAILED = 14
    KEY_UNAVAILABLE = 15  # the enclave could not read its own key at start-up
    SANDBOX_FAILED = 16  # the model loaded but the sandbox could not be installed
    INTERNAL = 17
    BUDGET_STATE = 18  # the persistent budget's state is missing, forged, rolled back or cannot be kept


class ProtocolError(Exception):
    """A frame or payload that does not follow this protocol; `code` is the ERROR reply's code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# ONNX TensorProto.DataType codes: a standard both sides (and a C enclave) already know.
DTYPE_BY_CODE: dict[int, np.dtype] = {
    1: np.dtype("<f4"),
    2: np.dtype("u1"),
    3: np.dtype("i1"),
    4: np.dtype("<u2"),
    5: np.dtype("<i2"),
    6: np.dtype("<i4"),
    7: np.dtype("<i8"),
    9: np.dtype("?"),
    10: np.dtype("<f2"),
    11: np.dtype("<f8"),
    12: np.dtype("<u4"),
    13: np.dtype("<u8"),
}
_CODE_BY_KIND = {(dt.kind, dt.itemsize): code for code, dt in DTYPE_BY_CODE.items()}
# onnxruntime NodeArg type strings, for the specs the enclave reports.
ORT_TYPE_CODES = {
    "tensor(float)": 1,
    "tensor(uint8)": 2,
    "tensor(int8)": 3,
    "tensor(uint16)": 4,
    "tensor(int16)": 5,
    "tensor(int32)": 6,
    "tensor(int64)": 7,
    "tensor(bool)": 9,
    "tensor(float16)": 10,
    "tensor(double)": 11,
    "tensor(uint32)": 12,
    "tensor(uint64)": 13,
}

# Sandbox measures reported in READY, one bit each.
SANDBOX_FLAGS = {
    "non_dumpable": 1 << 0,
    "core_limit_zero": 1 << 1,
    "nofile_limited": 1 << 2,
    "address_space_limited": 1 << 3,
    "seccomp": 1 << 4,
    "key_locked": 1 << 5,
}


def dtype_code(dtype: np.dtype) -> int:
    """ONNX code for a numpy dtype; ProtocolError for dtypes the protocol does not carry."""
    code = _CODE_BY_KIND.get((dtype.kind, dtype.itemsize))
    if code is None:
        raise ProtocolError(ErrorCode.BAD_TENSOR, f"dtype {dtype} cannot be sent to the enclave")
    return code


# --------------------------------------------------------------------------------------------
# Frames


def encode_frame(msg_type: int, request_id: int, payload: bytes | bytearray | memoryview = b"") -> bytes:
    length = FRAME_OVERHEAD + len(payload)
    if length > MAX_MAX_FRAME_BYTES:
        raise ProtocolError(ErrorCode.FRAME_TOO_LARGE, f"a frame of {length} bytes does not fit a u32 length")
    return FRAME_HEADER.pack(length, msg_type, request_id) + bytes(payload)


def decode_header(data: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """(length, type, request id) of a 13-byte frame header."""
    return FRAME_HEADER.unpack(bytes(data[:HEADER_SIZE]))


# --------------------------------------------------------------------------------------------
# A bounded reader over one payload


class Reader:
    """Sequential reads from a payload; running past its end is a MALFORMED_FRAME, never IndexError."""

    def __init__(self, data: bytes | bytearray | memoryview, what: str = "payload") -> None:
        self._view = memoryview(data).cast("B")
        self._pos = 0
        self._what = what

    @property
    def remaining(self) -> int:
        return len(self._view) - self._pos

    def take(self, count: int, code: ErrorCode = ErrorCode.MALFORMED_FRAME) -> memoryview:
        if count < 0 or count > self.remaining:
            raise ProtocolError(
                code, f"{self._what} is truncated: needs {count} more bytes at offset {self._pos}, has {self.remaining}"
            )
        part = self._view[self._pos : self._pos + count]
        self._pos += count
        return part

    def unpack(self, fmt: struct.Struct, code: ErrorCode = ErrorCode.MALFORMED_FRAME) -> tuple:
        return fmt.unpack(self.take(fmt.size, code))

    def string(self, code: ErrorCode = ErrorCode.MALFORMED_FRAME) -> str:
        (length,) = self.unpack(_U16, code)
        raw = self.take(length, code)
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(code, f"{self._what} holds a name that is not UTF-8") from None

    def end(self, code: ErrorCode = ErrorCode.MALFORMED_FRAME) -> None:
        if self.remaining:
            raise ProtocolError(code, f"{self._what} has {self.remaining} unexpected trailing bytes")


_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
_F64 = struct.Struct(">d")
_U8_PAIR = struct.Struct(">BB")
_DIMS = [struct.Struct(f">{rank}Q") for rank in range(MAX_RANK + 1)]  # compiled once: decoded on every call


def _str16(text: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise ProtocolError(ErrorCode.BAD_TENSOR, "a name longer than 65535 bytes cannot be encoded")
    return _U16.pack(len(raw)) + raw


# --------------------------------------------------------------------------------------------
# Tensors: u16 count | per tensor: str16 name | u8 dtype | u8 rank | rank x u64 dims | raw LE bytes


def tensor_parts(tensors: Iterable[tuple[str, np.ndarray]]) -> list[bytes | memoryview]:
    """A tensor list as buffers to send with one gathered write: headers as bytes, each array's
    data as a view of the array itself (no copy unless its dtype or layout must change)."""
    items = list(tensors)
    if len(items) > MAX_TENSORS:
        raise ProtocolError(ErrorCode.BAD_TENSOR, f"at most {MAX_TENSORS} tensors fit one message")
    parts: list[bytes | memoryview] = [_U16.pack(len(items))]
    for name, value in items:
        array = np.asarray(value)
        code = dtype_code(array.dtype)
        if array.ndim > MAX_RANK:
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"tensor {name!r} has rank {array.ndim} > {MAX_RANK}")
        # Little-endian, C order: the one layout the other side accepts. (np.asarray, not
        # np.ascontiguousarray, which would turn a 0-d tensor into shape (1,).)
        array = np.asarray(array, dtype=DTYPE_BY_CODE[code], order="C")
        head = _str16(name) + struct.pack(f">BB{array.ndim}Q", code, array.ndim, *array.shape)
        parts.append(head)
        if array.nbytes:
            parts.append(array.data.cast("B"))
    return parts


def encode_tensors(tensors: Iterable[tuple[str, np.ndarray]]) -> bytes:
    return b"".join(tensor_parts(tensors))


Buffer = bytes | bytearray | memoryview


def frame_parts(msg_type: int, request_id: int, parts: Sequence[Buffer]) -> list[Buffer]:
    """A frame as buffers for one gathered write (sendmsg/writev): the header, then `parts` as they are."""
    length = FRAME_OVERHEAD + sum(len(part) for part in parts)
    if length > MAX_MAX_FRAME_BYTES:
        raise ProtocolError(ErrorCode.FRAME_TOO_LARGE, f"a frame of {length} bytes does not fit a u32 length")
    return [FRAME_HEADER.pack(length, msg_type, request_id), *parts]


def frame_length(parts: Sequence[Buffer]) -> int:
    """The length field of a frame made of `parts` (header excluded, type and request id included)."""
    return FRAME_OVERHEAD + sum(len(part) for part in parts)


def decode_tensors(payload: bytes | bytearray | memoryview) -> list[tuple[str, np.ndarray]]:
    """Decode a tensor list; arrays are views of `payload` (aligned copies only where alignment requires it).

    Offsets are checked against the payload's size before every read, so damage is a BAD_TENSOR
    ProtocolError, never an IndexError. (Written with unpack_from on one view rather than with
    `Reader`: this runs on every call on both sides, and it is about twice as fast.)"""
    view = memoryview(payload).cast("B")
    size = len(view)
    bad = ErrorCode.BAD_TENSOR

    def truncated(pos: int, count: int) -> ProtocolError:
        return ProtocolError(
            bad, f"tensor list is truncated: needs {count} more bytes at offset {pos}, has {max(0, size - pos)}"
        )

    if size < 2:
        raise truncated(0, 2)
    (count,) = _U16.unpack_from(view, 0)
    if count > MAX_TENSORS:
        raise ProtocolError(bad, f"tensor list declares {count} tensors, at most {MAX_TENSORS} are allowed")
    pos = 2
    tensors: list[tuple[str, np.ndarray]] = []
    for _ in range(count):
        if pos + 2 > size:
            raise truncated(pos, 2)
        (length,) = _U16.unpack_from(view, pos)
        pos += 2
        if pos + length + 2 > size:
            raise truncated(pos, length + 2)
        try:
            name = bytes(view[pos : pos + length]).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(bad, "tensor list holds a name that is not UTF-8") from None
        code, rank = _U8_PAIR.unpack_from(view, pos + length)
        pos += length + 2
        dtype = DTYPE_BY_CODE.get(code)
        if dtype is None:
            raise ProtocolError(bad, f"tensor {name!r} has unknown dtype code {code}")
        if rank > MAX_RANK:
            raise ProtocolError(bad, f"tensor {name!r} has rank {rank} > {MAX_RANK}")
        if pos + 8 * rank > size:
            raise truncated(pos, 8 * rank)
        dims = _DIMS[rank].unpack_from(view, pos) if rank else ()
        pos += 8 * rank
        # Python ints cannot overflow; the size is checked against what is actually left.
        elements = math.prod(dims)
        nbytes = elements * dtype.itemsize
        if nbytes > size - pos:
            raise ProtocolError(
                bad, f"tensor {name!r} of shape {list(dims)} needs {nbytes} bytes, the message has {size - pos}"
            )
        try:
            array = np.frombuffer(view, dtype=dtype, count=elements, offset=pos).reshape(dims)
        except (ValueError, OverflowError):  # e.g. (0, 2**63): no data, but dims numpy cannot represent
            raise ProtocolError(bad, f"tensor {name!r} has dimensions {list(dims)} numpy cannot represent") from None
        pos += nbytes
        if not array.flags.aligned:
            array = array.copy()
        tensors.append((name, array))
    if pos != size:
        raise ProtocolError(bad, f"tensor list has {size - pos} unexpected trailing bytes")
    return tensors


# --------------------------------------------------------------------------------------------
# Tensor specs (READY): u16 count | per spec: str16 name | u8 dtype (0 = not a tensor) | u8 rank | rank x i64 dim


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of a tensor; None in `shape` is a dynamic dimension."""

    name: str
    dtype: np.dtype | None
    shape: tuple[int | None, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "dtype": None if self.dtype is None else self.dtype.name,
            "shape": [d if d is not None else "?" for d in self.shape],
        }


def encode_specs(specs: Sequence[TensorSpec]) -> bytes:
    parts = [_U16.pack(len(specs))]
    for spec in specs:
        code = 0 if spec.dtype is None else dtype_code(spec.dtype)
        dims = [-1 if d is None else d for d in spec.shape]
        parts.append(_str16(spec.name) + struct.pack(f">BB{len(dims)}q", code, len(dims), *dims))
    return b"".join(parts)


def _decode_specs(reader: Reader) -> tuple[TensorSpec, ...]:
    (count,) = reader.unpack(_U16)
    specs = []
    for _ in range(count):
        name = reader.string()
        code, rank = reader.unpack(struct.Struct(">BB"))
        if code and code not in DTYPE_BY_CODE:
            raise ProtocolError(ErrorCode.MALFORMED_FRAME, f"spec {name!r} has unknown dtype code {code}")
        dims = reader.unpack(struct.Struct(f">{rank}q")) if rank else ()
        specs.append(TensorSpec(name, DTYPE_BY_CODE[code] if code else None, tuple(None if d < 0 else d for d in dims)))
    return tuple(specs)


class KnownTensors:
    """One session's tensor list of known names, dtypes and ranks (from READY's specs), compiled
    once: every per-call header is a fixed prefix plus the dims, so encoding packs only the dims
    and decoding compares one slice of bytes per tensor instead of parsing name, dtype and rank.

    Both methods accept only what exactly fits the specs, in their order, and return None for
    anything else; the caller then takes the general path (`tensor_parts`, `decode_tensors` and
    its own checks), which says what is wrong. So the fast path can refuse but never accept more.
    """

    def __init__(self, specs: Sequence[TensorSpec]) -> None:
        self.names = [spec.name for spec in specs]
        self._count = _U16.pack(len(specs))
        # Per tensor: its header's fixed part (the first one led by the tensor count), the dims'
        # struct, dtype, rank and (axis, size) of each fixed dim. Built once: a call only packs or
        # compares; what differs from the general codec is the order of the checks, not which.
        self._items: list[tuple[bytes, struct.Struct, np.dtype, int, tuple[tuple[int, int], ...]]] = []
        self.usable = len(specs) <= MAX_TENSORS and all(
            spec.dtype is not None and len(spec.shape) <= MAX_RANK for spec in specs
        )
        if not self.usable:
            return
        for index, spec in enumerate(specs):
            assert spec.dtype is not None
            code = dtype_code(spec.dtype)
            prefix = _str16(spec.name) + _U8_PAIR.pack(code, len(spec.shape))
            if index == 0:
                prefix = self._count + prefix
            fixed = tuple((axis, dim) for axis, dim in enumerate(spec.shape) if dim is not None)
            self._items.append((prefix, _DIMS[len(spec.shape)], DTYPE_BY_CODE[code], len(spec.shape), fixed))

    def parts(self, tensors: Sequence[tuple[str, np.ndarray]]) -> list[bytes | memoryview] | None:
        """What `tensor_parts(tensors)` returns, or None if a tensor does not fit its spec."""
        if not self.usable or len(tensors) != len(self._items):
            return None
        if not tensors:
            return [self._count]
        parts: list[bytes | memoryview] = []
        pending = b""  # header bytes of zero-size tensors, sent with the next header
        for (prefix, dims, dtype, rank, fixed), expected, (name, array) in zip(self._items, self.names, tensors):
            if name != expected or type(array) is not np.ndarray:
                return None
            got = array.dtype
            if (got is not dtype and got != dtype) or array.ndim != rank or not array.flags.c_contiguous:
                return None
            shape = array.shape
            for axis, dim in fixed:
                if shape[axis] != dim:
                    return None
            header = prefix + dims.pack(*shape)
            if pending:
                header, pending = pending + header, b""
            if array.nbytes:
                parts.append(header)
                parts.append(array.data.cast("B"))
            else:
                pending = header
        if pending:
            parts.append(pending)
        return parts

    def decode(self, payload: bytes | bytearray | memoryview) -> list[np.ndarray] | None:
        """The arrays (views of `payload`, in spec order) if it holds exactly these tensors; else None."""
        if not self.usable:
            return None
        if isinstance(payload, memoryview):
            payload = payload.tobytes()
        size = len(payload)
        if not self._items:
            return [] if payload == self._count else None
        pos = 0
        arrays = []
        for prefix, dims_format, dtype, _rank, fixed in self._items:
            if not payload.startswith(prefix, pos):
                return None
            pos += len(prefix)
            if pos + dims_format.size > size:
                return None
            dims = dims_format.unpack_from(payload, pos)
            pos += dims_format.size
            for axis, dim in fixed:
                if dims[axis] != dim:
                    return None
            count = math.prod(dims)
            nbytes = count * dtype.itemsize
            if nbytes > size - pos:
                return None
            try:
                array = np.frombuffer(payload, dtype, count, pos).reshape(dims)
            except (TypeError, ValueError, OverflowError):  # dims numpy cannot represent
                return None
            if not array.flags.aligned:
                array = array.copy()
            arrays.append(array)
            pos += nbytes
        return arrays if pos == size else None


# --------------------------------------------------------------------------------------------
# Policy: u8 mode (1 label, 2 topk, 3 scores) | u32 k | u64 budget (NO_LIMIT = none) | f64 rate (0 = none)

_MODES = {"label": 1, "topk": 2, "scores": 3}
_COUNTER_CODES: dict[str | None, int] = {"session": 1, "sealed": 2, "tpm": 3}  # 0: not said
_POLICY = struct.Struct(">BIQd")


def encode_policy(policy: OutputPolicy) -> bytes:
    return _POLICY.pack(
        _MODES[policy.output],
        policy.k or 0,
        NO_LIMIT if policy.query_budget is None else policy.query_budget,
        policy.rate_limit_per_s or 0.0,
    )


def _decode_policy(reader: Reader) -> OutputPolicy:
    mode, k, budget, rate = reader.unpack(_POLICY)
    names = {v: n for n, v in _MODES.items()}
    if mode not in names:
        raise ProtocolError(ErrorCode.MALFORMED_FRAME, f"unknown output policy mode {mode}")
    return OutputPolicy(
        output=names[mode],
        k=k if names[mode] == "topk" else None,
        query_budget=None if budget == NO_LIMIT else budget,
        rate_limit_per_s=rate or None,
    )


# --------------------------------------------------------------------------------------------
# Messages


def encode_load(header: bytes, ciphertext_size: int, budget_state: bytes | None = None) -> bytes:
    """LOAD: u32 header length | header | u64 ciphertext size [| u32 state length | sealed budget state];
    the ciphertext follows in LOAD_DATA frames. The state trailer goes only to an enclave whose
    HELLO announced CAP_BUDGET_STATE (length 0: the host has no state stored yet)."""
    payload = _U32.pack(len(header)) + bytes(header) + _U64.pack(ciphertext_size)
    if budget_state is not None:
        payload += _U32.pack(len(budget_state)) + bytes(budget_state)
    return payload


def decode_load(payload: bytes | bytearray | memoryview) -> tuple[bytes, int, bytes | None]:
    """(header, ciphertext size, sealed budget state or None when the host sent no trailer or an empty one)."""
    reader = Reader(payload, "LOAD payload")
    (length,) = reader.unpack(_U32)
    header = bytes(reader.take(length))
    (size,) = reader.unpack(_U64)
    state: bytes | None = None
    if reader.remaining:
        (state_length,) = reader.unpack(_U32)
        state = bytes(reader.take(state_length)) or None
    reader.end()
    return header, size, state


@dataclass(frozen=True)
class Hello:
    """Sent once, unsolicited (request id 0), when the enclave has its key and is ready for LOAD."""

    protocol_version: int
    max_frame_bytes: int
    key_id: str  # 16 hex digits; public (it is in every manifest sealed for this key)
    started_at: float  # Unix time the enclave process started
    capabilities: int = 0  # CAP_* bits; an enclave that sends none (the native one) has none


CAP_BUDGET_STATE = 1 << 0  # keeps a persistent budget: takes a state in LOAD, sends BUDGET_STATE frames

_HELLO = struct.Struct(">HI8sd")


def encode_hello(hello: Hello) -> bytes:
    head = _HELLO.pack(hello.protocol_version, hello.max_frame_bytes, bytes.fromhex(hello.key_id), hello.started_at)
    return head + _U32.pack(hello.capabilities)


def decode_hello(payload: bytes | bytearray | memoryview) -> Hello:
    reader = Reader(payload, "HELLO payload")
    version, max_frame, key_id, started = reader.unpack(_HELLO)
    # Later versions may append fields; a reader takes what it knows.
    (capabilities,) = reader.unpack(_U32) if reader.remaining >= _U32.size else (0,)
    return Hello(version, max_frame, key_id.hex(), started, capabilities)


@dataclass(frozen=True)
class Ready:
    """READY: what the loaded private part takes and returns, and the policy and sandbox in force."""

    inputs: tuple[TensorSpec, ...]
    private_outputs: tuple[TensorSpec, ...]
    results: tuple[TensorSpec, ...]  # what RESULT frames carry under the policy
    policy: OutputPolicy
    started_at: float  # Unix time the enclave process started
    ready_seconds: float  # from process start to READY, measured inside the enclave
    sandbox: frozenset[str]


_READY_TAIL = struct.Struct(">ddI")


def encode_ready(ready: Ready) -> bytes:
    flags = 0
    for name in ready.sandbox:
        flags |= SANDBOX_FLAGS[name]
    return b"".join(
        [
            encode_specs(ready.inputs),
            encode_specs(ready.private_outputs),
            encode_specs(ready.results),
            encode_policy(ready.policy),
            _READY_TAIL.pack(ready.started_at, ready.ready_seconds, flags),
            _U8.pack(_COUNTER_CODES.get(ready.policy.budget_counter, 0)),
        ]
    )


def decode_ready(payload: bytes | bytearray | memoryview) -> Ready:
    reader = Reader(payload, "READY payload")
    inputs, private_outputs, results = _decode_specs(reader), _decode_specs(reader), _decode_specs(reader)
    policy = _decode_policy(reader)
    started, seconds, flags = reader.unpack(_READY_TAIL)
    sandbox = frozenset(name for name, bit in SANDBOX_FLAGS.items() if flags & bit)
    if reader.remaining:  # appended after the first version: where the budget's count lives
        (counter,) = reader.unpack(_U8)
        names = {code: name for name, code in _COUNTER_CODES.items()}
        policy = OutputPolicy(policy.output, policy.k, policy.query_budget, policy.rate_limit_per_s, names.get(counter))
    return Ready(inputs, private_outputs, results, policy, started, seconds, sandbox)


@dataclass(frozen=True)
class Stats:
    samples_served: int
    requests_served: int
    requests_refused: int
    query_budget: int | None
    budget_left: int | None
    uptime_s: float


_STATS = struct.Struct(">QQQQQd")


def encode_stats(stats: Stats) -> bytes:
    return _STATS.pack(
        stats.samples_served,
        stats.requests_served,
        stats.requests_refused,
        NO_LIMIT if stats.query_budget is None else stats.query_budget,
        NO_LIMIT if stats.budget_left is None else stats.budget_left,
        stats.uptime_s,
    )


def decode_stats(payload: bytes | bytearray | memoryview) -> Stats:
    reader = Reader(payload, "STATS_REPLY payload")
    served, requests, refused, budget, left, uptime = reader.unpack(_STATS)
    return Stats(
        served,
        requests,
        refused,
        None if budget == NO_LIMIT else budget,
        None if left == NO_LIMIT else left,
        uptime,
    )


def encode_error(code: ErrorCode, message: str) -> bytes:
    raw = message.encode("utf-8")[:MAX_ERROR_MESSAGE_BYTES]
    return _U16.pack(int(code)) + raw.decode("utf-8", errors="ignore").encode("utf-8")


def decode_error(payload: bytes | bytearray | memoryview) -> tuple[int, str]:
    """(code, message); the code is returned as an int so codes from newer enclaves still decode."""
    reader = Reader(payload, "ERROR payload")
    (code,) = reader.unpack(_U16)
    message = bytes(reader.take(reader.remaining)).decode("utf-8", errors="replace")
    return code, message


def error_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"code {code}"


def drop_sent(views: list[memoryview], sent: int) -> None:
    """Remove the first `sent` bytes from `views`, in place: what a partial writev/sendmsg sent.

    Shared by both ends of the channel (the enclave's writev and the host's sendmsg)."""
    while sent:
        if sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        else:
            views[0] = views[0][sent:]
            sent = 0
