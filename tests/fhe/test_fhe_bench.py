"""bench-fhe's owner-side cell and its comparison with the SAP paper's published decryption figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tenseal")

from modelcloak.eval.fhebench import (  # noqa: E402
    ROWS,
    SAP_DECRYPTION,
    BenchRow,
    _owner_run,
    _write,
    sap_comparison,
)
from modelcloak.fhe import DenseProgram, EdgeEvaluator, FheError, protect_program  # noqa: E402


def _row(row: str, security: int, features: str, decrypt_ms: float) -> BenchRow:
    return BenchRow(
        row=row,
        security=security,
        features=features,
        ring_degree=8192,
        log2_q=217,
        scale_bits=27,
        latency_ms=100.0,
        latency_cpu_ms=90.0,
        per_sample_ms=25.0,
        per_sample_cpu_ms=20.0,
        batch=4,
        load_mib=10.0,
        peak_mib=2.0,
        remaining_levels=0,
        final_scale_bits=27.0,
        rotation_keys=9,
        plain_kib=1.0,
        encrypted_kib=100.0,
        package_kib=200.0,
        keys_kib=50.0,
        max_abs_logit_error=1e-3,
        plain_accuracy=0.9,
        fhe_accuracy=0.9,
        relu_model_accuracy=0.9,
        decrypt_ms=decrypt_ms,
        decrypt_cpu_ms=decrypt_ms / 2,
        owner_load_mib=3.0,
    )


def test_every_sap_cell_sits_beside_our_measurement_of_the_same_row_and_level(tmp_path: Path) -> None:
    # 128-bit measured, in both feature modes; 192/256 not run. Encrypted-features rows must not be
    # the ones compared (the owner decrypts the same result shape either way; we compare plaintext).
    rows = [_row(r, 128, "plaintext", 1.5 + i) for i, r in enumerate(ROWS)]
    rows += [_row(r, 128, "encrypted", 99.0) for r in ROWS]
    cells = sap_comparison(rows)
    assert {(c["row"], c["security"]) for c in cells} == set(SAP_DECRYPTION) and len(cells) == 9
    for c in cells:
        assert (c["sap_decrypt_s"], c["sap_decrypt_mb"]) == SAP_DECRYPTION[(c["row"], c["security"])]
        if c["security"] == 128:
            assert c["ours_decrypt_ms"] == 1.5 + ROWS.index(c["row"])
        else:
            assert c["ours_decrypt_ms"] is None  # not measured: stated, never filled in
    # The paper's figure for the square classifier at 128-bit (Table 4): 2.9 s and 963.8 Mb.
    assert SAP_DECRYPTION[(ROWS[2], 128)] == (2.9, 963.8)

    summary = {
        "machine": "test",
        "runs": 1,
        "accuracy_samples": 1,
        "rows": [],
        "tenseal": [],
        "sap": {"source": "SAP", "classification_range_s": (2.1, 5580.0), "cells": cells},
    }
    _write(tmp_path, rows, [], summary)
    table = (tmp_path / "fhe.md").read_text()
    assert "| classifier, square | 128 | 2.9 | 963.8 | 3.5 (1.8) | 3 | 100.0 (90.0) |" in table
    assert "| classifier, square | 256 | 3.2 | 2062.5 | not run | not run | not run |" in table
    assert (tmp_path / "fhe_sap.png").stat().st_size > 0  # the comparison also gets a plot
    json.dumps(summary)  # the summary the bench writes must stay JSON


def test_owner_cell_times_a_real_decryption_and_refuses_a_foreign_result() -> None:
    rng = np.random.default_rng(0)
    program = DenseProgram([rng.standard_normal((10, 32))], [rng.standard_normal(10)], [])
    x = rng.standard_normal((8, 32))
    model = protect_program(program, 128, probe=x, seed=0)
    result = EdgeEvaluator(model.edge_package).evaluate(x[:1])
    cell = _owner_run(model.owner_secret, result, 2)
    assert cell["decrypt_ms"] > 0 and cell["decrypt_cpu_ms"] >= 0 and np.isfinite(cell["owner_load_mib"])
    # Negative control: the same cell on another model's result raises instead of timing a refusal.
    other = protect_program(program, 128, probe=x, seed=1)
    with pytest.raises(FheError):
        _owner_run(model.owner_secret, EdgeEvaluator(other.edge_package).evaluate(x[:1]), 1)
