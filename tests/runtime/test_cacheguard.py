"""Cache guard: every known on-disk cache is found and neutralised, and the leaks are real.

The environment tests run on dict copies (os.environ is never touched). The onnxruntime and
OpenVINO tests use the real runtimes: a negative control shows the unguarded options do write
plaintext weights to disk, then the same options after the guard write nothing. TorchInductor is
checked in a child interpreter that reads the guarded environment the way torch does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelcloak.runtime import cacheguard
from modelcloak.runtime.cacheguard import (
    NO_CACHE_PATH,
    CacheFinding,
    CacheGuardError,
    apply,
    format_report,
    guard_openvino_properties,
    guard_ort_session_options,
    guard_provider_options,
    openvino_properties,
    scan,
)
from modelcloak.runtime.errors import SessionError


def enabling_environment(root: Path) -> dict[str, str]:
    """An environment in which every cache the guard knows about is switched on by the user.

    Written out by hand, independently of the guard's own table, so that a variable dropped from
    the guard makes test_scan_reports_every_enabled_cache fail.
    """

    def p(name: str) -> str:
        return str(root / name)

    return {
        "NEO_CACHE_PERSISTENT": "1",
        "NEO_CACHE_DIR": p("neo"),
        "cl_cache_dir": p("clc"),
        "l0_cache_dir": p("l0c"),
        "CUDA_CACHE_DISABLE": "0",
        "CUDA_CACHE_PATH": p("nv"),
        "USE_PYTORCH_KERNEL_CACHE": "1",
        "PYTORCH_KERNEL_CACHE_PATH": p("torch-kernels"),
        "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "0",
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
        "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
        "TORCHINDUCTOR_FX_GRAPH_REMOTE_CACHE": "1",
        "TORCHINDUCTOR_AUTOGRAD_REMOTE_CACHE": "1",
        "TORCHINDUCTOR_AUTOTUNE_REMOTE_CACHE": "1",
        "TORCHINDUCTOR_BUNDLED_AUTOTUNE_REMOTE_CACHE": "1",
        "TORCHINDUCTOR_DUMP_MEMOIZER_CACHE": "1",
        "TORCH_COMPILE_DEBUG": "1",
        "TORCH_COMPILE_DEBUG_SAVE_REAL": "1",
        "TORCHINDUCTOR_CACHE_DIR": p("inductor"),
        "TRITON_CACHE_DIR": p("triton"),
        "TRITON_KERNEL_DUMP": "1",
        "TRITON_DUMP_DIR": p("triton-dump"),
        "TRITON_CACHE_MANAGER": "mymod:MyCacheManager",
        "TRITON_REMOTE_CACHE_BACKEND": "mymod:MyRemote",
        "ORT_TENSORRT_ENGINE_CACHE_ENABLE": "1",
        "ORT_TENSORRT_TIMING_CACHE_ENABLE": "1",
        "ORT_TENSORRT_DUMP_SUBGRAPHS": "1",
        "ORT_DUMP_EP_CONTEXT_MODEL": "1",
        "ORT_TENSORRT_CACHE_PATH": p("trt"),
        "ORT_TENSORRT_ENGINE_CACHE_PATH": p("trt-old"),
        "ORT_TENSORRT_GLOBAL_CACHE_PATH": p("trt-timing"),
        "ORT_MIGRAPHX_SAVE_COMPILED_MODEL": "1",
        "ORT_MIGRAPHX_SAVE_COMPILE_PATH": p("model.mxr"),
        "ORT_MIGRAPHX_SAVE_COMPILED_PATH": p("model2.mxr"),
        "ORT_MIGRAPHX_MODEL_CACHE_PATH": p("mxr"),
        "MIOPEN_DISABLE_CACHE": "0",
        "ZE_INTEL_NPU_CACHE_DIR": p("npu"),
        "MESA_SHADER_CACHE_DISABLE": "false",
        "MESA_GLSL_CACHE_DISABLE": "false",
        "MESA_SHADER_CACHE_DIR": p("mesa"),
        "MESA_GLSL_CACHE_DIR": p("mesa-old"),
        "__GL_SHADER_DISK_CACHE": "1",
        "__GL_SHADER_DISK_CACHE_PATH": p("glcache"),
        "ORT_DISABLE_TELEMETRY": "0",
    }


# What override must leave behind: a value, None for "removed", or "private" for a fresh private
# directory on tmpfs.
EXPECTED_AFTER_OVERRIDE: dict[str, str | None] = {
    "NEO_CACHE_PERSISTENT": "0",
    "NEO_CACHE_DIR": None,
    "cl_cache_dir": NO_CACHE_PATH,
    "l0_cache_dir": NO_CACHE_PATH,
    "CUDA_CACHE_DISABLE": "1",
    "CUDA_CACHE_PATH": None,
    "USE_PYTORCH_KERNEL_CACHE": "0",
    "PYTORCH_KERNEL_CACHE_PATH": None,
    "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1",
    "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
    "TORCHINDUCTOR_AUTOGRAD_CACHE": "0",
    "TORCHINDUCTOR_FX_GRAPH_REMOTE_CACHE": "0",
    "TORCHINDUCTOR_AUTOGRAD_REMOTE_CACHE": "0",
    "TORCHINDUCTOR_AUTOTUNE_REMOTE_CACHE": "0",
    "TORCHINDUCTOR_BUNDLED_AUTOTUNE_REMOTE_CACHE": "0",
    "TORCHINDUCTOR_DUMP_MEMOIZER_CACHE": "0",
    "TORCH_COMPILE_DEBUG": "0",
    "TORCH_COMPILE_DEBUG_SAVE_REAL": "0",
    "TORCHINDUCTOR_CACHE_DIR": "private",
    "TRITON_CACHE_DIR": "private",
    "TRITON_KERNEL_DUMP": "0",
    "TRITON_DUMP_DIR": None,
    "TRITON_CACHE_MANAGER": None,
    "TRITON_REMOTE_CACHE_BACKEND": None,
    "ORT_TENSORRT_ENGINE_CACHE_ENABLE": "0",
    "ORT_TENSORRT_TIMING_CACHE_ENABLE": "0",
    "ORT_TENSORRT_DUMP_SUBGRAPHS": "0",
    "ORT_DUMP_EP_CONTEXT_MODEL": "0",
    "ORT_TENSORRT_CACHE_PATH": None,
    "ORT_TENSORRT_ENGINE_CACHE_PATH": None,
    "ORT_TENSORRT_GLOBAL_CACHE_PATH": None,
    "ORT_MIGRAPHX_SAVE_COMPILED_MODEL": "0",
    "ORT_MIGRAPHX_SAVE_COMPILE_PATH": None,
    "ORT_MIGRAPHX_SAVE_COMPILED_PATH": None,
    "ORT_MIGRAPHX_MODEL_CACHE_PATH": None,
    "MIOPEN_DISABLE_CACHE": "true",
    "ZE_INTEL_NPU_CACHE_DIR": "",
    "MESA_SHADER_CACHE_DISABLE": "true",
    "MESA_GLSL_CACHE_DISABLE": "true",
    "MESA_SHADER_CACHE_DIR": None,
    "MESA_GLSL_CACHE_DIR": None,
    "__GL_SHADER_DISK_CACHE": "0",
    "__GL_SHADER_DISK_CACHE_PATH": None,
    "ORT_DISABLE_TELEMETRY": "1",
}

# Caches that are on unless a variable switches them off: override sets these on an empty
# environment, without a warning.
DEFAULT_ON = {
    "NEO_CACHE_PERSISTENT": "0",
    "cl_cache_dir": NO_CACHE_PATH,
    "l0_cache_dir": NO_CACHE_PATH,
    "CUDA_CACHE_DISABLE": "1",
    "USE_PYTORCH_KERNEL_CACHE": "0",
    "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1",
    "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
    "TORCHINDUCTOR_AUTOGRAD_CACHE": "0",
    "TORCHINDUCTOR_CACHE_DIR": "private",
    "TRITON_CACHE_DIR": "private",
    "MIOPEN_DISABLE_CACHE": "true",
    "ZE_INTEL_NPU_CACHE_DIR": "",
    "MESA_SHADER_CACHE_DISABLE": "true",
    "__GL_SHADER_DISK_CACHE": "0",
    "ORT_DISABLE_TELEMETRY": "1",
}


def _on_tmpfs(path: str) -> bool:
    return cacheguard._is_memory_backed(path, cacheguard._mounts())


needs_tmpfs = pytest.mark.skipif(
    not (os.path.isdir("/dev/shm") and _on_tmpfs("/dev/shm")), reason="needs /dev/shm on tmpfs"
)


def assert_private_tmpfs_dir(path: str) -> None:
    info = os.lstat(path)
    assert stat.S_ISDIR(info.st_mode), path
    assert info.st_uid == os.geteuid()
    assert info.st_mode & 0o777 == 0o700, oct(info.st_mode)
    assert _on_tmpfs(path), f"{path} is not on a memory-backed filesystem"


def assert_expected(env: dict[str, str], expected: dict[str, str | None]) -> None:
    for var, want in expected.items():
        if want is None:
            assert var not in env, f"{var} should have been removed"
        elif want == "private":
            assert_private_tmpfs_dir(env[var])
        else:
            assert env.get(var) == want, f"{var}={env.get(var)!r}, expected {want!r}"


# --- environment -----------------------------------------------------------------------------


def test_covered_variables_match_this_test():
    # Keeps the hand-written tables above honest: a variable added to or dropped from the guard
    # must be added here too, with what override leaves behind.
    assert set(cacheguard.covered_environment_variables()) == set(EXPECTED_AFTER_OVERRIDE)
    assert set(enabling_environment(Path("/x"))) == set(EXPECTED_AFTER_OVERRIDE)


def test_scan_reports_every_enabled_cache(tmp_path):
    env = enabling_environment(tmp_path)
    findings = {f.setting: f for f in scan(env, cwd=tmp_path)}
    for var, value in env.items():
        finding = findings.get(var)
        assert finding is not None, f"{var} not reported"
        assert finding.risk, f"{var}={value} not seen as writing a cache"
        assert finding.origin == "user"
        assert var in finding.found and finding.action and finding.stack and finding.stores
    assert env == enabling_environment(tmp_path), "scan must not change anything"


def test_scan_of_clean_environment_lists_caches_on_by_default(tmp_path):
    findings = scan({}, cwd=tmp_path)
    assert {f.setting for f in findings} == set(DEFAULT_ON)
    assert all(f.risk and f.origin == "default" for f in findings)


@needs_tmpfs
def test_override_neutralises_each_and_warns_once_per_user_setting(tmp_path):
    env = enabling_environment(tmp_path)
    messages: list[str] = []
    acted = apply("override", env, cwd=tmp_path, warn=messages.append)

    assert len(acted) == len(EXPECTED_AFTER_OVERRIDE)
    assert len(messages) == len(EXPECTED_AFTER_OVERRIDE)
    for var in EXPECTED_AFTER_OVERRIDE:
        assert sum(f"{var}=" in m for m in messages) == 1, f"expected one warning naming {var}"
    assert all("\n" not in m for m in messages)
    assert_expected(env, EXPECTED_AFTER_OVERRIDE)
    # The redirected caches share one fresh private directory, not the user's directories.
    assert Path(env["TRITON_CACHE_DIR"]).parent == Path(env["TORCHINDUCTOR_CACHE_DIR"]).parent
    assert not env["TRITON_CACHE_DIR"].startswith(str(tmp_path))
    assert not any(f.risk for f in scan(env, cwd=tmp_path))


@needs_tmpfs
def test_override_neutralises_defaults_without_warning(tmp_path):
    env: dict[str, str] = {}
    messages: list[str] = []
    acted = apply("override", env, cwd=tmp_path, warn=messages.append)
    assert messages == []
    assert {f.setting for f in acted} == set(DEFAULT_ON)
    assert all(f.origin == "default" for f in acted)
    assert_expected(env, DEFAULT_ON)


def test_strict_raises_naming_every_setting_and_changes_nothing(tmp_path):
    env = enabling_environment(tmp_path)
    before = dict(env)
    messages: list[str] = []
    with pytest.raises(CacheGuardError) as raised:
        apply("strict", env, cwd=tmp_path, warn=messages.append)
    message = str(raised.value)
    assert "\n" not in message
    for var in before:
        assert f"{var} (" in message
    assert env == before
    assert messages == []
    assert isinstance(raised.value, SessionError)

    # A legacy cl_cache folder the driver would use is an offending setting too.
    (tmp_path / "cl_cache").mkdir()
    clean: dict[str, str] = {}
    with pytest.raises(CacheGuardError, match=r"\./cl_cache"):
        apply("strict", clean, cwd=tmp_path)
    assert clean == {}


@needs_tmpfs
def test_strict_on_a_clean_environment_still_switches_off_default_caches(tmp_path):
    env: dict[str, str] = {}
    messages: list[str] = []
    apply("strict", env, cwd=tmp_path, warn=messages.append)
    assert messages == []
    assert_expected(env, DEFAULT_ON)


@needs_tmpfs
def test_apply_is_idempotent(tmp_path):
    env = enabling_environment(tmp_path)
    (tmp_path / "cl_cache").mkdir()
    apply("override", env, cwd=tmp_path, warn=lambda m: None)
    after_first = dict(env)
    messages: list[str] = []
    again = apply("override", env, cwd=tmp_path, warn=messages.append)
    assert again == [] and messages == [] and env == after_first
    assert apply("strict", env, cwd=tmp_path, warn=messages.append) == []
    assert env == after_first


def test_off_changes_nothing_but_reports_the_leaks(tmp_path):
    env = enabling_environment(tmp_path)
    before = dict(env)
    messages: list[str] = []
    leaks = apply("off", env, cwd=tmp_path, warn=messages.append)
    assert env == before and messages == []
    assert {f.setting for f in leaks} == set(before)


def test_unknown_policy_is_one_clear_error():
    for call in (
        lambda: apply("overide", {}),
        lambda: guard_provider_options("TensorrtExecutionProvider", {}, "lenient"),
        lambda: guard_openvino_properties({}, "nope"),
    ):
        with pytest.raises(CacheGuardError, match="unknown cache policy .* 'override', 'strict', 'off'"):
            call()


def test_safe_values_are_not_flagged(tmp_path):
    env = {"CUDA_CACHE_DISABLE": "1", "MESA_SHADER_CACHE_DISABLE": "1", "ORT_TENSORRT_ENGINE_CACHE_ENABLE": "0"}
    findings = {f.setting: f for f in scan(env, cwd=tmp_path)}
    assert not findings["CUDA_CACHE_DISABLE"].risk
    assert not findings["MESA_SHADER_CACHE_DISABLE"].risk
    assert not findings["ORT_TENSORRT_ENGINE_CACHE_ENABLE"].risk
    # A value the driver does not read as "disable" is a risk: CUDA parses an integer.
    assert next(f for f in scan({"CUDA_CACHE_DISABLE": "true"}) if f.setting == "CUDA_CACHE_DISABLE").risk


def test_warning_is_one_line_even_for_hostile_values(tmp_path):
    env = {"CUDA_CACHE_PATH": "/tmp/a\nmodelcloak: all good\x1b[0m"}
    messages: list[str] = []
    apply("override", env, cwd=tmp_path, warn=messages.append)
    (line,) = [m for m in messages if "CUDA_CACHE_PATH" in m]
    assert line.isprintable()


def test_default_warning_goes_to_stderr_with_prefix(tmp_path, capsys):
    apply("override", {"CUDA_CACHE_PATH": "/data/nv"}, cwd=tmp_path)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith("modelcloak: warning: ") and "CUDA_CACHE_PATH=/data/nv" in err[0]


# --- legacy cl_cache folder ------------------------------------------------------------------


def test_cl_cache_folder_in_working_directory_is_detected_and_kept(tmp_path):
    folder = tmp_path / "cl_cache"
    folder.mkdir()
    kernel = folder / "0123abcd.cl_cache"
    kernel.write_bytes(b"compiled kernel")

    (finding,) = [f for f in scan({}, cwd=tmp_path) if f.setting == "./cl_cache"]
    assert finding.risk and finding.origin == "filesystem"
    assert "1 cached kernel file" in finding.found

    messages: list[str] = []
    env: dict[str, str] = {}
    apply("override", env, cwd=tmp_path, warn=messages.append)
    assert [m for m in messages if "cl_cache" in m] == messages and len(messages) == 1
    assert kernel.read_bytes() == b"compiled kernel", "the guard must never delete user files"
    assert env["cl_cache_dir"] == NO_CACHE_PATH
    (after,) = [f for f in scan(env, cwd=tmp_path) if f.setting == "./cl_cache"]
    assert not after.risk


def test_no_cl_cache_folder_no_finding(tmp_path):
    assert not [f for f in scan({}, cwd=tmp_path) if f.setting.startswith("./")]


def test_cl_cache_folder_unused_when_cl_cache_dir_points_elsewhere(tmp_path):
    (tmp_path / "cl_cache").mkdir()
    (other := tmp_path / "elsewhere").mkdir()
    env = {"cl_cache_dir": str(other)}
    folder_finding = next(f for f in scan(env, cwd=tmp_path) if f.setting == "./cl_cache")
    assert not folder_finding.risk
    assert next(f for f in scan(env, cwd=tmp_path) if f.setting == "cl_cache_dir").risk


def test_no_cache_path_can_never_be_created():
    # The legacy NEO cache is only used when its directory exists; this one cannot, even for root.
    with pytest.raises(NotADirectoryError):
        os.makedirs(NO_CACHE_PATH)


# --- onnxruntime -----------------------------------------------------------------------------

WEIGHTS = np.random.default_rng(7).standard_normal((16, 8)).astype(np.float32)


def tiny_model_bytes() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(WEIGHTS, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def leaky_session_options(out: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(out / "optimised.onnx")
    so.enable_profiling = True
    so.profile_file_prefix = str(out / "profile")
    return so


def run_session(so) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(tiny_model_bytes(), so, providers=["CPUExecutionProvider"])
    session.run(None, {"x": np.ones((1, 16), np.float32)})
    if so.enable_profiling:
        session.end_profiling()


def test_negative_control_unguarded_session_writes_plaintext_weights(tmp_path):
    run_session(leaky_session_options(tmp_path))
    written = sorted(p.name for p in tmp_path.iterdir())
    assert "optimised.onnx" in written
    assert any(name.startswith("profile") for name in written)
    assert WEIGHTS.tobytes() in (tmp_path / "optimised.onnx").read_bytes()


def test_guarded_session_writes_nothing(tmp_path):
    so = leaky_session_options(tmp_path)
    messages: list[str] = []
    guard_ort_session_options(so, "override", warn=messages.append)
    assert so.optimized_model_filepath == ""
    assert so.enable_profiling is False
    assert len(messages) == 2
    assert any("optimized_model_filepath" in m for m in messages)
    run_session(so)
    assert list(tmp_path.iterdir()) == []


def test_session_config_entries_are_reset(tmp_path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("ep.context_enable", "1")
    so.add_session_config_entry("ep.context_file_path", str(tmp_path / "ctx.onnx"))
    so.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")

    with pytest.raises(CacheGuardError, match="ep.context_enable.*ep.context_file_path"):
        guard_ort_session_options(so, "strict")
    assert so.get_session_config_entry("ep.context_enable") == "1", "strict must change nothing"

    messages: list[str] = []
    guard_ort_session_options(so, "override", warn=messages.append)
    assert so.get_session_config_entry("ep.context_enable") == "0"
    assert so.get_session_config_entry("ep.context_file_path") == ""
    assert so.get_session_config_entry("session.save_external_prepacked_constant_initializers") == "0"
    assert len(messages) == 3

    again: list[str] = []
    guard_ort_session_options(so, "override", warn=again.append)
    assert again == []


def test_clean_session_options_pass_every_policy_silently():
    import onnxruntime as ort

    so = ort.SessionOptions()
    messages: list[str] = []
    for policy in ("strict", "override", "off"):
        guard_ort_session_options(so, policy, warn=messages.append)
    assert messages == [] and so.optimized_model_filepath == ""


# --- provider options ------------------------------------------------------------------------


def test_tensorrt_provider_options_are_stripped():
    options = {
        "device_id": 0,
        "trt_fp16_enable": True,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": "/var/cache/trt",
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": "/var/cache/timing",
        "trt_dump_subgraphs": 1,
        "trt_dump_ep_context_model": "True",
        "trt_ep_context_file_path": "/var/cache/ctx.onnx",
    }
    original = dict(options)
    messages: list[str] = []
    guarded = guard_provider_options("TensorrtExecutionProvider", options, "override", warn=messages.append)
    assert options == original, "the caller's dict must not be modified"
    assert guarded == {
        "device_id": 0,
        "trt_fp16_enable": True,
        "trt_engine_cache_enable": False,
        "trt_timing_cache_enable": False,
        "trt_dump_subgraphs": False,
        "trt_dump_ep_context_model": False,
    }
    assert len(messages) == 7

    with pytest.raises(CacheGuardError, match="trt_engine_cache_enable"):
        guard_provider_options("TensorrtExecutionProvider", options, "strict")
    assert guard_provider_options("TensorrtExecutionProvider", options, "off") == original

    safe = {"trt_engine_cache_enable": False, "trt_timing_cache_enable": "0", "trt_fp16_enable": True}
    quiet: list[str] = []
    assert guard_provider_options("TensorrtExecutionProvider", safe, "strict", warn=quiet.append) == safe
    assert quiet == []


def test_openvino_ep_options_are_stripped():
    load_config = {"GPU": {"CACHE_DIR": "/var/cache/ov", "PERFORMANCE_HINT": "LATENCY"}}
    options = {"device_type": "GPU", "cache_dir": "/var/cache/ov-ep", "load_config": json.dumps(load_config)}
    messages: list[str] = []
    guarded = guard_provider_options("OpenVINOExecutionProvider", options, "override", warn=messages.append)
    assert "cache_dir" not in guarded and guarded["device_type"] == "GPU"
    assert json.loads(guarded["load_config"]) == {"GPU": {"CACHE_DIR": "", "PERFORMANCE_HINT": "LATENCY"}}
    assert len(messages) == 2
    assert json.loads(options["load_config"]) == load_config

    with pytest.raises(CacheGuardError, match="cannot|not valid JSON"):
        guard_provider_options("OpenVINOExecutionProvider", {"load_config": "{GPU:{CACHE_DIR:/x}}"}, "override")


def test_migraphx_provider_options_are_stripped():
    options = {
        "device_id": 0,
        "migraphx_fp16_enable": True,
        "migraphx_save_compiled_model": True,
        "migraphx_save_compiled_path": "/var/cache/model.mxr",
        "migraphx_model_cache_dir": "/var/cache/mxr",
    }
    guarded = guard_provider_options("MIGraphXExecutionProvider", options, "override", warn=lambda m: None)
    assert guarded == {"device_id": 0, "migraphx_fp16_enable": True, "migraphx_save_compiled_model": False}


def test_other_providers_are_returned_unchanged_as_a_copy():
    options = {"arena_extend_strategy": "kSameAsRequested"}
    guarded = guard_provider_options("CPUExecutionProvider", options, "strict")
    assert guarded == options and guarded is not options


# --- OpenVINO properties ---------------------------------------------------------------------


def test_openvino_properties_disable_the_cache():
    assert openvino_properties() == {"CACHE_DIR": ""}


def test_openvino_properties_nested_cache_dirs_are_emptied():
    props = {
        "CACHE_DIR": "/var/cache/ov",
        "PERFORMANCE_HINT": "LATENCY",
        "DEVICE_PROPERTIES": {"GPU": {"CACHE_DIR": "/var/cache/gpu"}, "NPU": {"NPUW_CACHE_DIR": "/var/npuw"}},
    }
    original = json.loads(json.dumps(props))
    messages: list[str] = []
    guarded = guard_openvino_properties(props, "override", warn=messages.append)
    assert guarded == {
        "CACHE_DIR": "",
        "PERFORMANCE_HINT": "LATENCY",
        "DEVICE_PROPERTIES": {"GPU": {"CACHE_DIR": ""}, "NPU": {"NPUW_CACHE_DIR": ""}},
    }
    assert props == original
    assert len(messages) == 3
    with pytest.raises(CacheGuardError, match="DEVICE_PROPERTIES.GPU.CACHE_DIR"):
        guard_openvino_properties(props, "strict")
    # A dict without a CACHE_DIR gets the disabling one, so a Core-wide CACHE_DIR cannot apply.
    assert guard_openvino_properties({"PERFORMANCE_HINT": "LATENCY"}, "strict")["CACHE_DIR"] == ""


def _openvino_model():
    ov = pytest.importorskip("openvino")
    from openvino import opset13 as ops

    x = ops.parameter([1, 16], np.float32, name="x")
    return ov, ov.Model([ops.matmul(x, ops.constant(WEIGHTS), False, False)], [x], "tiny")


def test_negative_control_openvino_cache_dir_writes_plaintext_weights(tmp_path):
    ov, model = _openvino_model()
    ov.Core().compile_model(model, "CPU", {"CACHE_DIR": str(tmp_path)})
    blobs = list(tmp_path.iterdir())
    assert blobs, "OpenVINO wrote no cache: this control can no longer show the leak"
    assert any(WEIGHTS.tobytes() in blob.read_bytes() for blob in blobs if blob.is_file())


def test_guarded_openvino_properties_write_nothing(tmp_path):
    ov, model = _openvino_model()
    props = guard_openvino_properties({"CACHE_DIR": str(tmp_path)}, "override", warn=lambda m: None)
    compiled = ov.Core().compile_model(model, "CPU", props)
    out = compiled({"x": np.ones((1, 16), np.float32)})[0]
    # OpenVINO may run the CPU in bf16 here: the check is that the model ran, not its precision.
    np.testing.assert_allclose(out, np.ones((1, 16), np.float32) @ WEIGHTS, atol=0.1)
    assert list(tmp_path.iterdir()) == []


# --- TorchInductor reads the guarded environment as intended -----------------------------------

TORCH_PROBE = """
import json
import torch._inductor.config as inductor
import torch._functorch.config as functorch
import torch.compiler.config as compiler
from torch._inductor.runtime.cache_dir_utils import cache_dir, triton_cache_dir
print(json.dumps({
    "fx_graph_cache": inductor.fx_graph_cache,
    "autograd_cache": functorch.enable_autograd_cache,
    "force_disable_caches": compiler.force_disable_caches,
    "cache_dir": cache_dir(),
    "triton_cache_dir": triton_cache_dir(0),
}))
"""


@needs_tmpfs
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_torchinductor_reads_the_guarded_environment(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCH", "TRITON"))}
    env["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"  # a user switching the cache on explicitly
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")
    apply("override", env, cwd=tmp_path, warn=lambda m: None)
    result = subprocess.run(
        [sys.executable, "-c", TORCH_PROBE], env=env, capture_output=True, text=True, timeout=600, check=True
    )
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    # torch's own defaults are True, True, False and /tmp/torchinductor_<user>: each assertion
    # fails if the guard used a name or value torch does not read.
    assert seen["fx_graph_cache"] is False
    assert seen["autograd_cache"] is False
    assert seen["force_disable_caches"] is True
    assert seen["cache_dir"] == env["TORCHINDUCTOR_CACHE_DIR"]
    assert seen["triton_cache_dir"] == env["TRITON_CACHE_DIR"]
    assert_private_tmpfs_dir(seen["cache_dir"])
    assert list(tmp_path.iterdir()) == []


# --- report ----------------------------------------------------------------------------------


def test_format_report_puts_risks_first():
    findings = [
        CacheFinding("S", "SAFE", "SAFE=1", False, "set SAFE=1"),
        CacheFinding("S", "RISKY", "RISKY=1", True, "unset RISKY"),
        CacheFinding("S", "DEFAULT", "not set", True, "set DEFAULT=0", origin="default"),
    ]
    rows = format_report(findings)
    assert [row[1] for row in rows] == ["RISKY", "DEFAULT", "SAFE"]
    assert rows[0][3:] == ("yes", "unset RISKY")
    assert rows[1][3] == "yes (default)"
    assert rows[2][3:] == ("no", "nothing")
    assert all(len(row) == len(cacheguard.REPORT_COLUMNS) for row in rows)
