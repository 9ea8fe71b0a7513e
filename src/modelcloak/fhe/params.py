"""CKKS parameters: security table, ring degree and modulus chain chosen from a program's depth.

The security bound is the HomomorphicEncryption.org standard (Albrecht et al., "Homomorphic
Encryption Standard", 2018/2021), table for classical attacks on a uniform ternary secret: for
each ring degree N the largest total bit count log2(q) of the coefficient modulus, special
(key-switching) prime included, that keeps 128/192/256-bit security. SEAL ships the same figures
(`CoeffModulus.MaxBitCount`); a test checks that both agree, and SEAL re-checks every context we
build, so a parameter set outside the table is refused twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from modelcloak.fhe.errors import FheError

__all__ = [
    "SECURITY_LEVELS",
    "MAX_LOG_Q",
    "CkksParameters",
    "candidate_parameters",
    "check_parameters",
    "choose_parameters",
]

SECURITY_LEVELS = (128, 192, 256)
# Max log2(q) per ring degree (classical, ternary secret), HomomorphicEncryption.org standard table.
MAX_LOG_Q: dict[int, dict[int, int]] = {
    128: {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881},
    192: {1024: 19, 2048: 37, 4096: 75, 8192: 152, 16384: 305, 32768: 611},
    256: {1024: 14, 2048: 29, 4096: 58, 8192: 118, 16384: 237, 32768: 476},
}
RING_DEGREES = (4096, 8192, 16384, 32768)
# Scale bits tried from the most precise down; below 25 bits CKKS noise (about 2^-17 relative at
# N=8192) reaches the third decimal of a logit, which is where labels start to flip.
SCALE_BITS_CHOICES = (40, 36, 33, 30, 28, 27, 26, 25)
MIN_SCALE_BITS = 20
MAX_PRIME_BITS = 60
# Head-room of the first prime over the scale: the final values (logits) must stay below
# q0 / (2 * scale); 14 bits keeps magnitudes up to about 8000.
VALUE_HEADROOM_BITS = 14


@dataclass(frozen=True)
class CkksParameters:
    """A CKKS parameter set: ring degree, coefficient-modulus bit sizes (data primes then the special prime)."""

    security: int
    poly_modulus_degree: int
    prime_bits: tuple[int, ...]
    scale_bits: int

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def depth(self) -> int:
        """Rescales available: data primes minus the first one."""
        return len(self.prime_bits) - 2

    @property
    def total_bits(self) -> int:
        return sum(self.prime_bits)

    def to_json(self) -> dict[str, object]:
        return {
            "security": self.security,
            "poly_modulus_degree": self.poly_modulus_degree,
            "prime_bits": list(self.prime_bits),
            "scale_bits": self.scale_bits,
        }

    @classmethod
    def from_json(cls, data: object) -> CkksParameters:
        try:
            assert isinstance(data, dict)
            params = cls(
                security=int(data["security"]),
                poly_modulus_degree=int(data["poly_modulus_degree"]),
                prime_bits=tuple(int(b) for b in data["prime_bits"]),
                scale_bits=int(data["scale_bits"]),
            )
        except (AssertionError, KeyError, TypeError, ValueError) as exc:
            raise FheError(f"malformed CKKS parameter record: {exc!r}") from None
        check_parameters(params)
        return params


def _chain(depth: int, scale_bits: int) -> tuple[int, ...]:
    edge = min(MAX_PRIME_BITS, scale_bits + VALUE_HEADROOM_BITS)
    # The special prime is as large as the largest data prime so key switching adds little noise.
    return (edge, *([scale_bits] * depth), edge)


def check_parameters(params: CkksParameters) -> None:
    """Refuse a parameter set the standard table does not call secure at its claimed level."""
    if params.security not in SECURITY_LEVELS:
        raise FheError(f"security level must be one of {SECURITY_LEVELS} bits, got {params.security}")
    table = MAX_LOG_Q[params.security]
    n = params.poly_modulus_degree
    if n not in table:
        raise FheError(f"ring degree {n} is not in the standard table (use one of {sorted(table)})")
    if len(params.prime_bits) < 2:
        raise FheError("the coefficient modulus needs at least one data prime and the special prime")
    if any(not MIN_SCALE_BITS <= b <= MAX_PRIME_BITS for b in params.prime_bits):
        raise FheError(f"every prime must have {MIN_SCALE_BITS}..{MAX_PRIME_BITS} bits, got {list(params.prime_bits)}")
    if params.total_bits > table[n]:
        raise FheError(
            f"insecure CKKS parameters: log2(q) = {params.total_bits} bits at N={n} exceeds the "
            f"{table[n]} bits the HomomorphicEncryption.org table allows for {params.security}-bit security"
        )


def choose_parameters(
    depth: int,
    min_slots: int,
    security: int = 128,
    scale_bits: int | None = None,
    poly_degree: int | None = None,
) -> CkksParameters:
    """The smallest ring degree whose modulus budget fits `depth` rescales, and the largest scale that fits.

    `min_slots` is the widest layer's packed length: a ciphertext must hold at least one copy.
    A fixed `scale_bits` skips the scale search (and may force a larger ring); a fixed
    `poly_degree` skips the ring search (and may force a smaller scale).
    """
    return _search(depth, min_slots, security, scale_bits, poly_degree)[0]


def candidate_parameters(depth: int, min_slots: int, security: int = 128) -> list[CkksParameters]:
    """For each ring degree that fits, from the cheapest, its largest scale: the ladder `protect` climbs
    while the measured labels still differ from the plaintext model's."""
    return _search(depth, min_slots, security, None, None)


def _search(
    depth: int, min_slots: int, security: int, scale_bits: int | None, poly_degree: int | None
) -> list[CkksParameters]:
    if security not in SECURITY_LEVELS:
        raise FheError(f"security level must be one of {SECURITY_LEVELS} bits, got {security}")
    if depth < 1:
        raise FheError(f"an FHE program needs at least one multiplication, got depth {depth}")
    if scale_bits is not None and not MIN_SCALE_BITS <= scale_bits <= MAX_PRIME_BITS:
        raise FheError(f"scale bits must be {MIN_SCALE_BITS}..{MAX_PRIME_BITS}, got {scale_bits}")
    if poly_degree is not None and poly_degree not in RING_DEGREES:
        raise FheError(f"ring degree must be one of {', '.join(map(str, RING_DEGREES))}, got {poly_degree}")
    if poly_degree is not None and poly_degree // 2 < min_slots:
        raise FheError(f"ring degree {poly_degree} has {poly_degree // 2} slots; this program needs {min_slots}")
    choices = (scale_bits,) if scale_bits is not None else SCALE_BITS_CHOICES
    found = []
    for n in (poly_degree,) if poly_degree is not None else RING_DEGREES:
        if n // 2 < min_slots:
            continue
        for bits in choices:
            chain = _chain(depth, bits)
            if sum(chain) <= MAX_LOG_Q[security][n]:
                found.append(CkksParameters(security, n, chain, bits))
                break
    if not found:
        fixed = f" with scale 2^{scale_bits}" if scale_bits is not None else ""
        fixed += f" at ring degree {poly_degree}" if poly_degree is not None else ""
        raise FheError(
            f"no secure CKKS parameters for depth {depth} with {min_slots} slots at {security}-bit security{fixed}; "
            "use fewer layers or activations, a smaller scale, a larger ring or a lower security level"
        )
    return found
