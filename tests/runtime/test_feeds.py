"""Feeds are checked exactly like onnxruntime: no silent casts, no wrap-around, 0-d stays 0-d,
sequence and optional inputs work, and graphs without inputs run sealed."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from modelcloak.inference import load
from modelcloak.protector import protect
from modelcloak.runtime import SessionError
from modelcloak.runtime.feeds import check_feeds


def _model(nodes, inputs, outputs, opset=18):
    model = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs), opset_imports=[helper.make_opsetid("", opset)]
    )
    model.ir_version = 9
    return model


def _sealed(tmp_path, model, key_file):
    protect(model, tmp_path / "m.mcb", key=key_file)
    return load(tmp_path / "m.mcb", key=key_file)


def _plain(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


FLOAT_IDENTITY = _model(
    [helper.make_node("Identity", ["x"], ["y"])],
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
)
INT64_IDENTITY = _model(
    [helper.make_node("Identity", ["x"], ["y"])],
    [helper.make_tensor_value_info("x", TensorProto.INT64, ["n"])],
    [helper.make_tensor_value_info("y", TensorProto.INT64, ["n"])],
)


@pytest.mark.parametrize("wrong", [np.float64, np.int64, np.float16])
def test_wrong_dtype_is_refused_like_onnxruntime(tmp_path, key_file, wrong):
    value = np.ones((2, 3), dtype=wrong)
    with pytest.raises(Exception, match="(?i)type"):
        _plain(FLOAT_IDENTITY).run(None, {"x": value})  # the reference refuses too
    with _sealed(tmp_path, FLOAT_IDENTITY, key_file) as session:
        with pytest.raises(SessionError, match=r"input 'x' must be float32, got " + np.dtype(wrong).name):
            session.run(value)


def test_uint64_above_2_63_is_refused_not_wrapped(tmp_path, key_file):
    big = np.array([2**63 + 5], dtype=np.uint64)
    with _sealed(tmp_path, INT64_IDENTITY, key_file) as session:
        with pytest.raises(SessionError, match="must be int64, got uint64"):
            session.run(big)
        with pytest.raises(SessionError, match="do not fit"):
            session.run([2**63 + 5])  # a Python int that int64 cannot hold
        assert session.run([1, 2])["y"].tolist() == [1, 2]  # Python ints that fit are fine


def test_python_floats_that_would_round_are_refused():
    specs = [{"name": "x", "dtype": "int32"}]
    with pytest.raises(SessionError, match="do not fit"):
        check_feeds([1.5], specs)
    assert check_feeds([1.0, 2.0], specs)["x"].dtype == np.int32


def test_scalar_input_stays_0d_and_matches_onnxruntime(tmp_path, key_file):
    model = _model(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )
    scalar = np.array(1.5, dtype=np.float32)
    expected = _plain(model).run(None, {"x": scalar})[0]
    with _sealed(tmp_path, model, key_file) as session:
        got = session.run(scalar)["y"]
    assert got.shape == expected.shape == () and got == expected
    assert check_feeds({"x": np.float32(2)}, [{"name": "x", "dtype": "float32"}])["x"].shape == ()


def test_sequence_and_optional_inputs_and_outputs(tmp_path, key_file):
    seq_in = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, ["n"])
    model = _model(
        [
            helper.make_node("SequenceLength", ["s"], ["n"]),
            helper.make_node("SequenceInsert", ["s", "t"], ["s2"]),
            helper.make_node("OptionalHasElement", ["o"], ["has"]),
        ],
        [
            seq_in,
            helper.make_tensor_value_info("t", TensorProto.FLOAT, ["n"]),
            helper.make_value_info(
                "o", helper.make_optional_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, ["n"]))
            ),
        ],
        [
            helper.make_tensor_value_info("n", TensorProto.INT64, []),
            helper.make_tensor_sequence_value_info("s2", TensorProto.FLOAT, ["n"]),
            helper.make_tensor_value_info("has", TensorProto.BOOL, []),
        ],
    )
    feeds = {"s": [np.ones(2, np.float32), np.zeros(3, np.float32)], "t": np.full(1, 7, np.float32), "o": None}
    expected = _plain(model).run(None, feeds)
    with _sealed(tmp_path, model, key_file) as session:
        got = session.run(feeds)
        with pytest.raises(SessionError, match="input 's' item 1 must be float32"):
            session.run({**feeds, "s": [np.ones(2, np.float32), np.zeros(3, np.float64)]})
        with pytest.raises(SessionError, match="input 's' is a sequence"):
            session.run({**feeds, "s": np.ones(2, np.float32)})
        with pytest.raises(SessionError, match="input 't' is required"):
            session.run({**feeds, "t": None})
    assert int(got["n"]) == int(expected[0]) == 2
    assert [a.tolist() for a in got["s2"]] == [a.tolist() for a in expected[1]]
    assert bool(got["has"]) is bool(expected[2]) is False


def test_graph_without_inputs_runs_sealed(tmp_path, key_file):
    model = _model(
        [helper.make_node("Constant", [], ["y"], value=helper.make_tensor("c", TensorProto.FLOAT, [2], [3.0, 4.0]))],
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    with _sealed(tmp_path, model, key_file) as session:
        assert session.run({})["y"].tolist() == [3.0, 4.0]
        with pytest.raises(SessionError, match="unknown x"):
            session.run({"x": np.ones(1, np.float32)})


def test_string_input(tmp_path, key_file):
    model = _model(
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.STRING, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.STRING, ["n"])],
    )
    with _sealed(tmp_path, model, key_file) as session:
        assert session.run(np.array(["a", "bc"]))["y"].tolist() == ["a", "bc"]
        with pytest.raises(SessionError, match="must be string, got float32"):
            session.run(np.ones(2, np.float32))
