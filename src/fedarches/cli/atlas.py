"""`fedarches atlas ...` commands (being built; see docs/ARCHITECTURE.md)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Registers nothing until this command group lands."""
