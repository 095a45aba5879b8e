"""Exceptions users see.

Every error raised on bad input is a ``FedarchesError`` whose message names the
problem and what to do about it; the CLI prints it on one line and exits 2.
Keeping one hierarchy lets callers (CLI, Flower client, server intake) tell
"the user's input is wrong" apart from "the program is broken".
"""

from __future__ import annotations


class FedarchesError(Exception):
    """Base class: an expected failure with a message meant for the user."""


class InputDataError(FedarchesError, ValueError):
    """The AnnData (or its columns) cannot be used as given."""


class ModelFileError(FedarchesError):
    """A model directory is missing, corrupt, foreign or fails a hash check."""


class VerificationError(FedarchesError):
    """A signature, hash, version or trust check failed; nothing was loaded."""


class ContributionError(FedarchesError):
    """A site contribution bundle cannot be accepted (shape, collision, parent...)."""
