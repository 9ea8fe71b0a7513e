"""`modelcloak demo`: the whole product on real MNIST digits, in five steps an owner recognises.

1. seal: train and export a small CNN, seal and sign it, run it: same labels, load and latency.
2. lock: the bundle on another machine, without the key, and with it on a device it is not locked to.
3. split: a cut from `recommend`, label-only with a query budget, and a real 500-query attack.
4. fhe: the last layer under CKKS; a real `modelcloak serve` on loopback answers labels and meters.
5. summary: one table, one PNG, the paths written and the commands to repeat each step.

Every step uses the public API or commands (`modelcloak.protect`, `InferenceSession`/`load`,
`modelcloak owner ...`, `modelcloak serve`, `modelcloak.eval`), never a shortcut around their
checks. The demo sits above every other room (docs/ARCHITECTURE.md) because it uses all of them.
Opening a bundle hardens the process it runs in (not dumpable, no core files), as on a device.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from modelcloak.demo.context import DemoContext, DemoError, DemoSettings, Row, StepResult

__all__ = ["STEPS", "DemoError", "DemoSettings", "Row", "StepResult", "run_demo"]

STEPS = ("seal", "lock", "split", "fhe", "summary")
_TITLES = {
    "seal": "seal: train, export, seal and run next to plain onnxruntime",
    "lock": "lock: the bundle on another machine, without the key and on a device it is not locked to",
    "split": "split: a recommended cut, label-only with a query budget, and a real extraction attack",
    "fhe": "fhe + owner backend: an encrypted head, labels only from a real `modelcloak serve`, metered",
    "summary": "summary: one table, one plot, paths and commands",
}
# What each step needs beyond the base install, for a clear error before any work starts.
_NEEDS = {
    "seal": ("torch", "onnxscript", "mlxtend"),
    "lock": ("torch", "onnxscript", "mlxtend"),
    "split": ("torch", "onnxscript", "mlxtend"),
    "fhe": ("torch", "onnxscript", "mlxtend", "tenseal", "fastapi", "uvicorn", "sqlalchemy", "httpx", "cbor2"),
    "summary": ("matplotlib",),
}


def _check_installed(steps: Sequence[str]) -> None:
    from importlib.util import find_spec

    missing = sorted({name for step in steps for name in _NEEDS[step] if find_spec(name) is None})
    if missing:
        raise DemoError(f"the demo needs {', '.join(missing)}, which is not installed: pip install -e '.[demo]'")


def run_demo(
    workdir: str | Path,
    console: Console,
    settings: DemoSettings | None = None,
    *,
    only: Sequence[str] | None = None,
) -> dict[str, StepResult]:
    """Run the demo's steps (all, or `only` these) in `workdir`; return each step's result.

    Files go into `workdir` (created if needed; a rerun replaces the demo's own keys and bundles).
    Each step's result is also saved as `workdir/results/STEP.json`, which the summary reads.
    """
    settings = settings or DemoSettings()
    chosen = list(STEPS) if not only else list(dict.fromkeys(only))
    unknown = [step for step in chosen if step not in STEPS]
    if unknown:
        raise DemoError(f"unknown demo step {unknown[0]!r}; choose from {', '.join(STEPS)}")
    _check_installed(chosen)
    # The cache guard first, as on a device: TorchInductor and onnxruntime read their cache
    # settings once, when imported or initialised, and torch's exporter pulls in Inductor.
    from modelcloak.runtime import cacheguard

    cacheguard.apply("override")
    from modelcloak.demo import fhe, lock, seal, split, summary

    modules = {"seal": seal, "lock": lock, "split": split, "fhe": fhe, "summary": summary}
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = DemoContext(workdir=workdir, console=console, settings=settings)
    results: dict[str, StepResult] = {}
    started = time.perf_counter()
    for step in chosen:
        number = STEPS.index(step) + 1
        console.rule(f"[bold]{number}/5[/] {_TITLES[step]}", align="left")
        began = time.perf_counter()
        result = modules[step].run(ctx)
        result.seconds = time.perf_counter() - began
        if step != "summary":
            ctx.save(result)
        if "summary" not in chosen:  # the summary lists these for every step; without it, each step does
            summary.print_files_and_commands(ctx, [result])
        console.print(f"    [dim]{step}: {result.seconds:.1f} s[/]")
        results[step] = result
    console.print(f"[bold]demo done[/] in {time.perf_counter() - started:.0f} s ({', '.join(chosen)})")
    return results
