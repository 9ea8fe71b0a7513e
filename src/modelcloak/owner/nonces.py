"""Key-release nonces that carry their own proof: issued without a database write, spent with one.

A nonce is `expiry (8 bytes, microseconds since the Unix epoch, big-endian) || 8 random bytes ||
HMAC-SHA256(nonce key, "modelcloak nonce v1" 0x00 || licence id || 0x00 || the first 16 bytes)[:16]`,
32 bytes in all, with the nonce key derived from the master key (so every worker of one deployment
issues and accepts the same nonces, and nobody without the master key can make one). Issuing one
costs an HMAC; the backend only has to remember the nonces that were *spent*, until they expire
(the `nonces` table: one row per spent nonce, inserted in the same transaction as the release it
paid for). Compared with storing every issued nonce:

- an unknown, forged or foreign nonce is refused by its tag, without a database round trip;
- a nonce cannot be lost: a database crash between issue and use changes nothing (a release cut off
  by the crash is rolled back, nonce unspent, and the device may retry with the same nonce);
- a spent nonce is refused by the primary key of its row, also between workers.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC, datetime, timedelta

from modelcloak.licensing.protocol import NONCE_SIZE, RequestRefused

NONCE_LABEL = b"modelcloak nonce v1\x00"
_TAG_SIZE = 16
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _tag(key: bytes, licence_id: str, head: bytes) -> bytes:
    return hmac.new(key, NONCE_LABEL + licence_id.encode() + b"\x00" + head, hashlib.sha256).digest()[:_TAG_SIZE]


def issue_nonce(key: bytes, licence_id: str, expires_at: datetime) -> bytes:
    """A fresh nonce for `licence_id`, valid until `expires_at`."""
    micros = (expires_at - _EPOCH) // timedelta(microseconds=1)
    head = micros.to_bytes(8, "big") + secrets.token_bytes(NONCE_SIZE - 8 - _TAG_SIZE)
    return head + _tag(key, licence_id, head)


def check_nonce(key: bytes, licence_id: str, nonce: bytes, now: datetime) -> datetime:
    """The nonce's expiry, if it was issued for `licence_id` under `key` and has not expired; else refused.

    Whether it was already spent is the database's to say (a spent nonce has a row)."""
    if len(nonce) != NONCE_SIZE:
        raise RequestRefused(f"a nonce is {NONCE_SIZE} bytes, got {len(nonce)}", 400)
    head = nonce[: NONCE_SIZE - _TAG_SIZE]
    if not hmac.compare_digest(nonce[NONCE_SIZE - _TAG_SIZE :], _tag(key, licence_id, head)):
        # A tag cannot say which licence a nonce was for: unknown, forged and foreign are one refusal.
        raise RequestRefused("unknown nonce, or one issued for a different licence: ask for a fresh one")
    expires_at = _EPOCH + timedelta(microseconds=int.from_bytes(head[:8], "big"))
    if expires_at <= now:
        raise RequestRefused("nonce expired: ask for a fresh one")
    return expires_at
