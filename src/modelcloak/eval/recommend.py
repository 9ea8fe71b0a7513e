"""`modelcloak recommend`: answer eNNclave's open question, "where to stop".

For each candidate cut we measure, and keep as evidence: the latency of the split against the
whole model (interleaved rounds through the real enclaves, `splits.interleaved_latency_ratios`;
the median over rounds decides), the private part's size against the enclave's memory budget,
and how well the best attacker at the cut rebuilds the private part at the owner's budget and
output policy (`sweep.sweep_model`, repeated over seeds; the best of the cut's attacks and the
black-box one, with a 95% interval). Measuring (`recommend`) and judging (`choose`) are separate,
so the same evidence can be judged against other targets without re-running anything.

What makes the answer stable (the same data and targets gave cuts 7, 5, 1, 0 and 7 in five runs
when one latency sample per cut decided):

- the attacks are seeded, so the fidelity evidence is identical from run to run;
- a cut meets the fidelity target only if the upper end of its interval does;
- cuts that keep the same private weights (they differ only in parameter-free operations such as
  a ReLU or a reshape at the boundary) get the same, worst, fidelity: the attacker at the earlier
  of them can apply those operations themselves, so a difference between them measures the
  surrogate, not the protection;
- latency is a median over interleaved rounds, and a cut whose lower quartile is within 25% of
  the fastest cut's upper quartile counts as equally fast; among those the lowest attacker
  fidelity wins, then the smallest private part, then the earlier cut. Noise decides nothing
  the measurements cannot tell apart.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx

from modelcloak.errors import ModelcloakError
from modelcloak.eval.errors import EvalError
from modelcloak.eval.stats import Interval, Spread, spread
from modelcloak.eval.sweep import DEFAULT_SEEDS, AttackerData
from modelcloak.model import load_model
from modelcloak.model.cut import candidate_cuts

# Latencies closer than this (relative, between one cut's lower quartile and the fastest cut's
# upper quartile) count as equal: per-round ratios on a busy machine spread by tens of percent,
# and a split already costs several times the whole model, so a smaller difference is neither
# measurable here nor worth trading protection for.
LATENCY_MARGIN = 0.25


@dataclass(frozen=True)
class Targets:
    """What the owner asks of a cut; impossible targets are refused when built."""

    max_fidelity: float = 0.5  # the attacker's agreement with the victim at `attack_budget` queries
    attack_budget: int = 500
    policy: str = "label"  # the enclave's output policy the attacker faces
    max_latency_ratio: float | None = None  # split total / whole model at `batch`; None: no latency target
    batch: int = 1
    enclave_memory_bytes: int = 64 * 1024 * 1024  # an SGX EPC-sized budget by default

    def __post_init__(self) -> None:
        from modelcloak.options import coerce_policy

        if not isinstance(self.max_fidelity, (int, float)) or not 0.0 < self.max_fidelity <= 1.0:
            raise EvalError(
                f"the fidelity target must be in (0, 1] (the share of test samples on which the attacker agrees "
                f"with the victim), got {self.max_fidelity!r}"
            )
        if isinstance(self.attack_budget, bool) or not isinstance(self.attack_budget, int) or self.attack_budget < 0:
            raise EvalError(f"the attack budget must be an integer >= 0, got {self.attack_budget!r}")
        if self.max_latency_ratio is not None and not (
            isinstance(self.max_latency_ratio, (int, float)) and self.max_latency_ratio >= 1.0
        ):
            raise EvalError(
                f"the latency target must be a ratio >= 1 (a split runs every layer of the model plus the enclave "
                f"round trip, so it is never faster than the whole model), got {self.max_latency_ratio!r}"
            )
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise EvalError(f"the batch must be an integer >= 1, got {self.batch!r}")
        if not self.enclave_memory_bytes > 0:
            raise EvalError(f"the enclave memory budget must be positive, got {self.enclave_memory_bytes!r}")
        try:
            coerce_policy({"output": self.policy})
        except ModelcloakError as exc:  # the options room's error, restated as a target that cannot be met
            raise EvalError(f"output policy {self.policy!r}: {exc}") from None


@dataclass
class CutAdvice:
    cut: int
    after_node: str
    private_parameters: int
    private_weight_bytes: int
    boundary_bytes: int
    latency: Spread  # split/whole ratio over interleaved rounds
    fidelity: Interval  # the best attacker's, worst over cuts with the same private weights
    accuracy: Interval  # the best attacker's surrogate accuracy at this cut
    measured_fidelity: Interval  # the best attacker's at this cut alone
    best_attacks: str  # which attack was best, per seed
    same_weights_as: list[int] = field(default_factory=list)  # other cuts keeping the same private weights
    meets: bool = False
    reasons: list[str] = field(default_factory=list)

    @property
    def latency_ratio(self) -> float:
        return self.latency.median

    @property
    def attacker_fidelity(self) -> float:
        return self.fidelity.mean

    def to_row(self) -> dict[str, Any]:
        """A flat record for CSV."""
        return {
            "cut": self.cut,
            "after_node": self.after_node,
            "private_parameters": self.private_parameters,
            "private_weight_bytes": self.private_weight_bytes,
            "boundary_bytes": self.boundary_bytes,
            "latency_median": round(self.latency.median, 4),
            "latency_q1": round(self.latency.q1, 4),
            "latency_q3": round(self.latency.q3, 4),
            "latency_rounds": self.latency.n,
            "fidelity_mean": round(self.fidelity.mean, 4),
            "fidelity_low": round(self.fidelity.low, 4),
            "fidelity_high": round(self.fidelity.high, 4),
            "measured_fidelity_mean": round(self.measured_fidelity.mean, 4),
            "accuracy_mean": round(self.accuracy.mean, 4),
            "seeds": self.fidelity.n,
            "best_attacks": self.best_attacks,
            "same_weights_as": " ".join(map(str, self.same_weights_as)),
            "meets": self.meets,
            "reasons": "; ".join(self.reasons),
        }


@dataclass
class Recommendation:
    targets: Targets
    cuts: list[CutAdvice]
    chosen: CutAdvice | None
    suggestions: list[str]
    evidence: Any = None  # the sweep's rows (ExtractionResult), for the extraction report


def recommend(
    model: str | Path | onnx.ModelProto,
    data: AttackerData,
    *,
    targets: Targets = Targets(),
    cuts: Sequence[int] | None = None,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    rounds: int = 7,
    calls: int = 5,
    progress: bool = False,
    console: Any = None,
    on_step: Callable[[str], None] | None = None,
) -> Recommendation:
    """Measure every chosen cut (default: all) and pick the cheapest one that meets `targets`."""
    from modelcloak.eval.extraction import BEST, _progress, summarise
    from modelcloak.eval.splits import interleaved_latency_ratios
    from modelcloak.eval.sweep import sweep_model

    proto = load_model(model)
    candidates = candidate_cuts(proto)
    if not candidates:
        raise EvalError("the model has no valid cut")
    chosen_cuts = list(range(len(candidates))) if cuts is None else list(cuts)
    for index in chosen_cuts:
        if not 0 <= index < len(candidates):
            raise EvalError(f"cut index {index} is out of range (0..{len(candidates) - 1})")
    with _progress(progress, console) as bar:
        task = bar.add_task("latency", total=len(chosen_cuts) + rounds) if bar else None

        def step(description: str) -> None:
            if bar is not None:
                bar.update(task, advance=1, description=description)
            if on_step is not None:
                on_step(description)

        ratios = interleaved_latency_ratios(
            proto, cuts=chosen_cuts, batch=targets.batch, rounds=rounds, calls=calls, on_step=step
        )
    swept = sweep_model(
        proto,
        data,
        cuts=chosen_cuts,
        policies=[targets.policy],
        budgets=[targets.attack_budget],
        seeds=seeds,
        progress=progress,
        console=console,
    )
    best = {s.cut: s for s in summarise(swept.rows) if s.attack == BEST}
    advice = []
    for index in chosen_cuts:
        cut, summary = candidates[index], best[index]
        advice.append(
            CutAdvice(
                cut=index,
                after_node=cut.after_node,
                private_parameters=cut.private_parameters,
                private_weight_bytes=cut.private_weight_bytes,
                boundary_bytes=cut.boundary_bytes,
                latency=spread(ratios[index]),
                fidelity=summary.fidelity,
                accuracy=summary.accuracy,
                measured_fidelity=summary.fidelity,
                best_attacks=summary.note,
            )
        )
    result = choose(proto, _merge_same_weights(advice), targets)
    result.evidence = swept
    return result


def _merge_same_weights(advice: list[CutAdvice]) -> list[CutAdvice]:
    """Give cuts that keep the same private weights the worst (highest) fidelity among them.

    Candidate cuts are prefixes of one node order, so their private parts are nested: two cuts
    with the same private parameter count keep the same weights and differ only in
    parameter-free operations between them.
    """
    groups: dict[int, list[CutAdvice]] = {}
    for a in advice:
        groups.setdefault(a.private_parameters, []).append(a)
    merged = []
    for a in advice:
        peers = groups[a.private_parameters]
        worst = max(peers, key=lambda p: (p.fidelity.mean, p.fidelity.high))
        merged.append(replace(a, fidelity=worst.fidelity, same_weights_as=[p.cut for p in peers if p.cut != a.cut]))
    return merged


def choose(model: onnx.ModelProto, measured: list[CutAdvice], targets: Targets) -> Recommendation:
    """Judge measured cuts against `targets` (no new measurement); see the module docstring for the rule."""
    advice = []
    for a in measured:
        reasons = []
        if a.fidelity.high > targets.max_fidelity:
            bound = "" if not a.fidelity.has_interval else f" (95% interval up to {a.fidelity.high:.2f})"
            reasons.append(f"attacker fidelity {a.fidelity.mean:.2f}{bound} > {targets.max_fidelity:.2f}")
        if targets.max_latency_ratio is not None and a.latency.median > targets.max_latency_ratio:
            reasons.append(f"latency {a.latency.median:.2f}x > {targets.max_latency_ratio:.2f}x")
        if a.private_weight_bytes > targets.enclave_memory_bytes:
            reasons.append(f"private part {a.private_weight_bytes:,} B > enclave budget")
        advice.append(replace(a, meets=not reasons, reasons=reasons))
    meeting = [a for a in advice if a.meets]
    chosen = None
    if meeting:
        fastest = min(meeting, key=lambda a: a.latency.median)
        as_fast = [a for a in meeting if a.latency.q1 <= fastest.latency.q3 * (1 + LATENCY_MARGIN)]
        chosen = min(as_fast, key=lambda a: (a.fidelity.mean, a.private_weight_bytes, a.cut))
    return Recommendation(targets, advice, chosen, [] if chosen else _suggestions(model, advice, targets))


def _suggestions(model: onnx.ModelProto, advice: list[CutAdvice], targets: Targets) -> list[str]:
    from modelcloak.model.cut import split_model

    cuts = candidate_cuts(model)
    smallest_private = split_model(model, cuts[-1])[1] if cuts else None
    dense_ops = {"Gemm", "MatMul", "Add", "Relu", "Softmax", "Identity", "Flatten", "Reshape"}
    dense_only = smallest_private is not None and {n.op_type for n in smallest_private.graph.node} <= dense_ops
    ideas = []
    if all(a.fidelity.high > targets.max_fidelity for a in advice):
        ideas.append(
            "every cut lets the attacker exceed the fidelity target: lower the enclave's query budget or "
            "use a stricter output policy (label instead of topk/scores)"
        )
        if dense_only:
            ideas.append("the private layers are dense: the fhe scheme keeps them encrypted even from the device")
        ideas.append("the lock scheme makes a leaked copy useless on other hardware")
    if targets.max_latency_ratio is not None and all(a.latency.median > targets.max_latency_ratio for a in advice):
        fastest = min(a.latency.median for a in advice)
        ideas.append(
            f"every cut is slower than the latency target (the fastest measured {fastest:.2f}x): batch requests, "
            "or accept a higher ratio"
        )
    if all(a.private_weight_bytes > targets.enclave_memory_bytes for a in advice):
        ideas.append("no private part fits the enclave memory budget: raise it or cut later")
    return ideas


# ------------------------------------------------------------------------------------------------
# Evidence


def write_recommendation(result: Recommendation, out_dir: Path, *, title: str, setup: str = "") -> dict[str, Path]:
    """`recommend.md` (targets, every cut, the answer and why), `recommend.csv` and `recommend.png`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / f"recommend.{kind}" for kind in ("md", "csv", "png")}
    records = [a.to_row() for a in result.cuts]
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]) if records else ["cut"])
        writer.writeheader()
        writer.writerows(records)
    paths["md"].write_text(_markdown(result, title, setup))
    _plot(result, paths["png"], title)
    return paths


def _answer(result: Recommendation) -> list[str]:
    if result.chosen is not None:
        c = result.chosen
        return [
            f"**Recommended: cut {c.cut}** (after `{c.after_node}`, `--cut-index {c.cut}`): attacker fidelity "
            f"{c.fidelity.text(2)}, latency {c.latency.median:.2f}x (quartiles {c.latency.q1:.2f} to "
            f"{c.latency.q3:.2f}), private part {c.private_parameters:,} parameters."
        ]
    return ["**No cut meets every target.**", ""] + [f"- {idea}" for idea in result.suggestions]


def _markdown(result: Recommendation, title: str, setup: str) -> str:
    t = result.targets
    seeds = max((a.fidelity.n for a in result.cuts), default=0)
    rounds = max((a.latency.n for a in result.cuts), default=0)
    latency_target = "none" if t.max_latency_ratio is None else f"{t.max_latency_ratio:g}x"
    lines = [f"# {title}", ""]
    if setup:
        lines += [setup, ""]
    lines += [
        f"Targets: attacker fidelity at most {t.max_fidelity:g} at {t.attack_budget:,} queries under the "
        f"`{t.policy}` policy; latency ratio (split / whole, batch {t.batch}) at most {latency_target}; private "
        f"weights at most {t.enclave_memory_bytes:,} bytes.",
        "",
        *_answer(result),
        "",
        f"Fidelity: the best attacker at the cut (its own attacks or the black-box one), mean over {seeds} "
        "seed(s) with a 95% interval; a cut meets the target only if the upper end does. Cuts that keep the "
        "same private weights share the worst of their fidelities. Latency: median of the split/whole ratio "
        f"over {rounds} interleaved round(s), with quartiles; a cut whose lower quartile is within 25% of the "
        "fastest cut's upper quartile counts as equally fast, and among them the lowest fidelity, then the "
        "smallest private part wins.",
        "",
        "| cut | after | private params | latency x (quartiles) | attacker fidelity [95%] | measured here "
        "| same weights as | best attack | meets | why not |",
        "|---:|---|---:|---|---|---|---|---|---|---|",
    ]
    for a in result.cuts:
        lines.append(
            f"| {a.cut} | {a.after_node} | {a.private_parameters:,} | {a.latency.median:.2f} ({a.latency.q1:.2f}-"
            f"{a.latency.q3:.2f}) | {a.fidelity.text(3)} | {a.measured_fidelity.text(3)} | "
            f"{' '.join(map(str, a.same_weights_as)) or '—'} | {a.best_attacks} | {'yes' if a.meets else 'no'} | "
            f"{'; '.join(a.reasons)} |"
        )
    return "\n".join(lines) + "\n"


def _plot(result: Recommendation, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = result.targets
    cuts = [a.cut for a in result.cuts]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    colours = ["tab:green" if a.meets else "tab:red" for a in result.cuts]
    for a, colour in zip(result.cuts, colours):
        left.errorbar(
            [a.cut],
            [a.fidelity.mean],
            yerr=[[a.fidelity.mean - a.fidelity.low], [a.fidelity.high - a.fidelity.mean]],
            fmt="o",
            color=colour,
            capsize=3,
        )
        right.errorbar(
            [a.cut],
            [a.latency.median],
            yerr=[[a.latency.median - a.latency.q1], [a.latency.q3 - a.latency.median]],
            fmt="s",
            color=colour,
            capsize=3,
        )
    left.axhline(t.max_fidelity, color="k", linestyle="--", label=f"target {t.max_fidelity:g}")
    left.set_ylim(0, 1.05)
    left.set_ylabel(f"best attacker's fidelity at {t.attack_budget} queries ({t.policy})\nmean, 95% interval")
    if t.max_latency_ratio is not None:
        right.axhline(t.max_latency_ratio, color="k", linestyle="--", label=f"target {t.max_latency_ratio:g}x")
    right.set_ylabel(f"split / whole latency, batch {t.batch}\nmedian, quartiles")
    for axis in (left, right):
        axis.set_xticks(cuts, [str(c) for c in cuts])
        axis.set_xlabel("cut index (later = smaller private part); green: meets every target")
        axis.grid(alpha=0.3)
        if result.chosen is not None:
            axis.axvline(result.chosen.cut, color="tab:green", alpha=0.3, linewidth=8, label="recommended")
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def as_json(result: Recommendation) -> dict[str, Any]:
    """The recommendation as plain data (targets, every cut, the answer)."""
    return {
        "targets": asdict(result.targets),
        "cuts": [a.to_row() for a in result.cuts],
        "chosen": None if result.chosen is None else result.chosen.cut,
        "suggestions": result.suggestions,
    }
