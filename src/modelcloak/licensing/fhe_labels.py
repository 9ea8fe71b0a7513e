"""Device side of the last step: send an encrypted result to the owner's decryption service, keep the labels.

Used by `modelcloak run BUNDLE INPUTS --owner-url ... --fhe-labels labels.json`: the key release
that opened the bundle also released the licence's usage key, which signs the request. Requests go
on their own sequence stream (reporter `<instance>.fhe`, state next to the usage state file), so
they never collide with usage reports.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from modelcloak.fhe.engine import MAGIC_RESULT, _unpack
from modelcloak.fhe.errors import FheError

__all__ = ["labels_from_owner", "result_count"]


def result_count(result: bytes) -> int:
    """The number of samples a result envelope holds."""
    header, _ = _unpack(MAGIC_RESULT, result, "FHE result")
    try:
        return int(header["count"])
    except (KeyError, TypeError, ValueError):
        raise FheError("FHE result: malformed header") from None


def labels_from_owner(owner_key: Any, result: bytes, *, usage_state: Path, out: Path, top_k: int = 1) -> list[Any]:
    """Labels for `result` from the owner backend `owner_key` was released by; written to `out` as JSON."""
    from modelcloak.licensing.client import FheLabelClient

    if owner_key.usage_key is None:
        raise FheError("the licence's usage key was not released; the bundle must be opened with --owner-url first")
    queries = result_count(result)
    with owner_key.client() as client:
        labeller = FheLabelClient(
            client,
            licence_id=owner_key.licence_id,
            reporter_id=f"{owner_key.instance_id}.fhe",
            usage_key=owner_key.usage_key,
            state_path=Path(f"{usage_state}.fhe"),
        )
        labels = labeller.labels(result, queries=queries, top_k=top_k)
    temporary = out.with_name(out.name + ".tmp")
    with open(temporary, "w") as handle:
        json.dump({"labels": labels, "samples": queries, "top_k": top_k}, handle)
        handle.write("\n")
    os.replace(temporary, out)
    return labels
