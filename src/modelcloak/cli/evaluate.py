"""`eval accuracy`, `eval extraction` and `recommend`: what protection costs and what an attacker gets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from modelcloak.cli.common import KeyFileOpt, err, int_list, load_inputs, out
from modelcloak.errors import ModelcloakError


def task_data(task: str | None, data: Path | None) -> tuple[Any, Any, Any]:
    """(attacker pool, test inputs, test labels) from a shipped task or an .npz with pool_x/test_x/test_y."""
    import numpy as np

    if (task is None) == (data is None):
        raise ModelcloakError("give exactly one of --task mnist or --data FILE.npz (arrays pool_x, test_x, test_y)")
    if task is not None:
        if task != "mnist":
            raise ModelcloakError(f"unknown task {task!r}; shipped tasks: mnist")
        from modelcloak.zoo.mnist import load_mnist

        split = load_mnist()
        return split.x_train, split.x_test, split.y_test
    assert data is not None
    loaded = load_inputs(data)
    if not isinstance(loaded, dict) or not {"pool_x", "test_x", "test_y"} <= set(loaded):
        raise ModelcloakError(f"{data} must be an .npz with arrays pool_x, test_x and test_y")
    return loaded["pool_x"], loaded["test_x"], np.asarray(loaded["test_y"])


def eval_accuracy(
    task: Annotated[str, typer.Option(help="mnist, text (MiniLM) or image (EfficientNet-Lite0).")] = "mnist",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for accuracy.md/csv/png.")] = Path("eval-accuracy"),
) -> None:
    """eNNclave's experiment: private head only ("fixed") vs everything fine-tuned ("flexible")."""
    from modelcloak.eval.accuracy import run_accuracy, write_accuracy_report

    results = run_accuracy(task, seed=seed, progress=True)
    paths = write_accuracy_report(results, out_dir)
    table = Table(title=f"accuracy, {task}")
    for column in ("mode", "accuracy", "public parameters", "private parameters", "train s"):
        table.add_column(column)
    for r in results:
        table.add_row(
            r.mode,
            f"{r.accuracy:.4f}",
            f"{r.public_parameters:,}",
            f"{r.private_parameters:,}",
            f"{r.train_seconds:.1f}",
        )
    out.print(table)
    out.print(f"wrote {', '.join(str(p) for p in paths.values())}")


def eval_extraction(
    bundle: Annotated[Optional[Path], typer.Argument(help="Split bundle to attack (omit with --report).")] = None,
    key_file: KeyFileOpt = None,
    enclave_key_file: Annotated[Optional[Path], typer.Option("--enclave-key-file", help="The enclave's key.")] = None,
    task: Annotated[Optional[str], typer.Option(help="Shipped task providing attacker data: mnist.")] = None,
    data: Annotated[Optional[Path], typer.Option(help=".npz with pool_x, test_x, test_y.")] = None,
    budgets: Annotated[str, typer.Option(help="Comma-separated query budgets.")] = "0,50,500,5000",
    report: Annotated[
        bool, typer.Option("--report", help="Full MNIST report: train, split per cut and policy.")
    ] = False,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for extraction.md/csv/png.")] = Path("eval-extraction"),
) -> None:
    """Attack a split bundle as the device operator could: knockoff (labels) and algebraic (scores)."""
    from modelcloak.eval import extraction

    budget_list = int_list(budgets, "--budgets") or [0]
    if report:
        if bundle is not None:
            raise ModelcloakError("--report builds its own bundles; do not pass BUNDLE")
        rows = extraction.mnist_report(out_dir, budgets=budget_list, progress=True)
    else:
        from modelcloak.bundle import Bundle
        from modelcloak.keys import KeyFile

        if bundle is None or key_file is None or enclave_key_file is None:
            raise ModelcloakError(
                "attacking a bundle needs BUNDLE, --key-file and --enclave-key-file (or use --report)"
            )
        pool_x, test_x, test_y = task_data(task, data)
        with Bundle.open(bundle) as sealed:
            if sealed.manifest.scheme != "split":
                raise ModelcloakError(f"{bundle} is a {sealed.manifest.scheme!r} bundle; extraction attacks need split")
        rows = extraction.attack_bundle(
            bundle,
            host_key=KeyFile(key_file),
            enclave_key_file=enclave_key_file,
            pool_x=pool_x,
            test_x=test_x,
            test_y=test_y,
            budgets=budget_list,
            cut_index=-1,
        )
    table = Table(title="extraction")
    for column in ("cut", "policy", "attack", "budget", "answered", "accuracy", "fidelity"):
        table.add_column(column)
    for r in rows:
        shown = (f"{r.accuracy:.3f}", f"{r.fidelity:.3f}") if r.applicable else ("n/a", "n/a")
        table.add_row(str(r.cut_name or r.cut), r.policy, r.attack, str(r.budget), str(r.queries_answered), *shown)
    out.print(table)
    if report:
        out.print(f"wrote {out_dir / 'extraction.md'}, {out_dir / 'extraction.csv'} and {out_dir / 'extraction.png'}")
    else:
        assert bundle is not None
        paths = extraction.write_report(rows, out_dir, title=f"extraction attacks on {bundle.name}")
        out.print(f"wrote {', '.join(str(p) for p in paths.values())}")


def recommend(
    model: Annotated[Path, typer.Argument(help="ONNX model file.")],
    task: Annotated[Optional[str], typer.Option(help="Shipped task providing attacker data: mnist.")] = None,
    data: Annotated[Optional[Path], typer.Option(help=".npz with pool_x, test_x, test_y.")] = None,
    max_fidelity: Annotated[float, typer.Option(help="Highest attacker fidelity you accept.")] = 0.5,
    attack_budget: Annotated[int, typer.Option(help="Queries the attacker may make.")] = 500,
    max_latency: Annotated[float, typer.Option(help="Highest split/whole latency ratio you accept.")] = 1.5,
    enclave_memory_mb: Annotated[float, typer.Option(help="Enclave memory budget for private weights.")] = 64.0,
    cuts: Annotated[Optional[str], typer.Option(help="Comma-separated cut indices (default: all).")] = None,
) -> None:
    """Where to stop: the cheapest cut meeting your fidelity, latency and memory targets, with the evidence."""
    from rich.progress import Progress

    from modelcloak.eval.recommend import Targets
    from modelcloak.eval.recommend import recommend as do_recommend

    pool_x, test_x, test_y = task_data(task, data)
    targets = Targets(
        max_fidelity=max_fidelity,
        attack_budget=attack_budget,
        max_latency_ratio=max_latency,
        enclave_memory_bytes=int(enclave_memory_mb * 1024 * 1024),
    )
    with Progress(console=err, transient=True) as bar:
        task_id = bar.add_task("measuring", total=None)
        result = do_recommend(
            model,
            pool_x=pool_x,
            test_x=test_x,
            test_y=test_y,
            targets=targets,
            cuts=int_list(cuts, "--cuts"),
            on_step=lambda label: bar.update(task_id, description=label),
        )
    table = Table(title=f"cuts of {model.name}")
    for column in ("cut", "after", "private params", "latency x", "attacker fidelity", "meets", "why not"):
        table.add_column(column, overflow="fold")
    for a in result.cuts:
        table.add_row(
            str(a.cut),
            a.after_node,
            f"{a.private_parameters:,}",
            f"{a.latency_ratio:.2f}",
            f"{a.attacker_fidelity:.2f}",
            "yes" if a.meets else "no",
            "; ".join(a.reasons),
        )
    out.print(table)
    if result.chosen:
        out.print(
            f"recommended: cut {result.chosen.cut} (after {result.chosen.after_node}): --cut-index {result.chosen.cut}"
        )
    else:
        out.print("no cut meets every target.")
        for idea in result.suggestions:
            out.print(f"  - {idea}")


def register(app: typer.Typer) -> None:
    """Add `eval ...` and `recommend` to the main app."""
    eval_app = typer.Typer(
        add_completion=False, no_args_is_help=True, help="Measure what protection costs and what an attacker gets."
    )
    app.add_typer(eval_app, name="eval")
    eval_app.command("accuracy")(eval_accuracy)
    eval_app.command("extraction")(eval_extraction)
    app.command()(recommend)
