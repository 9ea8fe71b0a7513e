"""Owner-side building blocks the schemes share: a graph's sections, optionally device-locked."""

from __future__ import annotations

import base64
import json
import secrets
from pathlib import Path
from typing import Any

import onnx

from modelcloak.bundle import SectionSource
from modelcloak.model import externalize_weights, weight_pieces
from modelcloak.options import LockOptions

LOCK_SALT_SIZE = 16


class Locking:
    """One bundle's device lock: a fresh lock key, wrapped for each device, and its salt."""

    def __init__(self, options: LockOptions) -> None:
        from modelcloak.hygiene import secret_buffer
        from modelcloak.keys.device import wrap_lock_key

        self.method = options.method
        self.salt = secrets.token_bytes(LOCK_SALT_SIZE)
        self.key = secret_buffer(32)
        self.key.view()[:] = secrets.token_bytes(32)
        self.devices = wrap_lock_key(self.key, list(options.devices))

    def manifest_entry(self, prefix: str, weights_size: int) -> dict[str, Any]:
        return {
            "part": prefix,
            "weights_size": weights_size,
            "method": self.method,
            "salt": base64.b64encode(self.salt).decode(),
            "devices": self.devices,
        }

    def close(self) -> None:
        self.key.close()


def graph_sections(
    model: onnx.ModelProto, prefix: str, base_dir: Path | None, locking: Locking | None = None
) -> tuple[list[SectionSource], int]:
    """The weightless graph and its weights as host-key sections (`graph`, `weights`).

    Locked: `weights` holds only the tensors too small to lock, and two more sections carry the
    locked codes (`locked`) and the public parameters needed to unlock them (`lock-params`).
    """
    if locking is None:
        graph, records, weights_size = externalize_weights(model)
        graph_bytes = graph.SerializeToString()
        return [
            SectionSource(prefix + "graph", len(graph_bytes), lambda: [graph_bytes]),
            SectionSource(prefix + "weights", weights_size, lambda: weight_pieces(model, records, base_dir)),
        ], weights_size
    from modelcloak.lock.layout import SEALED, lock_graph, lock_section_key

    locked = lock_graph(model, locking.key.view(), locking.salt, method=locking.method, base_dir=base_dir)
    graph_bytes = locked.graph.SerializeToString()
    params_bytes = json.dumps(locked.params, separators=(",", ":")).encode()
    # `sealed`: the locked region is sealed under a key that needs the model key and the lock key.
    derive = (lambda master: lock_section_key(master, locking.key.view())) if locking.method == SEALED else None
    return [
        SectionSource(prefix + "graph", len(graph_bytes), lambda: [graph_bytes]),
        SectionSource(prefix + "weights", locked.plain_size, locked.plain_pieces),
        SectionSource(prefix + "locked", locked.codes_size, locked.code_pieces, derive_key=derive),
        SectionSource(prefix + "lock-params", len(params_bytes), lambda: [params_bytes]),
    ], locked.total_size


def part_sections(
    model: onnx.ModelProto, prefix: str, base_dir: Path | None, lock: LockOptions | None
) -> tuple[list[SectionSource], dict[str, Any], list[Any]]:
    """`graph_sections` with the lock's manifest entry and its cleanup: (sections, manifest, cleanup)."""
    locking = Locking(lock) if lock is not None else None
    try:
        sections, weights_size = graph_sections(model, prefix, base_dir, locking)
    except BaseException:
        if locking is not None:
            locking.close()
        raise
    manifest: dict[str, Any] = {"model": {"weight_bytes": weights_size}}
    if locking is None:
        return sections, manifest, []
    manifest["lock"] = locking.manifest_entry(prefix, weights_size)
    return sections, manifest, [locking.close]


def describe_lock(document: Any) -> list[tuple[str, str]]:
    lock = document.get("lock")
    if not isinstance(lock, dict):
        return []
    devices = ", ".join(str(entry.get("device")) for entry in lock.get("devices", []) if isinstance(entry, dict))
    part = "public part" if lock.get("part") else "weights"
    return [("lock", f"{part} locked with {lock.get('method')} to {devices}")]
