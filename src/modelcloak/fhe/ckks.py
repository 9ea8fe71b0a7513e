"""Microsoft SEAL's CKKS through `tenseal.sealapi`: contexts, the level chain, in-memory serialization.

SEAL's Python binding only saves to and loads from a path. Keys and ciphertexts must not touch
the disk (the secret key least of all), so every save/load goes through an anonymous in-memory
file (`memfd_create`) addressed as /proc/self/fd/N; nothing is ever written to a filesystem.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from modelcloak.fhe.errors import FheError
from modelcloak.fhe.params import CkksParameters, check_parameters

__all__ = ["CkksContext", "galois_element", "load_object", "save_object"]

# Larger than any object this scheme makes (Galois keys at N=32768 with a long chain are ~100 MiB).
MAX_OBJECT_BYTES = 1 << 30


def _sealapi() -> Any:
    try:
        import tenseal.sealapi as sealapi
    except ImportError as exc:
        raise FheError("TenSEAL is not installed: pip install 'modelcloak[fhe]'") from exc
    return sealapi


def save_object(obj: Any) -> bytes:
    """SEAL's own serialization of `obj` (zstd-compressed, with SEAL's header) as bytes."""
    fd = os.memfd_create("modelcloak-fhe", os.MFD_CLOEXEC)
    try:
        obj.save(f"/proc/self/fd/{fd}")
        size = os.fstat(fd).st_size
        chunks, offset = [], 0
        while offset < size:
            chunk = os.pread(fd, size - offset, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def load_object(kind: str, context: Any, data: bytes, what: str) -> Any:
    """Load bytes as a SEAL `kind` (Ciphertext, PublicKey, ...) valid for `context`, or raise FheError."""
    sealapi = _sealapi()
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise FheError(f"{what}: empty")
    if len(data) > MAX_OBJECT_BYTES:
        raise FheError(f"{what}: {len(data)} bytes is larger than any object this scheme makes")
    obj = getattr(sealapi, kind)()
    fd = os.memfd_create("modelcloak-fhe", os.MFD_CLOEXEC)
    try:
        os.write(fd, bytes(data))
        try:
            # SEAL checks the header, the compressed size, the parameter id against `context`
            # and that every coefficient is reduced; any failure is an exception, never UB.
            obj.load(context, f"/proc/self/fd/{fd}")
        except Exception as exc:  # SEAL raises ValueError, RuntimeError, ... depending on the check
            raise FheError(f"{what}: not a valid {kind} for these parameters ({exc})") from None
    finally:
        os.close(fd)
    return obj


def galois_element(step: int, poly_modulus_degree: int) -> int:
    """The Galois element of a left rotation by `step` slots (SEAL's rule: 3^step mod 2N)."""
    if not 0 < step < poly_modulus_degree // 2:
        raise FheError(f"rotation step {step} is out of range for N={poly_modulus_degree}")
    return pow(3, step, 2 * poly_modulus_degree)


class CkksContext:
    """A SEAL CKKS context for one parameter set, with its level chain spelled out.

    Chain index k is the level whose modulus is primes q_0..q_k; fresh ciphertexts sit at
    `top` = number of data primes - 1, and each rescale drops q_k and moves to k - 1.
    """

    def __init__(self, params: CkksParameters) -> None:
        check_parameters(params)
        sealapi = _sealapi()
        self.params = params
        self.sealapi = sealapi
        enc = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
        enc.set_poly_modulus_degree(params.poly_modulus_degree)
        enc.set_coeff_modulus(sealapi.CoeffModulus.Create(params.poly_modulus_degree, list(params.prime_bits)))
        level = {
            128: sealapi.SEC_LEVEL_TYPE.TC128,
            192: sealapi.SEC_LEVEL_TYPE.TC192,
            256: sealapi.SEC_LEVEL_TYPE.TC256,
        }
        self.context = sealapi.SEALContext(enc, True, level[params.security])
        if not self.context.parameters_set():
            raise FheError(f"SEAL refused the parameters {params.to_json()}: {self.context.parameters_error_message()}")
        self.encoder = sealapi.CKKSEncoder(self.context)
        self.evaluator = sealapi.Evaluator(self.context)
        self.slots = self.encoder.slot_count()
        self._parms_ids: dict[int, Any] = {}
        self._primes: dict[int, int] = {}
        data = self.context.first_context_data()
        self.top = data.chain_index()
        while data is not None:
            k = data.chain_index()
            self._parms_ids[k] = data.parms_id()
            self._primes[k] = data.parms().coeff_modulus()[k].value()
            data = data.next_context_data()

    def parms_id(self, level: int) -> Any:
        return self._parms_ids[level]

    def prime(self, level: int) -> int:
        """q_level: the prime a rescale at this level divides by."""
        return self._primes[level]

    def level_of(self, ciphertext: Any) -> int:
        return self.context.get_context_data(ciphertext.parms_id()).chain_index()

    def encode(self, values: Any, level: int, scale: float) -> Any:
        plain = self.sealapi.Plaintext()
        self.encoder.encode(np.asarray(values, dtype=np.float64).tolist(), self.parms_id(level), float(scale), plain)
        return plain
