"""`modelcloak enclave-build` and `run --native-enclave`: a split bundle's native enclave from the
command line, as a user would build and run it (real subprocesses, gcc, libcrypto)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from models import make_mlp, reference_outputs
from native_toolchain import require_toolchain
from test_cli import cli, one_line_error

from modelcloak.cli.main import main
from modelcloak.keys import KeyFile, generate_key_file
from modelcloak.protector import protect


def _split_bundle(folder: Path, name: str, seed: int) -> Path:
    """protect --scheme split with scores out: the private part is the MLP's last two layers."""
    (folder / f"{name}.onnx").write_bytes(make_mlp(seed=seed).SerializeToString())
    made = cli(
        "protect", str(folder / f"{name}.onnx"), "-o", str(folder / f"{name}.mcb"), "--scheme", "split",
        "--cut-last", "2", "--output-policy", "scores", "--key-file", str(folder / "host.key"),
        "--enclave-key-file", str(folder / "enclave.key"),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    return folder / f"{name}.mcb"


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    for name in ("host.key", "enclave.key", "other.key"):
        generate_key_file(tmp_path / name)
    return tmp_path


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str) -> None:
    """In process (the checks run before any compiler): exit 2 and one `modelcloak: error:` line."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("modelcloak: error: ") and fragment in lines[0], lines[0]


def test_enclave_build_refuses_bad_requests_with_one_line(keys: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = keys / "m.mcb"
    protect(
        make_mlp(seed=1), bundle, key=KeyFile(keys / "host.key"), scheme="split", cut={"last": 2},
        enclave_key=KeyFile(keys / "enclave.key"),
    )  # fmt: skip
    build = ["enclave-build", str(bundle), "--enclave-key-file"]
    _refused(capsys, [*build, str(keys / "other.key"), "-o", str(keys / "a")], "wrong enclave key")
    _refused(capsys, [*build, str(keys / "enclave.key"), "--arch", "x86-64;id", "-o", str(keys / "b")], "-march")
    (keys / "notes").mkdir()
    (keys / "notes" / "mine.txt").write_text("keep me")
    _refused(capsys, [*build, str(keys / "enclave.key"), "-o", str(keys / "notes")], "not a native enclave build")
    assert (keys / "notes" / "mine.txt").read_text() == "keep me"
    _refused(
        capsys, ["enclave-build", str(keys / "no.mcb"), "--enclave-key-file", str(keys / "enclave.key")], "no such"
    )
    assert not [p for p in keys.iterdir() if p.name in ("a", "b", "m.native") or p.name.startswith(".")], "left over"
    np.save(keys / "x.npy", np.zeros((1, 16), np.float32))
    run = ["run", "--allow-unsigned", str(bundle), str(keys / "x.npy"), "--key-file", str(keys / "host.key")]
    _refused(capsys, [*run, "--native-enclave", str(keys / "notes")], "needs the enclave's key")
    _refused(
        capsys,
        [*run, "--enclave-key-file", str(keys / "enclave.key"), "--native-enclave", str(keys / "notes")],
        "is not an executable native enclave",
    )


@pytest.mark.slow
def test_enclave_build_then_run_with_the_native_enclave(keys: Path) -> None:
    require_toolchain()
    for name in ("host.key", "enclave.key"):  # the CLI's own keygen, as a user would
        (keys / name).unlink()
        assert cli("keygen", str(keys / name)).returncode == 0
    bundle, other = _split_bundle(keys, "m", seed=1), _split_bundle(keys, "o", seed=2)
    built = cli("enclave-build", str(bundle), "--enclave-key-file", str(keys / "enclave.key"), "--arch", "x86-64-v2")
    assert built.returncode == 0, built.stderr
    binary = keys / "m.native" / "modelcloak-enclave"  # the default: next to the bundle
    assert "built" in built.stdout and "Gemm" in built.stdout and os.access(binary, os.X_OK)
    assert {"model.c", "enclave.c", "kernels.h", "mc_model.h", "Makefile"} <= {p.name for p in binary.parent.iterdir()}
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    np.save(keys / "x.npy", x)
    run = ["run", "--allow-unsigned", str(bundle), str(keys / "x.npy"), "--key-file", str(keys / "host.key")]
    ran = cli(*run, "--enclave-key-file", str(keys / "enclave.key"), "--native-enclave", str(binary), "-o",
              str(keys / "y.npz"))  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    scores = next(iter(np.load(keys / "y.npz").values()))
    np.testing.assert_allclose(scores, reference_outputs(make_mlp(seed=1), x), rtol=0, atol=1e-4)
    # The binary really is the enclave: one built for another bundle refuses this bundle's header.
    assert cli("enclave-build", str(other), "--enclave-key-file", str(keys / "enclave.key")).returncode == 0
    one_line_error(
        cli(*run, "--enclave-key-file", str(keys / "enclave.key"), "--native-enclave", str(keys / "o.native")),
        "failed authentication",
    )
    # A second build into the same directory needs --force, and then replaces it.
    again = ["enclave-build", str(bundle), "--enclave-key-file", str(keys / "enclave.key")]
    one_line_error(cli(*again), "pass --force")
    assert cli(*again, "--force").returncode == 0 and os.access(binary, os.X_OK)
