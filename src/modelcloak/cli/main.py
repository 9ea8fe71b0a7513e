"""The `modelcloak` command: one app, one command group per module, one error rule.

Every failure the user can act on is one line on stderr and exit 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import os
import sys

import typer

from modelcloak.cli import bench, bundle, device, evaluate, fhe, native, owner, softlock, split
from modelcloak.cli.common import err, flagged, out
from modelcloak.errors import ModelcloakError

try:  # recent typer releases vendor click under typer._click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer uses the click package
    from click.exceptions import ClickException  # type: ignore[assignment]
from typer import Abort

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Protect neural networks shipped to machines you do not control.",
)
# The order of `modelcloak --help`: the bundle's life first, then each scheme's tools.
for group in (bundle, split, native, device, softlock, fhe, owner, evaluate, bench):
    group.register(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors and exit code 2, tracebacks only with --debug."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("MODELCLOAK_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    command = typer.main.get_command(app)
    try:
        command.main(args=args, prog_name="modelcloak", standalone_mode=False)
    except Abort:
        err.print("modelcloak: aborted", highlight=False)
        sys.exit(130)
    except ClickException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `modelcloak`: show help, not an error
            out.print(
                command.get_help(command.make_context("modelcloak", ["--help"], resilient_parsing=True)),
                highlight=False,
            )
            return
        if debug:
            raise
        err.print(f"modelcloak: error: {exc.format_message()} (see modelcloak --help)", highlight=False, soft_wrap=True)
        sys.exit(2)
    except ModelcloakError as exc:
        if debug:
            raise
        err.print(f"modelcloak: error: {flagged(str(exc))}", highlight=False, soft_wrap=True, markup=False)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # last resort: still one line, with the way to see more
        if debug:
            raise
        err.print(
            f"modelcloak: internal error: {exc.__class__.__name__}: {exc} (rerun with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
            markup=False,
        )
        sys.exit(1)
