"""The soft lock for a model file and the owner's data: what `modelcloak soft-lock` runs.

Input: an ONNX classifier (rebuilt as a torch module, `modelcloak.lock.from_onnx`: chains and
graphs with residual adds or concatenations) or a pickled PyTorch module; labelled data as
`.npz` files with arrays `x` and `y`. Output: the soft-locked model as ONNX, and the accuracy
of the original and the locked model in every deployment format (`VARIANTS`: FP32, FP16, INT8
dynamic, INT8 static), each built by onnxruntime's own tools and run in onnxruntime on the
held-out data.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from modelcloak.lock.errors import LockError
from modelcloak.lock.soft import VARIANTS, LockSite, evaluate_variants, find_lock_site, quantised_variants, soft_lock

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

__all__ = ["SoftLockReport", "load_labelled", "load_source_model", "soft_lock_file"]

CALIBRATION_SIZE = 256  # training inputs given to the static INT8 quantiser


@dataclass
class SoftLockReport:
    """The locked model and what each deployment format makes of it."""

    locked: onnx.ModelProto
    site: LockSite
    original: dict[str, float]  # variant -> accuracy on the test data
    soft_locked: dict[str, float]
    train_size: int
    test_size: int
    chance: float  # share of the most frequent test label: what a constant answer scores
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "lock_site": {"producer": self.site.producer, "relu": self.site.relu, "consumer": self.site.consumer},
            "train_size": self.train_size,
            "test_size": self.test_size,
            "chance": self.chance,
            "accuracy": {"original": self.original, "soft_locked": self.soft_locked},
            "notes": self.notes,
        }


def load_labelled(path: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) from an .npz file holding float inputs `x` and integer labels `y`."""
    if not path.is_file():
        raise LockError(f"{what} {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("x", "y") if k not in data.files]
            if missing:
                raise LockError(f"{what} {path} has no array {missing[0]!r}; it needs x (inputs) and y (labels)")
            x, y = data["x"], data["y"]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise LockError(f"{what} {path} is not an .npz file of arrays x and y: {exc}") from None
    if x.dtype.kind not in "fiu" or y.dtype.kind not in "iu":
        raise LockError(f"{what} {path}: x must be numbers and y integer class labels (got {x.dtype} and {y.dtype})")
    if x.ndim < 2 or len(x) != len(y) or len(x) == 0:
        raise LockError(f"{what} {path}: x must be a batch of inputs with one label in y each ({x.shape} vs {y.shape})")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise LockError(f"{what} {path}: x holds NaN or infinite values")
    return x, y.astype(np.int64)


def load_source_model(path: Path) -> Any:
    """The model as a torch module: an ONNX file is rebuilt (a chain as an `nn.Sequential`, a graph
    with branches as an fx.GraphModule), a .pt/.pth file is unpickled.

    Unpickling runs code from the file: give it only your own models.
    """
    from modelcloak.lock.soft import _import_torch

    if not path.is_file():
        raise LockError(f"model {path} does not exist")
    if path.suffix.lower() == ".onnx":
        from modelcloak.lock.from_onnx import module_from_onnx

        try:
            model = onnx.load(path)
        except Exception as exc:  # onnx raises DecodeError and friends
            raise LockError(f"{path} is not a readable ONNX model: {exc}") from None
        return module_from_onnx(model)[0]
    torch = _import_torch()
    try:
        module = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as exc:  # pickle and torch raise many types
        raise LockError(f"{path} is neither an .onnx file nor a saved PyTorch module: {exc}") from None
    if not isinstance(module, torch.nn.Module):
        raise LockError(
            f"{path} holds a {type(module).__name__}, not a PyTorch module (save the module, not a state_dict)"
        )
    return module


def soft_lock_file(
    model_path: Path,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    epochs: int = 3,
    seed: int = 0,
    progress: bool = False,
    console: Console | None = None,
) -> SoftLockReport:
    """Soft-lock the model in `model_path` with the owner's data and measure every format."""
    from modelcloak.lock.soft import _import_torch
    from modelcloak.model.errors import ModelError
    from modelcloak.model.torch_export import export_torch

    torch = _import_torch()
    original = load_source_model(model_path)
    site = find_lock_site(original)  # fails before any training when the model cannot be locked
    sample = torch.from_numpy(np.ascontiguousarray(x_train[:2]))
    original.eval()
    try:
        with torch.no_grad():
            logits = original(sample)
    except Exception as exc:  # shape mismatches surface as RuntimeError from torch
        raise LockError(f"the model does not take inputs of shape {list(x_train.shape[1:])}: {exc}") from None
    classes = int(logits.shape[-1])
    for name, labels in (("training", y_train), ("test", y_test)):
        if labels.min() < 0 or labels.max() >= classes:
            raise LockError(f"the {name} labels run {labels.min()}..{labels.max()}, the model has {classes} classes")
    if x_test.shape[1:] != x_train.shape[1:]:
        raise LockError(f"test inputs are {list(x_test.shape[1:])}, training inputs {list(x_train.shape[1:])}")

    locked = soft_lock(original, x_train, y_train, epochs=epochs, seed=seed, progress=progress, console=console)
    try:
        original_onnx = export_torch(original, sample)
        locked_onnx = export_torch(locked, sample)
    except ModelError as exc:
        raise LockError(f"exporting the model to ONNX failed: {exc}") from exc
    calibration = x_train[:CALIBRATION_SIZE]
    before = evaluate_variants(quantised_variants(original_onnx, calibration), x_test, y_test)
    after = evaluate_variants(quantised_variants(locked_onnx, calibration), x_test, y_test)
    chance = float(np.bincount(y_test).max() / len(y_test))
    notes = []
    if after["fp32"] < before["fp32"] - 0.01:
        notes.append(
            f"the locked FP32 model lost {100 * (before['fp32'] - after['fp32']):.1f} points: try more --epochs"
        )
    for variant in VARIANTS[1:]:
        if after[variant] > chance + 0.05:
            notes.append(
                f"{variant} keeps {100 * after[variant]:.1f}% (chance {100 * chance:.1f}%): the lock did not hold"
            )
    return SoftLockReport(
        locked=locked_onnx,
        site=site,
        original=before,
        soft_locked=after,
        train_size=len(x_train),
        test_size=len(x_test),
        chance=chance,
        notes=notes,
    )
