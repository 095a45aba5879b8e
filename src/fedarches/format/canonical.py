"""Canonical bytes and content hashes: how coordinator and sites agree on identity.

Canonical JSON (sorted keys, no whitespace, UTF-8) makes "the same object"
mean "the same bytes", so a sha256 of it is a stable name: model manifests,
atlas version ids and signed bundle manifests are all named this way.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from typing import Any, NoReturn

import torch
from pydantic import BaseModel, ValidationError, model_serializer

from fedarches.errors import FedarchesError

#: Integers longer than this (in digits) are refused: no field of ours needs
#: more, and CPython refuses > 4,300 digits with a bare ValueError.
MAX_INT_DIGITS = 30

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")


class OmitEmptyLabels(BaseModel):
    """A model whose later-added fields (``labels``: label summaries; ``build``: how a federated
    reference was trained) are left out of every dump while empty: documents written before
    those fields existed keep their bytes, hashes and signatures."""

    @model_serializer(mode="wrap")
    def _omit_empty_labels(self, handler: Any) -> Any:
        out = handler(self)
        if isinstance(out, dict):
            for key in ("labels", "build"):
                if key in out and not out[key]:
                    del out[key]
        return out


def canonical_json(obj: BaseModel | dict[str, Any] | list[Any]) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the same object always gives the same bytes."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def validation_summary(exc: ValidationError) -> str:
    """The first problem pydantic found, on one line (its own text spans several)."""
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "top level"
    return f"invalid at {loc}: {first['msg']}"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensor_sha256(t: torch.Tensor) -> str:
    """Hash of a tensor's dtype, shape and raw bytes (used to prove frozen tensors did not move)."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _json_depth(data: bytes) -> int:
    """Deepest nesting of ``[``/``{`` outside strings, found without recursion."""
    depth = deepest = 0
    for m in _BRACKET.finditer(_STRING.sub(b'""', data)):
        if m.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def parse_json_bounded(
    data: bytes,
    *,
    max_bytes: int,
    max_depth: int = 64,
    what: str,
    error: type[FedarchesError],
) -> Any:
    """``json.loads`` for bytes that came from elsewhere, failing only with ``error``.

    Why: the standard parser turns hostile input into ``RecursionError`` (deep
    nesting), a bare ``ValueError`` (a 5,000-digit integer) or ``inf`` (1e999),
    none of which a caller reports as the check that failed. Here every refusal
    is ``error`` with a one-line message that starts with its check name.
    """

    def fail(reason: str) -> NoReturn:
        raise error(f"{error.check} failed: {what} {reason}")

    if len(data) > max_bytes:
        fail(f"is {len(data)} bytes, above the {max_bytes} byte limit")
    if _json_depth(data) > max_depth:
        fail(f"nests deeper than {max_depth} levels")

    def parse_int(text: str) -> int:
        if len(text.lstrip("-")) > MAX_INT_DIGITS:
            fail(f"holds an integer of {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
        return int(text)

    def parse_float(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            fail(f"holds a number out of range ({text[:40]})")
        return value

    def parse_constant(text: str) -> NoReturn:
        fail(f"holds {text}, which is not JSON")

    try:
        return json.loads(data, parse_int=parse_int, parse_float=parse_float, parse_constant=parse_constant)
    except FedarchesError:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        fail(f"is not JSON ({' '.join(str(exc).split())[:200]})")
