"""Owner side: turn a model into a protected bundle.

This is the one place that knows which sections each scheme writes; the bundle room knows
only how to encrypt sections, the model room only how to read graphs.
"""

from __future__ import annotations

import datetime as _dt
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx

from modelcloak import __version__
from modelcloak.bundle import DEFAULT_CHUNK_SIZE, Manifest, SectionSource, write_bundle
from modelcloak.bundle.signing import load_private_key
from modelcloak.errors import ModelcloakError
from modelcloak.keys import KeyProvider
from modelcloak.model import ModelError, externalize_weights, load_model, signature, weight_pieces

SCHEMES = ("seal", "split")
PLANNED_SCHEMES = ("fhe", "lock")


def check_runnable(model: onnx.ModelProto) -> None:
    """Fail at protect time, on the owner's machine, if onnxruntime cannot build the model."""
    import onnxruntime as ort

    if model.ByteSize() > 2**31 - 1:
        return  # too large to hand over in one protobuf; checked when the device loads it
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for every failure
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ModelError(f"onnxruntime cannot run this model: {message}") from None


def protect(
    model: onnx.ModelProto | str | Path | bytes,
    out: str | Path,
    *,
    key: KeyProvider,
    scheme: str = "seal",
    signer: Any = None,
    policy: dict[str, Any] | None = None,
    label: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    verify: bool = True,
    progress: Callable[[int], None] | None = None,
    cut: dict[str, Any] | None = None,
    enclave_key: KeyProvider | None = None,
) -> Manifest:
    """Protect `model` into a bundle at `out` with a key from `key`; return the written manifest.

    `signer` is an Ed25519 private key or a path to its PEM file; devices can then require the
    owner's signature. `verify` builds the model once in onnxruntime so unsupported models are
    refused here rather than on the device.

    Scheme `split` also needs `cut` (one selector: {"after_node": name}, {"tensors": [names]},
    {"last": N} or {"index": I}) and `enclave_key`, the key only the enclave will receive; the
    private part is sealed under it and `policy` ({"output": "label" | "topk:K" | "scores",
    "query_budget": int, "rate_limit_per_s": float}) is enforced by the enclave.
    """
    if scheme not in SCHEMES:
        if scheme in PLANNED_SCHEMES:
            raise ModelcloakError(
                f"scheme {scheme!r} is not available in this version yet; available: {', '.join(SCHEMES)}"
            )
        raise ModelcloakError(f"unknown scheme {scheme!r}; available: {', '.join(SCHEMES)}")
    if scheme == "split" and (cut is None or enclave_key is None):
        raise ModelcloakError(
            "scheme 'split' needs a cut (--cut-after/--cut-tensors/--cut-last/--cut-index) and an enclave key"
        )
    if scheme != "split" and (cut is not None or enclave_key is not None):
        raise ModelcloakError(f"a cut and an enclave key only apply to scheme 'split', not {scheme!r}")
    base_dir = Path(model).parent if isinstance(model, (str, Path)) else None
    proto = load_model(model)
    if verify and not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        check_runnable(proto)
    if signer is not None and not hasattr(signer, "sign"):
        signer = load_private_key(Path(signer))

    extra: dict[str, Any] = {
        "created": {
            "at": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            "tool": f"modelcloak {__version__}",
            "platform": f"{platform.system()}-{platform.machine()}",
            **({"label": label} if label else {}),
        },
        "model": {
            **signature(proto).to_json(),
            "opsets": {entry.domain or "ai.onnx": entry.version for entry in proto.opset_import},
            "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        },
        "policy": dict(policy or {}),
    }
    if scheme == "split":
        from modelcloak.enclave.policy import PolicyError, parse_policy
        from modelcloak.model.cut import find_cut, split_model

        try:
            extra["policy"] = parse_policy(extra["policy"]).to_json()
        except PolicyError as exc:
            raise ModelcloakError(f"invalid output policy: {exc}") from None
        chosen = find_cut(proto, **cut)
        public, private = split_model(proto, chosen)
        private_bytes = private.SerializeToString()
        del private
        extra["split"] = {"boundary": [spec.to_json() for spec in chosen.boundary]}
        sections, weights_size = _graph_sections(public, "public.", None)
        sections.append(SectionSource("private", len(private_bytes), lambda: [private_bytes], key="enclave"))
    else:
        sections, weights_size = _graph_sections(proto, "", base_dir)
    extra["model"]["weight_bytes"] = weights_size

    master, key_spec = key.new_key()
    enclave_master = enclave_spec = None
    try:
        if enclave_key is not None:
            enclave_master, enclave_spec = enclave_key.new_key()
        return write_bundle(
            out,
            master_key=master.view(),
            key_spec=key_spec,
            scheme=scheme,
            sections=sections,
            extra=extra,
            signer=signer,
            chunk_size=chunk_size,
            progress=progress,
            enclave_key=enclave_master.view() if enclave_master else None,
            enclave_key_spec=enclave_spec,
        )
    finally:
        master.close()
        if enclave_master is not None:
            enclave_master.close()


def _graph_sections(model: onnx.ModelProto, prefix: str, base_dir: Path | None) -> tuple[list[SectionSource], int]:
    """The weightless graph and its weights as two host-key sections (`graph`, `weights`)."""
    graph, records, weights_size = externalize_weights(model)
    graph_bytes = graph.SerializeToString()
    return [
        SectionSource(prefix + "graph", len(graph_bytes), lambda: [graph_bytes]),
        SectionSource(prefix + "weights", weights_size, lambda: weight_pieces(model, records, base_dir)),
    ], weights_size
