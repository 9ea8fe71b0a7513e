"""Cutting graphs into a public front and a private back (issue 3, item 1).

Every candidate cut of four architectures (MLP, CNN with pooling, residual block with BatchNorm,
Embedding + Conv1d text model) is split and run: public then private must equal the whole model.
Hand-built graphs cover what exporters rarely produce: unnamed and unsorted nodes, weights behind
constant subgraphs, a custom-domain op whose shapes only the onnxruntime probe can find, a graph
input only the private side reads, control flow reading outer tensors, and tied weights.
"""

from __future__ import annotations

import functools
import importlib.util

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from split_models import BUILDERS, MLP_SIZES, sample_input

from modelcloak.model.cut import Cut, _Graph, candidate_cuts, describe_cut_table, find_cut, split_model
from modelcloak.model.errors import ModelError

ARCHITECTURES = ["mlp", "cnn", "residual_bn", "text_cnn"]
TORCH_MISSING = importlib.util.find_spec("torch") is None


def _model(name: str) -> onnx.ModelProto:
    if name != "mlp" and TORCH_MISSING:
        pytest.skip("torch is not installed")
    return BUILDERS[name]()


@functools.lru_cache(maxsize=None)
def _cuts(name: str) -> tuple[Cut, ...]:
    return tuple(candidate_cuts(_model(name)))


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _run_split(
    public: ort.InferenceSession, private: ort.InferenceSession, cut: Cut, feeds: dict[str, np.ndarray]
) -> list[np.ndarray]:
    """What the runtime does: public on the caller's inputs, then the boundary into private."""
    produced = dict(zip([o.name for o in public.get_outputs()], public.run(None, feeds)))
    crossing = {name: produced[name] if name in produced else feeds[name] for name in cut.tensors}
    return private.run(None, crossing)


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _parameter_names(model: onnx.ModelProto) -> set[str]:
    """Initializers that are real weights (float, >= 2 elements), not shape constants."""
    return {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and int(np.prod(t.dims)) >= 2}


def _check_all_cuts(model: onnx.ModelProto, cuts: list[Cut] | tuple[Cut, ...], feeds_for) -> None:  # noqa: ANN001
    whole = _session(model)
    input_names = [i.name for i in model.graph.input]
    output_names = [o.name for o in model.graph.output]
    for cut in cuts:
        public, private = split_model(model, cut)
        for part in (public, private):
            onnx.checker.check_model(part, full_check=True)
            assert list(part.opset_import) == list(model.opset_import), "opset imports (custom domains too) are kept"
        assert [i.name for i in public.graph.input] == input_names, "the public part takes the model's own inputs"
        assert [i.name for i in private.graph.input] == list(cut.tensors)
        assert [o.name for o in private.graph.output] == output_names
        for value, spec in zip(private.graph.input, cut.boundary):
            assert value.name == spec.name
            assert len(_dims(value)) == len(spec.shape), f"{spec.name}: boundary rank is declared"
        public_session, private_session = _session(public), _session(private)
        for batch in (1, 5):
            feeds = feeds_for(batch)
            expected = whole.run(None, feeds)
            got = _run_split(public_session, private_session, cut, feeds)
            for want, have in zip(expected, got):
                assert have.shape == want.shape, (cut.after_node, batch)
                diff = float(np.max(np.abs(have.astype(np.float64) - want))) if want.size else 0.0
                assert diff <= 1e-5, f"cut after {cut.after_node!r} at batch {batch}: max abs diff {diff}"
                assert np.array_equal(have.argmax(axis=-1), want.argmax(axis=-1)), (cut.after_node, batch)


# -- the four architectures --------------------------------------------------------------------


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_candidate_cut_reproduces_the_whole_model(name):
    model = _model(name)
    cuts = _cuts(name)
    assert len(cuts) >= 4, [c.after_node for c in cuts]
    assert [c.index for c in cuts] == list(range(len(cuts)))
    _check_all_cuts(model, cuts, lambda batch: sample_input(name, batch))


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_parts_keep_the_dynamic_batch_and_do_not_share_weights(name):
    model = _model(name)
    for cut in _cuts(name):
        public, private = split_model(model, cut)
        assert all(spec.shape[0] == "batch" for spec in cut.boundary), cut.boundary
        assert all(_dims(v)[0] == "batch" for v in [*private.graph.input, *private.graph.output, *public.graph.output])
        # Weights are never passed through the boundary, and none of these models uses a weight
        # on both sides, so each weight lives in exactly one part.
        assert not (_parameter_names(public) & _parameter_names(private)), cut.after_node
        assert _parameter_names(public) | _parameter_names(private) == _parameter_names(model)
        assert len(private.graph.node) == cut.private_nodes


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_cut_statistics_agree_between_the_sweep_and_the_direct_path(name):
    """candidate_cuts computes statistics incrementally; a cut given by tensors recomputes them."""
    graph = _Graph(_model(name))
    for cut in _cuts(name):
        direct = graph.cut_for(list(cut.tensors), [])  # no candidates: forces the direct computation
        assert direct == Cut(**{**cut.__dict__, "index": -1}), cut.after_node


def test_candidate_cuts_are_deterministic():
    again = candidate_cuts(_model("residual_bn"))
    assert tuple(again) == _cuts("residual_bn")


def test_residual_cuts_carry_the_skip_tensor():
    model = _model("residual_bn")
    assert any(n.op_type == "BatchNormalization" for n in model.graph.node), "the model exercises a real BN node"
    skip = _skip_tensor(model)
    two = [c for c in _cuts("residual_bn") if len(c.tensors) == 2]
    assert two, "a cut inside the residual block must carry two tensors"
    assert all(skip in c.tensors for c in two), (skip, [c.tensors for c in two])
    assert all(c.boundary_bytes == 2 * 8 * 12 * 12 * 4 for c in two)


def _skip_tensor(model: onnx.ModelProto) -> str:
    """The residual add's input that comes from the stem's ReLU (the skip connection)."""
    relu_outputs = {n.output[0] for n in model.graph.node if n.op_type == "Relu"}
    add = next(n for n in model.graph.node if n.op_type == "Add")
    return next(name for name in add.input if name in relu_outputs)


# -- statistics, by hand ---------------------------------------------------------------------------


def test_mlp_statistics_are_hand_computed():
    cuts = _cuts("mlp")
    # After fc2 only the Softmax would be private: nothing confidential, so not a candidate.
    assert [c.after_node for c in cuts] == ["fc0", "relu0", "fc1", "relu1"]
    d0, d1, d2, d3 = MLP_SIZES  # 16, 64, 32, 10
    last_two = d1 * d2 + d2 + d2 * d3 + d3  # fc1 and fc2 weights and biases: 2410
    last_one = d2 * d3 + d3  # fc2: 330

    after_relu0 = cuts[1]
    assert after_relu0.tensors == ("r0",)
    assert after_relu0.boundary[0].name == "r0"
    assert after_relu0.boundary[0].dtype == "float32"
    assert after_relu0.boundary[0].shape == ("batch", d1)
    assert after_relu0.boundary_bytes == d1 * 4 == 256
    assert after_relu0.private_nodes == 4  # fc1, relu1, fc2, softmax
    assert after_relu0.private_parameters == last_two == 2410
    assert after_relu0.private_weight_bytes == last_two * 4
    assert after_relu0.private_flops == 2 * (d1 * d2 + d2 * d3) == 4736
    assert after_relu0.private_layers == 2

    after_fc0 = cuts[0]
    assert after_fc0.private_nodes == 5
    assert after_fc0.private_parameters == last_two
    assert after_fc0.tensors == ("h0",)

    after_relu1 = cuts[3]
    assert after_relu1.boundary_bytes == d2 * 4 == 128
    assert after_relu1.private_nodes == 2
    assert after_relu1.private_parameters == last_one == 330
    assert after_relu1.private_weight_bytes == 1320
    assert after_relu1.private_flops == 2 * d2 * d3 == 640
    assert after_relu1.private_layers == 1


def test_conv_flops_are_counted():
    cuts = _cuts("cnn")
    # Private part after the first conv stage: conv2 (8->16, 3x3 on 14x14) + fc 784->32 + fc 32->10.
    after_pool1 = next(c for c in cuts if c.boundary[0].shape == ("batch", 8, 14, 14))
    assert after_pool1.private_flops == 2 * (16 * 14 * 14 * 8 * 9 + 784 * 32 + 32 * 10)


def test_describe_cut_table_rows():
    rows = describe_cut_table(list(_cuts("mlp")))
    assert [r["after_node"] for r in rows] == ["fc0", "relu0", "fc1", "relu1"]
    assert rows[1] == {
        "index": 1,
        "after_node": "relu0",
        "boundary": "r0: float32[batch,64]",
        "boundary_tensors": 1,
        "boundary_bytes": 256,
        "private_layers": 2,
        "private_nodes": 4,
        "private_parameters": 2410,
        "private_weight_bytes": 9640,
        "private_flops": 4736,
    }
    assert describe_cut_table([]) == []


# -- find_cut --------------------------------------------------------------------------------------


def test_find_cut_selectors_on_the_mlp():
    model = _model("mlp")
    cuts = _cuts("mlp")
    assert find_cut(model, after_node="relu0") == cuts[1]
    assert find_cut(model, tensors=["r0"]) == cuts[1]
    assert find_cut(model, tensors="h1") == cuts[2]
    assert find_cut(model, index=0) == cuts[0]
    assert find_cut(model, index=3) == cuts[3]
    # "last N": the smallest private part that holds the last N weight-carrying layers.
    assert find_cut(model, last=1).after_node == "relu1"
    assert find_cut(model, last=2).after_node == "relu0"


def test_find_cut_selectors_on_the_residual_model():
    model = _model("residual_bn")
    cuts = _cuts("residual_bn")
    two = next(c for c in cuts if len(c.tensors) == 2)
    assert find_cut(model, tensors=list(reversed(two.tensors))) == two
    assert find_cut(model, after_node=two.after_node) == two
    assert find_cut(model, last=1).private_layers == 1
    assert find_cut(model, last=1).tensors == ("mean",)  # only the dense head stays private
    assert find_cut(model, last=3) == cuts[1]  # after the stem's ReLU: the whole block is private


@pytest.mark.parametrize(
    ("selectors", "message"),
    [
        ({}, r"exactly one of after_node, tensors, last or index \(got: none\)"),
        ({"index": 0, "last": 1}, r"exactly one .*got: last, index"),
        ({"after_node": "nope"}, r"no node named 'nope'"),
        ({"after_node": "fc2"}, r"leaves nothing confidential"),
        ({"after_node": "softmax"}, r"would produce graph output 'probs'"),
        ({"tensors": ["nope"]}, r"no tensor named 'nope'"),
        ({"tensors": []}, r"at least one boundary tensor"),
        ({"tensors": ["w1"]}, r"'w1' is a constant"),
        ({"tensors": ["probs"]}, r"'probs' is a graph output"),
        ({"tensors": ["r0", "r1"]}, r"'r0' does not cross this cut"),
        ({"tensors": ["x"]}, r"every boundary tensor is a graph input"),
        ({"last": 0}, r"last must be a positive number of layers, got 0"),
        ({"last": True}, r"last must be a positive number"),
        ({"last": 3}, r"no valid cut leaves exactly the last 3 layers private; possible counts: \[1, 2\]"),
        ({"last": 9}, r"more layers than the model has \(3 weight-carrying nodes\)"),
        ({"index": 4}, r"cut index 4 is out of range: the model has 4 candidate cuts \(0-3\)"),
        ({"index": -1}, r"cut index -1 is out of range"),
    ],
)
def test_bad_selectors_raise_one_line_model_errors(selectors, message):
    with pytest.raises(ModelError, match=message) as caught:
        find_cut(_model("mlp"), **selectors)
    assert "\n" not in str(caught.value)


def test_tensors_that_miss_the_skip_connection_do_not_separate_the_graph():
    model = _model("residual_bn")
    two = next(c for c in _cuts("residual_bn") if len(c.tensors) == 2)
    inner = [t for t in two.tensors if t != _skip_tensor(model)]
    assert len(inner) == 1
    with pytest.raises(ModelError, match=r"do not separate the graph: the private part would also need graph input"):
        find_cut(model, tensors=inner)


def test_split_model_rejects_a_cut_from_another_model():
    foreign = _cuts("mlp")[1]
    with pytest.raises(ModelError, match=r"no tensor named 'r0'"):
        split_model(_model("residual_bn"), foreign)


# -- hand-built graphs -----------------------------------------------------------------------------


def _rng_feeds(spec: dict[str, tuple[tuple[int, ...], type]], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + batch)
    feeds = {}
    for name, (shape, dtype) in spec.items():
        if dtype is np.int64:
            feeds[name] = rng.integers(0, 20, (batch, *shape), dtype=np.int64)
        else:
            feeds[name] = rng.standard_normal((batch, *shape)).astype(dtype)
    return feeds


def _plumbing_model() -> onnx.ModelProto:
    """Unnamed, unsorted nodes; a weight behind a Transpose; a com.microsoft op; Shape plumbing;
    a second input only the private side reads; a dead node."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal((6, 8)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal((6, 3)).astype(np.float32), "W2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["g", "W2"], ["m2"]),  # listed before its input exists
        helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),  # a constant subgraph
        helper.make_node("MatMul", ["x", "Wt"], ["m1"]),
        helper.make_node("Gelu", ["m1"], ["g0"], domain="com.microsoft"),  # onnx cannot infer its shape
        helper.make_node("Shape", ["g0"], ["shape"]),
        helper.make_node("Reshape", ["g0", "shape"], ["g"]),
        helper.make_node("Add", ["m2", "y"], ["out"]),
        helper.make_node("Relu", ["x"], ["dead"]),
    ]
    graph = helper.make_graph(
        nodes,
        "plumbing",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3])],
        weights,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 9
    return model


def test_unsorted_graph_with_constants_custom_ops_and_private_only_input():
    model = _plumbing_model()
    cuts = candidate_cuts(model)
    # Unnamed nodes are named <op_type>_<i>; the constant Transpose is never a cut point, and the
    # dead Relu is dropped.
    assert [c.after_node for c in cuts] == ["MatMul_2", "Gelu_3", "Shape_4", "Reshape_5"]
    assert all(c.tensors[0] == "y" for c in cuts), "an input only the private side reads crosses the cut"
    assert all("Wt" not in c.tensors for c in cuts), "constants are rebuilt, never crossed"
    # The Gelu output's shape came from the onnxruntime probe, with the model's batch symbol.
    after_gelu = cuts[1]
    assert after_gelu.boundary[1].name == "g0" and after_gelu.boundary[1].shape == ("N", 6)
    assert cuts[2].boundary[2].dtype == "int64" and cuts[2].boundary[2].shape == (2,)
    for cut in cuts:
        public, private = split_model(model, cut)
        assert [t.name for t in public.graph.initializer] == ["W"]
        assert [t.name for t in private.graph.initializer] == ["W2"]
        assert not any(n.name == "Relu_7" for n in [*public.graph.node, *private.graph.node])
    _check_all_cuts(model, cuts, lambda b: _rng_feeds({"x": ((8,), np.float32), "y": ((3,), np.float32)}, b))


def test_control_flow_reading_outer_tensors():
    """An If whose branches read a weight and a tensor from the enclosing graph."""
    rng = np.random.default_rng(1)
    then_branch = helper.make_graph(
        [helper.make_node("MatMul", ["h", "W2"], ["t"])], "then", [], [helper.make_tensor_value_info("t", 1, None)]
    )
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["skip"], ["e"])], "else", [], [helper.make_tensor_value_info("e", 1, None)]
    )
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("Relu", ["x"], ["skip"], name="skip"),
        helper.make_node("ReduceSum", ["h"], ["s"], name="sum", keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
        helper.make_node("If", ["c"], ["out"], name="if", then_branch=then_branch, else_branch=else_branch),
    ]
    weights = [
        numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "W2"),
        numpy_helper.from_array(np.array(0, np.float32), "zero"),
    ]
    graph = helper.make_graph(
        nodes,
        "branchy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    cuts = candidate_cuts(model)
    assert [c.after_node for c in cuts] == ["mm", "skip", "sum", "gt"]
    assert all("skip" in c.tensors or "x" in c.tensors for c in cuts), "the else branch's outer tensor crosses"
    for sign in (1.0, -1.0):  # both branches
        _check_all_cuts(model, cuts, lambda b, s=sign: {"x": s * np.abs(_rng_feeds({"x": ((4,), np.float32)}, b)["x"])})


def test_tied_weights_are_copied_into_both_parts():
    """An embedding table used again, transposed, by the output layer (weight tying)."""
    rng = np.random.default_rng(2)
    table = numpy_helper.from_array(rng.standard_normal((20, 6)).astype(np.float32), "E")
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["emb"], name="embed"),
        helper.make_node("ReduceMean", ["emb", "axes"], ["h"], name="pool", keepdims=0),
        helper.make_node("Transpose", ["E"], ["Et"], name="tie", perm=[1, 0]),
        helper.make_node("MatMul", ["h", "Et"], ["logits"], name="out"),
    ]
    graph = helper.make_graph(
        nodes,
        "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 5])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 20])],
        [table, numpy_helper.from_array(np.array([1], np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    cuts = candidate_cuts(model)
    assert [c.after_node for c in cuts] == ["embed", "pool"]
    assert cuts[1].private_layers == 1 and cuts[0].private_layers == 1
    for cut in cuts:
        public, private = split_model(model, cut)
        assert "E" in {t.name for t in public.graph.initializer} & {t.name for t in private.graph.initializer}
        assert "tie" in [n.name for n in private.graph.node], "the private side rebuilds the transposed table"
        assert "tie" not in [n.name for n in public.graph.node], "the public side does not need it"
    _check_all_cuts(model, cuts, lambda b: _rng_feeds({"ids": ((5,), np.int64)}, b))


def test_parallel_branches_accept_a_cut_that_is_not_a_prefix():
    """x -> a1 -> a2 and x -> b1 -> b2, joined: {a1, b2} is a valid cut no prefix of the order gives."""
    rng = np.random.default_rng(3)
    weights = [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), f"w{i}") for i in range(5)]
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["a1"], name="a1"),
        helper.make_node("MatMul", ["a1", "w1"], ["a2"], name="a2"),
        helper.make_node("MatMul", ["x", "w2"], ["b1"], name="b1"),
        helper.make_node("MatMul", ["b1", "w3"], ["b2"], name="b2"),
        helper.make_node("Add", ["a2", "b2"], ["s"], name="join"),
        helper.make_node("MatMul", ["s", "w4"], ["y"], name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "parallel",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    cuts = candidate_cuts(model)
    assert [c.tensors for c in cuts] == [("x", "a1"), ("x", "a2"), ("a2", "b1"), ("a2", "b2"), ("s",)]
    other = find_cut(model, tensors=["b2", "a1"])
    assert other.index == -1 and other.tensors == ("a1", "b2") and other.after_node == "b2"
    assert other.private_layers == 2 and other.private_flops == 2 * 2 * 16
    _check_all_cuts(model, [*cuts, other], lambda b: _rng_feeds({"x": ((4,), np.float32)}, b))


def test_a_model_without_weights_has_no_cut():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["y"])],
        "plain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert candidate_cuts(model) == []
    with pytest.raises(ModelError, match=r"no valid cut"):
        find_cut(model, index=0)
    with pytest.raises(ModelError, match=r"leaves nothing confidential"):
        find_cut(model, tensors=["r"])
