"""Load and run sealed models while every cache is switched on, trace every file written, and
scan each one for byte runs taken from the weights and the graph (canaries).

The negative control leaks on purpose (cache guard off, onnxruntime asked to save its optimised
model) and must be caught by the same scan; without it a scan that finds nothing proves nothing.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from libenv import build_shim, field_environment, static_names, switched_on, traced_names
from onnx import TensorProto, helper, numpy_helper

from modelcloak.keys import generate_key_file
from modelcloak.protector import protect

PROBE = Path(__file__).parents[1] / "support" / "leak_probe.py"
CANARY_LENGTH = 32
NODE_CANARY = "mcnode_7f3a9c_secret_layer"

_WRITE = re.compile(r'^\d+\s+(?:open|openat|openat2|creat)\((?:[^,]+, )?"(?P<path>[^"]+)", (?P<flags>[A-Z_|]+)')
_RENAME = re.compile(r'^\d+\s+rename(?:at2?)?\(.*?"[^"]+", (?:[^,]+, )?"(?P<path>[^"]+)"')


def _model_with_canaries(seed: int = 7):
    rng = np.random.default_rng(seed)
    weights = [
        (rng.standard_normal((64, 256)) * 0.1).astype(np.float32),
        (rng.standard_normal((256, 10)) * 0.1).astype(np.float32),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w0"], ["h"], name=NODE_CANARY),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w1"], ["logits"]),
        ],
        "canary",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(weights[0], "w0"), numpy_helper.from_array(weights[1], "w1")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    canaries = [NODE_CANARY.encode()]
    for array in weights:
        raw = array.tobytes()
        for start in np.linspace(0, len(raw) - CANARY_LENGTH, 8).astype(int):
            canaries.append(raw[start : start + CANARY_LENGTH])
    return model, canaries


def _cache_enabling_environment(tree: Path, switches: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in field_environment().items()
        if not k.startswith(("NEO_", "CUDA_CACHE", "ORT_", "TORCHINDUCTOR", "TRITON"))
    }
    for sub in ("home", "tmp", "xdg-cache", "work", "work/cl_cache"):
        (tree / sub).mkdir(parents=True, exist_ok=True)
    env.update(
        HOME=str(tree / "home"),
        TMPDIR=str(tree / "tmp"),
        XDG_CACHE_HOME=str(tree / "xdg-cache"),
        NEO_CACHE_PERSISTENT="1",
        NEO_CACHE_DIR=str(tree / "neo"),
        cl_cache_dir=str(tree / "cl"),
        CUDA_CACHE_DISABLE="0",
        CUDA_CACHE_PATH=str(tree / "cuda"),
        ORT_TENSORRT_ENGINE_CACHE_ENABLE="1",
        ORT_TENSORRT_CACHE_PATH=str(tree / "trt"),
        ORT_TENSORRT_DUMP_EP_CONTEXT_MODEL="1",
        ZE_INTEL_NPU_CACHE_DIR=str(tree / "npu"),
        TORCHINDUCTOR_CACHE_DIR=str(tree / "inductor"),
        TORCHINDUCTOR_FX_GRAPH_CACHE="1",
        TRITON_CACHE_DIR=str(tree / "triton"),
        PYTHONDONTWRITEBYTECODE="1",
    )
    env.update(switches or {})
    return env


@pytest.fixture(scope="module")
def library_switches(tmp_path_factory) -> set[str]:
    """Every variable the shipped libraries read (getenv trace of both backends) or name in their binaries."""
    root = tmp_path_factory.mktemp("switches")
    model, _ = _model_with_canaries()
    key = generate_key_file(root / "model.key")
    protect(model, root / "model.mcb", key=key)
    names = static_names()
    shim = build_shim(root)
    for backend in ("onnxruntime", "openvino"):
        if backend == "onnxruntime" or importlib.util.find_spec("openvino") is not None:
            names |= traced_names(shim, root / "model.mcb", key.path, backend, root, field_environment())
    return names


def _written_files(trace: Path) -> set[Path]:
    written: set[Path] = set()
    for line in trace.read_text(errors="replace").splitlines():
        match = _WRITE.match(line)
        if match and re.search(r"O_WRONLY|O_RDWR|O_CREAT", match["flags"]) and "= -1" not in line:
            written.add(Path(match["path"]))
            continue
        match = _RENAME.match(line)
        if match and "= -1" not in line:
            written.add(Path(match["path"]))
    return written


def _leaks(files: set[Path], canaries: list[bytes]) -> dict[str, int]:
    found: dict[str, int] = {}
    for path in sorted(files):
        if str(path).startswith(("/proc/", "/sys/")) or (
            str(path).startswith("/dev/") and not str(path).startswith("/dev/shm/")
        ):
            continue
        if not path.is_file():
            continue
        data = path.read_bytes()
        hits = sum(1 for canary in canaries if canary in data)
        if hits:
            found[str(path)] = hits
    return found


def _run_traced(
    tmp_path: Path, backend: str, policy: str, optimized: bool, switches: set[str] | None = None
) -> tuple[dict[str, int], set[Path], set[Path]]:
    """Leaks found, files written (strace), and every file left in the device's tree."""
    if shutil.which("strace") is None:
        if os.environ.get("MODELCLOAK_REQUIRE_ALL"):
            pytest.fail("strace is required for this test (.ci/run installs it)")
        pytest.skip("strace is not installed")
    model, canaries = _model_with_canaries()
    owner = tmp_path / "owner"
    owner.mkdir()
    key = generate_key_file(owner / "model.key")
    bundle = owner / "model.mcb"
    protect(model, bundle, key=key)
    tree = tmp_path / "device"
    env = _cache_enabling_environment(tree, switched_on(switches or set(), tree))
    trace = tmp_path / "strace.log"
    command = [
        "strace",
        "-f",
        "-qq",
        "-o",
        str(trace),
        "-e",
        "trace=open,openat,openat2,creat,rename,renameat,renameat2",
        sys.executable,
        str(PROBE),
        str(bundle),
        str(key.path),
        backend,
        policy,
    ]
    if optimized:
        command.append(str(tree / "tmp" / "optimized.onnx"))
    result = subprocess.run(command, cwd=tree / "work", env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ran" in result.stdout
    # The trace must have seen the bundle being opened, or an empty write list would prove nothing.
    assert str(bundle) in trace.read_text(errors="replace"), "strace did not record the probe's file opens"
    written = _written_files(trace)
    everything_in_tree = {p for p in tree.rglob("*") if p.is_file()}
    return _leaks(written | everything_in_tree, canaries), written, everything_in_tree


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_sealed_model_leaves_no_plaintext_on_disk(tmp_path, backend, library_switches):
    """Every cache on and every variable the libraries read switched on: nothing reaches disk."""
    if backend == "openvino":
        pytest.importorskip("openvino")
    assert {"OV_ENABLE_SERIALIZE_TRACING", "ONEDNN_JIT_DUMP", "ORT_DISABLE_TELEMETRY"} <= library_switches
    leaks, _, left = _run_traced(
        tmp_path, backend, "override", optimized=(backend == "onnxruntime"), switches=library_switches
    )
    assert leaks == {}, f"plaintext model bytes found on disk: {leaks}"
    # Not a byte of anything: no telemetry database, no tracing dump, no kernel file.
    assert left == set(), f"files written on the device: {sorted(map(str, left))}"


def test_negative_control_a_deliberate_leak_is_caught(tmp_path):
    leaks, written, left = _run_traced(tmp_path, "onnxruntime", "off", optimized=True)
    assert any(str(path).endswith("optimized.onnx") for path in written), "strace missed the deliberate write"
    assert any(path.endswith("optimized.onnx") for path in leaks), f"the scan missed a deliberate leak: {leaks}"
    # onnxruntime's telemetry writes its files unless the guard switches it off.
    names = {path.name for path in left}
    assert {".ses", "deviceid"} <= names, sorted(names)


@pytest.mark.slow
def test_negative_control_openvino_tracing_leaks_without_the_guard(tmp_path, library_switches):
    pytest.importorskip("openvino")
    leaks, _, left = _run_traced(tmp_path, "openvino", "off", optimized=False, switches=library_switches)
    assert any("Model0_" in Path(path).name for path in leaks), f"the scan missed OpenVINO's dumps: {leaks}"
    # OpenVINO's Python telemetry writes its client id unless the guard blocks it.
    assert "openvino_ga_cid" in {path.name for path in left}


def test_strict_policy_refuses_to_start_with_caches_enabled(tmp_path):
    model, _ = _model_with_canaries()
    key = generate_key_file(tmp_path / "model.key")
    protect(model, tmp_path / "model.mcb", key=key)
    env = _cache_enabling_environment(tmp_path / "device")
    np.save(tmp_path / "x.npy", np.ones((1, 64), np.float32))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelcloak",
            "run",
            "--allow-unsigned",
            str(tmp_path / "model.mcb"),
            str(tmp_path / "x.npy"),
            "--key-file",
            str(key.path),
            "--strict",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path / "device" / "work",
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "NEO_CACHE_PERSISTENT" in lines[0], result.stderr
