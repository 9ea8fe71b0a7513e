"""A small real victim for the evaluation tests: dense networks trained on scikit-learn's 8x8 digits.

The digits (1,797 real images shipped in the wheel) are split deterministically into 397 test,
800 victim-training and 600 attacker-pool images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


@dataclass(frozen=True)
class DigitsSplit:
    train_x: np.ndarray
    train_y: np.ndarray
    pool_x: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def digits_split() -> DigitsSplit:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    test, train, pool = order[:397], order[397:1197], order[1197:]
    return DigitsSplit(x[train], y[train], x[pool], x[test], y[test])


def dense_model(x: np.ndarray, y: np.ndarray, hidden: tuple[int, ...] = (32,), steps: int = 200) -> onnx.ModelProto:
    """Train x[64] -> (Gemm -> Relu)* -> Gemm(10) with torch (seeded, full batch); return it as plain ONNX."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is faster and immune to busy cores
    widths = (x.shape[1], *hidden, 10)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layers: list[torch.nn.Module] = []
        for i in range(len(widths) - 1):
            layers.append(torch.nn.Linear(widths[i], widths[i + 1]))
            if i < len(widths) - 2:
                layers.append(torch.nn.ReLU())
        net = torch.nn.Sequential(*layers)
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
        inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
        for _ in range(steps):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(inputs), targets).backward()
            optimizer.step()
    torch.set_num_threads(threads)
    linear = [m for m in net if isinstance(m, torch.nn.Linear)]
    nodes, weights, current = [], [], "x"
    for i, layer in enumerate(linear):
        w, b = (p.detach().numpy().astype(np.float32) for p in (layer.weight, layer.bias))
        weights += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        last = i == len(linear) - 1
        out = "logits" if last else f"h{i}"
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [out], name=f"fc{i}", transB=1))
        current = out
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"], name=f"relu{i}"))
            current = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "digits",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", x.shape[1]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model
