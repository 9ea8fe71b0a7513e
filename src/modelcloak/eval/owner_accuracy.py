"""`modelcloak eval accuracy MODEL.onnx --data FILE.npz`: the eNNclave price on the owner's own model.

The shipped tasks (`accuracy.run_accuracy`) measure the price on our data; an owner wants it for
their model, their data and the cuts they consider. At each chosen cut of MODEL.onnx:

- "fixed": the layers before the cut keep MODEL's weights and run as the real public part of the
  split (onnxruntime, cached over the data); the private part is re-initialised and trained on
  the owner's training data. Only the private part needs the enclave: the public weights are the
  ones that ship in clear at that cut anyway, so they must be weights the owner may publish
  (e.g. a public pretrained extractor). The report says this.
- "flexible": from the fixed model, every weight is fine-tuned on the owner's data ("linear
  probe, then fine-tune", as in the shipped tasks); every weight then saw private data and
  belongs in the enclave.

Beside them the report gives MODEL's own test accuracy as given. Cuts that leave the same
weights private (a cut after a Conv, its ReLU or its pooling) give the same function class to
train, so by default one cut per distinct private weight set is measured: the latest of them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from modelcloak.eval.accuracy import AccuracyResult, _accuracy_of, _fit, _reproducible, _Run
from modelcloak.eval.errors import EvalError
from modelcloak.training import progress_bar

FIXED_LR = 3e-3  # as the shipped MNIST task; 1e-3 left a fresh head on 600 digits at 67% where 3e-3 reached 77%
FINETUNE_LR = 1e-4  # flexible continues from the fixed model at a lower rate
BATCH = 64
DEFAULT_EPOCHS = {"fixed": 10, "flexible": 5}
# ... but at least this many optimiser steps, so a small data set is fitted too (600 digits in
# 10 epochs are 100 steps: a fresh head reached 32% where 500 steps reached 88%).
MIN_STEPS = {"fixed": 500, "flexible": 200}
_FEATURE_BATCH = 256


@dataclass(frozen=True)
class OwnerData:
    """The owner's labelled data: the private training set and a held-out test set."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    source: str


def owner_data(arrays: Mapping[str, np.ndarray], source: str) -> OwnerData:
    """Check an owner's arrays (`train_x`, `train_y`, `test_x`, `test_y`) and keep them."""
    missing = {"train_x", "train_y", "test_x", "test_y"} - set(arrays)
    if missing:
        raise EvalError(
            f"{source} must hold arrays train_x, train_y, test_x and test_y (your private training data and a "
            f"held-out test set); missing: {', '.join(sorted(missing))}"
        )
    parts = {name: np.asarray(arrays[name]) for name in ("train_x", "train_y", "test_x", "test_y")}
    for split in ("train", "test"):
        x, y = parts[f"{split}_x"], parts[f"{split}_y"]
        if len(x) == 0:
            raise EvalError(f"{split}_x in {source} is empty")
        if len(x) != len(y):
            raise EvalError(f"{split}_x and {split}_y in {source} differ in length: {len(x)} vs {len(y)}")
        if y.ndim != 1 or y.dtype.kind not in "iu" or y.min() < 0:
            raise EvalError(
                f"{split}_y in {source} must be non-negative integer class labels [N], got {y.dtype} {y.shape}"
            )
    if parts["train_x"].shape[1:] != parts["test_x"].shape[1:]:
        raise EvalError(
            f"train_x and test_x in {source} differ in sample shape: {parts['train_x'].shape[1:]} vs "
            f"{parts['test_x'].shape[1:]}"
        )
    return OwnerData(source=source, **parts)


@dataclass
class OwnerAccuracy:
    results: list[AccuracyResult]  # per cut: fixed, then flexible; `task` is the cut's label
    given_accuracy: float  # MODEL as given, on the test set
    setup: str  # the report's paragraph on what was measured and assumed


def distinct_cuts(model: onnx.ModelProto) -> list[int]:
    """One candidate cut per distinct set of private weights, the latest of each (smallest enclave work)."""
    from modelcloak.eval.onnx_torch import trainable_roles
    from modelcloak.model.cut import candidate_cuts, split_model

    latest: dict[frozenset[str], int] = {}
    for cut in candidate_cuts(model):
        _, private = split_model(model, cut)
        latest[frozenset(trainable_roles(private.graph))] = cut.index
    return sorted(latest.values())


def run_owner_accuracy(
    model: str | Path | onnx.ModelProto,
    data: OwnerData,
    *,
    cuts: Sequence[int] | None = None,
    seed: int = 0,
    epochs: int | None = None,
    threads: int = 1,
    progress: bool = True,
    console: Any = None,
) -> OwnerAccuracy:
    """Fixed and flexible at every chosen cut (default: `distinct_cuts`); see the module docstring.

    `epochs` overrides the passes over the training data of both modes (default
    `DEFAULT_EPOCHS`, raised to `MIN_STEPS`). Seeded and deterministic like the shipped tasks.
    `threads` are torch's intra-op threads while training: one by default, because the steps of
    small models are too short to share (on two busy cores, a dense head took 26 s of CPU with
    two threads where one took 2 s).
    """
    if epochs is not None and epochs < 1:  # refused before torch is imported
        raise EvalError(f"epochs must be at least 1, got {epochs}")

    import onnxruntime as ort

    from modelcloak.eval.onnx_torch import OnnxModule
    from modelcloak.model import load_model, signature
    from modelcloak.model.cut import candidate_cuts, split_model

    proto = load_model(model)
    inputs = signature(proto).inputs
    if len(inputs) != 1:
        raise EvalError(f"eval accuracy takes models with one input array; this model has {len(inputs)}")
    candidates = candidate_cuts(proto)
    if not candidates:
        raise EvalError("the model has no valid cut")
    chosen = distinct_cuts(proto) if cuts is None else list(dict.fromkeys(cuts))
    for index in chosen:
        if not 0 <= index < len(candidates):
            raise EvalError(f"cut index {index} is out of range (0..{len(candidates) - 1})")
    input_name, dtype = inputs[0].name, np.dtype(inputs[0].dtype)
    train_x, test_x = data.train_x.astype(dtype, copy=False), data.test_x.astype(dtype, copy=False)
    expected = tuple(d if isinstance(d, int) else None for d in inputs[0].shape[1:])
    if len(expected) != train_x.ndim - 1 or any(e not in (None, s) for e, s in zip(expected, train_x.shape[1:])):
        raise EvalError(f"the model takes samples of shape {expected}; the data holds {train_x.shape[1:]}")

    whole_check = OnnxModule(proto, what="the model")
    plain = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])

    def run_plain(batch: np.ndarray) -> np.ndarray:
        return plain.run(None, {input_name: np.ascontiguousarray(batch)})[0]

    sample = test_x[: min(16, len(test_x))]
    whole_check.check_against(run_plain, sample, what="the model")
    given_logits = np.concatenate(
        [run_plain(test_x[i : i + _FEATURE_BATCH]) for i in range(0, len(test_x), _FEATURE_BATCH)]
    )
    n_classes = given_logits.shape[-1]
    top = int(max(data.train_y.max(), data.test_y.max()))
    if given_logits.ndim != 2 or top >= n_classes:
        raise EvalError(
            f"the model's first output has shape {given_logits.shape[1:]} per sample; labels up to {top} need "
            f"[{top + 1}] class scores or more"
        )
    given_accuracy = float(np.mean(given_logits.argmax(axis=1) == data.test_y))
    total = whole_check.trainable_parameters
    results: list[AccuracyResult] = []
    started = time.perf_counter()
    with _reproducible(seed), progress_bar(progress, console) as bar:
        import torch

        torch.set_num_threads(max(1, threads))  # _reproducible restores the caller's count
        run = _Run(seed=seed, epochs=epochs, bar=bar, max_train=None, max_test=None)
        for index in chosen:
            cut = candidates[index]
            public, private = split_model(proto, cut)
            label = f"cut {index}"
            results += _at_cut(
                label, public, private, proto, input_name, train_x, data.train_y, test_x, data.test_y, run, total,
                OnnxModule,
            )  # fmt: skip
    seconds = time.perf_counter() - started
    setup = _setup(
        data, proto, candidates, chosen, cuts is None, given_accuracy, seconds, run_epochs(epochs, len(train_x))
    )
    return OwnerAccuracy(results, given_accuracy, setup)


def run_epochs(epochs: int | None, n_train: int) -> dict[str, int]:
    """Epochs per mode: as asked, or the default raised until it makes `MIN_STEPS` steps."""
    if epochs is not None:
        return {mode: epochs for mode in DEFAULT_EPOCHS}
    per_epoch = -(-n_train // BATCH)
    return {mode: max(default, -(-MIN_STEPS[mode] // per_epoch)) for mode, default in DEFAULT_EPOCHS.items()}


def _boundary(
    public: onnx.ModelProto, input_name: str, x: np.ndarray, names: Sequence[str], run: _Run, what: str
) -> list[Any]:
    """The private part's inputs over `x`: public outputs through onnxruntime, graph inputs as they are."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(public.SerializeToString(), providers=["CPUExecutionProvider"])
    produced = [o.name for o in public.graph.output]
    advance = run.step(what, total=len(x))
    pieces: dict[str, list[np.ndarray]] = {name: [] for name in produced}
    for start in range(0, len(x), _FEATURE_BATCH):
        batch = np.ascontiguousarray(x[start : start + _FEATURE_BATCH])
        for name, value in zip(produced, session.run(produced, {input_name: batch})):
            pieces[name].append(value)
        advance(len(batch))
    arrays = {name: np.concatenate(parts) for name, parts in pieces.items()}
    arrays[input_name] = x
    return [torch.from_numpy(np.ascontiguousarray(arrays[name])) for name in names]


def _at_cut(
    label: str,
    public: onnx.ModelProto,
    private: onnx.ModelProto,
    whole: onnx.ModelProto,
    input_name: str,
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    run: _Run,
    total: int,
    module_type: Any,
) -> list[AccuracyResult]:
    import torch

    loss_fn = torch.nn.CrossEntropyLoss()
    targets = torch.from_numpy(train_y.astype(np.int64))
    n_train, n_test = len(train_x), len(test_x)
    epochs = run_epochs(run.epochs, n_train)

    # fixed: the real public part, cached; the private part re-initialised and trained on it.
    head = module_type(private, what=f"the private part at {label}")
    names = head.graph.inputs
    start = time.perf_counter()
    features = _boundary(public, input_name, train_x, names, run, f"{label} fixed: public part (train)")
    head.reinitialise(run.seed + 2)
    _fit(
        [{"params": head.parameters(), "lr": FIXED_LR}],
        lambda idx: loss_fn(head(*(f[idx] for f in features)), targets[idx]),
        n_train,
        epochs=epochs["fixed"],
        batch_size=BATCH,
        seed=run.seed + 3,
        run=run,
        description=f"{label} fixed: private part",
    )
    fixed_seconds = time.perf_counter() - start
    test_features = _boundary(public, input_name, test_x, names, run, f"{label} fixed: public part (test)")
    accuracy = _accuracy_of(lambda idx: head(*(f[idx] for f in test_features)), test_y)
    private_count = head.trainable_parameters
    fixed = AccuracyResult(
        label, "fixed", accuracy, total - private_count, private_count, fixed_seconds, n_train, n_test, run.seed,
        epochs["fixed"],
    )  # fmt: skip

    # flexible: the whole model with the fixed run's private weights, every weight fine-tuned.
    model = module_type(whole, what="the model")
    trained = {name: head.weights[slot] for name, slot in head._slot.items()}
    with torch.no_grad():
        for name, slot in model._slot.items():
            if name in trained:
                model.weights[slot].copy_(trained[name])
    x_train, x_test = torch.from_numpy(np.ascontiguousarray(train_x)), torch.from_numpy(np.ascontiguousarray(test_x))
    start = time.perf_counter()
    _fit(
        [{"params": model.parameters(), "lr": FINETUNE_LR}],
        lambda idx: loss_fn(model(x_train[idx]), targets[idx]),
        n_train,
        epochs=epochs["flexible"],
        batch_size=BATCH,
        seed=run.seed + 3,
        run=run,
        description=f"{label} flexible: every weight",
    )
    seconds = fixed_seconds + time.perf_counter() - start
    accuracy = _accuracy_of(lambda idx: model(x_test[idx]), test_y)
    flexible = AccuracyResult(
        label, "flexible", accuracy, 0, model.trainable_parameters, seconds, n_train, n_test, run.seed,
        epochs["flexible"],
    )  # fmt: skip
    return [fixed, flexible]


def _setup(
    data: OwnerData,
    model: onnx.ModelProto,
    candidates: Sequence[Any],
    chosen: Sequence[int],
    by_default: bool,
    given_accuracy: float,
    seconds: float,
    epochs: dict[str, int],
) -> str:
    from modelcloak.eval.extraction import _machine

    how = (
        "one per distinct set of private weights, the latest of each (cuts right after a layer, its activation "
        "or its pooling leave the same weights to train)"
        if by_default
        else "as asked"
    )
    lines = [
        f"Data: {data.source}: {len(data.train_x):,} training and {len(data.test_x):,} test samples. The model as "
        f"given scores {given_accuracy:.2%} on the test set.",
        "",
        "Assumed public: at each cut, the weights before it as MODEL holds them (they ship in clear in a split "
        "bundle at that cut). `fixed` keeps them frozen and trains the re-initialised private part on the training "
        "data; `flexible` then fine-tunes every weight, so all of them become private. Batch-norm statistics stay as "
        "MODEL holds them; dropout is off.",
        "",
        f"Training: Adam, batch {BATCH}; fixed {epochs['fixed']} epochs at lr {FIXED_LR:g}, "
        f"flexible {epochs['flexible']} more epochs at lr {FINETUNE_LR:g}. "
        f"Computed in {seconds:.0f} s on {_machine()}.",
        "",
        f"Cuts ({how}):",
        "",
    ]
    for index in chosen:
        cut = candidates[index]
        lines.append(
            f"- cut {index}: after node `{cut.after_node}`; private part {cut.private_layers} layer(s), "
            f"{cut.private_parameters:,} parameters"
        )
    return "\n".join(lines)
