"""CPU cost of each SEAL operation the fhe evaluator uses, at the square classifier's parameters.

    PYTHONPATH=src python benchmarks/bench_fhe_ops.py            # 128-bit, N=8192, 27-bit scale

Prints the median CPU milliseconds (this process) of encode, encrypt, plaintext and ciphertext
products, relinearisation, rotation, addition and rescale at the top, middle and bottom levels of
the chain. Multiplied by an evaluation's operation counts (docs/BENCHMARKS.md, "FHE scheme") they
give the floor of one classification in this binding: the key switches alone.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def _median_cpu_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times) * 1000


def _level_costs(
    ctx: Any, encryptor: Any, relin_keys: Any, galois_keys: Any, values: np.ndarray, level: int, repeats: int
) -> list[float]:
    # At level 0 only the first prime is left: a small scale so the product still fits for relinearising.
    seal, evaluator, scale = ctx.sealapi, ctx.evaluator, 2.0 ** (ctx.params.scale_bits if level else 15)
    plain = ctx.encode(values, level, scale)
    a, b, product = seal.Ciphertext(), seal.Ciphertext(), seal.Ciphertext()
    encryptor.encrypt(plain, a)
    encryptor.encrypt(plain, b)
    evaluator.multiply(a, b, product)
    return [
        _median_cpu_ms(lambda: ctx.encode(values, level, scale), repeats),
        _median_cpu_ms(lambda: encryptor.encrypt(plain, seal.Ciphertext()), repeats),
        _median_cpu_ms(lambda: evaluator.multiply_plain(a, plain, seal.Ciphertext()), repeats),
        _median_cpu_ms(lambda: evaluator.multiply(a, b, seal.Ciphertext()), repeats),
        _median_cpu_ms(lambda: evaluator.relinearize(product, relin_keys, seal.Ciphertext()), repeats),
        _median_cpu_ms(lambda: evaluator.rotate_vector(a, 64, galois_keys, seal.Ciphertext()), repeats),
        _median_cpu_ms(lambda: evaluator.add(a, b, seal.Ciphertext()), repeats),
        _median_cpu_ms(lambda: evaluator.rescale_to_next(a, seal.Ciphertext()), repeats) if level else 0.0,
    ]


def _key_switch_floor(by_level: dict[int, list[float]], top: int, encrypted: bool) -> tuple[int, float]:
    """Key switches of one 784-64-32-10 square-classifier evaluation (with the 3 + 1 check rows), each
    priced at the level the evaluator performs it (modelcloak.fhe.engine.EdgeEvaluator._layer)."""
    from modelcloak.fhe.program import make_plan

    relin, rotate = 4, 5  # columns of _level_costs
    plans = [make_plan(784, 64, True), make_plan(64, 32, True), make_plan(32, 14, False)]
    level, count, total = top, 0, 0.0
    for index, plan in enumerate(plans):
        input_is_ciphertext = index > 0 or encrypted
        steps = [(level, rotate)] * ((plan.baby - 1) if input_is_ciphertext else 0)
        steps += [(level - 1, relin)] * (plan.giant if input_is_ciphertext else 0)  # one per giant step
        steps += [(level - 1, rotate)] * ((plan.giant - 1) + len(plan.fold_steps))
        level -= 1
        if plan.square_after:
            level -= 1
            steps.append((level, relin))
        count += len(steps)
        total += sum(by_level[lv][kind] for lv, kind in steps)
    return count, total


def main(repeats: int = 20) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from modelcloak.fhe.ckks import CkksContext, galois_element
    from modelcloak.fhe.params import choose_parameters

    params = choose_parameters(5, 1024, 128)  # the 784-64-32-10 square classifier's depth and width
    ctx = CkksContext(params)
    seal = ctx.sealapi
    keygen = seal.KeyGenerator(ctx.context)
    public_key, relin_keys, galois_keys = seal.PublicKey(), seal.RelinKeys(), seal.GaloisKeys()
    keygen.create_public_key(public_key)
    keygen.create_relin_keys(relin_keys)
    keygen.create_galois_keys([galois_element(64, params.poly_modulus_degree)], galois_keys)
    encryptor = seal.Encryptor(ctx.context, public_key)
    values = np.random.default_rng(0).standard_normal(ctx.slots)
    print(f"{params}; median CPU ms of {repeats} calls")
    print("level | encode | encrypt | ct x pt | ct x ct | relinearise | rotate | add | rescale")
    by_level = {}
    for level in range(ctx.top, -1, -1):
        by_level[level] = _level_costs(ctx, encryptor, relin_keys, galois_keys, values, level, repeats)
        print(f"{level} | " + " | ".join(f"{c:.2f}" for c in by_level[level]))
    for encrypted in (False, True):
        switches, total = _key_switch_floor(by_level, ctx.top, encrypted)
        features = "encrypted" if encrypted else "plaintext"
        print(
            f"square classifier, one sample, {features} features: {switches} key switches "
            f"= {total:.0f} CPU ms at these costs (everything else taken as free)"
        )


if __name__ == "__main__":
    main()
