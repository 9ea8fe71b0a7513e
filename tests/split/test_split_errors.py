"""Clean errors for split bundles (issue 13, item 10): one line naming what is wrong."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import split_models

from modelcloak.inference import load
from modelcloak.keys import generate_key_file
from modelcloak.protector import protect
from modelcloak.runtime import SessionError


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    folder = tmp_path_factory.mktemp("split-errors")
    host_key, enclave_key = generate_key_file(folder / "host.key"), generate_key_file(folder / "enclave.key")
    paths = {}
    for name, cut in (("mlp", {"after_node": "relu0"}), ("text_cnn", {"index": 0})):
        paths[name] = folder / f"{name}.mcb"
        protect(
            getattr(split_models, name)(),
            paths[name],
            key=host_key,
            scheme="split",
            cut=cut,
            enclave_key=enclave_key,
            verify=False,
        )
    return paths, host_key, enclave_key, folder


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((2, 15), np.float32), r"^input 'x' must have shape \[batch, 16\], got \[2, 15\]$"),
        (np.zeros((2, 16, 1), np.float32), r"^input 'x' must have shape \[batch, 16\], got \[2, 16, 1\]$"),
        (np.zeros((2, 16), np.int64), r"^input 'x' must be float32, got int64"),
        (np.zeros((2, 16), bool), r"^input 'x' must be float32, got bool"),
    ],
)
def test_wrong_inputs_are_one_line(bundles, array, message):
    paths, host_key, enclave_key, _ = bundles
    with load(paths["mlp"], key=host_key, enclave_key_file=enclave_key.path) as session:
        with pytest.raises(SessionError, match=message):
            session.run({"x": array})
        # Control: the right array still runs (float64 is refused like onnxruntime does; see tests/runtime).
        assert session.run({"x": np.zeros((2, 16), np.float32)})["label"].shape == (2,)


def test_out_of_range_token_ids_give_one_line_and_no_log(bundles, capfd):
    paths, host_key, enclave_key, _ = bundles
    tokens = np.full((2, split_models.TEXT_LENGTH), split_models.TEXT_VOCAB + 7, np.int64)
    with load(paths["text_cnn"], key=host_key, enclave_key_file=enclave_key.path) as session:
        capfd.readouterr()
        with pytest.raises(SessionError) as caught:
            session.run({"x": tokens})
        ok = session.run({"x": np.zeros_like(tokens)})  # control
    assert "\n" not in str(caught.value) and "out of data bounds" in str(caught.value)
    assert "\x1b[" not in capfd.readouterr().err  # onnxruntime's coloured log stays quiet
    assert ok["label"].shape == (2,)


def test_enclave_key_file_and_env_together_are_refused(bundles):
    paths, host_key, enclave_key, folder = bundles
    np.save(folder / "x.npy", np.zeros((2, 16), np.float32))
    done = subprocess.run(
        [sys.executable, "-m", "modelcloak", "run", "--allow-unsigned",
            str(paths["mlp"]), str(folder / "x.npy"), "--key-file",
         str(host_key.path), "--enclave-key-file", str(enclave_key.path), "--enclave-key-env", "MC_EK"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "MC_EK": "00" * 32},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "modelcloak: error: give the enclave key one way: --enclave-key-file or --enclave-key-env, not both"
    ]
