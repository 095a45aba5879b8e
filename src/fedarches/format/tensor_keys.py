"""The one place tensor keys are built and parsed.

A condition vector is stored under ``"<table>/<condition name>"`` (tables:
``encoder``, ``decoder`` and for NB models ``dispersion``) in
``conditions.safetensors`` and in contribution bundles; a branch bundle's
changed shared tensor under ``"shared/<blob file>/<tensor key>"``; a site's shared
label summaries under ``"labels/<state field>"``. New
condition names cannot contain ``/`` (``format.names``), but versions published
before that rule may hold such names; the table never does, so the first ``/``
splits.
"""

from __future__ import annotations

from fedarches.errors import BundleContentError

SHARED_PREFIX = "shared/"
#: A site's shared label summaries in a bundle: ``"labels/<state field>"`` (``ClassSummaries.state``).
LABEL_PREFIX = "labels/"


def label_key(field: str) -> str:
    return f"{LABEL_PREFIX}{field}"


def is_condition_key(key: str) -> bool:
    """Neither a shared tensor nor a label-summary field: a condition vector."""
    return not key.startswith((SHARED_PREFIX, LABEL_PREFIX))


def condition_key(table: str, name: str) -> str:
    """Key of one condition vector in ``conditions.safetensors`` and in bundles."""
    return f"{table}/{name}"


def split_condition_key(key: str) -> tuple[str, str]:
    """``"encoder/study 1"`` -> ``("encoder", "study 1")`` (names may contain ``/``)."""
    table, sep, name = key.partition("/")
    if not sep or not name:
        raise BundleContentError(f"tensor key check failed: {key!r} is not '<table>/<condition name>'")
    return table, name


def shared_key(blob_file: str, key: str) -> str:
    return f"{SHARED_PREFIX}{blob_file}/{key}"


def split_shared_key(key: str) -> tuple[str, str]:
    rest = key[len(SHARED_PREFIX) :]
    blob, sep, inner = rest.partition("/")
    if not key.startswith(SHARED_PREFIX) or not sep or not inner:
        raise BundleContentError(f"tensor key check failed: {key!r} is not 'shared/<blob file>/<tensor key>'")
    return blob, inner
