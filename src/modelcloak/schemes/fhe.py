"""`fhe`: the private dense head runs under CKKS; only the owner's secret turns results into labels."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from modelcloak.bundle import Bundle, SectionSource
from modelcloak.errors import ModelcloakError
from modelcloak.options import FheLabels, FheOptions, OptionError
from modelcloak.runtime.errors import SessionError
from modelcloak.runtime.session import FheSession, open_graph
from modelcloak.schemes.base import BundlePlan, OpenContext, ProtectRequest, SchemeClaims, refuse_unless
from modelcloak.schemes.parts import part_sections
from modelcloak.schemes.split import cut_model

CLAIMS = SchemeClaims(
    summary=(
        "public layers run here in onnxruntime; the private dense head runs under CKKS homomorphic "
        "encryption with weights encrypted under the owner's key; only the owner's secret, never shipped, "
        "turns the encrypted result into labels"
    ),
    protects=(
        "the private head's weights against root on the device: they exist here only as CKKS ciphertexts",
        "the head's outputs: the device gets an encrypted result it cannot read; the owner returns labels only",
        "with --encrypt-features, the head's inputs as well",
        "everything `seal` protects, for the public part",
    ),
    does_not_protect=(
        "the public layers and the head's shape (layer sizes, activation): they are visible on the device",
        "extraction through the labels the owner returns: the owner backend meters and limits them",
        "a device that also learns raw decryptions: the decryption service must never return them",
        "non-dense private layers: only Gemm/MatMul stacks with polynomial activations are supported",
    ),
)


class FheScheme:
    name = "fhe"
    claims = CLAIMS

    def check(self, request: ProtectRequest) -> None:
        if request.lock is not None:
            raise OptionError("scheme 'fhe' cannot be combined with a device lock in this version", parameter="lock")
        refuse_unless(request, self.name, allowed={"cut", "fhe"}, required={"cut", "fhe"})

    def build(self, model: onnx.ModelProto, request: ProtectRequest, base_dir: Path | None) -> BundlePlan:
        assert request.fhe is not None  # checked by `check`
        options = request.fhe
        if options.secret_out.exists():
            raise OptionError(
                f"{options.secret_out} already exists; the owner's FHE secret is never overwritten",
                parameter="fhe.secret_out",
            )
        public, private, chosen = cut_model(model, request)
        sections, manifest, cleanup = part_sections(public, "public.", None, None)
        package, entry = _compile(public, private, options)  # writes the secret: the last step that can fail
        sections.append(SectionSource("fhe", len(package), lambda: [package]))
        manifest["fhe"] = entry
        manifest["split"] = {"boundary": [spec.to_json() for spec in chosen.boundary]}
        # A secret without its bundle is of no use: do not leave it behind if writing fails.
        forget = lambda: options.secret_out.unlink(missing_ok=True)  # noqa: E731
        return BundlePlan(sections, manifest, cleanup=cleanup, on_failure=[forget])

    def open(self, bundle: Bundle, context: OpenContext) -> FheSession:
        from modelcloak.fhe import EdgeEvaluator, FheError

        package: dict[str, bytes] = {"fhe": b""}
        runner = open_graph(bundle, context.key, "public.", context.report, context.options, also=package)
        try:
            evaluator = EdgeEvaluator(package["fhe"])
            labels = _owner_labels(context.key, context.options.fhe_labels)
        except FheError as exc:
            runner.close()
            raise SessionError(f"cannot load the encrypted head: {exc}") from None
        except BaseException:
            runner.close()
            raise
        return FheSession(
            runner,
            evaluator,
            bundle.manifest.document,
            context.report,
            labels=labels,
            top_k=context.options.fhe_labels.top_k if context.options.fhe_labels else 1,
            encrypt_features=context.options.encrypt_features,
        )

    def describe(self, document: Mapping[str, Any]) -> list[tuple[str, str]]:
        from modelcloak.fhe.report import describe_finetune, describe_measured

        fhe = document.get("fhe")
        if not isinstance(fhe, dict):
            return []
        return [
            (
                "fhe",
                f"CKKS ({fhe.get('backend')}), {fhe.get('security')}-bit, activation {fhe.get('activation')}, "
                f"{'encrypted' if fhe.get('encrypt_weights') else 'encoded'} weights, model id {fhe.get('model_id')}",
            ),
            ("fhe measured", describe_measured(fhe.get("measured"))),
            *([("fhe accuracy", describe_finetune(fhe["finetune"]))] if "finetune" in fhe else []),
        ]


SCHEME = FheScheme()


class _OwnerLabels:
    """Sends each encrypted result to the owner backend's decryption service, metered as usage."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __call__(self, result: bytes, count: int, top_k: int) -> list[Any]:
        from modelcloak.licensing.errors import OwnerError

        try:
            return self._client.labels(result, queries=count, top_k=top_k)
        except OwnerError as exc:
            raise SessionError(f"owner backend: {exc}") from None

    def close(self) -> None:
        self._client.client.close()


def _owner_labels(key: Any, options: FheLabels | None) -> _OwnerLabels | None:
    if options is None:
        return None
    if getattr(key, "usage_key", None) is None:
        raise SessionError("the fhe_labels option needs the bundle key from the owner backend (OwnerBackendKey)")
    from modelcloak.licensing.client import FheLabelClient, OwnerClient

    client = FheLabelClient(
        key.client() if hasattr(key, "client") else OwnerClient(key.url),
        licence_id=key.licence_id,
        # Its own sequence stream, as `run --fhe-labels` uses: never collides with usage reports.
        reporter_id=f"{key.instance_id}.fhe",
        usage_key=key.usage_key,
        state_path=options.state_path,
    )
    return _OwnerLabels(client)


def _compile(public: onnx.ModelProto, private: onnx.ModelProto, options: FheOptions) -> tuple[bytes, dict[str, Any]]:
    """Compile the private dense stack to CKKS, write the owner's secret, return the edge package.

    The secret is written (exclusively, 0600) before the bundle so that a bundle never exists
    without it; the plan's `on_failure` removes it again if writing the bundle fails.
    """
    from modelcloak.fhe import FheError, protect_program
    from modelcloak.fhe.head import finetuned_program, program_for

    # Calibration features also measure the encrypted head's agreement and its check tolerance.
    features = _boundary_features(public, options.calibration) if options.calibration is not None else None
    finetune = None
    kind = options.activation or "square"  # FheOptions resolves None; this only narrows the type
    try:
        if options.train_inputs is not None:
            # Fine-tune inside protect: the public part gives the features at the cut, the held-out
            # part of the owner's data gives the accuracies and (without calibration) the probe.
            train_features = _boundary_features(public, options.train_inputs)
            program, report, heldout = finetuned_program(
                private, kind, train_features, options.train_labels, epochs=options.finetune_epochs
            )
            finetune = report.to_json()
            activation = f"{kind} (fine-tuned in protect)"
            features = features if features is not None else heldout
        else:
            program, activation = program_for(private, kind, features, options.head)
        model = protect_program(
            program,
            security=options.security,
            encrypt_weights=options.encrypt_weights,
            scale_bits=options.scale_bits,
            poly_degree=options.poly_degree,
            probe=features,
        )
    except FheError as exc:
        raise ModelcloakError(f"cannot protect the private part with FHE: {exc}") from None
    _write_secret(options.secret_out, model.owner_secret)
    entry = {
        "model_id": model.model_id,
        "activation": activation,
        "security": model.params.security,
        "encrypt_weights": options.encrypt_weights,
        "batch": model.batch,
        "backend": "tenseal-ckks",
        "measured": model.measured,
    }
    if finetune is not None:
        entry["finetune"] = finetune
    return model.edge_package, entry


def _boundary_features(public: onnx.ModelProto, inputs: Any) -> np.ndarray:
    """The public part's outputs on calibration inputs: what the encrypted head will see."""
    import onnxruntime as ort

    session = ort.InferenceSession(public.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.asarray(session.run(None, {name: np.asarray(inputs, dtype=np.float32)})[0])


def _write_secret(path: Path, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise ModelcloakError(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
