"""What each scheme protects and what it does not, shown by `modelcloak inspect` and the docs.

Each claim here is backed by a test named in docs/SECURITY.md; a claim without one is not made.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SchemeClaims:
    summary: str
    protects: tuple[str, ...]
    does_not_protect: tuple[str, ...]


CLAIMS: dict[str, SchemeClaims] = {
    "seal": SchemeClaims(
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
            "copies made inside onnxruntime/OpenVINO memory, which modelcloak cannot wipe (dumps stay off)",
        ),
    ),
}


def claims_for(scheme: str) -> SchemeClaims | None:
    return CLAIMS.get(scheme)
