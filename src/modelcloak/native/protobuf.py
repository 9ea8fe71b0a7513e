"""Where each float tensor's bytes sit inside a serialized ONNX model (protobuf wire format).

The native enclave does not parse protobuf: it decrypts the private part and copies each weight
from the byte offset computed here, at build time, from the very bytes that were sealed. Only the
few fields on the way are read (ModelProto.graph, GraphProto.initializer and .node,
NodeProto.attribute and .output, AttributeProto.t, TensorProto.name/.data_type/.raw_data/
.float_data); everything else is skipped by wire type.
"""

from __future__ import annotations

from collections.abc import Iterator

from modelcloak.native.errors import NativeError

_FLOAT = 1


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise NativeError("the private part's protobuf is truncated")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, start, end or varint value) of each field in buf[start:end]."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value, value
        elif wire == 2:
            length, pos = _varint(buf, pos)
            yield number, wire, pos, pos + length
            pos += length
        elif wire == 5:
            yield number, wire, pos, pos + 4
            pos += 4
        elif wire == 1:
            yield number, wire, pos, pos + 8
            pos += 8
        else:
            raise NativeError(f"the private part's protobuf uses wire type {wire}, which ONNX does not")


def _tensor(buf: bytes, start: int, end: int) -> tuple[str, int, tuple[int, int] | None]:
    """(name, data type, (offset, length) of its little-endian float data or None)."""
    name, data_type, where = "", 0, None
    for number, wire, a, b in _fields(buf, start, end):
        if number == 8 and wire == 2:
            name = buf[a:b].decode("utf-8")
        elif number == 2 and wire == 0:
            data_type = a
        elif number in (9, 4) and wire == 2:  # raw_data, or packed float_data: both plain LE float32
            where = (a, b - a)
        elif number == 4 and wire == 5:
            raise NativeError(f"tensor {name or '?'!r} stores unpacked float_data; re-save the model")
        elif number == 14 and wire == 0 and a == 1:
            raise NativeError(f"tensor {name or '?'!r} keeps its data outside the model file")
    return name, data_type, where


def float_tensor_offsets(model_bytes: bytes) -> dict[str, tuple[int, int]]:
    """Name -> (offset, byte length) of every float32 initializer and Constant node value."""
    found: dict[str, tuple[int, int]] = {}
    for number, wire, g0, g1 in _fields(model_bytes, 0, len(model_bytes)):
        if number != 7 or wire != 2:
            continue
        for field, kind, a, b in _fields(model_bytes, g0, g1):
            if field == 5 and kind == 2:  # initializer
                name, dtype, where = _tensor(model_bytes, a, b)
                if dtype == _FLOAT and where is not None:
                    found[name] = where
            elif field == 1 and kind == 2:  # node: a Constant's value attribute, named by its output
                outputs, value = [], None
                for nf, nk, c, d in _fields(model_bytes, a, b):
                    if nf == 2 and nk == 2:
                        outputs.append(model_bytes[c:d].decode("utf-8"))
                    elif nf == 5 and nk == 2:
                        for af, ak, e, f in _fields(model_bytes, c, d):
                            if af == 5 and ak == 2:
                                _, dtype, where = _tensor(model_bytes, e, f)
                                if dtype == _FLOAT and where is not None:
                                    value = where
                if value is not None and len(outputs) == 1:
                    found[outputs[0]] = value
    return found
