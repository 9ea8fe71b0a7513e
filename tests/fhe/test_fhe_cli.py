"""`modelcloak fhe-finetune` and `bench-fhe` through the real CLI (subprocesses)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from cli_process import run_modelcloak
from models import make_mlp

from modelcloak.fhe import DenseProgram, EdgeEvaluator, OwnerDecryptor, protect_program

pytest.importorskip("torch")


def cli(*args: str) -> subprocess.CompletedProcess:
    return run_modelcloak(*args, env={"OMP_NUM_THREADS": "1"}, timeout=600)


def one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("modelcloak: warning: ")]
    assert len(lines) == 1 and lines[0].startswith("modelcloak: error: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def task(tmp_path: Path) -> tuple[Path, Path]:
    """A teacher MLP labels random features; the student head is a fresh random MLP of the same shape."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1200, 12))
    teacher = np.tanh(x @ rng.standard_normal((12, 16))) @ rng.standard_normal((16, 4))
    np.savez(tmp_path / "data.npz", x=x, y=teacher.argmax(1))
    (tmp_path / "head.onnx").write_bytes(make_mlp((12, 24, 4), seed=3).SerializeToString())
    return tmp_path / "head.onnx", tmp_path / "data.npz"


def test_fhe_finetune_recovers_accuracy_and_the_result_runs_encrypted(task, tmp_path: Path) -> None:
    onnx_path, data = task
    out = tmp_path / "tuned.npz"
    result = cli(
        "fhe-finetune",
        str(onnx_path),
        "--data",
        str(data),
        "--out",
        str(out),
        "--activation",
        "square",
        "--epochs",
        "8",
    )
    assert result.returncode == 0, result.stderr
    line = next(text for text in result.stdout.splitlines() if text.startswith("held-out accuracy"))
    before, after = (float(part.split()[0]) for part in line.split(": ")[1].split(", "))
    assert after > before + 0.3, line  # training helped, clearly (chance is 0.25)
    tuned = DenseProgram.load(out)
    assert [a.kind for a in tuned.activations] == ["square"]
    x = np.load(data)["x"][:6]
    model = protect_program(tuned, 128)
    labels = OwnerDecryptor(model.owner_secret).labels(EdgeEvaluator(model.edge_package).evaluate(x))
    np.testing.assert_array_equal(labels, tuned.forward(x).argmax(1))


def test_fhe_finetune_relu_poly_reports_its_range(task, tmp_path: Path) -> None:
    onnx_path, data = task
    result = cli(
        "fhe-finetune",
        str(onnx_path),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "p.npz"),
        "--activation",
        "relu-poly",
        "--epochs",
        "1",
    )
    assert result.returncode == 0, result.stderr
    assert "ReLU fit ranges (from the data): [" in result.stdout


def test_fhe_finetune_bad_input_is_one_line(task, tmp_path: Path) -> None:
    onnx_path, data = task
    np.savez(tmp_path / "bad.npz", features=np.zeros((3, 12)))
    one_line_error(
        cli("fhe-finetune", str(onnx_path), "--data", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "o.npz")),
        "arrays x and y",
    )
    one_line_error(
        cli(
            "fhe-finetune",
            str(onnx_path),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "o.npz"),
            "--activation",
            "gelu",
        ),
        "unknown activation",
    )
    (tmp_path / "exists.npz").write_bytes(b"x")
    one_line_error(
        cli("fhe-finetune", str(onnx_path), "--data", str(data), "--out", str(tmp_path / "exists.npz")), "--force"
    )
    one_line_error(cli("fhe-finetune", str(data), "--data", str(data), "--out", str(tmp_path / "o.npz")), "cannot read")
    one_line_error(cli("bench-fhe", "--security", "128,abc", "--out", str(tmp_path / "b")), "--security")


@pytest.mark.slow
def test_protect_takes_the_fine_tuned_head(task, tmp_path: Path) -> None:
    """`fhe-finetune` output goes straight into `protect --fhe-head`; a head of another shape is refused."""
    import onnx

    from modelcloak.inference import load
    from modelcloak.keys import generate_key_file

    onnx_path, data = task
    tuned_path = tmp_path / "tuned.npz"
    assert (
        cli("fhe-finetune", str(onnx_path), "--data", str(data), "--out", str(tuned_path), "--epochs", "2").returncode
        == 0
    )
    # A full model whose last two layers (Gemm 12->24, Relu, Gemm 24->4) have the head's shapes.
    model_path = tmp_path / "full.onnx"
    onnx.save(make_mlp((12, 12, 24, 4), seed=4), model_path)
    key = generate_key_file(tmp_path / "m.key")
    protect = ["protect", str(model_path), "-o", str(tmp_path / "b.mcb"), "--key-file", str(key.path), "--scheme",
               "fhe", "--cut-last", "2", "--fhe-secret-out", str(tmp_path / "s.fhe"), "--fhe-head",
               str(tuned_path)]  # fmt: skip
    made = cli(*protect)
    assert made.returncode == 0, made.stderr
    shown = cli("inspect", str(tmp_path / "b.mcb"))
    assert "fine-tuned head tuned.npz" in shown.stdout, shown.stdout
    tuned = DenseProgram.load(tuned_path)
    x = np.random.default_rng(5).standard_normal((8, 12)).astype(np.float32)
    with load(tmp_path / "b.mcb", key=key) as session:
        features = session.features(x)
        result = session.evaluate(x)
    labels = OwnerDecryptor((tmp_path / "s.fhe").read_bytes()).labels(result)
    np.testing.assert_array_equal(labels, tuned.forward(features).argmax(1))

    # Negative control: the same head against a cut of another shape is refused in one line.
    onnx.save(make_mlp((12, 12, 16, 4), seed=4), tmp_path / "other.onnx")
    protect[1], protect[3], protect[11] = str(tmp_path / "other.onnx"), str(tmp_path / "c.mcb"), str(tmp_path / "t.fhe")
    one_line_error(cli(*protect), "are not the private part's")


@pytest.mark.slow  # trains and protects through three CLI subprocesses (~30 s CPU)
def test_protect_fine_tunes_the_head_itself_and_inspect_states_the_accuracy(task, tmp_path: Path) -> None:
    """`protect --fhe-train` fine-tunes the private head on model inputs and labels, then encrypts that head."""
    import json

    import onnx

    from modelcloak.bundle import Bundle
    from modelcloak.inference import load
    from modelcloak.keys import generate_key_file

    _, data = task
    onnx.save(make_mlp((12, 12, 24, 4), seed=4), tmp_path / "full.onnx")
    key = generate_key_file(tmp_path / "m.key")
    protect = ["protect", str(tmp_path / "full.onnx"), "-o", str(tmp_path / "b.mcb"), "--key-file", str(key.path),
               "--scheme", "fhe", "--cut-last", "2", "--fhe-secret-out", str(tmp_path / "s.fhe"),
               "--fhe-train", str(data), "--fhe-epochs", "8", "--fhe-activation", "square"]  # fmt: skip
    made = cli(*protect)
    assert made.returncode == 0, made.stderr
    with Bundle.open(tmp_path / "b.mcb") as sealed:
        report = sealed.manifest.document["fhe"]["finetune"]
    # The shipped head is untrained (random): training with the square in place clearly helps.
    assert report["finetuned_accuracy"] > report["dropped_in_accuracy"] + 0.2, report
    assert report["heldout_samples"] == 240 and report["train_samples"] == 960
    shown = cli("inspect", str(tmp_path / "b.mcb"))
    assert "fhe accuracy" in shown.stdout and "fine-tuned in protect with square" in shown.stdout, shown.stdout

    # The bundle carries the fine-tuned head: its encrypted labels are about as accurate as the
    # report says, far above the head as shipped with the square dropped in.
    arrays = np.load(data)
    x, y = arrays["x"][:200].astype(np.float32), arrays["y"][:200]
    with load(tmp_path / "b.mcb", key=key) as session:
        result = session.evaluate(x)
    labels = OwnerDecryptor((tmp_path / "s.fhe").read_bytes()).labels(result)
    assert np.mean(labels == y) > report["dropped_in_accuracy"] + 0.15, json.dumps(report)

    # Bad input: one line each.
    np.savez(tmp_path / "nolabels.npz", x=arrays["x"])
    protect[3], protect[11] = str(tmp_path / "c.mcb"), str(tmp_path / "t.fhe")
    protect[13] = str(tmp_path / "nolabels.npz")
    one_line_error(cli(*protect), "arrays x (model inputs) and y (labels)")
    protect[13] = str(data)
    one_line_error(cli(*protect, "--fhe-head", str(data)), "not both")


def test_fine_tuning_in_protect_defaults_to_the_relu_fit(tmp_path: Path) -> None:
    """With training data `protect` fine-tunes with the ReLU fit unless told otherwise (same cost as square)."""
    from modelcloak.options import FheOptions, OptionError

    x, y = np.zeros((30, 12)), np.zeros(30, dtype=np.int64)
    assert FheOptions(secret_out=tmp_path / "s").activation == "square"
    assert FheOptions(secret_out=tmp_path / "s", train_inputs=x, train_labels=y).activation == "relu-poly"
    assert FheOptions(secret_out=tmp_path / "s", activation="square", train_inputs=x, train_labels=y).activation == (
        "square"
    )
    with pytest.raises(OptionError, match="both training inputs and their labels"):
        FheOptions(secret_out=tmp_path / "s", train_inputs=x)
    # And it costs the same under CKKS: a fitted ReLU lowers to dense-then-square like the square.
    from modelcloak.fhe.program import Activation, fit_relu

    square = DenseProgram([np.eye(3), np.eye(2, 3)], [np.zeros(3), np.zeros(2)], [Activation.named("square")])
    fitted = DenseProgram([np.eye(3), np.eye(2, 3)], [np.zeros(3), np.zeros(2)], [fit_relu(-2.0, 3.0)])
    assert fitted.depth() == square.depth() == 3
