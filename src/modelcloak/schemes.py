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
    "split": SchemeClaims(
        summary=(
            "public layers run here in onnxruntime; the private layers run in a separate enclave process "
            "that alone holds their key and enforces the output policy from the signed manifest"
        ),
        protects=(
            "the private layers' weights and graph: sealed under a key the host process never receives",
            "the output policy (label by default), query budget and rate limit: the host cannot change them "
            "without breaking the enclave section's authentication",
            "other users, the disk and crash dumps, with the `process` backend (non-dumpable enclave, "
            "seccomp filter: no file opens, exec or network after loading)",
            "everything `seal` protects, for the public part",
        ),
        does_not_protect=(
            "root on the device with the `process` backend: only a hardware TEE (SGX, Nitro) keeps root "
            "out of the enclave's memory",
            "the public layers: they run in plaintext on the host by design",
            "extraction by queries within the budget: measure it with `modelcloak eval extraction`",
            "the boundary activations and the shapes at the cut, which the host sees",
        ),
    ),
    "lock": SchemeClaims(
        summary=(
            "sealed like `seal`, and the weights are also locked to enrolled devices (a TPM-sealed secret, or "
            "a weaker software secret): only those devices turn the codes back into the real weights"
        ),
        protects=(
            "a copied bundle with its key file: on another machine (another TPM) the device secret does not unseal",
            "a copied device state directory: the TPM-sealed secret opens only on the TPM that sealed it, and "
            "with --pcrs only in the enrolled boot state",
            "an attacker who rewrites the device entry for their own device: the weights unlock to values with "
            "each tensor's own distribution (no sign the key was wrong) and accuracy falls to chance",
            "everything `seal` protects",
        ),
        does_not_protect=(
            "root on an authorised, running device: the unlocked weights are in process memory",
            "software-enrolled devices against someone who copies the state and fakes the machine identifiers",
            "the model structure and the tensors below 1 KiB (biases of small layers), which are sealed, not locked",
            "whoever received the exported device lock key (the owner's copy): keep it like a model key",
        ),
    ),
    "fhe": SchemeClaims(
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
    ),
}


def claims_for(scheme: str) -> SchemeClaims | None:
    return CLAIMS.get(scheme)
