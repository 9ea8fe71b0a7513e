"""Retrain a private head with its FHE activation so accuracy holds (`modelcloak fhe-finetune`).

Swapping ReLU for a square or a fitted polynomial changes what the head computes; a few epochs of
training with the polynomial in place (starting from the ReLU weights) recovers the accuracy.
torch is an optional extra and is imported only here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from modelcloak.fhe.errors import FheError
from modelcloak.fhe.program import Activation, DenseProgram

if TYPE_CHECKING:  # pragma: no cover - typing only
    from rich.console import Console

__all__ = ["finetune_head", "head_module", "program_from_module"]


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise FheError("fhe-finetune needs PyTorch: pip install 'modelcloak[torch]'") from exc
    return torch


def head_module(program: DenseProgram) -> Any:
    """A torch Sequential computing `program` (Linear layers and fixed polynomial activations)."""
    torch = _torch()

    module_base: Any = torch.nn.Module  # torch is optional, so the base class is only known at run time

    class Polynomial(module_base):
        def __init__(self, activation: Activation) -> None:
            super().__init__()
            self.activation = activation
            self.register_buffer("coeffs", torch.tensor(activation.coeffs, dtype=torch.float32))

        def forward(self, x: Any) -> Any:
            a, b, c = self.coeffs
            return a * x * x + b * x + c

    layers: list[Any] = []
    for i, (w, b) in enumerate(zip(program.weights, program.biases)):
        linear = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(w.astype(np.float32)))
            linear.bias.copy_(torch.from_numpy(b.astype(np.float32)))
        layers.append(linear)
        if i < len(program.activations):
            layers.append(Polynomial(program.activations[i]))
    return torch.nn.Sequential(*layers)


def program_from_module(module: Any, activations: list[Activation]) -> DenseProgram:
    """Read a head built by `head_module` back into a DenseProgram."""
    torch = _torch()
    linears = [m for m in module if isinstance(m, torch.nn.Linear)]
    return DenseProgram(
        [m.weight.detach().double().numpy() for m in linears],
        [m.bias.detach().double().numpy() for m in linears],
        list(activations),
    )


def finetune_head(
    program: DenseProgram,
    features: np.ndarray,
    labels: np.ndarray,
    activation: str,
    *,
    epochs: int = 5,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    console: Console | None = None,
) -> DenseProgram:
    """Train `program`'s layers with `activation` in place of its activations on (features, labels).

    For `relu-poly` the ReLU fit is made first on `features` (the owner's data gives the range) and
    kept fixed while the weights adapt. For `square` and `modified-square` training starts from
    the exact square form of that ReLU fit (`_starting_point`), not from the ReLU weights with a
    square dropped in, which blows the logits up and the loss with them. Returns the retrained
    program (the input is unchanged).
    """
    from modelcloak.training import train_classifier

    x = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(x) != len(y) or len(x) == 0:
        raise FheError(f"features and labels must be non-empty and equally long: {len(x)} vs {len(y)}")
    if x.shape[1] != program.input_size:
        raise FheError(f"features have {x.shape[1]} values, the head takes {program.input_size}")
    if y.min() < 0 or y.max() >= program.output_size:
        raise FheError(f"labels must be 0..{program.output_size - 1}")
    start = _starting_point(program, activation, x)
    module = head_module(start)
    module = train_classifier(module, x, y, epochs=epochs, lr=lr, seed=seed, progress=progress, console=console)
    return program_from_module(module, start.activations)


def _starting_point(program: DenseProgram, activation: str, x: np.ndarray) -> DenseProgram:
    """The head to start training from: for squares, the ReLU fit rewritten exactly into squares.

    a*z^2 + b*z + c lowers to a square of a shifted pre-activation with the factor and constant
    moved into the next layer (`DenseProgram.lower`); that is already a square network computing
    the polynomial approximation of the ReLU head. For x^2 + x, the square z^2 is (z - 1/2)^2 +
    (z - 1/2) + 1/4, so each bias moves down by 1/2 and the next bias absorbs the 1/4.
    """
    if activation not in ("square", "modified-square") or not program.activations:
        return program.with_activation(activation, x)
    layers = program.with_activation("relu-poly", x).lower()
    if not all(layer.square_after for layer in layers[:-1]):  # a degenerate (linear) fit
        return program.with_activation(activation, x)
    weights = [layer.weight.copy() for layer in layers]
    biases = [layer.bias.copy() for layer in layers]
    if activation == "modified-square":
        for i in range(len(layers) - 1):
            biases[i] -= 0.5
            biases[i + 1] += weights[i + 1] @ np.full(weights[i + 1].shape[1], 0.25)
    return DenseProgram(weights, biases, [Activation.named(activation)] * (len(layers) - 1))
