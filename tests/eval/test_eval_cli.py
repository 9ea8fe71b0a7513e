"""`modelcloak eval extraction` and `modelcloak recommend` as an owner runs them (issue 14).

Each command runs in a child process, as a user would start it, on a small real victim (a dense
network on scikit-learn's digits) with small budgets and seeds.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from cli_process import run_modelcloak as cli
from digits_victim import dense_model, digits_split

from modelcloak.keys import generate_key_file
from modelcloak.protector import protect

pytest.importorskip("torch")
pytest.importorskip("sklearn")

PROGRESS = re.compile(r"seed \d+ budget \d+")  # the progress bar's step descriptions


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one error line; nothing else on stderr but cache-guard notices, no blank lines, no stdout."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("modelcloak: warning: ")]
    assert len(lines) == 1, result.stderr  # a blank line before the error counts (issue 14, item 8)
    assert lines[0].startswith("modelcloak: error: ") and "Traceback" not in result.stderr
    assert result.stdout == ""
    return lines[0]


@pytest.fixture(scope="module")
def owner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("owner")
    split = digits_split()
    model = dense_model(split.train_x, split.train_y, (32, 16), steps=150)
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    np.savez(folder / "pool.npz", pool_x=split.pool_x, test_x=split.test_x, test_y=split.test_y, train_x=split.train_x)
    np.savez(
        folder / "overlap.npz",
        pool_x=np.concatenate([split.pool_x, split.test_x[:4]]),
        test_x=split.test_x,
        test_y=split.test_y,
    )
    host, enclave = generate_key_file(folder / "host.key"), generate_key_file(folder / "enclave.key")
    for name, policy in (("split.mcb", {"output": "label"}), ("budget.mcb", {"output": "label", "query_budget": 30})):
        protect(model, folder / name, key=host, scheme="split", cut={"last": 1}, enclave_key=enclave, policy=policy)
    return folder


@pytest.mark.slow
def test_one_command_sweeps_every_cut_of_an_onnx_model(owner: Path) -> None:
    result = cli(
        "eval", "extraction", "model.onnx", "--data", "pool.npz", "--budgets", "0,20,5000", "--seeds", "0,1",
        "--policies", "label", "--out", "sweep", cwd=owner,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # Progress on stderr, tables on stdout (item 8).
    assert PROGRESS.search(result.stderr) and not PROGRESS.search(result.stdout)
    assert "over 2 seed(s)" in result.stdout and "budget 600" in result.stdout and "budget 5000" not in result.stdout
    for attacker in ("white-box", "black-box", "best attacker"):
        assert attacker in result.stdout
    summary = (owner / "sweep" / "extraction-summary.csv").read_text().splitlines()
    best_cuts = {line.split(",")[0] for line in summary if ",best attacker," in line}
    assert best_cuts == {"0", "1", "2", "3"}  # every candidate cut of 64-32-16-10
    assert all((owner / "sweep" / name).stat().st_size > 0 for name in ("extraction.md", "extraction.png"))


def test_a_users_bundle_gets_references_and_its_cut_named(owner: Path) -> None:
    result = cli(
        "eval", "extraction", "split.mcb", "--key-file", "host.key", "--enclave-key-file", "enclave.key",
        "--data", "pool.npz", "--budgets", "0,20", "--seeds", "0", "--out", "bundle", cwd=owner,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "bundle (boundary r1)" in result.stdout and "black-box" in result.stdout
    assert PROGRESS.search(result.stderr)  # a bundle's attack shows progress too
    assert "│ -1 " not in result.stdout and "| -1 |" not in (owner / "bundle" / "extraction.md").read_text()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["recommend", "model.onnx", "--data", "pool.npz", "--max-fidelity", "2"], "fidelity target must be in (0, 1]"),
        (["recommend", "model.onnx", "--data", "pool.npz", "--max-latency", "0.5"], "latency target must be a ratio"),
        (["recommend", "model.onnx", "--data", "pool.npz", "--policy", "all"], "output policy 'all'"),
        (["eval", "extraction", "model.onnx", "--data", "overlap.npz"], "4 pool samples also appear in the test set"),
        (["eval", "extraction", "model.onnx", "--data", "pool.npz", "--seeds", "1,1"], "each once"),
        (
            [
                "eval", "extraction", "budget.mcb", "--key-file", "host.key", "--enclave-key-file", "enclave.key",
                "--data", "pool.npz", "--seeds", "0",
            ],
            "query budget is 30 samples",
        ),
        (["eval", "extraction", "--task", "mnist"], "needs BUNDLE"),
    ],
)  # fmt: skip
def test_errors_are_one_line_with_nothing_before_them(owner: Path, args: list[str], fragment: str) -> None:
    assert fragment in error_line(cli(*args, cwd=owner))


@pytest.mark.slow
def test_recommend_writes_its_evidence(owner: Path) -> None:
    result = cli(
        "recommend", "model.onnx", "--data", "pool.npz", "--attack-budget", "20", "--max-fidelity", "1",
        "--seeds", "0,1,2", "--rounds", "3", "--policy", "topk:2", "--out", "rec", cwd=owner,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "recommended: cut" in result.stdout and not PROGRESS.search(result.stdout)
    markdown = (owner / "rec" / "recommend.md").read_text()
    assert "under the `topk:2` policy" in markdown and "Recommended: cut" in markdown
    assert "latency ratio (split / whole, batch 1) at most none" in markdown
    for name in ("recommend.csv", "recommend.png", "extraction.md", "extraction-summary.csv"):
        assert (owner / "rec" / name).stat().st_size > 0
