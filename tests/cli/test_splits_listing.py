"""`modelcloak splits` shows every boundary's shapes (rich must not read `[batch,seq,16]` as markup)
and stays readable in 80 columns and when piped (issue 13, item 2)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import seq_models
from rich.console import Console

from modelcloak.model.cut import candidate_cuts

SHAPES = ("float32[batch,seq,16]", "float32[batch,1,1,seq]", "int64[batch,seq]", "float32[batch,16]")


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> tuple[Path, int]:
    path = tmp_path_factory.mktemp("splits") / "bert.onnx"
    model = seq_models.bert()
    onnx.save(model, path)
    return path, len(candidate_cuts(model))


def _splits(path: Path, *args: str, columns: int = 80) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": str(columns)}
    command = [sys.executable, "-m", "modelcloak", "splits", str(path), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def test_rich_reads_a_bare_shape_as_markup() -> None:
    """The control: printed through rich as a plain string, the shape disappears. The table must not."""
    text = io.StringIO()
    Console(file=text, width=80).print("h: float32[batch,16,32,32]")
    assert "[batch,16,32,32]" not in text.getvalue()


@pytest.mark.slow  # a BERT-style encoder's 98 cuts, through a CLI process: ~15 s on a loaded machine
def test_table_shows_every_shape_within_80_columns(bert) -> None:
    path, cuts = bert
    columns = 80
    result = _splits(path, "--format", "table", columns=columns)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= columns
    assert "dtype[shape]" in result.stdout and "FLOPs" in result.stdout
    for shape in SHAPES:
        assert shape in result.stdout, shape
    indices = [line.split()[0] for line in lines if line[:4].strip().isdigit()]
    assert indices == [str(i) for i in range(cuts)]  # every cut listed, none cropped


@pytest.mark.slow
def test_piped_output_is_one_line_per_cut_with_every_value_whole(bert) -> None:
    path, cuts = bert
    result = _splits(path)  # stdout is a pipe: tab-separated by default
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    columns = header.split("\t")
    assert columns[:3] == ["index", "after_node", "boundary"] and len(rows) == cuts
    for number, line in enumerate(rows):
        fields = line.split("\t")
        assert len(fields) == len(columns) and fields[0] == str(number)
    assert "/layers.0/Add_1_output_0: float32[batch,seq,16]" in rows[41]
    listed = json.loads(_splits(path, "--format", "json").stdout)
    assert [row["index"] for row in listed] == list(range(cuts))
    assert listed[41]["boundary"] == rows[41].split("\t")[2]


def test_unknown_format_is_one_line(tmp_path) -> None:
    result = _splits(tmp_path / "never-read.onnx", "--format", "html")
    assert result.returncode == 2
    assert result.stderr.strip() == "modelcloak: error: --format must be one of auto, table, tsv, json, not 'html'"
