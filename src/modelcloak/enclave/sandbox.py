"""Hardening of the `process` enclave backend, and the enclave's own key handling.

This module deliberately duplicates a little of `modelcloak.hygiene`: the trusted side may not
import host code (it must run alone inside a TEE), and the few measures it needs are short.

Order of use (see server.py):

1. `harden_early()` before the key is read: non-dumpable, no core files, optional RLIMIT_AS.
2. `read_key()` from a key file (refused if group/other can read it) or an environment variable,
   into a `KeyBuffer` (anonymous mapping, MADV_DONTDUMP, mlock when allowed, wiped).
3. After the model is decrypted and onnxruntime holds it: `limit_open_files()` and
   `install_filter()`, a seccomp filter (libseccomp through pyseccomp) applied to every thread
   (TSYNC, since onnxruntime's pool threads already exist) that refuses opening files, network
   sockets, new processes, exec, ptrace and cross-process memory access.

The filter is a deny list on a default-allow policy. An allow list would be tighter, but the set
of syscalls CPython, glibc, numpy and onnxruntime need differs between versions and a missed one
kills the enclave in production; the deny list covers every route to the disk, the network,
another program or another process's memory that the `process` backend is meant to close.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import errno
import mmap
import os
import platform
import stat
import sys
from dataclasses import dataclass, field

KEY_SIZE = 32
_PR_SET_DUMPABLE = 4
_PR_GET_DUMPABLE = 3
_PR_GET_SECCOMP = 21
_CLONE_THREAD = 0x00010000
_MADV_DONTDUMP = getattr(mmap, "MADV_DONTDUMP", 16 if sys.platform.startswith("linux") else None)
DEFAULT_NOFILE = 16


class SandboxError(Exception):
    """A hardening step that was required could not be applied."""


class KeyUnavailable(Exception):
    """The enclave key could not be read; the message says what to fix."""


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


# --------------------------------------------------------------------------------------------
# Process hardening


@dataclass
class Hardening:
    """What was actually applied (reported to the host in READY)."""

    applied: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)


def _prctl(option: int, arg: int = 0) -> int:
    libc = _libc()
    if libc is None or not hasattr(libc, "prctl"):
        return -1
    z = ctypes.c_ulong(0)
    return int(libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), z, z, z))


def harden_early(report: Hardening, *, max_address_space: int | None = None) -> None:
    """Non-dumpable (no core dumps, no same-user ptrace or /proc/PID/mem), no core files, memory cap."""
    if sys.platform.startswith("linux"):
        _prctl(_PR_SET_DUMPABLE, 0)
        if _prctl(_PR_GET_DUMPABLE) == 0:
            report.applied.add("non_dumpable")
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if resource.getrlimit(resource.RLIMIT_CORE) == (0, 0):
            report.applied.add("core_limit_zero")
        if max_address_space is not None:
            resource.setrlimit(resource.RLIMIT_AS, (max_address_space, max_address_space))
            report.applied.add("address_space_limited")
    except (ImportError, OSError, ValueError) as exc:
        report.notes.append(f"resource limits: {exc}")


# A home no process can create (a path below a character device), so nothing the enclave loads can
# open or create per-user files: onnxruntime 1.32 opens a telemetry database
# (~/.cache/Microsoft/DeveloperTools/.onnxruntime/onnxruntime.db) at import and keeps it open.
NO_HOME = "/dev/null/modelcloak-enclave-has-no-home"
_HOME_VARIABLES = ("HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME")


def scrub_environment() -> None:
    """Point every per-user directory at NO_HOME before the heavy imports. The host already
    starts the enclave with a scrubbed environment; this holds even under another launcher."""
    for name in _HOME_VARIABLES:
        os.environ[name] = NO_HOME


def limit_open_files(report: Hardening, limit: int = DEFAULT_NOFILE) -> None:
    """Cap RLIMIT_NOFILE: after loading, the enclave needs no descriptors beyond the ones it holds."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
        report.applied.add("nofile_limited")
    except (ImportError, OSError, ValueError) as exc:
        report.notes.append(f"RLIMIT_NOFILE: {exc}")


# --------------------------------------------------------------------------------------------
# seccomp

# Syscalls refused with EPERM: Python turns that into PermissionError, so an unexpected late
# import or a library probing a file fails one request instead of killing the enclave.
DENIED_EPERM: tuple[str, ...] = (
    # opening files (also directories, /proc/self/mem, device nodes)
    "open",
    "openat",
    "openat2",
    "creat",
    "open_by_handle_at",
    "name_to_handle_at",
    # changing the file system by path
    "truncate",
    "unlink",
    "unlinkat",
    "rename",
    "renameat",
    "renameat2",
    "link",
    "linkat",
    "symlink",
    "symlinkat",
    "mkdir",
    "mkdirat",
    "rmdir",
    "mknod",
    "mknodat",
    "chmod",
    "fchmodat",
    "chown",
    "lchown",
    "fchownat",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    # network: no new sockets, no connections (the host's socket is inherited, not created)
    "socket",
    "socketpair",
    "connect",
    "bind",
    "listen",
    "accept",
    "accept4",
    # new processes (clone is handled below: threads stay allowed)
    "fork",
    "vfork",
    # io_uring performs opens and socket calls in the kernel, out of seccomp's sight
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    # namespaces, kernel objects and tracing facilities an intruder could use
    "unshare",
    "setns",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "add_key",
    "request_key",
    "keyctl",
    # process handles: pidfd_getfd would copy another process's descriptors
    "pidfd_open",
    "pidfd_getfd",
    "pidfd_send_signal",
    "tkill",
)

# Syscalls that kill the whole process: nothing legitimate in the enclave ever makes them, and
# a process that tries is compromised.
DENIED_KILL: tuple[str, ...] = (
    "execve",
    "execveat",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
)


def install_filter() -> list[str]:
    """Install the seccomp filter on every thread of this process; return syscalls unknown here.

    - clone: allowed only with CLONE_THREAD (onnxruntime and Python create threads that way);
      clone without it (fork, posix_spawn, subprocess) fails with EPERM.
    - clone3: its flags live in a struct seccomp cannot inspect, so it fails with ENOSYS, which
      makes glibc fall back to clone, where the rule above applies.
    - kill/tgkill/rt_(tg)sigqueueinfo: allowed only towards this process's own pid.
    - Syscalls from another ABI (i386 via int 0x80, x32) hit libseccomp's bad-architecture action
      (kill), so the filter cannot be bypassed through a compat entry point.

    The filter is irreversible and inherited by any thread created later. Raises SandboxError
    when seccomp is unavailable (no libseccomp/pyseccomp, or a kernel without it).
    """
    try:
        import pyseccomp as seccomp
    except (ImportError, RuntimeError, OSError) as exc:
        raise SandboxError(f"seccomp is unavailable (pyseccomp/libseccomp: {exc})") from None
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64", "aarch64", "arm64"):
        # The clone flags argument position is architecture specific; only these are verified.
        raise SandboxError(f"the seccomp filter is only defined for x86_64 and aarch64, not {machine}")
    skipped: list[str] = []
    try:
        flt = seccomp.SyscallFilter(seccomp.ALLOW)
        flt.set_attr(seccomp.Attr.CTL_NNP, 1)  # no_new_privs: required for unprivileged filters
        flt.set_attr(seccomp.Attr.CTL_TSYNC, 1)  # apply to onnxruntime's existing pool threads too

        def add(action: int, name: str, *args: object) -> None:
            if seccomp.resolve_syscall(seccomp.Arch.NATIVE, name) < 0:
                skipped.append(name)  # e.g. open/fork do not exist on aarch64
                return
            flt.add_rule(action, name, *args)

        for name in DENIED_EPERM:
            add(seccomp.ERRNO(errno.EPERM), name)
        for name in DENIED_KILL:
            add(seccomp.KILL_PROCESS, name)
        add(seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, _CLONE_THREAD, 0))
        add(seccomp.ERRNO(errno.ENOSYS), "clone3")
        # Signals only to this process (abort(), pthread_kill and Python's signal.raise_signal
        # use these with our own pid); other processes of the same user are out of reach.
        own = os.getpid()
        for name in ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
            add(seccomp.ERRNO(errno.EPERM), name, seccomp.Arg(0, seccomp.NE, own))
        flt.load()
    except OSError as exc:
        raise SandboxError(f"the seccomp filter could not be installed: {exc}") from None
    if seccomp_mode() != 2:
        raise SandboxError("the seccomp filter was loaded but the kernel does not report filter mode")
    return skipped


def seccomp_mode() -> int:
    """0 = off, 1 = strict, 2 = filter; read with prctl because /proc cannot be opened afterwards."""
    return _prctl(_PR_GET_SECCOMP)


# --------------------------------------------------------------------------------------------
# The enclave key


class KeyBuffer:
    """32 key bytes in an anonymous private mapping: DONTDUMP, mlocked when allowed, wiped on close."""

    def __init__(self) -> None:
        self._mm: mmap.mmap | None = mmap.mmap(
            -1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
        self.locked = False
        if _MADV_DONTDUMP is not None:
            try:
                self._mm.madvise(_MADV_DONTDUMP)
            except OSError:
                pass
        libc = _libc()
        if libc is not None and hasattr(libc, "mlock"):
            anchor = ctypes.c_char.from_buffer(self._mm)
            try:
                self.locked = libc.mlock(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(mmap.PAGESIZE)) == 0
            finally:
                del anchor

    def set(self, material: bytes | bytearray) -> None:
        assert self._mm is not None and len(material) == KEY_SIZE
        self._mm[:KEY_SIZE] = material

    def key(self) -> bytes:
        """The key as bytes. `cryptography`'s HKDF takes bytes, so a transient copy is unavoidable."""
        if self._mm is None:
            raise KeyUnavailable("the enclave key was already wiped")
        return self._mm[:KEY_SIZE]

    @property
    def wiped(self) -> bool:
        return self._mm is None

    def wipe(self) -> None:
        if self._mm is not None:
            self._mm[:] = bytes(len(self._mm))
            self._mm.close()
            self._mm = None


def parse_key_text(text: bytes, origin: str) -> bytearray:
    """A 256-bit key as 32 raw bytes, 64 hex digits or base64 of 32 bytes (whitespace around ignored)."""
    if len(text) == KEY_SIZE:
        return bytearray(text)
    stripped = text.strip()
    decoded: bytes | None = None
    if len(stripped) == 2 * KEY_SIZE:
        try:
            decoded = binascii.unhexlify(stripped)
        except (binascii.Error, ValueError):
            decoded = None
    if decoded is None:
        try:
            decoded = base64.b64decode(stripped, validate=True)
        except (binascii.Error, ValueError):
            decoded = None
    if decoded is None or len(decoded) != KEY_SIZE:
        raise KeyUnavailable(
            f"{origin} does not hold a 256-bit key (32 raw bytes, 64 hex digits or base64 of 32 bytes)"
        )
    return bytearray(decoded)


def read_key(*, key_file: str | None = None, key_env: str | None = None) -> KeyBuffer:
    """Read the enclave key into a KeyBuffer; KeyUnavailable with a one-line reason on any problem."""
    if (key_file is None) == (key_env is None):
        raise KeyUnavailable("give exactly one of --key-file or --key-env")
    if key_file is not None:
        try:
            fd = os.open(key_file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise KeyUnavailable(f"enclave key file {key_file} does not exist") from None
        except OSError as exc:
            raise KeyUnavailable(f"cannot open enclave key file {key_file}: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise KeyUnavailable(f"enclave key file {key_file} is not a regular file")
            if info.st_mode & 0o077:
                raise KeyUnavailable(
                    f"enclave key file {key_file} is readable by other users "
                    f"(mode {info.st_mode & 0o777:o}); chmod 600 it"
                )
            raw = os.read(fd, 4097)
        finally:
            os.close(fd)
        origin = f"enclave key file {key_file}"
    else:
        assert key_env is not None
        value = os.environ.get(key_env)
        if not value:
            raise KeyUnavailable(f"environment variable {key_env} (the enclave key) is not set")
        # Drop it from our environment; the original block stays in /proc/PID/environ, which a
        # non-dumpable process only shows to root.
        os.environ.pop(key_env, None)
        raw = value.encode()
        origin = f"environment variable {key_env}"
    material = parse_key_text(raw, origin)
    buffer = KeyBuffer()
    try:
        buffer.set(material)
    finally:
        material[:] = bytes(len(material))
    return buffer


def wipe_bytes(data: bytes) -> None:
    """Zero an immutable bytes object in place (CPython) before it is freed.

    onnxruntime's Python API only accepts a model as `bytes`, so the decrypted private part must
    exist once as an immutable object; this overwrites it once the session holds its own copy.
    Only call it on an object nothing else will read.
    """
    if type(data) is not bytes or not data or sys.implementation.name != "cpython":
        return
    address = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
    if address:
        ctypes.memset(address, 0, len(data))
