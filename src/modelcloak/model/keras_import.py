"""Bring a Keras model (.keras or legacy .h5) into modelcloak as an ONNX graph.

Keras 3 runs on a PyTorch backend, where a loaded Keras model *is* a `torch.nn.Module`; the model
is exported with `export_torch` (torch.export + torch's ONNX exporter), the same path PyTorch
models take. Nothing downstream learns that the model came from Keras (docs/ARCHITECTURE.md, "The flow").

Choices, and why:

* No TensorFlow: Keras' own `model.export(format="onnx")` on the torch backend writes the ONNX
  file to disk (a plaintext copy we would have to clean up) and, with a dynamic batch, falls
  back to the deprecated TorchScript exporter. `export_torch` keeps everything in memory and
  declares the batch axis dynamic. SavedModel directories can only be read by TensorFlow, so
  they are refused with a message that says how to convert them.
* Keras picks its backend once, at import, from KERAS_BACKEND. It is set to "torch" here when
  unset; when it names another backend, or Keras is already imported with another backend, the
  import is refused instead of silently switching a process-wide setting.
* `safe_mode=True` (Keras' default) stays on: a model file cannot run arbitrary Python through a
  Lambda layer while being loaded. `compile=False`: only inference is needed.
* The model is traced with a batch of 2: a batch of 1 lets some Keras layers specialise on the
  size, which torch.export then reports as a conflict with the dynamic batch.
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import Any

import onnx

from modelcloak.model.errors import ModelError

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
_TRACE_BATCH = 2


def load_keras(path: str | Path, *, input_shapes: list[tuple[int, ...]] | None = None) -> onnx.ModelProto:
    """Load a `.keras` or `.h5` model through Keras 3 on the PyTorch backend and return ONNX.

    Args:
        path: the model file.
        input_shapes: per model input, the shape without the batch dim; needed only when an input
            has an undefined dimension besides the batch (e.g. a variable sequence length),
            which is then fixed to the given size in the exported graph.

    Returns:
        A checked ONNX model (via `export_torch`): inputs named after the Keras inputs, a symbolic
        batch dim 0 named "batch", outputs named after the Keras output layers.

    Raises:
        ModelError: the file is missing or not a Keras model, SavedModel directories (TensorFlow
            is required for those), Keras >= 3 or torch missing, a non-torch Keras backend, or
            the export failed.
    """
    path = Path(path)
    if path.is_dir():
        raise ModelError(
            f"{path} is a TensorFlow SavedModel directory; reading it needs TensorFlow, which modelcloak does "
            "not use. Convert it where TensorFlow is installed (python -m tf2onnx.convert --saved-model "
            f"{path} --output model.onnx) or save the model as .keras"
        )
    if not path.exists():
        raise ModelError(f"model file {path} does not exist")
    if path.suffix.lower() not in KERAS_SUFFIXES:
        raise ModelError(f"{path.name}: Keras models are .keras or .h5 files")

    keras = _import_keras()
    import torch

    try:
        model = keras.models.load_model(str(path), compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises ValueError, OSError, TypeError ... for bad files
        raise ModelError(f"Keras could not load {path.name}: {_first_line(exc)}") from None
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"{path.name} loaded as a {type(model).__name__}, not a Keras model on the torch backend")

    specs = _input_specs(model, path.name)
    samples = tuple(_sample(torch, spec, i, input_shapes, path.name) for i, spec in enumerate(specs))
    input_names = _unique([_clean_name(getattr(spec, "name", None), f"input_{i}") for i, spec in enumerate(specs)])
    output_names = _output_names(model)

    from modelcloak.model.torch_export import export_torch

    return export_torch(
        _wrap(torch, model, len(samples)),
        samples if len(samples) > 1 else samples[0],
        input_names=input_names,
        output_names=output_names,
    )


def _import_keras() -> Any:
    backend = os.environ.get("KERAS_BACKEND")
    if "keras" in sys.modules:
        import keras

        current = keras.backend.backend()
        if current != "torch":
            raise ModelError(
                f"Keras is already imported with the {current!r} backend; modelcloak reads Keras models "
                "through the torch backend: set KERAS_BACKEND=torch before Keras is first imported"
            )
    elif backend not in (None, "", "torch"):
        raise ModelError(
            f"KERAS_BACKEND is {backend!r}; modelcloak reads Keras models through the torch backend: "
            "unset it or set KERAS_BACKEND=torch"
        )
    else:
        # Keras chooses its backend at import time from this variable; see the module docstring.
        os.environ["KERAS_BACKEND"] = "torch"
    try:
        import torch  # noqa: F401 - the backend Keras will run on
    except ImportError:
        raise ModelError("Keras import needs PyTorch: pip install 'modelcloak[keras]'") from None
    try:
        import keras
    except ImportError:
        raise ModelError("Keras is not installed: pip install 'modelcloak[keras]' (keras>=3)") from None
    major = int(str(getattr(keras, "__version__", "0")).split(".")[0] or 0)
    if major < 3:
        raise ModelError(f"Keras {keras.__version__} is too old; modelcloak needs Keras 3 (pip install 'keras>=3')")
    return keras


def _input_specs(model: Any, origin: str) -> list[Any]:
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:
        raise ModelError(
            f"{origin}: the model has no defined inputs (a Sequential without keras.Input that was never built); "
            "rebuild it with keras.Input(shape=...) and save it again"
        )
    return list(inputs)


def _sample(torch: Any, spec: Any, i: int, overrides: list[tuple[int, ...]] | None, origin: str) -> Any:
    """A zero tensor for input i at batch _TRACE_BATCH, in the input's dtype."""
    shape = list(spec.shape)
    if not shape:
        raise ModelError(f"{origin}: input {i} is a scalar; every input needs a batch dimension")
    rest = shape[1:]
    if overrides is not None:
        if len(overrides) <= i or len(overrides[i]) != len(rest):
            raise ModelError(f"input_shapes[{i}] must give {len(rest)} dims (the input shape without the batch)")
        rest = list(overrides[i])
    if any(d is None for d in rest):
        raise ModelError(
            f"{origin}: input {i} has shape {tuple(shape)} with an undefined dimension besides the batch; "
            "pass input_shapes to fix its size"
        )
    dtype = getattr(torch, str(spec.dtype), None)
    if not isinstance(dtype, torch.dtype):
        raise ModelError(f"{origin}: input {i} has an unsupported dtype {spec.dtype}")
    return torch.zeros([_TRACE_BATCH, *rest], dtype=dtype)


def _wrap(torch: Any, model: Any, arity: int) -> Any:
    """A module with a fixed positional signature around the Keras model.

    torch.export binds arguments against `forward`'s signature, and a Keras model's own `forward`
    takes `*args, **kwargs`, which does not line up with one dynamic-shape spec per input; a
    signature with one named parameter per input does. `training=False` keeps Dropout and
    BatchNormalization in inference mode.
    """

    class KerasModule(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.keras_model = model

        def forward(self, *inputs: Any) -> Any:
            return self.keras_model(inputs[0] if arity == 1 else list(inputs), training=False)

    parameter = inspect.Parameter
    KerasModule.forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [parameter("self", parameter.POSITIONAL_OR_KEYWORD)]
        + [parameter(f"input_{i}", parameter.POSITIONAL_OR_KEYWORD) for i in range(arity)]
    )
    return KerasModule()


def _output_names(model: Any) -> list[str] | None:
    names = list(getattr(model, "output_names", None) or [])
    outputs = getattr(model, "outputs", None) or []
    if not names or len(names) != len(outputs):
        return None  # let the exporter name them
    return _unique([_clean_name(name, f"output_{i}") for i, name in enumerate(names)])


def _clean_name(name: Any, fallback: str) -> str:
    text = str(name) if name else ""
    return text if text.strip() else fallback


def _unique(names: list[str]) -> list[str]:
    seen: set[str] = set()
    result = []
    for name in names:
        candidate, k = name, 1
        while candidate in seen:
            candidate, k = f"{name}_{k}", k + 1
        seen.add(candidate)
        result.append(candidate)
    return result


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__
