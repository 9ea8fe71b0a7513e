"""`modelcloak soft-lock` on model files and the owner's data, run as a user would (subprocesses).

The full runs train an 8x8-digits classifier, save it as ONNX (built by hand, so the ONNX path
is the one users have) or as a pickled PyTorch module, soft-lock it from the command line, and
read the report: FP32 keeps its accuracy while FP16 and both INT8 formats fall to chance, and the
original model in the same formats keeps its accuracy (the control that shows the report can
show a failed lock). The fast tests check the ONNX -> nn.Sequential rebuild against onnxruntime
and the one-line errors.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cli_process import run_modelcloak as cli
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from modelcloak.lock.errors import LockError  # noqa: E402
from modelcloak.lock.from_onnx import sequential_from_onnx  # noqa: E402
from modelcloak.training import train_classifier  # noqa: E402

nn = torch.nn


def one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modelcloak: error: ") and fragment in lines[0], result.stderr


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16).astype(np.float32), y.astype(np.int64)


def cnn_onnx(seed: int = 0) -> onnx.ModelProto:
    """Conv -> Relu -> MaxPool -> Reshape -> Gemm -> Relu -> Gemm on 1x8x8, random weights."""
    rng = np.random.default_rng(seed)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "c.w", "c.b"], ["c"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["p", "shape"], ["f"]),
        helper.make_node("Gemm", ["f", "g1.w", "g1.b"], ["g1"], transB=1),
        helper.make_node("Relu", ["g1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "g2.w"], ["m2"]),
        helper.make_node("Add", ["m2", "g2.b"], ["logits"]),
    ]
    inits = [
        init("c.w", 6, 1, 3, 3), init("c.b", 6), init("g1.w", 32, 96), init("g1.b", 32),
        init("g2.w", 32, 10), init("g2.b", 10),
        numpy_helper.from_array(np.array([-1, 96], dtype=np.int64), "shape"),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def onnx_from_sequential(model: nn.Sequential, template: onnx.ModelProto) -> onnx.ModelProto:
    """`template` with its weights replaced by the trained ones (same layer order)."""
    conv, first, last = model[0], model[4], model[6]
    weights = {
        "c.w": conv.weight, "c.b": conv.bias, "g1.w": first.weight, "g1.b": first.bias,
        "g2.w": last.weight.T, "g2.b": last.bias,
    }  # fmt: skip
    trained = onnx.ModelProto()
    trained.CopyFrom(template)
    for tensor in trained.graph.initializer:
        if tensor.name in weights:
            array = weights[tensor.name].detach().numpy().astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), tensor.name))
    return trained


def test_onnx_chain_is_rebuilt_with_the_same_outputs():
    model = cnn_onnx()
    sequential, shape = sequential_from_onnx(model)
    assert shape == (1, 8, 8)
    assert [type(layer).__name__ for layer in sequential] == [
        "Conv2d", "ReLU", "MaxPool2d", "Flatten", "Linear", "ReLU", "Linear",
    ]  # fmt: skip
    x = np.random.default_rng(1).standard_normal((5, 1, 8, 8)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[
        0
    ]
    with torch.no_grad():
        got = sequential(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_a_branching_onnx_model_is_refused_naming_the_node():
    model = cnn_onnx()
    # A residual-style second use of the input: the chain is broken at the Add.
    model.graph.node[-1].input[1] = "m2"
    with pytest.raises(LockError, match="second activation"):
        sequential_from_onnx(model)
    model = cnn_onnx()
    model.graph.node.insert(1, helper.make_node("Sigmoid", ["c"], ["s"]))
    model.graph.node[2].input[0] = "s"
    with pytest.raises(LockError, match="Sigmoid"):
        sequential_from_onnx(model)


def test_cli_refuses_bad_data_and_unsupported_models_in_one_line(tmp_path):
    model_path = tmp_path / "cnn.onnx"
    onnx.save(cnn_onnx(), model_path)
    np.savez(tmp_path / "nolabels.npz", x=np.zeros((4, 1, 8, 8), np.float32))
    one_line_error(
        cli("soft-lock", str(model_path), "--data", str(tmp_path / "nolabels.npz"), "-o", str(tmp_path / "o.onnx")),
        "has no array 'y'",
    )
    one_line_error(
        cli("soft-lock", str(model_path), "--data", str(tmp_path / "missing.npz"), "-o", str(tmp_path / "o.onnx")),
        "does not exist",
    )
    broken = cnn_onnx()
    broken.graph.node[-1].op_type = "Sub"  # not a layer the soft lock knows
    onnx.save(broken, tmp_path / "sub.onnx")
    x, y = digits()
    np.savez(tmp_path / "d.npz", x=x[:50].reshape(-1, 1, 8, 8), y=y[:50])
    one_line_error(
        cli("soft-lock", str(tmp_path / "sub.onnx"), "--data", str(tmp_path / "d.npz"), "-o", str(tmp_path / "o.onnx")),
        "(Sub)",
    )
    assert not (tmp_path / "o.onnx").exists()


def check_report(report: dict, chance_bound: float = 0.05) -> None:
    original, locked, chance = report["accuracy"]["original"], report["accuracy"]["soft_locked"], report["chance"]
    # Control: the unlocked model keeps its accuracy in every format, so "at chance" below means the lock.
    assert min(original.values()) > 0.8, original
    assert locked["fp32"] >= original["fp32"] - 0.03, (original, locked)
    for variant in ("fp16", "int8-dynamic", "int8-static"):
        assert locked[variant] <= chance + chance_bound, (variant, locked, chance)


@pytest.mark.slow
def test_cli_soft_locks_an_onnx_model_and_reports_every_format(tmp_path):
    x, y = digits()
    x = x.reshape(-1, 1, 8, 8)
    template = cnn_onnx()
    trained = train_classifier(sequential_from_onnx(template)[0], x[:1400], y[:1400], epochs=15, progress=False)
    onnx.save(onnx_from_sequential(trained, template), tmp_path / "cnn.onnx")
    np.savez(tmp_path / "train.npz", x=x[:1400], y=y[:1400])
    np.savez(tmp_path / "test.npz", x=x[1400:], y=y[1400:])
    result = cli(
        "soft-lock", str(tmp_path / "cnn.onnx"), "--data", str(tmp_path / "train.npz"),
        "--test-data", str(tmp_path / "test.npz"), "-o", str(tmp_path / "locked.onnx"),
        "--report", str(tmp_path / "report.json"), "--epochs", "4",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "int8-static" in result.stdout and "soft-locked" in result.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    check_report(report)
    # The written model is the locked one: same FP32 accuracy in a fresh onnxruntime session.
    session = ort.InferenceSession(str(tmp_path / "locked.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x[1400:]})[0]
    assert np.mean(np.argmax(logits, 1) == y[1400:]) == pytest.approx(report["accuracy"]["soft_locked"]["fp32"])


@pytest.mark.slow
def test_cli_soft_locks_a_saved_pytorch_module_with_a_holdout(tmp_path):
    x, y = digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    train_classifier(model, x, y, epochs=20, progress=False)
    torch.save(model, tmp_path / "mlp.pt")
    np.savez(tmp_path / "all.npz", x=x, y=y)
    result = cli(
        "soft-lock", str(tmp_path / "mlp.pt"), "--data", str(tmp_path / "all.npz"), "--holdout", "0.3",
        "-o", str(tmp_path / "locked.onnx"), "--report", str(tmp_path / "report.json"), "--epochs", "8",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["test_size"] == round(len(x) * 0.3)
    check_report(report)
    # An existing output is not overwritten without --force.
    again = cli(
        "soft-lock", str(tmp_path / "mlp.pt"), "--data", str(tmp_path / "all.npz"), "-o", str(tmp_path / "locked.onnx")
    )
    one_line_error(again, "already exists")
