"""The model directory: safetensors blobs plus a canonical JSON manifest.

Why this shape: tensors in safetensors can be read without executing anything
(no pickle, invariant 6), and a manifest that records the sha256 of every blob
lets any reader detect a corrupt or swapped file before a single weight is used.
The manifest is canonical JSON so its hash is a stable identity: the federation
layer uses exactly these bytes to name atlas versions.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedarches import __version__
from fedarches.config import ModelConfig, TrainConfig
from fedarches.errors import ModelFileError
from fedarches.format.canonical import canonical_json, sha256_file

MODEL_FORMAT = "fedarches.model/1"
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
CONDITIONS = "conditions.safetensors"
REFERENCE = "reference.safetensors"
BLOB_FILES = (WEIGHTS, CONDITIONS, REFERENCE)


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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    if unknown:
        raise ValueError(f"unknown blob files {sorted(unknown)}; expected some of {BLOB_FILES}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        files: dict[str, str] = {}
        for name in BLOB_FILES:
            if name not in blobs:
                continue
            tensors = {k: v.detach().cpu().contiguous() for k, v in blobs[name].items()}
            save_file(tensors, str(tmp / name))
            files[name] = sha256_file(tmp / name)
        manifest = manifest.model_copy(update={"files": files})
        (tmp / MANIFEST).write_bytes(canonical_json(manifest))
        for name in os.listdir(tmp):
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        if target.exists():
            if not (target / MANIFEST).exists() and any(target.iterdir()):
                raise ModelFileError(
                    f"{target} exists and is not a fedarches model directory; choose another --out"
                )
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_manifest(path: str | os.PathLike[str]) -> ModelManifest:
    """Parse and validate ``manifest.json`` without touching the blobs."""
    d = Path(path)
    mpath = d / MANIFEST
    if not d.is_dir():
        raise ModelFileError(f"model directory {d} does not exist")
    if not mpath.is_file():
        raise ModelFileError(
            f"{d} is not a fedarches model directory (no {MANIFEST}); pass the --out of train-reference or map"
        )
    try:
        raw = json.loads(mpath.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{mpath} is not valid JSON ({exc}); the model directory is corrupt") from exc
    if not isinstance(raw, dict) or raw.get("format") != MODEL_FORMAT:
        fmt = raw.get("format") if isinstance(raw, dict) else None
        raise ModelFileError(f"{mpath} has format {fmt!r}, expected {MODEL_FORMAT!r}: not a fedarches model")
    try:
        return ModelManifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ModelFileError(f"{mpath} is invalid at {loc}: {first['msg']}") from exc


def load_model_dir(path: str | os.PathLike[str]) -> tuple[ModelManifest, dict[str, dict[str, torch.Tensor]]]:
    """Read a model directory, checking every blob against the manifest's sha256."""
    d = Path(path)
    manifest = read_manifest(d)
    for required in (WEIGHTS, CONDITIONS):
        if required not in manifest.files:
            raise ModelFileError(f"{d / MANIFEST} lists no {required}; the model directory is incomplete")
    blobs: dict[str, dict[str, torch.Tensor]] = {}
    for name, digest in manifest.files.items():
        if name not in BLOB_FILES:
            raise ModelFileError(f"{d / MANIFEST} names unexpected file {name!r}")
        fpath = d / name
        if not fpath.is_file():
            raise ModelFileError(f"{fpath} is missing; the model directory is incomplete")
        actual = sha256_file(fpath)
        if actual != digest:
            raise ModelFileError(
                f"{fpath} fails its sha256 check (manifest {digest[:12]}..., file {actual[:12]}...): "
                "the file was changed or corrupted; fetch or copy the model again"
            )
        try:
            blobs[name] = load_file(str(fpath))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelFileError(f"{fpath} is not a readable safetensors file: {exc}") from exc
    return manifest, blobs
