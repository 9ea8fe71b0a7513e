"""The bench-splits plot tells the truth (issue 13, item 9): bars are the measured totals, a
negative difference stays negative, the spread of the rounds is drawn, and cuts are named."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
from matplotlib.container import BarContainer, ErrorbarContainer
from models import make_mlp

from modelcloak.eval.splits import bench_splits, latency_figure, write_report

matplotlib.use("Agg")


def _row(cut: int, node: str, total: float, public: float, private: float, trip: float) -> dict:
    return {
        "cut": cut,
        "after_node": node,
        "batch": 1,
        "whole_ms": 1.0,
        "whole_p25_ms": 0.9,
        "whole_p75_ms": 1.2,
        "public_ms": public,
        "private_ms": private,
        "enclave_call_ms": private + trip,
        "boundary_round_trip_ms": trip,
        "total_ms": total,
        "total_p25_ms": total - 0.5,
        "total_p75_ms": total + 1.0,
        "host_other_ms": total - public - private - trip,
        "total_vs_whole": total,
        "repeats": 9,
    }


def test_bars_are_the_measured_totals_not_the_sum_of_parts() -> None:
    # Cut 12 as the issue saw it: parts adding to 2.1 ms where the measured total was 11.9 ms,
    # and a round trip that came out negative in the noise.
    rows = [_row(3, "Relu_3", 2.5, 1.0, 0.9, 0.3), _row(12, "/features/conv/Conv_12", 11.9, 1.2, 1.0, -0.1)]
    fig = latency_figure(rows, "t")
    axis = fig.axes[0]
    bars = {c.get_label(): c for c in axis.containers if isinstance(c, BarContainer)}
    totals = [patch.get_height() for patch in bars["split, measured total"]]
    assert totals == pytest.approx([2.5, 11.9])  # a stacked sum would give 2.2 and 2.1
    assert [p.get_height() for p in bars["whole model (onnxruntime)"]] == pytest.approx([1.0, 1.0])
    assert sum(isinstance(c, ErrorbarContainer) for c in axis.containers) == 2  # both bars carry whiskers
    trip = next(line for line in axis.lines if line.get_label().startswith("boundary round trip"))
    assert list(trip.get_ydata()) == pytest.approx([0.3, -0.1])  # drawn as measured, not clamped to 0
    labels = [t.get_text() for t in axis.get_xticklabels()]
    assert labels[0] == "3 Relu_3" and labels[1].startswith("12 ") and labels[1].endswith("conv/Conv_12")
    assert "9 interleaved rounds" in axis.get_title()


@pytest.mark.slow
def test_a_real_run_reports_quartiles_and_signed_differences(tmp_path) -> None:
    rows = bench_splits(make_mlp(), cuts=[0, 2], batches=(1,), repeats=5)
    for row in rows:
        assert row["repeats"] == 5
        assert row["total_p25_ms"] <= row["total_ms"] <= row["total_p75_ms"]
        assert row["whole_p25_ms"] <= row["whole_ms"] <= row["whole_p75_ms"]
        assert np.isfinite(row["host_other_ms"]) and np.isfinite(row["boundary_round_trip_ms"])
    paths = write_report(rows, tmp_path, "mlp")
    assert paths["png"].stat().st_size > 10_000
    header = paths["csv"].read_text().splitlines()[0].split(",")
    assert {"total_p25_ms", "total_p75_ms", "host_other_ms", "repeats"} <= set(header)
