"""An ONNX classifier with branches (residual adds, concatenations) as a `torch.fx.GraphModule`.

`modelcloak.lock.from_onnx` rebuilds chains as an `nn.Sequential`; this module rebuilds any
directed acyclic graph of the same layers plus the operators residual and multi-branch CNNs
are exported with: Add and Concat of two activations, average and global average pooling
(GlobalAveragePool, or ReduceMean over the two spatial axes as torch's exporter writes it), and
BatchNormalization after a Conv (folded into it, as in inference). Every layer with weights
becomes its own submodule, and every Relu its own `nn.ReLU`, so the soft lock can find a site
anywhere in the graph (`find_lock_site`) and fine-tune the result like any torch module.

A Conv or Gemm without a bias gets a zero one: the soft lock's offset needs a bias to live in,
and a zero bias computes the same function.
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from modelcloak.lock.errors import LockError
from modelcloak.lock.from_onnx import _conv, _linear, _max_pool, _symmetric_pads, model_input_shape

__all__ = ["KNOWN_OPERATORS", "graph_module_from_onnx"]

KNOWN_OPERATORS = (
    "Conv, Gemm, MatMul (+Add), Add, Relu, MaxPool, AveragePool, GlobalAveragePool, ReduceMean (spatial), "
    "Concat, Flatten, Reshape (flatten), BatchNormalization (after Conv), Identity, Dropout"
)


def graph_module_from_onnx(model: onnx.ModelProto) -> tuple[Any, tuple[int, ...]]:
    """Return (fx.GraphModule with the model's weights, the input shape without its batch axis)."""
    from modelcloak.lock.soft import _import_torch

    torch = _import_torch()
    builder = _Builder(torch, model)
    return builder.build(), builder.input_shape


class _Builder:
    def __init__(self, torch: Any, model: onnx.ModelProto) -> None:
        self.torch, self.nn = torch, torch.nn
        self.graph = model.graph
        self.weights = {t.name: numpy_helper.to_array(t) for t in self.graph.initializer}
        self.input_name, self.input_shape = model_input_shape(model, self.weights)
        self.root = self.nn.Module()
        self.fx = torch.fx.Graph()
        self.values: dict[str, Any] = {self.input_name: self.fx.placeholder("x")}
        self.uses = Counter(name for node in self.graph.node for name in node.input if name)
        self.uses.update(output.name for output in self.graph.output)
        self.convs: dict[str, Any] = {}  # ONNX output name -> the Conv2d that computes it (for BN folding)

    def build(self) -> Any:
        nodes = list(self.graph.node)
        skip: set[int] = set()
        for index, node in enumerate(nodes):
            if index not in skip:
                skip |= self._node(index, node, nodes)
        output = self.graph.output[0].name
        if output not in self.values:
            raise LockError(f"the model's output {output!r} is not computed by the supported layers")
        self.fx.output(self.values[output])
        module = self.torch.fx.GraphModule(self.root, self.fx)
        module.eval()
        return module

    # ------------------------------------------------------------------------------------------

    def _node(self, index: int, node: onnx.NodeProto, nodes: list[onnx.NodeProto]) -> set[int]:
        """Translate one node; return the indices of later nodes it absorbed (a MatMul's bias Add)."""
        torch, nn = self.torch, self.nn
        label = f"node {node.name or index!r} ({node.op_type})"
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        op = node.op_type
        if len(node.output) != 1 and op not in ("Dropout", "BatchNormalization"):
            raise LockError(f"{label} has {len(node.output)} outputs; the soft lock handles single-output layers")
        out = node.output[0]
        if op == "Constant":
            self.weights[out] = numpy_helper.to_array(attrs["value"]) if "value" in attrs else _constant(attrs, label)
            return set()
        if op == "Conv":
            conv = _conv(nn, torch, node, attrs, lambda n, i: self._weight(n, i, label), label, zero_bias=True)
            self.values[out] = self._module(f"conv_{index}", conv, self._activation(node, 0, label))
            self.convs[out] = conv
        elif op == "Gemm":
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                raise LockError(f"{label}: only Gemm with transA=0, alpha=1, beta=1 is supported")
            w = self._weight(node, 1, label)
            w = w if attrs.get("transB", 0) else w.T
            bias = self._weight(node, 2, label).reshape(-1) if len(node.input) > 2 and node.input[2] else None
            linear = _linear(nn, torch, w, np.zeros(w.shape[0], np.float32) if bias is None else bias)
            self.values[out] = self._module(f"linear_{index}", linear, self._activation(node, 0, label))
        elif op == "MatMul":
            return self._matmul(index, node, nodes, label)
        elif op == "Add":
            self.values[out] = self._add(index, node, label)
        elif op == "Relu":
            self.values[out] = self._module(f"relu_{index}", nn.ReLU(), self._activation(node, 0, label))
        elif op == "MaxPool":
            self.values[out] = self._module(
                f"maxpool_{index}", _max_pool(nn, attrs, label), self._activation(node, 0, label)
            )
        elif op == "AveragePool":
            self.values[out] = self._module(
                f"avgpool_{index}", _avg_pool(nn, attrs, label), self._activation(node, 0, label)
            )
        elif op == "GlobalAveragePool":
            self.values[out] = self._module(f"gap_{index}", nn.AdaptiveAvgPool2d(1), self._activation(node, 0, label))
        elif op == "ReduceMean":
            self.values[out] = self._reduce_mean(index, node, attrs, label)
        elif op == "Concat":
            parts = [self._activation(node, i, label) for i in range(len(node.input))]
            self.values[out] = self.fx.call_function(torch.cat, (parts,), {"dim": int(attrs["axis"])})
        elif op == "Flatten":
            axis = int(attrs.get("axis", 1))
            if axis < 1:
                raise LockError(f"{label}: only Flatten with axis >= 1 is supported")
            self.values[out] = self._module(f"flatten_{index}", nn.Flatten(axis), self._activation(node, 0, label))
        elif op == "Reshape":
            shape = self._weight(node, 1, label).astype(np.int64).tolist()
            if len(shape) != 2 or shape[0] not in (0, -1) or shape[1] == 0 or shape[1] < -1:
                raise LockError(f"{label}: only a Reshape that flattens to (batch, -1) is supported, got {shape}")
            self.values[out] = self._module(f"flatten_{index}", nn.Flatten(), self._activation(node, 0, label))
        elif op == "BatchNormalization":
            self._fold_batch_norm(node, attrs, label)
        elif op in ("Identity", "Dropout"):
            self.values[out] = self._activation(node, 0, label)
        else:
            raise LockError(f"{label}: the soft lock does not know this operator ({KNOWN_OPERATORS})")
        return set()

    def _module(self, name: str, module: Any, *args: Any) -> Any:
        self.root.add_module(name, module)
        return self.fx.call_module(name, args)

    def _activation(self, node: onnx.NodeProto, index: int, label: str) -> Any:
        name = node.input[index] if index < len(node.input) else ""
        if name in self.values:
            return self.values[name]
        if name in self.weights:
            raise LockError(f"{label} takes the constant {name!r} where an activation belongs; not supported")
        raise LockError(f"{label} input {index} ({name!r}) is computed by nothing the soft lock rebuilt")

    def _weight(self, node: onnx.NodeProto, index: int, label: str) -> np.ndarray:
        if index >= len(node.input) or node.input[index] not in self.weights:
            raise LockError(f"{label} input {index} is not a constant weight")
        return np.array(self.weights[node.input[index]], dtype=np.float32)

    def _matmul(self, index: int, node: onnx.NodeProto, nodes: list[onnx.NodeProto], label: str) -> set[int]:
        w = self._weight(node, 1, label).T
        if w.ndim != 2:
            raise LockError(f"{label}: only a MatMul by a 2-D weight is supported")
        bias, out, absorbed = np.zeros(w.shape[0], np.float32), node.output[0], set()
        # A MatMul whose only use is an Add of a constant is a Linear layer with a bias.
        for later, following in enumerate(nodes[index + 1 :], start=index + 1):
            if self.uses[out] == 1 and following.op_type == "Add" and out in following.input:
                other = following.input[1] if following.input[0] == out else following.input[0]
                if other in self.weights and self.weights[other].size == w.shape[0]:
                    bias = self._weight(following, list(following.input).index(other), label).reshape(-1)
                    out, absorbed = following.output[0], {later}
                break
        linear = _linear(self.nn, self.torch, np.ascontiguousarray(w), bias)
        self.values[out] = self._module(f"linear_{index}", linear, self._activation(node, 0, label))
        return absorbed

    def _add(self, index: int, node: onnx.NodeProto, label: str) -> Any:
        if len(node.input) != 2:
            raise LockError(f"{label} needs two inputs")
        constants = [name for name in node.input if name not in self.values and name in self.weights]
        if not constants:
            return self.fx.call_function(
                operator.add, (self._activation(node, 0, label), self._activation(node, 1, label))
            )
        if len(constants) == 2:
            raise LockError(f"{label} adds two constants; fold them before soft-locking")
        activation = next(name for name in node.input if name not in constants)
        buffer = f"constant_{index}"
        self.root.register_buffer(buffer, self.torch.from_numpy(np.array(self.weights[constants[0]], np.float32)))
        return self.fx.call_function(operator.add, (self.values[activation], self.fx.get_attr(buffer)))

    def _reduce_mean(self, index: int, node: onnx.NodeProto, attrs: dict[str, Any], label: str) -> Any:
        axes = attrs.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = self._weight(node, 1, label).astype(np.int64).tolist()
        if sorted(int(a) % 4 for a in axes or []) != [2, 3]:
            raise LockError(f"{label}: only a mean over the two spatial axes (2, 3) of an NCHW tensor is supported")
        pooled = self._module(f"gap_{index}", self.nn.AdaptiveAvgPool2d(1), self._activation(node, 0, label))
        if attrs.get("keepdims", 1):
            return pooled
        return self._module(f"flatten_{index}", self.nn.Flatten(), pooled)

    def _fold_batch_norm(self, node: onnx.NodeProto, attrs: dict[str, Any], label: str) -> None:
        source = node.input[0]
        conv = self.convs.get(source)
        if conv is None or self.uses[source] != 1:
            raise LockError(f"{label}: only a BatchNormalization right after a Conv (its only use) is supported")
        if attrs.get("training_mode", 0):
            raise LockError(f"{label}: a BatchNormalization in training mode is not supported; export in eval mode")
        gamma, beta, mean, var = (self._weight(node, i, label).astype(np.float64) for i in range(1, 5))
        scale = gamma / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))
        with self.torch.no_grad():
            weight = conv.weight.detach().double().numpy() * scale[:, None, None, None]
            bias = (conv.bias.detach().double().numpy() - mean) * scale + beta
            conv.weight.copy_(self.torch.from_numpy(weight.astype(np.float32)))
            conv.bias.copy_(self.torch.from_numpy(bias.astype(np.float32)))
        self.values[node.output[0]] = self.values[source]


def _avg_pool(nn: Any, attrs: dict[str, Any], label: str) -> Any:
    kernel = list(attrs.get("kernel_shape", []))
    if len(kernel) != 2:
        raise LockError(f"{label}: only 2-D average pooling is supported")
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise LockError(f"{label}: auto_pad is not supported; export with explicit pads")
    return nn.AvgPool2d(
        tuple(kernel),
        stride=tuple(attrs.get("strides", [1, 1])),
        padding=_symmetric_pads(list(attrs.get("pads", [0, 0, 0, 0])), label),
        ceil_mode=bool(attrs.get("ceil_mode", 0)),
        count_include_pad=bool(attrs.get("count_include_pad", 0)),
    )


def _constant(attrs: dict[str, Any], label: str) -> np.ndarray:
    for key in ("value_float", "value_int"):
        if key in attrs:
            return np.array(attrs[key])
    for key in ("value_floats", "value_ints"):
        if key in attrs:
            return np.array(list(attrs[key]))
    raise LockError(f"{label}: only tensor and number constants are supported")
