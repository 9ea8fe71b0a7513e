"""Device side entry points: `InferenceSession` (onnxruntime's shape) and `load()` (modelcloak's).

Both open a bundle the same way, and the order is the security argument: on-disk caches are
neutralised and the process hardened before any runtime initialises; the signature is checked
before anything decrypted is parsed or handed to a runtime (format 1: before anything is
decrypted; format 2: over the bytes as they are decrypted, docs/FORMAT.md); the key is checked
against the header MAC before the sections; decrypted bytes live in buffers that are excluded from
core dumps and wiped as soon as the backend holds its own copy. What each scheme then builds (a
graph backend, an enclave, an encrypted head) is the scheme module's business (`modelcloak.schemes`).

Process-wide effects, on purpose and documented in docs/MEMORY.md and docs/CACHES.md: opening a
bundle makes this process non-dumpable with a core limit of zero (`hygiene.harden_process`) and
rewrites cache-related variables in `os.environ` (`runtime.cacheguard.apply`), because the
runtimes read them from the process environment.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelcloak import hygiene, schemes
from modelcloak.bundle import Bundle
from modelcloak.bundle.serial import check_serial
from modelcloak.bundle.signing import load_public_key
from modelcloak.keys import KeyProvider
from modelcloak.options import LoadOptions
from modelcloak.runtime import cacheguard
from modelcloak.runtime.errors import SessionError
from modelcloak.runtime.session import LoadReport, Session

__all__ = ["InferenceSession", "ModelMetadata", "NodeArg", "load"]


def load(bundle: str | Path, *, key: KeyProvider, options: LoadOptions | None = None, **settings: Any) -> Session:
    """Open a protected bundle with a key from `key`; return modelcloak's native session.

    `options` is a `LoadOptions`; its fields can also be given as keywords (`trusted_signers=[...]`,
    `device_key=...`, and `enclave_key_file`, `enclave_key_env`, `enclave_threads`,
    `enclave_timeout` for the `enclave` field). `run()` of the session takes a dict of arrays and
    returns a dict; `modelcloak.InferenceSession` is the same session with onnxruntime's API.
    """
    chosen = LoadOptions.from_keywords(options, **settings) if settings or options is None else options
    report = LoadReport(backend=chosen.backend)
    started = time.perf_counter()
    report.cache_findings = len([f for f in cacheguard.apply(chosen.cache_policy) if f.risk])
    report.hardening = hygiene.harden_process()
    trusted = [s if isinstance(s, bytes) else load_public_key(s) for s in chosen.trusted_signers]

    with Bundle.open(bundle) as sealed:
        name = sealed.manifest.scheme
        if name not in schemes.SCHEMES:
            raise SessionError(f"bundle scheme {name!r} cannot be loaded by this version of modelcloak")
        scheme = schemes.get(name)
        if "lock" not in sealed.manifest.document and chosen.device_key is not None:
            raise SessionError(f"this {name} bundle is not locked to a device; drop `device_key`")
        pin_bundle = getattr(key, "pin_bundle", None)
        # Format 2 bundles are hashed while they are decrypted (one read of the file, the digest on a
        # second core) and verified before anything decrypted is parsed or built (open_graph). Not
        # for a key from the owner backend (asked for the key only about a verified bundle) nor for
        # a device lock (whose TPM unseal starts at once): those verify every byte first.
        streamed = not callable(pin_bundle) and "lock" not in sealed.manifest.document
        report.signer = sealed.verify_signature(trusted or None, require=chosen.require_signature, streamed=streamed)
        check_serial(sealed.manifest.document, chosen.min_serial, report.signer if trusted else None)
        report.seconds["verify"] = time.perf_counter() - started
        if callable(pin_bundle):  # a key from the owner backend: its licence may pin a minimum serial
            pin_bundle(sealed.manifest.document, report.signer if trusted else None)
        licence = _licence(key, chosen)
        context = schemes.OpenContext(key=key, options=chosen, report=report, licence=licence)
        session = scheme.open(sealed, context)
        try:
            sealed.finish_verification()  # a no-op unless a scheme left a streamed check unfinished
        except BaseException:
            session.close()
            raise
    if licence is not None:
        try:
            licence.start()  # the key is released now, and with it the usage key; resends a crashed batch
        except BaseException:
            session.close()
            raise
    report.seconds["total"] = time.perf_counter() - started
    return session


def _licence(key: KeyProvider, options: LoadOptions) -> Any:
    """The licence revalidation and usage reporting the `metering` option asks for, or None."""
    if options.metering is None:
        return None
    from modelcloak.licensing.metering import LicensedUse

    if not hasattr(key, "revalidate"):
        raise SessionError("the metering option needs the bundle key from the owner backend (OwnerBackendKey)")
    extra = {"clock": options.metering.clock} if options.metering.clock is not None else {}
    return LicensedUse(key, options.metering.state_path, report_every=options.metering.report_every, **extra)


@dataclass(frozen=True)
class NodeArg:
    """An input or output as onnxruntime describes it: name, shape (int, str or None), type."""

    name: str
    shape: list[int | str | None]
    type: str


@dataclass(frozen=True)
class ModelMetadata:
    """onnxruntime's `ModelMetadata` fields, from the signed manifest (the graph itself stays sealed)."""

    producer_name: str
    graph_name: str
    graph_description: str
    domain: str
    description: str
    version: int
    custom_metadata_map: dict[str, str]


_ORT_TYPES = {
    "float32": "float",
    "float64": "double",
    "float16": "float16",
    "bfloat16": "bfloat16",
    "int8": "int8",
    "int16": "int16",
    "int32": "int32",
    "int64": "int64",
    "uint8": "uint8",
    "uint16": "uint16",
    "uint32": "uint32",
    "uint64": "uint64",
    "bool": "bool",
    "str": "string",
    "object": "string",
}


def _node_arg(spec: dict[str, Any]) -> NodeArg:
    dtype = str(spec.get("dtype"))
    shape = [None if d == "?" else d for d in spec.get("shape", [])]
    return NodeArg(str(spec.get("name")), shape, f"tensor({_ORT_TYPES.get(dtype, dtype)})")


class InferenceSession:
    """A protected bundle with onnxruntime's `InferenceSession` API.

    Inference code written for onnxruntime works with only its constructor line changed::

        session = modelcloak.InferenceSession("model.mcb", key=KeyFile("model.key"))
        (logits,) = session.run(None, {"x": batch})

    `providers` are onnxruntime execution providers for the part that runs here; every other
    keyword is a `LoadOptions` field (or give `options=`). For a split bundle `run` returns what
    the enclave's output policy allows (labels by default); for an fhe bundle it returns the
    owner's labels when the `fhe_labels` option is set, and says what to do otherwise.
    """

    def __init__(
        self,
        bundle: str | Path,
        *,
        key: KeyProvider,
        providers: Sequence[Any] | None = None,
        options: LoadOptions | None = None,
        **settings: Any,
    ) -> None:
        if providers is not None:
            settings["providers"] = tuple(providers)
        self.session: Session = load(bundle, key=key, options=options, **settings)

    @property
    def scheme(self) -> str:
        return self.session.scheme

    def get_inputs(self) -> list[NodeArg]:
        return [_node_arg(spec) for spec in self.session.input_specs]

    def get_outputs(self) -> list[NodeArg]:
        specs = self.session.output_specs
        if not specs:
            return [NodeArg(name, [], "tensor(unknown)") for name in self.session.output_names]
        return [_node_arg(spec) for spec in specs]

    def get_providers(self) -> list[str]:
        return self.session.providers

    def get_modelmeta(self) -> ModelMetadata:
        document = self.session.manifest
        created = document.get("created", {})
        model = document.get("model", {})
        custom = {"modelcloak.scheme": self.scheme}
        if created.get("label"):
            custom["modelcloak.label"] = str(created["label"])
        return ModelMetadata(
            producer_name=str(model.get("producer", "")),
            graph_name="",  # sealed: the graph's own names stay inside the bundle
            graph_description="",
            domain="",
            description=str(created.get("label", "")),
            version=0,
            custom_metadata_map=custom,
        )

    def run(
        self, output_names: Sequence[str] | None, input_feed: dict[str, Any], run_options: Any = None
    ) -> list[np.ndarray]:
        """Outputs in the order of `output_names` (all outputs for None), like onnxruntime's `run`.

        `run_options` is accepted for compatibility and ignored: log levels and run tags do not
        apply to a session whose graph stays sealed.
        """
        if not isinstance(input_feed, dict):
            raise SessionError("input_feed must be a dict of input name -> array, as in onnxruntime")
        results = self.session.run(input_feed)
        names = list(output_names) if output_names else list(self.session.output_names)
        unknown = [name for name in names if name not in results]
        if unknown:
            raise SessionError(
                f"unknown output name(s) {', '.join(unknown)}; outputs: {', '.join(self.session.output_names)}"
            )
        return [results[name] for name in names]

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
