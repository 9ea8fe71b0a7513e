"""Soft lock: a fine-tuned model that is accurate in FP32 and useless once quantised.

Clifford et al., "Locking Machine Learning Models into Hardware" (arXiv 2405.20990), call a soft
lock a model that depends on the numeric representation the authorised hardware uses, so that
running it on cheaper hardware (INT8 or FP16 accelerators) gives a useless model. This module
builds one for models that run in FP32, and checks it on the real deployment path: the model is
exported to ONNX and quantised by onnxruntime's own tools, then run in onnxruntime.

The construction (docs/LOCK.md, "Soft lock", has the argument and the measurements):

1. **Lock site.** The first `Conv2d`/`Linear` -> `ReLU` in the model, followed (after optional
   `MaxPool2d`, `Flatten`, `Dropout`) by a `Conv2d`/`Linear` consumer.
2. **Constrained fine-tune.** The ReLU at the site is treated as the identity and the consumer's
   weights are constrained to have zero sum over its input channels (a parametrisation, so
   every optimiser step stays on the constraint). The model is fine-tuned with cross-entropy
   from its own weights until it is accurate again under that constraint.
3. **Offset.** A large constant C (a power of two) is added to the site's bias, and the
   producer is rescaled so every activation seen in training stays within C +- ulp_fp16(C) / 16.
   In exact arithmetic nothing changes: the ReLU sees values near C and passes them, max-pooling
   commutes with the shift, and the consumer's channel sums are zero, so C cancels, also at
   zero-padded borders. In FP32 the largest activation is still resolved in steps of 2**-9 of
   its size on top of C; what FP32 leaves of C times the consumer's sums is folded into its bias.
   Every deployment format whose grid at C is coarse destroys it:

   * FP16 rounds C + delta to C (its spacing at C is 16x the largest delta), and the consumer's
     weights are placed so that FP16 rounds each of them down: their FP16 sums are negative,
     and C times that sum is an input-independent error far larger than the signal;
   * INT8 (dynamic or static, per-tensor or per-channel weights) quantises activations per
     tensor over a range that always includes 0 (onnxruntime, like most toolchains, makes zero
     exactly representable), so the step is about C / 255, far wider than the signal.

   The consumer then sees the same constant for every input, and the quantised model gives the
   same answer for every input: chance accuracy on balanced data.

Only onnxruntime's CPU tooling is used: `onnxruntime.quantization` (`quantize_dynamic`,
`quantize_static` with a calibration reader) and `onnxruntime.transformers.float16`
(`convert_float_to_float16`), both shipped with onnxruntime, so no extra dependency is needed.
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from modelcloak.errors import ModelcloakError
from modelcloak.lock.errors import LockError

if TYPE_CHECKING:  # pragma: no cover - typing only; torch is an optional extra
    import torch
    from rich.console import Console

__all__ = [
    "DEFAULT_OFFSET_EXPONENT",
    "EXTRA_VARIANTS",
    "VARIANTS",
    "LockSite",
    "evaluate_variants",
    "find_lock_site",
    "lockable",
    "quantised_variants",
    "soft_lock",
]

# The deployment formats a soft lock must break ("fp32" is the authorised one).
VARIANTS = ("fp32", "fp16", "int8-dynamic", "int8-static")
# What an attacker would try next with the same tools: per-channel weights, the QOperator format
# with unsigned activations, and percentile calibration (which clips outliers of the range).
EXTRA_VARIANTS = (
    "int8-dynamic-per-channel",
    "int8-static-per-channel",
    "int8-static-qoperator",
    "int8-static-percentile",
)
# C = 2**14: FP16's spacing there is 16, FP32's 2**-9. 14 leaves one binade of FP16 headroom
# (the largest finite FP16 is 65504), and keeps the FP32 resolution well below the signal.
DEFAULT_OFFSET_EXPONENT = 14
_FP16_MANTISSA_BITS = 10
# Real activations at the site are scaled to at most this fraction of FP16's spacing at C: FP16
# has an 8x margin before any of them rounds away from C, and FP32 still resolves the largest in
# steps of 2**-9 of its size. Measured on MNIST (one seed) before the FP16 weight placement existed, FP32
# accuracy did not move between 1/4 and 1/64 while FP16 went 50% -> 11% -> 10% (1/4, 1/16, 1/64);
# with the placement (_round_down_in_fp16) FP16 is at chance for all three.
_DELTA_FRACTION_OF_FP16_ULP = 1 / 16
_CALIBRATION_BATCH = 64


@dataclass(frozen=True)
class LockSite:
    """Where the offset goes: indices into an `nn.Sequential`, or submodule names in a graph module."""

    producer: int | str  # the Conv2d/Linear whose bias carries the offset
    relu: int | str  # the ReLU right after it, which the offset keeps in its linear part
    consumer: int | str  # the Conv2d/Linear whose channel sums are held at zero


# --------------------------------------------------------------------------------------------
# Locking
# --------------------------------------------------------------------------------------------


def find_lock_site(model: torch.nn.Module) -> LockSite:
    """Find the first Conv2d/Linear -> ReLU -> (MaxPool2d|Flatten|Dropout)* -> Conv2d/Linear.

    In an `nn.Sequential` these are consecutive layers. In a `torch.fx.GraphModule` (an ONNX
    graph with branches, `modelcloak.lock.from_onnx_graph`, or any module `lockable` traced)
    they are a path on which every value has exactly one use, so the offset reaches the
    consumer and nothing else (not a residual Add or a Concat, which would not cancel it), and
    each module on it is called once. Raises LockError, naming what is missing, otherwise.
    """
    torch = _import_torch()
    model = lockable(model)
    if isinstance(model, torch.fx.GraphModule):
        return _graph_lock_site(model)
    nn = torch.nn
    linear_layers, pass_through = _linear_types(), _pass_types()
    layers = list(model)  # type: ignore[call-overload]  # a flat nn.Sequential here (lockable)
    for i in range(len(layers) - 2):
        producer = layers[i]
        if not isinstance(producer, linear_layers) or not isinstance(layers[i + 1], nn.ReLU):
            continue
        j = i + 2
        while j < len(layers) and isinstance(layers[j], pass_through):
            j += 1
        if j == len(layers) or not isinstance(layers[j], linear_layers):
            continue
        _check_site(producer, layers[j], f"layer {i}", f"layer {j}")
        return LockSite(producer=i, relu=i + 1, consumer=j)
    raise LockError(_NO_SITE)


def lockable(model: torch.nn.Module) -> torch.nn.Module:
    """`model` itself if it is a flat `nn.Sequential` or an fx.GraphModule, else its torch.fx trace.

    The trace keeps every leaf submodule (Conv2d, ReLU, ...) as a call, so a site found in it is
    a set of real submodules. It is made by torch's own `fuse`, which also folds each
    BatchNorm2d into the Conv2d before it, as inference computes it (so Conv -> BatchNorm ->
    ReLU can be a site). A model torch.fx cannot trace (data-dependent control flow) is refused
    with the tracer's reason.
    """
    torch = _import_torch()
    from torch.fx.experimental.optimization import fuse

    if not isinstance(model, torch.nn.Module):
        raise LockError(f"soft_lock needs a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.fx.GraphModule):
        return model
    if isinstance(model, torch.nn.Sequential) and not any(list(layer.children()) for layer in model):
        return model
    was_training = model.training
    try:
        traced = fuse(model.eval())
    except Exception as exc:  # the tracer raises assorted types for untraceable Python
        raise LockError(f"torch.fx cannot trace {type(model).__name__} to find a lock site: {exc}") from None
    finally:
        model.train(was_training)
    traced.train(was_training)
    return traced


_NO_SITE = (
    "the model has no Conv2d/Linear -> ReLU -> (MaxPool2d|Flatten|Dropout)* -> Conv2d/Linear run of layers "
    "(each value used once) for the soft lock"
)


def _linear_types() -> tuple[type, ...]:
    nn = _import_torch().nn
    return (nn.Conv2d, nn.Linear)


def _pass_types() -> tuple[type, ...]:
    # Layers that commute with adding the same constant to every channel (max-pooling pads with
    # -inf, so its borders do too); average pooling with zero padding would not.
    nn = _import_torch().nn
    return (nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.Identity)


def _check_site(producer: Any, consumer: Any, producer_label: str, consumer_label: str) -> None:
    torch = _import_torch()
    if producer.bias is None:
        raise LockError(f"{producer_label} ({type(producer).__name__}) has no bias to carry the soft-lock offset")
    if isinstance(consumer, torch.nn.Conv2d) and (consumer.groups != 1 or consumer.padding_mode != "zeros"):
        raise LockError(f"{consumer_label} (Conv2d) must have groups=1 and zero padding to be a soft-lock consumer")


def _graph_lock_site(model: Any) -> LockSite:
    nn = _import_torch().nn
    linear_layers, pass_through = _linear_types(), _pass_types()
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in model.graph.nodes if node.op == "call_module")

    def module(node: Any) -> Any:
        return modules.get(node.target) if node is not None and node.op == "call_module" else None

    def only_use(node: Any) -> Any:
        users = list(node.users)
        return users[0] if len(users) == 1 else None

    for node in model.graph.nodes:
        if not isinstance(module(node), linear_layers) or calls[node.target] != 1:
            continue
        relu = only_use(node)
        if not isinstance(module(relu), nn.ReLU) or calls[relu.target] != 1:
            continue
        step = only_use(relu)
        while isinstance(module(step), pass_through):
            step = only_use(step)
        if not isinstance(module(step), linear_layers) or calls[step.target] != 1:
            continue
        _check_site(module(node), module(step), f"layer {node.target!r}", f"layer {step.target!r}")
        return LockSite(producer=str(node.target), relu=str(relu.target), consumer=str(step.target))
    raise LockError(_NO_SITE)


def _submodule(model: Any, key: int | str) -> Any:
    return model[key] if isinstance(key, int) else model.get_submodule(key)


def _replace_submodule(model: Any, key: int | str, replacement: Any) -> None:
    if isinstance(key, int):
        model[key] = replacement
        return
    parent, _, leaf = key.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, replacement)


def soft_lock(
    model: torch.nn.Module,
    x_train: np.ndarray,
    y_train: np.ndarray,
    *,
    epochs: int = 3,
    lr: float = 1e-3,
    batch_size: int = 64,
    offset_exponent: int = DEFAULT_OFFSET_EXPONENT,
    seed: int = 0,
    progress: bool = True,
    console: Console | None = None,
) -> torch.nn.Module:
    """Return a soft-locked copy of `model`: accurate in FP32, at chance in INT8 and FP16.

    Args:
        model: a trained classifier with a lock site (see `find_lock_site`): an `nn.Sequential`,
            an fx.GraphModule (an ONNX graph rebuilt by `modelcloak.lock.from_onnx`), or a
            module torch.fx can trace. It is not modified; the result is a Sequential or a
            GraphModule.
        x_train, y_train: labelled training data for the constrained fine-tune; the largest
            activation at the lock site over `x_train` sets the producer's scale, so it should
            cover the input range the model will see.
        epochs, lr, batch_size, seed: the fine-tune (Adam, cross-entropy, deterministic per seed).
        offset_exponent: C = 2**offset_exponent, 8 to 14. The lock is scale-free (activations
            are rescaled to at most C / 2**14), so C only has to keep everything in FP16's normal
            range: above 2**14 the site's FP16 values come near its largest finite value.
        progress, console: a rich progress bar over the fine-tune.

    Returns:
        A new module of the same architecture, in eval mode.

    Raises:
        LockError: the model has no lock site, the data are unusable, or the exponent is out of range.
    """
    torch = _import_torch()
    from torch.nn.utils import parametrize

    from modelcloak.training import train_classifier

    if not 8 <= offset_exponent <= 14:
        raise LockError(f"offset_exponent must be between 8 and 14, got {offset_exponent}")
    site = find_lock_site(model)
    x = np.ascontiguousarray(x_train, dtype=np.float32)
    y = np.asarray(y_train)
    if len(x) == 0 or len(x) != len(y):
        raise LockError(f"x_train and y_train must be non-empty and equally long: {len(x)} vs {len(y)}")
    if not np.isfinite(x).all():
        raise LockError("x_train holds NaN or infinite values")

    locked = copy.deepcopy(lockable(model))
    producer, consumer = _submodule(locked, site.producer), _submodule(locked, site.consumer)
    # Fine-tune in clean coordinates: no offset yet, the site's ReLU already the identity it will
    # be once the offset keeps its input positive, and the consumer on its constraint.
    relu = _submodule(locked, site.relu)
    _replace_submodule(locked, site.relu, torch.nn.Identity())
    with torch.no_grad():
        consumer.weight.copy_(_zero_channel_sum(consumer.weight))
    parametrize.register_parametrization(consumer, "weight", _zero_channel_sum_parametrisation())
    try:
        train_classifier(
            locked, x, y, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, progress=progress, console=console
        )
    except ModelcloakError as exc:
        raise LockError(f"the soft-lock fine-tune failed: {exc}") from exc
    finally:
        parametrize.remove_parametrizations(consumer, "weight", leave_parametrized=True)
        _replace_submodule(locked, site.relu, relu)

    offset = float(2**offset_exponent)
    largest = _largest_activation(locked, producer, x)
    if not math.isfinite(largest):
        raise LockError("the fine-tuned model's activations at the lock site are not finite; lower lr or epochs")
    target = _DELTA_FRACTION_OF_FP16_ULP * 2.0 ** (offset_exponent - _FP16_MANTISSA_BITS)
    scale = target / largest if largest > 0 else 1.0
    with torch.no_grad():
        # Exact in real arithmetic: the site is linear up to the consumer (identity ReLU, max-pool
        # commutes with positive scaling), so the consumer undoes the producer's scale.
        producer.weight.mul_(scale)
        producer.bias.mul_(scale)
        consumer.weight.div_(scale)
        weight = _round_down_in_fp16(consumer.weight.detach().double().numpy())
        consumer.weight.copy_(torch.from_numpy(weight))
        if consumer.bias is not None:
            # What FP32 leaves of the zero sums, times C, is a constant: fold it into the bias.
            residual = consumer.weight.detach().double().sum(dim=tuple(range(1, consumer.weight.dim())))
            consumer.bias.sub_((offset * residual).to(consumer.bias.dtype))
        producer.bias.add_(offset)
    locked.eval()
    return locked


def _round_down_in_fp16(weight: np.ndarray) -> np.ndarray:
    """Move each weight by less than half an FP16 step so FP16 rounds every one of them down.

    Per output unit and kernel tap, the weights over input channels keep a zero sum (exactly,
    before the final float32 cast), but each sits 0.4-0.5 of an FP16 step above the FP16 value
    it rounds to. The FP16 copy of the group then sums to about -0.45 of the group's FP16 steps
    instead of 0, and multiplied by C that is an input-independent negative term far larger than
    the signal: on FP16 the consumer's units are pushed below zero whether or not the runtime
    also rounds the activations (onnxruntime's CPU provider computes some FP16 nodes in FP32 on
    FP16 weights). Each weight moves by at most about 1.5 FP16 steps (~0.15% of its size).
    """
    groups = np.moveaxis(weight, 1, -1).reshape(-1, weight.shape[1]).copy()
    for row in groups:
        grid = row.astype(np.float16)
        grid = np.where(grid.astype(np.float64) > row, np.nextafter(grid, np.float16(-np.inf)), grid)
        step = np.nextafter(grid, np.float16(np.inf)).astype(np.float64) - grid.astype(np.float64)
        if not np.isfinite(step).all():  # beyond FP16's range: FP16 fails on its own there
            continue
        base = grid.astype(np.float64)
        # slack: what the FP16 floors leave of the zero sum; each weight may take up to half a step
        goal = 0.47 * step.sum()
        slack = -base.sum()
        for k in np.argsort(step):  # finest steps first: the smallest moves of the sum
            if slack <= goal:
                break
            base[k] += step[k]
            slack -= step[k]
        for k in np.argsort(step):
            if slack + step[k] > goal:
                break
            base[k] -= step[k]
            slack += step[k]
        if not 0 < slack < 0.5 * step.sum():  # e.g. a group of all-zero weights: leave it
            continue
        row[:] = base + step * (slack / step.sum())
    return np.moveaxis(groups.reshape(np.moveaxis(weight, 1, -1).shape), -1, 1)


def _zero_channel_sum_parametrisation() -> torch.nn.Module:
    """A parametrisation module: the weight with its mean over input channels (dim 1) removed."""
    torch = _import_torch()

    module_base: Any = torch.nn.Module  # torch is a local here (optional extra)

    class ZeroChannelSum(module_base):
        def forward(self, weight: Any) -> Any:
            return _zero_channel_sum(weight)

    return ZeroChannelSum()


def _zero_channel_sum(weight: torch.Tensor) -> torch.Tensor:
    # Zero sum over input channels for every output and kernel tap: a constant added to every
    # input channel then contributes nothing at any position, including zero-padded borders.
    return weight - weight.mean(dim=1, keepdim=True)


def _largest_activation(model: torch.nn.Module, layer: torch.nn.Module, x: np.ndarray, batch_size: int = 256) -> float:
    """The largest |output| of `layer` (a submodule of `model`) over the inputs `x`."""
    torch = _import_torch()
    largest = [0.0]

    def record(_module: Any, _inputs: Any, output: Any) -> None:
        largest[0] = max(largest[0], float(output.abs().max()))

    hook = layer.register_forward_hook(record)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                model(torch.from_numpy(x[i : i + batch_size]))
    finally:
        hook.remove()
        model.train(was_training)
    return largest[0]


# --------------------------------------------------------------------------------------------
# Deployment variants and their accuracy
# --------------------------------------------------------------------------------------------


def quantised_variants(
    onnx_model: onnx.ModelProto,
    calibration: np.ndarray,
    *,
    extra: bool = False,
    refused: dict[str, str] | None = None,
) -> dict[str, onnx.ModelProto]:
    """The model as onnxruntime's own tools would deploy it on FP16 or INT8 hardware.

    Keys are `VARIANTS` (and `EXTRA_VARIANTS` with `extra=True`):

    * ``fp32``: the model unchanged.
    * ``fp16``: `onnxruntime.transformers.float16.convert_float_to_float16`, inputs and outputs
      kept float32 so the same data can be fed.
    * ``int8-dynamic``: `quantize_dynamic` with its defaults (int8 symmetric per-tensor weights,
      uint8 activations ranged at run time; Conv, MatMul, and Gemm rewritten as MatMul).
    * ``int8-static``: `quantize_static` with its defaults (QDQ format, int8 activations and
      weights, per-tensor, MinMax ranges over `calibration`).
    * extra: ``int8-dynamic-per-channel``, ``int8-static-per-channel``, ``int8-static-qoperator``
      (QOperator format, uint8 activations) and ``int8-static-percentile`` (ranges at the
      99.999th percentile, which clips outliers).

    A variant onnxruntime cannot build raises LockError naming it, except that with a `refused`
    dict the extra variants' failures are recorded there (name -> reason) and left out: a
    quantiser that refuses the locked model is a measurement too (the percentile calibrator
    cannot histogram the locked site's narrow range far from zero).

    `calibration` is a batch of model inputs (float32, the model's single input). The quantisers
    work on files, so the model passes through a private temporary directory that is removed
    afterwards; do not call this on weights that must never reach disk.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.transformers.float16 import convert_float_to_float16

    if not isinstance(onnx_model, onnx.ModelProto):
        raise LockError(f"quantised_variants needs an onnx.ModelProto, got {type(onnx_model).__name__}")
    if len(onnx_model.graph.input) != 1:
        raise LockError(f"quantised_variants handles single-input models; this one has {len(onnx_model.graph.input)}")
    calibration = np.asarray(calibration)
    if calibration.ndim < 2 or len(calibration) == 0 or calibration.dtype.kind != "f":
        raise LockError(f"calibration must be a non-empty float batch of model inputs, got shape {calibration.shape}")
    calibration = np.ascontiguousarray(calibration, dtype=np.float32)
    input_name = onnx_model.graph.input[0].name

    variants: dict[str, onnx.ModelProto] = {"fp32": onnx_model}
    with tempfile.TemporaryDirectory(prefix="modelcloak-soft-") as tmp:
        work = Path(tmp)
        source = work / "fp32.onnx"
        # Without the value_info annotations: quantize_dynamic rewrites Gemm as MatMul, and
        # shape inference then trips over the exporter's recorded shapes (onnxruntime 1.31).
        # They are hints only; the quantisers infer shapes again.
        bare = copy.deepcopy(onnx_model)
        del bare.graph.value_info[:]
        onnx.save(bare, source)

        def fp16() -> onnx.ModelProto:
            return convert_float_to_float16(copy.deepcopy(onnx_model), keep_io_types=True)

        def dynamic(name: str, **options: Any) -> Callable[[], onnx.ModelProto]:
            def build() -> onnx.ModelProto:
                quantize_dynamic(source, work / f"{name}.onnx", **options)
                return onnx.load(work / f"{name}.onnx")

            return build

        def static(name: str, **options: Any) -> Callable[[], onnx.ModelProto]:
            def build() -> onnx.ModelProto:
                reader = _array_calibration_reader(input_name, calibration)
                quantize_static(source, work / f"{name}.onnx", reader, **options)
                return onnx.load(work / f"{name}.onnx")

            return build

        builders: dict[str, Callable[[], onnx.ModelProto]] = {
            "fp16": fp16,
            "int8-dynamic": dynamic("int8-dynamic"),
            "int8-static": static("int8-static"),
        }
        if extra:
            builders |= {
                "int8-dynamic-per-channel": dynamic("int8-dynamic-per-channel", per_channel=True),
                "int8-static-per-channel": static("int8-static-per-channel", per_channel=True),
                "int8-static-qoperator": static(
                    "int8-static-qoperator", quant_format=QuantFormat.QOperator, activation_type=QuantType.QUInt8
                ),
                "int8-static-percentile": static(
                    "int8-static-percentile",
                    calibrate_method=CalibrationMethod.Percentile,
                    extra_options={"CalibPercentile": 99.999},
                ),
            }
        for name, build in builders.items():
            try:
                variants[name] = build()
            except Exception as exc:  # onnxruntime's tools raise assorted types; keep the cause
                if name in VARIANTS or refused is None:
                    raise LockError(f"onnxruntime could not build the {name} variant: {exc}") from exc
                refused[name] = f"{type(exc).__name__}: {exc}"
    return variants


def evaluate_variants(
    variants: Mapping[str, onnx.ModelProto],
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = 256,
    threads: int = 1,
) -> dict[str, float]:
    """Top-1 accuracy of each variant, run in onnxruntime on the CPU.

    An output row with NaN or infinity counts as wrong, whatever arg-max would pick from it:
    a deployment that overflows is not an accurate one.
    """
    import onnxruntime as ort

    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.asarray(y)
    if len(x) == 0 or len(x) != len(y):
        raise LockError(f"x and y must be non-empty and equally long: {len(x)} vs {len(y)}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    results: dict[str, float] = {}
    for name, model in variants.items():
        try:
            session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            input_name = session.get_inputs()[0].name
            correct = 0
            for i in range(0, len(x), batch_size):
                logits = np.asarray(session.run(None, {input_name: x[i : i + batch_size]})[0], dtype=np.float64)
                finite = np.isfinite(logits).all(axis=1)
                correct += int(np.sum(finite & (np.argmax(logits, axis=1) == y[i : i + batch_size])))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise LockError(f"variant {name!r} could not be run in onnxruntime: {exc}") from exc
        results[name] = correct / len(x)
    return results


def _array_calibration_reader(input_name: str, data: np.ndarray) -> Any:
    """A `CalibrationDataReader` over an in-memory batch, served in slices."""
    from onnxruntime.quantization import CalibrationDataReader

    # Equal batches: the histogram calibrators (percentile, entropy) stack the batches' outputs
    # and fail on a short last batch, so use the largest divisor of the set's size that fits.
    size = max(b for b in range(1, min(_CALIBRATION_BATCH, len(data)) + 1) if len(data) % b == 0)

    class ArrayCalibrationReader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches: Iterator[dict[str, np.ndarray]] = iter(
                {input_name: data[i : i + size]} for i in range(0, len(data), size)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    return ArrayCalibrationReader()


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise LockError("PyTorch is not installed: pip install 'modelcloak[torch]'") from exc
    return torch
