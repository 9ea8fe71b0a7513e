"""The environment allowlist: every variable the shipped libraries read is classified, the
switches from the field (OpenVINO serialize tracing, oneDNN JIT dumps, ...) are removed, and
`doctor`, `run --strict` and the guard agree.

A new onnxruntime/OpenVINO release that reads a new variable outside the governed families makes
test_every_variable_the_libraries_read_is_classified fail, so somebody has to decide about it;
one inside a governed family is removed without anybody deciding.
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from libenv import build_shim, field_environment, static_names, traced_names
from test_no_plaintext_on_disk import _model_with_canaries

from modelcloak.keys import generate_key_file
from modelcloak.protector import protect
from modelcloak.runtime import cacheguard, environment

# Seen in the field (issue 15): each writes weights, graph structure or kernel code to disk, or
# breaks every sealed load.
FIELD_SWITCHES = (
    "OV_ENABLE_SERIALIZE_TRACING",
    "OV_ENABLE_VISUALIZE_TRACING",
    "ONEDNN_JIT_DUMP",
    "ORT_LOAD_CONFIG_FROM_MODEL",
)
# Read by the test harness itself, not by a shipped library.
HARNESS = {"MODELCLOAK_GETENV_TRACE"}


def unclassified(names: set[str]) -> set[str]:
    covered = set(cacheguard.covered_environment_variables())
    return {
        name
        for name in names - HARNESS
        if name not in environment.SAFE
        and name not in environment.UNGOVERNED
        and name not in covered
        and environment.family_of(name) is None
    }


@pytest.fixture(scope="module")
def sealed(tmp_path_factory):
    root = tmp_path_factory.mktemp("environment")
    model, _ = _model_with_canaries()
    key = generate_key_file(root / "model.key")
    protect(model, root / "model.mcb", key=key)
    return root, root / "model.mcb", key.path


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_every_variable_the_libraries_read_is_classified(sealed, backend):
    if backend == "openvino":
        pytest.importorskip("openvino")
    root, bundle, key = sealed
    names = traced_names(build_shim(root), bundle, key, backend, root, field_environment())
    # The trace works: it saw the switches this backend is known to read.
    expected = {"onnxruntime": {"ORT_LOAD_CONFIG_FROM_MODEL", "ORT_DISABLE_TELEMETRY"}}.get(
        backend, {"OV_ENABLE_SERIALIZE_TRACING", "ONEDNN_JIT_DUMP"}
    )
    assert expected <= names, f"the getenv trace missed {expected - names}"
    assert unclassified(names) == set(), "classify these in modelcloak/runtime/environment.py"


def test_negative_control_an_unknown_switch_is_reported(sealed):
    root, _, _ = sealed
    shim = build_shim(root)
    trace = root / "getenv-control.log"
    snippet = "import ctypes; ctypes.CDLL(None).getenv(b'ACME_DUMP_WEIGHTS_TO')"
    env = {**os.environ, "LD_PRELOAD": str(shim), "MODELCLOAK_GETENV_TRACE": str(trace)}
    subprocess.run([sys.executable, "-c", snippet], env=env, check=True, timeout=600)
    assert "ACME_DUMP_WEIGHTS_TO" in unclassified(set(trace.read_text().split()))


def test_static_scan_finds_the_field_switches_and_none_is_kept():
    names = static_names()
    assert {"OV_ENABLE_SERIALIZE_TRACING", "OV_ENABLE_VISUALIZE_TRACING", "ORT_LOAD_CONFIG_FROM_MODEL"} <= names
    kept = {name for name in names if name in environment.SAFE}
    # Only thread counts and CPU-feature limits may be kept from the binaries' own switches.
    assert kept <= {
        "OMP_NUM_THREADS",
        "OMP_DYNAMIC",
        "OMP_PLACES",
        "OMP_WAIT_POLICY",
        "OMP_SCHEDULE",
        "OMP_THREAD_LIMIT",
        "OMP_MAX_ACTIVE_LEVELS",
        "OV_CPU_MAX_ISA",
        "TBB_MALLOC_USE_HUGE_PAGES",
    }, kept
    assert all(environment.family_of(name) for name in names)


def test_safe_list_holds_no_location_dump_or_library_switch():
    suspicious = re.compile(
        r"DUMP|TRACE|PROFILE|SERIALIZE|VISUALIZE|PATH|HOME|_DIR$|FILE|INJECTION|TOOL|LIB|CONF|PRELOAD|AUDIT"
    )
    # The only exceptions: search paths the interpreter and the loader read at start, which a child
    # Python needs to start at all (see the reasons in environment.SAFE).
    startup_paths = {"PYTHONPATH", "PYTHONHOME", "PYTHONPLATLIBDIR", "PYTHONSAFEPATH", "LD_LIBRARY_PATH"}
    assert {name for name in environment.SAFE if suspicious.search(name)} == startup_paths


@pytest.mark.parametrize(
    "name",
    FIELD_SWITCHES
    + (
        "LD_PRELOAD",
        "INTEL_LIBITTNOTIFY64",
        "OMP_TOOL_LIBRARIES",
        "OCL_ICD_FILENAMES",
        "CUDA_INJECTION64_PATH",
        "PYTHONBREAKPOINT",
    ),
)
def test_switches_that_write_or_load_are_removed(tmp_path, name):
    env = {name: "1", "OMP_NUM_THREADS": "2", "PATH": "/usr/bin", "PYTHONPATH": "/opt/x", "MY_APP_SETTING": "kept"}
    warnings: list[str] = []
    cacheguard.apply("override", env, cwd=tmp_path, warn=warnings.append)
    assert name not in env
    assert env["OMP_NUM_THREADS"] == "2" and env["PATH"] == "/usr/bin" and env["MY_APP_SETTING"] == "kept"
    assert env["PYTHONPATH"] == "/opt/x"
    assert len([w for w in warnings if name in w]) == 1


def test_strict_and_scan_agree_with_the_allowlist(tmp_path):
    env = {"OV_ENABLE_SERIALIZE_TRACING": "1", "DNNL_VERBOSE": "1", "OMP_NUM_THREADS": "4"}
    risky = {f.setting for f in cacheguard.scan(env, cwd=tmp_path) if f.risk and f.origin != "default"}
    assert risky == {"OV_ENABLE_SERIALIZE_TRACING", "DNNL_VERBOSE"}
    with pytest.raises(cacheguard.CacheGuardError) as caught:
        cacheguard.apply("strict", dict(env), cwd=tmp_path)
    assert "OV_ENABLE_SERIALIZE_TRACING" in str(caught.value) and "DNNL_VERBOSE" in str(caught.value)
    assert "OMP_NUM_THREADS" not in str(caught.value)


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "modelcloak", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("name", FIELD_SWITCHES)
def test_doctor_and_run_strict_name_each_field_switch(sealed, tmp_path, name):
    _, bundle, key = sealed
    env = {**os.environ, name: "1"}
    doctor = _cli(["doctor"], env, tmp_path)
    assert doctor.returncode == 0 and name in doctor.stdout, doctor.stdout
    np.save(tmp_path / "x.npy", np.ones((1, 64), np.float32))
    strict = _cli(
        ["run", "--allow-unsigned", str(bundle), str(tmp_path / "x.npy"), "--key-file", str(key), "--strict"],
        env,
        tmp_path,
    )
    assert strict.returncode == 2 and name in strict.stderr, strict.stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "x.npy"]


def test_openvino_serialize_tracing_is_stopped_end_to_end(sealed, tmp_path):
    pytest.importorskip("openvino")
    _, bundle, key = sealed
    np.save(tmp_path / "x.npy", np.ones((1, 64), np.float32))
    env = {**os.environ, "OV_ENABLE_SERIALIZE_TRACING": "1"}
    run = _cli(
        [
            "run",
            "--allow-unsigned",
            str(bundle),
            str(tmp_path / "x.npy"),
            "--key-file",
            str(key),
            "--backend",
            "openvino",
        ],
        env,
        tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert "OV_ENABLE_SERIALIZE_TRACING" in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


def test_libc_getenv_sees_the_removal():
    # The guard edits os.environ, which Python mirrors into the C environment that native code reads.
    os.environ["OV_ENABLE_VISUALIZE_TRACING"] = "1"
    try:
        cacheguard.apply("override", warn=lambda _: None)
        libc = ctypes.CDLL(None)
        libc.getenv.restype = ctypes.c_char_p
        assert libc.getenv(b"OV_ENABLE_VISUALIZE_TRACING") is None
    finally:
        os.environ.pop("OV_ENABLE_VISUALIZE_TRACING", None)
