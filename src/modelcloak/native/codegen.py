"""Private ONNX part -> model.c for the native enclave (docs/NATIVE.md).

The generator walks the private part's nodes in order and writes one C statement (or loop) per
node into `mc_run`, with every tensor a static buffer of `mc_tile` samples. Shapes are inferred
twice, at batch 1 and 2, so that every activation is proven to keep the batch axis first and to
have a fixed per-sample shape; the program then runs sample tiles independently. Weights are not
written into the C file: `mc_prepare` copies them at LOAD from the decrypted section at the
offsets found by `protobuf.float_tensor_offsets`, packing dense weights into the kernel's panel
layout on the way. An op outside the supported set raises NativeError naming it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from modelcloak.native.errors import NativeError
from modelcloak.native.protobuf import float_tensor_offsets

MAX_TILE = 64
ACTIVATION_BUDGET_BYTES = 64 << 20  # activations of one tile, all buffers together
MAX_IO = 64

# Elementwise ops as C expressions of `v` (unary) or `a`, `b` (binary).
UNARY: dict[str, Callable[[onnx.NodeProto], str]] = {
    "Relu": lambda n: "v > 0.f ? v : 0.f",
    "Sigmoid": lambda n: "1.f / (1.f + expf(-v))",
    "Tanh": lambda n: "tanhf(v)",
    "Exp": lambda n: "expf(v)",
    "Erf": lambda n: "erff(v)",
    "Sqrt": lambda n: "sqrtf(v)",
    "Neg": lambda n: "-v",
    "Abs": lambda n: "fabsf(v)",
    "LeakyRelu": lambda n: f"v >= 0.f ? v : {_attr(n, 'alpha', 0.01)!r}f * v",
    "Softplus": lambda n: "v > 20.f ? v : log1pf(expf(v))",
    "HardSigmoid": lambda n: f"fminf(1.f, fmaxf(0.f, {_attr(n, 'alpha', 0.2)!r}f * v + {_attr(n, 'beta', 0.5)!r}f))",
    "HardSwish": lambda n: "v * fminf(1.f, fmaxf(0.f, v / 6.f + 0.5f))",
    "Gelu": lambda n: (
        "0.5f * v * (1.f + tanhf(0.7978845608f * (v + 0.044715f * v * v * v)))"
        if _attr(n, "approximate", b"none") in (b"tanh", "tanh")
        else "0.5f * v * (1.f + erff(v * 0.70710678118654752f))"
    ),
}
BINARY = {"Add": "a + b", "Sub": "a - b", "Mul": "a * b", "Div": "a / b", "Max": "fmaxf(a, b)", "Min": "fminf(a, b)"}
ALIASES = {"Reshape", "Flatten", "Identity", "Squeeze", "Unsqueeze", "Dropout"}
WINDOWED = {"Conv", "MaxPool", "AveragePool"}
REDUCE = {"ReduceMean": 0, "ReduceMax": 1, "ReduceSum": 2, "GlobalAveragePool": 0, "GlobalMaxPool": 1}
SUPPORTED = sorted(
    {"Gemm", "MatMul", "Softmax", "Clip", "Constant", "BatchNormalization", "Concat", "Transpose"}
    | {"LayerNormalization", "Gather"}
    | set(UNARY)
    | set(BINARY)
    | ALIASES
    | WINDOWED
    | set(REDUCE)
)


def _attr(node: onnx.NodeProto, name: str, default):  # noqa: ANN001, ANN202 - ONNX attribute values vary
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _c_float(value: float) -> str:
    if math.isinf(value):
        return "INFINITY" if value > 0 else "-INFINITY"
    return f"{float(np.float32(value))!r}f"


@dataclass
class _Tensor:
    """An activation: a per-sample shape and the C buffer holding `mc_tile` samples of it."""

    shape: tuple[int, ...]
    buffer: str

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass
class Program:
    """What the C file is made of; `source` is the text of model.c."""

    inputs: list[tuple[str, tuple[int, ...], int]]  # name, per-sample shape, fixed batch (-1 dynamic)
    outputs: list[tuple[str, tuple[int, ...]]]
    tile: int
    ops: list[str] = field(default_factory=list)
    source: str = ""


def check_supported(model: onnx.ModelProto) -> None:
    """Refuse, naming it, the first op of `model` that the native enclave does not implement."""
    for index, node in enumerate(model.graph.node):
        if node.domain not in ("", "ai.onnx"):
            raise NativeError(f"the native enclave does not implement op {node.domain}.{node.op_type} (node {index})")
        if node.op_type not in SUPPORTED:
            raise NativeError(
                f"the native enclave does not implement ONNX op {node.op_type!r} (node {index} of the private part); "
                "move the cut or use the Python enclave"
            )


def _with_batch(model: onnx.ModelProto, batch: int) -> dict[str, tuple[int, ...]]:
    """Static shapes of every tensor with the batch axis of every input set to `batch`."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.value_info[:]
    initializers = {t.name for t in copy.graph.initializer}
    for value in copy.graph.input:
        if value.name not in initializers:
            value.type.tensor_type.shape.dim[0].Clear()
            value.type.tensor_type.shape.dim[0].dim_value = batch
    for value in copy.graph.output:
        if value.type.tensor_type.shape.dim:
            value.type.tensor_type.shape.dim[0].Clear()
    try:
        inferred = onnx.shape_inference.infer_shapes(copy, strict_mode=True, data_prop=True)
    except Exception as exc:  # onnx raises several types; the first line is what the owner can act on
        raise NativeError(f"cannot infer the private part's shapes: {str(exc).splitlines()[0]}") from None
    shapes: dict[str, tuple[int, ...]] = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if value.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(int(d.dim_value) for d in dims)
    return shapes


class _Generator:
    def __init__(self, model_bytes: bytes) -> None:
        self.model_bytes = model_bytes
        self.model = onnx.load_from_string(model_bytes)
        check_supported(self.model)
        self.opset = next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.offsets = float_tensor_offsets(model_bytes)
        self.consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in self.model.graph.initializer}
        for node in self.model.graph.node:
            if node.op_type == "Constant":
                value = _attr(node, "value", None)
                if value is None:
                    raise NativeError("the native enclave supports Constant nodes with a tensor 'value' only")
                self.consts[node.output[0]] = numpy_helper.to_array(value)
        self.acts: dict[str, _Tensor] = {}
        self.buffers: list[tuple[str, int]] = []  # name, floats per sample
        self.weights: dict[str, tuple[str, int]] = {}  # ONNX name -> (C array, floats)
        self.arrays: list[tuple[str, int]] = []  # resident weight arrays: name, floats
        self.prepare: list[str] = []
        self.run: list[tuple[str, str]] = []  # (op type, C statement)
        self.ops: list[str] = []
        self.stage = 0  # largest weight staged for packing, in floats
        self.col = 0  # largest im2col matrix, in floats
        self.tail = 0  # largest last partial panel of a convolution's GEMM, in floats
        self.globals: list[str] = []  # static C definitions (window geometries)
        self.folded: set[str] = set()  # BatchNormalization outputs folded into their Conv
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.model.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self._plan_shapes(model_bytes)

    # -- shapes ------------------------------------------------------------------------------

    def _plan_shapes(self, model_bytes: bytes) -> None:
        graph = self.model.graph
        initializers = {t.name for t in graph.initializer}
        self.inputs = [v for v in graph.input if v.name not in initializers]
        if not self.inputs or len(self.inputs) > MAX_IO or len(graph.output) > MAX_IO:
            raise NativeError(f"the private part must have 1..{MAX_IO} inputs and outputs")
        fixed = set()
        for value in self.inputs:
            tensor = value.type.tensor_type
            if tensor.elem_type != onnx.TensorProto.FLOAT:
                raise NativeError(f"private input {value.name!r} is not float32; the native enclave takes float32 only")
            if not tensor.shape.dim:
                raise NativeError(f"private input {value.name!r} has no batch axis")
            first = tensor.shape.dim[0]
            fixed.add(int(first.dim_value) if first.HasField("dim_value") else -1)
        if fixed - {-1, 1} or len(fixed) > 1:
            raise NativeError("the private part's inputs must share a dynamic (or size-1) batch axis")
        self.fixed_batch = fixed.pop()
        one = _with_batch(self.model, 1)
        two = _with_batch(self.model, 2) if self.fixed_batch == -1 else None
        self.per_sample: dict[str, tuple[int, ...] | None] = {}
        for name, shape in one.items():
            keeps_batch = bool(shape) and shape[0] == 1 and (two is None or two.get(name) == (2, *shape[1:]))
            self.per_sample[name] = shape[1:] if keeps_batch else None

    def shape(self, name: str, node: onnx.NodeProto) -> tuple[int, ...]:
        if name not in self.per_sample:
            raise NativeError(f"cannot infer a static shape for an output of {node.op_type} in the private part")
        shape = self.per_sample[name]
        if shape is None:
            raise NativeError(
                f"an output of {node.op_type} does not keep the batch axis first; the native enclave runs samples "
                "independently"
            )
        return shape

    # -- tensors -----------------------------------------------------------------------------

    def new_act(self, name: str, shape: tuple[int, ...]) -> _Tensor:
        buffer = f"A{len(self.buffers)}"
        self.buffers.append((buffer, max(1, math.prod(shape))))
        tensor = _Tensor(shape, buffer)
        self.acts[name] = tensor
        return tensor

    def act(self, name: str, node: onnx.NodeProto) -> _Tensor:
        if name not in self.acts:
            if name in self.consts:
                raise NativeError(f"{node.op_type} on constants only is not supported by the native enclave")
            raise NativeError(f"{node.op_type} reads {name!r}, which nothing before it produces")
        return self.acts[name]

    def weight(self, name: str, node: onnx.NodeProto) -> tuple[str, np.ndarray]:
        """A float constant copied as is into a resident array."""
        value = self.consts[name]
        if value.dtype != np.float32:
            raise NativeError(f"{node.op_type} uses a {value.dtype} constant; the native enclave computes in float32")
        if name not in self.weights:
            array = f"W{len(self.arrays)}"
            self.arrays.append((array, max(1, value.size)))
            self.weights[name] = (array, value.size)
            if value.size:
                self.prepare.append(f"memcpy({array}, {self.source(name, value)}, {value.size * 4});")
        return self.weights[name][0], value

    def source(self, name: str, value: np.ndarray) -> str:
        """C expression for the plaintext bytes of constant `name` (checked against the parsed value)."""
        if name not in self.offsets:
            raise NativeError(f"cannot locate the bytes of constant {name!r} in the private part")
        offset, length = self.offsets[name]
        if length != value.size * 4 or not np.array_equal(
            np.frombuffer(self.model_bytes[offset : offset + length], "<f4"), value.reshape(-1), equal_nan=True
        ):
            raise NativeError(f"the bytes of constant {name!r} are not where the protobuf walk found them")
        return f"mc_plain + {offset}"

    # -- op lowering ---------------------------------------------------------------------------

    def emit(self, node: onnx.NodeProto, statement: str) -> None:
        self.run.append((node.op_type, statement))

    def lower(self, node: onnx.NodeProto) -> None:
        op = node.op_type
        if op == "Constant":
            return
        self.ops.append(op)
        if op in ALIASES:
            self.alias(node)
        elif op in UNARY or op == "Clip":
            self.unary(node)
        elif op in BINARY:
            self.binary(node)
        elif op in ("Gemm", "MatMul"):
            self.dense(node)
        elif op == "Softmax":
            self.softmax(node)
        elif op == "Conv":
            self.conv(node)
        elif op in ("MaxPool", "AveragePool"):
            self.pool(node)
        elif op in REDUCE:
            self.reduce(node)
        elif op == "BatchNormalization":
            self.batch_norm(node)
        elif op == "Concat":
            self.concat(node)
        elif op == "Transpose":
            self.transpose(node)
        elif op == "LayerNormalization":
            self.layer_norm(node)
        elif op == "Gather":
            self.gather(node)
        else:  # check_supported keeps this unreachable
            raise NativeError(f"the native enclave does not implement ONNX op {op!r}")

    def alias(self, node: onnx.NodeProto) -> None:
        source = self.act(node.input[0], node)
        if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1]:
            raise NativeError("Dropout's mask output is not supported by the native enclave")
        shape = self.shape(node.output[0], node)
        if math.prod(shape) != source.size:
            raise NativeError(f"{node.op_type} changes the per-sample size; the native enclave cannot run it")
        self.acts[node.output[0]] = _Tensor(shape, source.buffer)

    def unary(self, node: onnx.NodeProto) -> None:
        x = self.act(node.input[0], node)
        out = self.new_act(node.output[0], self.shape(node.output[0], node))
        if node.op_type == "Clip":
            low, high = _attr(node, "min", -math.inf), _attr(node, "max", math.inf)
            for position, name in ((1, "low"), (2, "high")):
                if len(node.input) > position and node.input[position]:
                    if node.input[position] not in self.consts:
                        raise NativeError("Clip with computed bounds is not supported by the native enclave")
                    bound = float(self.consts[node.input[position]].reshape(-1)[0])
                    low, high = (bound, high) if name == "low" else (low, bound)
            expr = f"fminf(fmaxf(v, {_c_float(low)}), {_c_float(high)})"
        else:
            expr = UNARY[node.op_type](node)
        self.emit(
            node,
            f"for (size_t i = 0; i < (size_t)n * {x.size}; i++) "
            f"{{ float v = {x.buffer}[i]; {out.buffer}[i] = {expr}; }}",
        )

    def _operand(self, name: str, node: onnx.NodeProto, rank: int) -> tuple[str, list[int], list[int], bool]:
        """(C array, dims aligned to the output rank incl. batch, strides, is activation)."""
        if name in self.consts:
            array, value = self.weight(name, node)
            dims = [1] * (rank - value.ndim) + list(value.shape)
            if len(dims) > rank:
                raise NativeError(f"{node.op_type} broadcasts a constant over the batch axis")
            is_act = False
        else:
            tensor = self.act(name, node)
            array, dims, is_act = tensor.buffer, [0, *([1] * (rank - 1 - len(tensor.shape))), *tensor.shape], True
        strides, step = [0] * rank, 1
        for axis in range(rank - 1, -1, -1):
            strides[axis] = step if dims[axis] != 1 else 0
            step *= max(dims[axis], 1)
        return array, dims, strides, is_act

    def binary(self, node: onnx.NodeProto) -> None:
        shape = self.shape(node.output[0], node)
        rank = len(shape) + 1
        operands = [self._operand(name, node, rank) for name in node.input[:2]]
        if not any(is_act for *_, is_act in operands):
            raise NativeError(f"{node.op_type} on constants only is not supported by the native enclave")
        out = self.new_act(node.output[0], shape)
        size = out.size
        expr = BINARY[node.op_type]
        full = [0, *shape]
        loads = []
        for array, dims, _, is_act in operands:
            trailing = math.prod(d for d in dims[1:] if d) if dims[1:] else 1
            if is_act and list(dims[1:]) == list(shape):
                loads.append(f"{array}[i]")
            elif all(d == 1 for d in dims):
                loads.append(f"{array}[0]")
            elif not is_act and self._is_suffix(dims, full):
                loads.append(f"{array}[i % {trailing}]")
            else:
                loads = []
                break
        if loads:
            self.emit(
                node,
                f"for (size_t i = 0; i < (size_t)n * {size}; i++) {{ float a = {loads[0]}, b = {loads[1]}; "
                f"{out.buffer}[i] = {expr}; }}",
            )
            return
        (a, _, sa, act_a), (b, _, sb, act_b) = operands
        sa[0] = math.prod(self.acts[node.input[0]].shape) if act_a else 0
        sb[0] = math.prod(self.acts[node.input[1]].shape) if act_b else 0
        self.emit(
            node,
            f"{{ const int64_t d[] = {{n, {', '.join(map(str, shape))}}}, sa[] = {{{', '.join(map(str, sa))}}}, "
            f"sb[] = {{{', '.join(map(str, sb))}}}; MC_BROADCAST({rank}, d, sa, sb, "
            f"{{ float a = {a}[ia], b = {b}[ib]; {out.buffer}[io] = {expr}; }}); }}",
        )

    @staticmethod
    def _is_suffix(dims: Sequence[int], full: Sequence[int]) -> bool:
        """A constant whose non-1 dims equal the output's trailing dims: it repeats every block."""
        first = next((axis for axis, d in enumerate(dims) if d != 1), len(dims))
        return list(dims[first:]) == list(full[first:]) and first > 0

    def dense(self, node: onnx.NodeProto) -> None:
        if node.input[0] in self.consts:
            raise NativeError(f"{node.op_type} with a constant left side is not supported by the native enclave")
        if node.op_type == "MatMul" and node.input[1] not in self.consts:
            self.matmul(node)
            return
        x = self.act(node.input[0], node)
        if node.input[1] not in self.consts:
            raise NativeError(f"{node.op_type} with a computed weight is not supported by the native enclave")
        _, w = self.weight_value(node.input[1], node)
        alpha, beta = 1.0, 1.0
        transposed = False
        if node.op_type == "Gemm":
            if _attr(node, "transA", 0):
                raise NativeError("Gemm with transA=1 on the activation is not supported by the native enclave")
            transposed = bool(_attr(node, "transB", 0))
            alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
        if w.ndim != 2:
            raise NativeError(f"{node.op_type} with a {w.ndim}-D weight is not supported by the native enclave")
        k, m = (w.shape[1], w.shape[0]) if transposed else w.shape
        if x.shape[-1:] != (k,):
            raise NativeError(f"{node.op_type}'s input does not end in the weight's {k} features")
        rows = x.size // k
        packed = f"P{len(self.arrays)}"
        self.arrays.append((packed, int(math.ceil(m / 16)) * 16 * k))
        self.stage = max(self.stage, w.size)
        self.prepare.append(f"memcpy(mc_stage, {self.source(node.input[1], w)}, {w.size * 4});")
        self.prepare.append(f"mc_pack({packed}, mc_stage, {k}, {m}, {int(transposed)}, {_c_float(alpha)});")
        bias = "NULL"
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            if node.input[2] not in self.consts:
                raise NativeError("Gemm with a computed C input is not supported by the native enclave")
            c = self.consts[node.input[2]]
            if c.size not in (1, m) or (c.ndim == 2 and c.shape[0] != 1):
                raise NativeError("Gemm's C must broadcast along the output features for the native enclave")
            bias = f"B{len(self.arrays)}"
            self.arrays.append((bias, m))
            self.stage = max(self.stage, c.size)
            self.prepare.append(f"memcpy(mc_stage, {self.source(node.input[2], c)}, {c.size * 4});")
            self.prepare.append(
                f"for (int j = 0; j < {m}; j++) {bias}[j] = {_c_float(beta)} * mc_stage[{0 if c.size == 1 else 'j'}];"
            )
        out = self.new_act(node.output[0], self.shape(node.output[0], node))
        if out.size != rows * m:
            raise NativeError(f"{node.op_type}'s output shape does not match its weight")
        self.emit(node, f"mc_gemm(n * {rows}, {k}, {m}, {x.buffer}, {k}, {packed}, {bias}, NULL, {out.buffer}, {m});")

    def matmul(self, node: onnx.NodeProto) -> None:
        """MatMul of two activations (attention's Q K^T and P V): one GEMM per sample and leading index."""
        a, b = self.act(node.input[0], node), self.act(node.input[1], node)
        if len(a.shape) < 2 or len(b.shape) < 2:
            raise NativeError(
                "MatMul of computed tensors needs both of rank 2 or more per sample in the native enclave"
            )
        (m, k), (k2, cols) = a.shape[-2:], b.shape[-2:]
        shape = self.shape(node.output[0], node)
        if k != k2 or shape[-2:] != (m, cols):
            raise NativeError("MatMul's inputs do not agree on their inner dimension")
        count = math.prod(shape[:-2])
        steps = []
        for operand in (a, b):
            lead = math.prod(operand.shape[:-2])
            if lead == 1:
                steps.append(0)
            elif lead == count and tuple(operand.shape[:-2]) == tuple(shape[-2 - len(operand.shape[:-2]) : -2]):
                steps.append(math.prod(operand.shape[-2:]))
            else:
                raise NativeError(
                    "MatMul of computed tensors with a partial broadcast is not supported by the native enclave"
                )
        out = self.new_act(node.output[0], shape)
        self.tail = max(self.tail, k * 16)
        self.emit(
            node,
            f"for (int s = 0; s < n; s++) for (int i = 0; i < {count}; i++) "
            f"mc_gemm_rows({m}, {k}, {cols}, {a.buffer} + (size_t)s * {a.size} + (size_t)i * {steps[0]}, {k}, "
            f"{b.buffer} + (size_t)s * {b.size} + (size_t)i * {steps[1]}, {cols}, NULL, mc_tail, "
            f"{out.buffer} + (size_t)s * {out.size} + (size_t)i * {m * cols}, {cols});",
        )

    def layer_norm(self, node: onnx.NodeProto) -> None:
        x = self.act(node.input[0], node)
        if len([o for o in node.output if o]) > 1:
            raise NativeError("LayerNormalization's Mean and InvStdDev outputs are not supported by the native enclave")
        full = len(x.shape) + 1
        axis = int(_attr(node, "axis", -1))
        axis = axis + full if axis < 0 else axis
        if axis == 0:
            raise NativeError("LayerNormalization over the batch axis is not supported by the native enclave")
        length = math.prod(x.shape[axis - 1 :])
        arrays = []
        for name in node.input[1:3]:
            if not name:
                continue
            if name not in self.consts:
                raise NativeError(
                    "LayerNormalization with a computed scale or bias is not supported by the native enclave"
                )
            if self.consts[name].size != length:
                raise NativeError("LayerNormalization's scale and bias must hold one value per normalised element")
            arrays.append(self.weight(name, node)[0])
        scale, bias = arrays[0], (arrays[1] if len(arrays) > 1 else "NULL")
        out = self.new_act(node.output[0], self.shape(node.output[0], node))
        epsilon = _c_float(float(_attr(node, "epsilon", 1e-5)))
        self.emit(
            node,
            f"mc_layernorm((size_t)n * {x.size // length}, {length}, {epsilon}, {scale}, {bias}, "
            f"{x.buffer}, {out.buffer});",
        )

    def gather(self, node: onnx.NodeProto) -> None:
        """Gather of constant indices along a non-batch axis of an activation (e.g. BERT's [CLS] row)."""
        if node.input[0] in self.consts:
            raise NativeError(
                "Gather from a constant table (an embedding lookup) is not supported by the native enclave; "
                "cut after it"
            )
        x = self.act(node.input[0], node)
        if node.input[1] not in self.consts:
            raise NativeError("Gather with computed indices is not supported by the native enclave")
        full = len(x.shape) + 1
        axis = int(_attr(node, "axis", 0))
        axis = axis + full if axis < 0 else axis
        if axis == 0:
            raise NativeError("Gather along the batch axis is not supported by the native enclave")
        size = x.shape[axis - 1]
        indices = self.consts[node.input[1]].astype(np.int64).reshape(-1)
        if indices.size == 0 or ((indices < -size) | (indices >= size)).any():
            raise NativeError(f"Gather's indices must lie in [-{size}, {size}) and not be empty")
        indices = np.where(indices < 0, indices + size, indices)
        outer, inner = math.prod(x.shape[: axis - 1]), math.prod(x.shape[axis:])
        out = self.new_act(node.output[0], self.shape(node.output[0], node))
        if out.size != outer * indices.size * inner:
            raise NativeError("Gather's output shape does not match its indices")
        self.emit(
            node,
            f"{{ static const int ix[] = {{{', '.join(map(str, indices.tolist()))}}}; "
            f"for (size_t o = 0; o < (size_t)n * {outer}; o++) for (int j = 0; j < {indices.size}; j++) "
            f"memcpy({out.buffer} + (o * {indices.size} + (size_t)j) * {inner}, "
            f"{x.buffer} + (o * {size} + (size_t)ix[j]) * {inner}, {inner * 4}); }}",
        )

    def weight_value(self, name: str, node: onnx.NodeProto) -> tuple[str, np.ndarray]:
        value = self.consts[name]
        if value.dtype != np.float32:
            raise NativeError(f"{node.op_type} uses a {value.dtype} weight; the native enclave computes in float32")
        return name, value

    def softmax(self, node: onnx.NodeProto) -> None:
        x = self.act(node.input[0], node)
        full = [1, *x.shape]
        axis = int(_attr(node, "axis", -1 if self.opset >= 13 else 1))
        axis = axis + len(full) if axis < 0 else axis
        if axis == 0:
            raise NativeError("Softmax over the batch axis is not supported by the native enclave")
        out = self.new_act(node.output[0], x.shape)
        if self.opset >= 13:
            outer, length, inner = math.prod(full[1:axis]), full[axis], math.prod(full[axis + 1 :])
        else:
            outer, length, inner = math.prod(full[1:axis]), math.prod(full[axis:]), 1
        self.emit(node, f"mc_softmax((size_t)n * {outer}, {length}, {inner}, {x.buffer}, {out.buffer});")

    # -- windows: Conv, pooling ----------------------------------------------------------------

    def window(
        self,
        node: onnx.NodeProto,
        shape_in: tuple[int, ...],
        shape_out: tuple[int, ...],
        kernel: list[int],
        channels: int | None = None,
    ) -> str:
        """A static mc_window for a 1-D or 2-D window op; returns its C name."""
        spatial = len(shape_in) - 1
        if spatial not in (1, 2) or len(kernel) != spatial:
            raise NativeError(f"{node.op_type} over {spatial} spatial axes is not supported by the native enclave")
        strides = list(_attr(node, "strides", [1] * spatial))
        dilations = list(_attr(node, "dilations", [1] * spatial))
        pads = list(_attr(node, "pads", [0] * 2 * spatial))
        auto = _attr(node, "auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        begins = pads[:spatial]
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            begins = []
            for i in range(spatial):
                total = max(
                    0, (shape_out[i + 1] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - shape_in[i + 1]
                )
                begins.append(total // 2 if auto == "SAME_UPPER" else total - total // 2)
        elif auto == "VALID":
            begins = [0] * spatial
        one = lambda values: [1, *values] if spatial == 1 else values  # noqa: E731 - 1-D is 2-D with height 1
        zero = lambda values: [0, *values] if spatial == 1 else values  # noqa: E731
        h, w = one(list(shape_in[1:]))
        kh, kw = one(kernel)
        sh, sw = one(strides)
        dh, dw = one(dilations)
        pt, pl = zero(begins)
        oh, ow = one(list(shape_out[1:]))
        name = f"G{len(self.globals)}"
        fields = [channels or shape_in[0], h, w, kh, kw, sh, sw, dh, dw, pt, pl, oh, ow]
        self.globals.append(f"static const mc_window {name} = {{{', '.join(map(str, fields))}}};")
        return name

    def conv(self, node: onnx.NodeProto) -> None:
        x = self.act(node.input[0], node)
        if node.input[1] not in self.consts:
            raise NativeError("Conv with computed weights is not supported by the native enclave")
        _, w = self.weight_value(node.input[1], node)
        group = int(_attr(node, "group", 1))
        cout, cin_g = w.shape[0], w.shape[1]
        out_name = node.output[0]
        users = self.consumers.get(out_name, [])
        graph_outputs = {v.name for v in self.model.graph.output}
        fold = (
            users[0]
            if len(users) == 1 and users[0].op_type == "BatchNormalization" and out_name not in graph_outputs
            else None
        )
        final = fold.output[0] if fold is not None else out_name
        shape_out = self.shape(final, fold or node)
        depthwise = group == x.shape[0] == cout and cin_g == 1
        geometry = self.window(node, x.shape, shape_out, list(w.shape[2:]), None if depthwise else cin_g)
        weights, bias = f"W{len(self.arrays)}", f"B{len(self.arrays) + 1}"
        self.arrays += [(weights, w.size), (bias, cout)]
        self.prepare.append(f"memcpy({weights}, {self.source(node.input[1], w)}, {w.size * 4});")
        self.prepare.append(f"memset({bias}, 0, sizeof {bias});")
        if len(node.input) > 2 and node.input[2]:
            b = self.consts[node.input[2]]
            self.prepare.append(f"memcpy({bias}, {self.source(node.input[2], b)}, {b.size * 4});")
        per_filter = w.size // cout
        if fold is not None:
            self.folded.add(fold.output[0])
            stage = self.batch_norm_stage(fold, cout)
            self.prepare.append(
                f"for (int c = 0; c < {cout}; c++) {{ float s = {stage}[c], t = {stage}[{cout} + c]; "
                f"for (int k = 0; k < {per_filter}; k++) {weights}[c * {per_filter} + k] *= s; "
                f"{bias}[c] = {bias}[c] * s + t; }}"
            )
        out = self.new_act(final, shape_out)
        spatial_out = math.prod(shape_out[1:])
        if depthwise:
            self.emit(
                node,
                f"for (int s = 0; s < n; s++) mc_depthwise(&{geometry}, {x.buffer} + (size_t)s * {x.size}, {weights}, "
                f"{bias}, {out.buffer} + (size_t)s * {out.size});",
            )
            return
        k = per_filter
        cout_g, in_g = cout // group, cin_g * math.prod(x.shape[1:])
        self.tail = max(self.tail, k * 16)
        # A 1x1 convolution with stride 1 and no padding reads its input as the GEMM's B as it is.
        pads, strides = _attr(node, "pads", [0]), _attr(node, "strides", [1])
        plain = all(v == 1 for v in w.shape[2:]) and math.prod(x.shape[1:]) == spatial_out
        plain = plain and all(v == 0 for v in pads) and all(v == 1 for v in strides)
        sample_in = f"{x.buffer} + (size_t)s * {x.size} + (size_t)g * {in_g}"
        if plain:
            self.globals.pop()  # the geometry is not needed
            columns, im2col = sample_in, ""
        else:
            self.col = max(self.col, k * spatial_out)
            columns, im2col = "mc_col", f"mc_im2col(&{geometry}, {sample_in}, mc_col); "
        self.emit(
            node,
            f"for (int s = 0; s < n; s++) for (int g = 0; g < {group}; g++) {{ {im2col}"
            f"mc_gemm_rows({cout_g}, {k}, {spatial_out}, {weights} + (size_t)g * {cout_g * k}, {k}, {columns}, "
            f"{spatial_out}, {bias} + g * {cout_g}, mc_tail, "
            f"{out.buffer} + (size_t)s * {out.size} + (size_t)g * {cout_g * spatial_out}, {spatial_out}); }}",
        )

    def batch_norm_stage(self, node: onnx.NodeProto, channels: int) -> str:
        """Prepare code leaving scale s in S[0:C] and shift t in S[C:2C] of a new array S; returns S."""
        if int(_attr(node, "training_mode", 0)) or len([o for o in node.output if o]) > 1:
            raise NativeError("BatchNormalization in training mode is not supported by the native enclave")
        if any(name not in self.consts for name in node.input[1:5]):
            raise NativeError("BatchNormalization with computed statistics is not supported by the native enclave")
        epsilon = float(_attr(node, "epsilon", 1e-5))
        array = f"S{len(self.arrays)}"
        self.arrays.append((array, 2 * channels))
        self.stage = max(self.stage, 4 * channels)
        for slot, name in enumerate(node.input[1:5]):
            value = self.consts[name]
            if value.size != channels or value.dtype != np.float32:
                raise NativeError("BatchNormalization parameters must be float32, one per channel")
            self.prepare.append(f"memcpy(mc_stage + {slot * channels}, {self.source(name, value)}, {channels * 4});")
        self.prepare.append(
            f"for (int c = 0; c < {channels}; c++) {{ float s = mc_stage[c] / sqrtf(mc_stage[{3 * channels} + c] + "
            f"{_c_float(epsilon)}); {array}[c] = s; {array}[{channels} + c] = mc_stage[{channels} + c] - "
            f"mc_stage[{2 * channels} + c] * s; }}"
        )
        return array

    def batch_norm(self, node: onnx.NodeProto) -> None:
        if node.output[0] in self.folded:
            return
        x = self.act(node.input[0], node)
        channels = x.shape[0]
        stage = self.batch_norm_stage(node, channels)
        out = self.new_act(node.output[0], x.shape)
        inner = x.size // channels
        self.emit(
            node,
            f"for (size_t i = 0; i < (size_t)n * {x.size}; i++) {{ size_t c = i / {inner} % {channels}; "
            f"{out.buffer}[i] = {x.buffer}[i] * {stage}[c] + {stage}[{channels} + c]; }}",
        )

    def pool(self, node: onnx.NodeProto) -> None:
        x = self.act(node.input[0], node)
        if len([o for o in node.output if o]) > 1:
            raise NativeError("MaxPool's Indices output is not supported by the native enclave")
        shape_out = self.shape(node.output[0], node)
        geometry = self.window(node, x.shape, shape_out, list(_attr(node, "kernel_shape", [])))
        mode = 0 if node.op_type == "MaxPool" else (1 if _attr(node, "count_include_pad", 0) else 2)
        out = self.new_act(node.output[0], shape_out)
        self.emit(
            node,
            f"for (int s = 0; s < n; s++) mc_pool(&{geometry}, {mode}, {x.buffer} + (size_t)s * {x.size}, "
            f"{out.buffer} + (size_t)s * {out.size});",
        )

    def reduce(self, node: onnx.NodeProto) -> None:
        x = self.act(node.input[0], node)
        full = len(x.shape) + 1
        if node.op_type.startswith("Global"):
            axes = list(range(2, full))
        else:
            axes = _attr(node, "axes", None)
            if axes is None and len(node.input) > 1 and node.input[1]:
                axes = self.consts[node.input[1]].tolist()
            if not axes:
                raise NativeError(
                    f"{node.op_type} over every axis (the batch included) is not supported by the native enclave"
                )
        axes = sorted(a + full if a < 0 else a for a in axes)
        if 0 in axes or axes != list(range(axes[0], axes[-1] + 1)):
            raise NativeError(f"{node.op_type} must reduce consecutive axes other than the batch in the native enclave")
        ps = x.shape
        outer, length, inner = (
            math.prod(ps[: axes[0] - 1]),
            math.prod(ps[axes[0] - 1 : axes[-1]]),
            math.prod(ps[axes[-1] :]),
        )
        out = self.new_act(node.output[0], self.shape(node.output[0], node))
        self.emit(
            node,
            f"mc_reduce((size_t)n * {outer}, {length}, {inner}, {REDUCE[node.op_type]}, {x.buffer}, {out.buffer});",
        )

    def concat(self, node: onnx.NodeProto) -> None:
        parts = [self.act(name, node) for name in node.input]
        shape = self.shape(node.output[0], node)
        axis = int(_attr(node, "axis", 1))
        axis = axis + len(shape) + 1 if axis < 0 else axis
        if axis == 0:
            raise NativeError("Concat along the batch axis is not supported by the native enclave")
        outer = math.prod(shape[: axis - 1])
        out = self.new_act(node.output[0], shape)
        block = out.size // outer
        copies, offset = [], 0
        for part in parts:
            chunk = part.size // outer
            copies.append(f"memcpy({out.buffer} + o * {block} + {offset}, {part.buffer} + o * {chunk}, {chunk * 4});")
            offset += chunk
        self.emit(node, f"for (size_t o = 0; o < (size_t)n * {outer}; o++) {{ {' '.join(copies)} }}")

    def transpose(self, node: onnx.NodeProto) -> None:
        x = self.act(node.input[0], node)
        full = len(x.shape) + 1
        perm = list(_attr(node, "perm", list(range(full))[::-1]))
        if perm[0] != 0:
            raise NativeError("Transpose that moves the batch axis is not supported by the native enclave")
        strides, step = [0] * full, 1
        dims = [0, *x.shape]
        for axis in range(full - 1, -1, -1):
            strides[axis] = step
            step *= max(dims[axis], 1)
        strides[0] = x.size
        shape = self.shape(node.output[0], node)
        out = self.new_act(node.output[0], shape)
        reads = [strides[p] for p in perm]
        self.emit(
            node,
            f"{{ const int64_t d[] = {{n, {', '.join(map(str, shape))}}}, sa[] = {{{', '.join(map(str, reads))}}}, "
            f"sb[] = {{{', '.join('0' * full)}}}; "
            f"MC_BROADCAST({full}, d, sa, sb, {{ {out.buffer}[io] = {x.buffer}[ia]; }}); }}",
        )

    # -- the whole program ----------------------------------------------------------------------

    def build(self) -> Program:
        for value in self.inputs:
            self.new_act(value.name, self.shape(value.name, onnx.helper.make_node("Input", [], [value.name])))
        for node in self.model.graph.node:
            self.lower(node)
        outputs = []
        for value in self.model.graph.output:
            if value.name not in self.acts:
                raise NativeError(f"private output {value.name!r} is not computed from the inputs")
            if value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
                raise NativeError(f"private output {value.name!r} is not float32")
            outputs.append((value.name, self.acts[value.name].shape))
        per_sample = sum(size for _, size in self.buffers) * 4
        tile = max(1, min(MAX_TILE, ACTIVATION_BUDGET_BYTES // max(per_sample, 1)))
        return Program(
            inputs=[(v.name, self.acts[v.name].shape, self.fixed_batch) for v in self.inputs],
            outputs=outputs,
            tile=tile,
            ops=self.ops,
        )


def lower(model_bytes: bytes) -> tuple[Program, _Generator]:
    """Lower the private part; NativeError names the first thing the native enclave cannot run."""
    generator = _Generator(model_bytes)
    return generator.build(), generator


def _c_string(text: str) -> str:
    return '"' + "".join(c if c.isalnum() or c in " _-./:" else f'\\x{ord(c):02x}""' for c in text) + '"'


def _c_bytes(data: bytes) -> str:
    rows = [", ".join(str(b) for b in data[i : i + 24]) for i in range(0, len(data), 24)]
    return "{\n    " + ",\n    ".join(rows) + "\n}" if rows else "{0}"


def _io_entry(name: str, shape: tuple[int, ...], fixed_batch: int) -> str:
    dims = ", ".join(map(str, shape)) or "0"
    return f"    {{{_c_string(name)}, {len(shape)}, {{{dims}}}, {fixed_batch}, {max(1, math.prod(shape))}}},"


def render(program: Program, generator: _Generator, bundle: dict[str, object]) -> str:
    """model.c: the bundle's facts, the READY payload, buffers, mc_prepare and mc_run."""
    for _, shape, _ in program.inputs:
        if len(shape) > 8:
            raise NativeError("a private input has rank above 9, which the native enclave does not take")
    for _, shape in program.outputs:
        if len(shape) > 8:
            raise NativeError("a private output has rank above 9, which the native enclave does not return")
    lines = [
        "/* Generated by modelcloak.native for one split bundle: the private part as code, no weights. */",
        "#define _DEFAULT_SOURCE",
        "#include <math.h>",
        "#include <string.h>",
        '#include "mc_model.h"',
        '#include "kernels.h"',
        "",
        f"const int mc_tile = {program.tile};",
        f"const int mc_n_inputs = {len(program.inputs)};",
        "const mc_io mc_inputs[] = {",
        *[_io_entry(*entry) for entry in program.inputs],
        "};",
        f"const int mc_n_outputs = {len(program.outputs)};",
        "const mc_io mc_outputs[] = {",
        *[_io_entry(name, shape, generator.fixed_batch) for name, shape in program.outputs],
        "};",
        f"const unsigned char mc_header_digest[32] = {_c_bytes(bundle['digest'])};",  # type: ignore[arg-type]
        f"const unsigned char mc_key_id[8] = {_c_bytes(bundle['key_id'])};",  # type: ignore[arg-type]
        f"const unsigned char mc_salt[32] = {_c_bytes(bundle['salt'])};",  # type: ignore[arg-type]
        f"const char mc_section_label[] = {_c_string('modelcloak/v1/section/' + str(bundle['section']))};",
        f"const uint32_t mc_section_index = {bundle['index']};",
        f"const uint64_t mc_section_size = {len(generator.model_bytes)};",
        f"const uint64_t mc_chunk_size = {bundle['chunk_size']};",
        f"const unsigned char mc_ready_head[] = {_c_bytes(bundle['ready_head'])};",  # type: ignore[arg-type]
        f"const size_t mc_ready_head_len = {len(bundle['ready_head'])};",  # type: ignore[arg-type]
        f"const int mc_policy_mode = {bundle['mode']};",
        f"const uint32_t mc_policy_k = {bundle['k']};",
        f"const uint64_t mc_budget = {bundle['budget']}ull;",
        f"const double mc_rate = {float(bundle['rate'])!r};",  # type: ignore[arg-type]
        "",
        f"unsigned char mc_plain[{max(1, len(generator.model_bytes))}] __attribute__((aligned(4096)));",
        f"static float mc_stage[{max(1, generator.stage)}];",
        f"static float mc_col[{max(1, generator.col)}] __attribute__((aligned(64)));",
        f"static float mc_tail[{max(1, generator.tail)}] __attribute__((aligned(64)));",
        *generator.globals,
        *[f"static float {name}[{size}] __attribute__((aligned(64)));" for name, size in generator.arrays],
        *[
            f"static float {name}[{program.tile} * {size}] __attribute__((aligned(64)));"
            for name, size in generator.buffers
        ],
        "",
        "int mc_prepare(void) {",
        *[f"    {line}" for line in generator.prepare],
        "    explicit_bzero(mc_stage, sizeof mc_stage);",
        "    return 0;",
        "}",
        "",
        "void mc_wipe(void) {",
        "    explicit_bzero(mc_stage, sizeof mc_stage);",
        "    explicit_bzero(mc_col, sizeof mc_col);",
        "    explicit_bzero(mc_tail, sizeof mc_tail);",
        *[f"    explicit_bzero({name}, sizeof {name});" for name, _ in [*generator.arrays, *generator.buffers]],
        "}",
        "",
        "float *mc_input(int i) {",
        f"    static float *const in[] = {{{', '.join(generator.acts[n].buffer for n, _, _ in program.inputs)}}};",
        "    return in[i];",
        "}",
        "",
        "const float *mc_output(int i) {",
        f"    static const float *const out[] = {{{', '.join(generator.acts[n].buffer for n, _ in program.outputs)}}};",
        "    return out[i];",
        "}",
        "",
        "void mc_run(int n) {",
        *[f"    /* {op} */ {line}" for op, line in generator.run],
        "}",
        "",
    ]
    return "\n".join(lines)
