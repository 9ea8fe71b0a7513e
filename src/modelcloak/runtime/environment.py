"""The environment allowlist of the process that holds plaintext (see docs/CACHES.md).

The device operator controls the environment, and the native libraries under a sealed model read
dozens of variables, some of which write files (OpenVINO's ``OV_ENABLE_SERIALIZE_TRACING`` dumps
every initializer next to the working directory, oneDNN's ``ONEDNN_JIT_DUMP`` writes kernel code)
or load code (``INTEL_LIBITTNOTIFY64``, ``OMP_TOOL_LIBRARIES``, ``OCL_ICD_FILENAMES``,
``CUDA_INJECTION64_PATH``). A blocklist of the harmful ones is always one release behind, so the
rule here is the other way round: a variable that belongs to a *governed family* (a prefix or name
owned by onnxruntime, OpenVINO, oneDNN, OpenCL/Level Zero, CUDA, TBB/OpenMP, BLAS, OpenSSL, Python
or glibc) stays only if it is on :data:`SAFE` or is managed by a cache-guard rule; everything else
in those families is removed before any runtime starts. Variables outside the families (``PATH``,
the user's own) are left alone; the libraries' reads of those are listed in :data:`UNGOVERNED` so
a test can require that every name the shipped libraries read is classified one way or the other.

Python and the dynamic loader read their variables when the process starts, before any of our
code: removing them here keeps them from children (the enclave process) and from later ``getenv``
calls, but cannot undo what they did at start. That is why ``LD_PRELOAD`` and friends are removed
with a warning (``strict`` refuses to start) rather than silently.

This module imports no runtime.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["FAMILIES", "SAFE", "UNGOVERNED", "family_of", "is_safe", "removable"]

# Governed families: stack -> name prefixes (or exact names). Case matters: environment names are
# case-sensitive on Linux and these libraries read upper-case names.
FAMILIES: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("ORT_",),
    "OpenVINO": ("OV_", "OPENVINO_", "IE_", "NPUW_", "ONNX_"),
    "oneDNN": ("ONEDNN_", "DNNL_", "MKLDNN_"),
    "Intel ITT / VTune": ("INTEL_",),
    "OpenCL / Level Zero": ("OCL_", "OPENCL_", "CL_", "ZE_", "NEO_", "SYCL_"),
    "CUDA": ("CUDA_", "CUDNN_", "CUBLAS_", "CUBLASLT_", "NCCL_", "CUPTI_", "NVIDIA_", "TRT_"),
    "TBB / OpenMP": ("TBB_", "OMP_", "KMP_", "GOMP_"),
    "BLAS": ("OPENBLAS_", "GOTO_", "MKL_"),
    # Read when numpy loads OpenBLAS, before any guard runs (unit numbers and buffering only).
    "GNU Fortran runtime": ("GFORTRAN_",),
    "OpenSSL": ("OPENSSL_",),
    "SQLite": ("SQLITE_",),
    "Python": ("PYTHON",),
    "glibc": (
        "LD_",
        "MALLOC_",
        "GLIBC_TUNABLES",
        "GCONV_PATH",
        "LOCPATH",
        "NLSPATH",
        "HOSTALIASES",
        "MEMUSAGE_",
        "SEGFAULT_",
        "PCPROFILE_OUTPUT",
    ),
}

# Kept in every policy: none of these writes a file or loads code. Threads and CPU-feature limits
# change speed, not where bytes go. Cache-guard rule variables (CUDA_CACHE_DISABLE, NEO_*, ...) are
# not listed here: the guard forces or removes those itself.
SAFE: dict[str, str] = {
    "OMP_NUM_THREADS": "thread count",
    "OMP_DYNAMIC": "thread scheduling",
    "OMP_PROC_BIND": "thread pinning",
    "OMP_PLACES": "thread pinning",
    "OMP_WAIT_POLICY": "spin or sleep",
    "OMP_THREAD_LIMIT": "thread count",
    "OMP_MAX_ACTIVE_LEVELS": "nesting depth",
    "OMP_STACKSIZE": "thread stack size",
    "OMP_SCHEDULE": "loop schedule",
    "GOMP_SPINCOUNT": "spin time",
    "KMP_AFFINITY": "thread pinning",
    "KMP_BLOCKTIME": "spin time",
    "TBB_MALLOC_USE_HUGE_PAGES": "allocator page size",
    "OPENBLAS_NUM_THREADS": "thread count",
    "OPENBLAS_CORETYPE": "CPU kernel choice",
    "GOTO_NUM_THREADS": "thread count",
    "MKL_NUM_THREADS": "thread count",
    "DNNL_MAX_CPU_ISA": "CPU instruction set limit",
    "ONEDNN_MAX_CPU_ISA": "CPU instruction set limit",
    "OV_CPU_MAX_ISA": "CPU instruction set limit",
    "DNNL_PRIMITIVE_CACHE_CAPACITY": "size of an in-memory cache",
    "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "size of an in-memory cache",
    "CUDA_VISIBLE_DEVICES": "which GPUs are visible",
    "CUDA_DEVICE_ORDER": "GPU numbering",
    "CUDA_MODULE_LOADING": "lazy or eager kernel loading",
    "OPENSSL_ia32cap": "CPU feature mask",
    # Read by the interpreter at start (already in effect); a child Python (the enclave process)
    # needs the same module path and home to import modelcloak at all. The operator chooses which
    # Python runs, so these give nothing they do not already have.
    "PYTHONPATH": "module search path (read at interpreter start; children need the same)",
    "PYTHONHOME": "interpreter location (read at interpreter start; children need the same)",
    "PYTHONSAFEPATH": "narrows the module search path",
    "PYTHONNOUSERSITE": "narrows the module search path",
    "PYTHONPLATLIBDIR": "interpreter layout",
    "PYTHONDONTWRITEBYTECODE": "writes less",
    "PYTHONHASHSEED": "hash randomisation",
    "PYTHONUNBUFFERED": "stdout buffering",
    "PYTHONIOENCODING": "stdio encoding",
    "PYTHONUTF8": "text encoding",
    "PYTHONCOERCECLOCALE": "locale handling",
    "PYTHONFAULTHANDLER": "tracebacks on a crash, to stderr",
    # Consumed by the dynamic loader at start; children need it to find their libraries.
    "LD_LIBRARY_PATH": "library search path (read by the loader at start; children need the same)",
}

# Names outside the governed families that the shipped libraries were seen reading (the getenv
# trace in tests/runtime/test_environment.py), each left alone on purpose.
UNGOVERNED: dict[str, str] = {
    "HOME": "where caches would go; the switches that write there are governed",
    "PATH": "program search path",
    "TMPDIR": "where temporary files go; what writes them is governed",
    "XDG_CACHE_HOME": "where caches would go; the switches that write there are governed",
    "LC_ALL": "locale",
    "SSL_CERT_FILE": "trusted CA certificates for outgoing TLS",
    "SSL_CERT_DIR": "trusted CA certificates for outgoing TLS",
    "CRYPTOGRAPHY_OPENSSL_NO_LEGACY": "pyca/cryptography: skips OpenSSL's legacy provider",
    "NPY_DISABLE_CPU_FEATURES": "numpy CPU dispatch",
    "NPY_ENABLE_CPU_FEATURES": "numpy CPU dispatch",
    "NUMPY_WARN_IF_NO_MEM_POLICY": "numpy warning switch",
    "ALLOW_RELEASED_ONNX_OPSET_ONLY": "onnx checker: refuses unreleased opsets",
    "__PYVENV_LAUNCHER__": "macOS venv launcher",
    # onnxruntime's telemetry looks for CI and container markers; telemetry itself is switched
    # off by the cache guard (ORT_DISABLE_TELEMETRY=1).
    "APPVEYOR": "CI marker",
    "BITBUCKET_BUILD_NUMBER": "CI marker",
    "BUILDKITE": "CI marker",
    "CI": "CI marker",
    "CIRCLECI": "CI marker",
    "CODEBUILD_BUILD_ID": "CI marker",
    "GITHUB_ACTIONS": "CI marker",
    "GITLAB_CI": "CI marker",
    "JENKINS_URL": "CI marker",
    "SYSTEM_TEAMFOUNDATIONCOLLECTIONURI": "CI marker",
    "TEAMCITY_VERSION": "CI marker",
    "TF_BUILD": "CI marker",
    "TRAVIS": "CI marker",
    "DOTNET_RUNNING_IN_CONTAINER": "container marker",
    "ECS_CONTAINER_METADATA_URI": "container marker",
    "ECS_CONTAINER_METADATA_URI_V4": "container marker",
    "KUBERNETES_SERVICE_HOST": "container marker",
    "container": "container marker",
}


def family_of(name: str) -> str | None:
    """The governed family a variable belongs to, or None when it is outside every family."""
    for stack, prefixes in FAMILIES.items():
        if any(name.startswith(prefix) for prefix in prefixes):
            return stack
    return None


def is_safe(name: str) -> bool:
    return name in SAFE


def removable(environ: Mapping[str, str], managed: frozenset[str]) -> list[tuple[str, str]]:
    """(variable, family) for every variable of a governed family that is neither safe nor managed.

    ``managed`` are the variables a cache-guard rule forces or removes itself.
    """
    found = []
    for name in sorted(environ):
        if name in managed or name in SAFE:
            continue
        stack = family_of(name)
        if stack is not None:
            found.append((name, stack))
    return found
