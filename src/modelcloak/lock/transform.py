"""Hard-lock weight transforms: a key turns weights into codes that only that key turns back.

Three methods, one interface (`lock_weights` / `unlock_weights`):

``uniform-shift`` (the one to use) follows Clifford et al., "Locking Machine Learning Models into
Hardware" (arXiv 2405.20990), "pre-transformed" hard lock: each weight is mapped through its
tensor's distribution to a uniform value, shifted by an AES-CTR keystream modulo 1, and the
result is what is stored. Unlocking subtracts the keystream and maps back through the inverse
CDF. A wrong key therefore still decodes to weights drawn from the tensor's own distribution:
destroyed, but with nothing absurd in them to tell an attacker the key was wrong. Unlike the
paper's floating-point version, this one is exact: the right key gives back the float32 bit
patterns unchanged. How (integer "slot" domain, 64-bit codes, dither) and why it cannot be done
in 32 bits are in docs/LOCK.md.

``plain-aes`` XORs the raw bytes with the keystream. Exact, fast, and a free key check: a wrong
key decodes to random bit patterns (magnitudes up to 3e38 and NaNs).

``permutation`` shuffles each tensor with a key-seeded permutation. It is not encryption: the
multiset of values is kept, so sorted locked weights equal sorted real weights and every
statistic of the marginal is exposed; it is here as a comparison point.

Which tensors: floating-point arrays of at least two elements, biases and tiny convolutions
included; single numbers and non-float arrays pass through untouched.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import functools
import hashlib
import math
import os
import secrets
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from modelcloak.lock.errors import LockError
from modelcloak.lock.kernel import choose_kernel, numba_decoder, pack_table

__all__ = [
    "LOCK_VERSION",
    "METHODS",
    "MIN_LOCK_ELEMENTS",
    "is_lockable",
    "ks_distance",
    "lock_weights",
    "unlock_weights",
]

LOCK_VERSION = 2  # 2: the CDF is stored as pieces (1 stored segments)
METHODS = ("uniform-shift", "plain-aes", "permutation")
# Every float tensor with two or more elements is locked: biases and 72-weight convolutions carry
# the model's value too. A single number decodes to itself under any key (its CDF is a point).
MIN_LOCK_ELEMENTS = 2
# Below this many weights a tensor's published CDF knots are rounded to 3 significant bits: with
# exact knots, a bias of 10 values would publish half of them (min, max and the quantiles).
COARSE_KNOTS_BELOW = 4096
_COARSE_KEPT_MANTISSA_BITS = 3
KEY_SIZE = 32
MIN_SALT_SIZE = 16

_CODE_BITS = 64
_SLOTS = 1 << _CODE_BITS  # the size of the uniform ("slot") domain: codes are uint64
# Elements per chunk. 8192 keeps every uint64 temporary at 64 KiB, under glibc's 128 KiB mmap
# threshold: larger temporaries are fresh mmaps that page-fault on every chunk, which made 64K-element
# chunks 3x slower (millions of minor faults per 25M-weight unlock). Memory stays flat, too.
_CHUNK = 1 << 13
# Encrypting zeros yields the keystream; one read-only buffer serves every chunk and thread.
# Elements per chunk of the compiled path: its only temporary is the keystream (8 bytes per
# weight), allocated once per worker thread, so chunks can be large; 2^15 keeps it in L2.
_COMPILED_CHUNK = 1 << 15
_ZEROS = np.zeros(max(_CHUNK, _COMPILED_CHUNK) * 8, dtype=np.uint8)
_ZEROS.flags.writeable = False
_MAX_THREADS = 8  # beyond this memory bandwidth, not arithmetic, is the limit
_MAX_BUCKETS = 16384  # 2*sqrt(n) reaches it at n = 67M weights
_LUT_BITS = 16  # top bits of a slot used to jump close to the right piece


# --------------------------------------------------------------------------------------------
# Public helpers
# --------------------------------------------------------------------------------------------


def is_lockable(array: np.ndarray) -> bool:
    """True for floating-point arrays of at least MIN_LOCK_ELEMENTS elements (the tensors we lock)."""
    return array.dtype.kind == "f" and array.size >= MIN_LOCK_ELEMENTS


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs.

    Uses scipy.stats.ks_2samp when scipy is installed and both samples are NaN-free; otherwise
    our own implementation, in which NaNs sort above every number (as numpy sorts them) so a
    sample full of NaNs, like plain AES under a wrong key, gets a meaningful distance.
    """
    with np.errstate(invalid="ignore"):  # signalling-NaN bit patterns (plain AES garbage) warn on cast
        x = np.asarray(a, dtype=np.float64).ravel()
        y = np.asarray(b, dtype=np.float64).ravel()
    if x.size == 0 or y.size == 0:
        raise LockError("ks_distance needs two non-empty samples")
    if not (np.isnan(x).any() or np.isnan(y).any()):
        try:
            from scipy.stats import ks_2samp
        except ImportError:
            pass
        else:
            return float(ks_2samp(x, y).statistic)
    return _ks_statistic(x, y)


def _ks_statistic(x: np.ndarray, y: np.ndarray) -> float:
    x = np.sort(x)
    y = np.sort(y)
    grid = np.concatenate([x, y])
    # searchsorted(side="right") counts elements <= each grid point; NaN sorts last in both.
    cdf_x = np.searchsorted(x, grid, side="right") / x.size
    cdf_y = np.searchsorted(y, grid, side="right") / y.size
    return float(np.max(np.abs(cdf_x - cdf_y)))


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def lock_weights(
    arrays: Mapping[str, np.ndarray],
    key: bytes | bytearray | memoryview,
    salt: bytes,
    *,
    method: str = "uniform-shift",
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Lock every lockable tensor in `arrays` with `key`; return the locked arrays and public params.

    The params are JSON-able and belong in the (signed) manifest: the method, and per locked
    tensor its dtype and shape and, for uniform-shift, the fitted CDF. They hold no key material.
    Locked uniform-shift tensors are uint64 arrays of codes with the weight's shape; the other
    methods keep the dtype. Tensors that are not locked are returned as they are (same objects).
    """
    method = _method(method)
    cipher_key = _key(key)
    salt = _salt(salt)
    locked: dict[str, np.ndarray] = {}
    tensors: dict[str, dict[str, Any]] = {}
    for name, array in arrays.items():
        array = np.asarray(array)
        if not is_lockable(array):
            locked[name] = array
            continue
        flat = np.ascontiguousarray(array).reshape(-1)
        if method == "uniform-shift":
            codes, extra = _shift_lock(name, flat, cipher_key, salt)
            locked[name] = codes.reshape(array.shape)
        elif method == "plain-aes":
            locked[name] = _xor_keystream(name, flat, cipher_key, salt).reshape(array.shape)
            extra = {}
        else:
            locked[name] = flat[_permutation(name, flat.size, cipher_key, salt)].reshape(array.shape)
            extra = {}
        tensors[name] = {"dtype": array.dtype.str, "shape": list(array.shape), **extra}
    return locked, {"method": method, "version": LOCK_VERSION, "tensors": tensors}


def unlock_weights(
    locked: Mapping[str, np.ndarray],
    key: bytes | bytearray | memoryview,
    salt: bytes,
    params: Mapping[str, Any],
    *,
    method: str | None = None,
    kernel: str | None = None,
    into: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Invert `lock_weights`. With the right key the result is bit-identical to the original.

    With a wrong key uniform-shift returns finite weights of the right dtype and shape that
    follow each tensor's distribution (and nothing signals the error); plain-aes returns
    garbage; permutation returns a differently shuffled tensor. Tensors that params do not name
    pass through. Malformed params or arrays raise LockError. `kernel` ("auto", "numba",
    "numpy") picks the uniform-shift decoder (modelcloak.lock.kernel.choose_kernel); all are exact.
    `into` maps tensor names to writable, C-contiguous arrays of the tensor's dtype and size (the
    runtime's weights buffer): those tensors are decoded straight into them, with no copy.
    """
    if not isinstance(params, Mapping):
        raise LockError("lock params must be a mapping (the 'lock' entry of the manifest)")
    recorded = _method(str(params.get("method", "")))
    if method is not None and _method(method) != recorded:
        raise LockError(f"these weights were locked with {recorded!r}, not {_method(method)!r}")
    if params.get("version") != LOCK_VERSION:
        raise LockError(f"lock params version {params.get('version')!r} is not supported (expected {LOCK_VERSION})")
    tensors = params.get("tensors")
    if not isinstance(tensors, Mapping):
        raise LockError("lock params have no 'tensors' table")
    cipher_key = _key(key)
    salt = _salt(salt)
    missing = [name for name in tensors if name not in locked]
    if missing:
        raise LockError(f"locked tensor {missing[0]!r} is missing ({len(missing)} of {len(tensors)} missing)")
    total = sum(int(np.asarray(locked[name]).size) for name in tensors)
    chosen = choose_kernel(total, kernel) if recorded == "uniform-shift" else "numpy"
    out: dict[str, np.ndarray] = {}
    for name, array in locked.items():
        spec = tensors.get(name)
        if spec is None:
            out[name] = array
            continue
        dtype, shape = _tensor_header(name, spec)
        array = np.asarray(array)
        expected = np.dtype(np.uint64) if recorded == "uniform-shift" else dtype
        if array.dtype != expected or tuple(array.shape) != shape:
            raise LockError(
                f"locked tensor {name!r} is {array.dtype.str} {list(array.shape)}, "
                f"params say {expected.str} {list(shape)}"
            )
        flat = np.ascontiguousarray(array).reshape(-1)
        target = _target(name, (into or {}).get(name), dtype, flat.size)
        if recorded == "uniform-shift":
            values = _shift_unlock(name, flat, dtype, spec, cipher_key, salt, kernel=chosen, out=target)
        elif recorded == "plain-aes":
            values = _xor_keystream(name, flat, cipher_key, salt)
        else:
            values = np.empty_like(flat)
            values[_permutation(name, flat.size, cipher_key, salt)] = flat
        if target is not None and values is not target:
            target[:] = values
            values = target
        out[name] = values.reshape(shape)
    return out


def _target(name: str, array: np.ndarray | None, dtype: np.dtype, size: int) -> np.ndarray | None:
    """The caller's destination for one tensor, flattened, after checking it can take the values."""
    if array is None:
        return None
    if array.dtype != dtype or array.size != size or not array.flags.c_contiguous or not array.flags.writeable:
        raise LockError(f"the destination for tensor {name!r} is not a writable contiguous {dtype} array of {size}")
    return array.reshape(-1)


# --------------------------------------------------------------------------------------------
# Argument checks and the keystream
# --------------------------------------------------------------------------------------------


def _method(method: str) -> str:
    normal = method.strip().lower().replace("_", "-")
    if normal not in METHODS:
        raise LockError(f"unknown lock method {method!r}; choose one of {', '.join(METHODS)}")
    return normal


def _key(key: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(key).cast("B")
    if view.nbytes != KEY_SIZE:
        raise LockError(f"lock key must be {KEY_SIZE} bytes (AES-256), got {view.nbytes}")
    return view


def _salt(salt: bytes) -> bytes:
    if not isinstance(salt, (bytes, bytearray)) or len(salt) < MIN_SALT_SIZE:
        raise LockError(f"lock salt must be at least {MIN_SALT_SIZE} bytes")
    return bytes(salt)


def _initial_counter(method: str, salt: bytes, name: str) -> int:
    """The AES-CTR starting block for one tensor: a hash of (method, model salt, tensor name).

    Length-prefixed fields keep ("ab", "c") and ("a", "bc") apart. Tensors of one model get
    unrelated 128-bit starting points, so their keystreams do not overlap (2^-64-ish odds even
    for billions of blocks); the method is included so locking a model twice with the same key
    and two methods does not reuse a keystream.
    """
    digest = hashlib.sha256()
    for field in (b"modelcloak/v1/lock-nonce", method.encode(), salt, name.encode("utf-8")):
        digest.update(len(field).to_bytes(4, "big") + field)
    return int.from_bytes(digest.digest()[:16], "big")


class _Keystream:
    """AES-256-CTR keystream for one tensor, readable at any element offset (chunks are independent)."""

    def __init__(self, key: memoryview, method: str, salt: bytes, name: str) -> None:
        self._algorithm = algorithms.AES(key)
        self._start = _initial_counter(method, salt, name)

    def bytes_at(self, offset: int, nbytes: int) -> np.ndarray:
        """`nbytes` keystream bytes starting at byte `offset` (a multiple of 16)."""
        assert offset % 16 == 0
        counter = (self._start + offset // 16) % (1 << 128)
        encryptor = Cipher(self._algorithm, modes.CTR(counter.to_bytes(16, "big"))).encryptor()
        out = np.empty(nbytes + 15, dtype=np.uint8)
        zeros = _ZEROS[:nbytes] if nbytes <= _ZEROS.size else np.zeros(nbytes, dtype=np.uint8)
        written = encryptor.update_into(zeros.data, out.data)
        return out[:written]

    def bytes_into(self, offset: int, nbytes: int, buffer: np.ndarray) -> np.ndarray:
        """Like bytes_at, written into `buffer` (at least nbytes + 15 bytes) to spare an allocation."""
        assert offset % 16 == 0 and buffer.size >= nbytes + 15
        counter = (self._start + offset // 16) % (1 << 128)
        encryptor = Cipher(self._algorithm, modes.CTR(counter.to_bytes(16, "big"))).encryptor()
        zeros = _ZEROS[:nbytes] if nbytes <= _ZEROS.size else np.zeros(nbytes, dtype=np.uint8)
        written = encryptor.update_into(zeros.data, buffer.data)
        return buffer[:written]


def _xor_keystream(name: str, flat: np.ndarray, key: memoryview, salt: bytes) -> np.ndarray:
    stream = _Keystream(key, "plain-aes", salt, name)
    raw = flat.view(np.uint8)
    out = np.empty_like(raw)
    step = _CHUNK * 8
    for start in range(0, raw.size, step):
        piece = raw[start : start + step]
        np.bitwise_xor(piece, stream.bytes_at(start, piece.size), out=out[start : start + piece.size])
    return out.view(flat.dtype)


def _permutation(name: str, size: int, key: memoryview, salt: bytes) -> np.ndarray:
    """A uniformly random permutation of range(size), seeded by the key: argsort of 64-bit keystream words."""
    words = _Keystream(key, "permutation", salt, name).bytes_at(0, 8 * size).view("<u8")
    return np.argsort(words, kind="stable")


# --------------------------------------------------------------------------------------------
# uniform-shift: ordinals, the piecewise CDF table, lock and unlock
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FloatFormat:
    """IEEE binary format: the unsigned view and where the exponent sits."""

    uint: type[np.unsignedinteger]
    sint: type[np.signedinteger]
    bits: int
    mantissa: int

    @property
    def sign(self) -> int:
        return 1 << (self.bits - 1)

    @property
    def exponent_mask(self) -> int:
        return ((1 << (self.bits - 1 - self.mantissa)) - 1) << self.mantissa


# float64 is left out on purpose: its ordinals need 64 bits, so codes would need more than 64.
_FORMATS: dict[str, _FloatFormat] = {
    np.dtype(np.float32).str: _FloatFormat(np.uint32, np.int32, 32, 23),
    np.dtype(np.float16).str: _FloatFormat(np.uint16, np.int16, 16, 10),
}


def _format(name: str, dtype: np.dtype) -> _FloatFormat:
    fmt = _FORMATS.get(np.dtype(dtype).newbyteorder("<").str)
    if fmt is None:
        raise LockError(
            f"tensor {name!r} is {np.dtype(dtype).name}; uniform-shift locks float32 and float16 "
            "(convert the model to float32, or use plain-aes)"
        )
    return fmt


def _to_ordinal(values: np.ndarray, fmt: _FloatFormat) -> np.ndarray:
    """Float bit patterns -> unsigned integers (same width) in the order of the values (-0.0 just below +0.0).

    Positive floats get the sign bit set; negative floats are bit-inverted, which reverses their
    order. It is a bijection on bit patterns, so -0.0, subnormals and every bit survive.
    """
    bits = values.view(fmt.uint)
    # Arithmetic shift of the signed view: all ones for negative floats (-> ~bits), else zero
    # (-> bits ^ sign). Four cheap passes instead of a three-way np.where.
    mask = (bits.view(fmt.sint) >> (fmt.bits - 1)).view(fmt.uint) | fmt.uint(fmt.sign)
    return bits ^ mask


def _ordinal_to_bits(ordinals: np.ndarray, fmt: _FloatFormat) -> np.ndarray:
    """Inverse of _to_ordinal, from uint64 ordinals to the format's unsigned bit patterns."""
    small = ordinals.astype(fmt.uint)
    mask = ~(small.view(fmt.sint) >> (fmt.bits - 1)).view(fmt.uint) | fmt.uint(fmt.sign)
    return small ^ mask


@functools.lru_cache(maxsize=None)
def _binade_edges(fmt: _FloatFormat) -> list[int]:
    """Ordinals where the spacing between neighbouring floats (the ulp) changes: sign +/- exponent steps."""
    top = 1 << (fmt.bits - 1 - fmt.mantissa)  # number of exponent values, including inf/nan
    half = fmt.sign
    edges = {half + (e << fmt.mantissa) for e in range(top)} | {half - (e << fmt.mantissa) for e in range(top)}
    return sorted(edges)


def _ulp_units(ordinal: int, fmt: _FloatFormat) -> int:
    """Value width of one float at `ordinal`, in units of the smallest subnormal (exact integer)."""
    bits = ordinal ^ fmt.sign if ordinal & fmt.sign else ~ordinal & ((1 << fmt.bits) - 1)
    exponent = (bits & fmt.exponent_mask) >> fmt.mantissa
    return 1 << max(int(exponent) - 1, 0)


@dataclass
class _Table:
    """The CDF as pieces: ordinals [ord_start[i], ord_start[i+1]) <-> slots [slot_start[i], slot_start[i+1]).

    Within a piece of w ordinals and s >= w slots, ordinal offset t owns the slots
    [t*q + min(t, r), (t+1)*q + min(t+1, r)) with q = s // w, r = s % w: consecutive, non-empty,
    covering the piece exactly. That is what makes unlocking exact.
    """

    ord_start: np.ndarray  # uint64 [P+1], last = one past the largest ordinal
    slot_start: np.ndarray  # uint64 [P]; piece P-1 ends at 2^64
    ord_last: np.ndarray  # uint64 [P]: last ordinal of each piece (inclusive)
    slot_last: np.ndarray  # uint64 [P]: last slot of each piece (inclusive; 2^64-1 for the last)
    width: np.ndarray  # uint64 [P] ordinals per piece (w)
    quot: np.ndarray  # uint64 [P] q (clamped to 2^64-1 for a constant tensor's single 2^64-slot piece)
    rem: np.ndarray  # uint64 [P] r
    split: np.ndarray  # uint64 [P] r*(q+1): slot offsets below it belong to ordinals with q+1 slots

    @functools.cached_property
    def slot_lut(self) -> np.ndarray:
        """intp [2^16]: piece holding the first slot of each 2^48-slot block (numpy path only)."""
        slot_blocks = np.arange(1 << _LUT_BITS, dtype=np.uint64) << np.uint64(_CODE_BITS - _LUT_BITS)
        return (np.searchsorted(self.slot_start, slot_blocks, side="right") - 1).astype(np.intp)

    def ordinal_lut(self) -> tuple[np.ndarray, int, int]:
        """Lookup table from an ordinal to a nearby piece (lock only): (table, shift, base).

        Blocks of 2^shift ordinals over this tensor's own ordinal range, about 16 blocks per
        piece (at most 2^20), so the walk in _locate takes a few steps even where thousands of
        knots crowd the binades that hold most weights.
        """
        base = int(self.ord_start[0])
        span = int(self.ord_start[-1]) - base
        target = min(16 * int(self.width.size), 1 << 20)
        shift = max(span // target, 1).bit_length() - 1
        blocks = np.uint64(base) + (np.arange((span >> shift) + 1, dtype=np.uint64) << np.uint64(shift))
        lut = np.searchsorted(self.ord_start[:-1], blocks, side="right") - 1
        return lut.astype(np.intp), shift, base


def _segments_to_pieces(seg_ord: list[int], seg_slot: list[int], fmt: _FloatFormat) -> _Table:
    """Expand segments (the stored table) into pieces of constant ulp with exact integer slot counts.

    A segment's slots are shared among its binade pieces in proportion to their value width
    (so the CDF is linear in value inside a segment), after each ordinal has been given the one
    slot it needs to stay decodable. Only integers are used, so lock and unlock, on any machine,
    derive the same pieces from the same stored segments.
    """
    edges = _binade_edges(fmt)
    ords: list[int] = []
    slots: list[int] = []
    for index in range(len(seg_ord) - 1):
        lo, hi = seg_ord[index], seg_ord[index + 1]
        budget = (seg_slot[index + 1] if index + 1 < len(seg_slot) else _SLOTS) - seg_slot[index]
        cuts = _binade_cuts(lo, hi, edges)
        widths = [cuts[i + 1] - cuts[i] for i in range(len(cuts) - 1)]
        values = [w * _ulp_units(cuts[i], fmt) for i, w in enumerate(widths)]
        free = budget - sum(widths)
        total_value = sum(values)
        shares = [free * v // total_value for v in values]
        # The rounding remainder (fewer slots than pieces) goes to the widest piece.
        shares[values.index(max(values))] += free - sum(shares)
        position = seg_slot[index]
        for i, w in enumerate(widths):
            ords.append(cuts[i])
            slots.append(position)
            position += w + shares[i]
    ords.append(seg_ord[-1])
    return _compile(np.array(ords, dtype=np.uint64), np.array(slots, dtype=np.uint64))


def _compile(ord_start: np.ndarray, slot_start: np.ndarray) -> _Table:
    """The lookup arrays of a CDF given as pieces (uint64 ordinal starts [P+1], slot starts [P])."""
    u64 = np.uint64
    width = np.diff(ord_start)
    ends = np.empty_like(slot_start)
    ends[:-1] = slot_start[1:]
    ends[-1] = 0  # the last piece ends at 2^64, which is 0 in uint64 arithmetic
    if slot_start.size == 1:  # one piece holds all 2^64 slots: its size does not fit in uint64
        w = int(width[0])
        quot = np.array([min(_SLOTS // w, _SLOTS - 1)], dtype=u64)
        rem = np.array([_SLOTS % w], dtype=u64)
    else:
        size = ends - slot_start  # the last one wraps to 2^64 - start, as it should
        quot, rem = np.divmod(size, width)
    with np.errstate(over="ignore"):  # q + 1 wraps only for a one-ordinal piece, masked out
        split = np.where(width > 1, rem * (quot + u64(1)), u64(0))
    return _Table(
        ord_start=ord_start,
        slot_start=slot_start,
        ord_last=ord_start[1:] - u64(1),
        slot_last=ends - u64(1),
        width=width,
        quot=quot,
        rem=rem,
        split=split,
    )


def _locate(last: np.ndarray, values: np.ndarray, lut: np.ndarray, shift: int, base: int = 0) -> np.ndarray:
    """Index i of the piece holding each value, given each piece's last (inclusive) value.

    A lookup table on the value's top bits lands on the right piece or a few before it; a short
    vectorised walk finishes the job (values past their piece's last element move on). numpy's
    searchsorted over ~10^3 pieces costs ~100 ns per element on random input, this a fraction.
    The final piece's last value is the top of the domain, so nothing walks past it.
    """
    index = lut[((values - np.uint64(base)) >> np.uint64(shift)).astype(np.intp)]
    todo = np.flatnonzero(values > last[index])
    while todo.size:
        index[todo] += 1
        todo = todo[values[todo] > last[index[todo]]]
    return index


def _floor_div(a: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Exact floor(a / d) for uint64 a and d >= 1 whose quotient is below 2^33.

    Hardware has no vector 64-bit integer division; a float64 division (vectorised) gets within
    one of the quotient (relative error ~2^-51 on a quotient < 2^33), and two exact integer
    corrections finish it. Starting one below the estimate keeps every product <= a, so nothing
    overflows. Selections are arithmetic on booleans: np.where costs several times more here.
    """
    estimate = np.floor(a.astype(np.float64) / d.astype(np.float64)).astype(np.uint64)
    low = estimate - (estimate > 0)
    rest = a - low * d
    for _ in range(2):
        step = rest >= d
        low += step
        rest -= d * step
    return low


def _secure_generator() -> np.random.Generator:
    """numpy Generator seeded with 128 bits from the OS CSPRNG (for the dither and the knot counts)."""
    return np.random.Generator(np.random.PCG64DXSM(secrets.randbits(128)))


def _run_chunks(total: int, work: Callable[[int, int], None], *, chunk: int = _CHUNK) -> None:
    """Call work(start, stop) over [0, total) in _CHUNK pieces, on a few threads when it pays.

    numpy's ufuncs and the AES update release the GIL, and chunks touch disjoint slices of the
    output with independent keystream offsets, so threads scale on multi-core devices.
    """
    starts = range(0, total, chunk)
    workers = min(_MAX_THREADS, os.cpu_count() or 1, len(starts))
    if workers <= 1:
        for start in starts:
            work(start, min(start + chunk, total))
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="modelcloak-lock") as pool:
        futures = [pool.submit(work, start, min(start + chunk, total)) for start in starts]
        for future in futures:
            future.result()


def _shift_lock(name: str, flat: np.ndarray, key: memoryview, salt: bytes) -> tuple[np.ndarray, dict[str, Any]]:
    fmt = _format(name, flat.dtype)
    values = flat.astype(flat.dtype.newbyteorder("="), copy=False)
    # Sorted ordinals for the fit. Built chunk by chunk and sorted in place: on a fresh process
    # every whole-array temporary costs page faults, which dominate at 10^7 elements.
    ordinals = np.empty(values.size, dtype=fmt.uint)
    for start in range(0, values.size, _CHUNK):
        chunk = values[start : start + _CHUNK]
        if not np.isfinite(chunk).all():
            raise LockError(f"tensor {name!r} holds NaN or infinite values; a model with them cannot be locked")
        ordinals[start : start + chunk.size] = _to_ordinal(chunk, fmt)
    ordinals.sort()
    rng = _secure_generator()
    seg_ord, seg_slot = _fit_segments(ordinals, fmt, rng)
    del ordinals
    table = _segments_to_pieces(seg_ord, seg_slot, fmt)
    stream = _Keystream(key, "uniform-shift", salt, name)
    codes = np.empty(flat.size, dtype=np.uint64)
    ord_lut, ord_shift, ord_base = table.ordinal_lut()

    def lock_chunk(start: int, stop: int) -> None:
        o = _to_ordinal(values[start:stop], fmt).astype(np.uint64)
        piece = _locate(table.ord_last, o, ord_lut, ord_shift, ord_base)
        t = o - table.ord_start[piece]
        q = table.quot[piece]
        r = table.rem[piece]
        first = t * q + np.minimum(t, r)  # offset of this ordinal's first slot in its piece
        span_minus_one = q - np.uint64(1) + (t < r)  # it owns q or q+1 slots
        # Dither: a uniformly random slot of the ordinal, not its first one. Otherwise the right key
        # would always decode to slot-aligned positions and a wrong key almost never: a key check.
        # Generators are not thread-safe, so each chunk seeds its own from the OS CSPRNG.
        dither = _secure_generator().integers(0, span_minus_one, endpoint=True, dtype=np.uint64)
        slot = table.slot_start[piece] + first + dither
        words = stream.bytes_at(start * 8, o.size * 8).view("<u8")
        np.add(slot, words, out=codes[start:stop])  # mod 2^64: uint64 wraps

    _run_chunks(flat.size, lock_chunk)
    # The expanded pieces, not the fitted segments, are stored: expanding segments is big-integer
    # Python (most of an unlock's time before), while pieces only need vectorised arithmetic.
    params = {
        "code_bits": _CODE_BITS,
        "pieces": {"ordinals": _b64_array(table.ord_start), "slots": _b64_array(table.slot_start)},
    }
    return codes, params


def _shift_unlock(
    name: str,
    codes: np.ndarray,
    dtype: np.dtype,
    spec: Mapping[str, Any],
    key: memoryview,
    salt: bytes,
    *,
    kernel: str = "numpy",
    out: np.ndarray | None = None,
) -> np.ndarray:
    fmt = _format(name, dtype)
    if spec.get("code_bits") != _CODE_BITS:
        raise LockError(f"tensor {name!r}: code_bits {spec.get('code_bits')!r} is not supported")
    table = _compile(*_read_pieces(name, spec.get("pieces"), fmt))
    stream = _Keystream(key, "uniform-shift", salt, name)
    if out is None or not out.dtype.isnative:
        out = np.empty(codes.size, dtype=np.dtype(dtype).newbyteorder("="))
    out_bits = out.view(fmt.uint)
    if table.width.size == 1 and int(table.width[0]) == 1:
        # One value fills the whole slot domain (a constant tensor): every code decodes to it,
        # and its q = 2^64 does not fit the arithmetic below.
        out_bits[:] = _ordinal_to_bits(table.ord_start[:1], fmt)[0]
        return out.astype(np.dtype(dtype), copy=False)
    if kernel == "numba":
        _shift_unlock_compiled(codes, table, fmt, stream, out_bits)
        return out.astype(np.dtype(dtype), copy=False)

    def unlock_chunk(start: int, stop: int) -> None:
        c = codes[start:stop].astype(np.uint64, copy=False)
        words = stream.bytes_at(start * 8, c.size * 8).view("<u8")
        slot = c - words  # mod 2^64
        piece = _locate(table.slot_last, slot, table.slot_lut, _CODE_BITS - _LUT_BITS)
        offset = slot - table.slot_start[piece]
        q = table.quot[piece]
        split = table.split[piece]
        # Ordinals t < r own q+1 slots each, the rest q: invert whichever run the offset is in.
        # (A one-ordinal piece has r = 0 and q = its size, so t = offset // q = 0 without a case.)
        low_run = offset < split
        high_run = ~low_run
        numerator = offset - split * high_run
        denominator = q + low_run
        t = table.rem[piece] * high_run + _floor_div(numerator, denominator)
        out_bits[start:stop] = _ordinal_to_bits(table.ord_start[piece] + t, fmt)

    _run_chunks(codes.size, unlock_chunk)
    return out.astype(np.dtype(dtype), copy=False)


def _shift_unlock_compiled(
    codes: np.ndarray, table: _Table, fmt: _FloatFormat, stream: _Keystream, out_bits: np.ndarray
) -> None:
    decode = numba_decoder()
    local = threading.local()
    codes = codes.astype(np.uint64, copy=False)
    code_mask = np.uint64(_SLOTS - 1)
    top_bit, all_bits = np.uint64(fmt.bits - 1), np.uint64((1 << fmt.bits) - 1)
    rows, lut, lut_bits = pack_table(table.ord_start, table.slot_start, table.slot_last, table.quot, table.rem)
    lut_shift = np.uint64(_CODE_BITS - lut_bits)
    inverse = rows.view(np.float64)

    def unlock_chunk(start: int, stop: int) -> None:
        buffer = getattr(local, "buffer", None)
        if buffer is None:
            buffer = local.buffer = np.empty(_COMPILED_CHUNK * 8 + 16, dtype=np.uint8)
        words = stream.bytes_into(start * 8, (stop - start) * 8, buffer).view("<u8")
        decode(
            codes[start:stop], words, code_mask, lut, lut_shift, rows, inverse, top_bit, all_bits, out_bits[start:stop]
        )

    _run_chunks(codes.size, unlock_chunk, chunk=_COMPILED_CHUNK)


def _fit_segments(sorted_ord: np.ndarray, fmt: _FloatFormat, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Fit the public CDF: segment boundaries in ordinals and where each starts in the slot domain.

    - Atoms: a value repeated at least max(16, n/(8K)) times (zeros of a pruned layer, LayerNorm
      ones, levels of a quantised tensor) gets a one-ordinal segment with its exact share of slots,
      so a wrong key reproduces the atom at its real frequency.
    - The rest: K buckets of equal probability (K ~ 2 sqrt(n), see _bucket_count), the outer two
      split into buckets of probability 2^-i/K down to ~32 expected elements, so the tails are
      modelled as well as the bulk. Knot positions come from counts drawn from a multinomial, not from exact equal
      counts: with exact quantile knots the right key would put exactly n/K weights in every
      bucket while a wrong key scatters them binomially, a cheap key check.
    - Between knots the CDF is linear in value (see _segments_to_pieces).
    """
    n = sorted_ord.size
    buckets = _bucket_count(n)
    floor = max(16, n // (8 * buckets))
    # A run of >= floor equal values covers an index that is floor-1 modulo floor, so only those
    # n/floor positions (<= 8K) are candidates; binary search measures each run.
    candidates = np.unique(sorted_ord[floor - 1 :: floor])
    run_lo = np.searchsorted(sorted_ord, candidates, side="left")
    run_hi = np.searchsorted(sorted_ord, candidates, side="right")
    is_atom = run_hi - run_lo >= floor
    runs = [(int(lo), int(hi - lo)) for lo, hi in zip(run_lo[is_atom], run_hi[is_atom])]
    atoms = {int(sorted_ord[lo]): count for lo, count in runs}
    m = n - sum(count for _, count in runs)

    # Where each atom run starts when atoms are left out, and how many atom values precede it.
    skipped = [0]
    rest_starts = []
    for lo, count in runs:
        rest_starts.append(lo - skipped[-1])
        skipped.append(skipped[-1] + count)

    def rest(position: int) -> int:
        """The ordinal at `position` among the sorted non-atom values (atom runs skipped)."""
        return int(sorted_ord[position + skipped[bisect.bisect_right(rest_starts, position)]])

    # Continuous part: knots (ordinal, probability mass below it, as an exact fraction of the whole tensor).
    knots: list[tuple[int, Fraction]] = []
    if m:
        probs = _bucket_probabilities(m, buckets)
        counts = rng.multinomial(m, [float(p) for p in probs])
        cumulative = np.concatenate([[0], np.cumsum(counts)])
        weight = Fraction(m, n)
        knots.append((rest(0), Fraction(0)))
        mass = Fraction(0)
        for j in range(1, len(probs)):
            mass += probs[j - 1] * weight
            position = int(cumulative[j])
            if position <= 0 or position >= m:
                continue  # an empty bucket: its mass merges into the next
            ordinal = rest(position)
            if ordinal == knots[-1][0]:
                continue  # zero width: merge into the next bucket (its mass is carried by `mass`)
            knots.append((ordinal, mass))
        knots.append((rest(m - 1) + 1, weight))
        if n < COARSE_KNOTS_BELOW:
            knots = _coarse_knots(knots, fmt)
    return _merge_atoms(knots, atoms, n, fmt)


def _coarse_knots(knots: list[tuple[int, Fraction]], fmt: _FloatFormat) -> list[tuple[int, Fraction]]:
    """Round knot ordinals to a grid of 3 significant bits, the ends outwards; merge those that meet.

    The first knot must stay <= the smallest weight and the last > the largest, so they round down
    and up; inner knots round down, and a knot that lands on the previous one is dropped (its
    bucket merges into the next, as an empty bucket does). The CDF stays a CDF of the same mass.
    """
    step = 1 << (fmt.mantissa - _COARSE_KEPT_MANTISSA_BITS)
    top = (1 << fmt.bits) - 1
    coarse = [(knots[0][0] // step * step, knots[0][1])]
    for ordinal, mass in knots[1:-1]:
        rounded = ordinal // step * step
        if rounded > coarse[-1][0]:
            coarse.append((rounded, mass))
    last, mass = knots[-1]
    coarse.append((min(-(-last // step) * step, top + 1), mass))  # inner knots are below `last`
    return coarse


def _bucket_count(n: int) -> int:
    """K, the number of equal-probability buckets: about 2*sqrt(n), with >= 64 weights per bucket.

    Between knots the CDF is linear in value, which real densities are not quite. That misfit
    shrinks roughly like K^-1.5 while sampling noise shrinks like n^-0.5; with K ~ 2 sqrt(n) the
    right key's weights fit the published CDF as well as a wrong key's samples do (measured in
    docs/LOCK.md), so "which candidate fits the CDF worse" is no key check. With a fixed K = 256
    it was one for tensors of 10^5 weights and more. The CDF costs 16 bytes per knot: ~2/sqrt(n)
    of the locked tensor's size.
    """
    # Small tensors publish coarse knots (see _coarse_knots), so they can afford more of them: with
    # >= 64 weights per bucket, coarse knots fitted small skewed tensors (BatchNorm variances) badly
    # enough for wrong-key weights to stand out (27% of EfficientNet's tensors above the KS 5%
    # critical value, against 5-8% with >= 8 weights per bucket).
    per_bucket = 8 if n < COARSE_KNOTS_BELOW else 64
    return int(max(4, min(math.ceil(2 * math.sqrt(n)), n // per_bucket, _MAX_BUCKETS)))


def _bucket_probabilities(m: int, buckets: int) -> list[Fraction]:
    """Bucket probabilities: K equal buckets, the two outer ones split geometrically (1/2, 1/4, ...).

    The outer 1/K of each tail is cut into buckets of 2^-1/K, 2^-2/K, ..., 2^-d/K, 2^-d/K, with d
    as deep as keeps ~32 expected elements per bucket: a linear CDF over a whole 1/K tail bucket
    would put far too many wrong-key weights out at the extreme value.
    """
    depth = 0
    while depth < 24 and m / (buckets * 2 ** (depth + 1)) >= 32:
        depth += 1
    left = [Fraction(1, buckets * 2**depth)] + [Fraction(1, buckets * 2**i) for i in range(depth, 0, -1)]
    if buckets < 2:
        raise AssertionError("at least two buckets")
    probs = left + [Fraction(1, buckets)] * (buckets - 2) + left[::-1]
    assert sum(probs, Fraction(0)) == 1
    return probs


def _merge_atoms(
    knots: list[tuple[int, Fraction]], atoms: dict[int, int], n: int, fmt: _FloatFormat
) -> tuple[list[int], list[int]]:
    """Combine continuous knots and atoms into segments; turn probabilities into integer slot starts."""
    knot_ords = [k for k, _ in knots]
    edges = _binade_edges(fmt)

    def continuous_mass(ordinal: int) -> Fraction:
        """Continuous probability below `ordinal`: linear in value between knots."""
        if not knots or ordinal <= knot_ords[0]:
            return Fraction(0)
        if ordinal >= knot_ords[-1]:
            return knots[-1][1]
        i = bisect.bisect_right(knot_ords, ordinal) - 1
        (lo, lo_mass), (hi, hi_mass) = knots[i], knots[i + 1]
        if ordinal == lo:
            return lo_mass
        fraction = Fraction(_value_width(lo, ordinal, fmt, edges), _value_width(lo, hi, fmt, edges))
        return lo_mass + (hi_mass - lo_mass) * fraction

    boundaries = sorted(set(knot_ords) | set(atoms) | {a + 1 for a in atoms})
    atom_ords = sorted(atoms)
    atom_cumulative = [0]
    for a in atom_ords:
        atom_cumulative.append(atom_cumulative[-1] + atoms[a])
    masses = [continuous_mass(b) + Fraction(atom_cumulative[bisect.bisect_left(atom_ords, b)], n) for b in boundaries]
    widths = [boundaries[i + 1] - boundaries[i] for i in range(len(boundaries) - 1)]
    seg_mass = [masses[i + 1] - masses[i] for i in range(len(widths))]
    # Every ordinal gets one slot so it stays decodable; the other 2^64 - (ordinals) slots are
    # shared by probability. A gap with no data (between an atom and the continuous range, say)
    # has zero mass and keeps just its one slot per ordinal.
    free = _SLOTS - sum(widths)
    shares = [math.floor(free * mass) for mass in seg_mass]
    shares[seg_mass.index(max(seg_mass))] += free - sum(shares)
    slot_starts: list[int] = []
    position = 0
    for w, share in zip(widths, shares):
        slot_starts.append(position)
        position += w + share
    assert position == _SLOTS
    return boundaries, slot_starts


def _binade_cuts(lo: int, hi: int, edges: list[int]) -> list[int]:
    """[lo, binade edges strictly inside (lo, hi), hi]."""
    return [lo] + edges[bisect.bisect_right(edges, lo) : bisect.bisect_left(edges, hi)] + [hi]


def _value_width(lo: int, hi: int, fmt: _FloatFormat, edges: list[int]) -> int:
    """Sum of ulps (in smallest-subnormal units) over ordinals [lo, hi)."""
    cuts = _binade_cuts(lo, hi, edges)
    return sum((cuts[i + 1] - cuts[i]) * _ulp_units(cuts[i], fmt) for i in range(len(cuts) - 1))


# --------------------------------------------------------------------------------------------
# Params encoding and validation
# --------------------------------------------------------------------------------------------


def _b64_array(values: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(values, dtype="<u8").tobytes()).decode("ascii")


def _u64_array(name: str, field: str, text: Any) -> np.ndarray:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise LockError(f"tensor {name!r}: lock params field {field!r} is not valid base64") from None
    if not raw or len(raw) % 8:
        raise LockError(f"tensor {name!r}: lock params field {field!r} is not a list of 64-bit integers")
    return np.frombuffer(raw, dtype="<u8").astype(np.uint64)


def _read_pieces(name: str, pieces: Any, fmt: _FloatFormat) -> tuple[np.ndarray, np.ndarray]:
    """Decode and check the stored CDF so a malformed manifest fails loudly instead of decoding garbage."""
    if not isinstance(pieces, Mapping):
        raise LockError(f"tensor {name!r}: lock params have no 'pieces'")
    ords = _u64_array(name, "pieces.ordinals", pieces.get("ordinals"))
    slots = _u64_array(name, "pieces.slots", pieces.get("slots"))
    if ords.size != slots.size + 1:
        raise LockError(f"tensor {name!r}: lock params need one more ordinal boundary than slot start")
    if int(ords[-1]) > 1 << fmt.bits or not (ords[1:] > ords[:-1]).all():
        raise LockError(f"tensor {name!r}: lock params ordinal boundaries are not increasing")
    if slots[0] != 0 or not (slots[1:] > slots[:-1]).all():
        raise LockError(f"tensor {name!r}: lock params slots must start at 0 and increase")
    if slots.size > 1:
        last = np.uint64(_SLOTS - int(slots[-1]))  # the last piece ends at 2^64
        sizes = np.append(np.diff(slots), last)
        short = np.flatnonzero(sizes < np.diff(ords))
        if short.size:
            raise LockError(f"tensor {name!r}: lock params give piece {short[0]} fewer slots than ordinals")
    return ords, slots


def _tensor_header(name: str, spec: Any) -> tuple[np.dtype, tuple[int, ...]]:
    if not isinstance(spec, Mapping):
        raise LockError(f"lock params for tensor {name!r} are not a mapping")
    try:
        dtype = np.dtype(spec["dtype"])
        shape = tuple(int(d) for d in spec["shape"])
    except (KeyError, TypeError, ValueError):
        raise LockError(f"lock params for tensor {name!r} lack a valid dtype and shape") from None
    if dtype.kind != "f" or any(d < 0 for d in shape):
        raise LockError(f"lock params for tensor {name!r} name a non-float dtype or a negative dimension")
    return dtype, shape
