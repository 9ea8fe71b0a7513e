"""`modelcloak bench-fhe`: the SAP paper's cost table for our CKKS implementation, on MNIST.

Rows: {last dense layer only, whole classifier without activation, whole classifier with square}
x {plaintext features, encrypted features} x {128, 192, 256}-bit security. Columns: latency of
one classification (median of several), amortised time per sample when the batch fills the
ciphertext, peak memory, remaining levels and scale bits, encrypted model size against the
plaintext weights, max abs logit error and accuracy against the plaintext model on held-out
digits. Plus, side by side in the same run, TenSEAL's built-in vector-matrix product against our
kernel on the same layers. Writes Markdown, CSV, JSON and a PNG.

The model: `modelcloak.zoo.mnist.small_cnn`'s convolutional part (public, plaintext) feeding a
784-64-32-10 dense classifier (private). The ReLU model is trained first; the "without
activation" and "square" heads are fine-tuned from it with that activation (`finetune_head`),
as the owner would do before protecting.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelcloak.fhe.engine import EdgeEvaluator, OwnerDecryptor, protect_program
from modelcloak.fhe.errors import FheError
from modelcloak.fhe.program import Activation, DenseProgram

__all__ = ["BenchRow", "run_benchmark"]

ROWS = ("last layer only", "classifier, no activation", "classifier, square")


@dataclass
class BenchRow:
    row: str
    security: int
    features: str  # plaintext | encrypted
    ring_degree: int
    log2_q: int
    scale_bits: int
    latency_ms: float  # one sample, median
    per_sample_ms: float  # amortised over full batches
    batch: int
    load_mib: float  # resident memory the loaded edge package takes
    peak_mib: float  # working memory on top of it while evaluating
    remaining_levels: int
    final_scale_bits: float
    rotation_keys: int
    plain_kib: float
    encrypted_kib: float
    package_kib: float
    max_abs_logit_error: float
    plain_accuracy: float
    fhe_accuracy: float
    relu_model_accuracy: float


class _PeakRss:
    """Samples this process's RSS in a thread; `peak_mib` is the rise over the level at start."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self._stop = threading.Event()
        self.base = self.peak = self._process.memory_info().rss

    def __enter__(self) -> _PeakRss:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def peak_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def _edge_run(package: bytes, inputs: np.ndarray, encrypt: bool, runs: int) -> dict[str, Any]:
    """The device side of one table cell: load the package, time one sample, then the whole set."""
    import psutil

    before = psutil.Process().memory_info().rss
    evaluator = EdgeEvaluator(package)
    load_mib = (psutil.Process().memory_info().rss - before) / 2**20
    one_sample = functools.partial(evaluator.evaluate, inputs[:1], encrypt_features=encrypt)
    with _PeakRss() as rss:
        latency = _median_ms(one_sample, runs)
        start = time.perf_counter()
        result = evaluator.evaluate(inputs, encrypt_features=encrypt)
        per_sample = (time.perf_counter() - start) * 1000 / len(inputs)
    return {
        "latency_ms": latency,
        "per_sample_ms": per_sample,
        "load_mib": load_mib,
        "peak_mib": rss.peak_mib,
        "remaining_levels": evaluator.remaining_levels,
        "final_scale_bits": evaluator.final_scale_bits,
        "encrypted_bytes": evaluator.encrypted_model_bytes,
        "result": result,
    }


def _child(conn: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def _in_fresh_process(fn: Callable[..., Any], *args: Any) -> Any:
    """Run fn in a forked child. SEAL keeps freed memory in its pool for the life of the process,
    so only a fresh process shows a cell's own load and working memory."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(child, fn, args))
    process.start()
    child.close()
    status, value = parent.recv()
    process.join()
    if status != "ok":
        raise FheError(f"benchmark cell failed: {value}")
    return value


def _median_ms(fn: Callable[[], Any], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def _train_models(epochs: int, finetune_epochs: int, console: Any) -> dict[str, Any]:
    import torch

    from modelcloak.fhe.finetune import finetune_head
    from modelcloak.training import train_classifier
    from modelcloak.zoo.mnist import load_mnist, small_cnn

    data = load_mnist()
    base = small_cnn(seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        head = torch.nn.Sequential(
            torch.nn.Linear(784, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
        )
    model = torch.nn.Sequential(*list(base)[:7], *head)
    console.print("training the ReLU CNN (public convolutions + private 784-64-32-10 head)")
    train_classifier(model, data.x_train, data.y_train, epochs=epochs, console=console)
    torch.set_num_threads(1)
    features = torch.nn.Sequential(*list(model)[:7])
    with torch.no_grad():
        f_train = features(torch.from_numpy(data.x_train)).numpy().astype(np.float64)
        f_test = features(torch.from_numpy(data.x_test)).numpy().astype(np.float64)
    linears = [m for m in head if isinstance(m, torch.nn.Linear)]
    relu_head = DenseProgram(
        [m.weight.detach().double().numpy() for m in linears],
        [m.bias.detach().double().numpy() for m in linears],
        [Activation.named("none")] * 2,
    )

    def relu_forward(x: np.ndarray, upto_hidden: bool = False) -> np.ndarray:
        h = x
        for i, (w, b) in enumerate(zip(relu_head.weights, relu_head.biases)):
            if upto_hidden and i == 2:
                return h
            h = h @ w.T + b
            if i < 2:
                h = np.maximum(h, 0)
        return h

    relu_acc = float(np.mean(relu_forward(f_test).argmax(1) == data.y_test))
    console.print(f"ReLU model test accuracy {relu_acc:.4f}; fine-tuning the FHE heads")
    heads = {
        ROWS[0]: (DenseProgram([relu_head.weights[2]], [relu_head.biases[2]], []), relu_forward(f_test, True)),
        ROWS[1]: (
            finetune_head(relu_head, f_train, data.y_train, "none", epochs=finetune_epochs, console=console),
            f_test,
        ),
        ROWS[2]: (
            finetune_head(relu_head, f_train, data.y_train, "square", epochs=finetune_epochs, console=console),
            f_test,
        ),
    }
    return {"heads": heads, "y_test": data.y_test, "relu_accuracy": relu_acc, "f_test": f_test, "relu_head": relu_head}


def _tenseal_comparison(program: DenseProgram, x: np.ndarray, runs: int, label: str) -> dict[str, Any]:
    """TenSEAL's CKKSVector.mm against our kernel on one dense layer, interleaved in one loop."""
    import tenseal as ts

    model = protect_program(program, 128, encrypt_weights=False)
    model_enc = protect_program(program, 128, encrypt_weights=True)
    ours, ours_enc = EdgeEvaluator(model.edge_package), EdgeEvaluator(model_enc.edge_package)
    params = model.params
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree, coeff_mod_bit_sizes=list(params.prime_bits))
    ctx.global_scale = 2.0**params.scale_bits
    ctx.generate_galois_keys()
    matrix = program.weights[0].T.tolist()
    vector = x[0].tolist()
    t_ts, t_ours, t_ours_enc = [], [], []
    for _ in range(runs):
        start = time.perf_counter()
        enc = ts.ckks_vector(ctx, vector)
        out = enc.mm(matrix)
        t_ts.append(time.perf_counter() - start)
        start = time.perf_counter()
        ours.evaluate(x[:1], encrypt_features=True)
        t_ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        ours_enc.evaluate(x[:1], encrypt_features=True)
        t_ours_enc.append(time.perf_counter() - start)
    ts_error = float(np.max(np.abs(np.asarray(out.decrypt()) + program.biases[0] - program.forward(x[:1])[0])))
    med = {k: statistics.median(v) * 1000 for k, v in (("tenseal", t_ts), ("ours", t_ours), ("ours_enc", t_ours_enc))}
    shape = program.weights[0].shape
    return {
        "layer": f"{label} ({shape[1]}->{shape[0]})",
        "ring_degree": params.poly_modulus_degree,
        "tenseal_mm_ms": med["tenseal"],
        "ours_plain_weights_ms": med["ours"],
        "ours_encrypted_weights_ms": med["ours_enc"],
        "speedup_same_operation": med["tenseal"] / med["ours"],
        "speedup_encrypted_weights": med["tenseal"] / med["ours_enc"],
        "our_rotations": ours.plans[0].rotations(),
        "tenseal_max_abs_error": ts_error,
        "runs": runs,
    }


def run_benchmark(
    out_dir: Path,
    *,
    securities: tuple[int, ...] = (128, 192, 256),
    runs: int = 5,
    accuracy_samples: int = 1000,
    epochs: int = 5,
    finetune_epochs: int = 6,
    tenseal_runs: int = 3,
    console: Any = None,
) -> dict[str, Any]:
    """Run the whole table; write fhe.{csv,md,json,png} under `out_dir` and return the summary."""
    from rich.console import Console
    from rich.progress import Progress

    console = console or Console()
    if runs < 1 or accuracy_samples < 1:
        raise FheError("runs and accuracy samples must be at least 1")
    out_dir.mkdir(parents=True, exist_ok=True)
    trained = _train_models(epochs, finetune_epochs, console)
    y_test = trained["y_test"][:accuracy_samples]
    rows: list[BenchRow] = []
    with Progress(console=console) as progress:
        task = progress.add_task("FHE table", total=len(ROWS) * len(securities))
        for row in ROWS:
            program, inputs = trained["heads"][row]
            inputs = inputs[:accuracy_samples]
            reference = program.forward(inputs)
            plain_acc = float(np.mean(reference.argmax(1) == y_test))
            plain_bytes = sum(w.size + b.size for w, b in zip(program.weights, program.biases)) * 4
            for security in securities:
                progress.update(task, description=f"{row} @ {security}-bit")
                model = protect_program(program, security)
                decryptor = OwnerDecryptor(model.owner_secret)
                for mode in ("plaintext", "encrypted"):
                    edge = _in_fresh_process(_edge_run, model.edge_package, inputs, mode == "encrypted", runs)
                    logits = decryptor._logits(edge["result"])
                    rows.append(
                        BenchRow(
                            row=row,
                            security=security,
                            features=mode,
                            ring_degree=model.params.poly_modulus_degree,
                            log2_q=model.params.total_bits,
                            scale_bits=model.params.scale_bits,
                            latency_ms=edge["latency_ms"],
                            per_sample_ms=edge["per_sample_ms"],
                            batch=model.batch,
                            load_mib=edge["load_mib"],
                            peak_mib=edge["peak_mib"],
                            remaining_levels=edge["remaining_levels"],
                            final_scale_bits=edge["final_scale_bits"],
                            rotation_keys=len(model.rotation_steps),
                            plain_kib=plain_bytes / 1024,
                            encrypted_kib=edge["encrypted_bytes"] / 1024,
                            package_kib=len(model.edge_package) / 1024,
                            max_abs_logit_error=float(np.max(np.abs(logits - reference))),
                            plain_accuracy=plain_acc,
                            fhe_accuracy=float(np.mean(decryptor.labels(edge["result"]) == y_test)),
                            relu_model_accuracy=trained["relu_accuracy"],
                        )
                    )
                progress.advance(task)

    console.print("TenSEAL built-in product against our kernel (same layers, same parameters, interleaved)")
    relu_head = trained["relu_head"]
    last_program, hidden = trained["heads"][ROWS[0]]
    first_program = DenseProgram([relu_head.weights[0]], [relu_head.biases[0]], [])
    comparisons = [
        _tenseal_comparison(last_program, hidden[:1], tenseal_runs, "last layer"),
        _tenseal_comparison(first_program, trained["f_test"][:1], tenseal_runs, "first classifier layer"),
    ]
    summary = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        "runs": runs,
        "accuracy_samples": len(y_test),
        "rows": [asdict(r) for r in rows],
        "tenseal": comparisons,
    }
    _write(out_dir, rows, comparisons, summary)
    return summary


def _write(out_dir: Path, rows: list[BenchRow], comparisons: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    (out_dir / "fhe.json").write_text(json.dumps(summary, indent=2))
    with open(out_dir / "fhe.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    lines = [
        f"Machine: {summary['machine']}; medians of {summary['runs']} runs; "
        f"accuracy on {summary['accuracy_samples']} held-out digits.",
        "",
        "| row | security | features | N | log2 q | latency ms | per sample ms (batch) | MiB loaded + working "
        "| levels left / scale bits | rot. keys | weights KiB plain -> enc (package) | max abs logit err "
        "| accuracy plain -> FHE |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.row} | {r.security} | {r.features} | {r.ring_degree} | {r.log2_q} | {r.latency_ms:.1f} | "
            f"{r.per_sample_ms:.2f} ({r.batch}) | {r.load_mib:.0f} + {r.peak_mib:.0f} | "
            f"{r.remaining_levels} / {r.final_scale_bits:.1f} | "
            f"{r.rotation_keys} | {r.plain_kib:.0f} -> {r.encrypted_kib:.0f} ({r.package_kib:.0f}) | "
            f"{r.max_abs_logit_error:.2e} | {r.plain_accuracy:.4f} -> {r.fhe_accuracy:.4f} |"
        )
    lines += [
        "",
        "| layer | N | TenSEAL mm ms | ours, plain weights ms | ours, encrypted weights ms | speed-up (same op) "
        "| speed-up (encrypted weights) | our rotations |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        lines.append(
            f"| {c['layer']} | {c['ring_degree']} | {c['tenseal_mm_ms']:.1f} | {c['ours_plain_weights_ms']:.1f} | "
            f"{c['ours_encrypted_weights_ms']:.1f} | {c['speedup_same_operation']:.0f}x | "
            f"{c['speedup_encrypted_weights']:.0f}x | {c['our_rotations']} |"
        )
    (out_dir / "fhe.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    labels, plain, enc = [], [], []
    for row in ROWS:
        for security in sorted({r.security for r in rows}):
            match = {r.features: r.latency_ms for r in rows if r.row == row and r.security == security}
            if match:
                labels.append(f"{row}\n{security}-bit")
                plain.append(match.get("plaintext", np.nan))
                enc.append(match.get("encrypted", np.nan))
    pos = np.arange(len(labels))
    ax.bar(pos - 0.2, plain, 0.4, label="plaintext features")
    ax.bar(pos + 0.2, enc, 0.4, label="encrypted features")
    ax.set_yscale("log")
    ax.set_ylabel("latency per classification (ms, log)")
    ax.set_xticks(pos, labels, fontsize=7)
    ax.set_title("modelcloak fhe: encrypted MNIST classifier (SAP table rows)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "fhe.png", dpi=120)
    plt.close(fig)
