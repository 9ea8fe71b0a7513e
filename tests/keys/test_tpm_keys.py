"""Device-bound lock keys against a real software TPM (swtpm), and the software-only fallback.

Every TPM test talks to its own swtpm process over loopback: enrolment seals a secret in it, and
the refusals (another TPM, a cleared TPM, a changed PCR) are the TPM's own, not a flag of ours.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import swtpm
from swtpm import StartTpm  # noqa: E402 - fixtures start_tpm and tpm live in conftest.py

from modelcloak.hygiene import SecureBuffer
from modelcloak.keys import KeyProviderError
from modelcloak.keys.device import (
    DeviceLockKey,
    SoftwareDeviceKey,
    enroll_software_device,
    load_identity,
    write_lock_key_file,
)
from modelcloak.lock import ks_distance, lock_weights, unlock_weights


def raw(buffer: SecureBuffer) -> bytes:
    return bytes(buffer.view())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def tpm_api():
    from modelcloak.keys import tpm as tpm_module

    return tpm_module


# --------------------------------------------------------------------------------------------
# Enrolment and stable keys
# --------------------------------------------------------------------------------------------


def test_enrol_saves_private_state_and_derives_the_same_key_twice(tpm: swtpm.SwTpm, tmp_path: Path) -> None:
    t = tpm_api()
    state = tmp_path / "device"
    identity = t.enroll_device(state, tcti=tpm.tcti)

    assert identity.kind == "tpm"
    assert len(identity.device_id) == 64 and identity.fingerprint.startswith("tpm:")
    assert mode(state) == 0o700
    assert sorted(p.name for p in state.iterdir()) == ["device.json", "sealed.priv", "sealed.pub"]
    assert all(mode(p) == 0o600 for p in state.iterdir())
    assert load_identity(state) == identity

    provider = t.TpmDeviceKey(state, tcti=tpm.tcti)
    key, spec = provider.new_key()
    assert spec["provider"] == "device-lock" and spec["device"] == identity.fingerprint
    first, second = provider.key_for(spec), t.TpmDeviceKey(state, tcti=tpm.tcti).key_for(spec)
    assert raw(first) == raw(second) == raw(key)
    assert len(raw(key)) == 32

    other_key, other_spec = provider.new_key()  # a new salt: a new model key
    assert raw(other_key) != raw(key)
    # The state on disk holds no key material: neither the secret nor the derived key appears in it.
    blobs = b"".join(p.read_bytes() for p in state.iterdir())
    assert raw(key) not in blobs and raw(key).hex().encode() not in blobs


def test_the_same_tpm_after_a_restart_still_unseals(start_tpm: StartTpm, tmp_path: Path) -> None:
    t = tpm_api()
    tpm_state = tmp_path / "tpm-a"
    first = start_tpm(tpm_state)
    identity = t.enroll_device(tmp_path / "device", tcti=first.tcti)
    key, spec = t.TpmDeviceKey(tmp_path / "device", tcti=first.tcti).new_key()
    first.stop()

    rebooted = start_tpm(tpm_state)  # same TPM state (owner seed), new process and port
    again = t.TpmDeviceKey(tmp_path / "device", tcti=rebooted.tcti).key_for(spec)
    assert raw(again) == raw(key)
    assert load_identity(tmp_path / "device").device_id == identity.device_id


def test_another_tpm_cannot_unseal_the_first_ones_blobs(
    start_tpm: StartTpm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = tpm_api()
    a = start_tpm(tmp_path / "tpm-a")
    b = start_tpm(tmp_path / "tpm-b")
    t.enroll_device(tmp_path / "device", tcti=a.tcti)
    _, spec = t.TpmDeviceKey(tmp_path / "device", tcti=a.tcti).new_key()

    on_b = t.TpmDeviceKey(tmp_path / "device", tcti=b.tcti)
    with pytest.raises(KeyProviderError, match="is not the one .* was enrolled on, or it has been cleared"):
        on_b.key_for(spec)

    # Take our own storage-key comparison out of the way: the TPM itself must refuse the blob.
    enrolled_id = load_identity(tmp_path / "device").device_id
    monkeypatch.setattr(t, "_device_id", lambda public: enrolled_id)
    loads: list[str] = []
    real_esapi = t.esapi

    def spying_esapi(tcti: str):
        context = real_esapi(tcti)

        class Spy:
            def __enter__(self):
                ectx = context.__enter__()
                original = ectx.load

                def load(*args, **kwargs):
                    loads.append("attempted")
                    return original(*args, **kwargs)

                ectx.load = load
                return ectx

            def __exit__(self, *exc):
                return context.__exit__(*exc)

        return Spy()

    monkeypatch.setattr(t, "esapi", spying_esapi)
    # With the comparison off, the code cannot tell another TPM from a damaged blob; the refusal
    # (what this part checks) is the other TPM's TPM2_Load failing the blob's integrity check.
    with pytest.raises(KeyProviderError, match="fails the TPM's integrity check"):
        on_b.key_for(spec)
    assert loads == ["attempted"], "the refusal must come from TPM2_Load on the other TPM"


def test_a_cleared_tpm_refuses(start_tpm: StartTpm, tmp_path: Path) -> None:
    t = tpm_api()
    a = start_tpm(tmp_path / "tpm-a")
    t.enroll_device(tmp_path / "device", tcti=a.tcti)
    _, spec = t.TpmDeviceKey(tmp_path / "device", tcti=a.tcti).new_key()

    swtpm.clear_tpm(a.tcti)  # TPM2_Clear: a new owner seed, so a new storage primary key
    with pytest.raises(KeyProviderError, match="cleared since"):
        t.TpmDeviceKey(tmp_path / "device", tcti=a.tcti).key_for(spec)

    # A TPM reset to factory state (swtpm restarted on an empty state directory) likewise.
    a.stop()
    fresh = start_tpm(tmp_path / "tpm-a-reset")
    with pytest.raises(KeyProviderError, match="cleared since"):
        t.TpmDeviceKey(tmp_path / "device", tcti=fresh.tcti).key_for(spec)


def _count_tpm_calls(monkeypatch: pytest.MonkeyPatch, t, *names: str) -> dict[str, int]:
    """Count the ESAPI calls named in `names` on every TPM connection the module opens from now on."""
    calls = {name: 0 for name in names}
    real_esapi = t.esapi

    class Counting:
        def __init__(self, tcti: str) -> None:
            self.context = real_esapi(tcti)

        def __enter__(self):
            ectx = self.context.__enter__()
            for name in names:
                original = getattr(ectx, name)

                def counted(*args, _name=name, _original=original, **kwargs):
                    calls[_name] += 1
                    return _original(*args, **kwargs)

                setattr(ectx, name, counted)
            return ectx

        def __exit__(self, *exc):
            return self.context.__exit__(*exc)

    monkeypatch.setattr(t, "esapi", Counting)
    return calls


def _count_direct_commands(monkeypatch: pytest.MonkeyPatch, *names: str) -> dict[str, int]:
    """Count the commands named in `names` that the direct unseal path (keys.tpm_direct) sends."""
    from modelcloak.keys import tpm_direct

    calls = {name: 0 for name in names}
    for name in names:
        original = getattr(tpm_direct.TpmConnection, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(tpm_direct.TpmConnection, name, counted)
    return calls


def test_later_unseals_reuse_saved_objects_and_still_refuse_a_cleared_tpm(
    start_tpm: StartTpm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = tpm_api()
    a = start_tpm(tmp_path / "tpm-a")
    t.enroll_device(tmp_path / "device", tcti=a.tcti)
    calls = _count_direct_commands(monkeypatch, "create_primary", "load", "context_load", "unseal")
    esys = _count_tpm_calls(monkeypatch, t, "create_primary", "unseal")
    provider = t.TpmDeviceKey(tmp_path / "device", tcti=a.tcti)
    key, spec = provider.new_key()
    assert calls == {"create_primary": 1, "load": 1, "context_load": 0, "unseal": 1}

    # A second load in this process: the TPM reloads its own saved contexts, and still unseals.
    assert raw(provider.key_for(spec)) == raw(key)
    assert calls == {"create_primary": 1, "load": 1, "context_load": 2, "unseal": 2}
    assert esys == {"create_primary": 0, "unseal": 0}, "a load that succeeds needs no ESAPI"

    # After TPM2_Clear the TPM refuses the saved contexts and the re-created storage key is not the
    # enrolled one; the ESAPI full path then names the cause.
    swtpm.clear_tpm(a.tcti)
    with pytest.raises(KeyProviderError, match="cleared since"):
        provider.key_for(spec)
    assert calls["context_load"] == 3 and calls["create_primary"] == 2 and calls["unseal"] == 2
    assert esys["create_primary"] == 1


def test_saved_objects_are_refused_by_another_tpm_and_follow_the_files(
    start_tpm: StartTpm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = tpm_api()
    a = start_tpm(tmp_path / "tpm-a")
    b = start_tpm(tmp_path / "tpm-b")
    t.enroll_device(tmp_path / "device", tcti=a.tcti)
    provider = t.TpmDeviceKey(tmp_path / "device", tcti=a.tcti)
    key, spec = provider.new_key()
    calls = _count_direct_commands(monkeypatch, "context_load", "create_primary", "unseal")

    # The same provider, pointed at another TPM: B's TPM2_ContextLoad refuses A's contexts.
    provider.tcti = b.tcti
    with pytest.raises(KeyProviderError, match="is not the one .* was enrolled on"):
        provider.key_for(spec)
    assert calls == {"context_load": 1, "create_primary": 1, "unseal": 0}

    # Back on A (after a fresh first unseal), a sealed.priv altered on disk is not hidden by the contexts.
    provider.tcti = a.tcti
    assert raw(provider.key_for(spec)) == raw(key)
    private = tmp_path / "device" / "sealed.priv"
    blob = bytearray(private.read_bytes())
    blob[-5] ^= 0x01
    private.write_bytes(bytes(blob))
    with pytest.raises(KeyProviderError, match="refuses sealed.priv"):
        provider.key_for(spec)


# --------------------------------------------------------------------------------------------
# PCR binding
# --------------------------------------------------------------------------------------------


def test_pcr_bound_secret_is_refused_after_a_bound_pcr_changes(start_tpm: StartTpm, tmp_path: Path) -> None:
    t = tpm_api()
    tpm_state = tmp_path / "tpm-a"
    tpm = start_tpm(tpm_state)
    identity = t.enroll_device(tmp_path / "device", tcti=tpm.tcti, pcrs=[0, 7])
    assert identity.pcrs == (0, 7) and identity.pcr_bank == "sha256"
    provider = t.TpmDeviceKey(tmp_path / "device", tcti=tpm.tcti)
    key, spec = provider.new_key()

    # Negative control: a PCR outside the policy can change freely.
    swtpm.extend_pcr(tpm.tcti, 8)
    assert raw(provider.key_for(spec)) == raw(key)

    swtpm.extend_pcr(tpm.tcti, 7)  # e.g. a different Secure Boot state was measured
    with pytest.raises(KeyProviderError, match=r"refused to unseal the device secret: PCR 7 changed since enrolment"):
        provider.key_for(spec)

    # A reboot into the enrolled state (swtpm restart resets the PCRs) unseals again.
    tpm.stop()
    rebooted = start_tpm(tpm_state)
    assert raw(t.TpmDeviceKey(tmp_path / "device", tcti=rebooted.tcti).key_for(spec)) == raw(key)


def test_unbound_enrolment_ignores_pcr_changes(tpm: swtpm.SwTpm, tmp_path: Path) -> None:
    t = tpm_api()
    t.enroll_device(tmp_path / "device", tcti=tpm.tcti)
    provider = t.TpmDeviceKey(tmp_path / "device", tcti=tpm.tcti)
    key, spec = provider.new_key()
    swtpm.extend_pcr(tpm.tcti, 0)
    swtpm.extend_pcr(tpm.tcti, 7)
    assert raw(provider.key_for(spec)) == raw(key)


def test_invalid_pcr_indices_are_refused(tpm: swtpm.SwTpm, tmp_path: Path) -> None:
    with pytest.raises(KeyProviderError, match="PCR indices must be 0..23"):
        tpm_api().enroll_device(tmp_path / "device", tcti=tpm.tcti, pcrs=[7, 24])


# --------------------------------------------------------------------------------------------
# Clear errors for the everyday failures
# --------------------------------------------------------------------------------------------


def test_no_tpm_reachable_names_the_tcti(tmp_path: Path, tpm: swtpm.SwTpm) -> None:
    t = tpm_api()
    t.enroll_device(tmp_path / "device", tcti=tpm.tcti)
    _, spec = t.TpmDeviceKey(tmp_path / "device", tcti=tpm.tcti).new_key()
    dead = tpm.tcti
    tpm.stop()
    with pytest.raises(KeyProviderError, match=f"no TPM reachable through TCTI '{dead}'"):
        t.TpmDeviceKey(tmp_path / "device", tcti=dead).key_for(spec)
    with pytest.raises(KeyProviderError, match="no TPM reachable through TCTI 'device:/nonexistent/tpmrm9'"):
        t.enroll_device(tmp_path / "other", tcti="device:/nonexistent/tpmrm9")
    assert not (tmp_path / "other" / "device.json").exists()


def test_missing_or_unenrolled_state_dir(tmp_path: Path) -> None:
    t = tpm_api()  # reading the state needs no TPM and no tpm2-pytss
    with pytest.raises(KeyProviderError, match="does not exist; enroll this device first"):
        t.TpmDeviceKey(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KeyProviderError, match="holds no enrolment"):
        t.TpmDeviceKey(tmp_path / "empty")


def test_a_bundle_locked_to_another_device_or_enrolment_is_refused(tpm: swtpm.SwTpm, tmp_path: Path) -> None:
    t = tpm_api()
    t.enroll_device(tmp_path / "one", tcti=tpm.tcti)
    t.enroll_device(tmp_path / "two", tcti=tpm.tcti)
    _, spec = t.TpmDeviceKey(tmp_path / "one", tcti=tpm.tcti).new_key()
    with pytest.raises(KeyProviderError, match="this bundle is locked to device tpm:.*, and this device is tpm:"):
        t.TpmDeviceKey(tmp_path / "two", tcti=tpm.tcti).key_for(spec)

    # Re-enrolling is refused unless forced; forced, the old models fail loudly (new fingerprint).
    with pytest.raises(KeyProviderError, match="already holds an enrolled device"):
        t.enroll_device(tmp_path / "one", tcti=tpm.tcti)
    t.enroll_device(tmp_path / "one", tcti=tpm.tcti, force=True)
    with pytest.raises(KeyProviderError, match="this bundle is locked to device"):
        t.TpmDeviceKey(tmp_path / "one", tcti=tpm.tcti).key_for(spec)


def test_tampered_sealed_blob_is_refused(tpm: swtpm.SwTpm, tmp_path: Path) -> None:
    t = tpm_api()
    t.enroll_device(tmp_path / "device", tcti=tpm.tcti)
    _, spec = t.TpmDeviceKey(tmp_path / "device", tcti=tpm.tcti).new_key()
    private = tmp_path / "device" / "sealed.priv"
    blob = bytearray(private.read_bytes())
    blob[-5] ^= 0x01
    private.write_bytes(bytes(blob))
    with pytest.raises(KeyProviderError, match="is the one .* enrolled on, but it refuses sealed.priv") as refused:
        t.TpmDeviceKey(tmp_path / "device", tcti=tpm.tcti).key_for(spec)
    assert "cleared" not in str(refused.value)  # the TPM is the right one; the file is what is wrong


def test_a_file_or_a_damaged_record_where_the_state_belongs(tmp_path: Path) -> None:
    from modelcloak.keys.enrolled import open_device_key

    t = tpm_api()
    lock_file = tmp_path / "device.lock"
    lock_file.write_text(json.dumps({"fingerprint": "tpm:0000", "lock_key": "00" * 32}))
    with pytest.raises(KeyProviderError, match="is an exported device lock key file .*, not a device state directory"):
        open_device_key(lock_file)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(KeyProviderError, match="notes.txt is a file, not a device state directory; --device-state"):
        t.TpmDeviceKey(tmp_path / "notes.txt")
    state = tmp_path / "state"
    state.mkdir()
    (state / "device.json").write_text(json.dumps({"version": 1}))
    with pytest.raises(KeyProviderError, match="lacks kind, device_id, fingerprint: the enrolment record is damaged"):
        open_device_key(state)
    (state / "device.json").write_text(json.dumps({"version": 1, "kind": "hsm", "device_id": "x", "fingerprint": "y"}))
    with pytest.raises(KeyProviderError, match="of kind 'hsm'; this version knows tpm, software"):
        open_device_key(state)
    with pytest.raises(KeyProviderError, match="nope.lock is missing; the device exports it with"):
        DeviceLockKey.from_file(tmp_path / "nope.lock")


def test_the_tcti_recorded_at_enrolment_is_used(tpm: swtpm.SwTpm, tmp_path: Path, monkeypatch) -> None:
    t = tpm_api()
    monkeypatch.delenv("TPM2TOOLS_TCTI", raising=False)
    monkeypatch.delenv("TSS2_TCTI", raising=False)
    t.enroll_device(tmp_path / "device", tcti=tpm.tcti)
    key, spec = t.TpmDeviceKey(tmp_path / "device", tcti=tpm.tcti).new_key()
    recorded = t.TpmDeviceKey(tmp_path / "device")
    assert recorded.tcti == tpm.tcti
    assert raw(recorded.key_for(spec)) == raw(key)
    # The environment still overrides the record (control: a TCTI nothing answers on fails).
    monkeypatch.setenv("TSS2_TCTI", "device:/nonexistent/tpmrm9")
    with pytest.raises(KeyProviderError, match="no TPM reachable through TCTI 'device:/nonexistent/tpmrm9'"):
        t.TpmDeviceKey(tmp_path / "device").key_for(spec)


def test_default_tcti_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    from modelcloak.keys.tpm import DEFAULT_TCTI, default_tcti

    monkeypatch.delenv("TPM2TOOLS_TCTI", raising=False)
    monkeypatch.delenv("TSS2_TCTI", raising=False)
    assert default_tcti() == DEFAULT_TCTI == "device:/dev/tpmrm0"
    monkeypatch.setenv("TSS2_TCTI", "swtpm:port=1")
    assert default_tcti() == "swtpm:port=1"
    monkeypatch.setenv("TPM2TOOLS_TCTI", "mssim:port=2")
    assert default_tcti() == "mssim:port=2"


# --------------------------------------------------------------------------------------------
# The owner's side: the exported lock key
# --------------------------------------------------------------------------------------------


def test_owner_locks_with_the_exported_key_and_the_device_unlocks(tpm: swtpm.SwTpm, tmp_path: Path) -> None:
    t = tpm_api()
    identity = t.enroll_device(tmp_path / "device", tcti=tpm.tcti, pcrs=[7])
    device = t.TpmDeviceKey(tmp_path / "device", tcti=tpm.tcti)
    root = device.export_lock_key()
    with pytest.raises(KeyProviderError, match="already exported"):
        device.export_lock_key()
    assert raw(device.export_lock_key(again=True)) == raw(root)

    key_path = write_lock_key_file(tmp_path / "owner" / "device.lockkey", root, identity)
    assert mode(key_path) == 0o600
    owner = DeviceLockKey.from_file(key_path)
    owner_key, spec = owner.new_key()
    assert raw(device.key_for(spec)) == raw(owner_key)

    # End to end with the weight lock: the owner locks, the device unlocks bit-exactly.
    rng = np.random.default_rng(0)
    weights = {"w": (rng.standard_normal((256, 128)) * 0.05).astype(np.float32)}
    salt = os.urandom(16)
    locked, params = lock_weights(weights, owner_key.view(), salt)
    device_key = device.key_for(spec)  # keep the buffer alive: closing it wipes the key (and its views)
    unlocked = unlock_weights(locked, device_key.view(), salt, params)
    assert unlocked["w"].tobytes() == weights["w"].tobytes()

    os.chmod(key_path, 0o644)
    with pytest.raises(KeyProviderError, match="readable by other users"):
        DeviceLockKey.from_file(key_path)


def test_a_copied_state_dir_on_another_tpm_gives_nothing_to_unlock_with(start_tpm: StartTpm, tmp_path: Path) -> None:
    """The scenario the lock is for: the bundle and the device's state copied to other hardware."""
    t = tpm_api()
    a = start_tpm(tmp_path / "tpm-a")
    b = start_tpm(tmp_path / "tpm-b")
    t.enroll_device(tmp_path / "device", tcti=a.tcti)
    key, spec = t.TpmDeviceKey(tmp_path / "device", tcti=a.tcti).new_key()
    copy = tmp_path / "copied-device"
    copy.mkdir(mode=0o700)
    for item in (tmp_path / "device").iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
        os.chmod(copy / item.name, 0o600)
    with pytest.raises(KeyProviderError, match="cleared since"):
        t.TpmDeviceKey(copy, tcti=b.tcti).key_for(spec)
    assert raw(t.TpmDeviceKey(copy, tcti=a.tcti).key_for(spec)) == raw(key)  # the state itself is intact


# --------------------------------------------------------------------------------------------
# Software-only fallback
# --------------------------------------------------------------------------------------------


def fake_machine(root: Path, machine_id: str, cpu: str = "Example CPU 1234", board: str = "Board X") -> Path:
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "machine-id").write_text(machine_id + "\n")
    (root / "proc").mkdir(exist_ok=True)
    (root / "proc" / "cpuinfo").write_text(
        f"processor\t: 0\nvendor_id\t: GenuineExample\ncpu family\t: 6\nmodel\t\t: 85\nmodel name\t: {cpu}\n"
        "cpu MHz\t\t: 2100.000\n\nprocessor\t: 1\nvendor_id\t: GenuineExample\ncpu MHz\t\t: 2400.000\n"
    )
    dmi = root / "sys" / "class" / "dmi" / "id"
    dmi.mkdir(parents=True, exist_ok=True)
    (dmi / "board_name").write_text(board + "\n")
    return root


def test_software_device_key_is_stable_and_its_secret_file_is_0600(tmp_path: Path) -> None:
    machine = fake_machine(tmp_path / "machine-a", "0123456789abcdef0123456789abcdef")
    identity = enroll_software_device(tmp_path / "device", identity_root=machine)
    assert identity.kind == "software" and identity.fingerprint.startswith("sw:")
    secret_file = tmp_path / "device" / "device.secret"
    assert mode(secret_file) == 0o600 and mode(tmp_path / "device" / "device.json") == 0o600
    assert mode(tmp_path / "device") == 0o700

    provider = SoftwareDeviceKey(tmp_path / "device", identity_root=machine)
    key, spec = provider.new_key()
    assert raw(provider.key_for(spec)) == raw(key)
    # cpu MHz varies per core and per second; it must not be part of the identity.
    (machine / "proc" / "cpuinfo").write_text((machine / "proc" / "cpuinfo").read_text().replace("2100.000", "800.0"))
    assert raw(SoftwareDeviceKey(tmp_path / "device", identity_root=machine).key_for(spec)) == raw(key)

    recorded = json.loads((tmp_path / "device" / "device.json").read_text())
    assert "0123456789abcdef0123456789abcdef" not in json.dumps(recorded)  # digests, not identifiers

    os.chmod(secret_file, 0o640)
    with pytest.raises(KeyProviderError, match="readable by other users"):
        provider.key_for(spec)


def test_software_device_key_refuses_another_machine(tmp_path: Path) -> None:
    machine = fake_machine(tmp_path / "machine-a", "0123456789abcdef0123456789abcdef")
    enroll_software_device(tmp_path / "device", identity_root=machine)
    _, spec = SoftwareDeviceKey(tmp_path / "device", identity_root=machine).new_key()

    other = fake_machine(tmp_path / "machine-b", "fedcba9876543210fedcba9876543210")
    with pytest.raises(KeyProviderError, match=r"identifiers differ from enrolment \(machine-id differs\)"):
        SoftwareDeviceKey(tmp_path / "device", identity_root=other).key_for(spec)

    new_board = fake_machine(tmp_path / "machine-c", "0123456789abcdef0123456789abcdef", board="Board Y")
    with pytest.raises(KeyProviderError, match="dmi-board-name differs"):
        SoftwareDeviceKey(tmp_path / "device", identity_root=new_board).key_for(spec)


def test_software_device_key_weakness_is_real(tmp_path: Path) -> None:
    """Documented weakness, shown: copy the state and spoof the identifiers, and the key follows."""
    machine = fake_machine(tmp_path / "machine-a", "0123456789abcdef0123456789abcdef")
    enroll_software_device(tmp_path / "device", identity_root=machine)
    key, spec = SoftwareDeviceKey(tmp_path / "device", identity_root=machine).new_key()
    spoofed = fake_machine(tmp_path / "attacker", "0123456789abcdef0123456789abcdef")
    assert raw(SoftwareDeviceKey(tmp_path / "device", identity_root=spoofed).key_for(spec)) == raw(key)


def test_software_device_on_this_machine(tmp_path: Path) -> None:
    if not Path("/etc/machine-id").exists():
        pytest.skip("this machine has no /etc/machine-id")
    identity = enroll_software_device(tmp_path / "device")
    provider = SoftwareDeviceKey(tmp_path / "device")
    key, spec = provider.new_key()
    assert raw(provider.key_for(spec)) == raw(key)
    assert spec["device"] == identity.fingerprint


def test_software_wrong_key_yields_plausible_weights(tmp_path: Path) -> None:
    """Two enrolments (two devices) lock the same weights differently; neither unlocks the other's."""
    machine = fake_machine(tmp_path / "machine-a", "0123456789abcdef0123456789abcdef")
    enroll_software_device(tmp_path / "one", identity_root=machine)
    enroll_software_device(tmp_path / "two", identity_root=machine)
    key_one, _ = SoftwareDeviceKey(tmp_path / "one", identity_root=machine).new_key()
    key_two, _ = SoftwareDeviceKey(tmp_path / "two", identity_root=machine).new_key()
    rng = np.random.default_rng(1)
    weights = {"w": (rng.standard_normal(50_000) * 0.02).astype(np.float32)}
    salt = os.urandom(16)
    locked, params = lock_weights(weights, key_one.view(), salt)
    wrong = unlock_weights(locked, key_two.view(), salt, params)["w"]
    assert np.isfinite(wrong).all() and wrong.dtype == np.float32
    assert ks_distance(wrong, weights["w"]) < 0.03
    assert abs(np.corrcoef(wrong, weights["w"])[0, 1]) < 0.05
