"""`seal`: the whole model encrypted at rest, decrypted only in this process's memory."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx

from modelcloak.bundle import Bundle
from modelcloak.runtime.session import Session, open_graph
from modelcloak.schemes.base import BundlePlan, OpenContext, ProtectRequest, SchemeClaims, refuse_unless
from modelcloak.schemes.parts import part_sections

CLAIMS = SchemeClaims(
    summary="whole model encrypted at rest (AES-256-GCM, chunked), decrypted only in this process's memory",
    protects=(
        "copying the bundle file: weights and graph are unreadable without the model key",
        "modified, truncated, reordered or spliced bundles: refused before any plaintext is used",
        "bundles not signed by a trusted owner key, when the device pins signers",
        "plaintext reaching disk through inference caches (OpenCL/NEO, CUDA, OpenVINO, TensorRT, "
        "onnxruntime optimized/EP-context models, Intel NPU, TorchInductor/Triton): neutralised before load",
        "core dumps: the process is made non-dumpable and decrypted buffers are excluded from dumps",
    ),
    does_not_protect=(
        "a device operator with root: the decrypted model is in ordinary process memory while it runs",
        "anyone who holds the key (key file, variable or passphrase) on the device",
        "black-box queries: outputs are returned in full; use the split scheme's output policy",
        "the copies onnxruntime/OpenVINO keep while the session is open (readable by root; they are "
        "left out of core dumps and overwritten when freed)",
    ),
)


class SealScheme:
    name = "seal"
    claims = CLAIMS

    def check(self, request: ProtectRequest) -> None:
        if request.lock is not None:
            from modelcloak.options import OptionError

            raise OptionError(
                "device locks apply to schemes 'lock' and 'split'; use scheme 'lock' to seal and lock", parameter="lock"
            )
        refuse_unless(request, self.name, allowed=set())

    def build(self, model: onnx.ModelProto, request: ProtectRequest, base_dir: Path | None) -> BundlePlan:
        sections, manifest, cleanup = part_sections(model, "", base_dir, None)
        return BundlePlan(sections, manifest, cleanup=cleanup)

    def open(self, bundle: Bundle, context: OpenContext) -> Session:
        runner = open_graph(bundle, context.key, "", context.report, context.options)
        return Session(runner, bundle.manifest.document, context.report, licence=context.licence)

    def describe(self, document: Mapping[str, Any]) -> list[tuple[str, str]]:
        return []


SCHEME = SealScheme()
