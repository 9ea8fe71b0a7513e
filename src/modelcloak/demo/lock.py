"""Step 2, the bundle on another machine: without the key, and with the key on a device it is not locked to.

Two software-enrolled devices stand in for two machines (`enroll_software_device` with a fake
identity root each: a TPM is the real thing, docs/LOCK.md). The owner locks the model to device
A. A copy of the sealed bundle without its key is refused; the locked bundle with the key on
device B is refused by name; and a thief who holds the model key and rewrites the bundle's
device entry for their own device B (what relabelling a real bundle's entry gives: the manifest is
authenticated with the model key, which they hold; tests/lock/test_lock_scheme.py) is refused too:
the `sealed` lock method seals the locked weights under a key that needs device A's lock key, so
they fail authentication on B (docs/LOCK.md).
"""

from __future__ import annotations

import numpy as np

from modelcloak.demo.context import INPUT_NAME, DemoContext, Row, StepResult, median_seconds


class _Device:
    """A software-enrolled device with its own fake machine identity, and the lock key it exported."""

    def __init__(self, folder, machine_id: str) -> None:  # noqa: ANN001 - a Path
        from modelcloak.keys.device import SoftwareDeviceKey, enroll_software_device, write_lock_key_file

        machine = folder / "machine"
        (machine / "etc").mkdir(parents=True, exist_ok=True)
        (machine / "etc" / "machine-id").write_text(machine_id + "\n")
        enroll_software_device(folder / "state", identity_root=machine, force=True)
        self.key = SoftwareDeviceKey(folder / "state", identity_root=machine)
        root = self.key.export_lock_key()
        try:
            self.lock_file = write_lock_key_file(folder / "device.lock", root, self.key.identity)
        finally:
            root.close()
        self.folder = folder


def _refusal(action) -> str | None:  # noqa: ANN001 - a callable
    """The one-line error of `action`, or None when it was not refused."""
    from modelcloak.errors import ModelcloakError

    try:
        action()
    except ModelcloakError as exc:
        return str(exc).splitlines()[0]
    return None


def run(ctx: DemoContext) -> StepResult:
    import onnxruntime as ort

    import modelcloak
    from modelcloak.keys import KeyFile, generate_key_file
    from modelcloak.keys.device import DeviceLockKey

    plain = ctx.model()
    threads = ctx.settings.threads
    key_path = ctx.path("model.key")
    if not key_path.is_file():
        generate_key_file(key_path)
    key = KeyFile(key_path)
    sealed = ctx.path("model.mcb")
    if not sealed.is_file():
        modelcloak.protect(plain.path, sealed, key=key, scheme="seal")
    devices = ctx.path("devices")
    ctx.console.print("    enrolling two software devices, A (the customer's) and B (another machine)")
    device_a = _Device(devices / "a", "a" * 32)
    device_b = _Device(devices / "b", "b" * 32)
    fingerprint_b = device_b.key.identity.fingerprint

    ctx.console.print("    a copy of model.mcb without its key: the thief tries a key of their own")
    thief_key = generate_key_file(ctx.path("devices/b/guessed.key"), overwrite=True)
    without_key = _refusal(lambda: modelcloak.load(sealed, key=thief_key).close())
    ctx.console.print(f"      refused: {without_key}")

    ctx.console.print("    owner: protect --scheme lock to device A's exported lock key")
    locked = ctx.path("locked.mcb")
    modelcloak.protect(
        plain.path,
        locked,
        key=key,
        scheme="lock",
        lock=modelcloak.LockOptions((DeviceLockKey.from_file(device_a.lock_file),)),
    )

    def open_on(bundle, device: _Device) -> modelcloak.InferenceSession:  # noqa: ANN001
        return modelcloak.InferenceSession(bundle, key=key, device_key=device.key, threads=threads)

    on_a = open_on(locked, device_a)
    labels_a = on_a.run(None, {INPUT_NAME: plain.x_test})[0].argmax(axis=1)
    accuracy_a = float(np.mean(labels_a == plain.y_test))
    ctx.console.print(
        f"      on device A: accuracy {accuracy_a:.1%}, labels equal to plain: {np.array_equal(labels_a, plain.labels)}"
    )

    ctx.console.print("    the locked bundle and its key, copied to device B")
    on_b = _refusal(lambda: open_on(locked, device_b).close())
    ctx.console.print(f"      refused: {on_b}")

    ctx.console.print("    the thief rewrites the device entry for B (they hold the model key)")
    relabelled = DeviceLockKey.from_file(device_a.lock_file)
    relabelled.fingerprint = fingerprint_b
    forged = ctx.path("devices/b/forged.mcb")
    modelcloak.protect(plain.path, forged, key=key, scheme="lock", lock=modelcloak.LockOptions((relabelled,)))
    forged_error = _refusal(lambda: open_on(forged, device_b).close())
    ctx.console.print(f"      refused: {forged_error}")

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    reference = ort.InferenceSession(str(plain.path), options, providers=["CPUExecutionProvider"])
    one = {INPUT_NAME: plain.x_test[:1]}
    plain_latency, locked_latency = median_seconds(
        lambda: reference.run(None, one), lambda: on_a.run(None, one), repeats=ctx.settings.latency_repeats
    )
    on_a.close()
    return StepResult(
        step="lock",
        rows=[
            Row(
                "lock (device A)",
                accuracy_a,
                locked_latency / plain_latency,
                "refused on other devices, and with a forged device entry",
                "the model key and an enrolled device (TPM, or a software key)",
            )
        ],
        facts={
            "refused_without_key": without_key is not None,
            "without_key_error": without_key,
            "device_a_accuracy": accuracy_a,
            "device_a_labels_equal": bool(np.array_equal(labels_a, plain.labels)),
            "refused_on_device_b": on_b is not None,
            "device_b_error": on_b,
            "refused_forged_entry": forged_error is not None,
            "forged_entry_error": forged_error,
            "plain_latency_ms": plain_latency * 1e3,
            "locked_latency_ms": locked_latency * 1e3,
        },
        files={
            "device A state (software key)": ctx.shown(device_a.folder / "state"),
            "device A lock key (for the owner)": ctx.shown(device_a.lock_file),
            "locked bundle (device A)": ctx.shown(locked),
            "thief's forged bundle": ctx.shown(forged),
        },
        commands=[
            "modelcloak device enroll --state device-state --software        # on the device (TPM: drop --software)",
            "modelcloak device export-lock-key --state device-state --out device.lock",
            f"modelcloak protect {ctx.shown(plain.path)} -o {ctx.shown(locked)} --scheme lock "
            f"--key-file {ctx.shown(key_path)} --lock-to device.lock --force",
            f"modelcloak run {ctx.shown(locked)} {ctx.shown(ctx.digits())} --key-file {ctx.shown(key_path)} "
            "--device-state device-state --allow-unsigned -o outputs.npz",
        ],
    )
