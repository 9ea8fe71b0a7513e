"""Cache guard: find and neutralise on-disk caches that would hold plaintext model artefacts.

A sealed model is decrypted only in memory, but the inference stacks underneath write artefacts to
disk on their own: GPU drivers keep compiled kernels, onnxruntime can save the optimised model or an
"EP context" model with compiled engines inside, TensorRT keeps engine and timing caches, OpenVINO
exports compiled blobs (weights included) into CACHE_DIR, TorchInductor and Triton keep generated
code. Each of these is a plaintext copy of weights or of the model's compiled structure, written
behind the application's back. This module finds them and switches them off before any runtime
starts.

Three policies:

- ``"override"`` (default): neutralise every finding. A setting somebody made (an environment
  variable, a session option, a provider option, a ``cl_cache`` folder) produces one warning line;
  a cache that is merely on by default (CUDA's ComputeCache, the NEO compiler cache, ...) is
  switched off silently and only shows up in :func:`scan`, so every run is not noisy.
- ``"strict"``: change nothing a user set; if anything user-made would write a cache, raise
  :class:`CacheGuardError` naming every offending setting, before touching anything. Caches that are
  merely on by default are still switched off (setting an unset variable overrides nobody's choice,
  and leaving them on would leak).
- ``"off"``: do nothing at all. **Unsafe**: it exists so a test can show the leaks are real (the
  negative control); never use it for a protected model.

Environment variables are read by drivers when they initialise (the CUDA driver at context
creation, the NEO OpenCL driver at platform discovery, TorchInductor when its config module is
imported), so :func:`apply` must run before any runtime is imported or initialised. It changes only
the environment it is given (``os.environ`` by default), which this process's native code and its
children see; it cannot reach other processes or system-wide configuration files.

Nothing here ever deletes or edits a user's file. The only thing created is a private 0700
directory on a memory-backed filesystem (``/dev/shm``) for Triton and TorchInductor, which cannot
be stopped from writing generated code somewhere; it is removed when the interpreter exits.

This module imports no runtime (onnxruntime, OpenVINO, torch) at import time, so that importing it
cannot initialise a driver before the guard has run.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelcloak.runtime import environment
from modelcloak.runtime.errors import SessionError

if TYPE_CHECKING:  # pragma: no cover - typing only; importing onnxruntime here would defeat the guard
    import onnxruntime

__all__ = [
    "POLICIES",
    "REPORT_COLUMNS",
    "CacheFinding",
    "CacheGuardError",
    "apply",
    "block_openvino_telemetry",
    "covered_environment_variables",
    "format_report",
    "guard_openvino_properties",
    "guard_ort_session_options",
    "guard_provider_options",
    "openvino_properties",
    "scan",
]

POLICIES = ("override", "strict", "off")
"""Valid policies; see the module docstring. ``"off"`` is unsafe and exists for negative controls."""

WARNING_PREFIX = "modelcloak: warning: "

# A path below a character device can never exist, nor be created, even by root: pointing the
# legacy NEO cache variables here disables the legacy cache for good (the driver only uses that
# cache when the directory exists).
NO_CACHE_PATH = "/dev/null/modelcloak-no-kernel-cache"

_MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
_PRIVATE_PREFIX = "modelcloak-jit-"


class CacheGuardError(SessionError):
    """A cache would write plaintext model artefacts to disk and the policy forbids fixing it.

    Raised by the ``"strict"`` policy (one line naming every offending setting), for an unknown
    policy, and where a setting cannot be neutralised safely (for example a CACHE_DIR buried in a
    string the guard cannot rewrite).
    """


@dataclass(frozen=True)
class CacheFinding:
    """One cache-relevant setting and what the guard makes of it.

    ``risk`` is True when the current state would write a cache. ``origin`` says where the risk
    comes from: ``"user"`` (a setting somebody made), ``"default"`` (the runtime caches unless told
    not to; neutralised without a warning) or ``"filesystem"`` (a folder a driver would use).
    ``stores`` says what the cache would hold, so a report can say why it matters.
    """

    stack: str
    setting: str
    found: str
    risk: bool
    action: str
    origin: str = "user"
    stores: str = ""


REPORT_COLUMNS = ("stack", "setting", "found", "writes cache", "override does")
"""Column titles for the rows :func:`format_report` returns."""


def format_report(findings: Iterable[CacheFinding]) -> list[tuple[str, ...]]:
    """Rows for a table (``modelcloak doctor``): one per finding, matching :data:`REPORT_COLUMNS`.

    Risky findings come first so the table opens with what needs attention.
    """
    rows: list[tuple[str, ...]] = []
    for finding in sorted(findings, key=lambda f: not f.risk):
        if finding.risk:
            verdict = "yes (default)" if finding.origin == "default" else "yes"
            action = finding.action
        else:
            verdict = "no"
            action = "nothing"
        rows.append((finding.stack, finding.setting, finding.found, verdict, action))
    return rows


# ---------------------------------------------------------------------------------------------
# Environment rules
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _EnvRule:
    """One environment variable and how to make it safe.

    kind ``"force"``: set ``value``; ``safe`` lists (lower-cased) values that already disable the
    cache. ``default_on`` says the cache is on while the variable is unset. kind ``"unset"``: a
    cache location; remove it. kind ``"redirect"``: the cache cannot be disabled; point it at a
    private directory on a memory-backed filesystem.
    """

    stack: str
    var: str
    kind: str
    stores: str
    value: str = ""
    safe: frozenset[str] = frozenset()
    default_on: bool = False
    default_found: str = ""
    subdir: str = ""


def _force(
    stack: str,
    var: str,
    value: str,
    stores: str,
    *,
    safe: Iterable[str] = (),
    default_on: bool = False,
    default_found: str = "",
) -> _EnvRule:
    return _EnvRule(
        stack,
        var,
        "force",
        stores,
        value=value,
        safe=frozenset({value.lower(), *(s.lower() for s in safe)}),
        default_on=default_on,
        default_found=default_found,
    )


def _unset(stack: str, var: str, stores: str) -> _EnvRule:
    return _EnvRule(stack, var, "unset", stores)


def _redirect(stack: str, var: str, subdir: str, stores: str, default_found: str) -> _EnvRule:
    return _EnvRule(stack, var, "redirect", stores, default_on=True, default_found=default_found, subdir=subdir)


_NEO = "Intel OpenCL/Level Zero (NEO)"
_CUDA = "NVIDIA CUDA driver"
_TORCH_JIT = "PyTorch CUDA jiterator"
_INDUCTOR = "TorchInductor"
_TRITON = "Triton"
_ORT_TRT = "onnxruntime TensorRT EP"
_ORT_MIGX = "onnxruntime MIGraphX EP"
_MIOPEN = "AMD MIOpen"
_NPU = "Intel NPU driver"
_MESA = "Mesa (GL/Vulkan/rusticl)"
_NVGL = "NVIDIA OpenGL driver"
_ORT = "onnxruntime"
_ORT_OV = "onnxruntime OpenVINO EP"
_OPENVINO = "OpenVINO"

_KERNELS = "compiled GPU kernels of the model's layers"
_TRT_ENGINE = "TensorRT engines (the compiled network, weights included)"

# Sources for every name are in docs/CACHES.md. Variables that were looked for and could not be
# confirmed are deliberately absent: CoreML EP's model cache option (string value not confirmed),
# the NVIDIA TensorRT-RTX EP's cache options, ZE_INTEL_NPU_CACHE_SIZE and NEO_CACHE_MAX_SIZE (sizes
# only: neither disables anything; NEO's 0 even means "unlimited"), MIOpen's custom cache directory
# variable, and any OpenVINO environment variable for CACHE_DIR (OpenVINO has none; it is a property).
_ENV_RULES: tuple[_EnvRule, ...] = (
    # Intel compute runtime (NEO). Current drivers cache by default in
    # $XDG_CACHE_HOME/neo_compiler_cache or ~/.cache/neo_compiler_cache; NEO_CACHE_PERSISTENT=0
    # turns that off. Drivers from 2020-2024 then fall back to the legacy cache: the directory named
    # by cl_cache_dir (OpenCL) / l0_cache_dir (Level Zero), default ./cl_cache / ./l0_cache relative
    # to the working directory, used whenever it exists. So the legacy variables are pointed at a
    # path that can never exist.
    _force(
        _NEO,
        "NEO_CACHE_PERSISTENT",
        "0",
        _KERNELS,
        default_on=True,
        default_found="on by default in current drivers: ~/.cache/neo_compiler_cache",
    ),
    _unset(_NEO, "NEO_CACHE_DIR", _KERNELS),
    _force(
        _NEO,
        "cl_cache_dir",
        NO_CACHE_PATH,
        "compiled OpenCL kernels (legacy cache)",
        default_on=True,
        default_found="legacy drivers cache in ./cl_cache whenever it exists",
    ),
    _force(
        _NEO,
        "l0_cache_dir",
        NO_CACHE_PATH,
        "compiled Level Zero kernels (legacy cache)",
        default_on=True,
        default_found="legacy drivers cache in ./l0_cache whenever it exists",
    ),
    # CUDA driver JIT cache (ComputeCache in ~/.nv): on by default.
    _force(
        _CUDA,
        "CUDA_CACHE_DISABLE",
        "1",
        "JIT-compiled kernels (PTX to SASS)",
        default_on=True,
        default_found="cache on by default in ~/.nv/ComputeCache",
    ),
    _unset(_CUDA, "CUDA_CACHE_PATH", "JIT-compiled kernels (PTX to SASS)"),
    # PyTorch's NVRTC "jiterator" kernel cache (ATen/native/cuda/JitLoops.cuh): on by default.
    _force(
        _TORCH_JIT,
        "USE_PYTORCH_KERNEL_CACHE",
        "0",
        "NVRTC-compiled elementwise kernels",
        default_on=True,
        default_found="cache on by default in ~/.cache/torch/kernels",
    ),
    _unset(_TORCH_JIT, "PYTORCH_KERNEL_CACHE_PATH", "NVRTC-compiled elementwise kernels"),
    # TorchInductor (torch/_inductor/config.py, torch/_functorch/config.py, torch/compiler/config.py).
    # Only "1" and "0" are understood. TORCHINDUCTOR_FORCE_DISABLE_CACHES comes first in the
    # precedence list it shares with TORCH_COMPILE_FORCE_DISABLE_CACHES, so setting it wins.
    _force(
        _INDUCTOR,
        "TORCHINDUCTOR_FORCE_DISABLE_CACHES",
        "1",
        "compiled FX graphs and kernels",
        default_on=True,
        default_found="caches enabled by default",
    ),
    _force(
        _INDUCTOR,
        "TORCHINDUCTOR_FX_GRAPH_CACHE",
        "0",
        "compiled FX graphs (model structure)",
        default_on=True,
        default_found="on by default",
    ),
    _force(
        _INDUCTOR,
        "TORCHINDUCTOR_AUTOGRAD_CACHE",
        "0",
        "compiled AOTAutograd graphs",
        default_on=True,
        default_found="on by default",
    ),
    _force(_INDUCTOR, "TORCHINDUCTOR_FX_GRAPH_REMOTE_CACHE", "0", "compiled FX graphs, sent to a remote cache"),
    _force(_INDUCTOR, "TORCHINDUCTOR_AUTOGRAD_REMOTE_CACHE", "0", "compiled graphs, sent to a remote cache"),
    _force(_INDUCTOR, "TORCHINDUCTOR_AUTOTUNE_REMOTE_CACHE", "0", "autotuning results, sent to a remote cache"),
    _force(_INDUCTOR, "TORCHINDUCTOR_BUNDLED_AUTOTUNE_REMOTE_CACHE", "0", "autotuning results, sent to a remote cache"),
    _force(_INDUCTOR, "TORCHINDUCTOR_DUMP_MEMOIZER_CACHE", "0", "a JSON dump of the memoizer cache"),
    _force(_INDUCTOR, "TORCH_COMPILE_DEBUG", "0", "debug traces: FX graphs and generated code"),
    _force(_INDUCTOR, "TORCH_COMPILE_DEBUG_SAVE_REAL", "0", "real tensors (weights) in debug traces"),
    # Inductor writes generated code to its cache dir even with every cache flag off (it compiles
    # from files), default /tmp/torchinductor_<user>: the only fix is to move that directory.
    _redirect(
        _INDUCTOR,
        "TORCHINDUCTOR_CACHE_DIR",
        "inductor",
        "generated kernel code (model structure)",
        "writes generated code to /tmp/torchinductor_<user>",
    ),
    # Triton (python/triton/knobs.py): the cache has no off switch.
    _redirect(
        _TRITON,
        "TRITON_CACHE_DIR",
        "triton",
        "compiled Triton kernels",
        "cache on, in $TRITON_HOME/.triton/cache (default ~/.triton/cache)",
    ),
    _force(_TRITON, "TRITON_KERNEL_DUMP", "0", "kernel IR dumps (TTIR, TTGIR, PTX)"),
    _unset(_TRITON, "TRITON_DUMP_DIR", "kernel IR dumps"),
    _unset(_TRITON, "TRITON_CACHE_MANAGER", "compiled kernels, wherever a custom manager puts them"),
    _unset(_TRITON, "TRITON_REMOTE_CACHE_BACKEND", "compiled kernels, sent to a remote cache"),
    # onnxruntime TensorRT EP (tensorrt_execution_provider.h, tensorrt_env_vars).
    _force(_ORT_TRT, "ORT_TENSORRT_ENGINE_CACHE_ENABLE", "0", _TRT_ENGINE),
    _force(_ORT_TRT, "ORT_TENSORRT_TIMING_CACHE_ENABLE", "0", "TensorRT timing cache (layer shapes)"),
    _force(_ORT_TRT, "ORT_TENSORRT_DUMP_SUBGRAPHS", "0", "ONNX subgraphs, weights included"),
    _force(_ORT_TRT, "ORT_DUMP_EP_CONTEXT_MODEL", "0", "an EP context model embedding TensorRT engines"),
    _unset(_ORT_TRT, "ORT_TENSORRT_CACHE_PATH", _TRT_ENGINE),
    _unset(_ORT_TRT, "ORT_TENSORRT_ENGINE_CACHE_PATH", _TRT_ENGINE),
    _unset(_ORT_TRT, "ORT_TENSORRT_GLOBAL_CACHE_PATH", "TensorRT timing cache"),
    # onnxruntime MIGraphX EP. The save-path variable was ORT_MIGRAPHX_SAVE_COMPILE_PATH in the
    # source up to ORT 1.19 and is documented as ORT_MIGRAPHX_SAVE_COMPILED_PATH; current releases
    # use ORT_MIGRAPHX_MODEL_CACHE_PATH, which also overrides the provider option.
    _force(_ORT_MIGX, "ORT_MIGRAPHX_SAVE_COMPILED_MODEL", "0", "compiled MIGraphX programs (.mxr, weights included)"),
    _unset(_ORT_MIGX, "ORT_MIGRAPHX_SAVE_COMPILE_PATH", "compiled MIGraphX programs (.mxr)"),
    _unset(_ORT_MIGX, "ORT_MIGRAPHX_SAVE_COMPILED_PATH", "compiled MIGraphX programs (.mxr)"),
    _unset(_ORT_MIGX, "ORT_MIGRAPHX_MODEL_CACHE_PATH", "compiled MIGraphX programs (.mxr)"),
    # MIOpen kernel cache (~/.cache/miopen), on by default; documented value "true".
    _force(
        _MIOPEN,
        "MIOPEN_DISABLE_CACHE",
        "true",
        "compiled convolution kernels",
        safe=("1", "yes", "on"),
        default_on=True,
        default_found="cache on by default in ~/.cache/miopen",
    ),
    # Intel NPU user-mode driver: caches compiled models unless the variable is set to empty.
    _force(
        _NPU,
        "ZE_INTEL_NPU_CACHE_DIR",
        "",
        "compiled NPU models (weights included)",
        default_on=True,
        default_found="cache on by default in ~/.cache/ze_intel_npu_cache",
    ),
    # Mesa disk cache (GL, Vulkan and rusticl OpenCL). MESA_GLSL_* are the pre-22.1 names; only a
    # user value is corrected there, since current Mesa warns when the old names are set.
    _force(
        _MESA,
        "MESA_SHADER_CACHE_DISABLE",
        "true",
        "compiled shaders and compute kernels",
        safe=("1", "yes", "y"),
        default_on=True,
        default_found="cache on by default in ~/.cache/mesa_shader_cache",
    ),
    _force(_MESA, "MESA_GLSL_CACHE_DISABLE", "true", "compiled shaders (Mesa before 22.1)", safe=("1", "yes", "y")),
    _unset(_MESA, "MESA_SHADER_CACHE_DIR", "compiled shaders and compute kernels"),
    _unset(_MESA, "MESA_GLSL_CACHE_DIR", "compiled shaders (Mesa before 22.1)"),
    # NVIDIA proprietary GL driver shader cache ($HOME/.nv/GLCache), on by default for non-root.
    _force(
        _NVGL,
        "__GL_SHADER_DISK_CACHE",
        "0",
        "compiled shaders",
        default_on=True,
        default_found="cache on by default in ~/.nv/GLCache",
    ),
    _unset(_NVGL, "__GL_SHADER_DISK_CACHE_PATH", "compiled shaders"),
    # onnxruntime's telemetry (1DS, on Linux since 1.2x) writes a device id and an SQLite event
    # store under ~/.cache/Microsoft/DeveloperTools/.onnxruntime and a session file $TMPDIR/.ses,
    # when onnxruntime is imported: the variable must be set before that.
    _force(
        _ORT,
        "ORT_DISABLE_TELEMETRY",
        "1",
        "telemetry: a device id, an event database and a session file",
        default_on=True,
        default_found="telemetry on by default: ~/.cache/Microsoft/DeveloperTools, $TMPDIR/.ses",
    ),
)

# Legacy NEO caches in the working directory: (folder name, variable that names it).
_LEGACY_FOLDERS = (("cl_cache", "cl_cache_dir"), ("l0_cache", "l0_cache_dir"))

# What tells us a stack has already read its environment in this process: imported Python modules
# and loaded shared libraries. Used only to warn that a late guard cannot help those stacks.
_ALREADY_INITIALISED: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    _INDUCTOR: (("torch._inductor.config", "torch._functorch.config", "torch.compiler.config"), ()),
    _NEO: ((), ("libigdrcl.so", "libze_intel_gpu.so")),
    _CUDA: ((), ("libcuda.so",)),
    _NPU: ((), ("libze_intel_npu.so",)),
    _MIOPEN: ((), ("libMIOpen.so",)),
    _NVGL: ((), ("libnvidia-glcore.so",)),
    _ORT: (("onnxruntime",), ("libonnxruntime.so",)),
    "OpenVINO": (("openvino",), ("libopenvino.so",)),
    "oneDNN": ((), ("libopenvino_intel_cpu_plugin.so",)),
}


def covered_environment_variables() -> tuple[str, ...]:
    """Every environment variable the guard inspects, in report order (for docs and doctor)."""
    return tuple(rule.var for rule in _ENV_RULES)


# ---------------------------------------------------------------------------------------------
# Shared machinery
# ---------------------------------------------------------------------------------------------


@dataclass
class _Check:
    finding: CacheFinding
    fix: Callable[[], None] | None = None


def _shown(value: Any, limit: int = 160) -> str:
    """A value as one printable line: warnings must stay one line whatever a variable contains."""
    text = str(value)
    if not text.isprintable():
        text = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def _check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise CacheGuardError(f"unknown cache policy {policy!r}: use one of {', '.join(repr(p) for p in POLICIES)}")


def _stderr_warn(message: str) -> None:
    sys.stderr.write(WARNING_PREFIX + message + "\n")
    sys.stderr.flush()


def _warning_text(finding: CacheFinding) -> str:
    what = (
        f" would write {finding.stores} to disk"
        if finding.stores
        else " is not on the allowlist of variables known not to write files or load code"
    )
    return _shown(f"{finding.stack}: {finding.found}{what}; {finding.action}", limit=600)


def _strict_message(findings: list[CacheFinding], context: str) -> str:
    # Every setting is named in full; only the values shown beside them are shortened.
    named = "; ".join(f"{_shown(f.setting)} ({_shown(f.found, 60)})" for f in findings)
    return (
        f"cache policy 'strict': {context} would write plaintext model artefacts to disk: {named}. "
        "Remove these settings, or use policy 'override' to neutralise them"
    )


def _enforce(checks: list[_Check], policy: str, warn: Callable[[str], None] | None, context: str) -> list[CacheFinding]:
    """Carry out a policy over checks; returns the findings that were at risk."""
    risky = [check for check in checks if check.finding.risk]
    if policy == "off":
        return [check.finding for check in risky]
    if policy == "strict":
        offending = [check.finding for check in risky if check.finding.origin != "default"]
        if offending:
            raise CacheGuardError(_strict_message(offending, context))
    emit = warn or _stderr_warn
    for check in risky:
        if check.fix is not None:
            check.fix()
        if check.finding.origin != "default":
            emit(_warning_text(check.finding))
    return [check.finding for check in risky]


# ---------------------------------------------------------------------------------------------
# Private directories for caches that cannot be disabled
# ---------------------------------------------------------------------------------------------


def _mounts() -> list[tuple[str, str]]:
    """(mount point, filesystem type) pairs of this process's mount namespace; empty off Linux."""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []
    mounts = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 3:
            # Mount points escape spaces and friends as octal (\040).
            point = parts[1].encode("latin-1", "replace").decode("unicode_escape", "replace")
            mounts.append((point, parts[2]))
    return mounts


def _is_memory_backed(path: str, mounts: list[tuple[str, str]]) -> bool:
    real = os.path.realpath(path)
    best, best_type = "", ""
    for point, fstype in mounts:
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, best_type = point, fstype
    return best_type in _MEMORY_FILESYSTEMS


def _is_private_dir(path: str) -> bool:
    """An existing directory, not a symlink, owned by us, with no group or other permissions."""
    if not path or not os.path.isabs(path):
        return False
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and (info.st_mode & 0o077) == 0


def _memory_root(environ: Mapping[str, str], mounts: list[tuple[str, str]]) -> str | None:
    """Where private scratch directories go: /dev/shm, else $XDG_RUNTIME_DIR, if memory-backed."""
    for candidate in ("/dev/shm", environ.get("XDG_RUNTIME_DIR", "")):
        if (
            candidate
            and os.path.isdir(candidate)
            and os.access(candidate, os.W_OK | os.X_OK)
            and _is_memory_backed(candidate, mounts)
        ):
            return candidate
    return None


class _Scratch:
    """Creates at most one private directory per :func:`apply` call, on first need.

    Not global state: each call gets its own, and a later call recognises an existing private
    directory from the environment (see :func:`_is_private_dir`) instead of remembering it.
    """

    def __init__(self, root: str | None) -> None:
        self._root = root
        self._dir: str | None = None

    def subdir(self, name: str) -> str:
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix=_PRIVATE_PREFIX, dir=self._root)  # mode 0700
            atexit.register(shutil.rmtree, self._dir, ignore_errors=True)
        path = os.path.join(self._dir, name)
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
        return path


# ---------------------------------------------------------------------------------------------
# Environment scan and apply
# ---------------------------------------------------------------------------------------------


def _env_checks(environ: Mapping[str, str], cwd: Path | None, scratch: _Scratch | None) -> list[_Check]:
    mounts = _mounts()
    memory_root = _memory_root(environ, mounts)
    checks: list[_Check] = []

    def setter(var: str, value: str) -> Callable[[], None]:
        def fix() -> None:
            environ[var] = value  # type: ignore[index]  # apply() passes a MutableMapping

        return fix

    def remover(var: str) -> Callable[[], None]:
        def fix() -> None:
            environ.pop(var, None)  # type: ignore[attr-defined]

        return fix

    def redirector(var: str, subdir: str) -> Callable[[], None]:
        def fix() -> None:
            if scratch is not None:
                environ[var] = scratch.subdir(subdir)  # type: ignore[index]

        return fix

    for rule in _ENV_RULES:
        value = environ.get(rule.var)
        shown = f"{rule.var}={_shown(value)}" if value is not None else f"not set ({rule.default_found})"
        if rule.kind == "force":
            action = f"set {rule.var}={rule.value}" if rule.value else f"set {rule.var} to the empty string"
            if value is None:
                if not rule.default_on:
                    continue
                finding = CacheFinding(rule.stack, rule.var, shown, True, action, "default", rule.stores)
            else:
                risk = value.strip().lower() not in rule.safe
                finding = CacheFinding(rule.stack, rule.var, shown, risk, action, "user", rule.stores)
            checks.append(_Check(finding, setter(rule.var, rule.value)))
        elif rule.kind == "unset":
            if value is None:
                continue
            finding = CacheFinding(rule.stack, rule.var, shown, True, f"unset {rule.var}", "user", rule.stores)
            checks.append(_Check(finding, remover(rule.var)))
        else:  # redirect
            why = (
                "Triton cannot disable its cache"
                if rule.stack == _TRITON
                else "Inductor writes generated code even with its caches off"
            )
            where = "on tmpfs" if memory_root else "in the temp directory (no tmpfs found: still on disk)"
            action = f"set {rule.var} to a fresh private 0700 directory {where}, removed at exit ({why})"
            if value is not None and _is_private_dir(value):
                memory = _is_memory_backed(value, mounts)
                found = f"{rule.var}={_shown(value)} (private {'tmpfs' if memory else 'on-disk'} directory)"
                if memory:
                    checks.append(
                        _Check(CacheFinding(rule.stack, rule.var, found, False, "nothing", "default", rule.stores))
                    )
                    continue
                if memory_root is None:
                    # The best this machine allows: creating another one would change nothing.
                    checks.append(
                        _Check(
                            CacheFinding(
                                rule.stack,
                                rule.var,
                                found,
                                True,
                                "keep it: no memory-backed filesystem here (it is removed at exit)",
                                "default",
                                rule.stores,
                            )
                        )
                    )
                    continue
                finding = CacheFinding(rule.stack, rule.var, found, True, action, "default", rule.stores)
            else:
                origin = "default" if value is None else "user"
                finding = CacheFinding(rule.stack, rule.var, shown, True, action, origin, rule.stores)
            checks.append(_Check(finding, redirector(rule.var, rule.subdir)))

    checks.extend(_allowlist_checks(environ, remover))

    if cwd is not None:
        for folder_name, var in _LEGACY_FOLDERS:
            folder = cwd / folder_name
            if not folder.is_dir():
                continue
            configured = environ.get(var) or folder_name
            target = Path(configured) if os.path.isabs(configured) else cwd / configured
            try:
                in_use = target.resolve() == folder.resolve()
            except OSError:
                in_use = False
            try:
                cached = sum(1 for entry in os.scandir(folder) if entry.name.endswith(f".{folder_name}"))
            except OSError:
                cached = 0
            found = f"{folder} exists ({cached} cached kernel file{'s' if cached != 1 else ''})"
            if not in_use:
                found += f"; unused: {var} points elsewhere"
            action = (
                f"set {var}={NO_CACHE_PATH} so drivers stop using it; the folder is left in place "
                "(delete it yourself if it holds kernels of a protected model)"
            )
            finding = CacheFinding(
                _NEO, f"./{folder_name}", found, in_use, action, "filesystem", "compiled kernels (legacy NEO cache)"
            )
            checks.append(_Check(finding, setter(var, NO_CACHE_PATH)))
    return checks


_MANAGED = frozenset(rule.var for rule in _ENV_RULES)


def _allowlist_checks(environ: Mapping[str, str], remover: Callable[[str], Callable[[], None]]) -> list[_Check]:
    """Every variable of a governed family that is neither on the allowlist nor managed by a rule.

    See :mod:`modelcloak.runtime.environment`: such a variable may write files or load code in a
    release nobody has reviewed yet, so it goes.
    """
    checks = []
    for name, stack in environment.removable(environ, _MANAGED):
        finding = CacheFinding(
            stack,
            name,
            f"{name}={_shown(environ[name])}",
            True,
            f"unset {name}",
            "user",
        )
        checks.append(_Check(finding, remover(name)))
    return checks


def scan(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> list[CacheFinding]:
    """Report every cache-relevant setting in ``environ`` (default ``os.environ``) and ``cwd``.

    Changes nothing. A finding is listed when it writes a cache (``risk``) or when it is set at all
    (so a report shows the guard's own settings as safe); settings that are unset and off by
    default are left out. ``cwd`` (default: the current directory) is checked for the legacy
    ``cl_cache``/``l0_cache`` folders that older Intel drivers fill whenever they exist.
    """
    environ = os.environ if environ is None else environ
    return [check.finding for check in _env_checks(environ, _resolve_cwd(cwd), None)]


def _resolve_cwd(cwd: Path | None) -> Path | None:
    if cwd is not None:
        return Path(cwd)
    try:
        return Path.cwd()
    except OSError:  # the working directory was removed: nothing there to find
        return None


def _late_stacks(findings: list[CacheFinding]) -> list[str]:
    """Stacks with a risky finding that already read their environment in this process."""
    stacks = {f.stack for f in findings if f.risk}
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as handle:
            maps = handle.read()
    except OSError:
        maps = ""
    late = []
    for stack, (modules, libraries) in _ALREADY_INITIALISED.items():
        if stack in stacks and (any(m in sys.modules for m in modules) or any(lib in maps for lib in libraries)):
            late.append(stack)
    return late


def apply(
    policy: str = "override",
    environ: MutableMapping[str, str] | None = None,
    cwd: Path | None = None,
    warn: Callable[[str], None] | None = None,
) -> list[CacheFinding]:
    """Neutralise the on-disk caches found by :func:`scan`, according to ``policy``.

    Returns the findings that were at risk when called (what was neutralised; for ``"off"``, what
    would leak). ``warn`` receives one line per user-made finding (default: stderr, prefixed
    ``modelcloak: warning:``). Idempotent: a second call finds nothing at risk, warns nothing and
    changes nothing. Never deletes or edits a file; the only thing it may create is one private
    directory on tmpfs for Triton and TorchInductor, removed at interpreter exit.

    Must run before any runtime is imported or initialised: drivers read these variables once.
    """
    _check_policy(policy)
    target = os.environ if environ is None else environ
    memory_root = _memory_root(target, _mounts())
    checks = _env_checks(target, _resolve_cwd(cwd), _Scratch(memory_root))
    findings = _enforce(checks, policy, warn, "the environment")
    if policy != "off" and target is os.environ:
        emit = warn or _stderr_warn
        for stack in _late_stacks(findings):
            emit(
                f"{stack} was initialised before the cache guard ran; settings it has already read "
                "are not affected (run the guard before importing or starting any runtime)"
            )
    return findings


# ---------------------------------------------------------------------------------------------
# onnxruntime session options and provider options
# ---------------------------------------------------------------------------------------------

# Session config entries (onnxruntime_session_options_config_keys.h) and the value that writes
# nothing. Missing keys raise in get_session_config_entry, so each is read in try/except.
_ORT_CONFIG_RULES: tuple[tuple[str, str, str], ...] = (
    ("ep.context_enable", "0", "an EP context model with compiled EP blobs (TensorRT engines, OpenVINO/QNN blobs)"),
    ("ep.context_file_path", "", "an EP context model with compiled EP blobs"),
    ("ep.context_model_external_initializers_file_name", "", "the EP context model's weights"),
    ("session.optimized_model_external_initializers_file_name", "", "the optimised model's weights"),
    ("session.save_external_prepacked_constant_initializers", "0", "pre-packed weights"),
    ("session.collect_node_memory_stats_to_file", "", "per-node statistics (node names and sizes)"),
)


def _session_config_entry(so: onnxruntime.SessionOptions, key: str) -> str | None:
    """A session config entry, or None when it was never set (onnxruntime raises for those)."""
    try:
        return so.get_session_config_entry(key)
    except RuntimeError:  # onnxruntime's Fail derives from RuntimeError
        return None


def _ort_session_checks(so: onnxruntime.SessionOptions) -> list[_Check]:
    checks: list[_Check] = []
    path = so.optimized_model_filepath
    if path:

        def clear_path() -> None:
            so.optimized_model_filepath = ""

        checks.append(
            _Check(
                CacheFinding(
                    _ORT,
                    "optimized_model_filepath",
                    f"optimized_model_filepath={_shown(path)}",
                    True,
                    "set optimized_model_filepath to the empty string",
                    "user",
                    "the optimised model, weights included",
                ),
                clear_path,
            )
        )
    if so.enable_profiling:

        def stop_profiling() -> None:
            so.enable_profiling = False

        checks.append(
            _Check(
                CacheFinding(
                    _ORT,
                    "enable_profiling",
                    f"enable_profiling=True (prefix {_shown(so.profile_file_prefix)})",
                    True,
                    "set enable_profiling=False",
                    "user",
                    "a profile naming every node, its operator and shapes",
                ),
                stop_profiling,
            )
        )
    for key, safe, stores in _ORT_CONFIG_RULES:
        value = _session_config_entry(so, key)
        if value is None or value in (safe, ""):
            continue

        def reset(key: str = key, safe: str = safe) -> None:
            so.add_session_config_entry(key, safe)

        shown_safe = f'"{safe}"' if safe else "the empty string"
        checks.append(
            _Check(
                CacheFinding(_ORT, key, f"{key}={_shown(value)}", True, f"set {key} to {shown_safe}", "user", stores),
                reset,
            )
        )
    return checks


def guard_ort_session_options(
    so: onnxruntime.SessionOptions,
    policy: str = "override",
    *,
    warn: Callable[[str], None] | None = None,
) -> None:
    """Make an onnxruntime ``SessionOptions`` write nothing to disk, per ``policy``, in place.

    Clears ``optimized_model_filepath`` (onnxruntime would save the optimised model, weights
    included), turns off profiling (the profile names every node with its shapes), and resets the
    EP-context and external-initializer session entries that dump compiled EP blobs or weights.
    Provider options added with ``SessionOptions.add_provider`` cannot be read back: pass them
    through :func:`guard_provider_options` first.
    """
    _check_policy(policy)
    _enforce(_ort_session_checks(so), policy, warn, "the onnxruntime session options")


_TRUE_STRINGS = frozenset({"1", "true", "yes", "on"})
_FALSE_STRINGS = frozenset({"0", "false", "no", "off", ""})


def _writes(value: Any) -> bool:
    """Whether a provider flag enables writing. Unknown strings count as enabling (conservative)."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    return str(value).strip().lower() not in _FALSE_STRINGS


# Per provider: flags that must be off, and path options that must go. Names from the providers'
# *_execution_provider_info.cc option tables; MIGraphX has used three spellings over releases.
_PROVIDER_RULES: dict[str, tuple[str, dict[str, str], dict[str, str]]] = {
    "tensorrtexecutionprovider": (
        _ORT_TRT,
        {
            "trt_engine_cache_enable": _TRT_ENGINE,
            "trt_timing_cache_enable": "TensorRT timing cache (layer shapes)",
            "trt_dump_subgraphs": "ONNX subgraphs, weights included",
            "trt_dump_ep_context_model": "an EP context model embedding TensorRT engines",
        },
        {
            "trt_engine_cache_path": _TRT_ENGINE,
            "trt_timing_cache_path": "TensorRT timing cache",
            "trt_ep_context_file_path": "an EP context model embedding TensorRT engines",
        },
    ),
    "migraphxexecutionprovider": (
        _ORT_MIGX,
        {
            "migraphx_save_compiled_model": "compiled MIGraphX programs (.mxr, weights included)",
            "migx_save_compiled_model": "compiled MIGraphX programs (.mxr, weights included)",
        },
        {
            "migraphx_save_compiled_path": "compiled MIGraphX programs (.mxr)",
            "migraphx_save_model_name": "compiled MIGraphX programs (.mxr)",
            "migx_save_model_name": "compiled MIGraphX programs (.mxr)",
            "migraphx_model_cache_dir": "compiled MIGraphX programs (.mxr)",
        },
    ),
    "openvinoexecutionprovider": (
        _ORT_OV,
        {},
        {
            "cache_dir": "compiled OpenVINO blobs (weights included)",
        },
    ),
}

# OpenVINO properties that make a plugin write compiled blobs. CACHE_DIR is the core property;
# NPUW_CACHE_DIR is the NPU plugin's own cache directory (property name present in the 2026.4
# NPU plugin).
_OPENVINO_CACHE_KEYS = {
    "CACHE_DIR": "compiled model blobs (weights included)",
    "NPUW_CACHE_DIR": "compiled NPU blobs (weights included)",
}


def _openvino_tree_checks(tree: dict[str, Any], stack: str, prefix: str) -> list[_Check]:
    """Checks for cache keys anywhere in a (nested) OpenVINO property dict, fixed in place."""
    checks: list[_Check] = []
    for key in list(tree):
        value = tree[key]
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            checks.extend(_openvino_tree_checks(value, stack, name + "."))
        elif key in _OPENVINO_CACHE_KEYS:
            if value is None or str(value) == "":
                continue

            def blank(tree: dict[str, Any] = tree, key: str = key) -> None:
                tree[key] = ""

            checks.append(
                _Check(
                    CacheFinding(
                        stack,
                        name,
                        f"{name}={_shown(value)}",
                        True,
                        f"set {name} to the empty string",
                        "user",
                        _OPENVINO_CACHE_KEYS[key],
                    ),
                    blank,
                )
            )
        elif isinstance(value, str) and any(k in value for k in _OPENVINO_CACHE_KEYS):
            # e.g. DEVICE_PROPERTIES given as a string: JSON can be rewritten, anything else cannot.
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                inner = _openvino_tree_checks(parsed, stack, name + ".")
                for check in inner:
                    fix = check.fix

                    def refix(
                        fix: Callable[[], None] | None = fix,
                        tree: dict[str, Any] = tree,
                        key: str = key,
                        parsed: dict[str, Any] = parsed,
                    ) -> None:
                        if fix is not None:
                            fix()
                        tree[key] = json.dumps(parsed)

                    checks.append(_Check(check.finding, refix))
            else:
                raise CacheGuardError(
                    f"{stack}: {name} mentions a cache directory in a form the guard cannot rewrite "
                    f"({_shown(value, 80)}); pass it as a nested dict or JSON without the cache key"
                )
    return checks


def _openvino_ep_load_config_checks(options: dict[str, Any]) -> list[_Check]:
    """load_config is a JSON string of per-device OpenVINO properties (ORT >= 1.23)."""
    raw = options.get("load_config")
    if raw is None or str(raw) == "":
        return []
    text = str(raw)
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        # Older releases took a path to a JSON file; the guard never rewrites a user's file.
        if os.path.isfile(text):
            try:
                with open(text, encoding="utf-8") as handle:
                    content = handle.read()
            except OSError:
                content = ""
            if any(key in content for key in _OPENVINO_CACHE_KEYS):
                raise CacheGuardError(
                    f"{_ORT_OV}: load_config file {_shown(text, 80)} sets a cache directory; "
                    "remove CACHE_DIR from it (modelcloak never edits user files)"
                )
            return []
        if any(key in text for key in _OPENVINO_CACHE_KEYS):
            raise CacheGuardError(f"{_ORT_OV}: load_config mentions a cache directory but is not valid JSON; fix it")
        return []
    checks = _openvino_tree_checks(parsed, _ORT_OV, "load_config.")
    wrapped = []
    for check in checks:

        def refix(fix: Callable[[], None] | None = check.fix, parsed: dict[str, Any] = parsed) -> None:
            if fix is not None:
                fix()
            options["load_config"] = json.dumps(parsed)

        wrapped.append(_Check(check.finding, refix))
    return wrapped


def guard_provider_options(
    provider: str,
    options: Mapping[str, Any],
    policy: str = "override",
    *,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Return a copy of an execution provider's options that writes no engine or blob cache.

    TensorRT: engine, timing and EP-context caches off, their paths dropped. OpenVINO EP:
    ``cache_dir`` dropped and CACHE_DIR removed from ``load_config``. MIGraphX: saving compiled
    programs off, save/cache paths dropped. Other providers are returned unchanged (as a copy).
    The input mapping is never modified. Environment variables that configure the same caches are
    handled by :func:`apply`.
    """
    _check_policy(policy)
    guarded = dict(options)
    rules = _PROVIDER_RULES.get(provider.lower())
    if rules is None:
        return guarded
    stack, flags, paths = rules
    checks: list[_Check] = []
    for key, stores in flags.items():
        if key in guarded and _writes(guarded[key]):

            def off(key: str = key) -> None:
                guarded[key] = False

            checks.append(
                _Check(
                    CacheFinding(stack, key, f"{key}={_shown(guarded[key])}", True, f"set {key}=False", "user", stores),
                    off,
                )
            )
    for key, stores in paths.items():
        if key in guarded and str(guarded[key]) != "":

            def drop(key: str = key) -> None:
                guarded.pop(key, None)

            checks.append(
                _Check(
                    CacheFinding(stack, key, f"{key}={_shown(guarded[key])}", True, f"remove {key}", "user", stores),
                    drop,
                )
            )
    if stack == _ORT_OV and policy != "off":
        checks.extend(_openvino_ep_load_config_checks(guarded))
    _enforce(checks, policy, warn, f"the {provider} options")
    return guarded


# ---------------------------------------------------------------------------------------------
# OpenVINO properties
# ---------------------------------------------------------------------------------------------


def block_openvino_telemetry(policy: str = "override") -> bool:
    """Keep OpenVINO's Python telemetry from writing ``~/intel/openvino_ga_cid`` and ``~/intel/stats``.

    ``import openvino`` imports the model converter, which starts the ``openvino_telemetry``
    package (opt-out: with no consent file it counts uses on disk and may send events). The
    converter falls back to its own no-op stub when that package cannot be imported, so marking it
    unimportable in ``sys.modules`` before the first ``import openvino`` switches telemetry off
    without touching the user's home directory. Returns False when it is too late (OpenVINO was
    already imported) or the policy is ``"off"``.
    """
    _check_policy(policy)
    if policy == "off" or "openvino" in sys.modules:
        return False
    if sys.modules.get("openvino_telemetry", None) is not None:
        return False  # somebody imported it on purpose; nothing here undoes that
    sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  # None makes the import fail
    return True


def openvino_properties() -> dict[str, str]:
    """Properties for ``ov.Core.compile_model`` that keep OpenVINO from writing a model cache.

    An empty CACHE_DIR disables model caching; passing it explicitly also overrides a CACHE_DIR
    set globally on the Core.
    """
    return {"CACHE_DIR": ""}


def guard_openvino_properties(
    props: Mapping[str, Any],
    policy: str = "override",
    *,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Return a copy of OpenVINO compile properties with every cache directory emptied.

    Looks through nested per-device dicts (``DEVICE_PROPERTIES``) and JSON strings; a cache key
    inside a string the guard cannot rewrite raises :class:`CacheGuardError`. The result always
    carries a top-level ``CACHE_DIR=""`` so a directory set on the Core cannot apply either.
    The input mapping is never modified.
    """
    _check_policy(policy)
    guarded = _deep_copy(props)
    if policy == "off":
        return guarded
    checks = _openvino_tree_checks(guarded, _OPENVINO, "")
    _enforce(checks, policy, warn, "the OpenVINO properties")
    guarded.setdefault("CACHE_DIR", "")
    return guarded


def _deep_copy(value: Any) -> Any:
    """Copy nested dicts; leave other values (OpenVINO enums, callbacks) shared."""
    if isinstance(value, Mapping):
        return {key: _deep_copy(item) for key, item in value.items()}
    return value
