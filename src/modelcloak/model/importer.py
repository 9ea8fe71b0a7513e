"""Import and validate ONNX models, describe their signature, and separate graph from weights.

ONNX is the one intermediate form; PyTorch arrives through `torch_export.export_torch`.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper

from modelcloak.model.errors import ModelError

# The location tag written into externalised initializers; it names a bundle section, not a file.
WEIGHTS_LOCATION = "modelcloak:weights"
WEIGHT_ALIGNMENT = 64
# Tensors smaller than this stay inline in the (also encrypted) graph section.
INLINE_LIMIT = 1024
MAX_ORT_IR_VERSION = 13


@dataclass(frozen=True)
class TensorSpec:
    """Name, element type and shape of a graph input or output (symbolic dims as strings)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_json(self) -> dict:
        return {"inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs]}


@dataclass(frozen=True)
class WeightRecord:
    """Where one externalised initializer lives in the weights section."""

    name: str
    offset: int
    length: int


def load_model(source: str | Path | bytes | onnx.ModelProto) -> onnx.ModelProto:
    """Load an ONNX model from a path, bytes or a ModelProto and validate it.

    Files keep external data references unresolved (`load_external_data=False`) so multi-GB models
    are streamed into the bundle tensor by tensor instead of being held in memory at once.
    """
    if isinstance(source, onnx.ModelProto):
        model = source
    elif isinstance(source, (bytes, bytearray, memoryview)):
        model = _parse(bytes(source), "model bytes")
    else:
        path = Path(source)
        if not path.exists():
            raise ModelError(f"model file {path} does not exist")
        if path.suffix.lower() in {".keras", ".h5"} or path.is_dir():
            # Keras 3 on its PyTorch backend, converted in memory (an optional extra).
            from modelcloak.model.keras_import import load_keras

            model = load_keras(path)
            validate(model)
            return model
        if path.suffix.lower() in {".pt", ".pth", ".pb", ".tflite"}:
            raise ModelError(
                f"{path.name}: only ONNX files are imported directly; export PyTorch modules with "
                "modelcloak.model.export_torch (or torch.onnx.export) first"
            )
        model = _parse(path.read_bytes(), str(path))
        validate(model, path)
        return model
    validate(model)
    return model


def _parse(data: bytes, origin: str) -> onnx.ModelProto:
    if not data:
        raise ModelError(f"{origin} is empty")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError):
        raise ModelError(f"{origin} is not an ONNX model (protobuf parse failed)") from None
    if not model.HasField("graph") or not model.graph.node:
        raise ModelError(f"{origin} is not an ONNX model (no graph nodes)")
    return model


@functools.lru_cache(maxsize=1)
def max_ort_ir_version() -> int:
    """The newest IR version the installed onnxruntime loads (asked once; it has no API for it).

    A fixed number refused models onnxruntime runs (IR 14 on onnxruntime 1.32).
    """
    try:
        import onnxruntime as ort
    except ImportError:
        return MAX_ORT_IR_VERSION
    options = ort.SessionOptions()
    options.log_severity_level = 4
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    for version in range(max(onnx.IR_VERSION, MAX_ORT_IR_VERSION) + 2, MAX_ORT_IR_VERSION, -1):
        probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        probe.ir_version = version
        try:
            ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception:  # onnxruntime's own error types: this version is too new
            continue
        return version
    return MAX_ORT_IR_VERSION


def validate(model: onnx.ModelProto, path: Path | None = None) -> None:
    """Run onnx.checker and the checks onnxruntime would otherwise fail on later, with clear messages.

    With `path`, the checker works on the file, so external data is resolved next to it (and
    models over 2 GB, which cannot be checked in memory, are checked too).
    """
    if not model.graph.node:
        raise ModelError("model has an empty graph")
    newest = max_ort_ir_version()
    if model.ir_version > newest:
        raise ModelError(
            f"model IR version {model.ir_version} is newer than onnxruntime supports ({newest}); "
            "re-export with an older opset/IR version"
        )
    try:
        onnx.checker.check_model(str(path) if path is not None else model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ModelError(f"model failed ONNX validation: {first}") from None
    except ValueError as exc:  # raised for models over 2 GB held in memory
        raise ModelError(f"model could not be validated: {exc}") from None
    if not model.graph.output:
        raise ModelError("model must have at least one graph output")


def shape_dims(tensor_type: onnx.TypeProto.Tensor) -> list[int | str | None]:
    """A tensor type's dims: ints where fixed, names where symbolic, None where unknown."""
    dims: list[int | str | None] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        elif dim.HasField("dim_param"):
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    return dims


def type_text(value_type: onnx.TypeProto, name: str) -> str:
    """A graph value's type as the manifest stores it (modelcloak.runtime.feeds reads it back).

    Tensors: the numpy dtype name ("float32", "object" for strings). Otherwise "sequence(T)",
    "optional(T)" or "map(K,V)" around the element's type.
    """
    field = value_type.WhichOneof("value")
    if field == "tensor_type":
        try:
            return np.dtype(helper.tensor_dtype_to_np_dtype(value_type.tensor_type.elem_type)).name
        except (KeyError, TypeError, ValueError):
            raise ModelError(
                f"graph value {name!r} has an unsupported element type {value_type.tensor_type.elem_type}"
            ) from None
    if field == "sequence_type":
        return f"sequence({type_text(value_type.sequence_type.elem_type, name)})"
    if field == "optional_type":
        return f"optional({type_text(value_type.optional_type.elem_type, name)})"
    if field == "map_type":
        key = np.dtype(helper.tensor_dtype_to_np_dtype(value_type.map_type.key_type)).name
        return f"map({key},{type_text(value_type.map_type.value_type, name)})"
    raise ModelError(f"graph value {name!r} has no type onnxruntime can feed ({field or 'none'})")


def signature(model: onnx.ModelProto) -> Signature:
    """Inputs (excluding initializers listed as inputs, as older exporters do) and outputs."""
    initializer_names = {t.name for t in model.graph.initializer}

    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        dtype = type_text(value.type, value.name)
        shape = shape_dims(value.type.tensor_type) if value.type.HasField("tensor_type") else []
        return TensorSpec(value.name, dtype, tuple(shape))

    inputs = tuple(spec(v) for v in model.graph.input if v.name not in initializer_names)
    outputs = tuple(spec(v) for v in model.graph.output)
    return Signature(inputs, outputs)


def _tensor_bytes(tensor: TensorProto, base_dir: Path | None) -> bytes | memoryview:
    if tensor.data_location == TensorProto.EXTERNAL:
        info = {entry.key: entry.value for entry in tensor.external_data}
        if base_dir is None:
            raise ModelError(f"initializer {tensor.name!r} uses external data but the model was not loaded from a file")
        location = (base_dir / info.get("location", "")).resolve()
        if base_dir.resolve() not in location.parents:
            raise ModelError(
                f"initializer {tensor.name!r} points outside the model's directory: {info.get('location')}"
            )
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else location.stat().st_size - offset
        with open(location, "rb") as handle:
            handle.seek(offset)
            data = handle.read(length)
        if len(data) != length:
            raise ModelError(f"external data for {tensor.name!r} is truncated in {location.name}")
        return data
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    # Typed fields (float_data, int64_data, ...): let onnx decode them into ONNX's little-endian layout.
    array = numpy_helper.to_array(tensor)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def _movable(tensor: TensorProto) -> bool:
    if tensor.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return False
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return count * itemsize >= INLINE_LIMIT or tensor.data_location == TensorProto.EXTERNAL


def externalize_weights(
    model: onnx.ModelProto, *, also: Collection[str] = ()
) -> tuple[onnx.ModelProto, list[WeightRecord], int]:
    """Split a model into a weightless graph and a layout of its large initializers.

    Returns the graph (initializers rewritten to point at WEIGHTS_LOCATION offsets), the records,
    and the weights section's total size. The input model is not modified. Use `weight_pieces`
    to stream the weight bytes in record order. Initializers named in `also` move to the weights
    section whatever their size (the lock scheme locks small ones too).
    """
    graph_only = onnx.ModelProto()
    graph_only.CopyFrom(model)
    records: list[WeightRecord] = []
    offset = 0
    for tensor in graph_only.graph.initializer:
        if not (_movable(tensor) or tensor.name in also):
            continue
        count = int(np.prod(tensor.dims)) if tensor.dims else 1
        length = count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        offset = -(-offset // WEIGHT_ALIGNMENT) * WEIGHT_ALIGNMENT
        records.append(WeightRecord(tensor.name, offset, length))
        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            tensor.ClearField(field)
        del tensor.external_data[:]
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", WEIGHTS_LOCATION), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        offset += length
    return graph_only, records, offset


def weight_pieces(
    model: onnx.ModelProto, records: list[WeightRecord], base_dir: Path | None = None
) -> Iterator[bytes | memoryview]:
    """Yield the weights section's plaintext: each record's bytes, zero-padded to its offset.

    `base_dir` is where the model file lives, for initializers kept in external data files.
    """
    by_name = {t.name: t for t in model.graph.initializer}
    position = 0
    for record in records:
        if record.offset > position:
            yield bytes(record.offset - position)
        data = _tensor_bytes(by_name[record.name], base_dir)
        if len(data) != record.length:
            raise ModelError(f"initializer {record.name!r} holds {len(data)} bytes, its shape needs {record.length}")
        yield data
        position = record.offset + record.length


def external_records(graph: onnx.ModelProto) -> list[tuple[TensorProto, int, int]]:
    """The initializers of a sealed graph that live in the weights section, with offset and length."""
    found = []
    for tensor in graph.graph.initializer:
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        if info.get("location") != WEIGHTS_LOCATION:
            raise ModelError(f"sealed graph initializer {tensor.name!r} points at {info.get('location')!r}")
        found.append((tensor, int(info["offset"]), int(info["length"])))
    return found
