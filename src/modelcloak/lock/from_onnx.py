"""An ONNX classifier as a `torch.nn.Sequential`, so the soft lock can fine-tune it.

(Graphs with branches go to `modelcloak.lock.from_onnx_graph`; `module_from_onnx` picks.)

The soft lock needs gradients, so it works on a torch module; owners often have only the ONNX
file. A chain graph (each node feeds the next, one input, one output) of the layers the soft
lock understands is rebuilt layer for layer with the same weights: Conv (2-D), Gemm, MatMul
followed by Add of a constant (a Linear), Relu, MaxPool, Flatten, a Reshape that flattens, and
Identity/Dropout (dropped). Anything else (branches, BatchNormalization, other operators) is
refused with a `LockError` that names the node: the soft lock's construction is only argued
for these layers (docs/LOCK.md, "Soft lock").
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from modelcloak.lock.errors import LockError

__all__ = ["model_input_shape", "module_from_onnx", "sequential_from_onnx"]


def module_from_onnx(model: onnx.ModelProto) -> tuple[Any, tuple[int, ...]]:
    """A chain as an `nn.Sequential`; a graph with branches as an fx.GraphModule (`from_onnx_graph`)."""
    if _is_chain(model):
        return sequential_from_onnx(model)
    from modelcloak.lock.from_onnx_graph import graph_module_from_onnx

    return graph_module_from_onnx(model)


def _is_chain(model: onnx.ModelProto) -> bool:
    """Every node reads only the previous node's output (and constants): no branch, no join."""
    graph = model.graph
    constants = {t.name for t in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    inputs = [i.name for i in graph.input if i.name not in constants]
    current = inputs[0] if len(inputs) == 1 else None
    for node in graph.node:
        if node.op_type == "Constant":
            continue
        activations = [name for name in node.input if name and name not in constants]
        if activations != [current] or len(node.output) != 1:
            return False
        current = node.output[0]
    return True


def model_input_shape(model: onnx.ModelProto, weights: dict[str, Any]) -> tuple[str, tuple[int, ...]]:
    """(the single input's name, its shape without the batch axis); LockError unless 1 input, 1 output."""
    graph = model.graph
    inputs = [i for i in graph.input if i.name not in weights]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise LockError(
            f"the soft lock handles one input and one output; this model has {len(inputs)} and {len(graph.output)}"
        )
    dims = inputs[0].type.tensor_type.shape.dim
    if not dims or any(not d.HasField("dim_value") for d in dims[1:]):
        raise LockError(f"input {inputs[0].name!r} needs a fixed shape apart from its batch axis")
    return inputs[0].name, tuple(int(d.dim_value) for d in dims[1:])


def sequential_from_onnx(model: onnx.ModelProto) -> tuple[Any, tuple[int, ...]]:
    """Return (nn.Sequential with the model's weights, the input shape without its batch axis)."""
    from modelcloak.lock.soft import _import_torch

    torch = _import_torch()
    nn = torch.nn
    graph = model.graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    input_name, input_shape = model_input_shape(model, weights)

    def weight(node: onnx.NodeProto, index: int) -> np.ndarray:
        if index >= len(node.input) or node.input[index] not in weights:
            raise LockError(
                f"node {node.name or node.op_type!r} ({node.op_type}) input {index} is not a constant weight"
            )
        return np.array(weights[node.input[index]], dtype=np.float32)

    layers: list[Any] = []
    current = input_name
    nodes = list(graph.node)
    i = 0
    while i < len(nodes):
        node = nodes[i]
        label = f"node {node.name or i!r} ({node.op_type})"
        if not node.input or node.input[0] != current or len(node.output) != 1:
            raise LockError(
                f"{label} does not continue a single chain of layers; the soft lock needs a sequential model"
            )
        extra_data = [name for name in node.input[1:] if name and name not in weights]
        if extra_data:
            raise LockError(f"{label} takes a second activation ({extra_data[0]!r}); the soft lock needs a chain")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        op = node.op_type
        if op == "Conv":
            layers.append(_conv(nn, torch, node, attrs, weight, label))
        elif op == "Gemm":
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                raise LockError(f"{label}: only Gemm with transA=0, alpha=1, beta=1 is supported")
            w = weight(node, 1)
            w = w if attrs.get("transB", 0) else w.T
            bias = weight(node, 2) if len(node.input) > 2 and node.input[2] else None
            layers.append(_linear(nn, torch, w, bias))
        elif op == "MatMul":
            w = weight(node, 1).T
            bias = None
            following = nodes[i + 1] if i + 1 < len(nodes) else None
            if (
                following is not None
                and following.op_type == "Add"
                and following.input[0] == node.output[0]
                and following.input[1] in weights
            ):
                bias = weight(following, 1).reshape(-1)
                node = following
                i += 1
            layers.append(_linear(nn, torch, w, bias))
        elif op == "Relu":
            layers.append(nn.ReLU())
        elif op == "MaxPool":
            layers.append(_max_pool(nn, attrs, label))
        elif op == "Flatten":
            if attrs.get("axis", 1) != 1:
                raise LockError(f"{label}: only Flatten with axis=1 is supported")
            layers.append(nn.Flatten())
        elif op == "Reshape":
            shape = weight(node, 1).astype(np.int64).tolist()
            if len(shape) != 2 or shape[0] not in (0, -1) or shape[1] == 0 or shape[1] < -1:
                raise LockError(f"{label}: only a Reshape that flattens to (batch, -1) is supported, got {shape}")
            layers.append(nn.Flatten())
        elif op not in ("Identity", "Dropout"):
            raise LockError(
                f"{label}: the soft lock does not know this operator (Conv, Gemm, MatMul, Relu, MaxPool, Flatten)"
            )
        current = node.output[0]
        i += 1
    if current != graph.output[0].name:
        raise LockError(f"the chain ends at {current!r}, not at the model's output {graph.output[0].name!r}")
    sequential = nn.Sequential(*layers)
    sequential.eval()
    return sequential, input_shape


def _linear(nn: Any, torch: Any, w: np.ndarray, bias: np.ndarray | None) -> Any:
    layer = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
        if bias is not None:
            layer.bias.copy_(torch.from_numpy(bias))
    return layer


def _symmetric_pads(pads: list[int], label: str) -> tuple[int, int]:
    if len(pads) != 4 or pads[0] != pads[2] or pads[1] != pads[3]:
        raise LockError(f"{label}: only symmetric 2-D padding is supported, got pads {pads}")
    return pads[0], pads[1]


def _conv(
    nn: Any,
    torch: Any,
    node: onnx.NodeProto,
    attrs: dict[str, Any],
    weight: Any,
    label: str,
    *,
    zero_bias: bool = False,
) -> Any:
    """The Conv node as an nn.Conv2d; without a bias input it gets none, or a zero one with `zero_bias`."""
    w = weight(node, 1)
    if w.ndim != 4:
        raise LockError(f"{label}: only 2-D convolutions are supported")
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise LockError(f"{label}: auto_pad is not supported; export with explicit pads")
    group = int(attrs.get("group", 1))
    bias = weight(node, 2) if len(node.input) > 2 and node.input[2] else None
    if bias is None and zero_bias:
        bias = np.zeros(w.shape[0], np.float32)
    layer = nn.Conv2d(
        w.shape[1] * group,
        w.shape[0],
        kernel_size=tuple(w.shape[2:]),
        stride=tuple(attrs.get("strides", [1, 1])),
        padding=_symmetric_pads(list(attrs.get("pads", [0, 0, 0, 0])), label),
        dilation=tuple(attrs.get("dilations", [1, 1])),
        groups=group,
        bias=bias is not None,
    )
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(w))
        if bias is not None:
            layer.bias.copy_(torch.from_numpy(bias))
    return layer


def _max_pool(nn: Any, attrs: dict[str, Any], label: str) -> Any:
    kernel = list(attrs.get("kernel_shape", []))
    if len(kernel) != 2:
        raise LockError(f"{label}: only 2-D max pooling is supported")
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or attrs.get("storage_order", 0):
        raise LockError(f"{label}: auto_pad and storage_order are not supported")
    return nn.MaxPool2d(
        tuple(kernel),
        stride=tuple(attrs.get("strides", [1, 1])),
        padding=_symmetric_pads(list(attrs.get("pads", [0, 0, 0, 0])), label),
        dilation=tuple(attrs.get("dilations", [1, 1])),
        ceil_mode=bool(attrs.get("ceil_mode", 0)),
    )
