"""Bundle serials: the owner numbers releases so a device can refuse an older one (rollback).

A serial is a non-negative integer in the manifest. The manifest is covered by the header MAC
and by the owner signature, but the header MAC is keyed with the model key, which a `seal` device
holds: only the signature stops a key holder from rewriting the number. A device that requires a
minimum serial must therefore also pin the owner's signing key (docs/FORMAT.md).
"""

from __future__ import annotations

from typing import Any, TypeGuard

from modelcloak.bundle.errors import BundleError

__all__ = ["RollbackError", "check_serial", "serial_entry"]

SERIAL_FIELD = "serial"
_MAX_SERIAL = 2**53  # JSON readers beyond Python lose integer precision above this


class RollbackError(BundleError):
    """The bundle is older than the minimum serial this device requires, or has no serial."""


def _valid(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_SERIAL


def serial_entry(serial: int | None) -> dict[str, int]:
    """The manifest entry for `serial` ({} when None); refuses anything but 0..2**53."""
    if serial is None:
        return {}
    if not _valid(serial):
        raise BundleError(f"bundle serial must be an integer from 0 to {_MAX_SERIAL}, got {serial!r}")
    return {SERIAL_FIELD: serial}


def check_serial(document: dict[str, Any], min_serial: int | None, signer: str | None) -> None:
    """Refuse a bundle whose serial is below `min_serial`; `signer` is the verified signer or None."""
    if min_serial is None:
        return
    if not _valid(min_serial):
        raise BundleError(f"the minimum serial must be an integer from 0 to {_MAX_SERIAL}, got {min_serial!r}")
    if signer is None:
        raise RollbackError(
            "a minimum serial needs a pinned owner signature (--trusted-signer): "
            "without it anybody holding the model key could rewrite the number"
        )
    serial = document.get(SERIAL_FIELD)
    if not _valid(serial):
        raise RollbackError(f"the bundle has no serial, and this device requires serial {min_serial} or newer")
    if serial < min_serial:
        raise RollbackError(f"the bundle has serial {serial}, older than the {min_serial} this device requires")
