"""Owner side: turn a model into a protected bundle. The scheme modules decide what goes in it."""

from __future__ import annotations

import datetime as _dt
import platform
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from modelcloak import __version__, schemes
from modelcloak.bundle import DEFAULT_CHUNK_SIZE, Manifest, write_bundle
from modelcloak.bundle.serial import serial_entry
from modelcloak.bundle.signing import load_private_key
from modelcloak.keys import KeyProvider
from modelcloak.model import ModelError, load_model, signature
from modelcloak.options import CutSelector, FheOptions, LockOptions, OutputPolicy, coerce_policy
from modelcloak.schemes.base import ProtectRequest

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from modelcloak.keys.device import DeviceLockKey


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
    signer: Ed25519PrivateKey | str | Path | None = None,
    label: str | None = None,
    cut: CutSelector | Mapping[str, Any] | None = None,
    policy: OutputPolicy | Mapping[str, Any] | None = None,
    enclave_key: KeyProvider | None = None,
    lock: LockOptions | Sequence[DeviceLockKey] | None = None,
    fhe: FheOptions | Mapping[str, Any] | None = None,
    native_enclave: str | Path | None = None,
    serial: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    verify: bool = True,
    progress: Callable[[int], None] | None = None,
    format_version: int | None = None,
) -> Manifest:
    """Protect `model` into a bundle at `out` with a key from `key`; return the written manifest.

    `signer` is an Ed25519 private key or a path to its PEM file; devices can then require the
    owner's signature. `verify` builds the model once in onnxruntime so unsupported models are
    refused here rather than on the device. The remaining options belong to schemes, which refuse
    the ones that do not apply to them:

    - `split`: `cut` (a `CutSelector`), `enclave_key` (the key only the enclave receives),
      `policy` (the enclave's `OutputPolicy`; label-only by default) and optionally `lock`, which
      then locks the public part.
    - `lock`: `lock` (a `LockOptions`, or just the devices' exported `DeviceLockKey`s).
    - `fhe`: `cut` (the private part after it must be a dense stack) and `fhe` (`FheOptions`).

    `serial` is a release number devices can require a minimum of (`LoadOptions.min_serial`),
    so an older signed bundle cannot be rolled back in. `native_enclave` (split): a directory in
    which the private part's native C enclave is generated and compiled (docs/NATIVE.md); a
    private part it cannot run is refused up front. `format_version` 1 writes a signed bundle
    that modelcloak releases before format 2 can read (SHA-256 signature digests); the default
    is the newest each bundle can use (docs/FORMAT.md).
    """
    request = ProtectRequest(
        cut=CutSelector.coerce(cut) if cut is not None else None,
        policy=coerce_policy(policy) if policy is not None else None,
        enclave_key=enclave_key,
        lock=LockOptions.coerce(lock) if lock is not None else None,
        fhe=FheOptions.coerce(fhe) if fhe is not None else None,
        native_enclave=Path(native_enclave) if native_enclave is not None else None,
    )
    chosen = schemes.get(scheme)
    chosen.check(request)
    base_dir = Path(model).parent if isinstance(model, (str, Path)) else None
    proto = load_model(model)
    if verify and not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        check_runnable(proto)
    if signer is not None and not hasattr(signer, "sign"):
        signer = load_private_key(Path(signer))

    plan = chosen.build(proto, request, base_dir)
    failed = True
    master = enclave_master = None
    try:
        extra = _manifest(proto, label, {**plan.manifest, **serial_entry(serial)})
        master, key_spec = key.new_key()
        enclave_spec = None
        if plan.enclave_key is not None:
            enclave_master, enclave_spec = plan.enclave_key.new_key()
        written = write_bundle(
            out,
            master_key=master.view(),
            key_spec=key_spec,
            scheme=chosen.name,
            sections=plan.sections,
            extra=extra,
            signer=signer,  # type: ignore[arg-type]
            chunk_size=chunk_size,
            progress=progress,
            enclave_key=enclave_master.view() if enclave_master is not None else None,
            enclave_key_spec=enclave_spec,
            format_version=format_version,
        )
        failed = False
    finally:
        for buffer in (master, enclave_master):
            if buffer is not None:
                buffer.close()
        for step in plan.cleanup + (plan.on_failure if failed else []):
            step()
    for finish in plan.after_write:
        finish(Path(out))
    return written


def _manifest(proto: onnx.ModelProto, label: str | None, entries: dict[str, Any]) -> dict[str, Any]:
    """The manifest entries every bundle has, merged with the scheme's own."""
    document: dict[str, Any] = {
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
        "policy": {},
    }
    for name, value in entries.items():
        if name == "model":
            document["model"].update(value)
        else:
            document[name] = value
    return document
