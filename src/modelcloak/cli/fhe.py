"""`modelcloak bench-fhe` and `modelcloak fhe-finetune`: thin wrappers over modelcloak.fhe."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from modelcloak.cli.common import err, out


def bench_fhe(
    output: Annotated[Path, typer.Option("--out", "-o", help="Directory for fhe.{md,csv,json,png}.")] = Path(
        "benchmarks/out/fhe"
    ),
    runs: Annotated[int, typer.Option(help="Timed runs per cell (median reported).")] = 5,
    samples: Annotated[int, typer.Option(help="Held-out MNIST digits for accuracy and logit error.")] = 1000,
    security: Annotated[str, typer.Option(help="Comma-separated security levels in bits.")] = "128,192,256",
    quick: Annotated[bool, typer.Option("--quick", help="128-bit only, 3 runs, 200 digits.")] = False,
) -> None:
    """The SAP paper's FHE table for our CKKS kernels on MNIST, with TenSEAL's built-in product side by side."""
    from modelcloak.eval.fhebench import run_benchmark
    from modelcloak.fhe import FheError

    try:
        levels = tuple(int(part) for part in security.split(",") if part.strip())
    except ValueError:
        raise FheError(f"--security must be comma-separated integers, got {security!r}") from None
    if quick:
        levels, runs, samples = (128,), 3, 200
    run_benchmark(output, securities=levels, runs=runs, accuracy_samples=samples, console=err)
    out.print((output / "fhe.md").read_text(), highlight=False, markup=False)
    out.print(f"wrote {output}/fhe.md, fhe.csv, fhe.json and fhe.png", highlight=False)


def fhe_finetune(
    private: Annotated[Path, typer.Argument(help="The private part as ONNX (dense layers and activations).")],
    data: Annotated[Path, typer.Option("--data", help=".npz with x (features at the cut) and y (labels).")],
    output: Annotated[Path, typer.Option("--out", "-o", help="Fine-tuned head to write (.npz).")],
    activation: Annotated[
        str, typer.Option(help="none, square, modified-square or relu-poly (fitted to ReLU on the data).")
    ] = "square",
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 6,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    holdout: Annotated[float, typer.Option(help="Fraction of the data kept out of training to report accuracy.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed for the split and the training order.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")] = False,
) -> None:
    """Retrain a private head with an FHE-friendly activation on the owner's data so accuracy holds."""
    from modelcloak.fhe import FheError, compile_onnx, finetune_head

    if output.exists() and not force:
        raise FheError(f"{output} exists; pass --force to overwrite it")
    if not 0.0 <= holdout < 1.0:
        raise FheError(f"--holdout must be in [0, 1), got {holdout}")
    try:
        with np.load(data, allow_pickle=False) as arrays:
            x, y = np.asarray(arrays["x"], dtype=np.float64), np.asarray(arrays["y"]).astype(np.int64)
    except (OSError, KeyError, ValueError) as exc:
        raise FheError(f"{data}: expected an .npz with arrays x and y ({exc})") from None
    x = x.reshape(len(x), -1)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(len(x) * holdout))
    test, train = order[:n_test], order[n_test:]
    head = compile_onnx(private, "none")
    dropped_in = head.with_activation(activation, x[train])
    tuned = finetune_head(head, x[train], y[train], activation, epochs=epochs, lr=lr, seed=seed, console=err)
    tuned.save(output)
    if n_test:
        before = float(np.mean(dropped_in.forward(x[test]).argmax(1) == y[test]))
        after = float(np.mean(tuned.forward(x[test]).argmax(1) == y[test]))
        out.print(
            f"held-out accuracy with {activation}: {before:.4f} dropped in, {after:.4f} fine-tuned", highlight=False
        )
    ranges = [a.fit_range for a in tuned.activations if a.fit_range]
    if ranges:
        out.print(
            f"ReLU fit ranges (from the data): {', '.join(f'[{lo:.3g}, {hi:.3g}]' for lo, hi in ranges)}",
            highlight=False,
        )
    out.print(f"wrote {output} (depth {tuned.depth()})", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the fhe commands to the main app (`bench-fhe` is registered with the benchmarks)."""
    app.command("fhe-finetune")(fhe_finetune)
