"""Parameters chosen from measured agreement (or fixed by the owner), and the measurement stated in `inspect`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from models import make_mlp

pytest.importorskip("tenseal")

from modelcloak.fhe import DenseProgram, EdgeEvaluator, FheError, OwnerDecryptor, protect_program  # noqa: E402


def _near_ties(gap: float = 2e-4, seed: int = 0) -> tuple[DenseProgram, np.ndarray]:
    """A last layer whose top two classes differ by about `gap` on every probe input."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(64)
    v /= np.linalg.norm(v)
    weight = rng.standard_normal((10, 64)) * 0.1
    weight[0] = 3 * v
    weight[1] = 3 * v
    x = v + 0.05 * rng.standard_normal((64, 64))
    bias = np.zeros(10)
    bias[1] = -gap  # class 1 trails class 0 by exactly `gap` on every input
    return DenseProgram([weight], [bias], []), x


def test_the_ladder_climbs_until_labels_agree_and_fixed_parameters_state_the_difference() -> None:
    program, x = _near_ties()
    fixed = protect_program(program, 128, poly_degree=4096, probe=x, seed=0)
    m = fixed.measured
    assert m["params"]["poly_modulus_degree"] == 4096 and m["probe"] == "calibration features"
    # At N=4096 (27-bit scale) the noise is above the 2e-4 gap: some labels differ, and it is stated.
    assert m["label_agreement"] < m["probe_samples"] and m["near_ties_within_error"] > 0
    assert m["max_logit_error"] > 2e-4

    chosen = protect_program(program, 128, probe=x, seed=0)
    c = chosen.measured
    assert c["parameters_tried"] > 1 and c["params"]["poly_modulus_degree"] > 4096
    assert c["label_agreement"] == c["probe_samples"] == len(x)
    # And it holds on other inputs near the same ties, not only on the probe.
    other = x + 0.01 * np.random.default_rng(9).standard_normal(x.shape)
    labels = OwnerDecryptor(chosen.owner_secret).labels(EdgeEvaluator(chosen.edge_package).evaluate(other))
    np.testing.assert_array_equal(labels, program.forward(other).argmax(1))


def test_scale_and_ring_degree_can_be_fixed_and_bad_values_are_refused() -> None:
    program, x = _near_ties()
    model = protect_program(program, 128, scale_bits=30, poly_degree=8192, probe=x)
    assert model.params.poly_modulus_degree == 8192 and model.params.scale_bits == 30
    assert model.measured["parameters_tried"] == 1
    with pytest.raises(FheError, match="ring degree must be one of"):
        protect_program(program, 128, poly_degree=5000)
    with pytest.raises(FheError, match="no secure CKKS parameters"):
        protect_program(program, 128, scale_bits=60, poly_degree=4096)


def test_inspect_states_the_measured_agreement(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from modelcloak.cli import app
    from modelcloak.keys import generate_key_file

    key = generate_key_file(tmp_path / "k.key").path
    model_path = tmp_path / "m.onnx"
    import onnx

    onnx.save(make_mlp(sizes=(16, 32, 10), seed=3), model_path)
    runner = CliRunner()
    calibration = tmp_path / "cal.npy"
    np.save(calibration, np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32))
    answer = runner.invoke(app, ["protect", str(model_path), "-o", str(tmp_path / "b.mcb"), "--key-file", str(key),
                                 "--scheme", "fhe", "--cut-last", "1", "--fhe-secret-out", str(tmp_path / "s.fhe"),
                                 "--fhe-calibration", str(calibration)])  # fmt: skip
    assert answer.exit_code == 0, answer.output
    shown = runner.invoke(app, ["inspect", str(tmp_path / "b.mcb")], env={"COLUMNS": "400"})
    assert shown.exit_code == 0, shown.output
    # The table wraps long cells at whatever width the console took when it was made.
    text = " ".join(shown.output.split())
    assert "labels equal the plaintext head's on 40/40 calibration features" in text, shown.output
    assert "check tolerance" in text

    import subprocess
    import sys

    command = [sys.executable, "-m", "modelcloak", "protect", str(model_path), "-o", str(tmp_path / "c.mcb"),
               "--key-file", str(key), "--scheme", "fhe", "--cut-last", "1", "--fhe-secret-out",
               str(tmp_path / "t.fhe"), "--fhe-poly-degree", "5000"]  # fmt: skip
    bad = subprocess.run(command, capture_output=True, text=True)
    assert bad.returncode == 2 and "ring degree must be one of" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "t.fhe").exists() and not (tmp_path / "c.mcb").exists()
