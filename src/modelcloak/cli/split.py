"""`splits` and `enclave-manifest`: where a model can be cut, and the enclave's TEE packaging."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from modelcloak.cli.common import out
from modelcloak.errors import ModelcloakError


def splits(model: Annotated[Path, typer.Argument(help="ONNX model file.")]) -> None:
    """List every candidate cut of MODEL with the private part's size, FLOPs and boundary size."""
    from modelcloak.model import load_model
    from modelcloak.model.cut import candidate_cuts, describe_cut_table

    rows = describe_cut_table(candidate_cuts(load_model(model)))
    if not rows:
        raise ModelcloakError(f"{model} has no valid cut (no node after which a weighted private part remains)")
    table = Table(title=f"candidate cuts of {model.name} (use --cut-index N with protect --scheme split)")
    for column in rows[0]:
        table.add_column(str(column), overflow="fold")
    for row in rows:
        table.add_row(*(f"{v:,}" if isinstance(v, int) else str(v) for v in row.values()))
    out.print(table)


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
