"""Which environment variables do the shipped native libraries read? Two independent answers.

- `traced_names`: run a sealed load under an LD_PRELOAD shim (getenv_trace.c) that records every
  getenv/secure_getenv lookup. This sees names assembled at run time (oneDNN builds
  ``ONEDNN_`` + ``JIT_DUMP``) and names with prefixes nobody thought of.
- `static_names`: strings in onnxruntime's and OpenVINO's shared objects that look like their
  switches. This sees code paths the trace did not run (GPU and NPU plugins).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
SHIM_SOURCE = HERE / "getenv_trace.c"
PROBE = HERE / "leak_probe.py"

# Prefixes whose strings in the binaries are candidate switches (enum names like ORT_ENABLE_ALL
# come along; switching those on is harmless).
_STATIC = re.compile(rb"(?<![A-Za-z0-9_])((?:ORT|OV|OPENVINO|ONEDNN|DNNL|TBB|OMP|KMP|INTEL)_[A-Z0-9_]{2,})\x00")

# Consumed by the interpreter, the dynamic loader or numpy's Fortran runtime when the process
# starts, before any guard can run: switched on, they change the probe itself (PYTHONHOME=1 leaves
# no Python at all; GFORTRAN_STDIN_UNIT=GFORTRAN_STDOUT_UNIT=1 aborts at numpy's import). The guard
# removes them for children; see docs/CACHES.md.
STARTUP_FAMILIES = ("Python", "glibc", "GNU Fortran runtime")


def field_environment() -> dict[str, str]:
    """This process's environment as a device in the field would have it: without the CI and
    container markers. onnxruntime's and OpenVINO's telemetry stay quiet when they see one (CI
    runners set `CI`), so a negative control that expects their files would pass here and fail
    on a CI runner, and the getenv trace would miss the telemetry switches."""
    from modelcloak.runtime.environment import UNGOVERNED

    markers = {name for name, why in UNGOVERNED.items() if why in ("CI marker", "container marker")}
    return {name: value for name, value in os.environ.items() if name not in markers}


def _require(tool: str) -> None:
    if shutil.which(tool) is None:
        if os.environ.get("MODELCLOAK_REQUIRE_ALL"):
            pytest.fail(f"{tool} is required for this test (.ci/run installs it)")
        pytest.skip(f"{tool} is not installed")


def build_shim(directory: Path) -> Path:
    _require("cc")
    shim = directory / "getenv_trace.so"
    if not shim.exists():
        subprocess.run(
            ["cc", "-shared", "-fPIC", "-O2", "-o", str(shim), str(SHIM_SOURCE), "-ldl"],
            check=True,
            capture_output=True,
            timeout=600,
        )
    return shim


def traced_names(shim: Path, bundle: Path, key: Path, backend: str, workdir: Path, env: dict[str, str]) -> set[str]:
    """Names looked up with getenv while the probe loads and runs `bundle` on `backend`."""
    trace = workdir / f"getenv-{backend}.log"
    trace.unlink(missing_ok=True)
    child = {**env, "LD_PRELOAD": str(shim), "MODELCLOAK_GETENV_TRACE": str(trace)}
    result = subprocess.run(
        [sys.executable, str(PROBE), str(bundle), str(key), backend, "override"],
        env=child,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return set(trace.read_text().split())


def shared_objects() -> list[Path]:
    found = []
    for package in ("onnxruntime", "openvino"):
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            continue
        root = Path(spec.origin).parent
        found += [p for p in root.rglob("*.so*") if p.is_file()]
    return found


def static_names() -> set[str]:
    names: set[str] = set()
    for path in shared_objects():
        names.update(match.decode() for match in _STATIC.findall(path.read_bytes()))
    return names


def switched_on(names: set[str], tree: Path) -> dict[str, str]:
    """Each name with a value that turns it on: a path in `tree` for locations, "1" otherwise."""
    from modelcloak.runtime import environment

    values = {}
    for name in sorted(names):
        if environment.family_of(name) in STARTUP_FAMILIES or environment.family_of(name) is None:
            continue
        if re.search(r"(PATH|DIR|FILE|FILENAME|FOLDER|PREFIX)$", name):
            values[name] = str(tree / "switch-targets" / name.lower())
        else:
            values[name] = "1"
    return values
