"""`enclave-build`: compile a split bundle's private part into its native C enclave (docs/NATIVE.md)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

from modelcloak.cli.common import out
from modelcloak.errors import ModelcloakError

# A directory holding these was written by a previous build; --force may replace it, nothing else.
_BUILD_MARKERS = ("model.c", "mc_model.h", "Makefile")


def enclave_build(
    bundle: Annotated[Path, typer.Argument(help="A split bundle (protect --scheme split).")],
    enclave_key_file: Annotated[
        Path, typer.Option("--enclave-key-file", help="The enclave's key: it decrypts the private part to compile it.")
    ],
    output: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Build directory (default: BUNDLE with suffix .native).")
    ] = None,
    arch: Annotated[
        str,
        typer.Option(
            "--arch",
            help="The compiler's -march: native (this machine only) or a fleet's baseline, e.g. x86-64-v3, armv8.2-a.",
        ),
    ] = "native",
    force: Annotated[bool, typer.Option("--force", help="Replace a previous native build in the directory.")] = False,
) -> None:
    """Generate and compile BUNDLE's native enclave: C99 + libcrypto, run with `run --native-enclave`."""
    from modelcloak.native import build_from_bundle

    if not bundle.is_file():
        raise ModelcloakError(f"{bundle}: no such bundle file")
    target = output if output is not None else bundle.with_suffix(".native")
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        if not (target.is_dir() and all((target / name).exists() for name in _BUILD_MARKERS)):
            raise ModelcloakError(f"{target} already exists and is not a native enclave build; choose another --out")
        if not force:
            raise ModelcloakError(f"{target} already holds a native enclave build; pass --force to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target and move it into place only when the compiler succeeded, so that a
    # failed build neither leaves a half-written directory nor destroys the previous one.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        built = build_from_bundle(bundle, enclave_key_file, staging, arch=arch)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    binary = target / built.binary.name
    ops = ", ".join(sorted(set(built.ops)))
    out.print(
        f"built {binary} (-march={arch}): {len(built.ops)} ops ({ops}); model.c {built.generated_lines} lines, "
        f"runtime {built.runtime_lines} lines; samples per tile {built.tile}",
        highlight=False,
        soft_wrap=True,
    )
    out.print(
        f"run it with: modelcloak run {bundle} INPUTS --key-file HOST_KEY --enclave-key-file KEY "
        f"--native-enclave {binary}",
        highlight=False,
        soft_wrap=True,
    )


def register(app: typer.Typer) -> None:
    """Add the native enclave command to the main app."""
    app.command("enclave-build")(enclave_build)
