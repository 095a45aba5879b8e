"""The model directory: safetensors blobs plus a canonical JSON manifest.

Why this shape: tensors in safetensors can be read without executing anything
(no pickle, invariant 6), and a manifest that records the sha256 of every blob
lets any reader detect a corrupt or swapped file before a single weight is used.
The manifest is canonical JSON so its hash is a stable identity: the federation
layer uses exactly these bytes to name atlas versions.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedarches import __version__
from fedarches.config import ModelConfig, TrainConfig
from fedarches.atomic import replace_dir, staged_dir
from fedarches.errors import BlobHashError, ManifestError, ModelDirError, OutputPathError
from fedarches.format.canonical import canonical_json, parse_json_bounded, sha256_file, validation_summary

MODEL_FORMAT = "fedarches.model/1"
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
CONDITIONS = "conditions.safetensors"
REFERENCE = "reference.safetensors"  # per-cell reference latent + labels (label knowledge "cells")
LABELS = "labels.safetensors"  # class summaries, no per-cell array (label knowledge "summaries")
BLOB_FILES = (WEIGHTS, CONDITIONS, REFERENCE, LABELS)
#: Largest manifest accepted (model or published version manifest): a
#: 30,000-gene model with thousands of conditions stays far below it.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024


class ModelManifest(BaseModel):
    """Everything needed to rebuild a model except its tensors."""

    model_config = ConfigDict(extra="forbid")

    format: str = MODEL_FORMAT
    created_by: str = f"fedarches {__version__}"
    config: ModelConfig
    train: TrainConfig
    genes: list[str]
    conditions: list[str]
    condition_key: str
    label_key: str | None = None
    label_categories: list[str] = []
    files: dict[str, str] = {}


def save_model_dir(
    path: str | os.PathLike[str],
    manifest: ModelManifest,
    blobs: dict[str, dict[str, torch.Tensor]],
) -> ModelManifest:
    """Write blobs and manifest into ``path`` atomically.

    Everything goes to a sibling temporary directory first and is renamed into
    place, so a crash never leaves a directory whose manifest and blobs disagree.
    Returns the manifest with its ``files`` hashes filled in.
    """
    target = Path(path)
    unknown = set(blobs) - set(BLOB_FILES)
    if unknown:  # a caller bug, not a user's input
        raise ValueError(f"unknown blob files {sorted(unknown)}; expected some of {BLOB_FILES}")
    if target.exists() and not (target / MANIFEST).exists() and (not target.is_dir() or any(target.iterdir())):
        raise OutputPathError(
            f"output path check failed: {target} exists and is not a fedarches model directory; choose another --out"
        )
    with staged_dir(target) as tmp:
        files: dict[str, str] = {}
        for name in BLOB_FILES:
            if name not in blobs:
                continue
            tensors = {k: v.detach().cpu().contiguous() for k, v in blobs[name].items()}
            save_file(tensors, str(tmp / name))
            files[name] = sha256_file(tmp / name)
        manifest = manifest.model_copy(update={"files": files})
        (tmp / MANIFEST).write_bytes(canonical_json(manifest))
        replace_dir(tmp, target)
    return manifest


def read_manifest(path: str | os.PathLike[str]) -> ModelManifest:
    """Parse and validate ``manifest.json`` without touching the blobs."""
    d = Path(path)
    mpath = d / MANIFEST
    if not d.is_dir():
        raise ModelDirError(f"model directory check failed: {d} does not exist")
    if not mpath.is_file():
        raise ModelDirError(
            f"model directory check failed: {d} is not a fedarches model directory (no {MANIFEST}); pass the --out of train-reference or map"
        )
    raw = parse_json_bounded(
        mpath.read_bytes(), max_bytes=MAX_MANIFEST_BYTES, what=f"{mpath} (the model directory is corrupt)",
        error=ManifestError,
    )
    if not isinstance(raw, dict) or raw.get("format") != MODEL_FORMAT:
        fmt = raw.get("format") if isinstance(raw, dict) else None
        raise ManifestError(f"manifest check failed: {mpath} has format {fmt!r}, expected {MODEL_FORMAT!r}: not a fedarches model")
    try:
        return ModelManifest.model_validate(raw)
    except ValidationError as exc:
        raise ManifestError(f"manifest check failed: {mpath} is {validation_summary(exc)}") from exc


def load_model_dir(path: str | os.PathLike[str]) -> tuple[ModelManifest, dict[str, dict[str, torch.Tensor]]]:
    """Read a model directory, checking every blob against the manifest's sha256."""
    d = Path(path)
    manifest = read_manifest(d)
    for required in (WEIGHTS, CONDITIONS):
        if required not in manifest.files:
            raise ModelDirError(f"model directory check failed: {d / MANIFEST} lists no {required}; the model directory is incomplete")
    blobs: dict[str, dict[str, torch.Tensor]] = {}
    for name, digest in manifest.files.items():
        if name not in BLOB_FILES:
            raise ManifestError(f"manifest check failed: {d / MANIFEST} names unexpected file {name!r}")
        fpath = d / name
        if not fpath.is_file():
            raise ModelDirError(f"model directory check failed: {fpath} is missing; the model directory is incomplete")
        actual = sha256_file(fpath)
        if actual != digest:
            raise BlobHashError(
                f"blob hash check failed: {fpath} fails its sha256 check "
                f"(manifest {digest[:12]}..., file {actual[:12]}...): "
                "the file was changed or corrupted; fetch or copy the model again"
            )
        try:
            blobs[name] = load_file(str(fpath))
        except (SafetensorError, OSError, ValueError) as exc:
            raise BlobHashError(f"blob hash check failed: {fpath} is not a readable safetensors file: {exc}") from exc
    return manifest, blobs
