"""The ``selfmask`` command line: one module per subcommand under ``selfmask.cli``.

Each command module defines ``register(subparsers)``, which adds its parser and
sets ``func`` (taking the parsed namespace, returning an exit code). User errors
(:class:`~selfmask.errors.SelfmaskError`, ``ValueError``, missing files, and any other
``OSError``: a full disk, a read-only file system) print one clear line and exit 2; Ctrl-C exits 130,
SIGTERM 143. Commands that train or evaluate (``cli.common.THREADED_COMMANDS``) get ``--threads``
here, in one place, and the thread count is set before the command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from selfmask.cli.common import THREADED_COMMANDS, add_threads_arg, threads_from_args

# Subcommand modules, in the order ``selfmask --help`` lists them.
COMMANDS: tuple[str, ...] = (
    "demo", "adapt", "eval", "pretrain", "lowshot", "pack", "inspect", "apply", "compress-report", "bench", "cascade",
    "backbones", "reproduce",
)


def build_parser() -> argparse.ArgumentParser:
    from selfmask import __version__

    parser = argparse.ArgumentParser(
        prog="selfmask",
        description="Adapt frozen pretrained vision models by learning binary masks over their weights.",
    )
    parser.add_argument("--version", action="version", version=f"selfmask {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"selfmask.cli.{name.replace('-', '_')}").register(sub)
        if name in THREADED_COMMANDS:
            add_threads_arg(sub.choices[name])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from selfmask.cli.signals import Terminated, sigterm_raises

    try:
        with sigterm_raises(), threads_from_args(args):  # SIGTERM unwinds like Ctrl-C: temporary files are removed
            return int(args.func(args) or 0)
    except Terminated:
        print(f"selfmask {args.command}: stopped by SIGTERM; no output was left half-written", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("selfmask: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError) as exc:
        print(f"selfmask {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a read-only file system, an I/O error: one line, not a traceback
        where = f": {exc.filename}" if exc.filename else ""
        print(f"selfmask {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
