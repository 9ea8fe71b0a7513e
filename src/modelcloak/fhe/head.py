"""The private head `protect --scheme fhe` encrypts: compiled from the private ONNX part, or a fine-tuned one.

`fhe-finetune` retrains the head with a polynomial activation on the owner's data and writes a
HEAD.npz (`DenseProgram.save`); `protect --fhe-head HEAD.npz` takes it in place of the private
part's own weights, after checking that its layer shapes are the private part's (the public part
of the bundle still feeds it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from modelcloak.fhe.errors import FheError
from modelcloak.fhe.program import DenseProgram, compile_onnx

__all__ = ["program_for"]


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
