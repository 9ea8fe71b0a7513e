"""`protect --scheme lock` and split + lock, end to end: owner locks to devices, devices unlock in memory.

Authorised device: bit-identical outputs. Another device: a clear error naming both fingerprints.
A forged device entry (an attacker who holds the host key and relabels the wrapped lock key for
their own device): the load succeeds, the weights look real, and accuracy falls to chance. That
last one is the point of the uniform-shift lock, and the plain-aes run is its negative control.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import split_models
import swtpm
from models import make_mlp, reference_outputs
from onnx import TensorProto, helper, numpy_helper

from modelcloak.inference import load
from modelcloak.keys import KeyProviderError, generate_key_file
from modelcloak.keys.device import (
    DeviceLockKey,
    SoftwareDeviceKey,
    enroll_software_device,
    write_lock_key_file,
)
from modelcloak.keys.enrolled import open_device_key
from modelcloak.lock import ks_distance
from modelcloak.options import LockOptions
from modelcloak.protector import protect
from modelcloak.runtime import SessionError


def _machine(root: Path, machine_id: str) -> Path:
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "machine-id").write_text(machine_id + "\n")
    return root


class Device:
    """A software-enrolled device with a fake machine identity, and the lock key it exported."""

    def __init__(self, folder: Path, machine_id: str) -> None:
        machine = _machine(folder / "machine", machine_id)
        enroll_software_device(folder / "state", identity_root=machine)
        self.key = SoftwareDeviceKey(folder / "state", identity_root=machine)
        root = self.key.export_lock_key()
        try:
            self.lock_file = write_lock_key_file(folder / "device.lock", root, self.key.identity)
        finally:
            root.close()

    @property
    def fingerprint(self) -> str:
        return self.key.identity.fingerprint

    def owner_handle(self) -> DeviceLockKey:
        return DeviceLockKey.from_file(self.lock_file)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lock-scheme")
    host = generate_key_file(folder / "host.key")
    a = Device(folder / "a", "a" * 32)
    b = Device(folder / "b", "b" * 32)
    return folder, host, a, b


def _run(bundle: Path, host, device, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with load(bundle, key=host, device_key=device.key) as session:
        return next(iter(session.run(feeds).values()))


@pytest.mark.parametrize("method", ["sealed", "uniform-shift", "plain-aes", "permutation"])
def test_the_authorised_device_gets_bit_identical_outputs(world, method):
    folder, host, a, _ = world
    model = make_mlp()
    bundle = folder / f"mlp-{method}.mcb"
    protect(model, bundle, key=host, scheme="lock", lock=LockOptions([a.owner_handle()], method))
    x = np.random.default_rng(0).standard_normal((6, 16)).astype(np.float32)
    assert np.array_equal(_run(bundle, host, a, {"x": x}), reference_outputs(model, x))


def test_one_bundle_locked_to_two_devices_opens_on_both(world):
    folder, host, a, b = world
    model = make_mlp(seed=3)
    bundle = folder / "two.mcb"
    protect(model, bundle, key=host, scheme="lock", lock=[a.owner_handle(), b.owner_handle()])
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    expected = reference_outputs(model, x)
    assert np.array_equal(_run(bundle, host, a, {"x": x}), expected)
    assert np.array_equal(_run(bundle, host, b, {"x": x}), expected)


def test_another_device_is_refused_by_name(world):
    folder, host, a, b = world
    bundle = folder / "only-a.mcb"
    protect(make_mlp(), bundle, key=host, scheme="lock", lock=[a.owner_handle()])
    with pytest.raises(KeyProviderError, match=f"locked to {a.fingerprint}; this device is {b.fingerprint}"):
        _run(bundle, host, b, {"x": np.zeros((1, 16), np.float32)})


def test_a_locked_bundle_needs_a_device_key(world):
    folder, host, a, _ = world
    bundle = folder / "needs-device.mcb"
    protect(make_mlp(), bundle, key=host, scheme="lock", lock=[a.owner_handle()])
    with pytest.raises(SessionError, match="locked to a device"):
        load(bundle, key=host)


def test_the_weights_section_holds_no_locked_weight(world):
    """The plain weights section carries no float weight: every tensor, biases included, is codes."""
    folder, host, a, _ = world
    model = make_mlp(sizes=(16, 256, 10))
    bundle = folder / "layout.mcb"
    protect(model, bundle, key=host, scheme="lock", lock=[a.owner_handle()])
    from modelcloak.bundle import Bundle

    with Bundle.open(bundle) as sealed:
        sizes = {entry.name: entry.size for entry in sealed.manifest.sections}
        lock = sealed.manifest.document["lock"]
    # Every float tensor is locked, the 10-value b1 included; no weight stays plain. The default
    # `sealed` method stores them at their own size: the locked section is the weights' bytes, sealed
    # under a key that needs the device (16 bytes of alignment padding between the 4 tensors at most).
    assert sizes["weights"] == 0
    assert 4 * (16 * 256 + 256 * 10 + 256 + 10) <= sizes["locked"] <= 4 * (16 * 256 + 256 * 10 + 256 + 10) + 64
    assert lock["method"] == "sealed" and lock["devices"][0]["device"] == a.fingerprint
    # The size target, <= 1.1x the sealed bundle (uniform-shift's 8-byte codes give 2x).
    protect(model, folder / "layout-seal.mcb", key=host, scheme="seal")
    assert bundle.stat().st_size <= 1.1 * (folder / "layout-seal.mcb").stat().st_size
    assert "lock_key" not in json.dumps(lock)


# --- a forged device entry: what an attacker with the host key and another device gets -----------


def _digits_model() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """An MLP trained on scikit-learn's 8x8 digits (ships offline), as ONNX; and its test set."""
    sklearn = pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    assert sklearn
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target
    net = MLPClassifier(hidden_layer_sizes=(128,), max_iter=300, random_state=0).fit(x[:1400], y[:1400])
    w0, w1 = (w.astype(np.float32) for w in net.coefs_)
    b0, b1 = (b.astype(np.float32) for b in net.intercepts_)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w0", "b0"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Gemm", ["r", "w1", "b1"], ["logits"]),
        ],
        "digits",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(v, n) for n, v in (("w0", w0), ("b0", b0), ("w1", w1), ("b1", b1))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model, x[1400:], y[1400:]


def _forged_bundle(folder: Path, host, model, owner_device: Device, attacker_device: Device, method: str) -> Path:
    """A bundle whose entry for the attacker's device wraps the lock key made for the owner's device.

    This is what relabelling a real bundle's entry gives (the manifest is only MACed with the host
    key, which the attacker holds): the attacker's device derives its own key and XORs it in.
    """
    relabelled = DeviceLockKey.from_file(owner_device.lock_file)
    relabelled.fingerprint = attacker_device.fingerprint
    bundle = folder / f"forged-{method}.mcb"
    protect(model, bundle, key=host, scheme="lock", lock=LockOptions([relabelled], method))
    return bundle


def _accuracy(bundle: Path, host, device: Device, x: np.ndarray, y: np.ndarray) -> float:
    return float((_run(bundle, host, device, {"x": x}).argmax(-1) == y).mean())


@pytest.mark.slow
def test_a_forged_entry_gives_real_looking_weights_and_chance_accuracy(world):
    folder, host, a, b = world
    model, x, y = _digits_model()
    plain = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    original = float((plain.run(None, {"x": x})[0].argmax(-1) == y).mean())
    assert original > 0.9

    bundle = _forged_bundle(folder, host, model, a, b, "uniform-shift")
    stolen = _accuracy(bundle, host, b, x, y)
    # 10 balanced classes: chance is 10%; 397 test digits give a standard error of 1.5 points.
    assert stolen < 0.2, stolen

    # The wrong weights look like the real ones: finite, same distribution (KS distance small).
    from modelcloak.bundle import Bundle
    from modelcloak.keys.device import unwrap_lock_key
    from modelcloak.lock.layout import unlock_into

    with Bundle.open(bundle) as sealed:
        lock = sealed.manifest.document["lock"]
        master = host.key_for(sealed.manifest.key)
        params_entry, codes_entry = sealed.manifest.section("lock-params"), sealed.manifest.section("locked")
        params = bytearray(params_entry.size)
        codes = bytearray(codes_entry.size)
        sealed.decrypt_section_into("lock-params", master.view(), memoryview(params))
        sealed.decrypt_section_into("locked", master.view(), memoryview(codes))
        master.close()
    params = json.loads(params)
    import base64

    wrong_key = unwrap_lock_key(lock["devices"], b.key)
    weights = bytearray(lock["weights_size"])
    unlock_into(memoryview(codes), params, wrong_key.view(), base64.b64decode(lock["salt"]), memoryview(weights))
    wrong_key.close()
    name, offset, length = params["layout"][0][:3]
    got = np.frombuffer(weights, dtype=np.float32, count=length // 4, offset=offset)
    real = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name)).reshape(-1)
    assert np.isfinite(got).all()
    assert not np.array_equal(got, real)
    assert ks_distance(got, real) < 0.05


@pytest.mark.slow
def test_sealed_refuses_a_forged_entry_and_twenty_wrong_keys(world):
    """`sealed`: a relabelled entry, and 20 random lock keys, never produce weights; the right key does.

    The control (the unaltered bundle on the device it was locked to) loads and is accurate, so the
    refusals come from the key and not from a broken bundle.
    """
    folder, host, a, b = world
    model, x, y = _digits_model()
    bundle = _forged_bundle(folder, host, model, a, b, "sealed")
    with pytest.raises(SessionError, match="do not open with this device's key"):
        load(bundle, key=host, device_key=b.key)

    honest = folder / "honest-sealed.mcb"
    protect(model, honest, key=host, scheme="lock", lock=LockOptions([a.owner_handle()], "sealed"))
    assert _accuracy(honest, host, a, x, y) > 0.9  # control

    from modelcloak.bundle import Bundle, BundleError
    from modelcloak.keys.device import unwrap_lock_key
    from modelcloak.lock.layout import lock_section_key

    with Bundle.open(honest) as sealed:
        master = host.key_for(sealed.manifest.key)
        region = bytearray(sealed.manifest.section("locked").size)
        refused = 0
        for i in range(20):
            wrong = np.random.default_rng(i).bytes(32)
            try:
                sealed.decrypt_section_into("locked", lock_section_key(master.view(), wrong), memoryview(region))
            except BundleError:  # the section's authentication fails
                refused += 1
        right = unwrap_lock_key(sealed.manifest.document["lock"]["devices"], a.key)
        sealed.decrypt_section_into("locked", lock_section_key(master.view(), right.view()), memoryview(region))
        right.close()
        master.close()
    assert refused == 20
    w0 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w0"))
    assert w0.tobytes() in bytes(region)  # control: the right key gives the exact weights


@pytest.mark.slow
def test_negative_control_plain_aes_gives_absurd_weights(world):
    """The same forgery against plain AES: the attacker sees at once that the key is wrong."""
    folder, host, a, b = world
    model, x, y = _digits_model()
    bundle = _forged_bundle(folder, host, model, a, b, "plain-aes")
    with load(bundle, key=host, device_key=b.key) as session:
        logits = next(iter(session.run({"x": x}).values()))
    assert not np.isfinite(logits).all() or np.abs(logits).max() > 1e6


# --- split + lock: the public part locked, the private part in the enclave --------------------------


def test_split_with_a_locked_public_part(world):
    folder, host, a, b = world
    enclave = generate_key_file(folder / "enclave.key")
    model = split_models.cnn()
    feeds = split_models.sample_input("cnn", 3)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    bundle = folder / "split-lock.mcb"
    protect(
        model,
        bundle,
        key=host,
        scheme="split",
        cut={"last": 2},
        enclave_key=enclave,
        policy={"output": "scores"},
        lock=[a.owner_handle()],
        verify=False,
    )
    from modelcloak.bundle import Bundle

    with Bundle.open(bundle) as sealed:
        names = {entry.name for entry in sealed.manifest.sections}
        assert sealed.manifest.document["lock"]["part"] == "public."
    assert {"public.graph", "public.weights", "public.locked", "public.lock-params", "private"} <= names
    with load(bundle, key=host, device_key=a.key, enclave_key_file=enclave.path) as session:
        got = next(iter(session.run(feeds).values()))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    with pytest.raises(KeyProviderError, match="locked to"):
        load(bundle, key=host, device_key=b.key, enclave_key_file=enclave.path)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"scheme": "lock"}, "needs at least one device lock key"),
        ({"scheme": "seal", "lock": "A"}, "use scheme 'lock'"),
        ({"scheme": "lock", "lock": "A", "lock_method": "rot13"}, "unknown lock method"),
    ],
)
def test_protect_refuses_bad_lock_options(world, kwargs, fragment):
    from modelcloak.errors import ModelcloakError

    folder, host, a, _ = world
    if kwargs.get("lock") == "A":
        kwargs = {**kwargs, "lock": [a.owner_handle()]}
    with pytest.raises(ModelcloakError, match=fragment):
        if "lock_method" in kwargs:
            kwargs["lock"] = LockOptions(kwargs["lock"], kwargs.pop("lock_method"))
        protect(make_mlp(), folder / "refused.mcb", key=host, **kwargs)
    assert not (folder / "refused.mcb").exists()


# --- the whole flow through the CLI on a real (software) TPM ---------------------------------------


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "modelcloak", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def test_cli_enroll_export_protect_run_on_swtpm(tmp_path):
    swtpm.require_swtpm()
    first = swtpm.SwTpm(tmp_path / "tpm-a").start()
    second = swtpm.SwTpm(tmp_path / "tpm-b").start()
    try:
        model = make_mlp()
        onnx.save(model, tmp_path / "mlp.onnx")
        x = np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)
        np.save(tmp_path / "x.npy", x)
        assert cli("keygen", str(tmp_path / "host.key")).returncode == 0

        enrolled = cli("device", "enroll", "--state", str(tmp_path / "dev-a"), "--tcti", first.tcti)
        assert enrolled.returncode == 0, enrolled.stderr
        fingerprint = open_device_key(tmp_path / "dev-a", tcti=first.tcti).identity.fingerprint
        assert fingerprint in enrolled.stdout
        exported = cli(
            "device", "export-lock-key", "--state", str(tmp_path / "dev-a"), "--tcti", first.tcti,
            "--out", str(tmp_path / "a.lock"),
        )  # fmt: skip
        assert exported.returncode == 0, exported.stderr
        assert (tmp_path / "a.lock").stat().st_mode & 0o077 == 0

        protected = cli(
            "protect", str(tmp_path / "mlp.onnx"), "-o", str(tmp_path / "m.mcb"), "--scheme", "lock",
            "--key-file", str(tmp_path / "host.key"), "--lock-to", str(tmp_path / "a.lock"),
        )  # fmt: skip
        assert protected.returncode == 0, protected.stderr
        shown = cli("inspect", str(tmp_path / "m.mcb"))
        assert f"locked with sealed to {fingerprint}" in shown.stdout

        ran = cli(
            "run", "--allow-unsigned",
            str(tmp_path / "m.mcb"), str(tmp_path / "x.npy"), "--key-file", str(tmp_path / "host.key"),
            "--device-state", str(tmp_path / "dev-a"), "--tcti", first.tcti, "-o", str(tmp_path / "y.npz"),
        )  # fmt: skip
        assert ran.returncode == 0, ran.stderr
        assert np.array_equal(np.load(tmp_path / "y.npz")["logits"], reference_outputs(model, x))

        # The state directory copied to another machine (another TPM) unlocks nothing.
        copied = cli(
            "run", "--allow-unsigned",
            str(tmp_path / "m.mcb"), str(tmp_path / "x.npy"), "--key-file", str(tmp_path / "host.key"),
            "--device-state", str(tmp_path / "dev-a"), "--tcti", second.tcti,
        )  # fmt: skip
        assert copied.returncode == 2 and "Traceback" not in copied.stderr
        assert len(copied.stderr.strip().splitlines()) == 1, copied.stderr

        # Another enrolled device is told which device the bundle belongs to.
        assert cli("device", "enroll", "--state", str(tmp_path / "dev-b"), "--tcti", second.tcti).returncode == 0
        other = cli(
            "run", "--allow-unsigned",
            str(tmp_path / "m.mcb"), str(tmp_path / "x.npy"), "--key-file", str(tmp_path / "host.key"),
            "--device-state", str(tmp_path / "dev-b"), "--tcti", second.tcti,
        )  # fmt: skip
        assert other.returncode == 2 and f"locked to {fingerprint}" in other.stderr

        missing = cli(
            "run",
            "--allow-unsigned",
            str(tmp_path / "m.mcb"),
            str(tmp_path / "x.npy"),
            "--key-file",
            str(tmp_path / "host.key"),
        )
        assert missing.returncode == 2 and "--device-state" in missing.stderr

        # Without --tcti (and no TCTI in the environment) the TCTI recorded at enrolment is used.
        no_env = {k: v for k, v in os.environ.items() if k not in ("TPM2TOOLS_TCTI", "TSS2_TCTI")}
        recorded = subprocess.run(
            [sys.executable, "-m", "modelcloak", "run", "--allow-unsigned",
                str(tmp_path / "m.mcb"), str(tmp_path / "x.npy"),
             "--key-file", str(tmp_path / "host.key"), "--device-state", str(tmp_path / "dev-a"),
             "-o", str(tmp_path / "y2.npz")],
            capture_output=True, text=True, timeout=600, env=no_env,
        )  # fmt: skip
        assert recorded.returncode == 0, recorded.stderr
        assert np.array_equal(np.load(tmp_path / "y2.npz")["logits"], reference_outputs(model, x))
        # Control: an explicit TCTI still wins over the recorded one (a dead one here fails).
        second.stop()
        explicit = cli(
            "run", "--allow-unsigned",
            str(tmp_path / "m.mcb"), str(tmp_path / "x.npy"), "--key-file", str(tmp_path / "host.key"),
            "--device-state", str(tmp_path / "dev-a"), "--tcti", second.tcti,
        )  # fmt: skip
        assert explicit.returncode == 2 and f"no TPM reachable through TCTI '{second.tcti}'" in explicit.stderr

        # Wrong things in the right places get messages that name them.
        lock_file_as_state = cli(
            "run", "--allow-unsigned",
            str(tmp_path / "m.mcb"), str(tmp_path / "x.npy"), "--key-file", str(tmp_path / "host.key"),
            "--device-state", str(tmp_path / "a.lock"),
        )  # fmt: skip
        assert lock_file_as_state.returncode == 2
        assert "is an exported device lock key file" in lock_file_as_state.stderr, lock_file_as_state.stderr
        no_lock_file = cli(
            "protect", str(tmp_path / "mlp.onnx"), "-o", str(tmp_path / "n.mcb"), "--scheme", "lock",
            "--key-file", str(tmp_path / "host.key"), "--lock-to", str(tmp_path / "nope.lock"),
        )  # fmt: skip
        assert no_lock_file.returncode == 2 and "incomplete" not in no_lock_file.stderr
        assert "nope.lock is missing; the device exports it with" in no_lock_file.stderr, no_lock_file.stderr
        sealed = cli(
            "protect",
            str(tmp_path / "mlp.onnx"),
            "-o",
            str(tmp_path / "s.mcb"),
            "--key-file",
            str(tmp_path / "host.key"),
        )
        assert sealed.returncode == 0, sealed.stderr
        unlocked = cli(
            "run", "--allow-unsigned",
            str(tmp_path / "s.mcb"), str(tmp_path / "x.npy"), "--key-file", str(tmp_path / "host.key"),
            "--device-state", str(tmp_path / "dev-a"),
        )  # fmt: skip
        assert unlocked.returncode == 2 and "is not locked to a device; drop --device-state" in unlocked.stderr
    finally:
        first.stop()
        second.stop()


def test_malformed_lock_parameters_give_one_clear_error(world, monkeypatch):
    """An unlock failure must surface as its own message, not as a buffer that cannot be unmapped."""
    folder, host, a, _ = world
    bundle = folder / "params.mcb"
    protect(make_mlp(), bundle, key=host, scheme="lock", lock=LockOptions([a.owner_handle()], "uniform-shift"))
    from modelcloak.lock import layout

    real = layout.unlock_into

    def shifted(codes, params, key, salt, weights):
        params["layout"][0][3] += 8  # the first tensor's codes now run past their place
        params["layout"][0][4] += 10**6
        return real(codes, params, key, salt, weights)

    monkeypatch.setattr(layout, "unlock_into", shifted)
    with pytest.raises(SessionError, match="cannot unlock the weights: locked tensor .* does not fit"):
        load(bundle, key=host, device_key=a.key)
