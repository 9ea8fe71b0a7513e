"""The private head `protect --scheme fhe` encrypts: compiled from the private ONNX part, or a fine-tuned one.

Two ways to a fine-tuned head: `fhe-finetune` writes a HEAD.npz (`DenseProgram.save`) that
`protect --fhe-head HEAD.npz` takes after checking that its layer shapes are the private part's;
or `protect --fhe-train DATA.npz` fine-tunes inside `protect` (`finetuned_program`) on the owner's
labelled inputs, which the public part turns into features at the cut, and records the held-out
accuracy of the private part as it was (its own activations, run by onnxruntime) beside the
fine-tuned polynomial head's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelcloak.fhe.errors import FheError
from modelcloak.fhe.program import DenseProgram, compile_onnx

__all__ = ["FinetuneReport", "finetuned_program", "program_for"]

# Held-out share of the owner's labelled data: what the accuracy figures are measured on.
HOLDOUT = 0.2
MIN_TRAIN_SAMPLES = 20


def program_for(
    private: Any, activation: str, features: np.ndarray | None, head: str | Path | None
) -> tuple[DenseProgram, str]:
    """The program to encrypt and the activation to record for it."""
    if head is None:
        return compile_onnx(private, activation=activation, calibration=features), activation
    tuned = DenseProgram.load(head)
    own = compile_onnx(private, "none")
    shapes = [tuple(w.shape) for w in own.weights]
    tuned_shapes = [tuple(w.shape) for w in tuned.weights]
    if shapes != tuned_shapes:
        raise FheError(f"{head}: its layers {tuned_shapes} are not the private part's {shapes} (another cut or model)")
    kinds = sorted({a.kind for a in tuned.activations}) or ["none"]
    return tuned, f"{'/'.join(kinds)} (fine-tuned head {Path(head).name})"


@dataclass(frozen=True)
class FinetuneReport:
    """Held-out accuracies (fractions) of the private part as shipped, the activation dropped in, and fine-tuned."""

    activation: str
    epochs: int
    train_samples: int
    heldout_samples: int
    original_accuracy: float
    dropped_in_accuracy: float
    finetuned_accuracy: float

    @property
    def points_below_original(self) -> float:
        return 100.0 * (self.original_accuracy - self.finetuned_accuracy)

    def to_json(self) -> dict[str, Any]:
        return self.__dict__ | {"points_below_original": self.points_below_original}


def finetuned_program(
    private: Any,
    activation: str,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int = 6,
    seed: int = 0,
    console: Any = None,
) -> tuple[DenseProgram, FinetuneReport, np.ndarray]:
    """Fine-tune the private part's dense layers with `activation` on (features at the cut, labels).

    Returns the program, the held-out report and the held-out features (the owner's real data:
    `protect` measures the encrypted head's label agreement on them).
    """
    from modelcloak.fhe.finetune import finetune_head

    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    y = np.asarray(labels).reshape(-1)
    if len(x) != len(y):
        raise FheError(f"the training data has {len(x)} inputs but {len(y)} labels")
    if not np.issubdtype(y.dtype, np.integer):
        raise FheError(f"training labels must be class indices (integers), got {y.dtype}")
    n_test = int(round(len(x) * HOLDOUT))
    if len(x) - n_test < MIN_TRAIN_SAMPLES or n_test < 1:
        raise FheError(f"fine-tuning needs at least {MIN_TRAIN_SAMPLES + 5} labelled inputs, got {len(x)}")
    order = np.random.default_rng(seed).permutation(len(x))
    test, train = order[:n_test], order[n_test:]
    head = compile_onnx(private, "none")
    if y.min() < 0 or y.max() >= head.output_size:
        raise FheError(f"training labels must be 0..{head.output_size - 1}, got {int(y.min())}..{int(y.max())}")
    dropped_in = head.with_activation(activation, x[train])
    tuned = finetune_head(head, x[train], y[train], activation, epochs=epochs, seed=seed, console=console)
    report = FinetuneReport(
        activation=activation,
        epochs=epochs,
        train_samples=len(train),
        heldout_samples=len(test),
        original_accuracy=_accuracy(_run_onnx(private, x[test]), y[test]),
        dropped_in_accuracy=_accuracy(dropped_in.forward(x[test]), y[test]),
        finetuned_accuracy=_accuracy(tuned.forward(x[test]), y[test]),
    )
    return tuned, report, x[test]


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(logits).reshape(len(labels), -1).argmax(1) == labels))


def _run_onnx(private: Any, x: np.ndarray) -> np.ndarray:
    """The private part exactly as shipped (its own activations), for the reference accuracy."""
    import onnxruntime as ort

    data = private.SerializeToString() if hasattr(private, "SerializeToString") else private
    if isinstance(data, (str, Path)):
        data = Path(data).read_bytes()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    shape = session.get_inputs()[0].shape
    batch = x.reshape(len(x), *[int(d) for d in shape[1:]]) if all(isinstance(d, int) for d in shape[1:]) else x
    return np.asarray(session.run(None, {name: batch.astype(np.float32)})[0])
