"""Give back each decrypted weight as soon as onnxruntime has copied it.

onnxruntime 1.32 copies every initializer handed over with `add_external_initializers` into its
own memory at the start of `initialize_session` (`Graph::InjectExternalInitializedTensors`), then
optimises the graph and pre-packs the weights, all inside that one call. Left alone, the whole
decrypted buffer lives until the call returns, so the peak holds our buffer, the runtime's copy
and its pre-packed weights at once. The runtime logs one INFO line per tensor right after copying
it ("Replaced external initializer: NAME"), and releases the GIL while it builds, so a thread can
wipe that tensor's bytes in our buffer and hand the pages back (`SecureBuffer.release`) while the
runtime goes on: our buffer shrinks as its copy grows (docs/BENCHMARKS.md).

The only channel for those lines from Python is the process's stderr (onnxruntime logs to
`std::cerr`; the Python API has no log callback), so for the duration of the build `RegionRelease`
points file descriptor 2 at a pipe. onnxruntime's lines are consumed there (the session would
otherwise print them); every other line goes on to the real stderr. A tensor is released only
once every tensor that shares bytes with it has been copied. If the line never appears (another
onnxruntime version, another wording), nothing is released early and the buffer lives until the
build returns, as before: the fallback is the old behaviour, never a wiped weight in use.
"""

from __future__ import annotations

import os
import re
import select
import sys
import threading
from collections.abc import Callable, Iterable
from types import TracebackType

# onnxruntime's log lines: "<time> [I:onnxruntime:<logid>, <file>:<line> <function>] <message>".
_RUNTIME_LINE = re.compile(rb"\[([VIWEF]):onnxruntime:")
_SEVERITY = {b"V": 0, b"I": 1, b"W": 2, b"E": 3, b"F": 4}
_COPIED = re.compile(rb"InjectExternalInitializedTensors\] Replaced external initializer: (.*?)\r?$")
# The INFO level that carries the line above; the session is built at this level while watched.
INFO_SEVERITY = 1
# File descriptor 2 is one per process: watched builds in several threads take turns, or one
# build's exit would point stderr back at another's pipe.
_STDERR_TURN = threading.Lock()


class RegionRelease:
    """Context manager: while open, release each named region once onnxruntime reports it copied.

    `regions` are (name, offset, length) of the initializers inside our weights buffer, and
    `release(offset, length)` wipes and hands back such a region (`SecureBuffer.release`).
    `released_bytes` and `released` (names) say what was handed back before the build returned.
    onnxruntime's lines are consumed, except those at `show_from` or above (0 verbose .. 4 fatal):
    the level the caller had asked the session to log at (by default modelcloak asks for none).
    """

    def __init__(
        self, regions: Iterable[tuple[str, int, int]], release: Callable[[int, int], int], *, show_from: int = 5
    ) -> None:
        self._regions = {name: (offset, offset + length) for name, offset, length in regions}
        # Which regions share bytes with each one, found once: checking every pending tensor on each
        # copied line made the reader's work grow with the square of the tensor count.
        self._sharing = _sharing(self._regions)
        self._release = release
        self._show_from = show_from  # onnxruntime lines at this severity or above still reach stderr
        self._pending = set(self._regions)
        self._copied: list[str] = []  # copied, but sharing bytes with a tensor still pending
        self._spans: set[tuple[int, int]] = set()  # released already (two names, one region)
        self.released: list[str] = []
        self.released_bytes = 0
        self._saved_fd: int | None = None
        self._reader: threading.Thread | None = None
        self._done = threading.Event()
        self._stopped = False

    def __enter__(self) -> RegionRelease:
        if not self._regions:
            return self
        _STDERR_TURN.acquire()
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):
            _STDERR_TURN.release()
            return self  # no stderr to borrow: nothing is released early
        try:
            read_end, write_end = os.pipe()
        except OSError:
            os.close(saved)
            _STDERR_TURN.release()
            return self
        os.dup2(write_end, 2)
        os.close(write_end)
        self._saved_fd = saved
        self._done = threading.Event()
        self._reader = threading.Thread(
            target=self._read, args=(read_end, saved), name="modelcloak-copy-watch", daemon=True
        )
        self._reader.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        if self._saved_fd is None:
            return
        try:
            sys.stderr.flush()
        finally:
            os.dup2(self._saved_fd, 2)  # our end of the pipe is closed; a child may still hold one
            self._done.set()
            if self._reader is not None:
                self._reader.join()
            os.close(self._saved_fd)
            self._saved_fd = None
            _STDERR_TURN.release()

    def _read(self, read_end: int, forward_fd: int) -> None:
        """Consume the pipe until the build is over and nothing more is waiting (or every writer
        is gone). A child process started meanwhile by another thread may hold the write end:
        then the pipe does not reach EOF, so the loop polls instead of blocking on read()."""
        pending = b""
        try:
            while True:
                ready, _, _ = select.select([read_end], [], [], 0.05)
                if not ready:
                    if self._done.is_set():
                        break
                    continue
                chunk = os.read(read_end, 65536)
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._safe_line(line, forward_fd)
            if pending:
                self._safe_line(pending, forward_fd)
        finally:
            os.close(read_end)

    def _safe_line(self, line: bytes, forward_fd: int) -> None:
        # The pipe must keep draining whatever happens: onnxruntime blocks on a full pipe.
        try:
            self._line(line, forward_fd)
        except Exception:  # a failed release or forward only ends the early release
            self._stopped = True  # release nothing more; the buffer's close() wipes the rest

    def _line(self, line: bytes, forward_fd: int) -> None:
        runtime = _RUNTIME_LINE.search(line)
        if runtime is None or _SEVERITY[runtime.group(1)] >= self._show_from:
            os.write(forward_fd, line + b"\n")  # the caller's own output, or a level the caller asked for
        copied = _COPIED.search(line) if runtime is not None else None
        if copied is None or self._stopped:
            return
        name = copied.group(1).decode("utf-8", "replace")
        if name not in self._pending:
            return
        self._pending.discard(name)
        self._copied.append(name)
        self._release_ready()

    def _release_ready(self) -> None:
        waiting = []
        for name in self._copied:
            if any(other in self._pending for other in self._sharing.get(name, ())):
                waiting.append(name)  # shares bytes with a tensor onnxruntime has not copied yet
                continue
            start, end = self._regions[name]
            if (start, end) not in self._spans:  # wiping it again would fault the pages back in
                self._spans.add((start, end))
                self.released_bytes += self._release(start, end - start)
            self.released.append(name)
        self._copied = waiting


def _sharing(regions: dict[str, tuple[int, int]]) -> dict[str, list[str]]:
    """For each region name, the other names whose [start, end) shares at least one byte with it."""
    ordered = sorted(regions.items(), key=lambda item: item[1])
    sharing: dict[str, list[str]] = {}
    for index, (name, (start, end)) in enumerate(ordered):
        for other, (other_start, other_end) in ordered[index + 1 :]:
            if other_start >= end:
                break  # sorted by start: nothing further can begin inside this region
            if start < other_end and other_start < end:
                sharing.setdefault(name, []).append(other)
                sharing.setdefault(other, []).append(name)
    return sharing
