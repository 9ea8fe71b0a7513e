"""The lock room: weights that are only right on the hardware they were locked to.

`lock_weights` transforms a model's float tensors with a 256-bit key (in practice a device lock
key from `modelcloak.keys.tpm.TpmDeviceKey` or the owner's `modelcloak.keys.device.DeviceLockKey`);
`unlock_weights` inverts it in memory at load. The default method, ``uniform-shift``, is the
"pre-transformed" hard lock of Clifford et al. (arXiv 2405.20990) made exact: the right key gives
back the bit-identical weights, a wrong key gives weights with each tensor's own distribution,
so nothing about them says the key was wrong. ``plain-aes`` and ``permutation`` are kept for
comparison. `soft_lock` fine-tunes a model so that it is accurate in FP32 and at chance once
quantised to INT8 or FP16 (`quantised_variants`, `evaluate_variants` check it on onnxruntime's
own tools). docs/LOCK.md has the constructions, the proof of exactness and the measurements.
"""

from modelcloak.lock.errors import LockError
from modelcloak.lock.soft import (
    EXTRA_VARIANTS,
    VARIANTS,
    LockSite,
    evaluate_variants,
    find_lock_site,
    quantised_variants,
    soft_lock,
)
from modelcloak.lock.transform import (
    LOCK_VERSION,
    METHODS,
    MIN_LOCK_ELEMENTS,
    is_lockable,
    ks_distance,
    lock_weights,
    unlock_weights,
)

__all__ = [
    "EXTRA_VARIANTS",
    "LOCK_VERSION",
    "METHODS",
    "MIN_LOCK_ELEMENTS",
    "LockError",
    "LockSite",
    "VARIANTS",
    "evaluate_variants",
    "find_lock_site",
    "is_lockable",
    "ks_distance",
    "lock_weights",
    "quantised_variants",
    "soft_lock",
    "unlock_weights",
]
