"""Plaintext weights in process memory: only in memory left out of core dumps while a sealed model
is open, and nowhere in the process after `close()` (issue 15).

Each case runs in a fresh child (tests/support/memory_scan.py) that searches every readable
mapping of its own memory for a 64-byte canary planted in the weights (in a matrix row that
onnxruntime pre-packs, and in a bias it keeps as is). The controls show the search finds the
canary where it is: in a plain onnxruntime session, and after close() once glibc's wipe-on-free
is switched off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from models import make_mlp
from onnx import numpy_helper

from modelcloak.protector import protect

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/mem"),
    pytest.mark.slow,  # three child processes, about 5 s each on the shared 2-core machine
]

PROBE = Path(__file__).resolve().parents[1] / "support" / "memory_scan.py"


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, Path, Path, str]:
    """(plain model, sealed bundle, key file, canary as hex) with the canary in w0 and b0."""
    from modelcloak.keys import generate_key_file

    folder = tmp_path_factory.mktemp("canary")
    model = make_mlp((256, 512, 10), seed=7)
    canary = np.random.default_rng(2026).standard_normal(16).astype(np.float32)
    for tensor in model.graph.initializer:
        values = numpy_helper.to_array(tensor).copy()
        if tensor.name == "w0":
            values[5, 32:48] = canary  # 16 columns on a 16-column boundary: survives MLAS packing
        elif tensor.name == "b0":
            values[64:80] = canary
        else:
            continue
        tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    plain, bundle = folder / "model.onnx", folder / "model.mcb"
    onnx.save(model, plain)
    key = generate_key_file(folder / "model.key")
    protect(model, bundle, key=key)
    return plain, bundle, folder / "model.key", canary.tobytes().hex()


def _scan(mode: str, planted: tuple[Path, Path, Path, str]) -> dict[str, list[list]]:
    plain, bundle, key, canary = planted
    source = plain if mode == "plain" else bundle
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, str(PROBE), mode, str(source), str(key), canary],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def sealed_scan(planted) -> dict[str, list[list]]:
    return _scan("sealed", planted)


def test_open_session_holds_the_weights_only_in_memory_left_out_of_dumps(sealed_scan):
    hits = sealed_scan["open"]
    assert hits, "the runtime's copy of the weights should be found while the session is open"
    outside = [hit for hit in hits if "dd" not in hit[2]]
    assert not outside, f"plaintext weight canary in dumpable memory: {outside}"


def test_control_plain_onnxruntime_keeps_weights_in_dumpable_memory(planted):
    hits = _scan("plain", planted)["open"]
    assert any("dd" not in hit[2] for hit in hits), hits


def test_no_weight_canary_anywhere_in_the_process_after_close(sealed_scan):
    assert sealed_scan["closed"] == []


def test_control_without_wipe_on_free_the_canary_outlives_close(planted):
    assert _scan("sealed-no-wipe", planted)["closed"], "freed runtime copies should still hold the canary"
