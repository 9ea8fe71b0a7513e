"""`modelcloak device ...`: enrol this machine for device-locked models (the device side of `lock`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from modelcloak.cli.common import TctiOpt, out

StateOpt = Annotated[Path, typer.Option("--state", help="Enrolment directory (created 0700).")]


def register(app: typer.Typer) -> None:
    device_app = typer.Typer(
        add_completion=False, no_args_is_help=True, help="Enrol this device so models can be locked to it."
    )
    app.add_typer(device_app, name="device")
    device_app.command("enroll")(enroll)
    device_app.command("show")(show)
    device_app.command("export-lock-key")(export_lock_key)


def enroll(
    state: StateOpt,
    software: Annotated[
        bool, typer.Option("--software", help="No TPM: a secret file bound to machine identifiers (weaker).")
    ] = False,
    tcti: TctiOpt = None,
    pcrs: Annotated[
        Optional[str], typer.Option(help="TPM: seal to these sha256 PCRs' current values, e.g. 0,7.")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing enrolment (old locks stop working).")
    ] = False,
) -> None:
    """Create this device's secret (sealed to its TPM, or a 0600 file with --software) and print its identity."""
    from modelcloak.errors import ModelcloakError

    if software:
        if tcti or pcrs:
            raise ModelcloakError("--tcti and --pcrs apply to TPM enrolment, not --software")
        from modelcloak.keys.device import enroll_software_device

        identity = enroll_software_device(state, force=force)
    else:
        from modelcloak.keys.tpm import enroll_device

        selected = None
        if pcrs:
            try:
                selected = [int(p) for p in pcrs.split(",") if p.strip()]
            except ValueError:
                raise ModelcloakError(f"--pcrs must be comma-separated PCR numbers, got {pcrs!r}") from None
        identity = enroll_device(state, tcti=tcti, pcrs=selected, force=force)
    _print_identity(identity)
    out.print(f"next: modelcloak device export-lock-key --state {state} --out FILE (once, for the owner)")


def show(state: StateOpt) -> None:
    """Print the public identity recorded in an enrolment directory (no TPM access)."""
    from modelcloak.keys.device import load_identity

    _print_identity(load_identity(state))


def export_lock_key(
    state: StateOpt,
    output: Annotated[Path, typer.Option("--out", "-o", help="Lock key file for the owner (written 0600).")],
    tcti: TctiOpt = None,
    again: Annotated[bool, typer.Option("--again", help="Export although it was exported before.")] = False,
) -> None:
    """Write the device's lock key for the owner, who then locks models with `protect --lock-to FILE`."""
    from modelcloak.errors import ModelcloakError
    from modelcloak.keys.device import write_lock_key_file
    from modelcloak.keys.enrolled import open_device_key

    if output.exists():
        raise ModelcloakError(f"{output} already exists; remove it first (it may be another device's key)")
    device = open_device_key(state, tcti=tcti)
    root = device.export_lock_key(again=again)
    try:
        write_lock_key_file(output, root, device.identity)
    finally:
        root.close()
    out.print(f"wrote {output} for {device.identity.fingerprint}; hand it to the owner over a trusted channel")


def _print_identity(identity) -> None:  # noqa: ANN001 - DeviceIdentity, imported lazily
    table = Table(show_header=False, box=None)
    table.add_row("fingerprint", identity.fingerprint)
    table.add_row("kind", identity.kind + (" (weaker: no TPM)" if identity.kind == "software" else ""))
    table.add_row("device id", identity.device_id)
    if identity.pcrs:
        table.add_row("sealed to", f"{identity.pcr_bank} PCRs {', '.join(map(str, identity.pcrs))}")
    out.print(table)
