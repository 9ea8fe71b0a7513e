"""`python -m modelcloak` runs the CLI."""

from modelcloak.cli import main

main()
