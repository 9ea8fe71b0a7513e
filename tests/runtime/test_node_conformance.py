"""A fixed sample of ONNX's node conformance cases runs sealed exactly as in plain onnxruntime.

Every case plain onnxruntime builds and runs (deterministically) must give the identical result
sealed: scalar inputs, sequence and optional inputs and outputs, graphs without inputs and newer
IR versions included. `python tests/support/node_conformance.py` runs all 1,884 cases.
"""

from __future__ import annotations

import pytest
from node_conformance import all_cases, compare, sample

from modelcloak.keys import generate_key_file

SAMPLE_SIZE = 320
SIGNED_SAMPLE_SIZE = 120


@pytest.mark.slow
def test_node_conformance_sample_sealed_equals_onnxruntime(tmp_path):
    chosen = sample(all_cases(), SAMPLE_SIZE)
    counted, failures = compare(chosen, tmp_path, generate_key_file(tmp_path / "model.key"))
    # The sample must exercise what broke before, or equality would prove little.
    names = {case.name for case in chosen}
    assert len(chosen) == SAMPLE_SIZE and counted >= 250, (len(chosen), counted)
    assert any("sequence" in name for name in names) and any("optional" in name for name in names)
    assert failures == {}, f"{len(failures)} of {counted} cases differ sealed: {failures}"


@pytest.mark.slow
def test_node_conformance_sample_signed_format2_equals_onnxruntime(tmp_path):
    """The same cases signed: format 2 hashes each section beside its decryption and verifies before
    the graph is parsed, so every kind of graph must still come through unchanged."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    chosen = sample(all_cases(), SIGNED_SAMPLE_SIZE)
    key = generate_key_file(tmp_path / "model.key")
    counted, failures = compare(chosen, tmp_path, key, signer=Ed25519PrivateKey.generate())
    assert counted >= SIGNED_SAMPLE_SIZE // 2, (len(chosen), counted)
    assert failures == {}, f"{len(failures)} of {counted} cases differ signed: {failures}"
