"""`modelcloak run` pins the owner's signing key by default (issue 15 item 6).

The attack: a device holds the model key of a `seal` bundle, so it can build a bundle of its own
(here: the owner's model with its output layer zeroed) and sign it with a key of its own. Pinned
to the owner's public key, `run` refuses it; the control shows the same bundle runs when the pin
is waived with --allow-unsigned, so the refusal is the pin's doing.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper
from test_cli import cli, one_line_error

from modelcloak.bundle.signing import generate_signing_key
from modelcloak.keys import generate_key_file
from modelcloak.protector import protect


@pytest.fixture
def release(tmp_path, mlp):
    """The owner's signed bundle, an attacker's re-signed variant under the same model key, inputs."""
    key = generate_key_file(tmp_path / "model.key")
    generate_signing_key(tmp_path / "owner.pem")
    generate_signing_key(tmp_path / "attacker.pem")
    protect(mlp, tmp_path / "owner.mcb", key=key, signer=tmp_path / "owner.pem")
    forged = type(mlp)()
    forged.CopyFrom(mlp)
    for last in forged.graph.initializer[-2:]:  # the output layer's weights and bias
        last.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(last)), last.name))
    protect(forged, tmp_path / "forged.mcb", key=key, signer=tmp_path / "attacker.pem")
    np.save(tmp_path / "x.npy", np.ones((2, 16), np.float32))
    return tmp_path


def _run(folder, bundle: str, *flags: str):
    return cli(
        "run", str(folder / bundle), str(folder / "x.npy"), "--key-file", str(folder / "model.key"),
        "-o", str(folder / f"{bundle}.npz"), *flags,
    )  # fmt: skip


def test_run_without_a_pinned_signer_is_refused_by_default(release):
    result = _run(release, "owner.mcb")
    one_line_error(result, "--trusted-signer")
    assert "--allow-unsigned" in result.stderr
    assert not (release / "owner.mcb.npz").exists()


def test_bundle_resigned_by_another_key_is_refused(release):
    pin = ["--trusted-signer", str(release / "owner.pem.pub")]
    one_line_error(_run(release, "forged.mcb", *pin), "not a trusted signer")
    assert not (release / "forged.mcb.npz").exists()
    # Control: the owner's own bundle passes the same pin.
    assert _run(release, "owner.mcb", *pin).returncode == 0


def test_control_without_the_pin_the_forged_bundle_runs(release):
    ran = _run(release, "forged.mcb", "--allow-unsigned")
    assert ran.returncode == 0, ran.stderr
    assert not np.load(release / "forged.mcb.npz")["logits"].any()  # the attacker's zeroed layer answered


def test_pin_and_waiver_together_are_refused(release):
    result = _run(release, "owner.mcb", "--allow-unsigned", "--trusted-signer", str(release / "owner.pem.pub"))
    one_line_error(result, "contradict")
