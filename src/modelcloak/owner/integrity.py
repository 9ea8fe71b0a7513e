"""Integrity tags on the rows that grant access: licences and devices (with their measurements and quotas).

Sealing keeps model keys out of a stolen database, but write access alone would otherwise be enough
to get one: extend a licence, lift its quota, point it at another model, add `allow_sim`, or swap a
device's measurements or identity, and the running server would release the real key. So each such
row carries an HMAC-SHA256 tag, keyed with a subkey of the master key (which never enters the
database), over every column that decides a release or a usage report. The backend recomputes it
whenever it reads a row to decide, and refuses the row when the tag does not match. Columns that
decide nothing (descriptions, creation times) are left out so the tag does not change needlessly.

Encoding: the tag covers `"modelcloak owner row v1" 0x00 || table 0x00 || JSON(fields)`, with the
JSON keys sorted, no spaces, times as integer microseconds since the Unix epoch (UTC).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.engine import Row

from modelcloak.licensing.protocol import RequestRefused
from modelcloak.owner.store import Device, Licence

ROW_TAG_LABEL = b"modelcloak owner row v1\x00"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_log = logging.getLogger("modelcloak.owner")


def _micros(value: datetime | None) -> int | None:
    return None if value is None else (value - _EPOCH) // timedelta(microseconds=1)


def licence_fields(licence: Any) -> dict[str, Any]:
    fields = {
        "id": licence.id,
        "model_id": licence.model_id,
        "device_id": licence.device_id,
        "customer": licence.customer,
        "max_instances": licence.max_instances,
        "expires_at": _micros(licence.expires_at),
        "query_quota": licence.query_quota,
        "queries_used": licence.queries_used,
        "revalidate_seconds": licence.revalidate_seconds,
        "offline_grace_seconds": licence.offline_grace_seconds,
        "allow_sim": bool(licence.allow_sim),
        "allow_debug": bool(licence.allow_debug),
        "expected_measurements": licence.expected_measurements,
        "sealed_usage_key": licence.sealed_usage_key.hex(),
        "revoked_at": _micros(licence.revoked_at),
        "revocation_reason": licence.revocation_reason,
    }
    # Covered only when set, so the tags of licences made before the column existed (revision 0005)
    # stay valid; setting, changing or clearing a pin by SQL changes the tag all the same.
    if licence.min_serial is not None:
        fields["min_serial"] = licence.min_serial
    return fields


def device_fields(device: Any) -> dict[str, Any]:
    return {
        "id": device.id,
        "verifier_kind": device.verifier_kind,
        "identity": device.identity,
        "expected_measurements": device.expected_measurements,
        "customer": device.customer,
    }


def _table_of(row: Any) -> str:
    if isinstance(row, Licence):
        return "licences"
    if isinstance(row, Device):
        return "devices"
    # A Core row (the release and usage paths read rows without the ORM): named by its columns.
    return "licences" if hasattr(row, "sealed_usage_key") else "devices"


def _fields(row: Any) -> tuple[str, dict[str, Any]]:
    table = _table_of(row)
    return table, licence_fields(row) if table == "licences" else device_fields(row)


def row_tag(tag_key: bytes, row: Any) -> bytes:
    """The tag of a licence or device: an ORM object or a Core row with the table's columns."""
    table, fields = _fields(row)
    covered = (
        ROW_TAG_LABEL + table.encode() + b"\x00" + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    )
    return hmac.new(tag_key, covered, hashlib.sha256).digest()


def seal_row(tag_key: bytes, row: Licence | Device) -> None:
    """Set the row's tag after the backend itself changed it."""
    row.row_tag = row_tag(tag_key, row)


class RowColumns:
    """One table's columns out of a joined Core row (labelled `prefix` + column name), read like a Core
    row of that table: by attribute, and as a tuple of its values in column order."""

    def __init__(self, row: Row, prefix: str, table: Any) -> None:
        mapping = row._mapping
        self.__dict__.update({column.name: mapping[prefix + column.name] for column in table.c})

    def __iter__(self) -> Iterator[Any]:
        return iter(self.__dict__.values())


def check_row(tag_key: bytes, row: Any) -> None:
    """Refuse a row whose columns were changed by anything but the backend (or that was never tagged)."""
    # A Core row whose every column, tag included, equals one that passed under the same key passes
    # again (the tag is a function of exactly those values), so it is not recomputed: the key release
    # reads the same licence and device rows over and over.
    memo = (tag_key, tuple(row)) if isinstance(row, Row | RowColumns) else None
    if memo is not None and memo in _verified:
        return
    what = f"licence {row.id}" if _table_of(row) == "licences" else f"device {row.id}"
    if row.row_tag is None:
        raise RequestRefused(
            f"{what} has no integrity tag (made before schema revision 0004): the owner runs "
            "`modelcloak owner migrate --master-key-file ...` once to tag existing rows"
        )
    if not hmac.compare_digest(row.row_tag, row_tag(tag_key, row)):
        _log.error("integrity check failed for %s: its row was changed outside the backend", what)
        raise RequestRefused(f"{what} failed its integrity check: the row was changed outside the backend")
    if memo is not None:
        if len(_verified) >= _VERIFIED_MAX:  # bounded; forgetting only costs a recomputation
            _verified.clear()
        _verified.add(memo)


_VERIFIED_MAX = 10_000
_verified: set[tuple[bytes, tuple[Any, ...]]] = set()
