"""A site maps its private data onto a verified atlas version and signs a contribution.

Why the bundle is computed by *diffing* the site's mapped model against the
fetched parent instead of asking the model for "the new rows": the diff proves
invariant 2 at the point where it matters. Every tensor of the parent is
compared by sha256 with the site's model; for strategy ``conditions`` any
difference outside the new condition vectors is refused before anything is
signed, so a training bug can never ship altered shared weights under a
"conditions only" label. For ``input-layers`` / ``full`` the changed tensors
are exactly what goes into the (branch) bundle.

Outputs of ``map_and_contribute`` in ``out_dir``:

- ``query.h5ad``                the site's cells with latent and label predictions (stays here)
- ``report.json``               what was done, timings, metrics, bundle size vs formula (stays here)
- ``model/``                    the site's mapped model directory (stays here)
- ``atlas/``                    the verified parent version it mapped onto (stays here)
- ``contribution.safetensors``  the signed bundle: the only file meant to leave the site
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import torch

from fedarches.config import STRATEGIES, Strategy
from fedarches.format.bundle import BUNDLE_FILE, create_bundle, expected_tensor_bytes, read_bundle
from fedarches.format.metrics import sanitize_metrics
from fedarches.format.tensor_keys import shared_key, split_condition_key
from fedarches.client.fetch import AtlasClient, FetchedVersion
from fedarches.data.io import read_h5ad
from fedarches.errors import ContributionError, InputDataError, ModelFileError
from fedarches.format.version import AtlasVersion, read_atlas_version
from fedarches.format.signing import PrivateKey, load_site_key
from fedarches.format.model_dir import CONDITIONS, WEIGHTS, load_model_dir
from fedarches.format.canonical import tensor_sha256

QUERY_FILE = "query.h5ad"
REPORT_FILE = "report.json"
MODEL_SUBDIR = "model"
ATLAS_SUBDIR = "atlas"

# Report entries a bundle carries by default: aggregate quality and cost figures.
# Cell counts are left out on purpose (a count of a site's cells is information
# about its private data that the merge does not need).
BUNDLE_METRICS = (
    "strategy",
    "model",
    "epochs",
    "best_epoch",
    "stopped_early",
    "seconds",
    "trainable_parameters",
    "final_loss",
    "gene_overlap",
    "label_transfer.accuracy_known",
    "label_transfer.unseen_called_unknown",
    "label_transfer.known_called_unknown",
)


def _flatten(report: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in report.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def bundle_metrics(report: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The scalar metrics a bundle reports: the allow-listed report entries plus ``extra``."""
    flat = _flatten(report)
    chosen = {k: flat[k] for k in BUNDLE_METRICS if k in flat and flat[k] is not None}
    chosen.update(extra or {})
    return sanitize_metrics(chosen)


def contribution_tensors(
    parent_dir: str | os.PathLike[str], site_model_dir: str | os.PathLike[str], strategy: Strategy
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """What the site's model adds to (and, for branch strategies, changes in) the parent.

    Returns ``(tensors, new_condition_names)`` with bundle keys. Raises
    ``ContributionError`` when a ``conditions`` mapping moved any shared tensor.
    """
    pman, pblobs = load_model_dir(parent_dir)
    sman, sblobs = load_model_dir(site_model_dir)
    if sman.genes != pman.genes or sman.config != pman.config:
        raise ContributionError(
            "contribution check failed: the site model's genes or architecture differ from the atlas version"
        )
    if sman.conditions[: len(pman.conditions)] != pman.conditions:
        raise ContributionError(
            "contribution check failed: the site model does not extend the atlas version's conditions"
        )
    new = [c for c in sman.conditions if c not in set(pman.conditions)]
    if not new:
        raise ContributionError("contribution check failed: the site model adds no condition")
    tensors: dict[str, torch.Tensor] = {}
    for key, t in sblobs[CONDITIONS].items():
        if split_condition_key(key)[1] in new:
            tensors[key] = t
    changed: list[str] = []
    for blob in (WEIGHTS, CONDITIONS):
        for key, before in pblobs[blob].items():
            after = sblobs[blob].get(key)
            if after is None:
                raise ContributionError(f"contribution check failed: the site model lost tensor {blob}/{key}")
            if tensor_sha256(after) != tensor_sha256(before):
                changed.append(f"{blob}/{key}")
                tensors[shared_key(blob, key)] = after
    if changed and strategy == "conditions":
        raise ContributionError(
            f"frozen weights check failed: strategy 'conditions' must leave every shared tensor byte-identical, "
            f"but {len(changed)} changed (first: {changed[0]}); refusing to sign this contribution"
        )
    return tensors, new


@dataclass(frozen=True)
class SiteMapResult:
    """Where ``map_and_contribute`` put things, and what it contributed."""

    out_dir: Path
    bundle_path: Path
    query_path: Path
    report_path: Path
    model_dir: Path
    parent: AtlasVersion
    parent_id: str
    conditions: list[str]
    report: dict[str, Any] = field(default_factory=dict)

    def bundle_bytes(self) -> bytes:
        return self.bundle_path.read_bytes()


def _resolve_key(key: PrivateKey | str | os.PathLike[str]) -> PrivateKey:
    return key if isinstance(key, PrivateKey) else load_site_key(key)


def map_local(
    parent_dir: str | os.PathLike[str],
    *,
    key: PrivateKey | str | os.PathLike[str],
    site: str,
    data: ad.AnnData | str | os.PathLike[str],
    condition_key: str,
    out_dir: str | os.PathLike[str],
    epochs: int | None = None,
    strategy: Strategy = "conditions",
    seed: int = 0,
    threads: int | None = None,
    metrics: Mapping[str, Any] | None = None,
    progress: bool = False,
    atlas_url: str | None = None,
) -> SiteMapResult:
    """Map ``data`` onto an already fetched (verified) model directory and sign a bundle.

    ``parent_dir`` must come from ``AtlasClient.fetch`` (it holds
    ``atlas-version.json``, which names the parent version id). ``out_dir`` is
    built in a temporary sibling and renamed into place at the end, so a
    failure leaves no partial output.
    """
    from fedarches.model import FedArchesModel

    if strategy not in STRATEGIES:
        raise InputDataError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    private = _resolve_key(key)
    parent = read_atlas_version(parent_dir)
    adata = read_h5ad(data)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / REPORT_FILE).is_file())):
        raise ModelFileError(f"{out} exists and is not the output of a previous `site map`; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shutil.copytree(parent_dir, work / ATLAS_SUBDIR)
        model = FedArchesModel.load(work / ATLAS_SUBDIR)
        res = model.map_query(
            adata, condition_key, strategy=strategy, epochs=epochs, seed=seed, threads=threads, progress=progress
        )
        res.model.save(work / MODEL_SUBDIR)
        tensors, new = contribution_tensors(work / ATLAS_SUBDIR, work / MODEL_SUBDIR, strategy)
        bundle = create_bundle(
            key=private,
            site=site,
            atlas=parent.atlas,
            parent=parent.id,
            parent_number=parent.number,
            strategy=strategy,
            tensors=tensors,
            metrics=bundle_metrics(res.report, metrics),
        )
        (work / BUNDLE_FILE).write_bytes(bundle)
        res.adata.write_h5ad(work / QUERY_FILE)
        parsed = read_bundle(bundle)
        report = dict(res.report)
        report["site"] = site
        report["atlas"] = {
            "name": parent.atlas,
            "version": parent.number,
            "id": parent.id,
            "branch": parent.branch,
            "url": atlas_url,
        }
        report["bundle"] = {
            "file": BUNDLE_FILE,
            "bytes": len(bundle),
            "header_bytes": 8 + parsed.header_size,
            "tensor_bytes": len(bundle) - 8 - parsed.header_size,
            "formula_tensor_bytes": expected_tensor_bytes(model.config, len(new)) if strategy == "conditions" else None,
            "digest": parsed.digest,
            "key_id": private.public.key_id,
            "metrics": dict(parsed.manifest.metrics),
        }
        (work / REPORT_FILE).write_bytes(json.dumps(report, indent=2, sort_keys=True, default=str).encode() + b"\n")
        for p in work.iterdir():
            if p.is_file():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(work, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return SiteMapResult(
        out_dir=out,
        bundle_path=out / BUNDLE_FILE,
        query_path=out / QUERY_FILE,
        report_path=out / REPORT_FILE,
        model_dir=out / MODEL_SUBDIR,
        parent=parent,
        parent_id=parent.id,
        conditions=new,
        report=report,
    )


def map_and_contribute(
    *,
    atlas_url: str,
    trust: str | os.PathLike[str] | bytes,
    key: PrivateKey | str | os.PathLike[str],
    site: str,
    data: ad.AnnData | str | os.PathLike[str],
    condition_key: str,
    out_dir: str | os.PathLike[str],
    epochs: int | None = None,
    strategy: Strategy = "conditions",
    version: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    threads: int | None = None,
    metrics: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> SiteMapResult:
    """Fetch + verify a version over TUF, map ``data`` onto it, write outputs and a signed bundle.

    This is ``fedarches site map`` as a function; the Flower ClientApp calls
    it and sends ``result.bundle_bytes()``.
    """
    private = _resolve_key(key)  # fail on a bad key before any download or training
    client = AtlasClient(atlas_url, trust, cache_dir=cache_dir)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.fetch.", dir=out.parent))
    try:
        fetched: FetchedVersion = client.fetch(staging / ATLAS_SUBDIR, version)
        result = map_local(
            fetched.path,
            key=private,
            site=site,
            data=data,
            condition_key=condition_key,
            out_dir=out,
            epochs=epochs,
            strategy=strategy,
            seed=seed,
            threads=threads,
            metrics=metrics,
            progress=progress,
            atlas_url=client.url,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


__all__ = [
    "SiteMapResult",
    "bundle_metrics",
    "contribution_tensors",
    "map_and_contribute",
    "map_local",
]
