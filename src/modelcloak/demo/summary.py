"""Step 5, the summary: one table and one PNG from every step's saved result, with paths and commands.

It reads `results/*.json`, so `modelcloak demo --only summary` redraws the table from earlier runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from modelcloak.demo.context import DemoContext, Row, StepResult

ORDER = ("seal", "lock", "split", "fhe")


def load_results(ctx: DemoContext) -> list[StepResult]:
    folder = ctx.path("results")
    found = []
    for step in ORDER:
        path = folder / f"{step}.json"
        if path.is_file():
            found.append(StepResult.from_json(json.loads(path.read_text())))
    return found


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x" if value < 10 else f"{value:.0f}x"


def table(rows: list[Row]) -> Table:
    view = Table(title="modelcloak demo: MNIST CNN, one digit at a time", show_lines=False)
    for column in ("scheme", "accuracy", "latency vs plain", "what a thief gets", "what it needs"):
        view.add_column(column, overflow="fold")
    for row in rows:
        view.add_row(row.scheme, _percent(row.accuracy), _ratio(row.latency_ratio), row.thief_gets, row.needs)
    return view


def markdown(rows: list[Row]) -> str:
    lines = [
        "| scheme | accuracy | latency vs plain | what a thief gets | what it needs |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        cells = (row.scheme, _percent(row.accuracy), _ratio(row.latency_ratio), row.thief_gets, row.needs)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], target: Path) -> Path:
    """Accuracy on the device beside the thief's copy, and latency vs plain (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row.scheme for row in rows]
    positions = range(len(rows))
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 0.6 * len(rows) + 2.4), sharey=True)
    device = [100 * (row.accuracy or 0) for row in rows]
    thief = [100 * row.thief_accuracy if row.thief_accuracy is not None else float("nan") for row in rows]
    left.barh([p + 0.2 for p in positions], device, height=0.38, color="#3b7dd8", label="on the licensed device")
    left.barh([p - 0.2 for p in positions], thief, height=0.38, color="#d8573b", label="thief's copy (measured)")
    left.axvline(10, color="grey", linestyle=":", linewidth=1, label="chance (10%)")
    left.set_xlim(0, 100)
    left.set_xlabel("test accuracy, %")
    left.set_yticks(list(positions), names)
    left.invert_yaxis()
    left.legend(loc="upper left", bbox_to_anchor=(0.0, -0.14), ncol=3, fontsize=8, frameon=False)
    ratios = [row.latency_ratio or float("nan") for row in rows]
    right.barh(list(positions), ratios, height=0.5, color="#6a6a6a")
    right.set_xscale("log")
    right.axvline(1, color="black", linewidth=0.8)
    right.set_xlabel("single-digit latency vs plain onnxruntime (log)")
    for position, ratio in zip(positions, ratios):
        if ratio == ratio:  # not NaN
            right.annotate(_ratio(ratio), (ratio, position), xytext=(4, 0), textcoords="offset points", va="center")
    figure.suptitle("modelcloak demo (measured in this run)")
    figure.tight_layout()
    figure.savefig(target, dpi=110)
    plt.close(figure)
    return target


def print_files_and_commands(ctx: DemoContext, results: list[StepResult]) -> None:
    """What each step wrote, and how to repeat it: the demo's own command, then the commands it stands for."""
    ctx.console.print("[bold]files[/]")
    for result in results:
        for what, path in result.files.items():
            ctx.console.print(f"  {what}: {path}", highlight=False)
    ctx.console.print("[bold]repeat[/] (the demo's step, then the commands it stands for)")
    for result in results:
        ctx.console.print(f"  modelcloak demo --only {result.step} --workdir {ctx.shown(ctx.workdir)}", highlight=False)
        for command in result.commands:
            ctx.console.print(f"      {command}", highlight=False, soft_wrap=True)


def run(ctx: DemoContext) -> StepResult:
    results = load_results(ctx)
    rows = [row for result in results for row in result.rows]
    if not rows:
        ctx.console.print("    no step results yet in " + ctx.shown(ctx.path("results")) + ": run a step first")
        return StepResult("summary", [], {"steps": []}, {}, [])
    ctx.console.print(table(rows))
    png = plot(rows, ctx.path("demo.png"))
    md = ctx.path("summary.md")
    md.write_text(markdown(rows))
    ctx.console.print(f"summary table: {ctx.shown(md)}\nplot: {ctx.shown(png)}", highlight=False)
    print_files_and_commands(ctx, results)
    return StepResult(
        "summary",
        [],
        {"steps": [result.step for result in results]},
        {"summary table": ctx.shown(md), "plot": ctx.shown(png)},
        [],
    )
