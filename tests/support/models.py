"""Small real ONNX models built with onnx.helper, and their reference outputs from onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def make_mlp(sizes: tuple[int, ...] = (16, 64, 32, 10), seed: int = 0) -> onnx.ModelProto:
    """A dense ReLU network with a dynamic batch axis and random weights (distinctive bytes for canary scans)."""
    rng = np.random.default_rng(seed)
    nodes, initializers = [], []
    current = "x"
    for layer, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        weight = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        bias = (rng.standard_normal(fan_out) * 0.1).astype(np.float32)
        initializers += [numpy_helper.from_array(weight, f"w{layer}"), numpy_helper.from_array(bias, f"b{layer}")]
        nodes.append(helper.make_node("Gemm", [current, f"w{layer}", f"b{layer}"], [f"h{layer}"]))
        current = f"h{layer}"
        if layer < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [current], [f"r{layer}"]))
            current = f"r{layer}"
    nodes.append(helper.make_node("Identity", [current], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", sizes[-1]])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="modelcloak-tests")
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def reference_outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]
