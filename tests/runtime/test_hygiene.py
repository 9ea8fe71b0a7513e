"""Memory hygiene, checked against what the kernel reports (/proc/self/smaps, prctl, getrlimit).

No mocks: every protection is read back from the kernel, and each kind of check has a negative
control showing it can fail. Hardening runs in child processes so this test process stays dumpable.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import resource
import subprocess
import sys
import textwrap

import numpy as np
import pristine
import pytest

from modelcloak import hygiene
from modelcloak.errors import ModelcloakError
from modelcloak.hygiene import (
    HygieneError,
    SecureBuffer,
    mapping_flags,
    mapping_name,
    memory_capabilities,
    secret_buffer,
    weights_buffer,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="memory hygiene checks need Linux /proc")

PAGE = mmap.PAGESIZE


def _run_child(code: str, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"child failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fill(buf: SecureBuffer) -> bytes:
    pattern = (b"\xa5\x5a" * (buf.size // 2 + 1))[: buf.size]
    buf.view()[:] = pattern
    return pattern


# --- secret buffers -------------------------------------------------------------------------------


def test_secret_buffer_gets_memfd_secret_on_this_kernel():
    err = hygiene._probe_memfd_secret()
    if err == errno.ENOSYS:
        pytest.skip("memfd_secret returns ENOSYS: kernel built without CONFIG_SECRETMEM or it is disabled")
    assert err == 0, f"memfd_secret failed with {errno.errorcode.get(err, err)}, not ENOSYS"
    with secret_buffer(32) as buf:
        assert buf.kind == "memfd_secret"
        assert buf.size == 32
        assert "secretmem" in mapping_name(buf.address)
        flags = mapping_flags(buf.address)
        assert {"dd", "lo", "sh"} <= flags
        pattern = _fill(buf)
        assert ctypes.string_at(buf.address, 32) == pattern


def test_memfd_secret_is_unreadable_through_proc_mem():
    # /proc/pid/mem is how root (or a same-uid debugger) reads another process; try it on ourselves.
    if hygiene._probe_memfd_secret() != 0:
        pytest.skip("memfd_secret is not available on this kernel")
    seen = {}
    for kw in ({}, {"_allow_memfd_secret": False}):
        with secret_buffer(16, **kw) as buf:
            buf.view()[:] = b"k" * 16
            fd = os.open("/proc/self/mem", os.O_RDONLY)
            try:
                seen[buf.kind] = os.pread(fd, 16, buf.address)
            except OSError as exc:
                seen[buf.kind] = exc.errno
            finally:
                os.close(fd)
    assert seen["mlock"] == b"k" * 16  # negative control: ordinary memory is readable this way
    assert seen["memfd_secret"] == errno.EIO


def test_secret_buffer_fallback_is_locked_dontdump_and_wipeonfork():
    with secret_buffer(64, _allow_memfd_secret=False) as buf:
        assert buf.kind == "mlock"
        flags = mapping_flags(buf.address)
        assert {"lo", "dd", "wf"} <= flags
        assert "sh" not in flags  # private: never shared with another process
        assert mapping_name(buf.address) == ""


def test_secret_buffer_without_mlock_is_dontdump_only():
    with secret_buffer(64, _allow_memfd_secret=False, _allow_mlock=False) as buf:
        assert buf.kind == "dontdump"
        flags = mapping_flags(buf.address)
        assert "dd" in flags
        assert "lo" not in flags


def test_memlock_limit_forces_real_fallbacks():
    # A real RLIMIT_MEMLOCK in a child: drop root (CAP_IPC_LOCK ignores the limit) and lower it.
    out = _run_child(
        """
        import json, os, resource
        from modelcloak.hygiene import secret_buffer, mapping_flags
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (1 << 20, 1 << 20))
        if os.geteuid() == 0:
            os.setgroups([]); os.setgid(65534); os.setuid(65534)
        res = {}
        for name, size, kw in [("small", 64 << 10, {}), ("small_nomemfd", 64 << 10, {"_allow_memfd_secret": False}),
                               ("big", 4 << 20, {})]:
            b = secret_buffer(size, **kw)
            res[name] = [b.kind, sorted(mapping_flags(b.address))]
            b.close()
        print(json.dumps(res))
        """
    )
    big_kind, big_flags = out["big"]
    assert big_kind == "dontdump", out  # 4 MiB > 1 MiB limit: neither memfd_secret nor mlock allowed
    assert "dd" in big_flags and "lo" not in big_flags
    assert out["small_nomemfd"][0] == "mlock"
    assert "lo" in out["small_nomemfd"][1]
    if hygiene._probe_memfd_secret() == 0:
        assert out["small"][0] == "memfd_secret"


def test_wipeonfork_child_sees_zeros():
    with secret_buffer(16, _allow_memfd_secret=False) as buf:
        _fill(buf)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: report what it sees, exit without running pytest teardown
            try:
                os.write(w, ctypes.string_at(buf.address, 16))
            finally:
                os._exit(0)
        os.close(w)
        seen = os.read(r, 64)
        os.close(r)
        os.waitpid(pid, 0)
        assert seen == bytes(16)
        assert bytes(buf.view()) != bytes(16)  # the parent still has its key


# --- weights buffers ------------------------------------------------------------------------------


def test_weights_buffer_is_dontdump_not_locked():
    size = 3 * 1024 * 1024 + 5
    with weights_buffer(size) as buf:
        assert buf.kind == "dontdump"
        assert buf.view().nbytes == size
        flags = mapping_flags(buf.address)
        assert "dd" in flags
        assert "lo" not in flags
        arr = np.frombuffer(buf.view(), dtype=np.uint8)
        arr[:] = 7
        assert ctypes.string_at(buf.address + size - 1, 1) == b"\x07"
        del arr


def test_weights_buffer_size_zero():
    with weights_buffer(0) as buf:
        v = buf.view()
        assert v.nbytes == 0 and not v.readonly
        assert "dd" in mapping_flags(buf.address)


def test_negative_control_plain_mmap_has_no_dontdump():
    mm = mmap.mmap(-1, 2 * PAGE)
    try:
        addr = hygiene._address_of(mm)
        flags = mapping_flags(addr)
        assert "rd" in flags and "wr" in flags  # we found the right mapping
        assert "dd" not in flags
        assert "lo" not in flags
    finally:
        mm.close()


_GROWN_RESERVATION = """
import ctypes, json, mmap, sys
from modelcloak import hygiene
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
size = 4 * mmap.PAGESIZE
# A reservation like glibc's thread-arena heaps: PROT_NONE (0) first, made writable as it grows.
base = libc.mmap(None, size, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
if sys.argv[1] == "exclude":
    hygiene.exclude_anonymous_memory_from_dumps()
assert libc.mprotect(ctypes.c_void_p(base), ctypes.c_size_t(2 * mmap.PAGESIZE), 3) == 0
print(json.dumps(sorted(hygiene.mapping_flags(base))))
"""


def test_reserved_arena_space_that_grows_later_stays_out_of_dumps():
    assert "dd" in _run_child(_GROWN_RESERVATION, "exclude")


def test_control_reserved_space_not_swept_grows_dumpable():
    flags = _run_child(_GROWN_RESERVATION, "leave")
    assert "rd" in flags and "wr" in flags and "dd" not in flags


def test_mapping_lookup_fails_for_unmapped_address():
    with pytest.raises(HygieneError):
        mapping_flags(16)  # page zero is never mapped
    with pytest.raises(HygieneError):
        mapping_name(16)
    assert issubclass(HygieneError, ModelcloakError)


def test_bad_sizes_are_refused():
    with pytest.raises(HygieneError):
        weights_buffer(-1)
    with pytest.raises(HygieneError):
        secret_buffer(1.5)  # type: ignore[arg-type]


# --- wipe and close -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: secret_buffer(100),
        lambda: secret_buffer(100, _allow_memfd_secret=False),
        lambda: weights_buffer(PAGE + 100),
    ],
    ids=["secret", "secret-mlock", "weights"],
)
def test_wipe_really_zeroes(make):
    buf = make()
    try:
        pattern = _fill(buf)
        assert ctypes.string_at(buf.address, buf.size) == pattern  # the check below can fail
        buf.wipe()
        assert bytes(buf.view()) == bytes(buf.size)
        # the whole mapping, page tail included, reads back as zero before unmap
        length = -(-max(buf.size, 1) // PAGE) * PAGE
        assert ctypes.string_at(buf.address, length) == bytes(length)
        buf.wipe()  # twice is fine
    finally:
        buf.close()


def test_close_is_idempotent_and_revokes_views():
    buf = secret_buffer(32)
    v = buf.view()
    v[:4] = b"key!"
    buf.close()
    assert buf.closed
    buf.close()
    buf.wipe()  # no-op after unmap, must not touch the old address
    with pytest.raises(HygieneError, match="closed"):
        buf.view()
    with pytest.raises(ValueError):
        v[0]  # the handed-out view was released, not left pointing at unmapped memory


def test_close_with_live_numpy_view_wipes_then_raises():
    buf = weights_buffer(4096)
    arr = np.frombuffer(buf.view(), dtype=np.float32)
    arr[:] = 1.5
    with pytest.raises(HygieneError, match="still alive"):
        buf.close()
    assert not arr.any()  # wiped before the unmap was attempted
    with pytest.raises(HygieneError):
        buf.view()
    del arr
    buf.close()  # now succeeds
    buf.close()
    assert buf.closed


def test_close_with_live_memoryview_slice_raises():
    buf = secret_buffer(64, _allow_memfd_secret=False)
    part = buf.view()[8:16]
    part[:] = b"\x01" * 8
    with pytest.raises(HygieneError):
        buf.close()
    assert bytes(part) == bytes(8)
    part.release()
    buf.close()


def test_context_manager_closes_and_repr_hides_contents():
    with weights_buffer(10) as buf:
        buf.view()[:] = b"secret1234"
        assert "secret" not in repr(buf).replace("SecureBuffer", "")
    assert buf.closed


# --- process hardening ----------------------------------------------------------------------------

_PROBE = """
import ctypes, json, os, resource, sys
from modelcloak.hygiene import harden_process
results = []
if sys.argv[1] == "1":
    results = [harden_process(), harden_process()]
libc = ctypes.CDLL(None)
z = ctypes.c_ulong(0)
print(json.dumps({
    "results": results,
    "dumpable": libc.prctl(3, z, z, z, z),
    "core": list(resource.getrlimit(resource.RLIMIT_CORE)),
    "status_uid": os.stat("/proc/self/status").st_uid,
}))
"""


def test_harden_process_in_child():
    out = _run_child(_PROBE, "1")
    assert out["results"] == [{"non_dumpable": True, "core_limit_zero": True, "freed_heap_wiped": True}] * 2
    assert out["dumpable"] == 0
    assert out["core"] == [0, 0]
    if os.geteuid() != 0:
        assert out["status_uid"] == 0  # /proc/<pid> of a non-dumpable process belongs to root


def test_unhardened_child_is_dumpable():
    out = _run_child(_PROBE, "0")
    assert out["results"] == []
    assert out["dumpable"] == 1
    assert out["core"] == list(resource.getrlimit(resource.RLIMIT_CORE))
    # and hardening the children never touched this process
    assert hygiene._get_dumpable() == 1


_MEM_READ = """
import ctypes, json, os, sys
from modelcloak.hygiene import harden_process
harden = sys.argv[1] == "1"
if os.geteuid() == 0:  # root bypasses the check; play an ordinary same-uid user
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
z = ctypes.c_ulong(0)
ctypes.CDLL(None).prctl(4, ctypes.c_ulong(1), z, z, z)  # setuid cleared dumpable; start from 1
r, w = os.pipe(); r2, w2 = os.pipe()
pid = os.fork()
if pid == 0:
    if harden:
        harden_process()
    os.write(w, b"x"); os.read(r2, 1); os._exit(0)
os.read(r, 1)
try:
    with open(f"/proc/{pid}/mem", "rb"):
        outcome = "opened"
except PermissionError:
    outcome = "denied"
os.write(w2, b"x"); os.waitpid(pid, 0)
print(json.dumps({"outcome": outcome}))
"""


def test_non_dumpable_blocks_same_uid_proc_mem():
    if os.path.exists("/proc/sys/kernel/yama/ptrace_scope"):
        with open("/proc/sys/kernel/yama/ptrace_scope") as fh:
            if fh.read().strip() not in ("0", "1"):
                pytest.skip("Yama ptrace_scope >= 2 denies /proc/pid/mem regardless of dumpability")
    assert _run_child(_MEM_READ, "0")["outcome"] == "opened"  # negative control
    assert _run_child(_MEM_READ, "1")["outcome"] == "denied"


# --- doctor ---------------------------------------------------------------------------------------


def test_memory_capabilities_match_the_kernel():
    caps = memory_capabilities()
    assert caps["linux"] is True
    assert caps["madvise_dontdump"] is True
    assert caps["prctl"] is True
    assert caps["memfd_secret"] is (hygiene._probe_memfd_secret() == 0)
    soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    assert caps["mlock_limit_bytes"] == (-1 if soft == resource.RLIM_INFINITY else soft)
    assert caps["non_dumpable"] is False  # this test process was never hardened
    assert set(caps) == {
        "linux",
        "memfd_secret",
        "madvise_dontdump",
        "mlock",
        "mlock_limit_bytes",
        "cap_ipc_lock",
        "prctl",
        "non_dumpable",
        "core_limit_zero",
    }


# --- a real core dump -----------------------------------------------------------------------------

_CRASH = """
import ctypes, mmap, os, resource, sys
from modelcloak.hygiene import harden_process, secret_buffer, weights_buffer
soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))
n = 4 * mmap.PAGESIZE
# Fill with memset so no Python object anywhere holds the marker runs.
keep = []
for fill, buf in [(0xA7, weights_buffer(n)), (0xB3, secret_buffer(n, _allow_memfd_secret=False)),
                  (0xD9, secret_buffer(n))]:
    ctypes.memset(buf.address, fill, n)
    keep.append(buf)
plain = mmap.mmap(-1, n)
ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(plain)), 0xC5, n)
if sys.argv[1] == "1":
    harden_process()
os.abort()
"""


def _crash(tmp_path, harden: str) -> bytes | None:
    returncode, stderr, _ = pristine.run([sys.executable, "-c", _CRASH, harden], tmp_path, 60)
    assert returncode == -6, stderr.decode(errors="replace")
    cores = [p for p in tmp_path.iterdir() if p.name.startswith("core")]
    return cores[0].read_bytes() if cores else None


def test_core_dump_leaves_out_protected_buffers(tmp_path):
    with open("/proc/sys/kernel/core_pattern") as fh:
        pattern = fh.read().strip()
    if pattern.startswith("|") or "/" in pattern:
        pytest.skip(f"core_pattern {pattern!r} does not write a core file into the working directory")
    if pristine.run([sys.executable, "-c", "pass"], tmp_path, 60)[2] == 0:
        pytest.skip("hard RLIMIT_CORE was 0 when the tests started: no core dumps possible here")
    core = _crash(tmp_path, "0")
    if core is None:
        pytest.skip("the kernel wrote no core file (suid_dumpable or container policy)")
    run = 4 * PAGE
    assert bytes([0xC5]) * run in core  # negative control: an ordinary mapping is in the dump
    assert bytes([0xA7]) * run not in core  # weights_buffer: MADV_DONTDUMP
    assert bytes([0xB3]) * run not in core  # secret_buffer, mlock fallback
    assert bytes([0xD9]) * run not in core  # secret_buffer, best kind
    for p in list(tmp_path.iterdir()):
        p.unlink()
    assert _crash(tmp_path, "1") is None  # hardened: no core at all
