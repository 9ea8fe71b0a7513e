"""Owner side: turn a model into a protected bundle.

This is the one place that knows which sections each scheme writes; the bundle room knows
only how to encrypt sections, the model room only how to read graphs.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import platform
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import onnx

from modelcloak import __version__
from modelcloak.bundle import DEFAULT_CHUNK_SIZE, Manifest, SectionSource, write_bundle
from modelcloak.bundle.signing import load_private_key
from modelcloak.errors import ModelcloakError
from modelcloak.keys import KeyProvider
from modelcloak.model import ModelError, externalize_weights, load_model, signature, weight_pieces

SCHEMES = ("seal", "split", "lock", "fhe")
PLANNED_SCHEMES: tuple[str, ...] = ()
FHE_ACTIVATIONS = ("square", "modified-square", "relu-poly", "none")
LOCK_SALT_SIZE = 16


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
    lock_to: Sequence[Any] = (),
    lock_method: str = "uniform-shift",
    fhe: dict[str, Any] | None = None,
) -> Manifest:
    """Protect `model` into a bundle at `out` with a key from `key`; return the written manifest.

    `signer` is an Ed25519 private key or a path to its PEM file; devices can then require the
    owner's signature. `verify` builds the model once in onnxruntime so unsupported models are
    refused here rather than on the device.

    Scheme `split` also needs `cut` (one selector: {"after_node": name}, {"tensors": [names]},
    {"last": N} or {"index": I}) and `enclave_key`, the key only the enclave will receive; the
    private part is sealed under it and `policy` ({"output": "label" | "topk:K" | "scores",
    "query_budget": int, "rate_limit_per_s": float}) is enforced by the enclave.

    Scheme `lock` is `seal` with the weights also locked to the devices in `lock_to` (their
    exported lock keys, `modelcloak.keys.DeviceLockKey`); `split` with `lock_to` locks the public
    part. `lock_method` is "uniform-shift" (the default: a wrong device gets plausible weights),
    or "plain-aes" / "permutation" (comparison baselines, docs/LOCK.md).

    Scheme `fhe` needs `cut` (the private part after it must be a dense stack) and `fhe`:
    {"secret_out": path for the owner's CKKS secret (written 0600, never in the bundle),
    "activation": "square" | "modified-square" | "relu-poly" | "none", "security": 128 | 192 | 256,
    "encrypt_weights": bool (default True), "calibration": model inputs for relu-poly's range}.
    The bundle carries the public part and the encrypted program with its evaluation keys only.
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
    if scheme == "fhe" and (cut is None or not fhe or not fhe.get("secret_out")):
        raise ModelcloakError("scheme 'fhe' needs a cut (--cut-*) and a file for the owner's secret (--fhe-secret-out)")
    if scheme not in ("split", "fhe") and cut is not None:
        raise ModelcloakError(f"a cut only applies to schemes 'split' and 'fhe', not {scheme!r}")
    if scheme != "split" and enclave_key is not None:
        raise ModelcloakError(f"an enclave key only applies to scheme 'split', not {scheme!r}")
    if scheme != "fhe" and fhe:
        raise ModelcloakError(f"FHE options only apply to scheme 'fhe', not {scheme!r}")
    if scheme == "fhe" and lock_to:
        raise ModelcloakError("scheme 'fhe' cannot be combined with a device lock in this version")
    if scheme == "lock" and not lock_to:
        raise ModelcloakError("scheme 'lock' needs at least one device lock key (--lock-to FILE)")
    if scheme == "seal" and lock_to:
        raise ModelcloakError("device locks apply to schemes 'lock' and 'split'; use --scheme lock to seal and lock")
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
    locking = _Locking(lock_to, lock_method) if lock_to else None
    if scheme == "split":
        from modelcloak.enclave.policy import PolicyError, parse_policy
        from modelcloak.model.cut import batch_symbol, find_cut, split_model, verify_split

        try:
            extra["policy"] = parse_policy(extra["policy"]).to_json()
        except PolicyError as exc:
            raise ModelcloakError(f"invalid output policy: {exc}") from None
        chosen = find_cut(proto, **cut)
        public, private = split_model(proto, chosen)
        verify_split(proto, public, private, chosen)  # never write a bundle that cannot run its inputs
        private_bytes = private.SerializeToString()
        del private
        extra["split"] = {"boundary": [spec.to_json() for spec in chosen.boundary], "batch": batch_symbol(proto)}
        sections, weights_size = _graph_sections(public, "public.", None, locking)
        sections.append(SectionSource("private", len(private_bytes), lambda: [private_bytes], key="enclave"))
    elif scheme == "fhe":
        from modelcloak.model.cut import find_cut, split_model

        chosen = find_cut(proto, **cut)
        public, private = split_model(proto, chosen)
        package, extra["fhe"] = _fhe_program(public, private, fhe or {})
        extra["split"] = {"boundary": [spec.to_json() for spec in chosen.boundary]}
        sections, weights_size = _graph_sections(public, "public.", None)
        sections.append(SectionSource("fhe", len(package), lambda: [package]))
    else:
        sections, weights_size = _graph_sections(proto, "", base_dir, locking)
    extra["model"]["weight_bytes"] = weights_size
    if locking is not None:
        extra["lock"] = locking.manifest_entry("public." if scheme == "split" else "", weights_size)

    master, key_spec = key.new_key()
    enclave_master = enclave_spec = None
    try:
        if enclave_key is not None:
            enclave_master, enclave_spec = enclave_key.new_key()
        written = write_bundle(
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
    except BaseException:
        if scheme == "fhe":  # a secret without its bundle is of no use: do not leave it behind
            Path(fhe["secret_out"]).unlink(missing_ok=True)  # type: ignore[index]
        raise
    finally:
        master.close()
        if enclave_master is not None:
            enclave_master.close()
        if locking is not None:
            locking.close()
    return written


def _fhe_program(public: onnx.ModelProto, private: onnx.ModelProto, options: dict[str, Any]) -> tuple[bytes, dict]:
    """Compile the private dense stack to CKKS, write the owner's secret, return the edge package.

    The secret is written (exclusively, 0600) before the bundle so that a bundle never exists
    without it; `protect` removes it again if writing the bundle fails.
    """
    from modelcloak.fhe import FheError, compile_onnx, protect_program

    unknown = set(options) - {"secret_out", "activation", "security", "encrypt_weights", "calibration"}
    if unknown:
        raise ModelcloakError(f"unknown FHE option {sorted(unknown)[0]!r}")
    activation = options.get("activation") or "square"
    if activation not in FHE_ACTIVATIONS:
        raise ModelcloakError(f"unknown FHE activation {activation!r}; choose one of {', '.join(FHE_ACTIVATIONS)}")
    secret_out = Path(options["secret_out"])
    if secret_out.exists():
        raise ModelcloakError(f"{secret_out} already exists; the owner's FHE secret is never overwritten")
    calibration = options.get("calibration")
    features = None
    if activation == "relu-poly":
        if calibration is None:
            raise ModelcloakError("activation relu-poly needs calibration inputs to fit ReLU over their range")
        features = _boundary_features(public, calibration)
    try:
        program = compile_onnx(private, activation=activation, calibration=features)
        model = protect_program(
            program, security=int(options.get("security") or 128), encrypt_weights=options.get("encrypt_weights", True)
        )
    except FheError as exc:
        raise ModelcloakError(f"cannot protect the private part with FHE: {exc}") from None
    _write_secret(secret_out, model.owner_secret)
    entry = {
        "model_id": model.model_id,
        "activation": activation,
        "security": model.params.security,
        "encrypt_weights": bool(options.get("encrypt_weights", True)),
        "batch": model.batch,
        "backend": "tenseal-ckks",
    }
    return model.edge_package, entry


def _boundary_features(public: onnx.ModelProto, inputs: Any) -> Any:
    """The public part's outputs on calibration inputs: what the encrypted head will see."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(public.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.asarray(session.run(None, {name: np.asarray(inputs, dtype=np.float32)})[0])


def _write_secret(path: Path, data: bytes) -> None:
    import os

    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise ModelcloakError(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


class _Locking:
    """One bundle's device lock: a fresh lock key, wrapped for each device, and its salt."""

    def __init__(self, devices: Sequence[Any], method: str) -> None:
        from modelcloak.hygiene import secret_buffer
        from modelcloak.keys.device import wrap_lock_key
        from modelcloak.lock.transform import METHODS

        if method not in METHODS:
            raise ModelcloakError(f"unknown lock method {method!r}; choose one of {', '.join(METHODS)}")
        self.method = method
        self.salt = secrets.token_bytes(LOCK_SALT_SIZE)
        self.key = secret_buffer(32)
        self.key.view()[:] = secrets.token_bytes(32)
        self.devices = wrap_lock_key(self.key, list(devices))

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


def _graph_sections(
    model: onnx.ModelProto, prefix: str, base_dir: Path | None, locking: _Locking | None = None
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
    from modelcloak.lock.layout import lock_graph

    locked = lock_graph(model, locking.key.view(), locking.salt, method=locking.method, base_dir=base_dir)
    graph_bytes = locked.graph.SerializeToString()
    params_bytes = json.dumps(locked.params, separators=(",", ":")).encode()
    return [
        SectionSource(prefix + "graph", len(graph_bytes), lambda: [graph_bytes]),
        SectionSource(prefix + "weights", locked.plain_size, locked.plain_pieces),
        SectionSource(prefix + "locked", locked.codes_size, locked.code_pieces),
        SectionSource(prefix + "lock-params", len(params_bytes), lambda: [params_bytes]),
    ], locked.total_size
