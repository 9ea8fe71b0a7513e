"""The fhe scheme: a model's private dense head evaluated under CKKS on the edge.

The public part of the model stays ONNX; the private head (Gemm/MatMul + bias, activations) is
compiled to a `DenseProgram`, packed with our own diagonal / baby-step giant-step kernels and
encrypted under the owner's key. The edge evaluates it without any secret; the owner decrypts
the result and hands back labels only. docs/FHE.md has the design and the API.

Public API (the rest is internal):

- `compile_onnx(model, activation, calibration)` -> DenseProgram
- `protect_program(program, security, encrypt_weights=True, scale_bits=None, poly_degree=None, probe=None)`
  -> FheModel (`.edge_package` bytes for the bundle, `.owner_secret` bytes for the owner store with
  the secret check rows, `.model_id`, `.measured`: label agreement and check tolerance on the probe)
- `EdgeEvaluator(edge_package).evaluate(features, encrypt_features=False)` -> result bytes
- `OwnerDecryptor(owner_secret).labels(result, top_k=1)` -> np.ndarray of class indices (refuses a
  result whose check rows are off: modified, scaled or forged by the device)
- `finetune_head(program, features, labels, activation)` -> DenseProgram (needs torch)
- every refusal is an `FheError`
"""

from typing import Any

from modelcloak.fhe.engine import EdgeEvaluator, FheModel, OwnerDecryptor, protect_program, required_rotation_steps
from modelcloak.fhe.errors import FheError
from modelcloak.fhe.params import MAX_LOG_Q, SECURITY_LEVELS, CkksParameters, check_parameters, choose_parameters
from modelcloak.fhe.program import ACTIVATIONS, Activation, DenseProgram, compile_onnx, fit_relu


def finetune_head(*args: Any, **kwargs: Any) -> DenseProgram:
    """See `modelcloak.fhe.finetune.finetune_head` (imported lazily: it needs torch)."""
    from modelcloak.fhe.finetune import finetune_head as _finetune_head

    return _finetune_head(*args, **kwargs)


__all__ = [
    "ACTIVATIONS",
    "MAX_LOG_Q",
    "SECURITY_LEVELS",
    "Activation",
    "CkksParameters",
    "DenseProgram",
    "EdgeEvaluator",
    "FheError",
    "FheModel",
    "OwnerDecryptor",
    "check_parameters",
    "choose_parameters",
    "compile_onnx",
    "finetune_head",
    "fit_relu",
    "protect_program",
    "required_rotation_steps",
]
