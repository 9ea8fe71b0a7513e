"""The direct per-load unseal (modelcloak.keys.tpm_direct) against a real swtpm.

The direct path does the session crypto itself (ECDH salt, KDFa/KDFe, HMAC, AES-CFB), so these
tests check what a mistake there would break: it must unseal the secret ESAPI unseals, the secret
must not cross the wire in clear, an altered response must be refused (and, as the control shows,
would otherwise give a wrong secret silently), and the TPM's own PCR policy must refuse it.
Refusals by another or a cleared TPM, and changed sealed files, are in test_tpm_keys.py (they start
on this path and end with ESAPI's message).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import swtpm
from swtpm import StartTpm  # noqa: E402 - fixtures start_tpm and tpm live in conftest.py

from modelcloak.keys import KeyProviderError

UNSEAL = 0x15E
LOAD = 0x157
# In a TPM2_Load response: header (10), objectHandle (4), parameterSize (4), name.size (2), name.
LOAD_NAME_BYTE = 30
# Offsets in a TPM2_Unseal response for a 32-byte secret: header (10), parameterSize (4),
# outData.size (2), the encrypted secret (32), nonceTPM (2 + 32), attributes (1), HMAC (2 + 32).
CIPHERTEXT_BYTE = 20
NONCE_BYTE = 60
ATTRIBUTE_BYTE = 82
HMAC_BYTE = 100


class RecordingTcti:
    """A TCTI that records every exchange and flips one byte of one command's response when asked."""

    def __init__(self, inner: Any, flip_at: int | None, flip_in: int = UNSEAL) -> None:
        self.inner = inner
        self.flip_at = flip_at
        self.flip_in = flip_in
        self.command_code = 0
        self.wire: list[bytes] = []

    def __enter__(self) -> RecordingTcti:
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.close()

    def transmit(self, command: bytes) -> None:
        self.command_code = int.from_bytes(command[6:10], "big")
        self.wire.append(command)
        self.inner.transmit(command)

    def receive(self, size: int = 4096, timeout: int = -1) -> bytes:
        response = bytearray(self.inner.receive(size, timeout))
        if self.command_code == self.flip_in and self.flip_at is not None:
            response[self.flip_at] ^= 0x01
        self.wire.append(bytes(response))
        return bytes(response)


def tpm_api():
    from modelcloak.keys import tpm as tpm_module

    return tpm_module


def enrolled(tpm: swtpm.SwTpm, tmp_path: Path, pcrs: list[int] | None = None) -> tuple[Any, tuple[bytes, bytes]]:
    t = tpm_api()
    t.enroll_device(tmp_path / "device", tcti=tpm.tcti, pcrs=pcrs)
    provider = t.TpmDeviceKey(tmp_path / "device", tcti=tpm.tcti)
    blobs = ((tmp_path / "device" / "sealed.pub").read_bytes(), (tmp_path / "device" / "sealed.priv").read_bytes())
    return provider, blobs


def record_wire(
    monkeypatch: pytest.MonkeyPatch, flip_at: int | None = None, flip_in: int = UNSEAL
) -> list[RecordingTcti]:
    t = tpm_api()
    opened: list[RecordingTcti] = []
    real_open = t._open_tcti

    def recording(tss: Any, tcti: str) -> RecordingTcti:
        opened.append(RecordingTcti(real_open(tss, tcti), flip_at, flip_in))
        return opened[-1]

    monkeypatch.setattr(t, "_open_tcti", recording)
    return opened


@pytest.mark.parametrize("pcrs", [None, [0, 7]], ids=["hmac-session", "pcr-policy"])
def test_direct_unseal_gives_the_esys_secret_and_keeps_it_off_the_wire(
    tpm: swtpm.SwTpm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pcrs: list[int] | None
) -> None:
    t = tpm_api()
    provider, blobs = enrolled(tpm, tmp_path, pcrs)
    tss = t.pytss()
    by_esys = provider._unseal_esys(tss, blobs)
    opened = record_wire(monkeypatch)

    first = provider._unseal_direct(tss, blobs)  # CreatePrimary, Load, ContextSave
    second = provider._unseal_direct(tss, blobs)  # the saved contexts
    assert first == by_esys and second == by_esys and len(by_esys) == 32
    assert len(opened) == 2

    unseal_responses = [
        response
        for tcti in opened
        for command, response in zip(tcti.wire[::2], tcti.wire[1::2], strict=True)
        if int.from_bytes(command[6:10], "big") == UNSEAL
    ]
    assert len(unseal_responses) == 2 and all(len(r) == 117 for r in unseal_responses)
    everything = b"".join(b for tcti in opened for b in tcti.wire)
    assert bytes(by_esys) not in everything, "the sealed secret crossed the wire in clear"


@pytest.mark.parametrize("flip_at", [CIPHERTEXT_BYTE, NONCE_BYTE, ATTRIBUTE_BYTE, HMAC_BYTE])
def test_an_altered_unseal_response_is_refused(
    tpm: swtpm.SwTpm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flip_at: int
) -> None:
    provider, blobs = enrolled(tpm, tmp_path)
    key, spec = provider.new_key()
    esys_unseals: list[int] = []
    real_esys = provider._unseal_esys
    monkeypatch.setattr(provider, "_unseal_esys", lambda *a: esys_unseals.append(1) or real_esys(*a))
    record_wire(monkeypatch, flip_at)

    with pytest.raises(KeyProviderError, match="fails its HMAC"):
        provider.key_for(spec)
    assert esys_unseals == [], "an altered response must be refused, not retried through ESAPI"


def test_a_load_response_naming_another_object_is_refused(
    tpm: swtpm.SwTpm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = tpm_api()
    provider, blobs = enrolled(tpm, tmp_path)
    with monkeypatch.context() as control:  # the same flip aimed at no command: the path works
        record_wire(control, LOAD_NAME_BYTE, 0)
        assert len(provider._unseal_direct(t.pytss(), blobs)) == 32
    provider._saved = None  # so the next load sends TPM2_Load again
    esys_unseals: list[int] = []
    monkeypatch.setattr(provider, "_unseal_esys", lambda *a: esys_unseals.append(1))
    record_wire(monkeypatch, LOAD_NAME_BYTE, LOAD)
    with pytest.raises(KeyProviderError, match="names another object than sealed.pub"):
        provider._open_secret()
    assert esys_unseals == [], "refused outright, not retried through ESAPI"


def test_control_without_the_hmac_check_a_flipped_ciphertext_gives_a_wrong_secret(
    tpm: swtpm.SwTpm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Negative control for the test above: the flip reaches the decryption, and only the HMAC stops it."""
    from modelcloak.keys import tpm_direct

    t = tpm_api()
    provider, blobs = enrolled(tpm, tmp_path)
    right = provider._unseal_direct(t.pytss(), blobs)
    record_wire(monkeypatch, CIPHERTEXT_BYTE)
    monkeypatch.setattr(tpm_direct.hmac, "compare_digest", lambda a, b: True)
    wrong = provider._unseal_direct(t.pytss(), blobs)
    assert len(wrong) == 32 and wrong != right


def test_the_tpm_refuses_the_direct_policy_session_after_a_bound_pcr_moves(start_tpm: StartTpm, tmp_path: Path) -> None:
    from modelcloak.keys import tpm_direct

    t = tpm_api()
    tpm = start_tpm(tmp_path / "tpm-a")
    provider, blobs = enrolled(tpm, tmp_path, [7])
    tss = t.pytss()
    provider._unseal_direct(tss, blobs)  # control: unseals while PCR 7 is as enrolled
    swtpm.extend_pcr(tpm.tcti, 8)  # outside the policy
    provider._unseal_direct(tss, blobs)

    swtpm.extend_pcr(tpm.tcti, 7)
    with pytest.raises(tpm_direct.TpmCommandError) as refused:
        provider._unseal_direct(tss, blobs)  # the saved contexts load; the TPM refuses the Unseal
    assert refused.value.command == UNSEAL
    with pytest.raises(KeyProviderError, match="PCR 7 changed since enrolment"):
        provider._open_secret()  # the caller's message comes from the ESAPI path


def test_direct_false_runs_esapi_only_and_derives_the_same_key(
    tpm: swtpm.SwTpm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = tpm_api()
    provider, _ = enrolled(tpm, tmp_path)
    key, spec = provider.new_key()
    opened = record_wire(monkeypatch)  # the direct path's connections
    esapi_only = t.TpmDeviceKey(tmp_path / "device", tcti=tpm.tcti, direct=False)
    assert bytes(esapi_only.key_for(spec).view()) == bytes(key.view())
    assert opened == []
    assert bytes(provider.key_for(spec).view()) == bytes(key.view())  # control: the default opens one
    assert len(opened) == 1
