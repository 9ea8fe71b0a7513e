"""Four small architectures for the cut tests (issue 3): MLP, CNN, residual block with BatchNorm, text CNN.

Helper module, not a test file. Every builder returns an ONNX ModelProto with a dynamic batch axis
(named "batch"), opset <= 20 and IR <= 10, with seeded random weights, and is cached because the
torch exports take a second or two each. Callers must not modify the returned protos (copy them).
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# The MLP's layer sizes; the hand-computed statistics in test_cut.py depend on them.
MLP_SIZES = (16, 64, 32, 10)
TEXT_VOCAB = 1000
TEXT_LENGTH = 40


@functools.lru_cache(maxsize=None)
def mlp() -> onnx.ModelProto:
    """x[batch,16] -> Gemm(64) -> Relu -> Gemm(32) -> Relu -> Gemm(10) -> Softmax -> probs.

    Node names are fixed (fc0, relu0, fc1, relu1, fc2, softmax) so tests can name cut points.
    """
    rng = np.random.default_rng(0)
    nodes, initializers = [], []
    current = "x"
    for layer, (fan_in, fan_out) in enumerate(zip(MLP_SIZES[:-1], MLP_SIZES[1:])):
        weight = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        bias = (rng.standard_normal(fan_out) * 0.1).astype(np.float32)
        initializers += [numpy_helper.from_array(weight, f"w{layer}"), numpy_helper.from_array(bias, f"b{layer}")]
        nodes.append(helper.make_node("Gemm", [current, f"w{layer}", f"b{layer}"], [f"h{layer}"], name=f"fc{layer}"))
        current = f"h{layer}"
        if layer < len(MLP_SIZES) - 2:
            nodes.append(helper.make_node("Relu", [current], [f"r{layer}"], name=f"relu{layer}"))
            current = f"r{layer}"
    nodes.append(helper.make_node("Softmax", [current], ["probs"], name="softmax", axis=-1))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", MLP_SIZES[0]])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", MLP_SIZES[-1]])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="modelcloak-tests")
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


def _export(net, sample) -> onnx.ModelProto:  # noqa: ANN001 - torch is imported lazily
    from modelcloak.model.torch_export import export_torch

    model = export_torch(net, sample, input_names=["x"], output_names=["logits"], opset=18)
    assert model.ir_version <= 10, model.ir_version
    return model


@functools.lru_cache(maxsize=None)
def cnn() -> onnx.ModelProto:
    """An MNIST-style CNN on x[batch,1,28,28]: two conv/pool stages and a two-layer dense head."""
    import torch
    from torch import nn

    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 7 * 7, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )
    return _export(net, torch.randn(2, 1, 28, 28))


@functools.lru_cache(maxsize=None)
def residual_bn() -> onnx.ModelProto:
    """Conv + BatchNorm + ReLU stem, a residual block (two conv/BN, skip add, BN), global average pool, Linear."""
    import torch
    from torch import nn

    class ResidualNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
            self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(8)
            # The exporter folds a BatchNorm that follows a Conv into the Conv's weights; this one
            # follows the residual add, so a real BatchNormalization node stays in the graph.
            self.post_bn = nn.BatchNorm2d(8)
            self.head = nn.Linear(8, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            skip = self.stem(x)
            y = torch.relu(self.bn1(self.conv1(skip)))
            y = torch.relu(self.post_bn(self.bn2(self.conv2(y)) + skip))  # the skip tensor crosses cuts in the block
            return self.head(y.mean(dim=(2, 3)))

    torch.manual_seed(2)
    net = ResidualNet()
    # Training-mode passes move the BatchNorm running statistics away from (0, 1), so a split that
    # lost or reordered BN parameters would not match the whole model.
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(8, 3, 12, 12) * 2 + 0.5)
    return _export(net, torch.randn(2, 3, 12, 12))


@functools.lru_cache(maxsize=None)
def text_cnn() -> onnx.ModelProto:
    """Embedding(1000, 32) on int64 token ids x[batch,40], Conv1d, ReLU, max over time, Linear."""
    import torch
    from torch import nn

    class TextCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(TEXT_VOCAB, 32)
            self.conv = nn.Conv1d(32, 24, kernel_size=5, padding=2)
            self.head = nn.Linear(24, 4)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            features = torch.relu(self.conv(self.embed(tokens).transpose(1, 2)))
            return self.head(features.amax(dim=2))

    torch.manual_seed(3)
    return _export(TextCNN(), torch.randint(0, TEXT_VOCAB, (2, TEXT_LENGTH)))


BUILDERS = {"mlp": mlp, "cnn": cnn, "residual_bn": residual_bn, "text_cnn": text_cnn}


def sample_input(name: str, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A seeded input batch for the named architecture."""
    rng = np.random.default_rng(seed + batch)
    if name == "mlp":
        return {"x": rng.standard_normal((batch, MLP_SIZES[0])).astype(np.float32)}
    if name == "cnn":
        return {"x": rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)}
    if name == "residual_bn":
        return {"x": rng.standard_normal((batch, 3, 12, 12)).astype(np.float32)}
    if name == "text_cnn":
        return {"x": rng.integers(0, TEXT_VOCAB, (batch, TEXT_LENGTH), dtype=np.int64)}
    raise KeyError(name)
