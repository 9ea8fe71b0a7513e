"""The model room: import, validate and describe ONNX graphs."""

from modelcloak.model.errors import ModelError
from modelcloak.model.importer import (
    WEIGHTS_LOCATION,
    Signature,
    TensorSpec,
    WeightRecord,
    external_records,
    externalize_weights,
    load_model,
    signature,
    validate,
    weight_pieces,
)


def export_torch(*args, **kwargs):  # noqa: ANN002, ANN003 - thin lazy re-export; torch is optional
    from modelcloak.model.torch_export import export_torch as _export

    return _export(*args, **kwargs)


__all__ = [
    "WEIGHTS_LOCATION",
    "ModelError",
    "Signature",
    "TensorSpec",
    "WeightRecord",
    "export_torch",
    "external_records",
    "externalize_weights",
    "load_model",
    "signature",
    "validate",
    "weight_pieces",
]
