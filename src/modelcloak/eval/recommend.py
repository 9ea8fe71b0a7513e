"""`modelcloak recommend`: answer eNNclave's open question, "where to stop".

For each candidate cut we measure three things and keep the evidence: the latency overhead of the
split against the whole model (through the real enclave, `splits.bench_splits`), the private
part's size against the enclave's memory budget, and how well a label-only attacker with the
public layers and a query budget can rebuild the private part (`extraction.attack_bundle`). The
recommendation is the cheapest cut (lowest latency overhead) that meets every target; when none
does, we say so and say what else to try.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from modelcloak.errors import ModelcloakError
from modelcloak.keys import generate_key_file
from modelcloak.model import load_model
from modelcloak.model.cut import candidate_cuts
from modelcloak.protector import protect


@dataclass(frozen=True)
class Targets:
    """What the owner asks of a cut."""

    max_fidelity: float = 0.5  # attacker's agreement with the victim at `attack_budget` queries
    attack_budget: int = 500
    policy: str = "label"
    max_latency_ratio: float = 1.5  # split total / whole model, at `batch`
    batch: int = 1
    enclave_memory_bytes: int = 64 * 1024 * 1024  # an SGX EPC-sized budget by default


@dataclass
class CutAdvice:
    cut: int
    after_node: str
    private_parameters: int
    private_weight_bytes: int
    boundary_bytes: int
    latency_ratio: float
    attacker_fidelity: float
    attacker_accuracy: float
    meets: bool
    reasons: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Recommendation:
    targets: Targets
    cuts: list[CutAdvice]
    chosen: CutAdvice | None
    suggestions: list[str]


def _suggestions(model: onnx.ModelProto, advice: list[CutAdvice], targets: Targets) -> list[str]:
    from modelcloak.model.cut import split_model

    cuts = candidate_cuts(model)
    smallest_private = split_model(model, cuts[-1])[1] if cuts else None
    dense_ops = {"Gemm", "MatMul", "Add", "Relu", "Softmax", "Identity", "Flatten", "Reshape"}
    dense_only = smallest_private is not None and {n.op_type for n in smallest_private.graph.node} <= dense_ops
    ideas = []
    if all(a.attacker_fidelity > targets.max_fidelity for a in advice):
        ideas.append(
            "every cut lets the attacker exceed the fidelity target: lower the enclave's query budget or "
            "use a stricter output policy (label instead of topk/scores)"
        )
        if dense_only:
            ideas.append("the private layers are dense: the fhe scheme keeps them encrypted even from the device")
        ideas.append("the lock scheme makes a leaked copy useless on other hardware")
    if all(a.latency_ratio > targets.max_latency_ratio for a in advice):
        ideas.append("every cut is slower than the latency target: batch requests, or accept a later cut")
    if all(a.private_weight_bytes > targets.enclave_memory_bytes for a in advice):
        ideas.append("no private part fits the enclave memory budget: raise it or cut later")
    return ideas


def recommend(
    model: str | Path | onnx.ModelProto,
    *,
    pool_x: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    targets: Targets = Targets(),
    cuts: Sequence[int] | None = None,
    repeats: int = 10,
    seed: int = 0,
    on_step: Callable[[str], None] | None = None,
) -> Recommendation:
    """Measure every chosen cut and pick the cheapest one that meets `targets`."""
    from modelcloak.eval.extraction import attack_bundle
    from modelcloak.eval.splits import bench_splits

    proto = load_model(model)
    candidates = candidate_cuts(proto)
    if not candidates:
        raise ModelcloakError("the model has no valid cut")
    chosen_cuts = list(range(len(candidates))) if cuts is None else list(cuts)
    timing = {
        row["cut"]: row
        for row in bench_splits(proto, cuts=chosen_cuts, batches=(targets.batch,), repeats=repeats, on_step=on_step)
    }
    advice: list[CutAdvice] = []
    with tempfile.TemporaryDirectory(prefix="modelcloak-recommend-") as scratch:
        folder = Path(scratch)
        host, enclave = generate_key_file(folder / "host.key"), generate_key_file(folder / "enclave.key")
        for index in chosen_cuts:
            cut = candidates[index]
            if on_step:
                on_step(f"attacking cut {index} ({targets.policy}, {targets.attack_budget} queries)")
            bundle = folder / f"cut{index}.mcb"
            protect(
                proto,
                bundle,
                key=host,
                scheme="split",
                cut={"index": index},
                enclave_key=enclave,
                policy={"output": targets.policy},
                verify=False,
            )
            results = attack_bundle(
                bundle,
                host_key=host,
                enclave_key_file=enclave.path,
                pool_x=pool_x,
                test_x=test_x,
                test_y=test_y,
                budgets=[targets.attack_budget],
                cut_index=index,
                seed=seed,
            )
            knockoff = [r for r in results if r.attack == "knockoff"]
            best = max(knockoff, key=lambda r: r.fidelity)
            advice.append(
                CutAdvice(
                    index,
                    cut.after_node,
                    cut.private_parameters,
                    cut.private_weight_bytes,
                    cut.boundary_bytes,
                    timing[index]["total_vs_whole"],
                    best.fidelity,
                    best.accuracy,
                    meets=False,
                )
            )
    return choose(proto, advice, targets)


def choose(model: onnx.ModelProto, measured: list[CutAdvice], targets: Targets) -> Recommendation:
    """Judge measured cuts against `targets` (no new measurement): the cheapest cut meeting all."""
    advice = []
    for a in measured:
        reasons = []
        if a.attacker_fidelity > targets.max_fidelity:
            reasons.append(f"attacker fidelity {a.attacker_fidelity:.2f} > {targets.max_fidelity:.2f}")
        if a.latency_ratio > targets.max_latency_ratio:
            reasons.append(f"latency {a.latency_ratio:.2f}x > {targets.max_latency_ratio:.2f}x")
        if a.private_weight_bytes > targets.enclave_memory_bytes:
            reasons.append(f"private part {a.private_weight_bytes:,} B > enclave budget")
        advice.append(CutAdvice(**{**a.to_json(), "meets": not reasons, "reasons": reasons}))
    meeting = [a for a in advice if a.meets]
    chosen = min(meeting, key=lambda a: (a.latency_ratio, a.private_weight_bytes)) if meeting else None
    return Recommendation(targets, advice, chosen, [] if chosen else _suggestions(model, advice, targets))
