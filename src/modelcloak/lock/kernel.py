"""The uniform-shift decode as one compiled loop (numba), with the numpy version as the fallback.

The per-weight work of an unlock is small: subtract a keystream word, find the piece of the CDF
table that holds the slot, invert the piece's run lengths and turn the ordinal back into float
bits. numpy needs about twenty passes over 8-byte temporaries for that; one fused loop does it in
a single pass, so an unlock costs about what reading the codes and writing the weights costs.

numba is an optional, pinned dependency (the ``lock`` extra). Importing it costs most of a second
in a fresh process, which is more than the numpy path needs for small models, so `choose_kernel`
only picks it when numba is importable and either already imported or the unlock is big enough
to pay for the import. ``MODELCLOAK_LOCK_KERNEL=numba|numpy`` forces one. Both paths are
bit-exact and tested against each other (tests/test_lock_transform.py).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from modelcloak.lock.errors import LockError

__all__ = ["KERNELS", "NUMBA_BREAK_EVEN_WEIGHTS", "choose_kernel", "numba_decoder"]

KERNELS = ("auto", "numba", "numpy")
# Weights above which importing numba (~0.8 s cold on the shared 2-core VM) is repaid by its
# faster unlock (numpy path ~30 ns per weight there): about 25M weights, rounded down.
NUMBA_BREAK_EVEN_WEIGHTS = 20_000_000


def _numba_installed() -> bool:
    return "numba" in sys.modules or importlib.util.find_spec("numba") is not None


def choose_kernel(weights: int, requested: str | None = None) -> str:
    """'numba' or 'numpy' for an unlock of `weights` weights (see the module docstring)."""
    choice = (requested or os.environ.get("MODELCLOAK_LOCK_KERNEL") or "auto").strip().lower()
    if choice not in KERNELS:
        raise LockError(f"MODELCLOAK_LOCK_KERNEL={choice!r} is not one of {', '.join(KERNELS)}")
    if choice == "numpy":
        return "numpy"
    if choice == "numba":
        if not _numba_installed():
            raise LockError(
                "the numba unlock kernel was requested but numba is not installed: pip install 'modelcloak[lock]'"
            )
        return "numba"
    if not _numba_installed():
        return "numpy"
    return "numba" if "numba" in sys.modules or weights >= NUMBA_BREAK_EVEN_WEIGHTS else "numpy"


_DECODER: Callable[..., None] | None = None


def numba_decoder() -> Callable[..., None]:
    """The compiled decode loop (compiled once per process; cached on disk by numba)."""
    global _DECODER
    if _DECODER is None:
        _DECODER = _build()
    return _DECODER


def pack_table(
    ord_start: np.ndarray, slot_start: np.ndarray, slot_last: np.ndarray, quot: np.ndarray, rem: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int]:
    """The decode table: one 64-byte row per run of equal-sized ordinals, its LUT and the LUT's bits.

    A piece of w ordinals has r ordinals with q+1 slots, then w-r with q; splitting it there gives
    runs in which every ordinal owns exactly q slots, so the decode is one division with no
    branch on which run an offset is in (a coin flip the branch predictor cannot learn). Columns:
    first slot, last slot, first ordinal, q, the float64 bit pattern of 1/q; the rest is padding
    so a row is one cache line.
    """
    u64 = np.uint64
    width = np.diff(ord_start)
    two = (width > 1) & (rem > 0)
    count = slot_start.size + int(two.sum())
    rows = np.zeros((count, 8), dtype=u64)
    # Row index of each piece's first run; pieces with two runs push the later ones down by one.
    first = np.arange(slot_start.size) + np.concatenate(([0], np.cumsum(two)[:-1]))
    with np.errstate(over="ignore"):  # q + 1 wraps only for a one-ordinal piece, never split
        low_end = slot_start + rem * (quot + u64(1))  # first slot of the q-slot run
    rows[first, 0] = slot_start
    rows[first, 1] = np.where(two, low_end - u64(1), slot_last)
    rows[first, 2] = ord_start[:-1]
    rows[first, 3] = np.where(two, quot + u64(1), quot)
    second = first[two] + 1
    rows[second, 0] = low_end[two]
    rows[second, 1] = slot_last[two]
    rows[second, 2] = ord_start[:-1][two] + rem[two]
    rows[second, 3] = quot[two]
    rows.view(np.float64)[:, 4] = 1.0 / rows[:, 3].astype(np.float64)
    # About 4 LUT blocks per row, at most 2^16: a bias of 10 values needs no 65,536-entry table, and
    # building one per tensor was most of an unlock of EfficientNet-Lite0's 250 tensors.
    lut_bits = int(min(MAX_LUT_BITS, max(4, (4 * count).bit_length())))
    blocks = np.arange(1 << lut_bits, dtype=u64) << u64(64 - lut_bits)
    lut = (np.searchsorted(rows[:, 0], blocks, side="right") - 1).astype(np.int32)
    return rows, lut, lut_bits


MAX_LUT_BITS = 16


def _build() -> Callable[..., Any]:
    import numba

    return numba.njit(cache=True, nogil=True, boundscheck=False)(_decode)


def _decode(
    codes: np.ndarray,  # uint64 [n]
    words: np.ndarray,  # uint64 [n] keystream words
    code_mask: np.uint64,  # 2^code_bits - 1
    lut: np.ndarray,  # int32 [2^16]: row holding the first slot of each top-bits block
    lut_shift: np.uint64,
    rows: np.ndarray,  # uint64 [R, 8] from pack_table
    inverse: np.ndarray,  # the same rows viewed as float64
    top_bit: np.uint64,  # the format's width - 1
    all_bits: np.uint64,
    out: np.ndarray,  # uint16/uint32 [n] float bit patterns
) -> None:
    """The decode loop, compiled by numba (module level, so numba can cache it on disk)."""
    one = np.uint64(1)
    zero = np.uint64(0)
    sign = one << top_bit
    for i in range(codes.size):
        slot = (codes[i] - words[i]) & code_mask
        row = lut[slot >> lut_shift]
        while slot > rows[row, 1]:  # the LUT lands on the right row or a few before it
            row += 1
        offset = slot - rows[row, 0]
        q = rows[row, 3]
        # Exact floor(offset / q) without the ~40-cycle hardware divide: the float64 estimate of
        # a quotient below 2^33 is off by at most one (the halving keeps the conversion signed,
        # which is cheaper). Start one below it, so every product stays <= offset (no
        # overflow), and correct twice, as transform._floor_div does.
        estimate = np.uint64(np.int64(np.float64(np.int64(offset >> one)) * 2.0 * inverse[row, 4]))
        estimate -= np.uint64(estimate > zero)
        rest = offset - estimate * q
        step = np.uint64(rest >= q)
        estimate += step
        rest -= q * step
        estimate += np.uint64(rest >= q)
        ordinal = rows[row, 2] + estimate
        # Inverse of _to_ordinal: positives carry the sign bit (clear it), negatives were
        # bit-inverted (invert back).
        negative = zero - (((ordinal >> top_bit) & one) ^ one)
        out[i] = (ordinal ^ (sign | negative)) & all_bits
