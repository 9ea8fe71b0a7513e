"""The device lock key is derived in a thread while the load decrypts (modelcloak.runtime.session).

A TPM unseal is a few round trips that mostly wait on the chip; the load asks for the key first
and decrypts the model key, graph and plain weights meanwhile. These tests pin that overlap (a
load that waited for the key before decrypting the graph fails the first test), the error path
(the device's refusal still reaches the caller) and the clean-up when the load fails first (the
thread is joined and its key wiped).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from models import make_mlp, reference_outputs

import modelcloak.keys.device as device_module
from modelcloak.bundle import Bundle
from modelcloak.inference import load
from modelcloak.keys import KeyProviderError, generate_key_file
from modelcloak.keys.device import DeviceLockKey, SoftwareDeviceKey, enroll_software_device, write_lock_key_file
from modelcloak.options import LockOptions
from modelcloak.protector import protect

# Only reached when the overlap is missing: the graph's decryption waits this long for the key
# derivation to start, then records that it never did.
PATIENCE_S = 20.0


class WatchedDevice:
    """A software device key that records which thread derived the key and when it started."""

    def __init__(self, inner: SoftwareDeviceKey) -> None:
        self.inner = inner
        self.identity = inner.identity
        self.entered = threading.Event()
        self.threads: list[str] = []

    def key_for(self, spec):  # the DeviceKeyBase call unwrap_lock_key makes
        self.threads.append(threading.current_thread().name)
        self.entered.set()
        return self.inner.key_for(spec)


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unlock-overlap")
    (folder / "machine" / "etc").mkdir(parents=True)
    (folder / "machine" / "etc" / "machine-id").write_text("c" * 32 + "\n")
    enroll_software_device(folder / "state", identity_root=folder / "machine")
    device = SoftwareDeviceKey(folder / "state", identity_root=folder / "machine")
    root = device.export_lock_key()
    try:
        lock_file = write_lock_key_file(folder / "device.lock", root, device.identity)
    finally:
        root.close()
    host = generate_key_file(folder / "host.key")
    model = make_mlp(seed=5)
    bundle = folder / "mlp.mcb"
    protect(model, bundle, key=host, scheme="lock", lock=LockOptions([DeviceLockKey.from_file(lock_file)], "sealed"))
    return folder, host, device, model, bundle


def test_the_device_key_is_derived_while_the_graph_is_decrypted(locked, monkeypatch):
    folder, host, device, model, bundle = locked
    watched = WatchedDevice(device)
    seen: list[bool] = []
    original = Bundle.decrypt_section_into

    def graph_waits_for_the_key(self: Bundle, name: str, key, out) -> None:
        if name == "graph":
            seen.append(watched.entered.wait(PATIENCE_S))
        original(self, name, key, out)

    monkeypatch.setattr(Bundle, "decrypt_section_into", graph_waits_for_the_key)
    x = np.random.default_rng(2).standard_normal((5, 16)).astype(np.float32)
    with load(bundle, key=host, device_key=watched) as session:
        outputs = next(iter(session.run({"x": x}).values()))
        waited = session.report.seconds.get("unlock_wait")
    assert seen == [True], "the graph was decrypted before the device key was asked for"
    assert waited is not None and waited >= 0.0
    assert watched.threads == ["modelcloak-device-key"]
    assert np.array_equal(outputs, reference_outputs(model, x))


def test_the_devices_refusal_reaches_the_caller(locked, tmp_path):
    folder, host, device, model, bundle = locked
    (tmp_path / "other" / "etc").mkdir(parents=True)
    (tmp_path / "other" / "etc" / "machine-id").write_text("d" * 32 + "\n")
    enroll_software_device(tmp_path / "state", identity_root=tmp_path / "other")
    other = SoftwareDeviceKey(tmp_path / "state", identity_root=tmp_path / "other")
    with pytest.raises(KeyProviderError, match=f"locked to {device.identity.fingerprint}; this device is"):
        load(bundle, key=host, device_key=other)
    assert not [t for t in threading.enumerate() if t.name == "modelcloak-device-key"]


def test_a_load_that_fails_first_joins_the_thread_and_wipes_the_key(locked, monkeypatch, tmp_path: Path):
    folder, host, device, model, bundle = locked
    made = []
    real = device_module.unwrap_lock_key

    def recording(entries, device_key):
        key = real(entries, device_key)
        made.append(key)
        return key

    monkeypatch.setattr(device_module, "unwrap_lock_key", recording)
    wrong_host = generate_key_file(tmp_path / "wrong.key")
    with pytest.raises(Exception, match="key"):
        load(bundle, key=wrong_host, device_key=device)
    assert not [t for t in threading.enumerate() if t.name == "modelcloak-device-key"]
    # The derivation may or may not have finished before the host key was refused; if it did,
    # its key was wiped, not left behind.
    assert all(key.closed for key in made)
