"""Command line interface (``selfmask COMMAND``)."""

from selfmask.cli.main import main

__all__ = ["main"]
