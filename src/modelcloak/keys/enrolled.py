"""Open this device's key from its enrolment directory, whichever source enrolled it.

Its own module because it is the one place that knows both sources: `device` (shared machinery and
the software source) and `tpm` (the TPM source, built on `device`) never import each other back.
"""

from __future__ import annotations

from pathlib import Path

from modelcloak.keys.device import DeviceKeyBase, SoftwareDeviceKey, read_state
from modelcloak.keys.errors import KeyProviderError
from modelcloak.keys.tpm import TpmDeviceKey

__all__ = ["open_device_key"]


def open_device_key(state_dir: str | Path, *, tcti: str | None = None) -> DeviceKeyBase:
    """The device key of an enrolled state directory, TPM or software as recorded at enrolment."""
    kind = read_state(Path(state_dir)).get("kind")
    if kind == "tpm":
        return TpmDeviceKey(state_dir, tcti=tcti)
    if kind == "software":
        return SoftwareDeviceKey(state_dir)
    raise KeyProviderError(f"{state_dir} holds an enrolment of unknown kind {kind!r}")
