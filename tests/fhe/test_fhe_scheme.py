"""`protect --scheme fhe` end to end: the public part runs here, the dense head runs encrypted, and only
the owner's secret (never in the bundle) turns the result into labels."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from models import make_mlp, reference_outputs

pytest.importorskip("tenseal")

from modelcloak.errors import ModelcloakError  # noqa: E402
from modelcloak.fhe import OwnerDecryptor  # noqa: E402
from modelcloak.inference import load  # noqa: E402
from modelcloak.keys import generate_key_file  # noqa: E402
from modelcloak.protector import protect  # noqa: E402
from modelcloak.runtime import FheSession, SessionError  # noqa: E402


@pytest.fixture(scope="module")
def owner(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fhe-scheme")
    host = generate_key_file(folder / "host.key")
    model = make_mlp(sizes=(16, 64, 10), seed=5)
    bundle = folder / "head.mcb"
    manifest = protect(model, bundle, key=host, scheme="fhe", cut={"last": 1}, fhe={"secret_out": folder / "owner.fhe"})
    return folder, host, model, bundle, manifest


def _clear_margin_inputs(model: onnx.ModelProto, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs whose top two logits differ by more than CKKS noise could blur, and their labels."""
    x = np.random.default_rng(1).standard_normal((4 * n, 16)).astype(np.float32)
    logits = reference_outputs(model, x)
    top2 = np.sort(logits, axis=1)[:, -2:]
    keep = (top2[:, 1] - top2[:, 0]) > 1e-2
    return x[keep][:n], logits[keep][:n].argmax(axis=1)


def test_encrypted_head_gives_the_plain_models_labels(owner):
    folder, host, model, bundle, manifest = owner
    assert manifest.scheme == "fhe" and manifest.document["fhe"]["security"] == 128
    x, expected = _clear_margin_inputs(model, 40)
    with load(bundle, key=host) as session:
        assert isinstance(session, FheSession)
        result = session.evaluate({"x": x})
        encrypted_inputs = session.evaluate({"x": x}, encrypt_features=True)
        with pytest.raises(SessionError, match="encrypted"):
            session.run({"x": x})
    decryptor = OwnerDecryptor((folder / "owner.fhe").read_bytes())
    assert np.array_equal(decryptor.labels(result), expected)
    assert np.array_equal(decryptor.labels(encrypted_inputs), expected)


def test_the_owner_secret_is_not_in_the_bundle_and_is_private(owner):
    folder, host, _, bundle, _ = owner
    secret = (folder / "owner.fhe").read_bytes()
    assert (folder / "owner.fhe").stat().st_mode & 0o077 == 0
    from modelcloak.bundle import Bundle

    with Bundle.open(bundle) as sealed:
        master = host.key_for(sealed.manifest.key)
        package = bytearray(sealed.manifest.section("fhe").size)
        sealed.decrypt_section_into("fhe", master.view(), memoryview(package))
        master.close()
    # The serialised secret key (the owner file also carries the public key) is nowhere in the package.
    from modelcloak.fhe.engine import MAGIC_OWNER, _unpack

    secret_key = _unpack(MAGIC_OWNER, secret, "owner secret")[1][0]
    assert len(secret_key) > 1024
    assert secret_key[len(secret_key) // 2 : len(secret_key) // 2 + 256] not in bytes(package)
    public_key = _unpack(MAGIC_OWNER, secret, "owner secret")[1][1]
    assert public_key[len(public_key) // 2 : len(public_key) // 2 + 256] in bytes(package)  # the control
    from modelcloak.fhe import FheError

    with pytest.raises(FheError):
        OwnerDecryptor(bytes(package))  # the edge package cannot stand in for the owner's secret


def test_protect_refuses_without_a_secret_file_or_over_an_existing_one(owner, tmp_path):
    _, host, model, _, _ = owner
    with pytest.raises(ModelcloakError, match="secret_out"):
        protect(model, tmp_path / "a.mcb", key=host, scheme="fhe", cut={"last": 1}, fhe={})
    existing = tmp_path / "keep.fhe"
    existing.write_bytes(b"another model's secret")
    with pytest.raises(ModelcloakError, match="never overwritten"):
        protect(model, tmp_path / "b.mcb", key=host, scheme="fhe", cut={"last": 1}, fhe={"secret_out": existing})
    assert existing.read_bytes() == b"another model's secret"
    assert not (tmp_path / "b.mcb").exists()


def test_a_private_part_that_is_not_dense_is_refused_cleanly(owner, tmp_path):
    import split_models

    _, host, _, _, _ = owner
    cnn = split_models.cnn()
    from modelcloak.model.cut import candidate_cuts

    first = candidate_cuts(cnn)[0].index  # the private part still holds convolutions
    with pytest.raises(ModelcloakError, match="cannot protect the private part with FHE"):
        protect(cnn, tmp_path / "c.mcb", key=host, scheme="fhe", cut={"index": first},
                fhe={"secret_out": tmp_path / "c.fhe"}, verify=False)  # fmt: skip
    assert not (tmp_path / "c.fhe").exists() and not (tmp_path / "c.mcb").exists()


def cli(*args: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "modelcloak", *args],
        capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip


def test_cli_protect_and_run_write_the_encrypted_result(owner, tmp_path: Path):
    folder, _, model, _, _ = owner
    onnx.save(model, tmp_path / "m.onnx")
    x, expected = _clear_margin_inputs(model, 8)
    np.save(tmp_path / "x.npy", x)
    assert cli("keygen", str(tmp_path / "host.key")).returncode == 0
    done = cli("protect", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "m.mcb"), "--scheme", "fhe",
               "--cut-last", "1", "--key-file", str(tmp_path / "host.key"),
               "--fhe-secret-out", str(tmp_path / "owner.fhe"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    inspected = cli("inspect", str(tmp_path / "m.mcb"))
    assert "fhe" in inspected.stdout and "does not protect" in inspected.stdout

    refused = cli(
        "run",
        "--allow-unsigned",
        str(tmp_path / "m.mcb"),
        str(tmp_path / "x.npy"),
        "--key-file",
        str(tmp_path / "host.key"),
    )
    assert refused.returncode == 2 and "--fhe-result" in refused.stderr and "Traceback" not in refused.stderr
    ran = cli("run", "--allow-unsigned",
        str(tmp_path / "m.mcb"), str(tmp_path / "x.npy"), "--key-file", str(tmp_path / "host.key"),
              "--fhe-result", str(tmp_path / "r.fhe"))  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    labels = OwnerDecryptor((tmp_path / "owner.fhe").read_bytes()).labels((tmp_path / "r.fhe").read_bytes())
    assert np.array_equal(labels, expected)
