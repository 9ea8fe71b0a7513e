"""`splits` and `enclave-manifest`: where a model can be cut, and the enclave's TEE packaging."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from modelcloak.cli.common import out
from modelcloak.errors import ModelcloakError

FORMATS = ("auto", "table", "tsv", "json")


def splits(
    model: Annotated[Path, typer.Argument(help="ONNX model file.")],
    output_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="table (for a terminal), tsv (one line per cut, every value whole) or json; "
            "auto: table on a terminal, tsv when piped.",
        ),
    ] = "auto",
) -> None:
    """List every candidate cut of MODEL: the boundary tensors with their shapes, and the private part's size."""
    import json

    from modelcloak.model import load_model
    from modelcloak.model.cut import candidate_cuts, describe_cut_table

    if output_format not in FORMATS:
        raise ModelcloakError(f"--format must be one of {', '.join(FORMATS)}, not {output_format!r}")
    rows = describe_cut_table(candidate_cuts(load_model(model)))
    if not rows:
        raise ModelcloakError(f"{model} has no valid cut (no node after which a weighted private part remains)")
    if output_format == "auto":
        output_format = "table" if out.is_terminal else "tsv"
    if output_format == "json":
        typer.echo(json.dumps(rows, indent=1))
    elif output_format == "tsv":
        # Plain text, never through rich: shapes such as [batch,16,32,32] are not markup here.
        typer.echo("\t".join(rows[0]))
        for row in rows:
            typer.echo("\t".join(str(value) for value in row.values()))
    else:
        out.print(_cut_table(model.name, rows, out.width))


def _compact(value: int) -> str:
    """4,736 -> 4.7k, 2,410,000 -> 2.4M: numbers that fit a narrow column."""
    for scale, suffix in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return str(value)


def _cut_table(name: str, rows: list[dict], width: int) -> Table:
    """Seven narrow columns that stay readable in 80 columns; every cell is Text, so rich never
    reads a boundary shape as markup."""

    table = Table(
        title=f"candidate cuts of {name}",
        caption="Use one with protect --scheme split --cut-index N. bytes (the boundary) and FLOPs are per "
        "sample; layers, params and FLOPs are the private part's. --format tsv shows every column in full.",
        caption_justify="left",
        box=box.SIMPLE_HEAD,  # no vertical rules, one space between columns: the width goes to the shapes
        padding=(0, 0),
        pad_edge=False,
    )
    table.add_column("#", justify="right")
    # Node and tensor names are single long words: rich cannot wrap them below their length, so
    # the two name columns share what the numbers leave of the width explicitly.
    names = max(40, width - 30)
    table.add_column("after node", overflow="fold", max_width=names // 3)
    table.add_column(Text("boundary: name, dtype[shape]"), overflow="fold", max_width=names - names // 3)
    for column in ("bytes", "layers", "params", "FLOPs"):
        table.add_column(column, justify="right")
    for row in rows:
        boundary = Text()
        for i, spec in enumerate(row["boundary"].split(", ")):
            tensor, _, typed = spec.rpartition(": ")
            boundary.append(("\n" if i else "") + tensor)
            boundary.append("\n  " + typed, style="cyan")
        table.add_row(
            Text(str(row["index"])),
            Text(row["after_node"]),
            boundary,
            Text(_compact(row["boundary_bytes"])),
            Text(str(row["private_layers"])),
            Text(_compact(row["private_parameters"])),
            Text(_compact(row["private_flops"])),
        )
    return table


def enclave_manifest(
    output: Annotated[Path, typer.Option("--out", "-o", help="Where to write the Gramine manifest template.")] = Path(
        "modelcloak-enclave.manifest.template"
    ),
    threads: Annotated[int, typer.Option(help="onnxruntime threads inside the enclave.")] = 4,
    connect: Annotated[str, typer.Option(help="HOST:PORT the enclave dials to reach its host.")] = "127.0.0.1:7878",
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a Gramine-SGX manifest template that runs this enclave entry point inside SGX."""
    import sys

    from modelcloak.enclave.gramine import render_manifest

    if output.exists() and not force:
        raise ModelcloakError(f"{output} already exists; pass --force to overwrite it")
    output.write_text(render_manifest(sys.executable, connect=connect, threads=threads))
    out.print(f"wrote {output}; build it with gramine-manifest and gramine-sgx-sign (docs/ENCLAVE.md)")


def register(app: typer.Typer) -> None:
    """Add the split commands to the main app."""
    app.command()(splits)
    app.command("enclave-manifest")(enclave_manifest)
