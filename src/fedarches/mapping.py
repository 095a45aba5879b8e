"""Mapping a query into an output directory: the one writer of ``query.h5ad``, ``model/``
and ``report.json``, used by ``fedarches map`` and by a site's ``map_local``.

Why staged: a mapping killed half-way (or refused by a later check) must leave
either the previous output or none, never a model without its report. Every
output is written into a temporary sibling and moved into place in one rename
(``fedarches.atomic``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np

from fedarches.atomic import PRIVATE_FILE, check_replaceable_dir, fsync_dir, replace_dir, staged_dir, write_text
from fedarches.config import MapSettings

if TYPE_CHECKING:
    from fedarches.model import FedArchesModel, MapResult

QUERY_FILE = "query.h5ad"
REPORT_FILE = "report.json"
MODEL_SUBDIR = "model"


@dataclass(frozen=True)
class MapOutputs:
    """Where ``map_to_directory`` put things, and the mapping itself."""

    out_dir: Path
    model_dir: Path
    query_path: Path
    report_path: Path
    result: "MapResult"


def check_out_dir(path: str | os.PathLike[str], *, marker: str = REPORT_FILE) -> Path:
    """``path`` may be replaced: absent, empty, or an earlier output (it holds ``marker``)."""
    return check_replaceable_dir(path, marker, "an earlier output of this command")


def write_report(directory: Path, report: dict[str, Any]) -> Path:
    return write_text(directory / REPORT_FILE, json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")


def write_mapped(directory: Path, result: "MapResult") -> None:
    """The mapped model and the annotated query (the report comes last, from the caller)."""
    result.model.save(directory / MODEL_SUBDIR)
    write_h5ad(result.adata, directory / QUERY_FILE)


#: Stored matrix entries up to which an h5ad is written gzip-compressed. Above it gzip costs
#: more than everything else in a map (about a minute per 300M entries on one core), so larger
#: outputs are written uncompressed (docs/SPEED.md).
GZIP_MAX_ENTRIES = 20_000_000


def write_h5ad(adata: ad.AnnData, path: Path) -> Path:
    """An h5ad written next to ``path`` and renamed into place (anndata writes by name, not bytes).
    Sparse matrices stay sparse; gzip only for outputs up to ``GZIP_MAX_ENTRIES`` stored entries."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        adata.write_h5ad(tmp, compression="gzip" if _stored_entries(adata) <= GZIP_MAX_ENTRIES else None)
        os.chmod(tmp, PRIVATE_FILE)  # the site's cells: private whatever the umask
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def _stored_entries(adata: ad.AnnData) -> int:
    """Entries the matrices of ``adata`` store (nonzeros of sparse ones)."""
    mats = [adata.X, *adata.layers.values()]
    return int(sum(getattr(m, "nnz", None) or int(np.prod(m.shape)) for m in mats if m is not None))


def map_to_directory(
    model: "FedArchesModel",
    adata: ad.AnnData,
    condition_key: str | None,
    out_dir: str | os.PathLike[str],
    settings: MapSettings = MapSettings(),
    *,
    layer: str | None = None,
    copy_data: bool = True,
) -> MapOutputs:
    """``fedarches map``: surgery + fine-tuning, then ``model/``, ``query.h5ad``, ``report.json`` in ``out_dir``.
    ``copy_data=False``: the written AnnData shares ``adata``'s matrices (the caller drops ``adata``)."""
    out = check_out_dir(out_dir)
    result = model.map_query(adata, condition_key, settings=settings, layer=layer, copy_data=copy_data)
    with staged_dir(out) as work:
        write_mapped(work, result)
        write_report(work, result.report.to_dict())
        replace_dir(work, out)
    return MapOutputs(
        out_dir=out,
        model_dir=out / MODEL_SUBDIR,
        query_path=out / QUERY_FILE,
        report_path=out / REPORT_FILE,
        result=result,
    )


__all__ = ["MapOutputs", "check_out_dir", "map_to_directory", "write_h5ad", "write_mapped", "write_report"]
