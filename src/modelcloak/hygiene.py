"""Memory hygiene: keep keys and decrypted weights out of core dumps, swap and stray copies.

A sealed model is only as safe as the memory it is decrypted into. This module gives modelcloak
three measures, all Linux-specific and all reported honestly rather than assumed:

- `secret_buffer` for key material: a `memfd_secret(2)` mapping where the kernel allows it (pages
  removed from the kernel's direct map, locked, never dumped), otherwise an anonymous mapping that
  is `mlock`ed (never swapped), `MADV_DONTDUMP` (left out of core dumps) and `MADV_WIPEONFORK`
  (a forked child sees zeros), otherwise the same without `mlock` when RLIMIT_MEMLOCK refuses it.
- `weights_buffer` for decrypted weights, which can be gigabytes: an anonymous private mapping
  marked `MADV_DONTDUMP`, not locked (locking gigabytes would exceed any sane RLIMIT_MEMLOCK).
- `harden_process`: the whole process becomes non-dumpable (`PR_SET_DUMPABLE` 0) with a zero core
  size limit, which covers the copies this module cannot control (OpenSSL's copy of an AEAD key,
  onnxruntime's copy of the initializers).

Every buffer is zeroed with `memset` before it is unmapped. `mapping_flags` and `mapping_name` read
`/proc/self/smaps` so tests and `modelcloak doctor` can check what the kernel actually applied.

On platforms other than Linux the buffers still work and are still wiped, but their `kind` is
``"none"`` and `memory_capabilities` says which measures are missing. See docs/MEMORY.md for what
Python cannot guarantee.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import platform
import sys
from types import TracebackType

from modelcloak.errors import ModelcloakError

__all__ = [
    "HygieneError",
    "SecureBuffer",
    "harden_process",
    "exclude_anonymous_memory_from_dumps",
    "release_range",
    "mapping_flags",
    "mapping_flags_of",
    "mapping_name",
    "memory_capabilities",
    "remove_environment_variable",
    "secret_buffer",
    "stop_wiping_freed_heap",
    "weights_buffer",
    "wipe_freed_heap",
]

_IS_LINUX = sys.platform.startswith("linux")
# memfd_secret is 447 in the generic syscall table, which x86_64 and aarch64 both use for it.
# Other architectures are not trusted with a guessed number.
_SYS_MEMFD_SECRET = 447 if platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64") else None
_PR_GET_DUMPABLE = 3
_PR_SET_DUMPABLE = 4
# Python may be built against headers that predate MADV_WIPEONFORK (Linux 4.14); the value is fixed.
_MADV_WIPEONFORK = getattr(mmap, "MADV_WIPEONFORK", 18 if _IS_LINUX else None)
_MADV_DONTDUMP = getattr(mmap, "MADV_DONTDUMP", None)
_PAGE = mmap.PAGESIZE
# mallopt(3) parameter M_PERTURB from glibc's malloc.h; any non-zero byte switches it on.
_M_PERTURB = -6
_PERTURB_BYTE = 0xA5
_CAP_IPC_LOCK = 14

KIND_MEMFD_SECRET = "memfd_secret"
KIND_MLOCK = "mlock"
KIND_DONTDUMP = "dontdump"
KIND_NONE = "none"


class HygieneError(ModelcloakError):
    """A memory-hygiene measure could not be applied or a buffer was misused; the message says how."""


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library of this process, or None where ctypes cannot load it (then measures are off).

    Loaded once: a load allocates a dozen buffers and releases a page range per tensor, and each
    ctypes.CDLL builds a class and calls dlopen, about as much CPU as the call it was made for.
    All calls pass ctypes-typed arguments; the one prototype set (`syscall` returns a long) suits every caller.
    """
    try:
        lib = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    return lib


def _round_up(size: int) -> int:
    """Mappings come in whole pages; a zero-byte request still gets one page so it has an address."""
    return max(_PAGE, -(-size // _PAGE) * _PAGE)


def _check_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool):
        raise HygieneError(f"buffer size must be an int, got {type(size).__name__}")
    if size < 0:
        raise HygieneError(f"buffer size must be >= 0, got {size}")


def _address_of(mm: mmap.mmap) -> int:
    """Start address of an mmap.

    The ctypes object exports the mmap's buffer; it is dropped at once, because a live export makes
    `mmap.close()` raise BufferError. The address stays valid for as long as the mapping exists.
    """
    anchor = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


def _anonymous_private(length: int) -> mmap.mmap:
    """A private anonymous read-write mapping: not shared with children or other processes."""
    if hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS"):
        return mmap.mmap(
            -1,
            length,
            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
    return mmap.mmap(-1, length)  # Windows: no flags; still a private page-file backed mapping.


def _madvise(mm: mmap.mmap, advice: int | None) -> bool:
    """Apply one madvise hint; False (not an exception) where the kernel or platform lacks it."""
    if advice is None or not hasattr(mm, "madvise"):
        return False
    try:
        mm.madvise(advice)
    except (OSError, ValueError):
        return False
    return True


def _mlock(address: int, length: int) -> bool:
    """Lock pages in RAM so they are never written to swap; False when RLIMIT_MEMLOCK refuses."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mlock"):
        return False
    return libc.mlock(ctypes.c_void_p(address), ctypes.c_size_t(length)) == 0


def _memfd_secret_fd() -> int:
    """Open a memfd_secret file descriptor; raises OSError carrying the kernel's errno."""
    if not _IS_LINUX or _SYS_MEMFD_SECRET is None:
        raise OSError(errno.ENOSYS, "memfd_secret is only known on Linux x86_64 and aarch64")
    libc = _libc()
    if libc is None:
        raise OSError(errno.ENOSYS, "libc could not be loaded")
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(ctypes.c_long(_SYS_MEMFD_SECRET), ctypes.c_long(os.O_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"memfd_secret: {os.strerror(err)}")
    return int(fd)


def _probe_memfd_secret() -> int:
    """0 if memfd_secret(2) gives a file descriptor here, else the errno (ENOSYS: not built/enabled)."""
    try:
        fd = _memfd_secret_fd()
    except OSError as exc:
        return exc.errno or errno.ENOSYS
    os.close(fd)
    return 0


def _map_memfd_secret(length: int) -> mmap.mmap:
    """Map `length` bytes of secret memory.

    The mapping must be MAP_SHARED (mmap.mmap's default for a file descriptor); secretmem refuses
    private mappings. The kernel charges it to RLIMIT_MEMLOCK, so mmap fails with EAGAIN when the
    limit is exhausted; the caller then falls back. Our descriptor is closed at once: mmap keeps
    its own duplicate until the mapping is closed.
    """
    fd = _memfd_secret_fd()
    try:
        os.ftruncate(fd, length)
        return mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


class SecureBuffer:
    """A writable buffer for secrets/decrypted weights that is excluded from core dumps and wiped on close.

    Build one with `secret_buffer` or `weights_buffer`, not directly. `kind` says which protection
    the kernel actually granted ("memfd_secret", "mlock", "dontdump", or "none" off Linux), so a
    caller or `modelcloak doctor` can report it instead of assuming it.

    Lifetime rule: memoryviews returned by `view()` are tracked and released by `close()`, so a
    stale view raises ValueError instead of touching unmapped memory. Anything derived from a view
    (a numpy array from ``np.frombuffer(view)``, a memoryview slice, a ctypes ``from_buffer``)
    pins the mapping; drop it before `close()`, otherwise `close()` wipes the contents and then
    raises HygieneError rather than silently leaving the mapping alive.
    """

    kind: str
    size: int
    address: int

    def __init__(self, mm: mmap.mmap, size: int, kind: str) -> None:
        self._mm: mmap.mmap | None = mm
        self._length = len(mm)
        self._views: list[memoryview] = []
        self._closing = False
        self._released: list[tuple[int, int]] = []  # page spans handed back by release(), already zero
        self.kind = kind
        self.size = size
        self.address = _address_of(mm)

    @property
    def closed(self) -> bool:
        """True once `close()` has begun: contents are wiped and `view()` is refused."""
        return self._mm is None or self._closing

    def view(self) -> memoryview:
        """A writable memoryview of exactly `size` bytes, tracked so `close()` can release it."""
        if self.closed:
            raise HygieneError("this SecureBuffer is closed (its contents were wiped); allocate a new one")
        self._views = [v for v in self._views if _alive(v)]
        assert self._mm is not None
        whole = memoryview(self._mm)
        try:
            part = whole[: self.size]
        finally:
            whole.release()
        self._views.append(part)
        return part

    def wipe(self) -> None:
        """Overwrite the whole mapping with zeros using memset (not optimised away); safe to repeat.

        Pages given back by `release()` read as zeros already and are skipped: writing them would
        only fault them back in.
        """
        if self._mm is None:
            return  # already unmapped: nothing left to wipe, and the address is no longer ours
        position = 0
        for start, end in sorted(self._released):
            if start > position:
                ctypes.memset(self.address + position, 0, start - position)
            position = max(position, end)
        if position < self._length:
            ctypes.memset(self.address + position, 0, self._length - position)

    def release(self, offset: int, length: int) -> int:
        """Wipe `length` bytes at `offset` now and hand their whole pages back to the kernel.

        For a region nothing will read or write again (weights the runtime has copied); the buffer
        stays usable, the region reads as zeros. Returns the bytes handed back (`release_range`).
        """
        if self.closed:
            raise HygieneError("this SecureBuffer is closed (its contents were wiped); allocate a new one")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise HygieneError(f"release of [{offset}, {offset + length}) is outside this {self.size}-byte buffer")
        dropped = release_range(self.address + offset, length)
        if dropped:
            start, end = _whole_pages(self.address + offset, length)
            self._released.append((start - self.address, end - self.address))
        return dropped

    def close(self) -> None:
        """Wipe, release handed-out views, then unmap (closing the memfd). Idempotent.

        Raises HygieneError if something still exports the buffer (a numpy array over a view, a
        memoryview slice): the contents are already zero by then, and close() can be called again
        once those objects are dropped.
        """
        if self._mm is None:
            return
        self._closing = True
        self.wipe()
        pinned = 0
        for v in self._views:
            try:
                v.release()
            except BufferError:
                pinned += 1  # something (e.g. numpy) holds a buffer on this very view
        self._views = [v for v in self._views if _alive(v)]
        try:
            self._mm.close()
        except BufferError:
            raise HygieneError(
                f"cannot unmap this {self.kind} buffer: objects derived from its views are still alive "
                f"({pinned} tracked view(s) pinned; numpy arrays from np.frombuffer, memoryview slices or "
                "ctypes from_buffer objects). The contents were wiped; delete those objects, then call "
                "close() again."
            ) from None
        self._mm = None
        self._views = []

    def __enter__(self) -> SecureBuffer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # Best effort for buffers nobody closed: at least wipe. Errors cannot propagate from here.
        try:
            if getattr(self, "_mm", None) is not None:
                self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<SecureBuffer kind={self.kind} size={self.size} {state}>"


def _alive(v: memoryview) -> bool:
    try:
        _ = v.nbytes  # raises once the view has been released
    except ValueError:
        return False
    return True


def secret_buffer(size: int, *, _allow_memfd_secret: bool = True, _allow_mlock: bool = True) -> SecureBuffer:
    """A buffer for key material, with the strongest protection this kernel grants.

    In order of preference: memfd_secret (the pages leave the kernel's direct map, so even kernel
    code and root via /proc/pid/mem cannot read them; locked; never dumped); else an anonymous
    private mapping with mlock + MADV_DONTDUMP + MADV_WIPEONFORK; else (RLIMIT_MEMLOCK refused the
    lock) DONTDUMP + WIPEONFORK only. `kind` on the result says which was obtained. memfd_secret
    and mlock both count against RLIMIT_MEMLOCK (often 8 MiB), so keep these buffers small.

    The keyword-only underscore parameters exist so tests can exercise the fallbacks for real.
    """
    _check_size(size)
    length = _round_up(size)
    if _IS_LINUX and _allow_memfd_secret:
        try:
            mm = _map_memfd_secret(length)
        except OSError:
            pass  # ENOSYS (not built/enabled), EAGAIN (memlock limit) ...: fall back below
        else:
            return SecureBuffer(mm, size, KIND_MEMFD_SECRET)
    mm = _anonymous_private(length)
    if not _IS_LINUX or not _madvise(mm, _MADV_DONTDUMP):
        return SecureBuffer(mm, size, KIND_NONE)
    _madvise(mm, _MADV_WIPEONFORK)
    buf = SecureBuffer(mm, size, KIND_DONTDUMP)
    if _allow_mlock and _mlock(buf.address, length):
        buf.kind = KIND_MLOCK
    return buf


_HUGE_PAGE = 2 * 1024 * 1024


def weights_buffer(size: int) -> SecureBuffer:
    """A buffer for decrypted weights: anonymous private mapping, MADV_DONTDUMP, wiped on close.

    Not locked: weights run to gigabytes and RLIMIT_MEMLOCK is typically a few MiB, so they may
    reach swap (see docs/MEMORY.md). Size 0 is allowed and gives a 0-byte view over one page.
    """
    _check_size(size)
    mm = _anonymous_private(_round_up(size))
    dd = _IS_LINUX and _madvise(mm, _MADV_DONTDUMP)
    if size >= _HUGE_PAGE:
        # Transparent huge pages: decrypting into fresh memory is dominated by page faults; 2 MiB
        # pages cut the first-touch cost of a 100 MB model about five-fold (benchmarks/bench_seal.py).
        _madvise(mm, getattr(mmap, "MADV_HUGEPAGE", None))
    return SecureBuffer(mm, size, KIND_DONTDUMP if dd else KIND_NONE)


_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)


def _whole_pages(address: int, length: int) -> tuple[int, int]:
    """The page-aligned [start, end) inside [address, address + length); empty when start >= end."""
    return -(-address // _PAGE) * _PAGE, (address + length) // _PAGE * _PAGE


def release_range(address: int, length: int) -> int:
    """Zero `length` bytes at `address` (memset), then give the whole pages inside back to the kernel.

    For a region of a private anonymous mapping (a `weights_buffer`) that nothing will read again:
    the bytes are wiped first, then `MADV_DONTNEED` drops the pages so they stop counting towards
    RSS (reading them again gives zeros). Partial pages at either end are only zeroed, because a
    neighbouring region may still be in use. Returns the bytes handed back (0 where the kernel or
    platform cannot). `SecureBuffer.release` is the same for a region of one buffer, remembered so
    that its final wipe does not fault the pages back in.
    """
    if length <= 0:
        return 0
    ctypes.memset(address, 0, length)
    start, end = _whole_pages(address, length)
    if end <= start:
        return 0  # no whole page inside: wiped, nothing to hand back
    libc = _libc() if _IS_LINUX else None
    if libc is None or not hasattr(libc, "madvise") or _MADV_DONTNEED is None:
        return 0
    if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), ctypes.c_int(_MADV_DONTNEED)) != 0:
        return 0
    return end - start


def _get_dumpable() -> int | None:
    """PR_GET_DUMPABLE for this process (0 = not dumpable), or None where prctl is unavailable."""
    if not _IS_LINUX:
        return None
    libc = _libc()
    if libc is None or not hasattr(libc, "prctl"):
        return None
    z = ctypes.c_ulong(0)
    return int(libc.prctl(ctypes.c_int(_PR_GET_DUMPABLE), z, z, z, z))


def _core_limit_zero() -> bool:
    try:
        import resource
    except ImportError:
        return False
    return resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)


def harden_process() -> dict[str, bool]:
    """Make this process non-dumpable and forbid core files; idempotent; returns what succeeded.

    PR_SET_DUMPABLE 0 stops core dumps (unless fs.suid_dumpable=2), and as a side effect stops
    same-uid, non-root processes from ptrace-attaching or reading /proc/pid/mem. RLIMIT_CORE (0, 0)
    is a second, independent stop for file-based core dumps; lowering the hard limit cannot be
    undone by this process. execve() resets dumpability, so a program this process execs is
    dumpable again; the core limit is inherited. It also turns on `wipe_freed_heap`, so the
    runtime's own copies of the weights are overwritten when it frees them.
    """
    result = {"non_dumpable": False, "core_limit_zero": False, "freed_heap_wiped": wipe_freed_heap()}
    if _IS_LINUX:
        libc = _libc()
        if libc is not None and hasattr(libc, "prctl"):
            z = ctypes.c_ulong(0)
            libc.prctl(ctypes.c_int(_PR_SET_DUMPABLE), z, z, z, z)
            result["non_dumpable"] = _get_dumpable() == 0
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, OSError, ValueError):
        pass
    result["core_limit_zero"] = _core_limit_zero()
    return result


def _smaps_blocks(addresses: list[int], path: str) -> dict[int, list[str]]:
    """For each address, the lines of the /proc/self/{smaps,maps} entry whose range contains it.

    One streaming pass that stops once every address is placed: the kernel builds smaps entries
    (a page-table walk each) only as they are read, so reading the whole file for every buffer cost
    tens of milliseconds per load in a large process.
    """
    if not _IS_LINUX:
        raise HygieneError(f"{path} is Linux-only; mapping checks are not available on {sys.platform}")
    wanted = set(addresses)
    found: dict[int, list[str]] = {}
    current: list[str] | None = None
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                line = line.rstrip("\n")
                head = line.split(None, 1)[0] if line else ""
                if head.endswith(":") or "-" not in head:
                    if current is not None:
                        current.append(line)
                    continue
                if current is not None and not wanted:
                    break  # the last wanted entry is complete
                current = None
                lo, _, hi = head.partition("-")
                try:
                    start, end = int(lo, 16), int(hi, 16)
                except ValueError:
                    continue
                inside = [a for a in wanted if start <= a < end]
                if inside:
                    current = [line]
                    for address in inside:
                        found[address] = current
                        wanted.discard(address)
    except OSError as exc:
        raise HygieneError(f"cannot read {path}: {exc}") from exc
    if wanted:
        raise HygieneError(f"no mapping in {path} contains address {min(wanted):#x}")
    return found


def mapping_flags_of(addresses: list[int]) -> dict[int, set[str]]:
    """`mapping_flags` for several addresses in one read of /proc/self/smaps."""
    flags: dict[int, set[str]] = {}
    for address, block in _smaps_blocks(addresses, "/proc/self/smaps").items():
        vm = [line for line in block if line.startswith("VmFlags:")]
        if not vm:
            raise HygieneError(f"the kernel reports no VmFlags for the mapping at {address:#x}")
        flags[address] = set(vm[0].split()[1:])
    return flags


def mapping_flags(address: int) -> set[str]:
    """The kernel's VmFlags for the mapping containing `address` (e.g. {"rd", "wr", "lo", "dd"}).

    This is the ground truth for what a buffer got: "dd" = excluded from core dumps, "lo" =
    locked in RAM, "wf" = wiped on fork. Raises HygieneError if no mapping contains the address.
    """
    return mapping_flags_of([address])[address]


def mapping_name(address: int) -> str:
    """The pathname column for the mapping containing `address`: "/secretmem (deleted)", "" for anonymous."""
    header = _smaps_blocks([address], "/proc/self/maps")[address][0]
    parts = header.split(None, 5)
    return parts[5].strip() if len(parts) == 6 else ""


def wipe_freed_heap() -> bool:
    """Make glibc's malloc overwrite every chunk when it is freed (mallopt M_PERTURB); True if set.

    onnxruntime and protobuf copy weights into ordinary heap memory that modelcloak cannot wipe
    itself; freed and left as it was, that plaintext outlives `close()` (measured by
    tests/runtime/test_memory_canary.py). With M_PERTURB set, free() fills the chunk with a fixed
    byte first (and malloc() fills new chunks with its complement). Large chunks are returned to
    the kernel with munmap, which removes them from the process outright. Not covered: chunks of
    up to 1 KiB kept in glibc's per-thread cache, and allocators other than glibc's (False then).
    """
    if not _IS_LINUX:
        return False
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    return bool(libc.mallopt(ctypes.c_int(_M_PERTURB), ctypes.c_int(_PERTURB_BYTE)))


def stop_wiping_freed_heap() -> None:
    """Undo `wipe_freed_heap` (tests use it as the negative control)."""
    libc = _libc() if _IS_LINUX else None
    if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version"):
        libc.mallopt(ctypes.c_int(_M_PERTURB), ctypes.c_int(0))


def exclude_anonymous_memory_from_dumps() -> int:
    """Mark every private anonymous writable or reserved mapping MADV_DONTDUMP; returns how many.

    Called once the runtime holds its copies of the weights (its initializers, pre-packed weights,
    graph optimisers' rewritten tensors all live in the heap or in anonymous mappings), so those
    copies are left out of a core dump even where non-dumpability is not honoured
    (fs.suid_dumpable=2, pipe core handlers). Reserved arena space that becomes writable later
    is covered; memory mapped later (and the main heap's growth by brk) is not. Reads
    /proc/self/maps (no page-table walk); a mapping the kernel refuses (device memory) is skipped.
    """
    if not _IS_LINUX:
        return 0
    libc = _libc()
    if libc is None or not hasattr(libc, "madvise") or _MADV_DONTDUMP is None:
        return 0
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return 0
    marked = 0
    for line in lines:
        parts = line.split(None, 5)
        # "---p": glibc reserves each thread arena's heap PROT_NONE and mprotects it writable as it
        # grows; the part that grows later keeps the flag only if the reservation has it now.
        if len(parts) < 5 or parts[1] not in ("rw-p", "---p"):
            continue
        name = parts[5].strip() if len(parts) == 6 else ""
        if name and name != "[heap]" and not name.startswith("[anon:"):
            continue
        lo, _, hi = parts[0].partition("-")
        start, end = int(lo, 16), int(hi, 16)
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), ctypes.c_int(_MADV_DONTDUMP)) == 0:
            marked += 1
    return marked


def _cap_ipc_lock() -> bool:
    """Whether CAP_IPC_LOCK is effective (then RLIMIT_MEMLOCK does not bind mlock)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_IPC_LOCK & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def memory_capabilities() -> dict[str, bool | int]:
    """What this machine offers, for `modelcloak doctor`; probes for real, changes nothing lasting.

    Keys: linux; memfd_secret (the syscall gives a descriptor); madvise_dontdump and mlock (applied
    to a probe page); mlock_limit_bytes (soft RLIMIT_MEMLOCK, -1 = unlimited; also caps
    memfd_secret); cap_ipc_lock (the limit does not apply); prctl; and the current process state
    non_dumpable and core_limit_zero (True once `harden_process` ran).
    """
    caps: dict[str, bool | int] = {
        "linux": _IS_LINUX,
        "memfd_secret": _IS_LINUX and _probe_memfd_secret() == 0,
        "madvise_dontdump": False,
        "mlock": False,
        "mlock_limit_bytes": -1,
        "cap_ipc_lock": _IS_LINUX and _cap_ipc_lock(),
        "prctl": False,
        "non_dumpable": False,
        "core_limit_zero": _core_limit_zero(),
    }
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
        caps["mlock_limit_bytes"] = -1 if soft == resource.RLIM_INFINITY else int(soft)
    except (ImportError, AttributeError, OSError):
        pass
    if _IS_LINUX:
        probe = secret_buffer(1, _allow_memfd_secret=False)
        try:
            caps["madvise_dontdump"] = probe.kind in (KIND_MLOCK, KIND_DONTDUMP)
            caps["mlock"] = probe.kind == KIND_MLOCK
        finally:
            probe.close()
        dumpable = _get_dumpable()
        caps["prctl"] = dumpable is not None
        caps["non_dumpable"] = dumpable == 0
    return caps


def _initial_environment_block() -> tuple[int, int] | None:
    """(env_start, env_end): where the kernel keeps this process's initial environment strings.

    That block is what /proc/PID/environ shows; unsetenv(3) only drops a pointer to it.
    """
    try:
        with open("/proc/self/stat", encoding="ascii", errors="replace") as handle:
            fields = handle.read().rpartition(")")[2].split()
        return int(fields[47]), int(fields[48])  # fields 50 and 51 of proc(5), counted after "comm"
    except (OSError, ValueError, IndexError):
        return None


def remove_environment_variable(name: str) -> str | None:
    """Remove `name` from the environment and wipe it from the initial environment block.

    A secret passed in a variable is otherwise inherited by every child process and stays readable
    in /proc/PID/environ for the life of the process. Returns the value (None if unset). The wipe
    covers the block the process started with; a value set later by this process lives only in
    the C environment, which `os.environ.pop` already cleared.
    """
    value = os.environ.pop(name, None)
    if value is None or not _IS_LINUX:
        return value
    block = _initial_environment_block()
    if block is None:
        return value
    start, end = block
    try:
        with open("/proc/self/environ", "rb") as handle:
            initial = handle.read()
    except OSError:
        return value
    offset = 0
    prefix = name.encode() + b"="
    for entry in initial.split(b"\0"):
        address = start + offset
        if entry.startswith(prefix) and address + len(entry) <= end and ctypes.string_at(address, len(entry)) == entry:
            ctypes.memset(address, 0, len(entry))
        offset += len(entry) + 1
    return value
