"""The command-line interface (thin: parses arguments, calls the rooms, prints)."""

from modelcloak.cli.main import app, main

__all__ = ["app", "main"]
