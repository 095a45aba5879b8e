"""A site maps its private data onto a verified atlas version and signs a contribution.

One path for every entry point: ``fedarches site map``, the Python API and the
Flower client all call ``map_local`` (``map_and_contribute`` fetches first), so
the same data and ``MapSettings`` give the same outcome and byte-identical
bundles. The plan comes first: a site whose studies are all in the version
gets status ``nothing-new`` (a ``report.json`` saying so), not an error.

Outputs in ``out_dir`` (swapped in whole, so a failure leaves the old or none):

- ``query.h5ad``                the site's cells with latent and label predictions (stays here)
- ``report.json``               what was done, timings, metrics, bundle size vs formula (stays here)
- ``model/``                    the site's mapped model directory (stays here)
- ``atlas/``                    the verified parent version it mapped onto (stays here)
- ``contribution.safetensors``  the signed bundle: the only file meant to leave the site
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
from pydantic import ValidationError

from fedarches.atomic import make_dirs, replace_dir, staged_dir, write_bytes
from fedarches.client.contribution import contribution_tensors
from fedarches.client.fetch import DEADLINE_S, AtlasClient
from fedarches.client.labels import LabelSharePlan, label_part, plan_label_share
from fedarches.client.plan import ContributionPlan, plan_contribution
from fedarches.config import MapSettings
from fedarches.data.io import read_h5ad
from fedarches.errors import FedarchesError, ManifestError, ModelFileError, VersionManifestError
from fedarches.format.bundle import (
    BUNDLE_FILE,
    bundle_components,
    create_bundle,
    expected_tensor_bytes,
    label_part_bytes,
    read_bundle,
)
from fedarches.format.signing import PrivateKey, load_site_key
from fedarches.format.version import AtlasVersion, read_atlas_version
from fedarches.mapping import MODEL_SUBDIR, QUERY_FILE, REPORT_FILE, check_out_dir, write_mapped, write_report
from fedarches.report import AtlasRef, BundleInfo, MapReport, SiteReport

ATLAS_SUBDIR = "atlas"
STATUS_CONTRIBUTED = "contributed"
STATUS_NOTHING_NEW = "nothing-new"

SiteKey = PrivateKey | str | os.PathLike[str]


@dataclass(frozen=True)
class SiteMapResult:
    """What a site map did and where it put things (paths are ``None`` when nothing was new)."""

    status: str
    plan: ContributionPlan
    parent: AtlasVersion
    out_dir: Path
    report: SiteReport
    report_path: Path
    bundle_path: Path | None
    query_path: Path | None
    model_dir: Path | None

    @property
    def conditions(self) -> list[str]:
        return list(self.plan.new) if self.status == STATUS_CONTRIBUTED else []

    def bundle_bytes(self) -> bytes:
        if self.bundle_path is None:
            raise ValueError(f"no bundle: status {self.status!r} ({self.out_dir})")
        return self.bundle_path.read_bytes()


def _resolve_key(key: SiteKey) -> PrivateKey:
    return key if isinstance(key, PrivateKey) else load_site_key(key)


def _one_line(text: str, limit: int = 400) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def read_parent(parent_dir: str | os.PathLike[str]) -> AtlasVersion:
    """The version a fetched directory holds; a damaged one is a one-line error, not a traceback."""
    try:
        return read_atlas_version(parent_dir)
    except ModelFileError:
        raise
    except FedarchesError as exc:
        raise VersionManifestError(
            _one_line(f"version manifest check failed: {parent_dir} is damaged ({exc}); fetch the version again")
        ) from exc
    except (ValidationError, ValueError, OSError) as exc:
        raise ManifestError(
            _one_line(f"manifest check failed: {parent_dir} has a damaged manifest.json ({exc}); "
                      "fetch the version again")
        ) from exc


def _site_report(status: str, site: str, parent: AtlasVersion, plan: ContributionPlan, atlas_url: str | None,
                 mapped: MapReport | None = None, bundle: BundleInfo | None = None,
                 labels: dict[str, object] | None = None) -> SiteReport:
    ref = AtlasRef(name=parent.atlas, version=parent.number, id=parent.id, branch=parent.branch, url=atlas_url)
    return SiteReport(status=status, site=site, atlas=ref, plan=plan, map=mapped, bundle=bundle, labels=labels)


def _bundle_info(bundle: bytes, key: PrivateKey, formula: int | None, latent_dim: int) -> BundleInfo:
    parsed = read_bundle(bundle)
    if formula is not None:
        formula += label_part_bytes(len(parsed.manifest.labels), bundle_components(parsed), latent_dim)
    return BundleInfo(
        file=BUNDLE_FILE,
        bytes=len(bundle),
        header_bytes=8 + parsed.header_size,
        tensor_bytes=len(bundle) - 8 - parsed.header_size,
        formula_tensor_bytes=formula,
        digest=parsed.digest,
        key_id=key.public.key_id,
        metrics=dict(parsed.manifest.metrics),
    )


def _nothing_new(out: Path, report: SiteReport, plan: ContributionPlan, parent: AtlasVersion) -> SiteMapResult:
    with staged_dir(out) as work:
        write_report(work, report.to_dict())
        replace_dir(work, out)
    return SiteMapResult(status=STATUS_NOTHING_NEW, plan=plan, parent=parent, out_dir=out, report=report,
                         report_path=out / REPORT_FILE, bundle_path=None, query_path=None, model_dir=None)


def map_local(
    parent_dir: str | os.PathLike[str],
    *,
    key: SiteKey,
    site: str,
    data: ad.AnnData | str | os.PathLike[str],
    condition_key: str,
    out_dir: str | os.PathLike[str],
    settings: MapSettings = MapSettings(),
    atlas_url: str | None = None,
) -> SiteMapResult:
    """Map the cells of ``data``'s new conditions onto a fetched (verified) version and sign a bundle.

    ``parent_dir`` must come from ``AtlasClient.fetch`` (its ``atlas-version.json``
    names the parent). Only the cells of ``plan.new`` are mapped, so how many
    held studies a site also has does not change its bundle.
    """
    from fedarches.model import LATENT_KEY, FedArchesModel

    private = _resolve_key(key)
    parent = read_parent(parent_dir)
    adata = read_h5ad(data)
    out = check_out_dir(out_dir)
    # the names this site resolves: its own conditions and the reference studies (format.identity)
    plan = plan_contribution(adata, condition_key, parent.condition_index().visible_names(site),
                             conditions_per_round=settings.conditions_per_round)
    if plan.nothing_new:
        report = _site_report(STATUS_NOTHING_NEW, site, parent, plan, atlas_url)
        return _nothing_new(out, report, plan, parent)
    values = adata.obs[condition_key].astype(str).to_numpy()
    query = adata if set(plan.new) == set(values) else adata[np.isin(values, plan.new)].copy()
    share: LabelSharePlan | None = None
    if settings.share_labels is not None:  # every refusal before training
        share = plan_label_share(parent_dir, parent, query, settings.share_labels, settings.strategy)
    with staged_dir(out) as work:
        shutil.copytree(parent_dir, work / ATLAS_SUBDIR)
        model = FedArchesModel.load(work / ATLAS_SUBDIR)
        res = model.map_query(query, condition_key, settings=settings, site=site)
        write_mapped(work, res)
        tensors, new = contribution_tensors(work / ATLAS_SUBDIR, work / MODEL_SUBDIR, settings.strategy, site)
        labels: list[str] = []
        if share is not None:
            part, labels = label_part(share, np.asarray(res.adata.obsm[LATENT_KEY]), seed=settings.seed)
            tensors = {**tensors, **part}
        bundle = create_bundle(key=private, site=site, atlas=parent.atlas, parent=parent.id,
                               parent_number=parent.number, strategy=settings.strategy, tensors=tensors,
                               metrics=res.report.bundle_metrics(), labels=labels)
        write_bytes(work / BUNDLE_FILE, bundle)
        formula = expected_tensor_bytes(model.config, len(new)) if settings.strategy == "conditions" else None
        report = _site_report(STATUS_CONTRIBUTED, site, parent, plan, atlas_url, res.report,
                              _bundle_info(bundle, private, formula, model.config.latent_dim),
                              share.to_dict() if share is not None else None)
        write_report(work, report.to_dict())
        replace_dir(work, out)
    return SiteMapResult(status=STATUS_CONTRIBUTED, plan=plan, parent=parent, out_dir=out, report=report,
                         report_path=out / REPORT_FILE, bundle_path=out / BUNDLE_FILE,
                         query_path=out / QUERY_FILE, model_dir=out / MODEL_SUBDIR)


def map_and_contribute(
    *,
    atlas_url: str,
    trust: str | os.PathLike[str] | bytes,
    key: SiteKey,
    site: str,
    data: ad.AnnData | str | os.PathLike[str],
    condition_key: str,
    out_dir: str | os.PathLike[str],
    settings: MapSettings = MapSettings(),
    version: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download_deadline: float = DEADLINE_S,
) -> SiteMapResult:
    """``fedarches site map`` as a function: fetch + verify a version over TUF, then ``map_local``.
    ``download_deadline``: seconds the whole fetch may take (``AtlasClient``'s ``deadline_s``)."""
    private = _resolve_key(key)  # fail on a bad key before any download or training
    client = AtlasClient(atlas_url, trust, cache_dir=cache_dir, site=site, deadline_s=download_deadline)
    out = check_out_dir(out_dir)
    make_dirs(out.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.fetch.", dir=out.parent))
    try:
        fetched = client.fetch(staging / ATLAS_SUBDIR, version)
        return map_local(fetched.path, key=private, site=site, data=data, condition_key=condition_key,
                         out_dir=out, settings=settings, atlas_url=client.url)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


__all__ = [
    "ATLAS_SUBDIR",
    "STATUS_CONTRIBUTED",
    "STATUS_NOTHING_NEW",
    "SiteMapResult",
    "contribution_tensors",
    "map_and_contribute",
    "map_local",
    "read_parent",
]
