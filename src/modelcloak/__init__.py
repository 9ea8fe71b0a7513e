"""modelcloak: protect neural networks shipped to machines you do not control.

Owner side: `protect(model, out, key=..., scheme=...)`. Device side: `InferenceSession(bundle,
key=...)` with onnxruntime's API, or `load(bundle, key=...)` with modelcloak's own.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from modelcloak.errors import ModelcloakError

if TYPE_CHECKING:
    from modelcloak.inference import InferenceSession, load
    from modelcloak.options import (
        CutSelector,
        EnclaveConfig,
        FheLabels,
        FheOptions,
        LoadOptions,
        LockOptions,
        Metering,
        OutputPolicy,
    )
    from modelcloak.protector import protect

try:
    __version__ = version("modelcloak")  # one source: pyproject.toml
except PackageNotFoundError:  # pragma: no cover - running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "CutSelector",
    "EnclaveConfig",
    "FheLabels",
    "FheOptions",
    "InferenceSession",
    "LoadOptions",
    "LockOptions",
    "Metering",
    "ModelcloakError",
    "OutputPolicy",
    "__version__",
    "load",
    "protect",
]

# Imported on first use so that `import modelcloak` stays cheap and the cache guard runs before
# onnxruntime or OpenVINO are imported.
_LAZY = {
    "InferenceSession": "modelcloak.inference",
    "load": "modelcloak.inference",
    "protect": "modelcloak.protector",
    **{
        name: "modelcloak.options"
        for name in (
            "CutSelector",
            "EnclaveConfig",
            "FheLabels",
            "FheOptions",
            "LoadOptions",
            "LockOptions",
            "Metering",
            "OutputPolicy",
        )
    },
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'modelcloak' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
