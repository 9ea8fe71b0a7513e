"""The enclave process: holds the enclave key, decrypts the private part, answers under the policy.

One process per session. It speaks the protocol of protocol.py on one bidirectional file
descriptor and handles requests one at a time (the host multiplexes threads by request id):

    start --HELLO--> WAITING --LOAD(+LOAD_DATA)--> (decrypt, build, sandbox) --READY--> SERVING
    WAITING: LOAD (retry allowed after a failed one), PING, SHUTDOWN; anything else is BAD_STATE
    SERVING: INFER, STATS, PING, SHUTDOWN; a second LOAD is BAD_STATE
    SHUTDOWN --BYE--> wipe, exit 0;  end of input: wipe, exit 0

A malformed, oversized or unknown frame gets an ERROR reply and the enclave keeps serving; the
only frames it cannot recover from are ones whose length field itself is lost (the host closed
the stream mid-frame).

Error messages never carry onnxruntime's own text: it can name private nodes and shapes, and the
architecture of the private part is one of the assets. They say what the host can act on.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import mmap
import os
import re
import select
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from modelcloak.enclave import budget as budget_mod
from modelcloak.enclave import chunks, protocol, sandbox, spin
from modelcloak.enclave import policy as policy_mod
from modelcloak.enclave.policy import Meter, OutputPolicy, PolicyError, PolicyRefusal
from modelcloak.enclave.protocol import ErrorCode, MsgType, ProtocolError, TensorSpec

MAGIC = b"\x89MCLOAK\n"
FORMAT_VERSION = 1
_PREFIX = struct.Struct(">8sHI")
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MIN_CHUNK_SIZE = 4 * 1024
MAX_CHUNK_SIZE = 64 * 1024 * 1024
MAX_SECTIONS = 64
_SECTION_NAME = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_HEX16 = re.compile(r"[0-9a-f]{16}")
_MADV_DONTDUMP = getattr(mmap, "MADV_DONTDUMP", None)
_READ_AHEAD = 64 * 1024  # the channel's read buffer: a request of this size or less takes one read
_MAX_IOVECS = 512  # per writev; Linux refuses more than IOV_MAX (1024)
_HOST_TYPES = {int(kind): kind for kind in protocol.HOST_TO_ENCLAVE}

# onnxruntime's telemetry events name the graphs it runs ("main_graph_private"); switch them off
# before the first session. Its event database is kept from opening at all by the HOME that
# __main__ sets (sandbox.scrub_environment), since onnxruntime opens it at import.
if hasattr(ort, "disable_telemetry_events"):
    ort.disable_telemetry_events()


def key_id(key: bytes) -> str:
    """The public id of a key, the same derivation the host uses (docs/FORMAT.md, "Keys")."""
    return chunks.derive(key, b"", "key-id", 8).hex()


class Refusal(Exception):
    """A request the enclave answers with an ERROR frame; the message is safe to show the host."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class _EndOfInput(Exception):
    """The host closed its end of the connection."""


class _LoadInterrupted(Exception):
    """A frame other than this LOAD's LOAD_DATA arrived before the declared ciphertext was complete."""


@dataclass
class _Frame:
    type: MsgType
    request_id: int
    payload: bytearray


# --------------------------------------------------------------------------------------------
# Transport


class Channel:
    """Frames over one bidirectional descriptor (socket pair end, vsock or TCP socket).

    Reads go through a small buffer, so a request usually costs one read system call (header and
    body together) instead of three; large bodies are read straight into their own buffer. Writes
    gather the frame header and the payload's parts (tensor data included) into one writev.
    """

    def __init__(self, fd: int, max_frame_bytes: int, spin_seconds: float = spin.DEFAULT_SPIN_SECONDS) -> None:
        os.set_blocking(fd, True)  # a non-blocking descriptor from the host would make reads fail spuriously
        self.fd = fd
        self.max_frame_bytes = max_frame_bytes
        # Waiting for the next request spins briefly before it blocks (spin.py): back-to-back
        # calls then skip the enclave's sleep and wake-up.
        self._spinner = spin.Spinner(spin_seconds)
        self._readable = select.poll()
        self._readable.register(fd, select.POLLIN)
        self._pushback: list[_Frame] = []
        self._inbox = bytearray(_READ_AHEAD)
        self._start = 0  # unread bytes are self._inbox[self._start : self._end]
        self._end = 0

    def _take_buffered(self, count: int) -> bytearray:
        out = self._inbox[self._start : self._start + count]
        self._start += count
        return out

    def _read_exact(self, count: int, *, boundary: bool = False) -> bytearray:
        buffered = self._end - self._start
        if count <= buffered:
            return self._take_buffered(count)
        if count <= len(self._inbox):
            # Small: refill the buffer (reading ahead into the next frame is fine, it stays buffered).
            if self._start:
                self._inbox[:buffered] = self._inbox[self._start : self._end]
                self._start, self._end = 0, buffered
            view = memoryview(self._inbox)
            while self._end < count:
                got = os.readv(self.fd, [view[self._end :]])
                if got == 0:
                    nothing = boundary and self._end == 0
                    raise _EndOfInput("end of input" if nothing else "end of input inside a frame")
                self._end += got
            return self._take_buffered(count)
        # Large: what is buffered, then the rest straight into the body's own buffer.
        buffer = bytearray(count)
        buffer[:buffered] = self._inbox[self._start : self._end]
        self._start = self._end = 0
        view = memoryview(buffer)
        done = buffered
        while done < count:
            got = os.readv(self.fd, [view[done:]])
            if got == 0:
                raise _EndOfInput("end of input" if boundary and done == 0 else "end of input inside a frame")
            done += got
        return buffer

    def _discard(self, count: int) -> None:
        buffered = min(count, self._end - self._start)
        self._start += buffered
        count -= buffered
        scratch = memoryview(bytearray(min(count, 1 << 20) or 1))
        while count > 0:
            got = os.readv(self.fd, [scratch[: min(count, len(scratch))]])
            if got == 0:
                raise _EndOfInput("end of input inside a discarded frame")
            count -= got

    def _buffered_frame(self) -> _Frame | None:
        """The next frame if it lies whole and well formed in the read buffer after at most one read
        (the usual small request: one system call, one header unpack); None leaves everything
        buffered for next_frame's step-by-step path, which reads the rest and answers violations."""
        if self._start == self._end:
            self._start = self._end = 0
            spinner = self._spinner
            began = time.perf_counter()
            if spinner.armed:
                spin.spin_until_readable(self._readable, spinner, began)
            with memoryview(self._inbox) as view:
                got = os.readv(self.fd, [view])  # blocks only if the spin ran out
            spinner.waited(time.perf_counter() - began)
            if got == 0:
                raise _EndOfInput("end of input")
            self._end = got
        if self._end - self._start < protocol.HEADER_SIZE:
            return None
        length, code, request_id = protocol.FRAME_HEADER.unpack_from(self._inbox, self._start)
        end = self._start + 4 + length
        kind = _HOST_TYPES.get(code)
        if kind is None or end > self._end or length < protocol.FRAME_OVERHEAD or length > self.max_frame_bytes:
            return None
        payload = self._inbox[self._start + protocol.HEADER_SIZE : end]
        self._start = end
        return _Frame(kind, request_id, payload)

    def pushback(self, frame: _Frame) -> None:
        self._pushback.append(frame)

    def next_frame(self) -> _Frame:
        """The next well-framed host message; violations are answered here and skipped."""
        if self._pushback:
            return self._pushback.pop()
        while True:
            frame = self._buffered_frame()
            if frame is not None:
                return frame
            (length,) = struct.unpack(">I", self._read_exact(4, boundary=True))
            if length < protocol.FRAME_OVERHEAD:
                self._discard(length)
                self.send_error(
                    0, ErrorCode.MALFORMED_FRAME, f"frame length {length} is shorter than its type and request id (9)"
                )
                continue
            msg_type, request_id = struct.unpack(">BQ", self._read_exact(protocol.FRAME_OVERHEAD))
            body = length - protocol.FRAME_OVERHEAD
            if length > self.max_frame_bytes:
                # Answer first, then skip the body: the stream stays in step with the host.
                self.send_error(
                    request_id,
                    ErrorCode.FRAME_TOO_LARGE,
                    f"frame of {length} bytes exceeds this enclave's limit of {self.max_frame_bytes}; "
                    "its body was discarded",
                )
                self._discard(body)
                continue
            payload = self._read_exact(body)
            if msg_type not in protocol.HOST_TO_ENCLAVE:
                self.send_error(request_id, ErrorCode.UNKNOWN_TYPE, f"unknown message type 0x{msg_type:02x}")
                continue
            return _Frame(MsgType(msg_type), request_id, payload)

    def send(
        self,
        msg_type: MsgType,
        request_id: int,
        payload: protocol.Buffer | list[bytes | memoryview] = b"",
    ) -> None:
        """One frame; `payload` is a buffer or a list of buffers (protocol.tensor_parts) sent as they are."""
        parts: list[protocol.Buffer] = list(payload) if isinstance(payload, list) else [payload]
        body = protocol.frame_length(parts) - protocol.FRAME_OVERHEAD
        length = protocol.FRAME_OVERHEAD + body
        if length > protocol.MAX_MAX_FRAME_BYTES:
            raise ProtocolError(ErrorCode.FRAME_TOO_LARGE, f"a frame of {length} bytes does not fit a u32 length")
        self.send_parts(msg_type, request_id, parts, body)

    def send_parts(self, msg_type: MsgType, request_id: int, parts: Sequence[protocol.Buffer], body: int) -> None:
        """One frame of `parts`, whose lengths the caller has already added up to `body` (and checked
        against the frame limit): the per-call reply path counts its parts once, not three times."""
        frame: list[protocol.Buffer] = [
            protocol.FRAME_HEADER.pack(protocol.FRAME_OVERHEAD + body, msg_type, request_id),
            *parts,
        ]
        if len(frame) <= _MAX_IOVECS:
            written = os.writev(self.fd, frame)
            if written == protocol.HEADER_SIZE + body:
                return  # the usual case: the whole frame in one call
        else:
            written = 0
        views = [memoryview(part).cast("B") for part in frame if len(part)]
        protocol.drop_sent(views, written)  # the part the first writev already sent
        while views:
            protocol.drop_sent(views, os.writev(self.fd, views[:_MAX_IOVECS]))

    def send_error(self, request_id: int, code: ErrorCode, message: str) -> None:
        self.send(MsgType.ERROR, request_id, protocol.encode_error(code, message))


class _LoadStream:
    """The ciphertext of one LOAD, pulled from its LOAD_DATA frames as decryption asks for it."""

    def __init__(self, channel: Channel, request_id: int, total: int) -> None:
        self._channel = channel
        self._request_id = request_id
        self.total = total
        self.received = 0
        self.consumed = 0
        self._pending = memoryview(b"")
        self.interrupted = False

    def _next_data(self) -> memoryview:
        frame = self._channel.next_frame()
        if frame.type != MsgType.LOAD_DATA or frame.request_id != self._request_id:
            self._channel.pushback(frame)
            self.interrupted = True
            raise _LoadInterrupted(f"expected LOAD_DATA for request {self._request_id}, got {frame.type.name}")
        if self.received + len(frame.payload) > self.total:
            # The excess cannot belong to anything else; drop it so the stream stays framed.
            self.received = self.total
            raise Refusal(
                ErrorCode.MALFORMED_FRAME, f"LOAD_DATA carries more than the {self.total} bytes LOAD declared"
            )
        self.received += len(frame.payload)
        return memoryview(frame.payload)

    def read_into(self, offset: int, destination: memoryview) -> None:
        """`chunks.decrypt_section_into`'s reader: offsets arrive in order, chunk after chunk."""
        if offset != self.consumed:
            raise Refusal(ErrorCode.INTERNAL, "ciphertext requested out of order")
        filled = 0
        while filled < len(destination):
            if not len(self._pending):
                self._pending = self._next_data()
                continue
            count = min(len(self._pending), len(destination) - filled)
            destination[filled : filled + count] = self._pending[:count]
            self._pending = self._pending[count:]
            filled += count
        self.consumed += filled

    def drain(self) -> None:
        """Consume the rest of this LOAD's data after a failure, unless another message cut in."""
        self._pending = memoryview(b"")
        while not self.interrupted and self.received < self.total:
            try:
                self._next_data()
            except (_LoadInterrupted, Refusal):
                return


# --------------------------------------------------------------------------------------------
# Reading the bundle header (docs/FORMAT.md), bounded because it is not yet authenticated


@dataclass(frozen=True)
class SealedSection:
    salt: bytes
    chunk_size: int
    name: str
    index: int
    size: int
    policy: OutputPolicy
    manifest_digest: bytes
    batch_symbol: str = "batch"  # the symbolic dim the budget counts (manifest split.batch)


def _field(document: dict[str, Any], name: str, kind: type, where: str = "manifest") -> Any:
    value = document.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise Refusal(ErrorCode.BAD_HEADER, f"{where} field {name!r} is missing or not a {kind.__name__}")
    return value


def parse_header(header: bytes, own_key_id: str) -> SealedSection:
    """Find the enclave's section in a bundle header and check it was sealed for this key."""
    bad = ErrorCode.BAD_HEADER
    if len(header) < _PREFIX.size or header[:8] != MAGIC:
        raise Refusal(bad, "LOAD does not carry a modelcloak bundle header (bad magic bytes)")
    _, version, length = _PREFIX.unpack_from(header)
    if version != FORMAT_VERSION:
        raise Refusal(
            bad, f"bundle format version {version} is not supported by this enclave (it reads {FORMAT_VERSION})"
        )
    if length > MAX_MANIFEST_BYTES or len(header) != _PREFIX.size + length:
        raise Refusal(bad, f"header is {len(header)} bytes but its prefix announces a {length}-byte manifest")
    try:
        document = json.loads(header[_PREFIX.size :].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise Refusal(bad, "bundle manifest is not valid UTF-8 JSON") from None
    if not isinstance(document, dict) or document.get("format") != "modelcloak-bundle":
        raise Refusal(bad, "bundle manifest is not a modelcloak manifest")
    if _field(document, "format_version", int) != version:
        raise Refusal(bad, "manifest format_version disagrees with the header")
    encryption = _field(document, "encryption", dict)
    if encryption.get("aead") != "AES-256-GCM" or encryption.get("kdf") != "HKDF-SHA256":
        raise Refusal(
            bad, "manifest names a cipher this enclave does not implement (expected AES-256-GCM, HKDF-SHA256)"
        )
    try:
        salt = base64.b64decode(_field(encryption, "salt", str, "encryption"), validate=True)
    except (binascii.Error, ValueError):
        raise Refusal(bad, "manifest encryption.salt is not base64") from None
    if len(salt) != 32:
        raise Refusal(bad, "manifest encryption.salt must be 32 bytes")
    chunk_size = _field(encryption, "chunk_size", int, "encryption")
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise Refusal(bad, f"manifest chunk_size {chunk_size} is outside {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
    sections = _field(document, "sections", list)
    if not 1 <= len(sections) <= MAX_SECTIONS:
        raise Refusal(bad, f"manifest must list 1..{MAX_SECTIONS} sections")
    mine: list[tuple[int, str, int]] = []
    for index, entry in enumerate(sections):
        if not isinstance(entry, dict):
            raise Refusal(bad, "manifest section entries must be objects")
        name = _field(entry, "name", str, "section")
        size = _field(entry, "size", int, "section")
        if not _SECTION_NAME.fullmatch(name) or not 0 <= size <= 1 << 50:
            raise Refusal(bad, f"manifest section {name!r} has an invalid name or size")
        if entry.get("key", "host") == "enclave":
            mine.append((index, name, size))
    if len(mine) != 1:
        raise Refusal(bad, f"the bundle must hold exactly one section sealed for the enclave, it holds {len(mine)}")
    enclave_key = _field(document, "enclave_key", dict)
    sealed_for = enclave_key.get("id")
    if not isinstance(sealed_for, str) or not _HEX16.fullmatch(sealed_for):
        raise Refusal(bad, "manifest enclave_key.id must be 16 lowercase hex digits")
    if sealed_for != own_key_id:
        raise Refusal(
            ErrorCode.WRONG_KEY,
            f"wrong enclave key: the bundle was sealed for enclave key id {sealed_for}, "
            f"this enclave holds key id {own_key_id}",
        )
    try:
        policy = policy_mod.parse_policy(document.get("policy") or None)
    except PolicyError as exc:
        raise Refusal(ErrorCode.BAD_POLICY, f"cannot enforce the bundle's policy: {exc}") from None
    split = document.get("split")
    batch = split.get("batch", "batch") if isinstance(split, dict) else "batch"
    if not isinstance(batch, str) or not batch:
        raise Refusal(bad, "manifest split.batch must name the batch axis's symbol")
    index, name, size = mine[0]
    return SealedSection(salt, chunk_size, name, index, size, policy, hashlib.sha256(header).digest(), batch)


# --------------------------------------------------------------------------------------------
# The server


def _spec_of(arg: Any) -> TensorSpec:
    code = protocol.ORT_TYPE_CODES.get(arg.type)
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in (arg.shape or []))
    return TensorSpec(arg.name, protocol.DTYPE_BY_CODE[code] if code else None, shape)


def _batch_axis(arg: Any, symbol: str) -> int | None:
    """The axis of an onnxruntime input whose symbolic dim is the batch symbol, if it has one."""
    for axis, dim in enumerate(arg.shape or []):
        if dim == symbol:
            return axis
    return None


def _sample_axes_of(inputs: Sequence[TensorSpec], batch_axes: Sequence[int | None]) -> tuple[int | None, ...]:
    """Per input, the axis whose length the budget charges (None: the input counts as 1 sample).

    Samples are rows of the batch axis the cut declares (axis 1 in a sequence-first layout); the
    largest over the inputs counts, so no input can hide some. A part whose inputs name no batch
    axis (a bundle from before split.batch) is charged by its inputs' leading dims."""
    if any(axis is not None for axis in batch_axes):
        return tuple(batch_axes)
    return tuple(0 if spec.shape else None for spec in inputs)


def _shape_text(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


class EnclaveServer:
    def __init__(
        self,
        fd: int,
        key: sandbox.KeyBuffer,
        *,
        threads: int | None,
        max_frame_bytes: int,
        use_seccomp: bool,
        hardening: sandbox.Hardening,
        started_at: float,
        started_monotonic: float,
        tpm: str | None = None,
        spin_seconds: float = spin.DEFAULT_SPIN_SECONDS,
    ) -> None:
        self.channel = Channel(fd, max_frame_bytes, spin_seconds)
        self._tpm = tpm  # where a `tpm` budget's counter lives (a TCTI string); opened at LOAD, before the sandbox
        self._budget: budget_mod.PersistentBudget | None = None
        self._key: sandbox.KeyBuffer | None = key
        self.key_id = key_id(key.key())
        self._threads = threads
        self._use_seccomp = use_seccomp
        self._hardening = hardening
        self._started_at = started_at
        self._started_monotonic = started_monotonic
        self._session: ort.InferenceSession | None = None
        self._inputs: tuple[TensorSpec, ...] = ()
        self._sample_axes: tuple[int | None, ...] = ()  # per input: the axis counted as samples; None: 1
        self._outputs: tuple[TensorSpec, ...] = ()
        self._output_names: list[str] = []
        self._policy = OutputPolicy()
        self._meter: Meter | None = None
        # Compiled at LOAD from the specs READY announces: the per-call fast paths (protocol.KnownTensors).
        self._request = protocol.KnownTensors(())
        self._reply = protocol.KnownTensors(())
        self._run: Any = None

    # -- lifecycle ------------------------------------------------------------------------

    def hello(self) -> None:
        hello = protocol.Hello(
            protocol.PROTOCOL_VERSION,
            self.channel.max_frame_bytes,
            self.key_id,
            self._started_at,
            protocol.CAP_BUDGET_STATE,
        )
        self.channel.send(MsgType.HELLO, 0, protocol.encode_hello(hello))

    def serve(self) -> int:
        """Serve until SHUTDOWN or end of input; returns the process exit code."""
        try:
            self.hello()
            while True:
                frame = self.channel.next_frame()
                if frame.type == MsgType.SHUTDOWN:
                    self._settle_budget(frame.request_id)
                    self.wipe()
                    self.channel.send(MsgType.BYE, frame.request_id)
                    return 0
                try:
                    self._dispatch(frame)
                except Refusal as refusal:
                    self.channel.send_error(frame.request_id, refusal.code, str(refusal))
                except _SandboxFailure as failure:
                    self.channel.send_error(frame.request_id, ErrorCode.SANDBOX_FAILED, str(failure))
                    return 4
                except (_EndOfInput, BrokenPipeError, ConnectionError):
                    raise
                except MemoryError:
                    self.channel.send_error(frame.request_id, ErrorCode.INTERNAL, "the enclave ran out of memory")
                except Exception as exc:  # a bug must cost one request, not the session
                    self.channel.send_error(
                        frame.request_id, ErrorCode.INTERNAL, f"internal enclave error ({type(exc).__name__})"
                    )
        except (_EndOfInput, BrokenPipeError, ConnectionError):
            return 0
        finally:
            self.wipe()

    def _settle_budget(self, request_id: int) -> None:
        """On SHUTDOWN, store the exact count in place of the reservation (see budget.py)."""
        if self._budget is None or self._meter is None:
            return
        try:
            blob = self._budget.settle(self._meter.samples_served)
        except budget_mod.BudgetStateError:
            return  # the reserved count stays stored: the owner loses nothing
        if blob is not None:
            self.channel.send(MsgType.BUDGET_STATE, request_id, blob)

    def wipe(self) -> None:
        """Drop every secret this process still controls. onnxruntime's allocator is not ours."""
        if self._key is not None:
            self._key.wipe()
            self._key = None
        self._session = None
        if self._budget is not None:
            self._budget.close()
            self._budget = None

    def _dispatch(self, frame: _Frame) -> None:
        kind = frame.type
        if kind is MsgType.INFER and self._session is not None:  # the per-call case, tested first
            self._infer(frame)
        elif kind == MsgType.PING:
            self.channel.send(MsgType.PONG, frame.request_id, frame.payload)
        elif kind == MsgType.LOAD:
            self._load(frame)
        elif kind == MsgType.LOAD_DATA:
            raise Refusal(ErrorCode.BAD_STATE, "LOAD_DATA without a LOAD in progress")
        elif self._session is None:
            raise Refusal(ErrorCode.BAD_STATE, f"{kind.name} before a model was loaded; send LOAD first")
        elif kind == MsgType.INFER:
            self._infer(frame)
        elif kind == MsgType.STATS:
            self._stats(frame)

    # -- LOAD ----------------------------------------------------------------------------------

    def _load(self, frame: _Frame) -> None:
        try:
            header, ciphertext_size, state = protocol.decode_load(frame.payload)
        except ProtocolError as exc:
            raise Refusal(exc.code, str(exc)) from None
        stream = _LoadStream(self.channel, frame.request_id, ciphertext_size)
        try:
            ready = self._load_from(header, stream, state, frame.request_id)
        except _LoadInterrupted as exc:
            raise Refusal(ErrorCode.BAD_STATE, f"LOAD was interrupted: {exc}") from None
        except (_EndOfInput, ConnectionError):
            raise
        except Exception:
            stream.drain()  # one reply per LOAD, and the next frame read is a real one
            raise
        self.channel.send(MsgType.READY, frame.request_id, protocol.encode_ready(ready))

    def _load_from(self, header: bytes, stream: _LoadStream, state: bytes | None, request_id: int) -> protocol.Ready:
        if self._session is not None or self._key is None:
            raise Refusal(ErrorCode.BAD_STATE, "a model is already loaded; start a new enclave for another bundle")
        sealed = parse_header(header, self.key_id)
        expected = chunks.ciphertext_size(sealed.size, sealed.chunk_size)
        if stream.total != expected:
            raise Refusal(
                ErrorCode.BAD_HEADER,
                f"LOAD declares {stream.total} ciphertext bytes; section {sealed.name!r} needs {expected}",
            )
        section_key = chunks.derive(self._key.key(), sealed.salt, "section/" + sealed.name)
        buffer = _private_mapping(sealed.size)
        try:
            with memoryview(buffer) as whole, whole[: sealed.size] as view:
                try:
                    chunks.decrypt_section_into(
                        section_key,
                        sealed.manifest_digest,
                        sealed.index,
                        sealed.name,
                        stream.read_into,
                        view,
                        sealed.chunk_size,
                    )
                except chunks.ChunkAuthenticationError as exc:
                    raise Refusal(
                        ErrorCode.AUTH_FAILED,
                        f"the private section failed authentication at chunk {exc.index} of {exc.total}: the "
                        "bundle header (including its output policy) or the section was modified, or they come "
                        "from different bundles",
                    ) from None
                session = self._build_session(view)
        finally:
            # onnxruntime holds its own copy now; ours is zeroed at once, not at shutdown.
            _wipe_mapping(buffer)
        self._session = session
        self._inputs = tuple(_spec_of(a) for a in session.get_inputs())
        self._sample_axes = _sample_axes_of(
            self._inputs, tuple(_batch_axis(a, sealed.batch_symbol) for a in session.get_inputs())
        )
        self._outputs = tuple(_spec_of(a) for a in session.get_outputs())
        self._output_names = [o.name for o in self._outputs]
        try:
            policy_mod.check_applicable(sealed.policy, self._outputs[0].shape if self._outputs else None)
        except PolicyError as exc:
            self._session = None
            raise Refusal(ErrorCode.BAD_POLICY, str(exc)) from None
        self._policy = sealed.policy
        already_served = self._resume_budget(sealed, state, request_id)
        self._meter = Meter(sealed.policy, already_served=already_served)
        # The key has done its only job; a later LOAD is refused, so nothing needs it any more.
        self._key.wipe()
        self._key = None
        self._request = protocol.KnownTensors(self._inputs)
        self._reply = protocol.KnownTensors(self._result_specs())
        # onnxruntime's binding itself: its Python wrapper re-checks the feed names (done here
        # already) and looks up the output names on every call, a tenth of a small part's run.
        binding = getattr(session, "_sess", None)
        self._run = binding.run if binding is not None and hasattr(binding, "run") else session.run
        self._warm_up()
        self._sandbox()
        return protocol.Ready(
            inputs=self._inputs,
            private_outputs=self._outputs,
            results=self._result_specs(),
            policy=self._policy,
            started_at=self._started_at,
            ready_seconds=time.monotonic() - self._started_monotonic,
            sandbox=frozenset(self._hardening.applied),
        )

    def _resume_budget(self, sealed: SealedSection, state: bytes | None, request_id: int) -> int:
        """Samples earlier sessions served under a persistent budget (0 otherwise); the TPM is opened
        now, while connect/open are still allowed, and the resumed state goes to the host at once."""
        if not sealed.policy.persistent:
            return 0
        assert self._key is not None
        tpm = None
        try:
            if sealed.policy.budget_counter == "tpm" and self._tpm:
                tpm = budget_mod.TpmCounter.open(self._tpm, budget_mod.nv_index_for(sealed.manifest_digest))
            state_key = chunks.derive(self._key.key(), sealed.salt, "budget-state")
            self._budget = budget_mod.PersistentBudget(
                sealed.policy.budget_counter or "session",
                state_key,
                sealed.manifest_digest,
                tpm,
                sealed.policy.query_budget,
            )
            served, blob = self._budget.resume(state)
        except budget_mod.BudgetStateError as exc:
            if self._budget is not None:
                self._budget.close()
                self._budget = None
            elif tpm is not None:
                tpm.close()
            self._session = None
            raise Refusal(ErrorCode.BUDGET_STATE, f"cannot resume the query budget: {exc}") from None
        self.channel.send(MsgType.BUDGET_STATE, request_id, blob)
        return served

    def _build_session(self, model: memoryview) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self._threads or 0
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.enable_profiling = False
        # The host's own onnxruntime runs on the same cores: idle workers spinning here would steal
        # the CPU the host needs between requests (measured: up to 5x slower totals at batch 64).
        # (Spinning within a run only, with session.force_spinning_stop, was tried in issue 13: no
        # faster per call under load, and up to 2.5x the enclave's CPU per call at batch 32.)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 4  # fatal only: onnxruntime's messages can name private nodes
        # onnxruntime's Python API takes only `bytes`: one immutable copy, wiped right after.
        model_bytes = bytes(model)
        session = None
        try:
            session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"], enable_fallback=0)
        except Exception as exc:
            raise Refusal(
                ErrorCode.BAD_MODEL, f"onnxruntime could not load the private part ({type(exc).__name__})"
            ) from None
        finally:
            if session is not None and hasattr(session, "_model_bytes"):
                session._model_bytes = None  # it would otherwise keep the plaintext for the session's life
            sandbox.wipe_bytes(model_bytes)
            del model_bytes
        return session

    def _result_specs(self) -> tuple[TensorSpec, ...]:
        shapes = policy_mod.result_shapes(
            self._policy, [o.name for o in self._outputs], [o.shape for o in self._outputs]
        )
        specs = []
        for (name, dtype, shape), raw in zip(shapes, self._outputs):
            specs.append(TensorSpec(name, np.dtype(dtype) if dtype else raw.dtype, shape))
        return tuple(specs)

    def _warm_up(self) -> None:
        """One run on zeros before the sandbox: first-run allocations and lazy imports happen now."""
        assert self._session is not None
        feeds = {}
        for spec in self._inputs:
            if spec.dtype is None:
                return
            feeds[spec.name] = np.zeros([1 if d is None else d for d in spec.shape], dtype=spec.dtype)
        try:
            outputs = self._run(self._output_names, feeds, None)
            results = policy_mod.apply_output_policy(self._policy, self._output_names, outputs)
            self._reply.parts(results)
            protocol.tensor_parts([("warm-up", np.zeros(1, np.float32))])
        except Exception:
            pass  # a model that rejects zeros still serves real inputs

    def _sandbox(self) -> None:
        sandbox.limit_open_files(self._hardening)
        if not self._use_seccomp:
            return
        try:
            sandbox.install_filter()
        except sandbox.SandboxError as exc:
            raise _SandboxFailure(f"the model loaded, but the sandbox could not be installed: {exc}") from None
        self._hardening.applied.add("seccomp")

    # -- INFER / STATS -------------------------------------------------------------------

    def _validated_feeds(self, payload: bytearray) -> tuple[dict[str, np.ndarray], int]:
        arrays = self._request.decode(payload)
        if arrays is not None:  # exactly the announced inputs: names, dtypes, ranks and fixed dims checked
            return dict(zip(self._request.names, arrays)), self._samples(arrays)
        try:
            tensors = protocol.decode_tensors(payload)
        except ProtocolError as exc:
            raise Refusal(exc.code, str(exc)) from None
        feeds: dict[str, np.ndarray] = {}
        for name, array in tensors:
            if name in feeds:
                raise Refusal(ErrorCode.BAD_INPUT, f"input {name!r} appears twice")
            feeds[name] = array
        expected = {spec.name for spec in self._inputs}
        missing = [s.name for s in self._inputs if s.name not in feeds]
        unknown = [n for n in feeds if n not in expected]
        if missing or unknown:
            parts = ([f"missing {', '.join(map(repr, missing))}"] if missing else []) + (
                [f"unknown {', '.join(map(repr, unknown))}"] if unknown else []
            )
            raise Refusal(ErrorCode.BAD_INPUT, "inputs do not match the private part: " + "; ".join(parts))
        for spec in self._inputs:
            array = feeds[spec.name]
            if spec.dtype is not None and array.dtype != spec.dtype:
                raise Refusal(
                    ErrorCode.BAD_INPUT, f"input {spec.name!r} must be {spec.dtype.name}, got {array.dtype.name}"
                )
            if array.ndim != len(spec.shape) or any(
                d is not None and d != got for d, got in zip(spec.shape, array.shape)
            ):
                raise Refusal(
                    ErrorCode.BAD_INPUT,
                    f"input {spec.name!r} must have shape {_shape_text(spec.shape)}, got {list(array.shape)}",
                )
        return feeds, self._samples([feeds[spec.name] for spec in self._inputs])

    def _samples(self, arrays: Sequence[np.ndarray]) -> int:
        """The samples in these validated inputs (see _sample_axes_of): the largest count over them."""
        samples = 0
        for array, axis in zip(arrays, self._sample_axes):
            rows = 1 if axis is None else array.shape[axis]
            if rows > samples:
                samples = rows
        return samples

    def _infer(self, frame: _Frame) -> None:
        assert self._session is not None and self._meter is not None
        feeds, samples = self._validated_feeds(frame.payload)
        try:
            self._meter.admit(samples)
        except PolicyRefusal as refusal:
            code = (
                ErrorCode.BUDGET_EXHAUSTED
                if isinstance(refusal, policy_mod.BudgetExhausted)
                else ErrorCode.RATE_LIMITED
            )
            raise Refusal(code, str(refusal)) from None
        try:
            outputs = self._run(self._output_names, feeds, None)
        except Exception as exc:
            raise Refusal(
                ErrorCode.INFERENCE_FAILED,
                f"the private part could not run on these inputs ({type(exc).__name__}); details are withheld "
                "because they can name private layers",
            ) from None
        try:
            results = policy_mod.apply_output_policy(self._policy, self._output_names, outputs)
        except PolicyError as exc:
            raise Refusal(ErrorCode.INFERENCE_FAILED, str(exc)) from None
        # Views of the result arrays: written, not copied.
        payload = self._reply.parts(results) or protocol.tensor_parts(results)
        size = sum(map(len, payload))
        if protocol.FRAME_OVERHEAD + size > self.channel.max_frame_bytes:
            raise Refusal(
                ErrorCode.FRAME_TOO_LARGE,
                f"the result ({size} bytes) exceeds the frame limit of {self.channel.max_frame_bytes}; "
                "send smaller batches",
            )
        if self._budget is not None:
            # Stored by the host before it reads the RESULT; a TPM counter has already moved on.
            try:
                blob = self._budget.advance(self._meter.samples_served + samples)
            except budget_mod.BudgetStateError as exc:
                raise Refusal(ErrorCode.BUDGET_STATE, str(exc)) from None
            if blob is not None:
                self.channel.send(MsgType.BUDGET_STATE, frame.request_id, blob)
        self._meter.record(samples)
        self.channel.send_parts(MsgType.RESULT, frame.request_id, payload, size)

    def _stats(self, frame: _Frame) -> None:
        meter = self._meter
        assert meter is not None
        stats = protocol.Stats(
            samples_served=meter.samples_served,
            requests_served=meter.requests_served,
            requests_refused=meter.requests_refused,
            query_budget=meter.budget,
            budget_left=meter.budget_left,
            uptime_s=time.monotonic() - self._started_monotonic,
        )
        self.channel.send(MsgType.STATS_REPLY, frame.request_id, protocol.encode_stats(stats))


class _SandboxFailure(Exception):
    """The sandbox is required but could not be installed: the enclave must not serve."""


def _private_mapping(size: int) -> mmap.mmap:
    """Anonymous private memory for the decrypted private part, left out of core dumps."""
    length = max(mmap.PAGESIZE, math.ceil(size / mmap.PAGESIZE) * mmap.PAGESIZE)
    try:
        buffer = mmap.mmap(
            -1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
    except (OSError, OverflowError, ValueError):
        raise Refusal(ErrorCode.BAD_HEADER, f"cannot allocate {size} bytes for the private part") from None
    if _MADV_DONTDUMP is not None:
        try:
            buffer.madvise(_MADV_DONTDUMP)
        except OSError:
            pass
    return buffer


def _wipe_mapping(buffer: mmap.mmap) -> None:
    if buffer.closed:
        return
    try:
        # Zero-fill in bounded steps: one giant bytes object of zeros would double the footprint.
        step = 1 << 22
        zeros = bytes(min(step, len(buffer)))
        for offset in range(0, len(buffer), step):
            end = min(offset + step, len(buffer))
            buffer[offset:end] = zeros[: end - offset]
        buffer.close()
    except BufferError:
        pass  # a view is still exported; the contents are zero already, the mapping goes with it
