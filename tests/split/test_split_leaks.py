"""The private part of a split bundle never reaches the host: not its disk, not its memory.

A child process plays the device's host: it loads a split bundle and serves queries. We then read
its whole address space through /proc/PID/mem and look for byte runs of the private weights. The
negative control is the same host reading the private part's plain ONNX into memory; the scan must
find it there, or a clean result would mean nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from models import make_mlp

from modelcloak.keys import generate_key_file
from modelcloak.model.cut import find_cut, split_model
from modelcloak.protector import protect

PROBE = Path(__file__).parents[1] / "support" / "split_host_probe.py"
CANARY = 32


def _readable_regions(pid: int) -> list[tuple[int, int]]:
    regions = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        name = fields[5] if len(fields) > 5 else ""
        if "r" in fields[1] and name not in ("[vvar]", "[vsyscall]", "[vvar_vclock]"):
            regions.append((start, end))
    return regions


def _scan_memory(pid: int, canaries: list[bytes]) -> int:
    """How many canaries occur anywhere in the readable memory of `pid`."""
    found: set[bytes] = set()
    overlap = CANARY - 1
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for start, end in _readable_regions(pid):
            position, tail = start, b""
            while position < end:
                size = min(8 << 20, end - position)
                try:
                    block = os.pread(mem.fileno(), size, position)
                except OSError:
                    break  # guard pages and the like
                data = tail + block
                for canary in canaries:
                    if canary not in found and canary in data:
                        found.add(canary)
                tail = data[-overlap:]
                position += size
    return len(found)


@pytest.fixture(scope="module")
def split_bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("split-leaks")
    model = make_mlp((64, 128, 256, 10), seed=21)
    cut = find_cut(model, last=2)  # the last two dense layers are private
    _, private = split_model(model, cut)
    private_file = folder / "private.onnx"
    private_file.write_bytes(private.SerializeToString())
    canaries = []
    for tensor in private.graph.initializer:
        raw = tensor.raw_data
        if len(raw) >= 1024:
            for start in np.linspace(0, len(raw) - CANARY, 6).astype(int):
                canaries.append(raw[start : start + CANARY])
    assert len(canaries) >= 6
    host_key, enclave_key = generate_key_file(folder / "host.key"), generate_key_file(folder / "enclave.key")
    bundle = folder / "model.mcb"
    protect(model, bundle, key=host_key, scheme="split", cut={"last": 2}, enclave_key=enclave_key)
    return bundle, host_key.path, enclave_key.path, private_file, canaries


def _host(split_bundle, mode: str, tmp_path: Path) -> tuple[int, int, int, subprocess.Popen]:
    bundle, host_key, enclave_key, private_file, _ = split_bundle
    env = {**os.environ, "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
    child = subprocess.Popen(
        [sys.executable, str(PROBE), str(bundle), str(host_key), str(enclave_key), mode, str(private_file)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    line = child.stdout.readline().split()
    assert line and line[0] == "ready", child.stderr.read()
    return int(line[1]), int(line[2]), int(line[3]), child


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs /proc")
def test_private_weights_are_not_in_host_memory(split_bundle, tmp_path):
    canaries = split_bundle[4]
    pid, enclave_pid, _, child = _host(split_bundle, "clean", tmp_path)
    try:
        assert _scan_memory(pid, canaries) == 0, "private weight bytes found in the host process"
        # Sanity: the weights do live in the enclave process, so the scanner can see them there.
        assert _scan_memory(enclave_pid, canaries) > 0
    finally:
        child.communicate("\n", timeout=30)
    assert child.returncode == 0
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    for path in written:
        data = path.read_bytes()
        assert not any(c in data for c in canaries), f"private weights written to {path}"


def test_negative_control_a_host_holding_the_weights_is_caught(split_bundle, tmp_path):
    canaries = split_bundle[4]
    pid, _, leaked, child = _host(split_bundle, "leak", tmp_path)
    try:
        assert leaked > 0
        assert _scan_memory(pid, canaries) == len(canaries)
    finally:
        child.communicate("\n", timeout=30)
