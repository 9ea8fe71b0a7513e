"""Owner and edge objects of the fhe scheme: keys, the edge package, evaluation, label-only decryption.

Owner side (`protect_program`): generate a CKKS key set for the program's parameters, encrypt the
packed weights under the owner's secret key (or only encode them, `encrypt_weights=False`, which
protects the inputs but not the model), and split the result into
- the **edge package**: parameters, public key, relinearisation key, exactly the Galois keys the
  program rotates by, the packed weights and biases, and the program's layout (no secret key);
- the **owner secret**: the secret key and what the decryptor needs to check a result, including
  the secret **check rows**: R (k x m) and a constant kappa. The encrypted last layer computes, next
  to the m logits y, k rows R y (its weights R W and bias R b are encrypted like the others) and one
  row that is kappa whatever the input. A device that adds a shift to any logit, scales or negates
  its result, or forges one, cannot keep R y and kappa consistent without knowing them, so the owner
  refuses it (docs/FHE.md, "Results the device cannot steer").

Edge side (`EdgeEvaluator`): loads the package and evaluates the program on features given in
plaintext or encrypted by the edge with the public key; the answer is a result envelope (bytes).

Owner side again (`OwnerDecryptor`): checks that a result envelope belongs to this model and is
well formed, decrypts it and returns labels (or top-k indices) only. It never hands out the
decrypted values: CKKS decryptions given back to whoever chose the ciphertext leak the secret key
(Li and Micciancio, EUROCRYPT 2021).

Byte formats (all three): an 8-byte magic, a 4-byte big-endian header length, a JSON header, then
the binary blobs (SEAL's own serialisation) whose lengths the header lists, in order.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from modelcloak.fhe.ckks import CkksContext, galois_element, load_object, save_object
from modelcloak.fhe.errors import FheError
from modelcloak.fhe.params import CkksParameters, candidate_parameters, choose_parameters
from modelcloak.fhe.program import (
    DenseProgram,
    LayerPlan,
    LoweredLayer,
    _as_batch,
    diagonals,
    plan_layers,
    spread,
)

__all__ = [
    "FORMAT_VERSION",
    "CheckRows",
    "EdgeEvaluator",
    "FheModel",
    "OwnerDecryptor",
    "protect_program",
    "required_rotation_steps",
]

FORMAT_VERSION = 1
MAGIC_EDGE = b"MCFHEED1"
MAGIC_OWNER = b"MCFHESK1"
MAGIC_RESULT = b"MCFHERS1"
MAX_HEADER_BYTES = 1 << 20
MAX_RESULT_CIPHERTEXTS = 1024
# A fresh encryption of 0 decodes to noise around 2^-(scale_bits - 10); a wrong secret key decodes
# it to values as large as the modulus. Anything between is treated as "not this key".
_KEY_CHECK_TOLERANCE = 1e-2
# Without check rows (a negative control only), the layout check of earlier versions: copies and
# padding within 1e-2 relative, two orders above the noise we measure.
_LAYOUT_TOLERANCE = 1e-2


@dataclass(frozen=True)
class FheModel:
    """What `protect_program` makes: bytes for the edge bundle section and for the owner store."""

    model_id: str
    edge_package: bytes
    owner_secret: bytes
    params: CkksParameters
    batch: int
    rotation_steps: tuple[int, ...]
    measured: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Envelopes
# ---------------------------------------------------------------------------------------------


def _pack(magic: bytes, header: dict[str, Any], blobs: list[bytes]) -> bytes:
    header = dict(header, version=FORMAT_VERSION, blobs=[len(b) for b in blobs])
    raw = json.dumps(header, sort_keys=True).encode()
    return magic + struct.pack(">I", len(raw)) + raw + b"".join(blobs)


def _unpack(magic: bytes, data: Any, what: str) -> tuple[dict[str, Any], list[bytes]]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FheError(f"{what}: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 12 or data[:8] != magic:
        raise FheError(f"{what}: not a modelcloak fhe {what} (bad magic)")
    (size,) = struct.unpack(">I", data[8:12])
    if size > MAX_HEADER_BYTES or 12 + size > len(data):
        raise FheError(f"{what}: truncated or oversized header")
    try:
        header = json.loads(data[12 : 12 + size])
        lengths = [int(n) for n in header["blobs"]]
        version = int(header["version"])
    except (ValueError, KeyError, TypeError):
        raise FheError(f"{what}: malformed header") from None
    if version != FORMAT_VERSION:
        raise FheError(f"{what}: format version {version} is not supported (this is {FORMAT_VERSION})")
    if any(n < 0 for n in lengths) or 12 + size + sum(lengths) != len(data):
        raise FheError(f"{what}: blob lengths do not match its size (truncated or padded)")
    blobs, offset = [], 12 + size
    for n in lengths:
        blobs.append(data[offset : offset + n])
        offset += n
    return header, blobs


def _model_id(params: CkksParameters, public_key: bytes) -> str:
    digest = hashlib.sha256(b"modelcloak-fhe-model\x00")
    digest.update(json.dumps(params.to_json(), sort_keys=True).encode())
    digest.update(public_key)
    return digest.hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# Layout shared by owner and edge
# ---------------------------------------------------------------------------------------------


def required_rotation_steps(plans: list[LayerPlan], batch: int) -> tuple[int, ...]:
    """Slot rotations the evaluator performs: baby step 1, each giant step b, each fold (times the batch).

    Baby steps are chained rotations by one and giant steps are applied Horner-style, so every
    layer needs only the keys for 1, its b and its folds, not one key per diagonal.
    """
    steps: set[int] = set()
    for plan in plans:
        if plan.baby > 1:
            steps.add(batch)
        if plan.giant > 1:
            steps.add(plan.baby * batch)
        steps.update(s * batch for s in plan.fold_steps)
    return tuple(sorted(steps))


@dataclass(frozen=True)
class _LayerLevels:
    level_in: int
    scale_in: float
    level_out: int
    scale_out: float  # after the dense part (where the bias is added)
    level_next: int
    scale_next: float  # after the optional square: what the next layer gets


def _simulate(ctx: CkksContext, plans: list[LayerPlan]) -> list[_LayerLevels]:
    """Levels and exact scales through the program, computed the way SEAL computes them.

    Weights are encoded at scale q_k, the prime the following rescale divides by, so a dense
    layer leaves the scale where it was; only squares move it (S^2 / q). SEAL adds only equal
    scales, so the owner encodes each bias at exactly the scale this simulation predicts.
    """
    level, scale = ctx.top, 2.0**ctx.params.scale_bits
    out = []
    for plan in plans:
        if level < 1 + int(plan.square_after):
            raise FheError("the modulus chain is too short for this program")
        q = float(ctx.prime(level))
        level_out, scale_out = level - 1, (scale * q) / q
        level_next, scale_next = level_out, scale_out
        if plan.square_after:
            level_next, scale_next = level_out - 1, (scale_out * scale_out) / float(ctx.prime(level_out))
        out.append(_LayerLevels(level, scale, level_out, scale_out, level_next, scale_next))
        level, scale = level_next, scale_next
    return out


# ---------------------------------------------------------------------------------------------
# Owner: protect
# ---------------------------------------------------------------------------------------------


DEFAULT_CHECK_ROWS = 3
# The owner's tolerance is this many times the largest check residual measured on honest results
# at protect time: CKKS noise varies by a small factor between runs and inputs, and a shift the
# tolerance lets through is at most this factor above the noise floor.
TOLERANCE_FACTOR = 16.0
# Below this, a tolerance would be under double-precision decoding error (relative to 1 + |y|).
MIN_TOLERANCE = 1e-9
PROBE_SAMPLES = 64


@dataclass(frozen=True)
class CheckRows:
    """The owner's secret consistency check on a result: slots R y and a constant slot kappa.

    `tolerance` bounds the residual max(|c - R y|, |c_kappa - kappa|, copy and padding deviations)
    relative to 1 + max|y|; it is measured on honest results at protect time (`TOLERANCE_FACTOR`).
    """

    rows: np.ndarray  # [k, m]
    constant: float
    tolerance: float

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows.tolist(), "constant": self.constant, "tolerance": self.tolerance}

    @classmethod
    def from_json(cls, data: Any, outputs: int) -> CheckRows:
        rows = np.asarray(data["rows"], dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != outputs or not rows.shape[0]:
            raise ValueError("check rows do not match the outputs")
        return cls(rows, float(data["constant"]), float(data["tolerance"]))


def _new_check(outputs: int, count: int, rng: np.random.Generator) -> CheckRows:
    # Every coefficient is at least 0.5 in magnitude, so a shift of any single class moves every
    # check slot by at least half the shift; signs and magnitudes are secret and continuous.
    rows = rng.choice([-1.0, 1.0], size=(count, outputs)) * rng.uniform(0.5, 1.5, size=(count, outputs))
    constant = float(rng.choice([-1.0, 1.0]) * rng.uniform(1.0, 4.0))
    return CheckRows(rows, constant, tolerance=math.inf)


def _with_check_rows(layers: list[LoweredLayer], check: CheckRows) -> list[LoweredLayer]:
    """The last layer gains rows R W (bias R b) and one row of zeros with bias kappa."""
    last = layers[-1]
    weight = np.concatenate([last.weight, check.rows @ last.weight, np.zeros((1, last.weight.shape[1]))])
    bias = np.concatenate([last.bias, check.rows @ last.bias, [check.constant]])
    return [*layers[:-1], LoweredLayer(weight, bias, last.square_after)]


def protect_program(
    program: DenseProgram,
    security: int = 128,
    *,
    encrypt_weights: bool = True,
    scale_bits: int | None = None,
    poly_degree: int | None = None,
    rotation_steps: tuple[int, ...] | None = None,
    check_rows: int = DEFAULT_CHECK_ROWS,
    probe: np.ndarray | None = None,
    seed: int | None = None,
) -> FheModel:
    """Generate keys for `program`, pack and encrypt its weights, and split edge and owner objects.

    `security` is 128, 192 or 256 bits (HomomorphicEncryption.org table). The ring degree and the
    scale follow from the program's depth and widest layer, unless `poly_degree` / `scale_bits`
    fix them. The result is then measured on `probe` features (the owner's calibration data at
    the cut; random normal features when absent), evaluated encrypted with plaintext and with
    encrypted features and decrypted here: the check tolerance comes from the measured noise, and
    when a probe label differs from the plaintext program's and the parameters were not fixed, the
    next larger ring (with a larger scale) is tried. `FheModel.measured` states the outcome.
    `check_rows` secret check slots guard results (0 turns the check off: a negative control for
    tests, never for deployments). `rotation_steps` overrides the Galois keys (tests drop one).
    """
    if check_rows < 0:
        raise FheError(f"check rows must be 0 or more, got {check_rows}")
    rng = np.random.default_rng(seed)
    if probe is None:
        x_probe = rng.standard_normal((PROBE_SAMPLES, program.input_size))
        probe_source = "random normal features"
    else:
        x_probe = _as_batch(probe, program.input_size)[:512]
        probe_source = "calibration features"
    layers = program.lower()
    check = _new_check(program.output_size, check_rows, rng) if check_rows else None
    if check is not None:
        layers = _with_check_rows(layers, check)
    plans = plan_layers(layers)
    depth = sum(1 + int(p.square_after) for p in plans)
    widest = max(p.period for p in plans)
    fixed = scale_bits is not None or poly_degree is not None
    if fixed:
        candidates = [choose_parameters(depth, widest, security, scale_bits, poly_degree)]
    else:
        candidates = candidate_parameters(depth, widest, security)
    reference = program.forward(x_probe)
    best: FheModel | None = None
    for params in candidates:
        model = _protect_with(program, layers, plans, params, encrypt_weights, rotation_steps, check)
        if rotation_steps is not None:  # a deliberately broken key set (tests): it cannot run, so no measurement
            return model if check is None else _with_owner_check(model, replace(check, tolerance=_LAYOUT_TOLERANCE))
        measured = _measure(model, reference, x_probe)
        measured["probe"] = probe_source
        measured["parameters_tried"] = candidates.index(params) + 1
        if check is not None:
            tolerance = max(TOLERANCE_FACTOR * measured["max_check_residual"], MIN_TOLERANCE)
            final_check = CheckRows(check.rows, check.constant, tolerance)
            measured["check_tolerance"] = tolerance
            model = _with_owner_check(model, final_check)
        model = FheModel(**{**model.__dict__, "measured": measured})
        best = model
        if measured["label_agreement"] == measured["probe_samples"]:
            break
    assert best is not None
    return best


def _protect_with(
    program: DenseProgram,
    layers: list[LoweredLayer],
    plans: list[LayerPlan],
    params: CkksParameters,
    encrypt_weights: bool,
    rotation_steps: tuple[int, ...] | None,
    check: CheckRows | None,
) -> FheModel:
    ctx = CkksContext(params)
    sealapi = ctx.sealapi
    widest = max(p.period for p in plans)
    batch = ctx.slots // widest
    elements = ctx.slots // batch
    levels = _simulate(ctx, plans)

    keygen = sealapi.KeyGenerator(ctx.context)
    secret_key = keygen.secret_key()
    public_key = sealapi.PublicKey()
    keygen.create_public_key(public_key)
    # Seeded evaluation keys: SEAL stores the uniformly random half of every key-switching key as
    # the seed of its PRNG, so the relinearisation and Galois keys (most of the key material) ship
    # at half size and are expanded when the edge loads them. (The public key has no seeded form
    # in TenSEAL's binding; it is one ciphertext-sized object.)
    relin_bytes = save_object(keygen.create_relin_keys())
    steps = required_rotation_steps(plans, batch) if rotation_steps is None else tuple(sorted(set(rotation_steps)))
    galois_bytes = (
        save_object(keygen.create_galois_keys([galois_element(s, params.poly_modulus_degree) for s in steps]))
        if steps
        else b""
    )
    public_bytes = save_object(public_key)
    model_id = _model_id(params, public_bytes)

    # The owner holds the secret key, so weights are encrypted symmetrically: SEAL then stores half
    # of each ciphertext as a PRNG seed, which halves the package.
    encryptor = sealapi.Encryptor(ctx.context, secret_key)

    def seal(values: np.ndarray, level: int, scale: float) -> bytes:
        plain = ctx.encode(values, level, scale)
        return save_object(encryptor.encrypt_symmetric(plain) if encrypt_weights else plain)

    blobs = [public_bytes, relin_bytes, galois_bytes]
    layer_records = []
    for layer, plan, lv in zip(layers, plans, levels):
        diags = diagonals(layer.weight, plan)
        weight_scale = float(ctx.prime(lv.level_in))
        for g in range(plan.giant):
            for s in range(plan.baby):
                i = g * plan.baby + s
                if i >= plan.diagonals:
                    break
                # Pre-rotated by -g*b so the giant-step rotation can be applied to the sum.
                blobs.append(seal(spread(np.roll(diags[i], g * plan.baby), elements, batch), lv.level_in, weight_scale))
        bias = np.zeros(plan.m_pad)
        bias[: plan.m] = layer.bias
        blobs.append(seal(spread(bias, elements, batch), lv.level_out, lv.scale_out))
        layer_records.append(
            plan.to_json()
            | {"level_in": lv.level_in, "scale_in": lv.scale_in, "level_out": lv.level_out, "scale_out": lv.scale_out}
        )

    final = levels[-1]
    layout = {
        "model_id": model_id,
        "params": params.to_json(),
        "batch": batch,
        "outputs": program.output_size,
        "output_period": plans[-1].m_pad,
        "final_scale": final.scale_next,
    }
    edge_header = layout | {
        "inputs": program.input_size,
        "encrypted_weights": encrypt_weights,
        "rotation_steps": list(steps),
        "layers": layer_records,
        "input_scale": 2.0**params.scale_bits,
    }
    edge_package = _pack(MAGIC_EDGE, edge_header, blobs)
    owner_header = layout | {"check": check.to_json() if check is not None else None}
    owner_secret = _pack(MAGIC_OWNER, owner_header, [save_object(secret_key), public_bytes])
    return FheModel(model_id, edge_package, owner_secret, params, batch, steps)


def _with_owner_check(model: FheModel, check: CheckRows) -> FheModel:
    header, blobs = _unpack(MAGIC_OWNER, model.owner_secret, "owner secret")
    header = {k: v for k, v in header.items() if k not in ("version", "blobs")} | {"check": check.to_json()}
    return FheModel(**{**model.__dict__, "owner_secret": _pack(MAGIC_OWNER, header, blobs)})


def _measure(model: FheModel, reference: np.ndarray, x: np.ndarray) -> dict[str, Any]:
    """Evaluate `x` as the edge would (plaintext and encrypted features), decrypt, compare to `reference`."""
    evaluator = EdgeEvaluator(model.edge_package)
    decryptor = OwnerDecryptor(model.owner_secret)
    errors, residuals, agreements = [], [], []
    top2 = np.sort(reference, axis=1)[:, -2:] if reference.shape[1] > 1 else np.zeros((len(x), 2))
    for encrypt_features in (False, True):
        logits, residual = decryptor._decrypt(evaluator.evaluate(x, encrypt_features=encrypt_features))
        errors.append(float(np.max(np.abs(logits - reference))))
        residuals.append(float(np.max(residual)))
        agreements.append(int(np.sum(logits.argmax(1) == reference.argmax(1))))
    return {
        "params": model.params.to_json(),
        "probe_samples": len(x),
        "label_agreement": min(agreements),
        "max_logit_error": max(errors),
        # Probe samples whose top two logits are closer than twice the error: labels that could flip.
        "near_ties_within_error": int(np.sum(top2[:, 1] - top2[:, 0] <= 2 * max(errors))),
        "max_check_residual": max(residuals),
    }


# ---------------------------------------------------------------------------------------------
# Edge: evaluate
# ---------------------------------------------------------------------------------------------


class EdgeEvaluator:
    """Evaluates an edge package's program; holds no secret key and never sees a decryption."""

    def __init__(self, edge_package: bytes) -> None:
        header, blobs = _unpack(MAGIC_EDGE, edge_package, "edge package")
        try:
            self.params = CkksParameters.from_json(header["params"])
            self.model_id = str(header["model_id"])
            self.batch = int(header["batch"])
            self.inputs = int(header["inputs"])
            self.outputs = int(header["outputs"])
            self.encrypted_weights = bool(header["encrypted_weights"])
            self.rotation_steps = tuple(int(s) for s in header["rotation_steps"])
            self.input_scale = float(header["input_scale"])
            self._final_scale = float(header["final_scale"])
            records = list(header["layers"])
            self.plans = [LayerPlan.from_json(r) for r in records]
            self._levels = [(int(r["level_in"]), int(r["level_out"]), float(r["scale_out"])) for r in records]
        except (KeyError, TypeError, ValueError) as exc:
            raise FheError(f"edge package: malformed program description ({exc!r})") from None
        self.ctx = CkksContext(self.params)
        sealapi = self.ctx.sealapi
        if (
            self.batch < 1
            or self.ctx.slots % self.batch
            or any(self.ctx.slots // self.batch % p.period for p in self.plans)
        ):
            raise FheError("edge package: the batch layout does not fit the ring")
        self.elements = self.ctx.slots // self.batch
        needed = sum(p.diagonals + 1 for p in self.plans)
        if len(blobs) != 3 + needed:
            raise FheError(f"edge package: expected {3 + needed} objects, found {len(blobs)}")
        context = self.ctx.context
        self.public_key = load_object("PublicKey", context, blobs[0], "edge package public key")
        if _model_id(self.params, blobs[0]) != self.model_id:
            raise FheError("edge package: the model id does not match its public key (tampered package)")
        self.relin_keys = load_object("RelinKeys", context, blobs[1], "edge package relinearisation key")
        self.galois_keys = (
            load_object("GaloisKeys", context, blobs[2], "edge package rotation keys")
            if blobs[2]
            else sealapi.GaloisKeys()
        )
        kind = "Ciphertext" if self.encrypted_weights else "Plaintext"
        self._weights: list[list[Any]] = []
        self._biases: list[Any] = []
        cursor = 3
        for li, plan in enumerate(self.plans):
            self._weights.append(
                [
                    load_object(kind, context, b, f"edge package layer {li} weights")
                    for b in blobs[cursor : cursor + plan.diagonals]
                ]
            )
            cursor += plan.diagonals
            self._biases.append(load_object(kind, context, blobs[cursor], f"edge package layer {li} bias"))
            cursor += 1
        self._check_rotation_keys()
        self._encryptor = sealapi.Encryptor(context, self.public_key)

    @property
    def remaining_levels(self) -> int:
        """Rescales left in the result before the final modulus switch (0 means the chain is used up)."""
        plan, (_level_in, level_out, _scale) = self.plans[-1], self._levels[-1]
        return level_out - int(plan.square_after)

    @property
    def final_scale_bits(self) -> float:
        return math.log2(self._final_scale)

    @property
    def encrypted_model_bytes(self) -> int:
        """Size of the packed weights and biases alone (keys excluded)."""
        return sum(len(save_object(o)) for layer in self._weights for o in layer) + sum(
            len(save_object(b)) for b in self._biases
        )

    def _check_rotation_keys(self) -> None:
        n = self.params.poly_modulus_degree
        missing = [
            s
            for s in required_rotation_steps(self.plans, self.batch)
            if not self.galois_keys.has_key(galois_element(s, n))
        ]
        if missing:
            raise FheError(f"edge package lacks the rotation keys for steps {missing}; the program cannot run")

    def evaluate(self, features: np.ndarray, *, encrypt_features: bool = False) -> bytes:
        """Run the program on [n, inputs] features; return the result envelope for the owner.

        `encrypt_features` encrypts the features with the owner's public key first, so the edge's
        inputs are hidden from anyone without the secret key (SAP's "encrypted features" rows).
        Up to `batch` samples share one ciphertext.
        """
        x = _as_batch(features, self.inputs)
        n_pad = self.plans[0].n_pad
        chunks = []
        for start in range(0, len(x), self.batch):
            block = np.zeros((min(self.batch, len(x) - start), n_pad))
            block[:, : self.inputs] = x[start : start + self.batch]
            vector = spread(block, self.elements, self.batch) if self.batch > 1 else spread(block[0], self.elements, 1)
            chunks.append(save_object(self._run(vector, encrypt_features)))
        header = {
            "model_id": self.model_id,
            "count": len(x),
            "digest": hashlib.sha256(b"".join(chunks)).hexdigest(),
        }
        return _pack(MAGIC_RESULT, header, chunks)

    def _run(self, vector: np.ndarray, encrypt_features: bool) -> Any:
        ctx = self.ctx
        state: Any = vector
        if encrypt_features or not self.encrypted_weights:
            state = ctx.sealapi.Ciphertext()
            self._encryptor.encrypt(ctx.encode(vector, ctx.top, self.input_scale), state)
        try:
            for li in range(len(self.plans)):
                state = self._layer(li, state)
            ctx.evaluator.mod_switch_to_inplace(state, ctx.parms_id(0))
        except FheError:
            raise
        except Exception as exc:  # SEAL refuses mismatched scales/levels with ValueError
            raise FheError(f"FHE evaluation failed: {exc}") from None
        return state

    def _layer(self, li: int, x: Any) -> Any:
        ctx, ev, sealapi = self.ctx, self.ctx.evaluator, self.ctx.sealapi
        plan = self.plans[li]
        level_in, _level_out, _scale_out = self._levels[li]
        weights = self._weights[li]
        step = self.batch

        # Baby steps: the input rotated by 0..b-1, computed once and reused by every giant step.
        if isinstance(x, np.ndarray):  # plaintext features: rotating them is free
            babies = [ctx.encode(np.roll(x, -s * step), level_in, self.input_scale) for s in range(plan.baby)]
        else:
            babies = [x]
            for _ in range(1, plan.baby):
                rotated = sealapi.Ciphertext()
                ev.rotate_vector(babies[-1], step, self.galois_keys, rotated)
                babies.append(rotated)

        inner = []
        for g in range(plan.giant):
            acc = None
            for s in range(plan.baby):
                i = g * plan.baby + s
                if i >= plan.diagonals:
                    break
                prod = sealapi.Ciphertext()
                if isinstance(babies[s], sealapi.Plaintext):
                    ev.multiply_plain(weights[i], babies[s], prod)
                elif self.encrypted_weights:
                    ev.multiply(babies[s], weights[i], prod)
                else:
                    ev.multiply_plain(babies[s], weights[i], prod)
                if acc is None:
                    acc = prod
                else:
                    ev.add_inplace(acc, prod)
            assert acc is not None, "a giant step starts below the diagonal count, so it has a baby step"
            # Rescale first: relinearisation and the giant-step rotations are key switches, whose
            # cost grows with the number of primes, so both run one level down. Relinearise once
            # per giant step (rotations need size-2 ciphertexts), not once per product.
            ev.rescale_to_next_inplace(acc)
            if acc.size() > 2:
                ev.relinearize_inplace(acc, self.relin_keys)
            inner.append(acc)

        result = inner[-1]
        for g in range(plan.giant - 2, -1, -1):  # Horner: rot(...rot(inner_G-1, b) + inner_g..., b)
            ev.rotate_vector_inplace(result, plan.baby * step, self.galois_keys)
            ev.add_inplace(result, inner[g])
        for fold in plan.fold_steps:
            rotated = sealapi.Ciphertext()
            ev.rotate_vector(result, fold * step, self.galois_keys, rotated)
            ev.add_inplace(result, rotated)
        bias = self._biases[li]
        if isinstance(bias, sealapi.Plaintext):
            ev.add_plain_inplace(result, bias)
        else:
            ev.add_inplace(result, bias)
        if plan.square_after:
            ev.square_inplace(result)
            ev.rescale_to_next_inplace(result)
            ev.relinearize_inplace(result, self.relin_keys)
        return result


# ---------------------------------------------------------------------------------------------
# Owner: decrypt
# ---------------------------------------------------------------------------------------------


class OwnerDecryptor:
    """Turns result envelopes of one model into labels. Holds the secret key; returns no values."""

    def __init__(self, owner_secret: bytes) -> None:
        header, blobs = _unpack(MAGIC_OWNER, owner_secret, "owner secret")
        if len(blobs) != 2:
            raise FheError("owner secret: expected a secret key and a public key")
        try:
            self.params = CkksParameters.from_json(header["params"])
            self.model_id = str(header["model_id"])
            self.batch = int(header["batch"])
            self.outputs = int(header["outputs"])
            self.output_period = int(header["output_period"])
            self.final_scale = float(header["final_scale"])
            check = header.get("check")
            self.check = CheckRows.from_json(check, self.outputs) if check is not None else None
        except (KeyError, TypeError, ValueError) as exc:
            raise FheError(f"owner secret: malformed header ({exc!r})") from None
        # Rows of the last layer the result really holds: the logits, then the check rows.
        self._used_rows = self.outputs + (len(self.check.rows) + 1 if self.check is not None else 0)
        self.ctx = CkksContext(self.params)
        sealapi = self.ctx.sealapi
        if self.batch < 1 or self.ctx.slots % self.batch or not 0 < self._used_rows <= self.output_period:
            raise FheError("owner secret: inconsistent output layout")
        self.elements = self.ctx.slots // self.batch
        if self.elements % self.output_period:
            raise FheError("owner secret: inconsistent output layout")
        if _model_id(self.params, blobs[1]) != self.model_id:
            raise FheError("owner secret: the model id does not match its public key")
        self._secret_key = load_object("SecretKey", self.ctx.context, blobs[0], "owner secret key")
        public_key = load_object("PublicKey", self.ctx.context, blobs[1], "owner public key")
        self._decryptor = sealapi.Decryptor(self.ctx.context, self._secret_key)
        self._check_key_pair(public_key)

    def _check_key_pair(self, public_key: Any) -> None:
        ctx = self.ctx
        probe = ctx.sealapi.Ciphertext()
        ctx.sealapi.Encryptor(ctx.context, public_key).encrypt(
            ctx.encode(np.zeros(ctx.slots), ctx.top, 2.0**self.params.scale_bits), probe
        )
        if np.max(np.abs(self._decode(probe))) > _KEY_CHECK_TOLERANCE:
            raise FheError("owner secret: the secret key does not belong to this model's public key")

    def _decode(self, ciphertext: Any) -> np.ndarray:
        plain = self.ctx.sealapi.Plaintext()
        self._decryptor.decrypt(ciphertext, plain)
        return np.asarray(self.ctx.encoder.decode_double(plain))

    def labels(self, result: bytes, top_k: int = 1) -> np.ndarray:
        """Arg-max labels [n] (top_k=1) or the top-k class indices [n, k], best first."""
        if not 1 <= top_k <= self.outputs:
            raise FheError(f"top_k must be 1..{self.outputs}, got {top_k}")
        logits = self._logits(result)
        order = np.argsort(-logits, axis=1, kind="stable")
        return order[:, 0] if top_k == 1 else order[:, :top_k]

    def _logits(self, result: bytes) -> np.ndarray:
        """Decrypted logits of a result that passes every check. Owner-side only: never send these to a device."""
        logits, residual = self._decrypt(result)
        if self.check is not None:
            bad = np.flatnonzero(residual > self.check.tolerance)
            if len(bad):
                raise FheError(
                    f"FHE result sample {int(bad[0])}: check slots off by {float(residual[bad[0]]):.3g} "
                    f"(tolerance {self.check.tolerance:.3g}): modified or forged"
                )
        elif np.max(residual, initial=0.0) > _LAYOUT_TOLERANCE:
            raise FheError("FHE result: decrypts to an inconsistent layout (tampered or forged)")
        return logits

    def _decrypt(self, result: bytes) -> tuple[np.ndarray, np.ndarray]:
        """Logits [count, outputs] and each sample's residual (relative to 1 + max|y|); checks the envelope only."""
        header, blobs = _unpack(MAGIC_RESULT, result, "FHE result")
        try:
            model_id, count, digest = str(header["model_id"]), int(header["count"]), str(header["digest"])
        except (KeyError, TypeError, ValueError):
            raise FheError("FHE result: malformed header") from None
        if model_id != self.model_id:
            raise FheError(
                f"FHE result belongs to another model ({model_id[:12]}), not this one ({self.model_id[:12]})"
            )
        if not 0 < len(blobs) <= MAX_RESULT_CIPHERTEXTS or count < 1 or -(-count // self.batch) != len(blobs):
            raise FheError("FHE result: the sample count does not match its ciphertexts")
        if hashlib.sha256(b"".join(blobs)).hexdigest() != digest:
            raise FheError("FHE result: digest mismatch (corrupted or tampered in transit)")
        logits, residuals = [], []
        for i, blob in enumerate(blobs):
            ct = load_object("Ciphertext", self.ctx.context, blob, f"FHE result ciphertext {i}")
            if ct.parms_id() != self.ctx.parms_id(0) or ct.size() != 2 or ct.is_ntt_form() is False:
                raise FheError(
                    f"FHE result ciphertext {i}: not at this program's final level (wrong program or parameters)"
                )
            if not math.isclose(ct.scale, self.final_scale, rel_tol=1e-9):
                raise FheError(f"FHE result ciphertext {i}: scale 2^{math.log2(ct.scale):.2f} is not this program's")
            values = self._decode(ct).reshape(self.elements, self.batch).T  # [batch, elements]
            y, residual = self._residuals(values)
            logits.append(y)
            residuals.append(residual)
        return np.concatenate(logits)[:count], np.concatenate(residuals)[:count]

    def _residuals(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each sample's logits, and how far its slots are from what an honest evaluation gives.

        An honest result repeats each sample's output rows (period m') through its slots, is ~0 in
        the padding rows and, with the check on, holds R y and kappa in the check rows. The residual
        is the largest deviation from all of that, relative to 1 + max|y|, so that it compares with
        a tolerance measured on other inputs.
        """
        per = values.reshape(self.batch, -1, self.output_period)  # [batch, copies, m']
        first = per[:, 0, :]
        y = first[:, : self.outputs]
        deviation = np.max(np.abs(per - first[:, None, :]), axis=(1, 2))
        padding = np.max(np.abs(first[:, self._used_rows :]), axis=1, initial=0.0)
        deviation = np.maximum(deviation, padding)
        if self.check is not None:
            k = len(self.check.rows)
            checks = first[:, self.outputs : self.outputs + k]
            deviation = np.maximum(deviation, np.max(np.abs(checks - y @ self.check.rows.T), axis=1))
            deviation = np.maximum(deviation, np.abs(first[:, self.outputs + k] - self.check.constant))
        return y, deviation / (1.0 + np.max(np.abs(y), axis=1))
