"""Step 1, seal: the owner seals and signs the model; the device runs it with onnxruntime's API.

Same labels as the plain model on every test digit, and the cost: load time and single-digit
latency next to plain onnxruntime, measured interleaved in one run.
"""

from __future__ import annotations

import numpy as np

from modelcloak.demo.context import INPUT_NAME, DemoContext, Row, StepResult, median_seconds


def run(ctx: DemoContext) -> StepResult:
    import onnxruntime as ort

    import modelcloak
    from modelcloak.bundle.signing import generate_signing_key
    from modelcloak.keys import KeyFile, generate_key_file

    plain = ctx.model()
    threads = ctx.settings.threads
    key_path, signer_path, bundle = ctx.path("model.key"), ctx.path("owner.pem"), ctx.path("model.mcb")

    ctx.console.print("    owner: a 256-bit model key, an Ed25519 signing key, then protect (seal, signed)")
    # The key and signing key belong to this demo folder: a rerun makes new ones and new bundles.
    key = generate_key_file(key_path, overwrite=True)
    generate_signing_key(signer_path, overwrite=True)
    modelcloak.protect(plain.path, bundle, key=key, scheme="seal", signer=signer_path)
    trusted = [f"{signer_path}.pub"]

    ctx.console.print("    device: modelcloak.InferenceSession (onnxruntime's API), owner signature required")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads

    def open_plain() -> ort.InferenceSession:
        return ort.InferenceSession(str(plain.path), options, providers=["CPUExecutionProvider"])

    def open_sealed() -> modelcloak.InferenceSession:
        return modelcloak.InferenceSession(bundle, key=KeyFile(key_path), trusted_signers=trusted, threads=threads)

    load_repeats = max(3, ctx.settings.latency_repeats // 6)
    plain_load, sealed_load = median_seconds(open_plain, lambda: open_sealed().close(), repeats=load_repeats)
    plain_session, sealed_session = open_plain(), open_sealed()
    sealed_labels = sealed_session.run(None, {INPUT_NAME: plain.x_test})[0].argmax(axis=1)
    one = {INPUT_NAME: plain.x_test[:1]}
    plain_latency, sealed_latency = median_seconds(
        lambda: plain_session.run(None, one),
        lambda: sealed_session.run(None, one),
        repeats=ctx.settings.latency_repeats,
    )
    sealed_session.close()
    equal = int(np.sum(sealed_labels == plain.labels))
    accuracy = float(np.mean(sealed_labels == plain.y_test))
    ctx.console.print(
        f"    labels equal to plain on {equal}/{len(plain.labels)} digits; accuracy {accuracy:.1%} "
        f"(plain {plain.accuracy:.1%}); load {sealed_load * 1e3:.1f} ms vs {plain_load * 1e3:.1f} ms plain; "
        f"one digit {sealed_latency * 1e3:.2f} ms vs {plain_latency * 1e3:.2f} ms"
    )
    return StepResult(
        step="seal",
        rows=[
            Row("plain ONNX", plain.accuracy, 1.0, "the whole model, ready to run", "nothing"),
            Row(
                "seal",
                accuracy,
                sealed_latency / plain_latency,
                "an encrypted, signed file: nothing without the key",
                "the model key (file, variable, passphrase or owner backend)",
            ),
        ],
        facts={
            "test_samples": len(plain.labels),
            "plain_accuracy": plain.accuracy,
            "sealed_accuracy": accuracy,
            "labels_equal": equal == len(plain.labels),
            "plain_load_ms": plain_load * 1e3,
            "sealed_load_ms": sealed_load * 1e3,
            "plain_latency_ms": plain_latency * 1e3,
            "sealed_latency_ms": sealed_latency * 1e3,
        },
        files={
            "plain model (owner only)": ctx.shown(plain.path),
            "model key (secret)": ctx.shown(key_path),
            "owner signing key (secret)": ctx.shown(signer_path),
            "sealed bundle": ctx.shown(bundle),
        },
        commands=[
            f"modelcloak keygen {ctx.shown(key_path)} --force",
            f"modelcloak keygen --signing {ctx.shown(signer_path)} --force",
            f"modelcloak protect {ctx.shown(plain.path)} -o {ctx.shown(bundle)} --key-file {ctx.shown(key_path)} "
            f"--sign-key {ctx.shown(signer_path)} --force",
            f"modelcloak inspect {ctx.shown(bundle)}",
            f"modelcloak run {ctx.shown(bundle)} {ctx.shown(ctx.digits())} --key-file {ctx.shown(key_path)} "
            f"--trusted-signer {ctx.shown(signer_path)}.pub -o outputs.npz",
        ],
    )
