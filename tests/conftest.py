"""Shared fixtures: small real ONNX models built with onnx.helper, and keys."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelcloak.keys import KeyFile, generate_key_file


def make_mlp(sizes: tuple[int, ...] = (16, 64, 32, 10), seed: int = 0) -> onnx.ModelProto:
    """A dense ReLU network with a dynamic batch axis and random weights (distinctive bytes for canary scans)."""
    rng = np.random.default_rng(seed)
    nodes, initializers = [], []
    current = "x"
    for layer, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        weight = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        bias = (rng.standard_normal(fan_out) * 0.1).astype(np.float32)
        initializers += [numpy_helper.from_array(weight, f"w{layer}"), numpy_helper.from_array(bias, f"b{layer}")]
        nodes.append(helper.make_node("Gemm", [current, f"w{layer}", f"b{layer}"], [f"h{layer}"]))
        current = f"h{layer}"
        if layer < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [current], [f"r{layer}"]))
            current = f"r{layer}"
    nodes.append(helper.make_node("Identity", [current], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", sizes[-1]])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="modelcloak-tests")
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def reference_outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.fixture
def mlp() -> onnx.ModelProto:
    return make_mlp()


@pytest.fixture
def key_file(tmp_path: Path) -> KeyFile:
    return generate_key_file(tmp_path / "model.key")


@pytest.fixture
def other_key_file(tmp_path: Path) -> KeyFile:
    return generate_key_file(tmp_path / "other.key")


_CORE_LIMIT_AT_START = __import__("resource").getrlimit(__import__("resource").RLIMIT_CORE)


@pytest.fixture(autouse=True)
def _restore_process_hardening():
    """`modelcloak.load()` hardens the whole process (non-dumpable, no core files). Tests (and
    module fixtures) that load in-process would otherwise leave the pytest process hardened for
    every later test, so put back the state the session started with."""
    import ctypes
    import resource

    core_limit = _CORE_LIMIT_AT_START
    yield
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(3, 0, 0, 0, 0) == 0:  # PR_GET_DUMPABLE
        libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE
    if resource.getrlimit(resource.RLIMIT_CORE) != core_limit:
        try:
            resource.setrlimit(resource.RLIMIT_CORE, core_limit)
        except (ValueError, OSError):
            pass  # raising a hard limit needs root; the tests that care skip with a reason


def pytest_collection_modifyitems(items: list) -> None:
    """Run the memory-hygiene tests first: they need a process whose hard core-file limit was never
    lowered, and an in-process `load()` lowers it irreversibly without CAP_SYS_RESOURCE."""
    items.sort(key=lambda item: 0 if item.path.name == "test_hygiene.py" else 1)


# --- software TPMs (tests/swtpm.py) ----------------------------------------------------------------


@pytest.fixture
def start_tpm(tmp_path):
    """Start swtpm instances on demand (one per state dir); all are stopped after the test."""
    import swtpm

    swtpm.require_swtpm()
    running = []

    def start(state_dir):
        instance = swtpm.SwTpm(state_dir).start()
        running.append(instance)
        return instance

    yield start
    for instance in running:
        instance.stop()


@pytest.fixture
def tpm(start_tpm, tmp_path):
    return start_tpm(tmp_path / "tpm-a")
