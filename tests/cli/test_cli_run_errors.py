"""`modelcloak run`: each bad input from the field is one line and exit 2, found before inference."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
from onnx import TensorProto, helper
from test_cli import cli, one_line_error

from modelcloak.protector import protect


@pytest.fixture
def sealed(tmp_path, key_file, mlp):
    protect(mlp, tmp_path / "m.mcb", key=key_file)
    np.save(tmp_path / "x.npy", np.zeros((1, 16), np.float32))
    return tmp_path, ["--key-file", str(key_file.path)]


def test_directory_as_bundle(sealed):
    folder, key = sealed
    one_line_error(cli("run", "--allow-unsigned", str(folder), str(folder / "x.npy"), *key), "is a directory")


@pytest.mark.parametrize("name", ["empty.npy", "empty.npz"])
def test_zero_byte_inputs(sealed, name):
    folder, key = sealed
    (folder / name).write_bytes(b"")
    one_line_error(cli("run", "--allow-unsigned", str(folder / "m.mcb"), str(folder / name), *key), "is empty")


def test_corrupt_npz(sealed):
    folder, key = sealed
    (folder / "bad.npz").write_bytes(b"PK\x03\x04 not really a zip")
    one_line_error(
        cli("run", "--allow-unsigned", str(folder / "m.mcb"), str(folder / "bad.npz"), *key), "not a readable .npy/.npz"
    )
    with zipfile.ZipFile(folder / "other.npz", "w") as archive:
        archive.writestr("x.npy", b"garbage")
    one_line_error(
        cli("run", "--allow-unsigned", str(folder / "m.mcb"), str(folder / "other.npz"), *key),
        "not a readable .npy/.npz",
    )


@pytest.mark.parametrize("target", ["missing/out.npz", "."])
def test_output_path_checked_before_running(sealed, target):
    folder, key = sealed
    out = folder / target if target != "." else folder
    result = cli("run", "--allow-unsigned", str(folder / "m.mcb"), str(folder / "x.npy"), *key, "-o", str(out))
    one_line_error(result, "does not exist" if "missing" in target else "is a directory")


def test_outputs_named_like_savez_parameters_are_written(tmp_path, key_file):
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("Identity", ["x"], ["file"]), helper.make_node("Neg", ["x"], ["allow_pickle"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
            [
                helper.make_tensor_value_info("file", TensorProto.FLOAT, [2]),
                helper.make_tensor_value_info("allow_pickle", TensorProto.FLOAT, [2]),
            ],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 9
    protect(model, tmp_path / "m.mcb", key=key_file)
    np.save(tmp_path / "x.npy", np.array([1.0, 2.0], np.float32))
    result = cli(
        "run",
        "--allow-unsigned",
        str(tmp_path / "m.mcb"),
        str(tmp_path / "x.npy"),
        "--key-file",
        str(key_file.path),
        "-o",
        str(tmp_path / "y.npz"),
    )
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "y.npz") as saved:
        assert saved["file"].tolist() == [1.0, 2.0] and saved["allow_pickle"].tolist() == [-1.0, -2.0]


def test_wrong_shape_is_one_line_without_onnxruntime_log(sealed):
    # Refused against the signed signature before any kernel runs (a kernel error proper, out-of-range
    # token ids, is one line too: tests/split/test_split_errors.py).
    folder, key = sealed
    np.save(folder / "wrong.npy", np.zeros((1, 5), np.float32))
    result = cli("run", "--allow-unsigned", str(folder / "m.mcb"), str(folder / "wrong.npy"), *key)
    one_line_error(result, "must have shape [batch, 16], got [1, 5]")
    assert "onnxruntime" not in result.stderr
    assert "\x1b[" not in result.stderr


def test_passphrase_without_a_terminal(sealed):
    folder, _ = sealed
    result = cli(
        "run", "--allow-unsigned", str(folder / "m.mcb"), str(folder / "x.npy"), "--passphrase", stdin="secret\n"
    )
    one_line_error(result, "--passphrase-env")


def test_negative_threads_refused(sealed):
    folder, key = sealed
    result = cli("run", "--allow-unsigned", str(folder / "m.mcb"), str(folder / "x.npy"), *key, "--threads", "-1")
    one_line_error(result, "--threads")


def test_directory_as_key_file(sealed):
    folder, _ = sealed
    (folder / "keys").mkdir()
    result = cli(
        "run", "--allow-unsigned", str(folder / "m.mcb"), str(folder / "x.npy"), "--key-file", str(folder / "keys")
    )
    one_line_error(result, "is a directory")
    assert "(mode" not in result.stderr


def test_float64_input_needs_cast(sealed):
    folder, key = sealed
    np.save(folder / "x64.npy", np.zeros((1, 16), np.float64))
    one_line_error(
        cli("run", "--allow-unsigned", str(folder / "m.mcb"), str(folder / "x64.npy"), *key),
        "must be float32, got float64",
    )
    result = cli("run", "--allow-unsigned", str(folder / "m.mcb"), str(folder / "x64.npy"), *key, "--cast")
    assert result.returncode == 0, result.stderr


def test_sequence_output_is_printed_and_saved(tmp_path, key_file):
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("SplitToSequence", ["x"], ["parts"], keepdims=0)],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
            [helper.make_tensor_sequence_value_info("parts", TensorProto.FLOAT, None)],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 9
    protect(model, tmp_path / "m.mcb", key=key_file)
    np.save(tmp_path / "x.npy", np.arange(6, dtype=np.float32).reshape(2, 3))
    key = ["--key-file", str(key_file.path)]
    shown = cli("run", "--allow-unsigned", str(tmp_path / "m.mcb"), str(tmp_path / "x.npy"), *key)
    assert shown.returncode == 0, shown.stderr
    assert "parts: sequence of 2" in shown.stdout and "parts[1]: shape [3]" in shown.stdout
    saved = cli(
        "run", "--allow-unsigned", str(tmp_path / "m.mcb"), str(tmp_path / "x.npy"), *key, "-o", str(tmp_path / "y.npz")
    )
    assert saved.returncode == 0, saved.stderr
    with np.load(tmp_path / "y.npz") as archive:
        assert archive["parts.1"].tolist() == [3.0, 4.0, 5.0]
