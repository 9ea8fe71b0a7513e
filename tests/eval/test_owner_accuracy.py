"""`eval accuracy MODEL.onnx --data FILE.npz`: the eNNclave price on an owner's own model (issue 14, item 7).

The owner's model here is a dense network whose layers were trained on *public* digits 0-4 of
scikit-learn's 8x8 digits; the owner's private task is telling apart the digits 5-9, which the
public layers never saw. That is the eNNclave setting: the model as given cannot do the private
task, a head retrained on the frozen public layers can, and fine-tuning everything may do better.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cli_process import run_modelcloak as _cli
from digits_victim import dense_model
from onnx import TensorProto, helper, numpy_helper
from split_models import mlp

from modelcloak.eval.errors import EvalError

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from modelcloak.eval.onnx_torch import OnnxModule  # noqa: E402 - needs torch
from modelcloak.eval.owner_accuracy import distinct_cuts, owner_data, run_owner_accuracy  # noqa: E402
from modelcloak.model.cut import candidate_cuts  # noqa: E402


def _runner(model: onnx.ModelProto):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def _digits() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    public = y < 5
    private_x, private_y = x[~public], y[~public]
    return {
        "public_x": x[public],
        "public_y": y[public],
        "train_x": private_x[:600],
        "train_y": private_y[:600],
        "test_x": private_x[600:],
        "test_y": private_y[600:],
    }


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    return _digits()


@pytest.fixture(scope="module")
def public_model(digits) -> onnx.ModelProto:
    """x[64] -> fc0(32) -> relu -> fc1(16) -> relu -> fc2(10), trained on the public digits 0-4 only."""
    return dense_model(digits["public_x"], digits["public_y"], (32, 16), steps=150)


def _data(digits, **override):
    arrays = {k: digits[k] for k in ("train_x", "train_y", "test_x", "test_y")}
    return owner_data({**arrays, **override}, "digits 5-9")


# --- the interpreter --------------------------------------------------------------------------


def conv_net() -> onnx.ModelProto:
    """x[batch,1,8,8] through every operator family the interpreter runs, with seeded random weights.

    Built with onnx.helper rather than the torch exporter, which takes tens of seconds on a busy
    machine. Node and tensor names are fixed so the cut test can name the cuts.
    """
    rng = np.random.default_rng(0)
    weights = {
        "c0w": rng.standard_normal((4, 1, 3, 3)), "c0b": rng.standard_normal(4) * 0.1,
        "bn_s": 1 + rng.standard_normal(4) * 0.1, "bn_b": rng.standard_normal(4) * 0.1,
        "bn_m": rng.standard_normal(4) * 0.1, "bn_v": 1 + rng.random(4),
        "c1w": rng.standard_normal((6, 4, 3, 3)) * 0.3, "c1b": rng.standard_normal(6) * 0.1,
        "m0w": rng.standard_normal((6 * 2 * 2, 12)) * 0.3, "m0b": rng.standard_normal(12) * 0.1,
        "g1w": rng.standard_normal((10, 12)) * 0.3, "g1b": rng.standard_normal(10) * 0.1,
    }  # fmt: skip
    initializers = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in weights.items()]
    initializers.append(numpy_helper.from_array(np.array([-1, 24], np.int64), "shape"))
    node = helper.make_node
    nodes = [
        node("Conv", ["x", "c0w", "c0b"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        node("BatchNormalization", ["c0", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"], name="bn0"),
        node("Relu", ["bn"], ["r0"], name="relu0"),
        node("MaxPool", ["r0"], ["p0"], name="pool0", kernel_shape=[2, 2], strides=[2, 2]),
        node("Conv", ["p0", "c1w", "c1b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        node("Tanh", ["c1"], ["t1"], name="tanh1"),
        node("AveragePool", ["t1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        node("Reshape", ["p1", "shape"], ["flat"], name="flatten"),
        node("MatMul", ["flat", "m0w"], ["m0"], name="dense0"),
        node("Add", ["m0", "m0b"], ["a0"], name="bias0"),
        node("LeakyRelu", ["a0"], ["r1"], name="relu1", alpha=0.1),
        node("Gemm", ["r1", "g1w", "g1b"], ["logits"], name="dense1", transB=1),
        node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 10])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("build", [mlp, conv_net], ids=["mlp-softmax", "conv-batchnorm"])
def test_the_pytorch_interpretation_computes_what_onnxruntime_computes(build):
    model = build()
    shape = [d.dim_value or 4 for d in model.graph.input[0].type.tensor_type.shape.dim]
    sample = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    module = OnnxModule(model)
    assert module.check_against(_runner(model), sample, what="test") < 1e-4
    assert module.trainable_parameters > 0
    # Negative control: one weight changed, and the comparison refuses.
    with torch.no_grad():
        module.weights[0].add_(0.5)
    with pytest.raises(EvalError, match="differs from onnxruntime"):
        module.check_against(_runner(model), sample, what="test")


def test_an_operator_it_cannot_train_is_refused_by_name():
    node = helper.make_node("Erf", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "erf",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    with pytest.raises(EvalError, match="cannot train: Erf"):
        OnnxModule(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_reinitialise_is_seeded_and_replaces_every_weight(public_model):
    given = [numpy_helper.to_array(i) for i in public_model.graph.initializer]
    first, second, other = OnnxModule(public_model), OnnxModule(public_model), OnnxModule(public_model)
    first.reinitialise(7)
    second.reinitialise(7)
    other.reinitialise(8)
    for a, b, c, old in zip(first.weights, second.weights, other.weights, given):
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert not np.allclose(a.detach().numpy(), old)


def test_default_cuts_are_one_per_distinct_private_part():
    # Cuts after conv0, bn0, relu0 and pool0 leave conv1 and both dense layers private (bn0's
    # scale and shift stay public from bn0 on); after conv1 ... flatten the two dense layers
    # (the Reshape's shape constant is no weight); then dense1 alone. The latest of each.
    model = conv_net()
    after = [cut.after_node for cut in candidate_cuts(model)]
    assert [after[i] for i in distinct_cuts(model)] == ["conv0", "pool0", "flatten", "relu1"]


# --- the data ---------------------------------------------------------------------------------


def test_owner_data_refuses_what_cannot_be_trained_on(digits):
    with pytest.raises(EvalError, match="missing: train_y"):
        owner_data({"train_x": digits["train_x"], "test_x": digits["test_x"], "test_y": digits["test_y"]}, "d.npz")
    with pytest.raises(EvalError, match="differ in length"):
        _data(digits, train_y=digits["train_y"][:-1])
    with pytest.raises(EvalError, match="integer class labels"):
        _data(digits, test_y=digits["test_y"].astype(np.float32))
    with pytest.raises(EvalError, match="sample shape"):
        _data(digits, test_x=digits["test_x"][:, :32])


def test_run_refuses_data_the_model_cannot_take(public_model, digits):
    with pytest.raises(EvalError, match="samples of shape"):
        run_owner_accuracy(
            public_model, _data(digits, train_x=digits["train_x"][:, :32], test_x=digits["test_x"][:, :32])
        )
    with pytest.raises(EvalError, match="labels up to 16 need"):
        run_owner_accuracy(public_model, _data(digits, train_y=digits["train_y"] + 7), progress=False)
    with pytest.raises(EvalError, match="out of range"):
        run_owner_accuracy(public_model, _data(digits), cuts=[99], progress=False)


# --- the measurement --------------------------------------------------------------------------


CUT = 1  # after relu0: fc1 and fc2 are private, fc0 public


@pytest.fixture(scope="module")
def measured(public_model, digits):
    return run_owner_accuracy(public_model, _data(digits), cuts=[CUT], progress=False), CUT


def test_a_retrained_private_head_learns_the_private_task_on_frozen_public_layers(measured, digits):
    result, last = measured
    fixed, flexible = result.results
    assert (fixed.task, fixed.mode, flexible.task, flexible.mode) == (f"cut {last}", "fixed", f"cut {last}", "flexible")
    # The model as given never learnt digits 5-9 (5 classes, chance 20%); observed on 2 busy
    # cores: given 0.00, fixed 0.77, flexible 0.83.
    assert result.given_accuracy < 0.2
    assert fixed.accuracy > 0.6 and flexible.accuracy > 0.6
    assert (fixed.n_train, fixed.n_test) == (600, len(digits["test_y"]))
    assert fixed.train_seconds > 0 and flexible.train_seconds > fixed.train_seconds
    assert "Assumed public" in result.setup and f"cut {last}: after node `relu0`" in result.setup


def test_the_parameter_split_matches_the_cut(measured, public_model):
    result, last = measured
    fixed, flexible = result.results
    private = (32 * 16 + 16) + (16 * 10 + 10)  # fc1, fc2
    assert fixed.private_parameters == private == candidate_cuts(public_model)[last].private_parameters
    assert fixed.public_parameters == 64 * 32 + 32  # fc0
    assert flexible.public_parameters == 0
    assert flexible.private_parameters == fixed.total_parameters == fixed.public_parameters + private


def test_with_random_labels_the_head_learns_nothing(public_model, digits):
    # Negative control: the same run, with the training labels shuffled, stays near chance (5
    # classes), so the accuracy above comes from the data and not from the harness.
    shuffled = np.random.default_rng(1).permutation(digits["train_y"])
    result = run_owner_accuracy(public_model, _data(digits, train_y=shuffled), cuts=[CUT], progress=False)
    assert all(r.accuracy < 0.4 for r in result.results), result.results


def test_a_rerun_with_the_same_seed_is_identical(measured, public_model, digits):
    result, last = measured
    again = run_owner_accuracy(public_model, _data(digits), cuts=[last], progress=False)
    assert [r.accuracy for r in again.results] == [r.accuracy for r in result.results]


# --- the command ------------------------------------------------------------------------------


@pytest.mark.slow  # a child process that imports torch and trains: ~30 s on two busy cores
def test_eval_accuracy_on_the_owners_model_writes_the_report(tmp_path, public_model, digits):
    (tmp_path / "model.onnx").write_bytes(public_model.SerializeToString())
    np.savez(tmp_path / "data.npz", **{k: digits[k] for k in ("train_x", "train_y", "test_x", "test_y")})
    result = _cli("eval", "accuracy", "model.onnx", "--data", "data.npz", "--cuts", "3", "--epochs", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "model.onnx as given: test accuracy" in result.stdout
    assert "cut 3" in result.stdout and "flexible" in result.stdout
    assert "cut 3 fixed: private part" in result.stderr  # progress goes to stderr, not into the table
    assert "private part" not in result.stdout.split("as given")[0]
    report = (tmp_path / "eval-accuracy" / "accuracy.md").read_text()
    assert "Assumed public" in report and "| cut 3 | fixed |" in report
    rows = (tmp_path / "eval-accuracy" / "accuracy.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith("cut 3,fixed,")
    assert (tmp_path / "eval-accuracy" / "accuracy.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("model.onnx",), "needs --data"),
        (("model.onnx", "--data", "data.npz", "--task", "mnist"), "not both"),
        (("--data", "data.npz"), "go with MODEL.onnx"),
        (("model.onnx", "--data", "pool.npz"), "missing: train_x, train_y"),
        (("model.onnx", "--data", "data.npz", "--epochs", "0"), "epochs must be at least 1"),
    ],
)
def test_eval_accuracy_refuses_bad_input_in_one_line(tmp_path, public_model, digits, args, message):
    (tmp_path / "model.onnx").write_bytes(public_model.SerializeToString())
    np.savez(tmp_path / "data.npz", **{k: digits[k] for k in ("train_x", "train_y", "test_x", "test_y")})
    np.savez(tmp_path / "pool.npz", pool_x=digits["train_x"], test_x=digits["test_x"], test_y=digits["test_y"])
    result = _cli("eval", "accuracy", *args, cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("modelcloak: warning: ")]
    assert len(lines) == 1 and lines[0].startswith("modelcloak: error: ") and message in lines[0], result.stderr
