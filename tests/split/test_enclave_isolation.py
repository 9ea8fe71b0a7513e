"""The enclave cannot be talked out of its policy through the host's environment (issue 13, item 5).

The attack: whoever runs the host sets PYTHONPATH to a directory with a `sitecustomize.py` that
rewrites the enclave's policy code, so a `label` bundle answers with full scores. The enclave is
started with `python -I`, a scrubbed environment and its own working directory, so that file is
never imported; the control starts the same enclave the old way (PYTHONPATH honoured) and shows
the payload works. Second layer: the host refuses RESULT tensors READY did not announce.
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import split_models

import modelcloak
from modelcloak.bundle.container import Bundle
from modelcloak.enclave import sandbox
from modelcloak.enclave.protocol import TensorSpec
from modelcloak.inference import load
from modelcloak.keys import generate_key_file
from modelcloak.protector import protect
from modelcloak.runtime.enclave_client import EnclaveClient, EnclaveError, _announced_results

SRC = str(Path(modelcloak.__file__).resolve().parents[1])

# Four lines that turn every policy into "scores" in whatever Python process imports them.
SCORES_PAYLOAD = """
import modelcloak.enclave.policy as policy
policy.parse_policy = lambda document=None: policy.OutputPolicy(output="scores")
"""
# Keeps READY honest (labels announced) but sends the raw scores under the name "label".
RELABEL_PAYLOAD = """
import modelcloak.enclave.policy as policy
policy.apply_output_policy = lambda p, names, outputs: [("label", outputs[0])]
"""


@pytest.fixture(scope="module")
def label_bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("isolation")
    host_key, enclave_key = generate_key_file(folder / "host.key"), generate_key_file(folder / "enclave.key")
    bundle = folder / "mlp-label.mcb"
    protect(
        split_models.mlp(),
        bundle,
        key=host_key,
        scheme="split",
        cut={"after_node": "relu0"},
        enclave_key=enclave_key,
        policy={"output": "label"},
        verify=False,
    )
    return bundle, host_key, enclave_key


def _evil(tmp_path: Path, payload: str) -> Path:
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(textwrap.dedent(payload))
    return folder


def _sealed_private(bundle: Path) -> tuple[bytes, bytes, dict[str, np.ndarray]]:
    """The header, the enclave's ciphertext, and a batch of 4 boundary activations (relu0's output)."""
    with Bundle.open(bundle) as sealed:
        header, private = sealed.header, sealed.section_ciphertext("private")
    boundary = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    return header, private, {"r0": boundary}


def test_pythonpath_sitecustomize_cannot_change_the_policy(tmp_path, label_bundle, monkeypatch):
    bundle, host_key, enclave_key = label_bundle
    evil = _evil(tmp_path, SCORES_PAYLOAD)
    monkeypatch.setenv("PYTHONPATH", f"{evil}{os.pathsep}{SRC}")
    feeds = split_models.sample_input("mlp", 4)
    with load(bundle, key=host_key, enclave_key_file=enclave_key.path) as session:
        result = session.run(feeds)
    assert list(result) == ["label"]
    assert result["label"].shape == (4,) and result["label"].dtype == np.int64


def test_control_the_payload_works_when_the_environment_is_inherited(tmp_path, label_bundle):
    """Negative control: the same enclave started the old way (`python -m`, PYTHONPATH kept) obeys the payload."""
    bundle, host_key, enclave_key = label_bundle
    evil = _evil(tmp_path, SCORES_PAYLOAD)
    header, private, feeds = _sealed_private(bundle)
    client = EnclaveClient(
        command=[sys.executable, "-m", "modelcloak.enclave"], env={"PYTHONPATH": f"{evil}{os.pathsep}{SRC}"}
    )
    try:
        client.start(["--key-file", str(enclave_key.path)], threads=1)
        info = client.load(header, private)
        result = client.infer(feeds)
    finally:
        client.close()
    assert info.policy.output == "scores"
    assert result["probs"].shape == (4, 10) and result["probs"].dtype == np.float32


def test_host_refuses_results_ready_did_not_announce(tmp_path, label_bundle):
    bundle, host_key, enclave_key = label_bundle
    evil = _evil(tmp_path, RELABEL_PAYLOAD)
    header, private, feeds = _sealed_private(bundle)
    client = EnclaveClient(
        command=[sys.executable, "-m", "modelcloak.enclave"], env={"PYTHONPATH": f"{evil}{os.pathsep}{SRC}"}
    )
    try:
        client.start(["--key-file", str(enclave_key.path)], threads=1)
        info = client.load(header, private)
        assert [spec.name for spec in info.outputs] == ["label"]
        with pytest.raises(
            EnclaveError, match=r"enclave sent result 'label' as float32\[4, 10\] where READY announced int64\[\?\]"
        ):
            client.infer(feeds)
    finally:
        client.close()


def test_announced_results_accepts_what_ready_announced():
    """Control for the check above: conforming results pass, an extra tensor does not."""
    spec = TensorSpec("label", np.dtype("int64"), (None,))
    labels = np.zeros(3, np.int64)
    assert _announced_results([("label", labels)], [spec])["label"] is labels
    with pytest.raises(EnclaveError, match="READY announced"):
        _announced_results([("label", labels), ("probs", np.zeros((3, 10), np.float32))], [spec])


def test_enclave_runs_in_its_own_directory_with_a_scrubbed_environment(tmp_path, label_bundle, monkeypatch):
    _, _, enclave_key = label_bundle
    monkeypatch.setenv("MC_SECRET_HOST_VARIABLE", "host-only")
    monkeypatch.chdir(tmp_path)
    client = EnclaveClient()
    try:
        client.start(["--key-file", str(enclave_key.path)], threads=1)
        pid = client.pid
        environ = dict(
            item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item
        )
        cwd = os.readlink(f"/proc/{pid}/cwd")
        argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    finally:
        client.close()
    assert "MC_SECRET_HOST_VARIABLE" not in environ and "PYTHONPATH" not in environ
    assert environ["TMPDIR"] == cwd and cwd != str(tmp_path) and Path(cwd).name.startswith("modelcloak-enclave-")
    assert environ["HOME"] == sandbox.NO_HOME
    assert not Path(cwd).exists()  # removed with the enclave
    assert argv[1] == "-I"


def _open_files(pid: int) -> list[str]:
    """Paths of the regular files and directories `pid` holds open (sockets, pipes, devices excluded)."""
    paths = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/") and not target.startswith("/dev/"):
            paths.append(target)
    return paths


@pytest.mark.parametrize("home", ["scrubbed", "writable"])
def test_enclave_holds_no_file_open_after_the_sandbox(tmp_path, label_bundle, home):
    """After LOAD (sandbox installed), the enclave holds no file: in particular not onnxruntime's
    telemetry database. Control (home="writable"): the same enclave given a writable HOME through a
    launcher that skips the enclave's own scrub holds that database open, so the check can fail."""
    bundle, _, enclave_key = label_bundle
    header, private, feeds = _sealed_private(bundle)
    if home == "scrubbed":
        client = EnclaveClient()
    else:
        fake_home = tmp_path / "home"
        fake_home.mkdir()
        skip_scrub = (
            "import sys; sys.path.insert(0, sys.argv.pop(1)); from modelcloak.enclave import sandbox; "
            "sandbox.scrub_environment = lambda: None; from modelcloak.enclave.__main__ import main; sys.exit(main())"
        )
        client = EnclaveClient(command=[sys.executable, "-I", "-c", skip_scrub, SRC], env={"HOME": str(fake_home)})
    try:
        client.start(["--key-file", str(enclave_key.path)], threads=1)
        info = client.load(header, private)
        client.infer(feeds)
        held = _open_files(client.pid)
    finally:
        client.close()
    assert "seccomp" in info.sandbox or "nofile_limited" in info.sandbox
    telemetry = [path for path in held if "onnxruntime.db" in path]
    if home == "scrubbed":
        assert held == [], held
    else:
        assert telemetry, held


def test_key_variable_leaves_the_host_environment_and_restarts_still_work(tmp_path, monkeypatch) -> None:
    """`--key-env`: the key is moved out of os.environ at the first start (children the host starts
    later do not inherit it) and kept in memory, so a restart still hands it to the enclave."""
    import os

    from modelcloak.runtime.enclave_client import EnclaveClient

    key = os.urandom(32).hex()
    monkeypatch.setenv("MC_TEST_MOVED_KEY", key)
    with EnclaveClient() as client:
        client.start(["--key-env", "MC_TEST_MOVED_KEY"], threads=1)
        first = client.key_id
        assert "MC_TEST_MOVED_KEY" not in os.environ
        client.restart()
        assert client.key_id == first and client.pid is not None
