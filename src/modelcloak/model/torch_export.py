"""Bring a PyTorch module into modelcloak as an ONNX graph.

ONNX is the one intermediate form (docs/ARCHITECTURE.md, "The flow"): everything downstream (cut, protect,
bundle, runtime) works on an `onnx.ModelProto` and never learns that the model came from PyTorch.
torch is an optional extra, so it is imported inside the function, never at module level.

Choices, and why:

* The TorchDynamo-based exporter (`torch.onnx.export(..., dynamo=True)`, the default in
  torch 2.13) is used with `f=None`, which returns an in-memory `ONNXProgram`; nothing is written
  to disk, so no plaintext copy of the weights ever lands in a file we would have to clean up.
* Dim 0 of every input is declared dynamic through `dynamic_shapes` with one shared
  `torch.export.Dim("batch")`: inputs of one model normally share their batch, and a shared
  symbol lets the model add or concatenate them without a constraint violation. Outputs become
  dynamic wherever torch's shape propagation ties them to that symbol.
* torch 2.13 writes IR version 10, which onnxruntime 1.31 (max IR 13) reads. A future exporter
  may write a newer IR; the IR is then lowered to 13 when the model's opsets allow it.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import onnx

from modelcloak.model.errors import ModelError

if TYPE_CHECKING:  # pragma: no cover - typing only; torch is an optional extra
    import torch

# The newest IR version onnxruntime 1.31 loads. IR versions are backward compatible within the
# limits of VERSION_TABLE, so an exporter stamping a newer IR can be lowered to this one.
_ORT_MAX_IR_VERSION = 13
# The newest ai.onnx opset onnxruntime 1.31 accepts; it refuses 27+ as "under development".
_ORT_MAX_OPSET = 26
# The lowest opset torchlib implements; lower targets go through onnx's version converter,
# which can fail and then leaves the model at this opset.
_TORCHLIB_MIN_OPSET = 18


def export_torch(
    module: torch.nn.Module,
    sample_input: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    opset: int | None = None,
) -> onnx.ModelProto:
    """Export `module` to an in-memory ONNX model with a dynamic batch axis.

    Args:
        module: the model; exported in eval mode (dropout off, BatchNorm on running stats).
            Its previous train/eval mode is restored afterwards.
        sample_input: one tensor, or a tuple of tensors for a multi-input module. Only the
            shapes (apart from dim 0) and dtypes matter; every tensor needs a dim 0 (batch).
        input_names, output_names: names for the graph's inputs and outputs; the exporter
            picks names when omitted.
        opset: ai.onnx opset to target; None takes the exporter's default (20 with torch 2.13).
            Opsets below 18 go through onnx's version converter and fail with a ModelError
            when it cannot convert the graph; onnxruntime 1.31 runs at most opset 26.

    Returns:
        A model that passes `onnx.checker.check_model(full_check=True)`, whose inputs and
        outputs have a symbolic dim 0 named "batch", and whose IR version onnxruntime loads.

    Raises:
        ModelError: torch is missing, the inputs are unusable, the exporter failed, or the
            result is not a valid model.
    """
    try:
        import torch
    except ImportError as exc:
        raise ModelError("PyTorch is not installed: pip install 'modelcloak[torch]'") from exc

    if not isinstance(module, torch.nn.Module):
        raise ModelError(f"export_torch needs a torch.nn.Module, got {type(module).__name__}")
    args = _as_input_tuple(torch, sample_input)
    if input_names is not None and len(input_names) != len(args):
        raise ModelError(f"{len(input_names)} input name(s) given for {len(args)} sample input(s)")
    if opset is not None and opset > _ORT_MAX_OPSET:
        raise ModelError(
            f"opset {opset} is newer than onnxruntime supports (max {_ORT_MAX_OPSET}); "
            f"pass opset={_ORT_MAX_OPSET} or lower"
        )

    # One symbol shared by every input: see the module docstring. min=1 so a batch of one is
    # allowed at run time; torch 2.13 does not specialise a traced batch of 1 when the
    # dimension is declared dynamic, so the sample's batch size does not matter.
    batch = torch.export.Dim("batch", min=1)
    dynamic_shapes = tuple({0: batch} for _ in args)

    was_training = module.training
    module.eval()
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                module,
                args,
                None,  # f=None: keep everything in memory, return an ONNXProgram
                input_names=input_names,
                output_names=output_names,
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                verbose=False,
            )
            if program is None:
                raise ModelError("torch.onnx.export returned no program")
            model = program.model_proto
    except ModelError:
        raise
    except Exception as exc:  # the exporter raises many unrelated types; keep the cause
        raise ModelError(f"torch.onnx.export failed for {type(module).__name__}: {exc}") from exc
    finally:
        module.train(was_training)

    if output_names is not None and len(output_names) != len(model.graph.output):
        raise ModelError(
            f"{len(output_names)} output name(s) given, but the model has {len(model.graph.output)} output(s)"
        )
    _check_opset(model, opset)
    _fit_ir_version(model)
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"the exported ONNX model is invalid: {exc}") from exc
    return model


def _as_input_tuple(torch: Any, sample_input: Any) -> tuple[Any, ...]:
    """Normalise the sample to a tuple of tensors that each have a batch dimension."""
    args = (sample_input,) if isinstance(sample_input, torch.Tensor) else sample_input
    if not isinstance(args, tuple) or not args:
        raise ModelError("sample_input must be a tensor or a non-empty tuple of tensors")
    for i, arg in enumerate(args):
        if not isinstance(arg, torch.Tensor):
            raise ModelError(f"sample input {i} is a {type(arg).__name__}, not a torch.Tensor")
        if arg.dim() == 0:
            raise ModelError(f"sample input {i} is a scalar; every input needs a batch dim 0")
    return args


def _ai_onnx_opset(model: onnx.ModelProto) -> int | None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return None


def _check_opset(model: onnx.ModelProto, requested: int | None) -> None:
    """Fail loudly when the exporter quietly kept another opset than the one asked for."""
    got = _ai_onnx_opset(model)
    if requested is not None and got != requested:
        raise ModelError(
            f"the exporter could not produce opset {requested} (it produced {got}); "
            f"use opset >= {_TORCHLIB_MIN_OPSET} or leave it unset"
        )


def _fit_ir_version(model: onnx.ModelProto) -> None:
    """Lower the IR version to what onnxruntime loads, when the model's opset allows it."""
    if model.ir_version <= _ORT_MAX_IR_VERSION:
        return
    opset = _ai_onnx_opset(model)
    # The lowest IR version released alongside this opset: a model may not claim an older IR
    # than the one its operator set was defined for.
    needed = min(
        (ir for _, ir, ai_onnx, *_ in onnx.helper.VERSION_TABLE if opset is None or ai_onnx >= opset),
        default=model.ir_version,
    )
    if needed > _ORT_MAX_IR_VERSION:
        raise ModelError(
            f"the exporter wrote IR version {model.ir_version} with opset {opset}, which "
            f"onnxruntime cannot load (max IR {_ORT_MAX_IR_VERSION}); pass a lower opset"
        )
    model.ir_version = _ORT_MAX_IR_VERSION


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence exporter chatter that says nothing about this model.

    The torchvision registration warnings (it is not installed and not needed), a pytree
    deprecation inside torch and the note that several inputs share the "batch" axis name
    would otherwise be printed on every export, e.g. in the middle of the demo's output.
    Warnings about the model itself still come through.
    """
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    previous_level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=r".*LeafSpec")
            warnings.filterwarnings("ignore", message=r".*axis name: .* will not be used")
            yield
    finally:
        registration.setLevel(previous_level)
