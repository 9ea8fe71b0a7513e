"""Host side of the enclave: start the process, hand it the sealed private part, query it.

The host never holds the enclave key: the enclave reads it itself (key file or environment
variable named in `key_args`). The client starts one enclave per session over a socket pair,
sends LOAD once, then multiplexes requests from any number of threads by request id. Every
call has a deadline: a dead, hung or misbehaving enclave becomes an `EnclaveError` with one
clear line within the timeout, and `restart()` starts a fresh process and re-sends the last LOAD.

    with EnclaveClient() as enclave:
        enclave.start(["--key-file", "enclave.key"], threads=2)
        info = enclave.load(bundle.header, bundle.section_ciphertext("private"))
        labels = enclave.infer({"h": activations})["label"]
"""

from __future__ import annotations

import collections
import fcntl
import math
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelcloak.enclave import protocol, spin
from modelcloak.enclave.policy import OutputPolicy
from modelcloak.enclave.protocol import ErrorCode, MsgType, ProtocolError, TensorSpec
from modelcloak.runtime.errors import EnclaveError

__all__ = ["EnclaveClient", "EnclaveError", "EnclaveInfo", "EnclaveStats"]

EnclaveStats = protocol.Stats
_READ_AHEAD = 64 * 1024  # the reply buffer: a reply of this size or less usually takes one recv
_MAX_IOVECS = 512  # buffers per sendmsg; Linux refuses more than IOV_MAX (1024)
_LOAD_PIECE = 1 << 20  # LOAD_DATA frames carry at most 1 MiB (less if the enclave's limit is lower)

# The enclave runs `python -I` (no PYTHONPATH, no user site, no script directory on sys.path) and
# finds modelcloak where this host found it: the host's own install decides what code the
# enclave runs, never the environment of whoever started the host.
_PACKAGE_ROOT = str(Path(protocol.__file__).resolve().parents[2])
_BOOTSTRAP = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); from modelcloak.enclave.__main__ import main; sys.exit(main())"
)
# What survives from the host's environment into the enclave's scrubbed one (besides the
# variable named by --key-env): locale only. Everything else (PYTHONPATH, LD_PRELOAD,
# PYTHONSTARTUP, OMP_*/ORT_* knobs, HOME with its caches) is the host user's to set, not the enclave's.
_KEPT_VARIABLES = ("LANG", "LC_ALL", "LC_CTYPE")
_NO_HOME = "/dev/null/modelcloak-enclave-has-no-home"  # = modelcloak.enclave.sandbox.NO_HOME

# Start-up (a Python enclave imports onnxruntime before HELLO) took 0.2 s on an idle machine and
# over 10 s on a loaded 2-core one. An enclave that dies says so at once (the connection breaks),
# so this only bounds one that hangs; it is generous so a busy machine does not fail a load.
START_TIMEOUT = 60.0


def default_command() -> list[str]:
    """The isolated launcher: this interpreter, `-I`, and a bootstrap that imports modelcloak from its install."""
    return [sys.executable, "-I", "-c", _BOOTSTRAP, _PACKAGE_ROOT]


def enclave_environment(key_args: Sequence[str], extra: Mapping[str, str] | None, workdir: str) -> dict[str, str]:
    """The scrubbed environment an enclave starts with: PATH, locale, TMPDIR = its own directory,
    a HOME that cannot exist (no per-user caches, no telemetry database), the key variable if
    the key comes from one, and whatever the caller's code adds."""
    env = {"PATH": os.defpath, "HOME": _NO_HOME, "TMPDIR": workdir, "PYTHONDONTWRITEBYTECODE": "1"}
    env.update({name: os.environ[name] for name in _KEPT_VARIABLES if name in os.environ})
    if "--key-env" in key_args:
        name = key_args[list(key_args).index("--key-env") + 1]
        if name in os.environ:
            env[name] = os.environ[name]
    env.update(extra or {})
    return env


def _absolute_key_file(key_args: Sequence[str]) -> list[str]:
    """--key-file relative to the host's directory, since the enclave runs in its own."""
    args = list(key_args)
    for i, arg in enumerate(args[:-1]):
        if arg == "--key-file":
            args[i + 1] = os.path.abspath(args[i + 1])
    return args


# How each refusal reads to a user: policy and input refusals, bundle refusals, the rest.
_REFUSED = {
    ErrorCode.BUDGET_EXHAUSTED,
    ErrorCode.RATE_LIMITED,
    ErrorCode.BAD_INPUT,
    ErrorCode.BAD_TENSOR,
    ErrorCode.BAD_STATE,
    ErrorCode.FRAME_TOO_LARGE,
    ErrorCode.MALFORMED_FRAME,
    ErrorCode.UNKNOWN_TYPE,
    ErrorCode.BUDGET_STATE,
}
_BUNDLE_REFUSED = {ErrorCode.AUTH_FAILED, ErrorCode.BAD_HEADER, ErrorCode.BAD_POLICY, ErrorCode.BAD_MODEL}


@dataclass(frozen=True)
class EnclaveInfo:
    """What the enclave reported in READY, plus what the host measured."""

    inputs: tuple[TensorSpec, ...]  # what infer() takes
    outputs: tuple[TensorSpec, ...]  # what infer() returns under the policy ("label", "topk" or raw outputs)
    private_outputs: tuple[TensorSpec, ...]  # the private part's own outputs
    policy: OutputPolicy
    started_at: float  # Unix time the enclave process started
    ready_seconds: float  # process start to READY, measured inside the enclave
    load_seconds: float  # LOAD sent to READY received, measured here
    sandbox: frozenset[str]  # hardening measures in force: seccomp, non_dumpable, ...
    pid: int | None

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]


_ABSENT = object()  # a feed name not in the caller's mapping


class _FramingLost(Exception):
    """The enclave reported a frame this host never sent: the stream is out of step."""


_FRAMING_CODES = frozenset({ErrorCode.MALFORMED_FRAME, ErrorCode.FRAME_TOO_LARGE, ErrorCode.UNKNOWN_TYPE})


def _framing_lost(payload: bytes | bytearray) -> bool:
    try:
        code, _ = protocol.decode_error(payload)
    except ProtocolError:
        return True
    return code in _FRAMING_CODES


def _seconds(value: float) -> str:
    return f"{value:.1f}" if abs(value - round(value, 1)) < 1e-9 else f"{value:.3g}"


def _refusal(payload: bytes | bytearray) -> EnclaveError:
    try:
        code, message = protocol.decode_error(payload)
    except ProtocolError as exc:
        return EnclaveError(f"enclave sent a malformed frame: {exc}")
    if code == ErrorCode.WRONG_KEY:
        return EnclaveError(message, code)  # already reads "wrong enclave key: ..."
    if code == ErrorCode.KEY_UNAVAILABLE:
        return EnclaveError(message, code)
    if code in _REFUSED:
        return EnclaveError(f"enclave refused: {message}", code)
    if code in _BUNDLE_REFUSED:
        return EnclaveError(f"enclave refused the bundle: {message}", code)
    return EnclaveError(f"enclave error ({protocol.error_name(code)}): {message}", code)


class _Pending:
    """One request's reply slot. `done` once its reply (or error) is in; `wake` is set then, and also
    when the thread that was reading the connection stops, so that a waiter can take over reading.
    `wake` is made only by a caller that has to wait for another one (a lone caller never needs it)."""

    __slots__ = ("wake", "done", "msg_type", "payload", "error")

    def __init__(self) -> None:
        self.wake: threading.Event | None = None
        self.done = False
        self.msg_type: int | None = None
        self.payload: bytearray | None = None
        self.error: EnclaveError | None = None

    def finish(
        self, msg_type: int | None = None, payload: bytearray | None = None, error: EnclaveError | None = None
    ) -> None:
        self.msg_type, self.payload, self.error = msg_type, payload, error
        self.done = True
        wake = self.wake
        if wake is not None:
            wake.set()


class _EndOfStream(Exception):
    """The enclave's end of the connection is closed."""


class _Inbox:
    """Frames from the enclave, read through a buffer: a small reply (header and body) usually takes
    one recv. A frame cut short by a timeout stays half-read here, so whichever thread reads next
    continues it and the stream stays in step."""

    def __init__(self, sock: socket.socket, max_frame_bytes: int) -> None:
        # Non-blocking, waited on with poll: a wait and a read are two system calls. (A socket in
        # timeout mode costs four per reply: settimeout's ioctl, its own poll, the read, and
        # the sender's ioctl and poll before every send.)
        sock.settimeout(0.0)
        self._sock = sock
        self._readable = select.poll()
        self._readable.register(sock.fileno(), select.POLLIN)
        self._spinner = spin.Spinner()  # poll briefly for a reply before sleeping in poll
        self._max_frame_bytes = max_frame_bytes
        self._buffer = bytearray(_READ_AHEAD)
        self._start = 0  # unread bytes are self._buffer[self._start : self._end]
        self._end = 0
        self._head: tuple[int, int] | None = None  # (type, request id) of a body being read straight into
        self._body = bytearray()
        self._filled = 0

    def read(self, timeout: float) -> tuple[int, int, bytearray] | None:
        """(type, request id, payload) of the next frame; None if `timeout` passed first."""
        deadline = time.monotonic() + timeout
        try:
            if self._head is None:
                while self._end - self._start < protocol.HEADER_SIZE:
                    self._fill(deadline)
                length, msg_type, request_id = protocol.FRAME_HEADER.unpack_from(self._buffer, self._start)
                if length < protocol.FRAME_OVERHEAD or length > self._max_frame_bytes:
                    raise _FramingLost(
                        f"enclave sent a malformed frame: length {length} outside 9..{self._max_frame_bytes}"
                    )
                if msg_type not in protocol.ENCLAVE_TO_HOST:
                    raise _FramingLost(f"enclave sent a malformed frame: unknown message type 0x{msg_type:02x}")
                self._start += protocol.HEADER_SIZE
                size = length - protocol.FRAME_OVERHEAD
                buffered = self._end - self._start
                if size <= buffered:
                    payload = self._buffer[self._start : self._start + size]
                    self._start += size
                    return msg_type, request_id, payload
                self._head, self._body = (msg_type, request_id), bytearray(size)
                self._body[:buffered] = self._buffer[self._start : self._end]
                self._filled, self._start, self._end = buffered, 0, 0
            with memoryview(self._body) as view:
                while self._filled < len(self._body):
                    got = self._recv_into(view[self._filled :], deadline)
                    if got == 0:
                        raise _EndOfStream
                    self._filled += got
            (msg_type, request_id), payload = self._head, self._body
            self._head, self._body = None, bytearray()
            return msg_type, request_id, payload
        except TimeoutError:
            return None

    def _recv_into(self, view: memoryview, deadline: float) -> int:
        """One recv once the socket is readable; TimeoutError if it is not by `deadline`. A reply
        that comes soon is polled for without sleeping first (enclave/spin.py)."""
        spinner = self._spinner
        began = time.perf_counter()
        if spinner.armed and spin.spin_until_readable(self._readable, spinner, began):
            try:
                got = self._sock.recv_into(view)
            except BlockingIOError:
                pass  # readable was a false alarm: block below
            else:
                spinner.waited(time.perf_counter() - began)
                return got
        while True:
            wait = max(0, math.ceil((deadline - time.monotonic()) * 1000))
            if not self._readable.poll(wait):
                spinner.armed = False
                raise TimeoutError
            try:
                got = self._sock.recv_into(view)
            except BlockingIOError:
                continue  # readable was a false alarm: wait again
            spinner.waited(time.perf_counter() - began)
            return got

    def _fill(self, deadline: float) -> None:
        if self._start:
            unread = self._end - self._start
            self._buffer[:unread] = self._buffer[self._start : self._end]
            self._start, self._end = 0, unread
        with memoryview(self._buffer) as view:
            got = self._recv_into(view[self._end :], deadline)
        if got == 0:
            raise _EndOfStream
        self._end += got


class _Connection:
    """One enclave process and its socket. There is no reader thread: a caller sends its request and
    reads replies itself (one thread at a time holds the read lock and hands every reply it reads to
    the request it belongs to), so a reply reaches its caller without a hand-off between threads."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket, max_frame_bytes: int) -> None:
        self.proc = proc
        self.max_frame_bytes = max_frame_bytes
        self._rsock = sock
        # A second socket object on the same connection so a sender's timeout never disturbs the
        # reader; both are in timeout mode, so the shared descriptor is consistently non-blocking.
        self._wsock = sock.dup()
        self._wsock.settimeout(0.0)  # waits are polls with the caller's deadline (_send_gathered)
        self._inbox = _Inbox(self._rsock, max_frame_bytes)
        self._lock = threading.Lock()  # the pending table, request ids, `broken`
        self._send_lock = threading.Lock()
        self._read_lock = threading.Lock()  # held by the one caller reading replies
        self._pending: dict[int, _Pending] = {0: _Pending()}  # request id 0: HELLO or a start-up error
        self._next_id = 1
        self.broken: str | None = None  # why this connection can no longer be used
        self.info: EnclaveInfo | None = None  # what this connection's READY said
        # READY's input and result specs compiled for the per-call fast paths (protocol.KnownTensors).
        self.request_layout = protocol.KnownTensors(())
        self.result_layout = protocol.KnownTensors(())
        self._closing = False
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=8)
        # Stores a BUDGET_STATE blob durably; None: this host keeps no persistent budget.
        self.budget_sink: Callable[[bytes], None] | None = None
        self._stderr = threading.Thread(target=self._stderr_loop, name=f"enclave-{proc.pid}-stderr", daemon=True)
        self._stderr.start()

    # -- process state -------------------------------------------------------------------------

    def exit_code(self, wait: float = 0.0) -> int | None:
        try:
            return self.proc.wait(timeout=wait) if wait else self.proc.poll()
        except subprocess.TimeoutExpired:
            return None

    def _process_state(self) -> str | None:
        try:
            with open(f"/proc/{self.proc.pid}/stat", "rb") as fh:
                return fh.read().rsplit(b")", 1)[1].split()[0].decode()
        except (OSError, IndexError):
            return None

    def _last_words(self) -> str:
        self._stderr.join(timeout=0.5)  # the process is gone: its stderr ends promptly
        return next((line for line in reversed(self.stderr_tail) if line.strip()), "")

    def _death(self, wait: float = 1.0) -> str:
        """Why the connection ended, from the exit status (and the enclave's last stderr line)."""
        code = self.exit_code(wait)
        if code is None:
            return "enclave closed its connection"
        if code == 0:
            return "enclave process exited (exit code 0)"
        tail = self._last_words()
        return f"enclave process died (exit code {code})" + (f"; it said: {tail}" if tail else "")

    def timeout_error(self, timeout: float) -> EnclaveError:
        state = self._process_state()
        hint = " (the process is stopped)" if state in ("T", "t") else ""
        return EnclaveError(f"enclave did not answer within {_seconds(timeout)} s{hint}")

    # -- reading replies -------------------------------------------------------------------------

    def _stderr_loop(self) -> None:
        stream = self.proc.stderr
        if stream is None:
            return
        for raw in iter(stream.readline, b""):
            self.stderr_tail.append(raw.decode("utf-8", "replace").rstrip()[:500])

    def _await(self, pending: _Pending, deadline: float) -> bool:
        """Wait until `pending` has its reply (True) or `deadline` passes (False), reading the
        connection whenever no other caller is."""
        while not pending.done:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if self._read_lock.acquire(blocking=False):
                try:
                    while not pending.done and self.broken is None:
                        self._read_one(remaining)
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                finally:
                    self._read_lock.release()
                    self._hand_over()
                continue
            # Another caller is reading: it wakes us when our reply is in or when it stops reading.
            wake = pending.wake
            if wake is None:
                wake = pending.wake = threading.Event()
            wake.clear()
            if pending.done:
                break
            if not self._read_lock.locked():
                continue  # it stopped before it could see our event: read ourselves
            wake.wait(remaining)
        return True

    def _hand_over(self) -> None:
        """The reading caller is done: wake the others so one of them reads for the rest."""
        for pending in list(self._pending.values()):  # list() of a dict view is atomic under the GIL
            wake = pending.wake
            if wake is not None and not pending.done:
                wake.set()

    def _read_one(self, timeout: float) -> None:
        """Read one frame (or nothing within `timeout`) and deliver it; a broken stream fails every request."""
        reason: str | None = None
        try:
            frame = self._inbox.read(timeout)
            if frame is not None:
                self._deliver(*frame)
            return
        except (_EndOfStream, OSError):
            reason = None  # the process ended or the client is closing: _fail_all says which
        except _FramingLost as lost:
            reason = str(lost)
        except Exception as exc:  # never leave waiters hanging to their timeout
            reason = f"enclave connection failed ({type(exc).__name__}: {exc})"
        if reason is not None:
            # A desynchronised or lying enclave cannot be trusted to answer anything else.
            self.kill()
        self._fail_all(reason)

    def _deliver(self, msg_type: int, request_id: int, payload: bytearray) -> None:
        if msg_type == MsgType.ERROR and _framing_lost(payload):
            # This host never sends short, oversized or unknown frames: such a report means the
            # byte stream is out of step, and the enclave may be swallowing later requests as
            # the body of a frame that does not exist. Nothing on this connection can be trusted.
            raise _FramingLost(
                "the connection to the enclave lost its framing (the enclave reported: "
                f"{protocol.decode_error(payload)[1]})"
            )
        pending = self._pending.get(request_id)  # one dict lookup: atomic under the GIL
        if msg_type == MsgType.BUDGET_STATE:
            # Stored before the READY/RESULT that follows is read: an answer whose count could not
            # be kept is not handed out (that reply is dropped, the caller gets this error).
            failure = self._store_budget_state(payload)
            if failure is not None and pending is not None and not pending.done:
                pending.finish(error=failure)
            return
        if pending is None or pending.done:
            return  # a late reply to a request that timed out, or an unsolicited notice
        pending.finish(msg_type, payload)

    def _store_budget_state(self, payload: bytearray) -> EnclaveError | None:
        if self.budget_sink is None:
            return EnclaveError(
                "the enclave keeps this bundle's query budget across sessions, but no budget state file was "
                "given to store it in (budget_state)"
            )
        try:
            self.budget_sink(bytes(payload))
        except OSError as exc:
            return EnclaveError(f"cannot store the query budget's state: {exc.strerror or exc}")
        return None

    def _fail_all(self, reason: str | None) -> None:
        """Fail every waiting request: with `reason` (a protocol violation) or, if None, the end of the process."""
        ended = reason is None
        if reason is None:
            reason = "enclave connection was closed" if self._closing else self._death()
        with self._lock:
            if self.broken is None:
                self.broken = reason
            waiting = list(self._pending.items())
            self._pending.clear()
        for request_id, pending in waiting:
            if not pending.done:
                # Request id 0 is the start-up wait for HELLO; wait_hello words that case itself.
                suffix = " while serving a request" if ended and request_id else ""
                pending.finish(error=EnclaveError(reason + suffix))

    # -- requests ----------------------------------------------------------------------------------

    def wait_hello(self, timeout: float) -> protocol.Hello:
        with self._lock:
            pending = self._pending.get(0)
        if pending is None:
            raise EnclaveError(self.broken or "enclave connection is closed")
        if not self._await(pending, time.monotonic() + timeout):
            raise EnclaveError(f"enclave did not start within {_seconds(timeout)} s")
        with self._lock:
            self._pending.pop(0, None)
        if pending.error is not None:
            code = self.exit_code(1.0)
            if code is None:
                raise pending.error
            tail = self._last_words()
            raise EnclaveError(
                f"enclave process exited during start (exit code {code})" + (f": {tail}" if tail else "")
            )
        if pending.msg_type == MsgType.ERROR:
            assert pending.payload is not None
            raise _refusal(pending.payload)
        if pending.msg_type != MsgType.HELLO:
            raise EnclaveError(f"enclave sent a malformed frame: expected HELLO, got message type {pending.msg_type}")
        try:
            assert pending.payload is not None
            return protocol.decode_hello(pending.payload)
        except ProtocolError as exc:
            raise EnclaveError(f"enclave sent a malformed frame: {exc}") from None

    def request(
        self,
        build: Callable[[int], Iterable[Sequence[protocol.Buffer]]],
        expect: MsgType,
        timeout: float,
        shown: float | None = None,
    ) -> bytearray:
        """Send the frames `build(request_id)` yields (each a list of buffers, sent with one gathered
        write); wait for the reply with that id, reading it in this thread when no other caller is.

        `shown` is the timeout named in a timeout error (the caller's whole limit, when `timeout`
        is what is left of it)."""
        deadline = time.monotonic() + timeout
        if shown is not None:
            timeout = shown
        pending = _Pending()
        with self._lock:
            if self.broken is not None:
                raise EnclaveError(f"{self.broken}; call restart()")
            request_id = self._next_id
            self._next_id += 1
            self._pending[request_id] = pending
        try:
            self._send(build(request_id), deadline, timeout)
            if not self._await(pending, deadline):
                raise self.timeout_error(timeout)
        finally:
            with self._lock:
                self._pending.pop(request_id, None)
        if pending.error is not None:
            raise pending.error
        assert pending.payload is not None
        if pending.msg_type == MsgType.ERROR:
            raise _refusal(pending.payload)
        if pending.msg_type != expect:
            name = MsgType(pending.msg_type).name if pending.msg_type in protocol.ENCLAVE_TO_HOST else pending.msg_type
            raise EnclaveError(f"enclave sent a malformed frame: expected {expect.name}, got {name}")
        return pending.payload

    def request_one(
        self,
        msg_type: MsgType,
        parts: Sequence[protocol.Buffer],
        body: int,
        expect: MsgType,
        timeout: float,
        shown: float | None = None,
    ) -> bytearray:
        """`request` of one frame made of `parts`, whose lengths the caller has added up to `body`
        (and checked against the frame limit): the per-call path counts them once."""
        length = protocol.FRAME_OVERHEAD + body
        pack = protocol.FRAME_HEADER.pack
        return self.request(lambda rid: ([pack(length, msg_type, rid), *parts],), expect, timeout, shown)

    def _send(self, frames: Iterable[Sequence[protocol.Buffer]], deadline: float, timeout: float) -> None:
        """Send whole frames. Running out of time between frames leaves the stream in step (the
        enclave treats a LOAD cut short that way as interrupted); inside a frame it does not."""
        if not self._send_lock.acquire(blocking=False) and not self._send_lock.acquire(
            timeout=max(0.0, deadline - time.monotonic())
        ):
            raise self.timeout_error(timeout)
        try:
            for frame in frames:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self.timeout_error(timeout)
                try:
                    _send_gathered(self._wsock, frame, deadline)
                except TimeoutError:
                    with self._lock:
                        if self.broken is None:
                            self.broken = "enclave stopped reading its input and the connection is out of step"
                    raise self.timeout_error(timeout) from None
        except OSError:
            # The enclave end is gone: read what is left (an error it sent, the end of the
            # stream) so the error says why.
            self._read_to_end(min(deadline, time.monotonic() + 1.5))
            raise EnclaveError((self.broken or self._death()) + " while serving a request") from None
        finally:
            self._send_lock.release()

    def _read_to_end(self, deadline: float) -> None:
        if not self._read_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return
        try:
            while self.broken is None and time.monotonic() < deadline:
                self._read_one(deadline - time.monotonic())
        finally:
            self._read_lock.release()
            self._hand_over()

    # -- teardown ----------------------------------------------------------------------------------

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except OSError:
                pass

    def close(self) -> None:
        self._closing = True
        for sock in (self._rsock, self._wsock):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        # A caller blocked reading sees the end of the stream now; its descriptor is closed only
        # after it has let go (closing a descriptor another thread is polling is a race).
        if self._read_lock.acquire(timeout=2.0):
            self._read_lock.release()
        self._fail_all("enclave connection was closed")
        self._stderr.join(timeout=2.0)
        for sock in (self._rsock, self._wsock):
            sock.close()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def _send_gathered(sock: socket.socket, buffers: Sequence[protocol.Buffer], deadline: float | None = None) -> None:
    """sendall for a list of byte buffers: one sendmsg (no joined copy), continued after a partial
    write. On a non-blocking socket a full send buffer is waited for until `deadline` (TimeoutError)."""
    try:
        sent = sock.sendmsg(buffers) if len(buffers) <= _MAX_IOVECS else 0
    except BlockingIOError:
        sent = 0
    if sent == sum(map(len, buffers)):
        return  # the usual case: the whole frame in one call
    views = [memoryview(buffer).cast("B") for buffer in buffers if len(buffer)]
    while views:
        protocol.drop_sent(views, sent)
        sent = 0  # a send that would block below sends nothing
        if views:
            try:
                sent = sock.sendmsg(views[:_MAX_IOVECS])
            except BlockingIOError:
                _wait_writable(sock, deadline)


def _wait_writable(sock: socket.socket, deadline: float | None) -> None:
    writable = select.poll()
    writable.register(sock.fileno(), select.POLLOUT)
    wait = None if deadline is None else max(0, math.ceil((deadline - time.monotonic()) * 1000))
    if not writable.poll(wait):
        raise TimeoutError


def _announced_results(results: list[tuple[str, np.ndarray]], announced: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """The RESULT tensors, only if they are exactly what READY announced under the policy: same
    names, dtypes, ranks and fixed dims. Anything else (e.g. scores where READY promised labels)
    is refused, whatever the enclave says about its policy later."""
    specs = {spec.name: spec for spec in announced}
    got = dict(results)
    if len(got) != len(results) or set(got) != set(specs):
        raise EnclaveError(
            f"enclave sent result tensors {sorted(got)} where READY announced {sorted(specs)}; the result is refused"
        )
    for name, array in got.items():
        spec = specs[name]
        fits = array.ndim == len(spec.shape) and all(d is None or d == n for d, n in zip(spec.shape, array.shape))
        if (spec.dtype is not None and array.dtype != spec.dtype) or not fits:
            shape = "[" + ",".join("?" if d is None else str(d) for d in spec.shape) + "]"
            raise EnclaveError(
                f"enclave sent result {name!r} as {array.dtype.name}{list(array.shape)} where READY announced "
                f"{spec.dtype.name if spec.dtype is not None else '?'}{shape}; the result is refused"
            )
    return got


class BudgetStateFile:
    """The file holding a persistent budget's sealed state: read at LOAD, replaced atomically (write,
    fsync, rename, fsync the directory) on every BUDGET_STATE, locked for one client at a time.

    The state is sealed by the enclave, so this host can neither read nor edit the count; the lock
    only keeps two honest sessions from spending one budget twice (a `tpm` budget refuses that anyway).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_fd: int | None = None

    def _acquire(self) -> None:
        if self._lock_fd is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise EnclaveError(f"cannot use the budget state file {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise EnclaveError(
                f"the budget state {self.path} is in use by another session; one bundle's budget is spent by one "
                "session at a time"
            ) from None
        self._lock_fd = fd

    def read(self) -> bytes:
        """The stored state; empty when none was stored yet."""
        self._acquire()
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return b""
        except OSError as exc:
            raise EnclaveError(f"cannot read the budget state file {self.path}: {exc.strerror or exc}") from None

    def write(self, blob: bytes) -> None:
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, blob)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def release(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock


def _kill_quietly(proc: subprocess.Popen[bytes], workdir: str | None = None) -> None:
    """Finalizer: an enclave whose client was dropped without close() must not outlive it."""
    if proc.poll() is None:
        try:
            proc.kill()
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)


class EnclaveClient:
    """A session's enclave process. Thread-safe for load/infer/stats/ping; start/restart/close are not
    meant to race with each other (calls in flight during them fail with EnclaveError)."""

    def __init__(
        self,
        *,
        command: Sequence[str] | None = None,
        max_frame_bytes: int = protocol.DEFAULT_MAX_FRAME_BYTES,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        max_restarts: int = 2,
        budget_state: str | os.PathLike[str] | None = None,
        tpm: str | None = None,
    ) -> None:
        """`command` replaces the isolated `python -I` launcher (e.g. a Gramine launcher); `--fd`,
        the key arguments and options are appended to it. The enclave never inherits the host's
        environment: it gets `enclave_environment()` (PATH, locale, its own HOME/TMPDIR, the key
        variable) plus `env`, and runs in a fresh private working directory removed after it exits.

        `budget_state` is the file that keeps a persistent query budget's sealed state between
        sessions (needed only by bundles whose policy has `budget_counter` "sealed" or "tpm"); this
        client holds an exclusive lock on it while it lives. `tpm` (a TCTI string such as
        `device:/dev/tpmrm0`) is passed to the enclave for a `tpm` budget's counter.
        """
        self._key_variable: dict[str, str] = {}  # the --key-env variable, taken from os.environ once
        self._budget_state = BudgetStateFile(Path(budget_state)) if budget_state is not None else None
        self._tpm = tpm
        self._command = list(command) if command else default_command()
        # infer/stats/ping without an explicit timeout wait this long, restarts included.
        self.timeout = timeout
        # How often one call may restart a dead or out-of-step enclave before it gives up.
        self.max_restarts = max_restarts
        self._max_frame_bytes = max_frame_bytes
        self._extra_args = list(extra_args)
        self._env = dict(env) if env is not None else None
        self._conn: _Connection | None = None
        self._workdir: str | None = None
        self._last_proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None
        self._hello: protocol.Hello | None = None
        self._info: EnclaveInfo | None = None
        self._start_args: tuple[list[str], int | None, float] | None = None
        self._last_load: tuple[bytes, bytes | bytearray | memoryview, float] | None = None
        self._lifecycle = threading.RLock()

    # -- properties ----------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._conn.proc.pid if self._conn else None

    @property
    def returncode(self) -> int | None:
        """Exit status of the current (or, after close(), the last) enclave process; None while it runs."""
        return self._last_proc.poll() if self._last_proc is not None else None

    @property
    def info(self) -> EnclaveInfo:
        if self._info is None:
            raise EnclaveError("no model is loaded in the enclave; call load() first")
        return self._info

    @property
    def key_id(self) -> str | None:
        """The enclave key's public id, as announced in HELLO (compare with a manifest's enclave_key.id)."""
        return self._hello.key_id if self._hello else None

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self, key_args: list[str], *, threads: int | None = None, start_timeout: float = START_TIMEOUT) -> None:
        """Spawn the enclave and wait for its HELLO (it has read its key and is ready for LOAD)."""
        with self._lifecycle:
            if self._conn is not None and self._conn.proc.poll() is None:
                raise EnclaveError("the enclave is already running; use restart() for a fresh one")
            self._teardown()
            key_args = _absolute_key_file(key_args)
            self._start_args = (list(key_args), threads, start_timeout)
            self._take_key_variable(key_args)
            self._workdir = tempfile.mkdtemp(prefix="modelcloak-enclave-")  # 0700, ours alone
            parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            argv = [*self._command, "--fd", str(child.fileno()), *key_args]
            argv += ["--max-frame-bytes", str(self._max_frame_bytes)]
            if self._tpm:
                argv += ["--tpm", self._tpm]
            if threads:
                argv += ["--threads", str(threads)]
            argv += self._extra_args
            try:
                proc = subprocess.Popen(
                    argv,
                    pass_fds=(child.fileno(),),
                    close_fds=True,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    env=enclave_environment(key_args, {**(self._env or {}), **self._key_variable}, self._workdir),
                    cwd=self._workdir,
                )
            except OSError as exc:
                parent.close()
                self._remove_workdir()
                raise EnclaveError(f"cannot start the enclave ({argv[0]}): {exc.strerror or exc}") from None
            finally:
                child.close()  # only the enclave holds that end now: its death is our end of input
            self._finalizer = weakref.finalize(self, _kill_quietly, proc, self._workdir)
            self._last_proc = proc
            self._conn = _Connection(proc, parent, self._max_frame_bytes)
            try:
                self._hello = self._conn.wait_hello(start_timeout)
                if self._hello.protocol_version != protocol.PROTOCOL_VERSION:
                    raise EnclaveError(
                        f"enclave speaks protocol version {self._hello.protocol_version}, "
                        f"this host speaks {protocol.PROTOCOL_VERSION}"
                    )
            except BaseException:
                # An enclave that reported a start-up error is about to exit on its own: let it,
                # so its exit status (e.g. 2 for a refused key) is what `returncode` shows.
                self._teardown(grace=1.0)
                raise

    def _take_key_variable(self, key_args: Sequence[str]) -> None:
        """With --key-env, move the key out of this process's environment on the first start and keep
        it for restarts: programs the host starts later must not inherit the enclave's key."""
        if "--key-env" not in key_args or self._key_variable:
            return
        name = key_args[list(key_args).index("--key-env") + 1]
        value = (self._env or {}).get(name) or os.environ.pop(name, None)
        if value is not None:
            self._key_variable = {name: value}

    def load(self, header: bytes, ciphertext: bytes | bytearray | memoryview, timeout: float = 30.0) -> EnclaveInfo:
        """Send the bundle header and the enclave section's ciphertext; return what READY says."""
        conn, hello = self._require_running()
        piece = max(1, min(_LOAD_PIECE, hello.max_frame_bytes - protocol.FRAME_OVERHEAD))
        data = memoryview(ciphertext).cast("B")
        state = None
        if hello.capabilities & protocol.CAP_BUDGET_STATE and self._budget_state is not None:
            state = self._budget_state.read()  # read afresh: a restart continues from the latest count
            conn.budget_sink = self._budget_state.write
        first = protocol.encode_load(header, len(data), state)
        if protocol.FRAME_OVERHEAD + len(first) > hello.max_frame_bytes:
            raise EnclaveError(f"the bundle header ({len(header)} bytes) exceeds the enclave's frame limit")

        def frames(request_id: int) -> Iterable[list[protocol.Buffer]]:
            # Built lazily; each LOAD_DATA sends a view of the ciphertext (no copy).
            yield protocol.frame_parts(MsgType.LOAD, request_id, [first])
            for start in range(0, len(data), piece):
                yield protocol.frame_parts(MsgType.LOAD_DATA, request_id, [data[start : start + piece]])

        began = time.monotonic()
        payload = conn.request(frames, MsgType.READY, timeout)
        try:
            ready = protocol.decode_ready(payload)
        except ProtocolError as exc:
            raise EnclaveError(f"enclave sent a malformed frame: {exc}") from None
        self._last_load = (bytes(header), ciphertext, timeout)
        self._info = conn.info = EnclaveInfo(
            inputs=ready.inputs,
            outputs=ready.results,
            private_outputs=ready.private_outputs,
            policy=ready.policy,
            started_at=ready.started_at,
            ready_seconds=ready.ready_seconds,
            load_seconds=time.monotonic() - began,
            sandbox=ready.sandbox,
            pid=conn.proc.pid,
        )
        conn.request_layout = protocol.KnownTensors(ready.inputs)
        conn.result_layout = protocol.KnownTensors(ready.results)
        return self._info

    def _recover(self, broken: _Connection, deadline: float) -> None:
        """Restart after `broken` failed, unless another caller already did (then reuse theirs)."""
        remaining = deadline - time.monotonic()
        if not self._lifecycle.acquire(timeout=max(0.0, remaining)):
            raise EnclaveError(f"the enclave is restarting and did not come back within {_seconds(remaining)} s")
        try:
            if self._conn is not None and self._conn is not broken and self._conn.broken is None:
                return
            self.restart(deadline=deadline)
        finally:
            self._lifecycle.release()

    def _with_recovery(
        self,
        call: Callable[[_Connection, protocol.Hello, float, float], Any],
        timeout: float | None,
        need_model: bool = False,
    ) -> Any:
        """Run `call` on the current connection; if the enclave died or the stream lost its framing,
        restart (bounded by max_restarts and by the deadline) and run it again. Refusals, timeouts
        and bad input are never retried: a retry could not change them."""
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        restarts = 0
        while True:
            conn, hello = self._wait_running(deadline, limit, need_model)
            try:
                return call(conn, hello, max(0.0, deadline - time.monotonic()), limit)
            except EnclaveError as exc:
                if exc.code is not None or conn.broken is None:
                    raise
                if restarts >= self.max_restarts or self._last_load is None:
                    suffix = f" (after {restarts} restart{'s' if restarts != 1 else ''})" if restarts else ""
                    raise EnclaveError(f"{exc}{suffix}") from None
                if time.monotonic() >= deadline:
                    raise EnclaveError(f"{exc}; no time left within {_seconds(limit)} s to restart it") from None
                restarts += 1
                try:
                    self._recover(conn, deadline)
                except EnclaveError as failed:
                    raise EnclaveError(f"{exc}; restarting the enclave failed: {failed}") from None

    def _wait_running(
        self, deadline: float, limit: float, need_model: bool = False
    ) -> tuple[_Connection, protocol.Hello]:
        """The live connection; while a restart is in progress, wait for it rather than fail."""
        conn, hello = self._conn, self._hello
        if conn is not None and hello is not None and (conn.info is not None or not need_model):
            return conn, hello
        if self._start_args is None:
            raise EnclaveError("the enclave is not running; call start() first")
        if not self._lifecycle.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise EnclaveError(f"the enclave is restarting and did not come back within {_seconds(limit)} s")
        self._lifecycle.release()
        conn, hello = self._conn, self._hello
        if conn is None or hello is None:
            raise EnclaveError("the enclave is not running (a restart failed or it was closed); call restart()")
        if conn.info is None and need_model:
            raise EnclaveError("no model is loaded in the enclave; call load() first")
        return conn, hello

    def restart(self, *, deadline: float | None = None) -> EnclaveInfo | None:
        """Kill the enclave, start a fresh one with the same arguments and re-send the last LOAD.

        A `session` budget starts afresh in the new process; a persistent one (`sealed`, `tpm`)
        continues from the state stored last, which the re-sent LOAD reads again.
        """
        with self._lifecycle:
            if self._start_args is None:
                raise EnclaveError("restart() needs a previous start()")
            key_args, threads, start_timeout = self._start_args
            last_load = self._last_load
            self._teardown()

            def bounded(limit: float) -> float:
                return limit if deadline is None else max(0.001, min(limit, deadline - time.monotonic()))

            self.start(key_args, threads=threads, start_timeout=bounded(start_timeout))
            if last_load is None:
                return None
            header, ciphertext, timeout = last_load
            return self.load(header, ciphertext, timeout=bounded(timeout))

    def close(self, timeout: float = 5.0) -> None:
        """SHUTDOWN (the enclave wipes and exits 0), or kill it if it does not comply in time."""
        with self._lifecycle:
            conn = self._conn
            if conn is None:
                return
            if conn.proc.poll() is None and conn.broken is None:
                try:
                    conn.request(lambda rid: [protocol.frame_parts(MsgType.SHUTDOWN, rid, [])], MsgType.BYE, timeout)
                    conn.proc.wait(timeout=timeout)
                except (EnclaveError, subprocess.TimeoutExpired):
                    pass
            self._teardown()
            if self._budget_state is not None:
                self._budget_state.release()

    def _remove_workdir(self) -> None:
        workdir, self._workdir = self._workdir, None
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)

    def _teardown(self, grace: float = 0.0) -> None:
        conn, self._conn = self._conn, None
        self._info = None
        self._hello = None
        if conn is None:
            self._remove_workdir()
            return
        if grace:
            conn.exit_code(grace)
        conn.kill()
        try:
            conn.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        conn.close()
        self._remove_workdir()
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    def __enter__(self) -> EnclaveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests ------------------------------------------------------------------------------------

    def _require_running(self) -> tuple[_Connection, protocol.Hello]:
        conn, hello = self._conn, self._hello
        if conn is None or hello is None:
            raise EnclaveError("the enclave is not running; call start() first")
        return conn, hello

    def infer(self, feeds: Mapping[str, np.ndarray], timeout: float | None = None) -> dict[str, np.ndarray]:
        """Run the private part on `feeds` (by input name); returns what the policy allows, by name.

        `timeout` (default: the client's `timeout`) bounds the whole call, restarts included.
        """
        limit = self.timeout if timeout is None else timeout
        conn, _ = self._wait_running(time.monotonic() + limit, limit, need_model=True)
        info = conn.info
        assert info is not None
        tensors = []
        if len(feeds) == len(info.inputs):
            for spec in info.inputs:
                value = feeds.get(spec.name, _ABSENT)
                if value is _ABSENT:
                    break
                # An ndarray of the declared dtype (the usual call) is taken as it is.
                array = value if type(value) is np.ndarray else np.asarray(value)
                want = spec.dtype
                if want is not None and array.dtype is not want and array.dtype != want:
                    crosses_kind = array.dtype.kind in "biu" and want.kind in "fc"  # ids or masks as floats
                    if crosses_kind or not np.can_cast(array.dtype, want, casting="same_kind"):
                        if any(other.name not in feeds for other in info.inputs):
                            break  # wrong names are reported first, whatever else is wrong
                        raise EnclaveError(f"input {spec.name!r} must be {want.name}, got {array.dtype.name}")
                    array = array.astype(want)
                tensors.append((spec.name, array))
        if len(tensors) != len(info.inputs) or len(feeds) != len(info.inputs):
            names = set(info.input_names)
            missing = [n for n in info.input_names if n not in feeds]
            unknown = [n for n in feeds if n not in names]
            parts = ([f"missing {', '.join(map(repr, missing))}"] if missing else []) + (
                [f"unknown {', '.join(map(repr, unknown))}"] if unknown else []
            )
            raise EnclaveError("inputs do not match the enclave's private part: " + "; ".join(parts))
        try:
            # Views of the arrays, sent with one gathered write: the tensor data is not copied here.
            payload = conn.request_layout.parts(tensors) or protocol.tensor_parts(tensors)
        except ProtocolError as exc:
            raise EnclaveError(f"cannot send these inputs to the enclave: {exc}") from None
        size = sum(map(len, payload))

        def call(conn: _Connection, hello: protocol.Hello, remaining: float, limit: float) -> dict[str, np.ndarray]:
            if protocol.FRAME_OVERHEAD + size > hello.max_frame_bytes:
                raise EnclaveError(
                    f"inputs of {size} bytes exceed the enclave's frame limit of {hello.max_frame_bytes}; "
                    "send smaller batches or start the enclave with a larger max_frame_bytes"
                )
            reply = conn.request_one(MsgType.INFER, payload, size, MsgType.RESULT, remaining, limit)
            arrays = conn.result_layout.decode(reply)
            if arrays is not None:  # exactly what READY announced, in its order
                return dict(zip(conn.result_layout.names, arrays))
            try:
                results = protocol.decode_tensors(reply)
            except ProtocolError as exc:
                raise EnclaveError(f"enclave sent a malformed frame: {exc}") from None
            assert conn.info is not None
            return _announced_results(results, conn.info.outputs)

        return self._with_recovery(call, timeout, need_model=True)

    def stats(self, timeout: float | None = None) -> EnclaveStats:
        """Samples and requests served, requests refused, budget and budget left (None = unlimited)."""

        def call(conn: _Connection, hello: protocol.Hello, remaining: float, limit: float) -> EnclaveStats:
            reply = conn.request(
                lambda rid: [protocol.frame_parts(MsgType.STATS, rid, [])], MsgType.STATS_REPLY, remaining, limit
            )
            try:
                return protocol.decode_stats(reply)
            except ProtocolError as exc:
                raise EnclaveError(f"enclave sent a malformed frame: {exc}") from None

        return self._with_recovery(call, timeout)

    def ping(self, payload_bytes: int = 0, timeout: float | None = None) -> float:
        """Round trip of a PING carrying `payload_bytes` (echoed back); seconds. For health checks and benchmarks."""
        conn, _ = self._require_running()
        body = os.urandom(payload_bytes) if payload_bytes else b""
        limit = self.timeout if timeout is None else timeout
        began = time.perf_counter()
        reply = conn.request(lambda rid: [protocol.frame_parts(MsgType.PING, rid, [body])], MsgType.PONG, limit)
        elapsed = time.perf_counter() - began
        if bytes(reply) != body:
            raise EnclaveError("enclave sent a malformed frame: PONG does not echo the PING payload")
        return elapsed
