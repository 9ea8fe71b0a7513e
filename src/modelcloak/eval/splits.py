"""`modelcloak bench-splits`: what each cut costs, measured through the real enclave process.

For every candidate cut (or a chosen list) we build a real split bundle, start its enclave and
time, at each batch size: the whole model in onnxruntime (the reference), the public part, the
private part computed locally (what the enclave's executor costs), the enclave call (private part
plus the boundary round trip), and the total through `SplitSession.run`. The five calls are
timed in interleaved rounds (one of each per round), so load on a shared machine hits them alike;
each is reported as the median and interquartile range of its rounds. The boundary round trip is
the median over rounds of (enclave call - local private time), and `host_other_ms` the median of
(total - public - enclave call): both are differences and may be negative when noise exceeds
them; they are reported as measured, never clamped.
"""

from __future__ import annotations

import csv
import functools
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from modelcloak.errors import ModelcloakError
from modelcloak.inference import load
from modelcloak.keys import generate_key_file
from modelcloak.model import load_model, signature
from modelcloak.model.cut import candidate_cuts, split_model
from modelcloak.protector import protect
from modelcloak.runtime.session import SplitSession

FIELDS = (
    "cut",
    "after_node",
    "batch",
    "whole_ms",
    "public_ms",
    "private_ms",
    "enclave_call_ms",
    "boundary_round_trip_ms",
    "total_ms",
    "whole_p25_ms",
    "whole_p75_ms",
    "total_p25_ms",
    "total_p75_ms",
    "host_other_ms",
    "total_vs_whole",
    "repeats",
    "enclave_start_s",
    "boundary_bytes_per_sample",
    "private_parameters",
)


def _random_inputs(model: onnx.ModelProto, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in signature(model).inputs:
        shape = [batch if i == 0 else (d if isinstance(d, int) else 1) for i, d in enumerate(spec.shape)]
        dtype = np.dtype(spec.dtype)
        if dtype.kind in "iu":
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(dtype)  # valid ids for any vocabulary
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def _median_ms(call: Callable[[], Any], repeats: int) -> float:
    call()  # warm-up: first runs allocate arenas
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _interleaved_ms(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Milliseconds of each call in each of `repeats` rounds; a round runs every call once."""
    for call in calls.values():
        call()  # warm-up: first runs allocate arenas
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile)."""
    p25, p50, p75 = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
    return float(p25), float(p50), float(p75)


def bench_splits(
    model: str | Path | onnx.ModelProto,
    *,
    cuts: Sequence[int] | None = None,
    batches: Sequence[int] = (1, 64),
    repeats: int = 20,
    threads: int | None = None,
    on_step: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Time every chosen cut at every batch size; one row per (cut, batch)."""
    import onnxruntime as ort

    proto = load_model(model)
    candidates = candidate_cuts(proto)
    if not candidates:
        raise ModelcloakError("the model has no valid cut")
    chosen = list(range(len(candidates))) if cuts is None else list(cuts)
    for index in chosen:
        if not 0 <= index < len(candidates):
            raise ModelcloakError(f"cut index {index} is out of range (0..{len(candidates) - 1})")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    whole = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="modelcloak-bench-") as scratch:
        folder = Path(scratch)
        host_key, enclave_key = generate_key_file(folder / "host.key"), generate_key_file(folder / "enclave.key")
        for index in chosen:
            cut = candidates[index]
            if on_step:
                on_step(f"cut {index} after {cut.after_node}")
            _, private = split_model(proto, cut)
            local_private = ort.InferenceSession(
                private.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
            bundle = folder / f"cut{index}.mcb"
            protect(
                proto, bundle, key=host_key, scheme="split", cut={"index": index}, enclave_key=enclave_key, verify=False
            )
            with load(
                bundle, key=host_key, threads=threads, enclave_key_file=enclave_key.path, enclave_threads=threads
            ) as session:
                if not isinstance(session, SplitSession):
                    raise ModelcloakError(f"{bundle} did not open as a split session")
                for batch in batches:
                    feeds = _random_inputs(proto, batch)
                    crossing = session.boundary(feeds)
                    timings: dict[str, Callable[[], Any]] = {
                        "whole_ms": functools.partial(whole.run, None, feeds),
                        "public_ms": functools.partial(session.boundary, feeds),
                        "private_ms": functools.partial(local_private.run, None, crossing),
                        "enclave_call_ms": functools.partial(session.enclave.infer, crossing),
                        "total_ms": functools.partial(session.run, feeds),
                    }
                    times = _interleaved_ms(timings, repeats)
                    measured = {name: statistics.median(values) for name, values in times.items()}
                    round_trip = [e - p for e, p in zip(times["enclave_call_ms"], times["private_ms"])]
                    other = [
                        t - p - e for t, p, e in zip(times["total_ms"], times["public_ms"], times["enclave_call_ms"])
                    ]
                    whole_q, total_q = _quartiles(times["whole_ms"]), _quartiles(times["total_ms"])
                    rows.append(
                        {
                            "cut": index,
                            "after_node": cut.after_node,
                            "batch": batch,
                            **{k: round(v, 4) for k, v in measured.items()},
                            "boundary_round_trip_ms": round(statistics.median(round_trip), 4),
                            "whole_p25_ms": round(whole_q[0], 4),
                            "whole_p75_ms": round(whole_q[2], 4),
                            "total_p25_ms": round(total_q[0], 4),
                            "total_p75_ms": round(total_q[2], 4),
                            "host_other_ms": round(statistics.median(other), 4),
                            "total_vs_whole": round(measured["total_ms"] / measured["whole_ms"], 3),
                            "repeats": repeats,
                            "enclave_start_s": round(session.report.seconds.get("enclave_start", float("nan")), 3),
                            "boundary_bytes_per_sample": cut.boundary_bytes,
                            "private_parameters": cut.private_parameters,
                        }
                    )
    return rows


def write_report(rows: list[dict[str, Any]], out_dir: Path, title: str) -> dict[str, Path]:
    """CSV, JSON and a PNG of latency per cut: measured totals beside the whole model, parts as points."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "splits.csv", "json": out_dir / "splits.json", "png": out_dir / "splits.png"}
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    paths["json"].write_text(json.dumps(rows, indent=2))
    plot_latency(rows, paths["png"], title)
    return paths


def _error(rows: list[dict[str, Any]], name: str) -> np.ndarray | None:
    """Matplotlib's yerr (distance below, above) from a row's quartiles; None for rows without them."""
    if not all(f"{name}_p25_ms" in row for row in rows):
        return None
    low = [max(0.0, row[f"{name}_ms"] - row[f"{name}_p25_ms"]) for row in rows]
    high = [max(0.0, row[f"{name}_p75_ms"] - row[f"{name}_ms"]) for row in rows]
    return np.array([low, high])


def plot_latency(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Write `latency_figure(rows, title)` to `path` as a PNG."""
    import matplotlib.pyplot as plt

    fig = latency_figure(rows, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency_figure(rows: list[dict[str, Any]], title: str) -> Any:
    """Per batch size: for each cut, a bar of the split's measured total and one of the whole model
    (medians, whiskers the interquartile range of the interleaved rounds), and the separately timed
    parts as points. The parts are medians of their own rounds: they need not add up to the total,
    and a difference (the boundary round trip) may be below zero; both are drawn as measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({row["batch"] for row in rows})
    cuts = max(len([row for row in rows if row["batch"] == batch]) for batch in batches)
    fig, axes = plt.subplots(1, len(batches), figsize=(max(6.0, 0.5 * cuts + 3) * len(batches), 5.5), squeeze=False)
    for axis, batch in zip(axes[0], batches):
        subset = [row for row in rows if row["batch"] == batch]
        x = np.arange(len(subset))
        width = 0.38
        axis.bar(x - width / 2, [r["whole_ms"] for r in subset], width, yerr=_error(subset, "whole"), capsize=2,
                 color="0.7", label="whole model (onnxruntime)")  # fmt: skip
        axis.bar(x + width / 2, [r["total_ms"] for r in subset], width, yerr=_error(subset, "total"), capsize=2,
                 color="tab:blue", label="split, measured total")  # fmt: skip
        parts = (
            ("public_ms", "^", "public part (host)"),
            ("private_ms", "s", "private part, timed locally"),
            ("boundary_round_trip_ms", "o", "boundary round trip (enclave call - private)"),
        )
        for key, marker, label in parts:
            axis.plot(x + width / 2, [r[key] for r in subset], marker, color="black", markersize=4,
                      linestyle="none", fillstyle="none", label=label)  # fmt: skip
        axis.axhline(0.0, color="black", linewidth=0.6)
        axis.set_xticks(x, [f"{r['cut']} {_short(r['after_node'])}" for r in subset], rotation=90, fontsize=7)
        axis.set_xlabel("cut: index and last public node")
        axis.set_ylabel("median latency per call (ms)")
        repeats = sorted({int(r["repeats"]) for r in subset if r.get("repeats")})
        shown = f", {repeats[0]} interleaved rounds, whiskers: interquartile range" if len(repeats) == 1 else ""
        axis.set_title(f"batch {batch}{shown}", fontsize=9)
        axis.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _short(name: str, limit: int = 24) -> str:
    return name if len(name) <= limit else "..." + name[-(limit - 3) :]


def interleaved_latency_ratios(
    model: str | Path | onnx.ModelProto,
    *,
    cuts: Sequence[int],
    batch: int = 1,
    rounds: int = 7,
    calls: int = 5,
    threads: int | None = 1,
    on_step: Callable[[str], None] | None = None,
) -> dict[int, list[float]]:
    """Split/whole latency ratios per cut, one per round, measured interleaved.

    A decision between cuts must not hang on when each cut happened to be timed: on a shared
    machine, timing the cuts one after another let the load of the moment decide (ratios for one
    private part ranged 4x to 33x between runs). Here every cut's enclave is started first; then
    each round times the whole model and every cut (in a rotated order), each as the median of
    `calls` runs, and divides within the round, so a load change hits numerator and denominator
    alike. Callers take the median over rounds (`stats.spread`).

    Every runtime, the whole model's included, gets `threads` intra-op threads, one by default:
    with every cut's enclave standing by, multi-threaded onnxruntime pools keep spinning after
    each run and steal the cores of whichever cut is being timed (seen: 8x for one cut, 94x for
    its neighbour with a private part of the same size, in one run on two cores). One thread
    each makes the ratio like for like; `bench_splits` measures the default thread pools.
    """
    import contextlib

    import onnxruntime as ort

    if rounds < 1 or calls < 1 or batch < 1:
        raise ModelcloakError("rounds, calls and batch must be at least 1")
    proto = load_model(model)
    candidates = candidate_cuts(proto)
    for index in cuts:
        if not 0 <= index < len(candidates):
            raise ModelcloakError(f"cut index {index} is out of range (0..{len(candidates) - 1})")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    whole = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = _random_inputs(proto, batch)
    ratios: dict[int, list[float]] = {index: [] for index in cuts}
    with tempfile.TemporaryDirectory(prefix="modelcloak-latency-") as scratch, contextlib.ExitStack() as stack:
        folder = Path(scratch)
        host_key, enclave_key = generate_key_file(folder / "host.key"), generate_key_file(folder / "enclave.key")
        sessions = {}
        for index in cuts:
            if on_step:
                on_step(f"latency: starting the enclave of cut {index}")
            bundle = folder / f"cut{index}.mcb"
            protect(
                proto, bundle, key=host_key, scheme="split", cut={"index": index}, enclave_key=enclave_key, verify=False
            )
            sessions[index] = stack.enter_context(
                load(bundle, key=host_key, threads=threads, enclave_key_file=enclave_key.path, enclave_threads=threads)
            )
            sessions[index].run(feeds)  # warm-up: first runs allocate arenas
        whole.run(None, feeds)
        order = list(cuts)
        for number in range(rounds):
            if on_step:
                on_step(f"latency: round {number + 1} of {rounds}")
            shift = number % len(order) if order else 0
            whole_ms = _median_ms(lambda: whole.run(None, feeds), calls)
            for index in order[shift:] + order[:shift]:
                split_ms = _median_ms(functools.partial(sessions[index].run, feeds), calls)
                ratios[index].append(split_ms / whole_ms)
    return ratios
