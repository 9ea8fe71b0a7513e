"""Locked weights inside a bundle: which tensors are locked, where their codes and values live.

A locked graph keeps the usual weightless-graph-plus-weights-section layout (see
`modelcloak.model.externalize_weights`), with one difference: the lockable initializers are moved
to the end, so their float bytes occupy `[plain_size, total_size)` of the weights buffer. The
`weights` section holds only `[0, plain_size)`; the locked tensors' codes travel in a section of
their own, and at load the runtime allocates `total_size`, decrypts the plain part into the front
and unlocks the codes straight into the back. The graph therefore needs no change at load time
and the backends never learn that a model was locked.

Codes section: each locked tensor's codes (uint64 for uniform-shift, the weight's own dtype for
the comparison methods), concatenated in the order of `params["layout"]`, 8-byte aligned.

``sealed`` (the default) has no codes: the section is the exact image of `[plain_size,
total_size)`, sealed like every section (AES-256-GCM) but under `lock_section_key(model key,
lock key)` instead of the model key. The device decrypts it straight into the back of the
weights buffer, so unlocking costs what decrypting those bytes in a sealed bundle costs, and
the section is exactly as large as the weights. A wrong lock key fails the section's
authentication: the load is refused rather than run on garbage (docs/LOCK.md, "sealed").
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from modelcloak.lock.errors import LockError
from modelcloak.lock.transform import is_lockable, lock_weights, unlock_weights
from modelcloak.model import WeightRecord, externalize_weights, weight_pieces

__all__ = ["SEALED", "LockedGraph", "lock_graph", "lock_section_key", "unlock_into"]

_ALIGN = 8
SEALED = "sealed"  # the locked region sealed under a key that needs the model key and the lock key
SEALED_VERSION = 1
_SECTION_KEY_LABEL = b"modelcloak/v1/lock-section\x00"


def lock_section_key(model_key: bytes | memoryview, lock_key: bytes | memoryview) -> bytes:
    """The key the `sealed` method's section is sealed under: HMAC-SHA256(model key, label || lock key).

    Both keys are needed: the lock key alone (a device, or the owner's exported device key) does
    not open a bundle without its model key, and the model key alone opens only the plain part.
    """
    if len(model_key) != 32 or len(lock_key) != 32:
        raise LockError("the lock section key needs a 32-byte model key and a 32-byte lock key")
    mac = hmac.new(bytes(model_key), _SECTION_KEY_LABEL, hashlib.sha256)
    mac.update(lock_key)
    return mac.digest()


@dataclass
class LockedGraph:
    """A model prepared for a locked bundle (owner side)."""

    graph: onnx.ModelProto  # weightless; locked initializers point past plain_size
    plain_size: int  # bytes of the `weights` section
    total_size: int  # bytes of the weights buffer the device allocates
    plain_pieces: Callable[[], Iterable[bytes | memoryview]]
    codes: list[np.ndarray]  # in layout order (empty for `sealed`)
    codes_size: int
    params: dict[str, Any]  # JSON-able: method, version, per-tensor CDF tables, layout
    region_pieces: Callable[[], Iterable[bytes | memoryview]] | None = None  # `sealed`: the region's bytes

    def code_pieces(self) -> Iterable[bytes | memoryview]:
        if self.region_pieces is not None:
            return self.region_pieces()
        return self._concatenated_codes()

    def _concatenated_codes(self) -> Iterator[bytes | memoryview]:
        position = 0
        for array in self.codes:
            padding = -position % _ALIGN
            if padding:
                yield bytes(padding)
            data = np.ascontiguousarray(array).data.cast("B")
            yield data
            position += padding + data.nbytes


def lock_graph(
    model: onnx.ModelProto, key: bytes | memoryview, salt: bytes, *, method: str, base_dir: Path | None = None
) -> LockedGraph:
    """Lock every lockable initializer of `model` with `key`; nothing is locked in place."""
    arrays = {t.name: numpy_helper.to_array(t, str(base_dir) if base_dir else "") for t in model.graph.initializer}
    control = _control_inputs(model.graph)
    lockable = {name for name, array in arrays.items() if is_lockable(array) and name not in control}
    if not lockable:
        raise LockError("this model has no floating-point initializer of two or more values: there is nothing to lock")
    reordered = onnx.ModelProto()
    reordered.CopyFrom(model)
    initializers = sorted(reordered.graph.initializer, key=lambda t: t.name in lockable)  # stable: locked last
    del reordered.graph.initializer[:]
    reordered.graph.initializer.extend(initializers)

    graph, records, total_size = externalize_weights(reordered, also=lockable)
    plain_records = [r for r in records if r.name not in lockable]
    locked_records = [r for r in records if r.name in lockable]
    if len(locked_records) != len(lockable):  # an initializer the importer keeps inline was judged lockable
        kept = sorted(lockable - {r.name for r in locked_records})
        raise LockError(f"initializer {kept[0]!r} is lockable but stays inline in the graph; cannot lock it")
    plain_size = locked_records[0].offset if locked_records else total_size
    if plain_records and plain_records[-1].offset + plain_records[-1].length > plain_size:
        raise LockError("internal layout error: plain weights overlap the locked region")

    if method == SEALED:
        # The locked region as it will sit in the weights buffer: records shifted to start at 0.
        shifted = [WeightRecord(r.name, r.offset - plain_size, r.length) for r in locked_records]
        tensors = {
            r.name: {"dtype": arrays[r.name].dtype.str, "shape": list(arrays[r.name].shape)} for r in locked_records
        }

        def region() -> Iterator[bytes | memoryview]:
            yield from weight_pieces(reordered, shifted, base_dir)
            end = shifted[-1].offset + shifted[-1].length
            if total_size - plain_size > end:
                yield bytes(total_size - plain_size - end)

        return LockedGraph(
            graph=graph,
            plain_size=plain_size,
            total_size=total_size,
            plain_pieces=lambda: weight_pieces(reordered, plain_records, base_dir),
            codes=[],
            codes_size=total_size - plain_size,
            params={
                "method": SEALED,
                "version": SEALED_VERSION,
                "tensors": tensors,
                "layout": [[r.name, r.offset, r.length] for r in locked_records],
            },
            region_pieces=region,
        )
    locked, params = lock_weights({r.name: arrays[r.name] for r in locked_records}, key, salt, method=method)
    codes, layout, position = [], [], 0
    for record in locked_records:
        array = locked[record.name]
        position += -position % _ALIGN
        layout.append([record.name, record.offset, record.length, position, array.nbytes])
        codes.append(array)
        position += array.nbytes
    params["layout"] = layout
    return LockedGraph(
        graph=graph,
        plain_size=plain_size,
        total_size=total_size,
        plain_pieces=lambda: weight_pieces(reordered, plain_records, base_dir),
        codes=codes,
        codes_size=position,
        params=params,
    )


# Node inputs that steer the computation rather than carry learned values (sizes, scales, bounds,
# pad amounts): a wrong key must not turn them into absurd output sizes or crash the runtime.
_CONTROL = {
    "Resize": (1, 2, 3),
    "Upsample": (1,),
    "Clip": (1, 2),
    "Pad": (1, 2, 3),
    "Slice": (1, 2, 3, 4),
    "Reshape": (1,),
    "Expand": (1,),
    "Tile": (1,),
    "ConstantOfShape": (0,),
    "Range": (0, 1, 2),
    "TopK": (1,),
    "Split": (1,),
}


def _control_inputs(graph: onnx.GraphProto) -> set[str]:
    """Initializer names used as a control input of a node anywhere (subgraphs included)."""
    names: set[str] = set()
    for node in graph.node:
        for index in _CONTROL.get(node.op_type, ()):
            if index < len(node.input) and node.input[index]:
                names.add(node.input[index])
        for attribute in node.attribute:
            for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                names |= _control_inputs(sub)
    return names


def unlock_into(
    codes: memoryview, params: dict[str, Any], key: bytes | memoryview, salt: bytes, weights: memoryview
) -> None:
    """Unlock the codes section into the weights buffer at each tensor's recorded offset."""
    layout = params.get("layout")
    tensors = params.get("tensors")
    if not isinstance(layout, list) or not isinstance(tensors, dict):
        raise LockError("lock parameters have no layout or tensor table")
    method = params.get("method")
    locked: dict[str, np.ndarray] = {}
    targets: dict[str, np.ndarray] = {}
    for entry in layout:
        try:
            name, offset, length, code_offset, code_length = entry
            spec = tensors[name]
            dtype = np.dtype(np.uint64) if method == "uniform-shift" else np.dtype(spec["dtype"])
            count = int(np.prod(spec["shape"], dtype=np.int64))
        except (ValueError, TypeError, KeyError):
            raise LockError(f"malformed lock layout entry {entry!r:.80}") from None
        if code_length != count * dtype.itemsize or code_offset + code_length > codes.nbytes:
            raise LockError(f"locked tensor {name!r} does not fit the codes section")
        if offset < 0 or offset + length > weights.nbytes:
            raise LockError(f"locked tensor {name!r} does not fit the weights buffer")
        locked[name] = np.frombuffer(codes, dtype=dtype, count=count, offset=code_offset).reshape(spec["shape"])
        value_type = np.dtype(spec["dtype"])
        if length != count * value_type.itemsize:
            raise LockError(
                f"locked tensor {name!r} has {count * value_type.itemsize} bytes, the graph expects {length}"
            )
        # Decoded straight into the weights buffer: no second copy of the weights, and no plaintext
        # weights in memory that is not the wiped, non-dumpable buffer.
        targets[name] = np.frombuffer(weights, dtype=value_type, count=count, offset=offset)
    unlock_weights(locked, key, salt, params, into=targets)
