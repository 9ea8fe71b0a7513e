"""Child process for the memory-canary tests: open a model, then search this process's memory.

Usage: memory_scan.py MODE BUNDLE_OR_MODEL KEYFILE CANARY_HEX

MODE is one of
  sealed          load the sealed bundle, run it, scan ("open"); close it, scan again ("closed");
  sealed-no-wipe  the same, but glibc's wipe-on-free is switched off before close (negative control);
  plain           an ordinary onnxruntime session on the plain .onnx, scanned while open (control).

Prints one JSON line: {"open": hits, "closed": hits}, each hit [address, mapping name, VmFlags]. The canary is never
held whole by the scanner: it searches for the first 8 bytes and compares candidates as hex text,
so the only full copies it can find are the model's own.
"""

from __future__ import annotations

import gc
import json
import os
import sys

import numpy as np


def scan(canary_hex: str) -> list[tuple[int, str]]:
    first = bytes.fromhex(canary_hex[:16])
    size = len(canary_hex) // 2
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
            for start in range(low, high, 1 << 24):
                try:
                    chunk = os.pread(memory, min(high - start, 1 << 24), start)
                except OSError:
                    break
                at = chunk.find(first)
                while at >= 0:
                    if chunk[at : at + size].hex() == canary_hex:
                        hits.append((start + at, name))
                    at = chunk.find(first, at + 1)
                del chunk
    finally:
        os.close(memory)
    return hits


def described(hits: list[tuple[int, str]]) -> list[list]:
    from modelcloak import hygiene

    flags = hygiene.mapping_flags_of([address for address, _ in hits]) if hits else {}
    return [[hex(address), name, sorted(flags[address])] for address, name in hits]


def main() -> None:
    mode, source, key_path, canary_hex = sys.argv[1:5]
    x = np.ones((2, 256), np.float32)
    if mode == "plain":
        import onnxruntime as ort

        plain = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
        plain.run(None, {"x": x})
        print(json.dumps({"open": described(scan(canary_hex))}))
        return
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
