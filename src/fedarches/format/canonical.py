"""Canonical bytes and content hashes: how coordinator and sites agree on identity.

Canonical JSON (sorted keys, no whitespace, UTF-8) makes "the same object"
mean "the same bytes", so a sha256 of it is a stable name: model manifests,
atlas version ids and signed bundle manifests are all named this way.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch
from pydantic import BaseModel


def canonical_json(obj: BaseModel | dict[str, Any] | list[Any]) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the same object always gives the same bytes."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


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
