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
import sys
import threading
from collections.abc import Callable, Iterable
from types import TracebackType

# onnxruntime's log lines: "<time> [I:onnxruntime:<logid>, <file>:<line> <function>] <message>".
_RUNTIME_LINE = re.compile(rb"\[[VIWEF]:onnxruntime:")
_COPIED = re.compile(rb"InjectExternalInitializedTensors\] Replaced external initializer: (.*?)\r?$")
# The INFO level that carries the line above; the session is built at this level while watched.
INFO_SEVERITY = 1


class RegionRelease:
    """Context manager: while open, release each named region once onnxruntime reports it copied.

    `regions` are (name, offset, length) of the initializers inside our weights buffer, and
    `release(offset, length)` wipes and hands back such a region (`SecureBuffer.release`).
    `released_bytes` and `released` (names) say what was handed back before the build returned.
    """

    def __init__(self, regions: Iterable[tuple[str, int, int]], release: Callable[[int, int], int]) -> None:
        self._regions = {name: (offset, offset + length) for name, offset, length in regions}
        self._release = release
        self._pending = set(self._regions)
        self._copied: list[str] = []  # copied, but sharing bytes with a tensor still pending
        self._spans: set[tuple[int, int]] = set()  # released already (two names, one region)
        self.released: list[str] = []
        self.released_bytes = 0
        self._saved_fd: int | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> RegionRelease:
        if not self._regions:
            return self
        try:
            sys.stderr.flush()
            self._saved_fd = os.dup(2)
        except (OSError, ValueError, AttributeError):
            return self  # no stderr to borrow: nothing is released early
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self._reader = threading.Thread(
            target=self._read, args=(read_end, self._saved_fd), name="modelcloak-copy-watch", daemon=True
        )
        self._reader.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        if self._saved_fd is None:
            return
        try:
            sys.stderr.flush()
        finally:
            os.dup2(self._saved_fd, 2)  # closes the pipe's last write end: the reader sees EOF
            if self._reader is not None:
                self._reader.join()
            os.close(self._saved_fd)
            self._saved_fd = None

    def _read(self, read_end: int, forward_fd: int) -> None:
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            pending = b""
            while chunk := pipe.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._line(line, forward_fd)
            if pending:
                self._line(pending, forward_fd)

    def _line(self, line: bytes, forward_fd: int) -> None:
        if not _RUNTIME_LINE.search(line):
            os.write(forward_fd, line + b"\n")  # not onnxruntime's: the caller's own stderr output
            return
        copied = _COPIED.search(line)
        if copied is None:
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
            start, end = self._regions[name]
            if any(start < self._regions[other][1] and self._regions[other][0] < end for other in self._pending):
                waiting.append(name)  # shares bytes with a tensor onnxruntime has not copied yet
                continue
            if (start, end) not in self._spans:  # wiping it again would fault the pages back in
                self._spans.add((start, end))
                self.released_bytes += self._release(start, end - start)
            self.released.append(name)
        self._copied = waiting
