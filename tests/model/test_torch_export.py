"""export_torch: PyTorch module -> in-memory ONNX with a dynamic batch axis, checked in onnxruntime."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from modelcloak.errors import ModelcloakError
from modelcloak.model.errors import ModelError
from modelcloak.model.torch_export import export_torch

torch = pytest.importorskip("torch")


class ResidualNet(torch.nn.Module):
    """Conv + BatchNorm with a residual add, then a dense head: the layers export can get wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, kernel_size=3, padding=1)
        self.bn = torch.nn.BatchNorm2d(3)
        self.drop = torch.nn.Dropout(0.5)  # must be off in the export (eval mode)
        self.head = torch.nn.Linear(3 * 6 * 6, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x))) + x  # residual add
        return self.head(self.drop(y).flatten(1))


class TwoInputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(5, 3)
        self.b = torch.nn.Linear(2, 3)

    def forward(self, x, z):
        s = self.a(x) + self.b(z)
        return s, torch.cat([s, z], dim=1)


def _dims(value_info: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.fixture(scope="module")
def trained_residual():
    torch.manual_seed(0)
    net = ResidualNet()
    # A few training-mode passes give BatchNorm running statistics far from the defaults (0, 1),
    # so an export that used batch statistics or skipped BN would not match.
    with torch.no_grad():
        for _ in range(5):
            net(torch.randn(16, 3, 6, 6) * 3 + 1)
    assert net.training
    # A batch of one as the sample: the exported batch axis must still be dynamic.
    model = export_torch(net, torch.randn(1, 3, 6, 6), input_names=["x"], output_names=["logits"])
    return net, model


def test_export_is_valid_and_loadable(trained_residual):
    net, model = trained_residual
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 13  # onnxruntime 1.31 reads IR <= 13
    assert [i.name for i in model.graph.input] == ["x"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert net.training, "the module's train/eval mode is restored after export"


def test_batch_axis_is_symbolic(trained_residual):
    _, model = trained_residual
    assert _dims(model.graph.input[0]) == ["batch", 3, 6, 6]
    assert _dims(model.graph.output[0]) == ["batch", 4]


@pytest.mark.parametrize("batch", [1, 7])
def test_onnxruntime_matches_torch_at_any_batch(trained_residual, batch):
    net, model = trained_residual
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(batch, 3, 6, 6, generator=torch.Generator().manual_seed(batch))
    net.eval()
    try:
        with torch.no_grad():
            expected = net(x).numpy()
    finally:
        net.train()
    (got,) = session.run(None, {"x": x.numpy()})
    assert got.shape == (batch, 4)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_multiple_inputs_share_the_batch_axis():
    torch.manual_seed(1)
    net = TwoInputs()
    model = export_torch(net, (torch.randn(2, 5), torch.randn(2, 2)), input_names=["x", "z"], output_names=["s", "c"])
    onnx.checker.check_model(model, full_check=True)
    assert [_dims(v)[0] for v in [*model.graph.input, *model.graph.output]] == ["batch"] * 4
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        x, z = torch.randn(batch, 5), torch.randn(batch, 2)
        with torch.no_grad():
            expected = [t.numpy() for t in net(x, z)]
        got = session.run(None, {"x": x.numpy(), "z": z.numpy()})
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def test_requested_opset_is_honoured():
    model = export_torch(TwoInputs(), (torch.randn(2, 5), torch.randn(2, 2)), opset=18)
    assert {e.domain: e.version for e in model.opset_import}[""] == 18


def test_opset_newer_than_onnxruntime_is_refused():
    with pytest.raises(ModelError, match="opset 27"):
        export_torch(TwoInputs(), (torch.randn(2, 5), torch.randn(2, 2)), opset=27)


@pytest.mark.parametrize(
    ("module", "sample", "message"),
    [
        (object(), None, "torch.nn.Module"),
        (TwoInputs(), [1, 2], "tensor or a non-empty tuple"),
        (TwoInputs(), (), "tensor or a non-empty tuple"),
        (TwoInputs(), (torch.randn(2, 5), 3), "not a torch.Tensor"),
        (TwoInputs(), (torch.tensor(1.0), torch.randn(2, 2)), "scalar"),
    ],
)
def test_bad_arguments_raise_model_error(module, sample, message):
    with pytest.raises(ModelError, match=message):
        export_torch(module, sample)


def test_input_name_count_must_match():
    with pytest.raises(ModelError, match="2 input name"):
        export_torch(TwoInputs(), torch.randn(2, 5), input_names=["x", "z"])


def test_exporter_failure_becomes_model_error():
    class Broken(torch.nn.Module):
        def forward(self, x):
            return self.missing(x)  # AttributeError during tracing

    with pytest.raises(ModelError, match="torch.onnx.export failed for Broken"):
        export_torch(Broken(), torch.randn(2, 3))


def test_missing_torch_gives_install_hint(monkeypatch):
    # None in sys.modules makes `import torch` raise ImportError, as if it were not installed.
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ModelError, match=r"pip install 'modelcloak\[torch\]'") as info:
        export_torch(object(), object())  # type: ignore[arg-type]
    assert isinstance(info.value, ModelcloakError)


def test_newer_ir_version_is_lowered_when_the_opset_allows():
    # torch 2.13 writes IR 10; a newer exporter may stamp IR 14+, which onnxruntime 1.31 refuses.
    from onnx import TensorProto, helper

    from modelcloak.model.torch_export import _fit_ir_version

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 14
    _fit_ir_version(model)
    assert model.ir_version == 13
    onnx.checker.check_model(model, full_check=True)
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    model.opset_import[0].version = 28  # first released with IR 14: cannot go lower
    model.ir_version = 14
    with pytest.raises(ModelError, match="IR version 14 with opset 28"):
        _fit_ir_version(model)
