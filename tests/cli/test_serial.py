"""Rollback: a device that requires a minimum serial refuses an older owner-signed bundle."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_cli import cli, one_line_error

from modelcloak.bundle import BundleError
from modelcloak.bundle.serial import RollbackError
from modelcloak.inference import load
from modelcloak.protector import protect


@pytest.fixture
def owner_key():
    private = Ed25519PrivateKey.generate()
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return private, public


def test_older_signed_bundle_is_refused_newer_accepted(tmp_path, mlp, key_file, owner_key):
    private, public = owner_key
    protect(mlp, tmp_path / "v4.mcb", key=key_file, signer=private, serial=4)
    protect(mlp, tmp_path / "v5.mcb", key=key_file, signer=private, serial=5)
    x = np.zeros((1, 16), np.float32)
    with load(tmp_path / "v5.mcb", key=key_file, trusted_signers=[public], min_serial=5) as session:
        assert session.run(x)["logits"].shape == (1, 10)
    with pytest.raises(RollbackError, match="serial 4, older than the 5"):
        load(tmp_path / "v4.mcb", key=key_file, trusted_signers=[public], min_serial=5)
    # Without a minimum the older bundle still loads: the check is what refuses it.
    load(tmp_path / "v4.mcb", key=key_file, trusted_signers=[public]).close()


def test_min_serial_needs_a_pinned_signer_and_a_serial(tmp_path, mlp, key_file, owner_key):
    private, public = owner_key
    protect(mlp, tmp_path / "signed.mcb", key=key_file, signer=private, serial=9)
    protect(mlp, tmp_path / "no-serial.mcb", key=key_file, signer=private)
    with pytest.raises(RollbackError, match="needs a pinned owner signature"):
        load(tmp_path / "signed.mcb", key=key_file, min_serial=1)  # signed, but nobody pinned
    with pytest.raises(RollbackError, match="has no serial"):
        load(tmp_path / "no-serial.mcb", key=key_file, trusted_signers=[public], min_serial=1)


@pytest.mark.parametrize("bad", [-1, 2**60, True, "3"])
def test_invalid_serials_are_refused(tmp_path, mlp, key_file, bad):
    with pytest.raises(BundleError, match="serial must be an integer"):
        protect(mlp, tmp_path / "x.mcb", key=key_file, serial=bad)


def test_cli_serial_round_trip(tmp_path, mlp):
    (tmp_path / "m.onnx").write_bytes(mlp.SerializeToString())
    assert cli("keygen", str(tmp_path / "k")).returncode == 0
    assert cli("keygen", "--signing", str(tmp_path / "owner.pem")).returncode == 0
    common = ["--key-file", str(tmp_path / "k")]
    made = cli(
        "protect",
        str(tmp_path / "m.onnx"),
        "-o",
        str(tmp_path / "m.mcb"),
        *common,
        "--sign-key",
        str(tmp_path / "owner.pem"),
        "--serial",
        "3",
    )
    assert made.returncode == 0, made.stderr
    assert "serial" in cli("inspect", str(tmp_path / "m.mcb")).stdout
    np.save(tmp_path / "x.npy", np.zeros((1, 16), np.float32))
    pin = ["--trusted-signer", str(tmp_path / "owner.pem.pub")]
    ok = cli("run", str(tmp_path / "m.mcb"), str(tmp_path / "x.npy"), *common, *pin, "--min-serial", "3")
    assert ok.returncode == 0, ok.stderr
    old = cli("run", str(tmp_path / "m.mcb"), str(tmp_path / "x.npy"), *common, *pin, "--min-serial", "4")
    one_line_error(old, "older than the 4")
