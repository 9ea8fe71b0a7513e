"""`soft-lock`: fine-tune a model so it is accurate in FP32 and at chance in FP16/INT8, with a report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from modelcloak.cli.common import err, out
from modelcloak.errors import ModelcloakError


def soft_lock(
    model: Annotated[
        Path,
        typer.Argument(
            help="The trained classifier: .onnx (chains and branching graphs), or a saved PyTorch module (.pt)."
        ),
    ],
    data: Annotated[Path, typer.Option("--data", help="Training data: .npz with float inputs x and integer labels y.")],
    output: Annotated[Path, typer.Option("--out", "-o", help="Where to write the soft-locked ONNX model.")],
    test_data: Annotated[
        Optional[Path],
        typer.Option("--test-data", help="Held-out .npz (x, y) for the report (default: --holdout of --data)."),
    ] = None,
    holdout: Annotated[
        float, typer.Option(help="Share of --data held out for the report when --test-data is not given.")
    ] = 0.2,
    epochs: Annotated[int, typer.Option(help="Epochs of the constrained fine-tune.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of the fine-tune and of the hold-out split.")] = 0,
    report: Annotated[
        Optional[Path], typer.Option("--report", help="Also write the accuracy report as JSON here.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing output files.")] = False,
) -> None:
    """Soft-lock MODEL with your data; report FP32/FP16/INT8 accuracy before and after (docs/LOCK.md)."""
    import numpy as np
    import onnx

    from modelcloak.lock.soft_file import load_labelled, soft_lock_file

    for path in (output, report):
        if path is not None and path.exists() and not force:
            raise ModelcloakError(f"{path} already exists; pass --force to overwrite it")
    if epochs < 1:
        raise ModelcloakError("--epochs must be at least 1")
    x, y = load_labelled(data, "--data")
    if test_data is not None:
        x_test, y_test = load_labelled(test_data, "--test-data")
        x_train, y_train = x, y
    else:
        if not 0.0 < holdout < 1.0:
            raise ModelcloakError(f"--holdout must be between 0 and 1, got {holdout}")
        order = np.random.default_rng(seed).permutation(len(x))
        cut = int(round(len(x) * holdout))
        if cut < 1 or cut >= len(x):
            raise ModelcloakError(f"--data has {len(x)} examples: too few to hold out {holdout:.0%} for the report")
        x_test, y_test, x_train, y_train = x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]
    result = soft_lock_file(
        model, x_train, y_train, x_test, y_test, epochs=epochs, seed=seed, progress=True, console=err
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(result.locked, output)
    table = Table(title=f"soft lock of {model.name}: accuracy on {result.test_size} held-out examples")
    for column in ("format", "original", "soft-locked"):
        table.add_column(column)
    for variant, accuracy in result.original.items():
        table.add_row(variant, f"{100 * accuracy:.1f}%", f"{100 * result.soft_locked[variant]:.1f}%")
    out.print(table)
    out.print(f"chance (a constant answer): {100 * result.chance:.1f}%")
    for note in result.notes:
        err.print(f"modelcloak: warning: {note}", highlight=False)
    if report is not None:
        report.write_text(json.dumps(result.as_json(), indent=2) + "\n")
    out.print(f"wrote {output}" + (f" and {report}" if report else ""))


def register(app: typer.Typer) -> None:
    """Add the soft-lock command to the main app."""
    app.command("soft-lock")(soft_lock)
