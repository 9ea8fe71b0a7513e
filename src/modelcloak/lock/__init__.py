"""The lock room: weights that are only right on the hardware they were locked to.

`lock_weights` transforms a model's float tensors with a 256-bit key (in practice a device lock
key from `modelcloak.keys.tpm.TpmDeviceKey` or the owner's `modelcloak.keys.device.DeviceLockKey`);
`unlock_weights` inverts it in memory at load. The default method, ``uniform-shift``, is the
"pre-transformed" hard lock of Clifford et al. (arXiv 2405.20990) made exact: the right key gives
back the bit-identical weights, a wrong key gives weights with each tensor's own distribution,
so nothing about them says the key was wrong. ``plain-aes`` and ``permutation`` are kept for
comparison. docs/LOCK.md has the construction, the proof of exactness and the measurements.
"""

from modelcloak.lock.errors import LockError
from modelcloak.lock.transform import (
    LOCK_VERSION,
    METHODS,
    MIN_LOCK_BYTES,
    is_lockable,
    ks_distance,
    lock_weights,
    unlock_weights,
)

__all__ = [
    "LOCK_VERSION",
    "METHODS",
    "MIN_LOCK_BYTES",
    "LockError",
    "is_lockable",
    "ks_distance",
    "lock_weights",
    "unlock_weights",
]
