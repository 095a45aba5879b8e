"""The `fedarches` command. Each command group lives in its own module that
exposes ``register(subparsers)``; this module only wires them together and turns
a ``FedarchesError`` into a one-line message and exit code 2."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from fedarches.errors import FedarchesError

# Modules that add commands; each has register(subparsers: argparse._SubParsersAction).
COMMAND_MODULES = ("core", "atlas", "site", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedarches",
        description="Federated scArches: reference atlases, query mapping by architecture surgery, "
        "and signed site contributions.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"fedarches.cli.{name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from fedarches.threads import prefer_passive_wait

    prefer_passive_wait()  # before any command imports torch (docs/THREADS.md)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FedarchesError as exc:
        print(f"fedarches {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: keep the traceback when asked
        if os.environ.get("FEDARCHES_DEBUG"):
            raise
        print(
            f"fedarches {args.command}: internal error: {type(exc).__name__}: {exc} "
            "(set FEDARCHES_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
