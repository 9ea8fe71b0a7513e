"""Child process for the memory-canary tests: open a model, then search this process's memory.

Usage: memory_scan.py MODE BUNDLE_OR_MODEL KEYFILE CANARY_HEX

MODE is one of
  sealed          load the sealed bundle, run it, scan ("open"); close it, scan again ("closed");
  sealed-no-wipe  the same, but glibc's wipe-on-free is switched off before close (negative control);
  plain           an ordinary onnxruntime session on the plain .onnx, scanned while open (control).

In the sealed modes glibc is told to keep freed memory in the process (no munmap, no trim), so a
freed copy that was not wiped stays findable on every machine.

Prints one JSON line: {"open": hits, "closed": hits}, each hit [address, mapping name, VmFlags].
The scanner never holds the canary whole: every read goes into one buffer whose own mapping is
not searched, and candidates are compared 8 bytes at a time, so the only full copies it can find
are the model's own. (An earlier version read into fresh bytes objects; those copies, and their
freed remains, were found too, in mappings that appeared after the session was opened.)
"""

from __future__ import annotations

import ctypes
import gc
import json
import mmap
import os
import sys

import numpy as np

_PIECE = 1 << 24


_BUFFER = mmap.mmap(-1, _PIECE)  # the one buffer every read goes into; its own mapping is skipped


def _buffer_range() -> tuple[int, int]:
    start = ctypes.addressof(ctypes.c_char.from_buffer(_BUFFER))
    return start, start + len(_BUFFER)


def _matches(at: int, canary_hex: str) -> bool:
    """Compare 8 bytes at a time, so the comparison itself never makes a whole copy of the canary."""
    return all(
        _BUFFER[at + i : at + i + 8].hex() == canary_hex[2 * i : 2 * i + 16] for i in range(0, len(canary_hex) // 2, 8)
    )


def scan(canary_hex: str) -> list[tuple[int, str]]:
    first = bytes.fromhex(canary_hex[:16])
    size = len(canary_hex) // 2
    own_low, own_high = _buffer_range()
    with open("/proc/self/maps", encoding="utf-8") as fh:
        maps = fh.read().splitlines()
    hits = []
    memory = os.open("/proc/self/mem", os.O_RDONLY)
    try:
        for line in maps:
            parts = line.split(None, 5)
            name = parts[5].strip() if len(parts) == 6 else ""
            if "r" not in parts[1] or name in ("[vvar]", "[vvar_vclock]", "[vsyscall]"):
                continue
            low, high = (int(x, 16) for x in parts[0].split("-"))
            if low < own_high and own_low < high:
                continue  # the scanner's buffer holds whatever it read last
            for start in range(low, high, _PIECE):
                try:
                    read = os.preadv(memory, [_BUFFER], start)
                except OSError:
                    break
                at = _BUFFER.find(first, 0, read)
                while 0 <= at <= read - size:
                    if _matches(at, canary_hex):
                        hits.append((start + at, name))
                    at = _BUFFER.find(first, at + 1, read)
    finally:
        os.close(memory)
    return hits


def described(hits: list[tuple[int, str]]) -> list[list]:
    from modelcloak import hygiene

    flags = hygiene.mapping_flags_of([address for address, _ in hits]) if hits else {}
    return [[hex(address), name, sorted(flags[address])] for address, name in hits]


def keep_freed_memory_in_process() -> None:
    """Tell glibc to keep freed memory instead of handing it back to the kernel.

    Large chunks are otherwise munmapped on free and the heap's top is trimmed, which removes a
    freed copy of the weights whether or not it was wiped; with both switched off, only the wipe
    can make the canary disappear, on any machine (mallopt parameters from glibc's malloc.h).
    """
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(ctypes.c_int(m_mmap_threshold), ctypes.c_int(32 << 20))  # glibc's largest allowed value
    libc.mallopt(ctypes.c_int(m_trim_threshold), ctypes.c_int(1 << 30))


def main() -> None:
    mode, source, key_path, canary_hex = sys.argv[1:5]
    x = np.ones((2, 256), np.float32)
    if mode == "plain":
        import onnxruntime as ort

        plain = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
        plain.run(None, {"x": x})
        print(json.dumps({"open": described(scan(canary_hex))}))
        return
    keep_freed_memory_in_process()
    from modelcloak import hygiene
    from modelcloak.inference import load
    from modelcloak.keys import KeyFile

    session = load(source, key=KeyFile(key_path))
    session.run(x)
    opened = described(scan(canary_hex))
    if mode == "sealed-no-wipe":
        hygiene.stop_wiping_freed_heap()
    session.close()
    del session
    gc.collect()
    print(json.dumps({"open": opened, "closed": described(scan(canary_hex))}))


if __name__ == "__main__":
    main()
