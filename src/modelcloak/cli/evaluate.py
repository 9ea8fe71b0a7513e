"""`eval accuracy`, `eval extraction` and `recommend`: what protection costs and what an attacker gets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from modelcloak.cli.common import KeyFileOpt, err, int_list, load_inputs, out
from modelcloak.errors import ModelcloakError


def task_data(task: str | None, data: Path | None) -> Any:
    """The attacker's data (`sweep.AttackerData`) from a shipped task or an owner's .npz."""
    from modelcloak.eval.sweep import arrays_data, shipped_task

    if (task is None) == (data is None):
        raise ModelcloakError(
            "give exactly one of --task mnist or --data FILE.npz (arrays pool_x, test_x, test_y; optionally "
            "train_x, the victim's training inputs, to check the pool against)"
        )
    if task is not None:
        return shipped_task(task)
    assert data is not None
    loaded = load_inputs(data)
    if not isinstance(loaded, dict):
        raise ModelcloakError(f"{data} must be an .npz with arrays pool_x, test_x and test_y")
    return arrays_data(loaded, str(data))


def eval_accuracy(
    model: Annotated[
        Optional[Path],
        typer.Argument(metavar="[MODEL.onnx]", help="Your own model (with --data); omit for a shipped --task."),
    ] = None,
    task: Annotated[
        Optional[str], typer.Option(help="Shipped task: mnist (default), text (MiniLM) or image (EfficientNet-Lite0).")
    ] = None,
    data: Annotated[
        Optional[Path], typer.Option(help="With MODEL.onnx: .npz with train_x, train_y, test_x, test_y.")
    ] = None,
    cuts: Annotated[
        Optional[str],
        typer.Option(help="With MODEL.onnx: comma-separated cut indices (default: one per distinct private part)."),
    ] = None,
    epochs: Annotated[
        Optional[int], typer.Option(help="Passes over the training data per mode (default: per task).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for accuracy.md/csv/png.")] = Path("eval-accuracy"),
) -> None:
    """eNNclave's experiment: private head only ("fixed") vs everything fine-tuned ("flexible")."""
    from modelcloak.eval.accuracy import run_accuracy, write_accuracy_report

    setup = None
    if model is not None:
        if task is not None:
            raise ModelcloakError("give MODEL.onnx with --data, or a shipped --task, not both")
        if data is None:
            raise ModelcloakError("MODEL.onnx needs --data FILE.npz (arrays train_x, train_y, test_x, test_y)")
        from modelcloak.eval.owner_accuracy import owner_data, run_owner_accuracy

        loaded = load_inputs(data)
        if not isinstance(loaded, dict):
            raise ModelcloakError(f"{data} must be an .npz with arrays train_x, train_y, test_x and test_y")
        owned = run_owner_accuracy(
            model,
            owner_data(loaded, str(data)),
            cuts=int_list(cuts, "--cuts"),
            seed=seed,
            epochs=epochs,
            console=err,
        )
        results, setup, title = owned.results, owned.setup, f"accuracy, {model.name}"
        out.print(f"{model.name} as given: test accuracy {owned.given_accuracy:.4f}")
    else:
        if data is not None or cuts is not None:
            raise ModelcloakError("--data and --cuts go with MODEL.onnx (your own model)")
        task = task or "mnist"
        results, title = run_accuracy(task, seed=seed, epochs=epochs, progress=True, console=err), f"accuracy, {task}"
    paths = write_accuracy_report(results, out_dir, setup=setup)
    table = Table(title=title)
    for column in (
        "cut" if model is not None else "task",
        "mode",
        "accuracy",
        "public parameters",
        "private parameters",
        "train s",
    ):
        table.add_column(column)
    for r in results:
        table.add_row(
            r.task,
            r.mode,
            f"{r.accuracy:.4f}",
            f"{r.public_parameters:,}",
            f"{r.private_parameters:,}",
            f"{r.train_seconds:.1f}",
        )
    out.print(table)
    out.print(f"wrote {', '.join(str(p) for p in paths.values())}")


def _str_list(text: str, what: str) -> list[str]:
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items:
        raise ModelcloakError(f"{what} must list at least one value")
    return items


def _seed_list(text: str) -> list[int]:
    seeds = int_list(text, "--seeds") or []
    if not seeds:
        raise ModelcloakError("--seeds must list at least one seed")
    return seeds


def eval_extraction(
    target: Annotated[
        Optional[Path],
        typer.Argument(
            metavar="MODEL.onnx|BUNDLE",
            help="Your plain ONNX model (every cut is swept) or one split bundle (omit with --report).",
        ),
    ] = None,
    key_file: KeyFileOpt = None,
    enclave_key_file: Annotated[
        Optional[Path], typer.Option("--enclave-key-file", help="The enclave's key (BUNDLE only).")
    ] = None,
    task: Annotated[Optional[str], typer.Option(help="Shipped task providing attacker data: mnist.")] = None,
    data: Annotated[
        Optional[Path], typer.Option(help=".npz with pool_x, test_x, test_y (optionally train_x, the victim's).")
    ] = None,
    budgets: Annotated[str, typer.Option(help="Comma-separated query budgets.")] = "0,50,500",
    policies: Annotated[str, typer.Option(help="Output policies to try (MODEL.onnx).")] = "label,scores",
    cuts: Annotated[Optional[str], typer.Option(help="Comma-separated cut indices (MODEL.onnx; default: all).")] = None,
    seeds: Annotated[str, typer.Option(help="Comma-separated attacker seeds; each is one attacker.")] = "0,1,2",
    report: Annotated[
        bool, typer.Option("--report", help="Full MNIST report: train a victim, split per cut and policy.")
    ] = False,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the report files.")] = Path("eval-extraction"),
) -> None:
    """Attack your model at every cut (or one split bundle) as the device operator could, with both references."""
    from modelcloak.eval import extraction, sweep

    budget_list = int_list(budgets, "--budgets") or [0]
    seed_list = _seed_list(seeds)
    if report:
        if target is not None:
            raise ModelcloakError("--report builds its own model and bundles; do not pass MODEL.onnx or BUNDLE")
        rows = extraction.mnist_report(out_dir, budgets=budget_list, seeds=seed_list, progress=True)
        paths = [out_dir / name for name in ("extraction.md", "extraction.csv", "extraction.png")]
    else:
        if target is None:
            raise ModelcloakError(
                "eval extraction needs BUNDLE (a split bundle, with --key-file and --enclave-key-file) or "
                "MODEL.onnx (every cut is swept), or --report"
            )
        attacker = task_data(task, data)
        if _is_bundle(target):
            from modelcloak.keys import KeyFile

            if key_file is None or enclave_key_file is None:
                raise ModelcloakError("attacking a bundle needs --key-file and --enclave-key-file")
            result = sweep.attack_user_bundle(
                target,
                attacker,
                host_key=KeyFile(key_file),
                enclave_key_file=enclave_key_file,
                budgets=budget_list,
                seeds=seed_list,
                console=err,
            )
        else:
            result = sweep.sweep_model(
                target,
                attacker,
                cuts=int_list(cuts, "--cuts"),
                policies=_str_list(policies, "--policies"),
                budgets=budget_list,
                seeds=seed_list,
                console=err,
            )
        rows = result.rows
        written = extraction.write_report(
            rows, out_dir, title=f"extraction attacks on {target.name}", setup=result.setup
        )
        paths = list(written.values())
    table = Table(title=f"best attacker per cut: mean fidelity [95% interval] over {len(seed_list)} seed(s)")
    summaries = extraction.summarise(rows)
    shown_budgets = sorted({s.budget for s in summaries if s.attack != "white-box"})
    for column in ("cut", "policy", "attacker", *(f"budget {b}" for b in shown_budgets)):
        table.add_column(column)
    groups: dict[tuple[str, str, str], dict[int, Any]] = {}
    for s in summaries:
        if s.attack in (extraction.BEST, "black-box", "white-box"):
            groups.setdefault((s.label, s.policy, s.attack), {})[s.budget] = s
    for (label, policy, attack), by_budget in groups.items():
        if attack == "white-box":
            cells = [next(iter(by_budget.values())).fidelity.text()] * len(shown_budgets)
            attack = f"white-box (victim accuracy {next(iter(by_budget.values())).accuracy.text()})"
        else:
            cells = [by_budget[b].fidelity.text() if b in by_budget else "" for b in shown_budgets]
        table.add_row(label, policy, attack, *cells)
    out.print(table)
    out.print(f"wrote {', '.join(str(p) for p in paths)}")


def _is_bundle(path: Path) -> bool:
    """A modelcloak bundle (by its magic bytes), or else a model file for `load_model`."""
    from modelcloak.bundle import Bundle
    from modelcloak.bundle.errors import NotABundleError

    try:
        with Bundle.open(path):
            return True
    except NotABundleError:
        return False


def recommend(
    model: Annotated[Path, typer.Argument(help="ONNX model file.")],
    task: Annotated[Optional[str], typer.Option(help="Shipped task providing attacker data: mnist.")] = None,
    data: Annotated[
        Optional[Path], typer.Option(help=".npz with pool_x, test_x, test_y (optionally train_x, the victim's).")
    ] = None,
    max_fidelity: Annotated[float, typer.Option(help="Highest attacker fidelity you accept, in (0, 1].")] = 0.5,
    attack_budget: Annotated[int, typer.Option(help="Queries the attacker may make.")] = 500,
    policy: Annotated[str, typer.Option(help="The enclave's output policy: label, topk:K or scores.")] = "label",
    max_latency: Annotated[
        Optional[float], typer.Option(help="Highest split/whole latency ratio you accept (default: no limit).")
    ] = None,
    enclave_memory_mb: Annotated[float, typer.Option(help="Enclave memory budget for private weights.")] = 64.0,
    cuts: Annotated[Optional[str], typer.Option(help="Comma-separated cut indices (default: all).")] = None,
    seeds: Annotated[str, typer.Option(help="Comma-separated attacker seeds.")] = "0,1,2",
    rounds: Annotated[int, typer.Option(help="Interleaved latency rounds (the median decides).")] = 7,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for recommend.md/csv/png.")] = Path("recommend"),
) -> None:
    """Where to stop: the cheapest cut meeting your fidelity, latency and memory targets, with the evidence."""
    from modelcloak.eval.extraction import write_report
    from modelcloak.eval.recommend import Targets, write_recommendation
    from modelcloak.eval.recommend import recommend as do_recommend

    # Everything that can be refused is refused before any measurement starts.
    targets = Targets(
        max_fidelity=max_fidelity,
        attack_budget=attack_budget,
        policy=policy,
        max_latency_ratio=max_latency,
        enclave_memory_bytes=int(enclave_memory_mb * 1024 * 1024),
    )
    seed_list = _seed_list(seeds)
    if rounds < 1:
        raise ModelcloakError("--rounds must be at least 1")
    attacker = task_data(task, data)
    result = do_recommend(
        model,
        attacker,
        targets=targets,
        cuts=int_list(cuts, "--cuts"),
        seeds=seed_list,
        rounds=rounds,
        progress=True,
        console=err,
    )
    title = f"where to cut {model.name}"
    paths = write_recommendation(result, out_dir, title=title, setup=result.evidence.setup)
    write_report(
        result.evidence.rows, out_dir, title=f"extraction evidence for {model.name}", setup=result.evidence.setup
    )
    table = Table(title=f"cuts of {model.name}")
    for column in ("cut", "after", "private params", "latency x", "attacker fidelity [95%]", "meets", "why not"):
        table.add_column(column, overflow="fold")
    for a in result.cuts:
        table.add_row(
            str(a.cut),
            a.after_node,
            f"{a.private_parameters:,}",
            f"{a.latency.median:.2f} ({a.latency.q1:.2f}-{a.latency.q3:.2f})",
            a.fidelity.text(2),
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
    out.print(f"wrote {', '.join(str(p) for p in paths.values())} and the extraction report beside them")


def register(app: typer.Typer) -> None:
    """Add `eval ...` and `recommend` to the main app."""
    eval_app = typer.Typer(
        add_completion=False, no_args_is_help=True, help="Measure what protection costs and what an attacker gets."
    )
    app.add_typer(eval_app, name="eval")
    eval_app.command("accuracy")(eval_accuracy)
    eval_app.command("extraction")(eval_extraction)
    app.command()(recommend)
