"""An ONNX graph run by PyTorch, so an owner's model (or one part of it) can be trained.

`eval accuracy MODEL.onnx` retrains the private part of an owner's model and fine-tunes the whole
of it, which needs gradients; onnxruntime has none. The maintained converter (onnx2torch) pulls
torchvision, whose wheels on the registry pin another torch than ours, so instead this module
interprets the graph node by node with torch functions. It covers the operators of the dense and
convolutional classifiers the split scheme is used with; any other operator is refused by name
before anything is trained, and `OnnxModule.check_against` compares the interpretation with
onnxruntime on real inputs, so a silent misreading cannot slip into a report.

Trainable are the float weights of Gemm, MatMul and Conv (and the bias added to a MatMul's
output) and BatchNormalization's scale and shift; every other initializer (shapes, running
statistics, fixed constants) stays as it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from modelcloak.eval.errors import EvalError

try:
    import torch
except ImportError as exc:  # pragma: no cover - torch is the eval extra; callers import this module lazily
    raise EvalError("PyTorch is not installed: pip install 'modelcloak[eval]'") from exc

_ELEMENTWISE = {"Add", "Sub", "Mul", "Div"}
_ACTIVATIONS = {"Relu", "Sigmoid", "Tanh", "LeakyRelu"}
_SHAPE_OPS = {"Flatten", "Reshape", "Identity", "Dropout", "Transpose", "Concat", "Constant"}
_POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean"}
SUPPORTED_OPS = frozenset(
    {"Gemm", "MatMul", "Conv", "BatchNormalization", "Softmax", "LogSoftmax"}
    | _ELEMENTWISE
    | _ACTIVATIONS
    | _SHAPE_OPS
    | _POOLS
)
# Ops whose output is a probability (or log-probability) row: training works on their input.
_NORMALISERS = {"Softmax", "LogSoftmax"}


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def trainable_roles(graph: onnx.GraphProto) -> dict[str, tuple[str, int]]:
    """Float initializers that are weights: name -> (role, fan_in), role "weight", "bias", "scale" or "shift"."""
    initializers = {i.name: i for i in graph.initializer}
    floats = {n for n, i in initializers.items() if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)}
    shapes = {n: tuple(initializers[n].dims) for n in floats}
    roles: dict[str, tuple[str, int]] = {}
    matmul_outputs: dict[str, int] = {}  # output of a MatMul by a weight -> that weight's fan-in
    for node in graph.node:
        inputs = list(node.input)
        attrs = _attributes(node)
        if node.op_type == "Gemm" and len(inputs) > 1 and inputs[1] in floats:
            shape = shapes[inputs[1]]
            fan_in = shape[1] if attrs.get("transB", 0) else shape[0]
            roles[inputs[1]] = ("weight", fan_in)
            if len(inputs) > 2 and inputs[2] in floats:
                roles[inputs[2]] = ("bias", fan_in)
        elif node.op_type == "MatMul" and len(inputs) > 1 and inputs[1] in floats and len(shapes[inputs[1]]) == 2:
            roles[inputs[1]] = ("weight", shapes[inputs[1]][0])
            matmul_outputs[node.output[0]] = shapes[inputs[1]][0]
        elif node.op_type == "Conv" and len(inputs) > 1 and inputs[1] in floats:
            fan_in = math.prod(shapes[inputs[1]][1:])
            roles[inputs[1]] = ("weight", fan_in)
            if len(inputs) > 2 and inputs[2] in floats:
                roles[inputs[2]] = ("bias", fan_in)
        elif node.op_type == "BatchNormalization":
            for name, role in zip(inputs[1:3], ("scale", "shift")):
                if name in floats:
                    roles[name] = (role, 1)
        elif node.op_type == "Add" and len(inputs) == 2:
            for this, other in ((inputs[0], inputs[1]), (inputs[1], inputs[0])):
                if this in floats and other in matmul_outputs:
                    roles[this] = ("bias", matmul_outputs[other])
    return roles


class OnnxGraph:
    """The parts of an ONNX model the interpreter needs, checked for operators it can run."""

    def __init__(self, model: onnx.ModelProto, *, what: str = "the model") -> None:
        graph = model.graph
        unsupported = sorted(
            {n.op_type for n in graph.node if n.op_type not in SUPPORTED_OPS or n.domain not in ("", "ai.onnx")}
        )
        if unsupported:
            raise EvalError(
                f"{what} uses operators that `eval accuracy` cannot train: {', '.join(unsupported)} "
                f"(supported: {', '.join(sorted(SUPPORTED_OPS))})"
            )
        if any(
            n.attribute and any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET", b"VALID") for a in n.attribute)
            for n in graph.node
        ):
            raise EvalError(
                f"{what} uses auto_pad SAME_*, which `eval accuracy` cannot train; export with explicit pads"
            )
        self.model = model
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        initializer_names = {i.name for i in graph.initializer}
        self.inputs = [i.name for i in graph.input if i.name not in initializer_names]
        self.output = graph.output[0].name
        self.roles = trainable_roles(graph)
        self.arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer}

    @property
    def trainable_parameters(self) -> int:
        return sum(int(self.arrays[name].size) for name in self.roles)


class OnnxModule(torch.nn.Module):
    """`forward(*inputs)` computes the graph's first output (or, with `logits`, the input of a final Softmax)."""

    def __init__(self, model: onnx.ModelProto, *, logits: bool = True, what: str = "the model") -> None:
        super().__init__()
        self.graph = OnnxGraph(model, what=what)
        self.weights = torch.nn.ParameterList()
        self._slot: dict[str, int] = {}
        self._constants: dict[str, torch.Tensor] = {}
        for name, array in self.graph.arrays.items():
            if name in self.graph.roles:
                self._slot[name] = len(self.weights)
                self.weights.append(torch.nn.Parameter(torch.from_numpy(np.array(array, dtype=np.float32))))
            else:
                self._constants[name] = torch.from_numpy(np.array(array))
        nodes = list(model.graph.node)
        self.output = self.graph.output
        if logits and nodes and nodes[-1].op_type in _NORMALISERS and nodes[-1].output[0] == self.output:
            self.output = nodes[-1].input[0]
            nodes = nodes[:-1]
        self._nodes = [(n.op_type, list(n.input), list(n.output), _attributes(n)) for n in nodes]

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.weights)

    def reinitialise(self, seed: int) -> None:
        """Fresh weights as a torch layer of the same shape would get them, from `seed`.

        Weights and biases are uniform in +-1/sqrt(fan_in) (torch's default for Linear and
        Conv); batch-norm scales 1 and shifts 0.
        """
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, (role, fan_in) in self.graph.roles.items():
                parameter = self.weights[self._slot[name]]
                if role in ("weight", "bias"):
                    bound = 1.0 / math.sqrt(max(1, fan_in))
                    parameter.copy_(torch.rand(parameter.shape, generator=generator) * 2 * bound - bound)
                else:
                    parameter.fill_(1.0 if role == "scale" else 0.0)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        values: dict[str, Any] = dict(zip(self.graph.inputs, inputs))
        for op, names, outputs, attrs in self._nodes:
            args = [self._value(values, name) if name else None for name in names]
            values[outputs[0]] = _run(op, args, attrs, self.graph.opset)
        return values[self.output]  # type: ignore[no-any-return]

    def _value(self, values: dict[str, Any], name: str) -> Any:
        if name in values:
            return values[name]
        if name in self._slot:
            return self.weights[self._slot[name]]
        return self._constants[name]

    def check_against(self, run_onnx: Callable[[np.ndarray], np.ndarray], sample: np.ndarray, *, what: str) -> float:
        """Compare with onnxruntime on `sample` (one input); refuse when they disagree. Returns the max abs error."""
        with torch.no_grad():
            mine = self.forward(torch.from_numpy(np.ascontiguousarray(sample))).numpy()
        if self.output != self.graph.output:  # compare probabilities with probabilities
            mine = torch.softmax(torch.from_numpy(mine), dim=-1).numpy()
        reference = np.asarray(run_onnx(sample), dtype=np.float64)
        error = float(np.max(np.abs(mine - reference))) if reference.size else 0.0
        scale = max(1.0, float(np.max(np.abs(reference)))) if reference.size else 1.0
        if mine.shape != reference.shape or not error <= 1e-3 * scale:
            raise EvalError(
                f"{what}: the PyTorch interpretation differs from onnxruntime (max error {error:.3g}, shapes "
                f"{mine.shape} vs {reference.shape}); `eval accuracy` cannot train this model faithfully"
            )
        return error


def _pads(pads: Sequence[int] | None, spatial: int) -> list[int]:
    """ONNX pads [b1, b2, ..., e1, e2, ...] as F.pad's [e_last, b_last..., ] order."""
    pads = list(pads or [0] * (2 * spatial))
    begins, ends = pads[:spatial], pads[spatial:]
    out: list[int] = []
    for b, e in zip(reversed(begins), reversed(ends)):
        out += [b, e]
    return out


def _run(op: str, args: list[Any], attrs: dict[str, Any], opset: int) -> Any:  # noqa: C901 - one branch per op
    functional = torch.nn.functional
    # torch's stubs cannot follow a table of operators: the tensors here are typed by use.
    x: Any = args[0] if args else None
    if op == "Gemm":
        a, b = args[0], args[1]
        a = a.transpose(0, 1) if attrs.get("transA", 0) else a
        b = b.transpose(0, 1) if attrs.get("transB", 0) else b
        y = attrs.get("alpha", 1.0) * (a @ b)
        return y + attrs.get("beta", 1.0) * args[2] if len(args) > 2 and args[2] is not None else y
    if op == "MatMul":
        return torch.matmul(args[0], args[1])
    if op in _ELEMENTWISE:
        binary: dict[str, Any] = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}
        return binary[op](args[0], args[1])
    if op == "Relu":
        return torch.relu(x)
    if op == "Sigmoid":
        return torch.sigmoid(x)
    if op == "Tanh":
        return torch.tanh(x)
    if op == "LeakyRelu":
        return functional.leaky_relu(x, attrs.get("alpha", 0.01))
    if op in _NORMALISERS:
        axis = attrs.get("axis", -1 if opset >= 13 else 1)
        return torch.softmax(x, dim=axis) if op == "Softmax" else torch.log_softmax(x, dim=axis)
    if op == "Conv":
        spatial = x.dim() - 2
        conv: Any = {1: functional.conv1d, 2: functional.conv2d, 3: functional.conv3d}[spatial]
        x = functional.pad(x, _pads(attrs.get("pads"), spatial))
        bias = args[2] if len(args) > 2 else None
        return conv(
            x,
            args[1],
            bias,
            stride=attrs.get("strides", 1),
            dilation=attrs.get("dilations", 1),
            groups=attrs.get("group", 1),
        )
    if op in ("MaxPool", "AveragePool"):
        spatial = x.dim() - 2
        kernel = attrs["kernel_shape"]
        strides = attrs.get("strides", [1] * spatial)
        ceil = bool(attrs.get("ceil_mode", 0))
        if op == "MaxPool":
            pool: Any = {1: functional.max_pool1d, 2: functional.max_pool2d, 3: functional.max_pool3d}[spatial]
            x = functional.pad(x, _pads(attrs.get("pads"), spatial), value=-math.inf)
            return pool(x, kernel, strides, dilation=attrs.get("dilations", 1), ceil_mode=ceil)
        avg_pool: Any = {1: functional.avg_pool1d, 2: functional.avg_pool2d, 3: functional.avg_pool3d}[spatial]
        pads = attrs.get("pads") or [0] * (2 * spatial)
        if pads[:spatial] == pads[spatial:]:
            include = bool(attrs.get("count_include_pad", 0))
            return avg_pool(x, kernel, strides, padding=pads[:spatial], ceil_mode=ceil, count_include_pad=include)
        raise EvalError("AveragePool with uneven padding is not supported by `eval accuracy`")
    if op == "GlobalAveragePool":
        return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)
    if op == "ReduceMean":
        axes = attrs.get("axes") if len(args) < 2 or args[1] is None else [int(a) for a in args[1].tolist()]
        if not axes and attrs.get("noop_with_empty_axes", 0):
            return x
        keep = bool(attrs.get("keepdims", 1))
        return x.mean(dim=tuple(axes), keepdim=keep) if axes else x.mean(dim=tuple(range(x.dim())), keepdim=keep)
    if op == "BatchNormalization":
        return functional.batch_norm(x, args[3], args[4], args[1], args[2], False, 0.0, attrs.get("epsilon", 1e-5))
    if op == "Flatten":
        axis = attrs.get("axis", 1) % max(1, x.dim())
        return x.reshape(math.prod(x.shape[:axis]), -1)
    if op == "Reshape":
        shape = [int(s) for s in args[1].tolist()]
        if not attrs.get("allowzero", 0):
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return x.reshape(shape)
    if op in ("Identity", "Dropout"):
        return x
    if op == "Transpose":
        return x.permute(attrs.get("perm", list(reversed(range(x.dim())))))
    if op == "Concat":
        return torch.cat([a for a in args if a is not None], dim=attrs["axis"])
    if op == "Constant":
        return torch.from_numpy(np.array(numpy_helper.to_array(attrs["value"])))
    raise EvalError(f"operator {op} is not supported by `eval accuracy`")  # pragma: no cover - checked up front
