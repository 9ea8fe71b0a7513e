"""How much a surrogate from public pretrained weights gives the attacker (TEESlice's attacker).

Runs `modelcloak.eval.pretrained.run_pretrained_attack` and writes, under --out,
pretrained.json, pretrained.csv, pretrained.md and pretrained.png (mean fidelity per attack and
budget with 95% intervals as error bars). Progress goes to stderr.

    python benchmarks/bench_pretrained_surrogate.py --budgets 100,500 --seeds 0,1,2 --steps 60
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="100,500")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=60, help="optimiser steps per surrogate")
    parser.add_argument("--victim-train", type=int, default=1000)
    parser.add_argument("--pool", type=int, default=1000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()

    from modelcloak.eval.pretrained import ATTACKS, run_pretrained_attack

    began, cpu = time.perf_counter(), time.process_time()
    result = run_pretrained_attack(
        budgets=[int(b) for b in args.budgets.split(",")],
        seeds=[int(s) for s in args.seeds.split(",")],
        victim_train=args.victim_train,
        pool=args.pool,
        test=args.test,
        surrogate_steps=args.steps,
        on_step=lambda text: print(f"[{time.perf_counter() - began:6.0f} s] {text}", file=sys.stderr, flush=True),
    )
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [asdict(r) for r in result.rows]
    summary = result.summary()
    meta = {
        "victim_accuracy": result.victim_accuracy,
        "sizes": result.sizes,
        "private_parameters": result.private_parameters,
        "boundary_values": result.boundary_values,
        "surrogate_steps": args.steps,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "load_average_at_end": load,
    }
    (args.out / "pretrained.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    with open(args.out / "pretrained.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    budgets = sorted({b for _, b in summary})
    lines = [
        f"victim test accuracy {result.victim_accuracy:.3f}; {result.private_parameters:,} private parameters; "
        f"boundary {result.boundary_values} values; seeds {args.seeds}; {args.steps} steps per surrogate",
        "",
        "| attacker | " + " | ".join(f"budget {b}: fidelity [95%]" for b in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]
    for attack in ATTACKS:
        cells = [summary[attack, b].text() if (attack, b) in summary else "" for b in budgets]
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    lines += ["", f"wall {wall:.0f} s, CPU {cpu:.0f} s, load average at the end {' '.join(load)}"]
    (args.out / "pretrained.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0))
    FigureCanvasAgg(fig)
    axis = fig.add_subplot(1, 1, 1)
    for attack in ATTACKS:
        points = [summary[attack, b] for b in budgets]
        axis.errorbar(
            budgets,
            [p.mean for p in points],
            yerr=[[p.mean - p.low for p in points], [p.high - p.mean for p in points]],
            marker="o",
            capsize=4,
            label=attack,
        )
    axis.set_xscale("log")
    axis.set_xlabel("label queries")
    axis.set_ylabel("fidelity to the victim (test digits)")
    axis.set_ylim(0, 1.05)
    axis.set_title("EfficientNet-Lite0 private blocks 11-15: surrogate starting points")
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "pretrained.png", dpi=110)


if __name__ == "__main__":
    main()
