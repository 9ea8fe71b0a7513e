"""`bench-splits`, `bench-lock` and `bench-fhe`: what each scheme costs, measured side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from modelcloak.cli.common import err, int_list, out
from modelcloak.cli.fhe import bench_fhe
from modelcloak.errors import ModelcloakError


def bench_splits(
    model: Annotated[Path, typer.Argument(help="ONNX model file.")],
    cuts: Annotated[Optional[str], typer.Option(help="Comma-separated cut indices (default: all).")] = None,
    batches: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,64",
    repeats: Annotated[int, typer.Option(help="Timed calls per measurement (median).")] = 20,
    threads: Annotated[Optional[int], typer.Option(help="onnxruntime intra-op threads, both sides.")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for splits.csv/json/png.")] = Path("bench-splits"),
) -> None:
    """Time every cut through the real enclave: public, private, boundary, start-up, total vs whole model."""
    from rich.progress import Progress

    from modelcloak.eval.splits import bench_splits as run_bench
    from modelcloak.eval.splits import write_report
    from modelcloak.model import load_model
    from modelcloak.model.cut import candidate_cuts

    chosen = int_list(cuts, "--cuts")
    batch_sizes = int_list(batches, "--batches") or [1]
    if repeats < 1 or any(b < 1 for b in batch_sizes):
        raise ModelcloakError("--repeats and --batches must be positive")
    total = len(chosen) if chosen is not None else len(candidate_cuts(load_model(model)))
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("cuts", total=total)
        # Called as each cut starts: name it and count it.
        rows = run_bench(
            model,
            cuts=chosen,
            batches=batch_sizes,
            repeats=repeats,
            threads=threads,
            on_step=lambda label: bar.update(task, description=label, advance=1),
        )
    paths = write_report(rows, out_dir, f"latency per cut: {model.name}")
    columns = ("cut", "batch", "whole_ms", "public_ms", "private_ms", "boundary_round_trip_ms", "total_ms",
               "total_vs_whole", "enclave_start_s")  # fmt: skip
    table = Table(title=f"bench-splits {model.name} (medians, ms)")
    for column in columns:
        table.add_column(column.replace("_ms", "").replace("_", " "))
    for row in rows:
        table.add_row(*(str(row[c]) for c in columns))
    out.print(table)
    out.print(f"wrote {paths['csv']}, {paths['json']} and {paths['png']}")


def bench_lock(
    repeats: Annotated[int, typer.Option(help="Alternating seal/lock loads per model (median).")] = 7,
    epochs: Annotated[int, typer.Option(help="Training epochs of the two MNIST models.")] = 3,
    soft: Annotated[bool, typer.Option(help="Include the soft lock (fine-tune + INT8/FP16 quantisation).")] = True,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for lock.md, CSVs and lock.png.")] = Path("bench-lock"),
) -> None:
    """Lock scheme on MNIST models and EfficientNet-Lite0: accuracy per device/key/format, KS, unlock overhead."""
    from modelcloak.eval.lockbench import bench_lock as run_bench
    from modelcloak.eval.lockbench import write_lock_report

    bench = run_bench(repeats=repeats, epochs=epochs, soft=soft, console=err)
    command = f"modelcloak bench-lock --repeats {repeats} --epochs {epochs}" + ("" if soft else " --no-soft")
    paths = write_lock_report(bench, out_dir, command=command)
    table = Table(title=f"bench-lock (devices: {bench.devices})")
    for column in ("model", "variant", "accuracy", "bit-identical", "note"):
        table.add_column(column, overflow="fold")
    for r in bench.accuracy:
        shown = "refused" if r.accuracy is None else f"{100 * r.accuracy:.1f}%"
        identical = "" if r.identical is None else ("yes" if r.identical else "NO")
        table.add_row(r.model, r.variant, shown, identical, r.note)
    out.print(table)
    out.print(f"wrote {', '.join(str(p) for p in paths.values())}")


def register(app: typer.Typer) -> None:
    """Add the benchmark commands to the main app."""
    app.command("bench-splits")(bench_splits)
    app.command("bench-lock")(bench_lock)
    app.command("bench-fhe")(bench_fhe)
