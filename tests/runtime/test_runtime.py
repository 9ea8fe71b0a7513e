"""The device-side session: outputs identical to the plain model, refusals before any plaintext."""

from __future__ import annotations

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from models import make_mlp, reference_outputs

from modelcloak import hygiene
from modelcloak.bundle import SignatureError, TamperedError, WrongKeyError
from modelcloak.inference import load
from modelcloak.keys import EnvKey, KeyProviderError
from modelcloak.protector import protect
from modelcloak.runtime import SessionError


@pytest.fixture
def sealed(tmp_path, mlp, key_file):
    path = tmp_path / "mlp.mcb"
    protect(mlp, path, key=key_file)
    return path


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_sealed_outputs_equal_plain_outputs(sealed, mlp, key_file, backend):
    if backend == "openvino":
        pytest.importorskip("openvino")
    x = np.random.default_rng(1).standard_normal((7, 16)).astype(np.float32)
    with load(sealed, key=key_file, backend=backend) as session:
        got = session.run(x)["logits"]
        assert session.input_names == ["x"] and session.output_names == ["logits"]
    expected = reference_outputs(mlp, x)
    if backend == "onnxruntime":
        np.testing.assert_array_equal(got, expected)
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_dynamic_batch_sizes(sealed, key_file):
    with load(sealed, key=key_file) as session:
        for batch in (1, 3, 64):
            assert session.run(np.zeros((batch, 16), np.float32))["logits"].shape == (batch, 10)


def test_buffers_carry_dump_and_lock_flags_while_they_hold_plaintext(sealed, key_file):
    with load(sealed, key=key_file) as session:
        flags, kinds = session.report.buffer_flags, session.report.buffer_kinds
    assert "dd" in flags["weights"] and "dd" in flags["graph"], flags
    assert "dd" in flags["key"] and "lo" in flags["key"], flags  # memfd_secret and mlock both show lo
    assert kinds["key"] in {"memfd_secret", "mlock"}
    # Negative control: an ordinary mapping carries neither flag.
    import mmap

    plain = mmap.mmap(-1, 4096)
    address = __import__("ctypes").addressof(__import__("ctypes").c_char.from_buffer(plain))
    assert not {"dd", "lo"} & hygiene.mapping_flags(address)


def test_process_is_non_dumpable_after_load(tmp_path, sealed, key_file):
    import subprocess
    import sys

    code = (
        "import ctypes,sys; from modelcloak.inference import load; from modelcloak.keys import KeyFile;"
        f"s=load({str(sealed)!r}, key=KeyFile({str(key_file.path)!r}));"
        "libc=ctypes.CDLL(None); print(libc.prctl(3,0,0,0,0))"  # PR_GET_DUMPABLE
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.stdout.strip() == "0", result.stderr


def test_wrong_key_refused(sealed, other_key_file):
    with pytest.raises(WrongKeyError):
        load(sealed, key=other_key_file)


def test_tampered_weights_never_produce_a_session(tmp_path, sealed, key_file):
    data = bytearray(sealed.read_bytes())
    data[-20] ^= 0x80
    bad = tmp_path / "bad.mcb"
    bad.write_bytes(bytes(data))
    with pytest.raises(TamperedError, match="section 'weights'"):
        load(bad, key=key_file)


def test_trusted_signer_required(tmp_path, mlp, key_file, sealed):
    owner = Ed25519PrivateKey.generate()
    public = owner.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    signed = tmp_path / "signed.mcb"
    protect(mlp, signed, key=key_file, signer=owner)
    with load(signed, key=key_file, trusted_signers=[public]) as session:
        assert session.report.signer and session.report.signer.startswith("ed25519:")
    with pytest.raises(SignatureError, match="not signed"):
        load(sealed, key=key_file, trusted_signers=[public])


def test_env_key_provider(monkeypatch, tmp_path, mlp, key_file):
    monkeypatch.setenv("MC_TEST_KEY", key_file.path.read_text().strip())
    path = tmp_path / "env.mcb"
    protect(mlp, path, key=EnvKey("MC_TEST_KEY"))
    with load(path, key=key_file) as session:  # same key, other provider
        assert session.run(np.zeros((1, 16), np.float32))["logits"].shape == (1, 10)
    assert "MC_TEST_KEY" not in os.environ  # EnvKey removed it once read
    monkeypatch.delenv("MC_TEST_KEY", raising=False)
    with pytest.raises(KeyProviderError, match="MC_TEST_KEY is not set"):
        load(path, key=EnvKey("MC_TEST_KEY"))


def test_input_errors_are_clear(sealed, key_file):
    with load(sealed, key=key_file) as session:
        with pytest.raises(SessionError, match="missing x"):
            session.run({"y": np.zeros((1, 16), np.float32)})
        with pytest.raises(SessionError, match="must be float32, got complex128"):
            session.run(np.zeros((1, 16), np.complex128))
        # Like onnxruntime, nothing is cast silently (float64 from a default .npy included).
        with pytest.raises(SessionError, match="must be float32, got float64"):
            session.run(np.zeros((1, 16), np.float64))
        with pytest.raises(SessionError, match=r"^input .x. must have shape \[batch, 16\], got \[1, 5\]$"):
            session.run(np.zeros((1, 5), np.float32))
        session.close()
        with pytest.raises(SessionError, match="closed"):
            session.run(np.zeros((1, 16), np.float32))


def test_unknown_backend(sealed, key_file):
    with pytest.raises(SessionError, match="unknown backend"):
        load(sealed, key=key_file, backend="tensorflow")


def test_large_model_with_many_chunks(tmp_path, key_file):
    big = make_mlp((256, 1024, 1024, 10), seed=3)  # ~5 MB of weights, five 1 MiB chunks
    path = tmp_path / "big.mcb"
    protect(big, path, key=key_file)
    x = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    with load(path, key=key_file) as session:
        np.testing.assert_array_equal(session.run(x)["logits"], reference_outputs(big, x))


def test_model_with_external_data_files_is_streamed_in(tmp_path, key_file):
    import onnx

    model = make_mlp((64, 512, 256, 10), seed=5)
    expected_input = np.random.default_rng(2).standard_normal((2, 64)).astype(np.float32)
    expected = reference_outputs(model, expected_input)
    source = tmp_path / "src"
    source.mkdir()
    onnx.save_model(model, source / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=1024)
    assert (source / "m.data").stat().st_size > 100_000
    protect(source / "m.onnx", tmp_path / "m.mcb", key=key_file)
    with load(tmp_path / "m.mcb", key=key_file) as session:
        np.testing.assert_array_equal(session.run(expected_input)["logits"], expected)


def test_external_data_outside_the_model_folder_is_refused(tmp_path, key_file):
    import onnx

    from modelcloak.model import ModelError

    model = make_mlp(seed=6)
    source = tmp_path / "src"
    source.mkdir()
    onnx.save_model(model, source / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=1024)
    tampered = onnx.load(source / "m.onnx", load_external_data=False)
    for tensor in tampered.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../etc/passwd"
    onnx.save_model(tampered, source / "evil.onnx")
    with pytest.raises(ModelError, match="outside"):
        protect(source / "evil.onnx", tmp_path / "evil.mcb", key=key_file)
    assert not (tmp_path / "evil.mcb").exists()


def test_package_level_protect_and_load_stay_callable_after_submodule_imports():
    """`modelcloak.protect(...)` (the README's spelling) must survive importing the rooms directly."""
    import subprocess
    import sys

    code = (
        "import modelcloak, modelcloak.protector, modelcloak.runtime\n"
        "from modelcloak.protector import protect\n"
        "assert callable(modelcloak.protect) and modelcloak.protect is protect, modelcloak.protect\n"
        "assert callable(modelcloak.load), modelcloak.load\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
