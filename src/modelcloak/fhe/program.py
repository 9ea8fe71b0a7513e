"""Dense programs: the private head as plain numbers, its activations, and how it is packed.

A `DenseProgram` is what the FHE scheme evaluates: dense layers (y = W x + b) with an activation
between consecutive layers. It comes from a private ONNX part (`compile_onnx`) or straight from
arrays. Activations are the ones CKKS can afford, each a polynomial of degree at most two:

``none``            identity: the ReLU is skipped (SAP's "no activation" rows).
``square``          x^2 (CryptoNets).
``modified-square`` x^2 + x. Our reading of the SAP paper's "modified square": the square plus
                    the identity, so small activations keep their sign and the gradient at 0 is 1
                    like ReLU's right half, which is what makes fine-tuning converge. We could not
                    check the paper's exact formula; this definition is ours and is what runs.
``relu-poly``       a*x^2 + b*x + c fitted by least squares to ReLU on [lo, hi], the range of the
                    pre-activations observed on calibration data (stored with the program),
                    weighted by where those pre-activations lie (`fit_relu`).

Every such polynomial costs one multiplicative level, the same as a square:
a*x^2 + b*x + c = a*(x + b/2a)^2 + (c - b^2/4a); the shift joins the previous layer's bias, the
factor a scales the next layer's weights and the constant joins the next layer's bias
(`lower`). The lowered program is therefore only "dense, then optionally square".

`LayerPlan` is the packing of one lowered layer (docs/FHE.md has the picture): the input is a
vector of length n' = 2^ceil(log2 n) repeated through the ciphertext, the weight matrix is cut
into D = min(m', n') generalised diagonals of length L = max(m', n') (the hybrid layout of
GAZELLE), multiplied baby-step/giant-step, and when m' < n' the partial sums are folded with
log2(n'/m') rotations. The result is again a repeated vector, of period m', which is exactly the
next layer's input layout: no re-encryption or decryption between layers. Several inputs share
one ciphertext by interleaving: slot = element * B + sample, with every rotation step times B.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelcloak.fhe.errors import FheError

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "DenseProgram",
    "LayerPlan",
    "LoweredLayer",
    "compile_onnx",
    "fit_relu",
    "plan_layers",
]

ACTIVATIONS = ("none", "square", "modified-square", "relu-poly")
_ACTIVATION_OPS = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Gelu", "Elu", "Selu", "Softplus", "HardSigmoid"}
_PASSTHROUGH_OPS = {"Identity", "Dropout"}


@dataclass(frozen=True)
class Activation:
    """A degree-<=2 activation a*x^2 + b*x + c, with the calibration range a ReLU fit used."""

    kind: str
    coeffs: tuple[float, float, float] = (0.0, 1.0, 0.0)  # a, b, c
    fit_range: tuple[float, float] | None = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        a, b, c = self.coeffs
        return a * x * x + b * x + c

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "coeffs": list(self.coeffs),
            "fit_range": list(self.fit_range) if self.fit_range else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Activation:
        fit = data.get("fit_range")
        return cls(str(data["kind"]), tuple(float(v) for v in data["coeffs"]), tuple(fit) if fit else None)  # type: ignore[arg-type]

    @classmethod
    def named(cls, kind: str) -> Activation:
        if kind == "none":
            return cls("none", (0.0, 1.0, 0.0))
        if kind == "square":
            return cls("square", (1.0, 0.0, 0.0))
        if kind == "modified-square":
            return cls("modified-square", (1.0, 1.0, 0.0))
        if kind == "relu-poly":
            raise FheError("the relu-poly activation is fitted to data: give calibration features")
        raise FheError(f"unknown activation {kind!r}; choose one of {', '.join(ACTIVATIONS)}")


def fit_relu(lo: float, hi: float, samples: np.ndarray | None = None) -> Activation:
    """Least-squares degree-2 fit of ReLU over [lo, hi].

    With `samples` (observed pre-activations) the fit minimises the error on those values, so it
    is most accurate where the data actually lies; without, on a uniform grid over the range.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        raise FheError(f"cannot fit ReLU on the range [{lo}, {hi}]")
    points = np.linspace(lo, hi, 1001)
    if samples is not None:
        flat = np.asarray(samples, dtype=np.float64).reshape(-1)
        if len(flat) > 200_000:  # plenty for three coefficients; keeps calibration fast
            flat = np.random.default_rng(0).choice(flat, 200_000, replace=False)
        points = np.concatenate([flat, points])  # the grid keeps the fit sane across the whole range
    a, b, c = np.polyfit(points, np.maximum(points, 0.0), 2)
    return Activation("relu-poly", (float(a), float(b), float(c)), (float(lo), float(hi)))


@dataclass(frozen=True)
class LoweredLayer:
    """y = W x + b, then optionally y^2: the only shape the FHE evaluator knows."""

    weight: np.ndarray  # [out, in] float64
    bias: np.ndarray  # [out] float64
    square_after: bool


@dataclass
class DenseProgram:
    """A dense stack: `weights[i]` is [out, in]; `activations[i]` sits between layer i and i+1."""

    weights: list[np.ndarray]
    biases: list[np.ndarray]
    activations: list[Activation] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.weights:
            raise FheError("the private part has no dense layer")
        if len(self.biases) != len(self.weights) or len(self.activations) != len(self.weights) - 1:
            raise FheError("a dense program needs one bias per layer and one activation between layers")
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if w.ndim != 2 or b.shape != (w.shape[0],):
                raise FheError(f"layer {i}: weight must be [out, in] and bias [out], got {w.shape} and {b.shape}")
            if not (np.all(np.isfinite(w)) and np.all(np.isfinite(b))):
                raise FheError(f"layer {i}: weights contain NaN or infinity")
            if i and w.shape[1] != self.weights[i - 1].shape[0]:
                raise FheError(
                    f"layer {i} takes {w.shape[1]} inputs but layer {i - 1} gives {self.weights[i - 1].shape[0]}"
                )
        self.weights = [np.asarray(w, dtype=np.float64) for w in self.weights]
        self.biases = [np.asarray(b, dtype=np.float64) for b in self.biases]

    @property
    def input_size(self) -> int:
        return int(self.weights[0].shape[1])

    @property
    def output_size(self) -> int:
        return int(self.weights[-1].shape[0])

    def forward(self, x: np.ndarray, upto: int | None = None) -> np.ndarray:
        """Plaintext reference in float64: logits [batch, out] (or pre-activations of layer `upto`)."""
        h = _as_batch(x, self.input_size)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = h @ w.T + b
            if upto == i:
                return h
            if i < len(self.activations):
                h = self.activations[i](h)
        return h

    def with_activation(self, kind: str, calibration: np.ndarray | None = None) -> DenseProgram:
        """The same layers with every activation replaced by `kind` (ReLU fits use `calibration`)."""
        program = DenseProgram(
            list(self.weights), list(self.biases), [Activation.named("none")] * (len(self.weights) - 1)
        )
        for i in range(len(self.weights) - 1):
            if kind == "relu-poly":
                if calibration is None or len(calibration) == 0:
                    raise FheError("the relu-poly activation is fitted to data: give calibration features")
                pre = program.forward(calibration, upto=i)
                program.activations[i] = fit_relu(float(pre.min()), float(pre.max()), pre)
            else:
                program.activations[i] = Activation.named(kind)
        return program

    def lower(self) -> list[LoweredLayer]:
        """Fold each polynomial activation into its neighbours so only squares remain (module doc)."""
        weights = [w.copy() for w in self.weights]
        biases = [b.copy() for b in self.biases]
        squares = [False] * len(weights)
        for i, act in enumerate(self.activations):
            a, b, c = act.coeffs
            nxt_w = weights[i + 1]
            if abs(a) < 1e-12:  # affine: W(b x + c) + bias
                biases[i + 1] = biases[i + 1] + nxt_w @ np.full(nxt_w.shape[1], c)
                weights[i + 1] = nxt_w * b
                continue
            shift = b / (2 * a)
            const = c - b * b / (4 * a)
            biases[i] = biases[i] + shift
            biases[i + 1] = biases[i + 1] + nxt_w @ np.full(nxt_w.shape[1], const)
            weights[i + 1] = nxt_w * a
            squares[i] = True
        return [LoweredLayer(w, b, s) for w, b, s in zip(weights, biases, squares)]

    def depth(self) -> int:
        """Multiplicative depth: one level per dense layer and one per non-affine activation."""
        return sum(1 + int(layer.square_after) for layer in self.lower())

    def to_json(self) -> dict[str, Any]:
        return {
            "layers": [[list(w.shape)] for w in self.weights],
            "activations": [a.to_json() for a in self.activations],
        }

    def save(self, path: str | Path) -> None:
        """Weights, biases and activations in one .npz (for fine-tuned heads)."""
        arrays = {f"w{i}": w for i, w in enumerate(self.weights)} | {f"b{i}": b for i, b in enumerate(self.biases)}
        import json

        arrays["activations"] = np.frombuffer(
            json.dumps([a.to_json() for a in self.activations]).encode(), dtype=np.uint8
        )
        # The keys are w<i>, b<i> and activations, never savez's own allow_pickle keyword.
        np.savez(path, **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: str | Path) -> DenseProgram:
        import json

        try:
            with np.load(path, allow_pickle=False) as data:
                n = sum(1 for k in data.files if k.startswith("w"))
                weights = [data[f"w{i}"] for i in range(n)]
                biases = [data[f"b{i}"] for i in range(n)]
                acts = [Activation.from_json(a) for a in json.loads(bytes(data["activations"]).decode())]
        except (OSError, KeyError, ValueError) as exc:
            raise FheError(f"{path}: not a dense program file ({exc})") from None
        return cls(weights, biases, acts)


def _as_batch(x: np.ndarray, size: int) -> np.ndarray:
    h = np.asarray(x, dtype=np.float64)
    h = h.reshape(len(h), -1) if h.ndim > 1 else h.reshape(1, -1)
    if h.shape[1] != size:
        raise FheError(f"features must have {size} values per sample, got {h.shape[1]}")
    if not np.all(np.isfinite(h)):
        raise FheError("features contain NaN or infinity")
    return h


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class LayerPlan:
    """Packing of one lowered layer; all steps are in elements (multiply by the batch for slots)."""

    n: int
    m: int
    n_pad: int
    m_pad: int
    baby: int  # b: baby steps (input rotations 0..b-1, reused by every giant step)
    giant: int  # G: giant steps
    square_after: bool

    @property
    def period(self) -> int:
        return max(self.n_pad, self.m_pad)

    @property
    def diagonals(self) -> int:
        return min(self.n_pad, self.m_pad)

    @property
    def fold_steps(self) -> list[int]:
        steps, s = [], self.period // 2
        while s >= self.m_pad:
            steps.append(s)
            s //= 2
        return steps

    def rotations(self) -> int:
        """Ciphertext rotations per evaluation when the input is encrypted."""
        return (self.baby - 1) + (self.giant - 1) + len(self.fold_steps)

    def key_switches(self) -> int:
        """Rotations plus relinearisations per evaluation with encrypted weights and input (one per giant step)."""
        return self.rotations() + self.giant

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "m": self.m, "baby": self.baby, "giant": self.giant, "square_after": self.square_after}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LayerPlan:
        return make_plan(int(data["n"]), int(data["m"]), bool(data["square_after"]), int(data["baby"]))


def make_plan(n: int, m: int, square_after: bool, baby: int | None = None) -> LayerPlan:
    if n < 1 or m < 1:
        raise FheError(f"a dense layer needs at least one input and output, got {n} -> {m}")
    n_pad, m_pad = _pow2(n), _pow2(m)
    d = min(n_pad, m_pad)
    b = baby if baby is not None else _cheapest_baby(d)
    if not 1 <= b <= d:
        raise FheError(f"baby steps must be 1..{d}, got {b}")
    return LayerPlan(n, m, n_pad, m_pad, b, -(-d // b), square_after)


def _cheapest_baby(d: int) -> int:
    """Baby steps b for D diagonals that need the fewest key switches with encrypted weights.

    A layer costs b - 1 baby rotations, G - 1 giant rotations and G relinearisations (one per
    giant step: a ciphertext-ciphertext sum must be relinearised before it can be rotated), with
    G = ceil(D / b); so minimise b + 2G rather than b + G (which b = sqrt(D) does). Ties go to the
    larger b: with plaintext features the baby steps are free encodings and only the G - 1 giant
    rotations remain. D = 64 gives b = 13, G = 5 (21 key switches before the folds instead of 22, and 4 giant
    rotations instead of 7 with plaintext features).
    """
    return min(range(1, d + 1), key=lambda b: (b + 2 * -(-d // b), -b))


def plan_layers(layers: Sequence[LoweredLayer]) -> list[LayerPlan]:
    return [make_plan(int(layer.weight.shape[1]), int(layer.weight.shape[0]), layer.square_after) for layer in layers]


def diagonals(weight: np.ndarray, plan: LayerPlan) -> np.ndarray:
    """The D generalised diagonals [D, L]: diag_i[j] = W[j mod m', (j + i) mod n'] (zero-padded W)."""
    padded = np.zeros((plan.m_pad, plan.n_pad))
    padded[: plan.m, : plan.n] = weight
    rows = np.arange(plan.period) % plan.m_pad
    i = np.arange(plan.diagonals)[:, None]
    cols = (np.arange(plan.period)[None, :] + i) % plan.n_pad
    return padded[rows[None, :], cols]


def spread(vector: np.ndarray, elements: int, batch: int) -> np.ndarray:
    """Repeat a period-length vector (or [batch, period] vectors) over `elements`, interleaved by sample."""
    v = np.atleast_2d(vector)
    reps = elements // v.shape[1]
    tiled = np.tile(v, (1, reps))  # [k, elements]
    if v.shape[0] == 1:
        return np.repeat(tiled[0], batch)
    out = np.zeros((elements, batch))
    out[:, : v.shape[0]] = tiled.T
    return out.reshape(-1)


# ---------------------------------------------------------------------------------------------
# ONNX import
# ---------------------------------------------------------------------------------------------


def compile_onnx(
    model: Any,
    activation: str = "square",
    calibration: np.ndarray | None = None,
) -> DenseProgram:
    """Read a private ONNX part made of Gemm / MatMul(+Add) layers with activations between them.

    `model` is an onnx.ModelProto, its bytes or a path. Flatten/Reshape are accepted only before
    the first dense layer (they turn the boundary tensor into features). Every activation node is
    replaced by `activation`; `relu-poly` fits ReLU on the pre-activation range `calibration`
    (features at the cut, [N, in]) produces. Anything else is refused, naming the node.
    """
    import onnx
    from onnx import numpy_helper

    try:
        if isinstance(model, (bytes, bytearray)):
            proto = onnx.load_from_string(bytes(model))
        elif isinstance(model, (str, Path)):
            proto = onnx.load(str(model))
        else:
            proto = model
        graph = proto.graph
    except Exception as exc:  # onnx raises DecodeError, OSError, ...: all mean "not a model"
        raise FheError(f"cannot read the private part as ONNX: {exc}") from None
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    inits[node.output[0]] = numpy_helper.to_array(attr.t).astype(np.float64)
    if len(graph.input) - sum(1 for i in graph.input if i.name in inits) != 1:
        raise FheError("the private part must have exactly one (feature) input")

    weights: list[np.ndarray] = []
    biases: list[np.ndarray] = []
    n_acts = 0
    pending_matmul = False
    for node in graph.node:
        op = node.op_type
        where = f"node {node.name or op!r} ({op})"
        if op == "Constant" or op in _PASSTHROUGH_OPS:
            continue
        if op in ("Flatten", "Reshape"):
            if weights:
                raise FheError(f"{where}: reshaping between dense layers is not supported under FHE")
            continue
        if op == "Gemm":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transA", 0):
                raise FheError(f"{where}: transA is not supported")
            w = _initializer(inits, node.input[1], where)
            w = w.T if not attrs.get("transB", 0) else w  # to [out, in]
            w = w * float(attrs.get("alpha", 1.0))
            b = np.zeros(w.shape[0])
            if len(node.input) > 2 and node.input[2]:
                b = np.broadcast_to(_initializer(inits, node.input[2], where).reshape(-1), (w.shape[0],)) * float(
                    attrs.get("beta", 1.0)
                )
            _add_layer(weights, biases, n_acts, w, b, where)
        elif op == "MatMul":
            w = _initializer(inits, node.input[1], where).T
            _add_layer(weights, biases, n_acts, w, np.zeros(w.shape[0]), where)
            pending_matmul = True
            continue
        elif op == "Add":
            if not pending_matmul:
                raise FheError(f"{where}: an Add must follow a MatMul (the bias)")
            other = node.input[1] if node.input[1] in inits else node.input[0]
            biases[-1] = biases[-1] + np.broadcast_to(_initializer(inits, other, where).reshape(-1), biases[-1].shape)
        elif op in _ACTIVATION_OPS:
            if len(weights) != n_acts + 1:
                raise FheError(f"{where}: an activation must follow a dense layer")
            n_acts += 1
        else:
            raise FheError(f"{where}: the fhe scheme runs dense stacks only (Gemm, MatMul+Add, activations)")
        pending_matmul = False
    if not weights:
        raise FheError("the private part has no dense layer (Gemm or MatMul)")
    if n_acts >= len(weights):
        raise FheError("an activation after the last dense layer is not supported; the head must end in logits")
    program = DenseProgram(weights, biases, [Activation.named("none")] * (len(weights) - 1))
    return program.with_activation(activation, calibration)


def _initializer(inits: dict[str, np.ndarray], name: str, where: str) -> np.ndarray:
    if name not in inits:
        raise FheError(f"{where}: weight {name!r} is not a constant; only fixed weights can be encrypted")
    return inits[name]


def _add_layer(weights: list, biases: list, n_acts: int, w: np.ndarray, b: np.ndarray, where: str) -> None:
    if w.ndim != 2:
        raise FheError(f"{where}: weight must be 2-D, got shape {w.shape}")
    if weights and len(weights) != n_acts:
        # Two dense layers without an activation between them: merge them (exact, saves a level).
        prev_w, prev_b = weights[-1], biases[-1]
        weights[-1], biases[-1] = w @ prev_w, w @ prev_b + b
        return
    weights.append(w)
    biases.append(np.asarray(b, dtype=np.float64))
