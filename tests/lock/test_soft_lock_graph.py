"""The soft lock for ONNX graphs with branches: residual adds, concatenations, folded BatchNorm.

The model is a small residual CNN written as ordinary PyTorch (`modelcloak.zoo.residual`: two
ResNet-style basic blocks with BatchNorm, an Inception-style concatenation of two branches,
global average pooling) and exported by torch's own ONNX exporter, so the graph is what an
owner's export produces, not one shaped for this converter. The fast tests check the rebuild
of a hand-built residual graph against onnxruntime and where the lock site may and may not go;
the slow ones rebuild the exported CNN and soft-lock it from the command line, with the
original model in the same formats as the control.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cli_process import run_modelcloak as cli
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from modelcloak.lock.errors import LockError  # noqa: E402
from modelcloak.lock.from_onnx import module_from_onnx  # noqa: E402
from modelcloak.lock.soft import find_lock_site, soft_lock  # noqa: E402
from modelcloak.model.torch_export import export_torch  # noqa: E402
from modelcloak.training import train_classifier  # noqa: E402
from modelcloak.zoo.residual import residual_cnn  # noqa: E402

nn = torch.nn


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16).astype(np.float32).reshape(-1, 1, 8, 8), y.astype(np.int64)


@pytest.fixture(scope="module")
def exported() -> onnx.ModelProto:
    """The untrained residual CNN through torch's exporter (10-20 s on a loaded 2-core VM)."""
    net = residual_cnn(seed=0)
    for module in net.modules():  # BatchNorm statistics away from the identity, so folding matters
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.3, 0.3)
    return export_torch(net, torch.zeros(2, 1, 8, 8))


@pytest.mark.slow
def test_an_exported_residual_graph_is_rebuilt_with_the_same_outputs(exported):
    model = exported
    ops = {node.op_type for node in model.graph.node}
    assert {"Add", "Concat"} <= ops, ops  # really a graph with branches and joins
    module, shape = module_from_onnx(model)
    assert shape == (1, 8, 8) and type(module).__name__ == "GraphModule"
    x = np.random.default_rng(1).standard_normal((5, 1, 8, 8)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_the_lock_site_skips_relus_that_feed_a_residual_add(exported):
    module, _ = module_from_onnx(exported)
    site = find_lock_site(module)
    nodes = {node.target: node for node in module.graph.nodes if node.op == "call_module"}
    # The stem's ReLU also feeds the block's residual Add (the offset would not cancel there):
    # the site is the first ReLU with a single use, the block's inner conv1 -> relu -> conv2.
    first_relu = next(node for node in module.graph.nodes if node.op == "call_module" and "relu" in node.target)
    assert len(first_relu.users) == 2 and site.relu != first_relu.target
    assert len(nodes[site.producer].users) == 1 and len(nodes[site.relu].users) == 1
    assert [user.target for user in nodes[site.relu].users] == [site.consumer]
    # The PyTorch module itself (BatchNorm folded by torch's fuse) has the same site.
    assert find_lock_site(residual_cnn()).producer == "block.conv1"


def _residual_only(double_use: bool) -> onnx.ModelProto:
    """x -> Conv -> Relu -> Conv (-> + Relu's output when `double_use`) -> Flatten -> Gemm."""
    rng = np.random.default_rng(0)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "c2.w", "c2.b"], ["c2"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Add", ["c2", "r1" if double_use else "c2"], ["sum"]),
        helper.make_node("Flatten", ["sum"], ["f"]),
        helper.make_node("Gemm", ["f", "g.w", "g.b"], ["logits"], transB=1),
    ]
    inits = [init("c1.w", 4, 1, 3, 3), init("c1.b", 4), init("c2.w", 4, 4, 3, 3), init("c2.b", 4)]
    inits += [init("g.w", 10, 256), init("g.b", 10)]
    graph = helper.make_graph(
        nodes,
        "residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_relu_whose_output_also_feeds_an_add_is_not_a_site():
    # Control: the same graph where the Add does not reuse the ReLU's output has a site.
    site = find_lock_site(module_from_onnx(_residual_only(double_use=False))[0])
    assert (site.producer, site.consumer) == ("conv_0", "conv_2")
    residual = _residual_only(double_use=True)
    module, _ = module_from_onnx(residual)
    with pytest.raises(LockError, match="each value used once"):
        find_lock_site(module)
    # The rebuilt residual graph computes what onnxruntime computes.
    x = np.random.default_rng(2).standard_normal((3, 1, 8, 8)).astype(np.float32)
    expected = ort.InferenceSession(residual.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]
    with torch.no_grad():
        np.testing.assert_allclose(module(torch.from_numpy(x)).numpy(), expected, rtol=1e-5, atol=1e-5)
    x = np.zeros((4, 1, 8, 8), np.float32)
    with pytest.raises(LockError, match="each value used once"):
        soft_lock(module_from_onnx(_residual_only(double_use=True))[0], x, np.zeros(4, np.int64))


def test_unknown_operators_and_batchnorm_without_a_conv_are_refused_naming_the_node():
    model = _residual_only(double_use=True)
    model.graph.node[3].op_type = "Mul"
    with pytest.raises(LockError, match=r"\(Mul\): the soft lock does not know this operator"):
        module_from_onnx(model)
    model = _residual_only(double_use=True)
    bn = [numpy_helper.from_array(np.ones(4, np.float32), name) for name in ("s", "b", "m", "v")]
    model.graph.initializer.extend(bn)
    model.graph.node.insert(4, helper.make_node("BatchNormalization", ["sum", "s", "b", "m", "v"], ["bn"]))
    model.graph.node[5].input[0] = "bn"
    with pytest.raises(LockError, match="only a BatchNormalization right after a Conv"):
        module_from_onnx(model)


@pytest.mark.slow
def test_cli_soft_locks_an_exported_residual_cnn_and_reports_every_format(tmp_path):
    x, y = digits()
    net = residual_cnn(seed=0)
    train_classifier(net, x[:1400], y[:1400], epochs=8, progress=False)
    onnx.save(export_torch(net, torch.from_numpy(x[:2])), tmp_path / "residual.onnx")
    np.savez(tmp_path / "train.npz", x=x[:1400], y=y[:1400])
    np.savez(tmp_path / "test.npz", x=x[1400:], y=y[1400:])
    result = cli(
        "soft-lock", str(tmp_path / "residual.onnx"), "--data", str(tmp_path / "train.npz"),
        "--test-data", str(tmp_path / "test.npz"), "-o", str(tmp_path / "locked.onnx"),
        "--report", str(tmp_path / "report.json"), "--epochs", "6",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    original, locked, chance = report["accuracy"]["original"], report["accuracy"]["soft_locked"], report["chance"]
    # Control: the original residual CNN keeps its accuracy in every format, so "at chance" is the lock.
    assert min(original.values()) > 0.85, original
    # Measured: -3.0 points after --epochs 6 (removing a ReLU inside a residual block and holding
    # its consumer's channel sums at zero costs a little more than on a chain); bound 4 points.
    assert locked["fp32"] >= original["fp32"] - 0.04, (original, locked)
    for variant in ("fp16", "int8-dynamic", "int8-static"):
        assert locked[variant] <= chance + 0.05, (variant, locked, chance)
    assert report["lock_site"]["producer"] == "conv_2"  # inside the first residual block
    # The written model is the locked one, and still has the branches.
    written = onnx.load(tmp_path / "locked.onnx")
    assert {"Add", "Concat"} <= {node.op_type for node in written.graph.node}
    session = ort.InferenceSession(str(tmp_path / "locked.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x[1400:]})[0]
    assert np.mean(np.argmax(logits, 1) == y[1400:]) == pytest.approx(locked["fp32"])
