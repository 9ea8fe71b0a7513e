"""Generic PyTorch helpers every room that trains shares: import on demand, train, score, show progress.

`fhe` (fine-tuning heads), `lock` (the soft lock), `eval` (attacks, accuracy) and `zoo` (the demo's
CNN) all train small classifiers the same way. torch is an optional extra, imported only inside
these functions, so importing this module costs nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from modelcloak.errors import ModelcloakError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from rich.console import Console

__all__ = ["accuracy", "import_torch", "predict_labels", "progress_bar", "train_classifier"]

_INSTALL_HINT = "pip install 'modelcloak[torch]'"


def import_torch() -> ModuleType:
    try:
        import torch
    except ImportError as exc:
        raise ModelcloakError(f"PyTorch is not installed: {_INSTALL_HINT}") from exc
    return torch


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
    threads: int | None = None,
) -> torch.nn.Module:
    """Train `module` with Adam and cross-entropy on (x, y); return it in eval mode.

    Deterministic for a given seed on a given machine: the batch order comes from a seeded
    generator and any random layers draw from a seeded fork of the global RNG (the caller's
    RNG state is left as it was). Threads are capped at min(2, cpu count) for the duration,
    because more threads than cores only adds contention on the small shared machines this
    runs on, and restored afterwards; `threads` sets another cap (1 is much faster on a busy
    machine, where a second thread spins waiting for a core).
    `progress` shows a rich progress bar over all batches of all epochs on `console`.
    """
    torch = import_torch()
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
    torch.set_num_threads(threads or min(2, os.cpu_count() or 1))
    try:
        with torch.random.fork_rng(devices=[]), progress_bar(progress, console) as bar:
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


def progress_bar(enabled: bool, console: Console | None) -> AbstractContextManager[Any]:
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
