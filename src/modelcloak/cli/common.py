"""What every command group shares: consoles, key-source options, input files, flag names."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from modelcloak.cli.run_io import load_inputs
from modelcloak.errors import ModelcloakError

__all__ = ["err", "flagged", "int_list", "key_provider", "load_inputs", "out"]

out = Console()
err = Console(stderr=True)

KeyFileOpt = Annotated[Optional[Path], typer.Option("--key-file", help="File holding the 256-bit model key.")]
KeyEnvOpt = Annotated[
    Optional[str], typer.Option("--key-env", help="Environment variable holding the key (hex/base64).")
]
PassEnvOpt = Annotated[
    Optional[str],
    typer.Option("--passphrase-env", help="Environment variable holding a passphrase (scrypt-derived key)."),
]
PassPromptOpt = Annotated[bool, typer.Option("--passphrase", help="Prompt for a passphrase.")]
TctiOpt = Annotated[
    Optional[str], typer.Option(help="TPM connection (default: $TPM2TOOLS_TCTI, $TSS2_TCTI, /dev/tpmrm0).")
]

# Library errors name parameters in backticks (`cut`); the CLI shows the flags that set them.
PARAMETER_FLAGS = {
    "cut": "--cut-after/--cut-tensors/--cut-last/--cut-index",
    "cut.after_node": "--cut-after",
    "cut.tensors": "--cut-tensors",
    "cut.last": "--cut-last",
    "cut.index": "--cut-index",
    "enclave_key": "--enclave-key-file",
    "enclave_key_file": "--enclave-key-file",
    "enclave_key_env": "--enclave-key-env",
    "device_key": "--device-state",
    "lock": "--lock-to",
    "fhe": "--fhe-*",
    "fhe.secret_out": "--fhe-secret-out",
    "fhe_labels": "--fhe-labels-state",
    "policy": "--output-policy",
    "metering": "--usage-state",
}
_BACKTICKED = re.compile(r"`([a-z_.]+)`")


def flagged(message: str) -> str:
    """A library message with its backticked parameter names replaced by the CLI's flags."""
    return _BACKTICKED.sub(lambda m: PARAMETER_FLAGS.get(m.group(1), m.group(0)), message)


def key_provider(key_file: Path | None, key_env: str | None, passphrase_env: str | None, passphrase: bool) -> Any:
    """The one key source among --key-file, --key-env, --passphrase-env and --passphrase."""
    from modelcloak.keys import EnvKey, KeyFile, KeyProviderError, Passphrase

    chosen = [x for x in (key_file, key_env, passphrase_env, passphrase or None) if x]
    if len(chosen) != 1:
        raise KeyProviderError("give exactly one key source: --key-file, --key-env, --passphrase-env or --passphrase")
    if key_file:
        return KeyFile(key_file)
    if key_env:
        return EnvKey(key_env)
    if passphrase_env:
        value = os.environ.get(passphrase_env)
        if not value:
            raise KeyProviderError(f"environment variable {passphrase_env} is not set")
        return Passphrase(value)
    if not sys.stdin.isatty():
        raise KeyProviderError("--passphrase prompts on a terminal and there is none; use --passphrase-env VAR")
    return Passphrase(typer.prompt("Passphrase", hide_input=True))


def int_list(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ModelcloakError(f"{what} must be comma-separated integers, got {text!r}") from None
