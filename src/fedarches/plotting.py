"""Pictures of a latent space: UMAP of an atlas's reference cells with query (site) cells.

Why here: drawing is a library job (the demo, notebooks and scripts draw the same
picture), kept apart from command-line code. matplotlib and umap-learn are
imported only when a picture is drawn.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedarches.atomic import PRIVATE_FILE, make_dirs
from fedarches.errors import ModelDirError

__all__ = [
    "ATLAS_SOURCES",
    "COMPONENTS_SOURCE",
    "REFERENCE_SOURCE",
    "UmapCells",
    "atlas_cells",
    "draw_atlas_umap",
    "mapping_cells",
    "plot_mapping",
    "point_size",
    "reference_source",
    "umap_coordinates",
]

REFERENCE_SOURCE = "atlas (reference)"
COMPONENTS_SOURCE = "atlas (label components)"
ATLAS_SOURCES = (REFERENCE_SOURCE, COMPONENTS_SOURCE)  # drawn grey and underneath


def reference_source(ref: Any) -> str:
    """How the atlas' own points are named in a picture: reference cells, or (a summaries atlas
    holds no cell) the means of its label components."""
    return COMPONENTS_SOURCE if getattr(ref, "knowledge", "cells") == "summaries" else REFERENCE_SOURCE


@dataclass(frozen=True)
class UmapCells:
    """Cells to draw: latent codes and, per cell, where it comes from, its true label and
    whether label transfer called it unknown."""

    latent: np.ndarray  # float32, cells x dims
    source: np.ndarray  # str: REFERENCE_SOURCE or a site name
    labels: np.ndarray  # str
    unknown: np.ndarray  # bool


def atlas_cells(model_dir: Path, site_queries: Mapping[str, Sequence[Path]], label_key: str) -> UmapCells:
    """The reference latent of the model in ``model_dir`` plus each site's mapped query
    files (h5ad with the latent in ``obsm``, true labels and ``<label>_unknown`` in obs)."""
    import anndata as ad

    from fedarches.model import LATENT_KEY, FedArchesModel

    ref = FedArchesModel.load(model_dir).reference
    if ref is None:
        raise ModelDirError("model directory check failed: the atlas has no label knowledge (built without "
                            "--label-key); nothing to draw")
    points, point_labels = ref.points()
    latents = [np.asarray(points, dtype=np.float32)]
    source = [reference_source(ref)] * len(points)
    labels = list(point_labels)
    unknown = [False] * len(points)
    for site, paths in sorted(site_queries.items()):
        for q in paths:
            a = ad.read_h5ad(q)
            latents.append(np.asarray(a.obsm[LATENT_KEY], dtype=np.float32))
            source += [site] * a.n_obs
            labels += list(a.obs[label_key].astype(str)) if label_key in a.obs else ["?"] * a.n_obs
            unk = f"{label_key}_unknown"
            unknown += list(a.obs[unk].to_numpy(dtype=bool)) if unk in a.obs else [False] * a.n_obs
    return UmapCells(np.concatenate(latents), np.array(source), np.array(labels), np.array(unknown))


def umap_coordinates(latent: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D UMAP of ``latent`` on exact scikit-learn neighbours (k = 15).

    Exact neighbours handed to UMAP: on small data this skips compiling pynndescent
    (about half a minute of numba JIT in every fresh process).
    """
    import umap
    from sklearn.neighbors import NearestNeighbors

    z = np.asarray(latent)
    k = min(15, len(z) - 1)
    dist, idx = NearestNeighbors(n_neighbors=k).fit(z).kneighbors(z)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "precomputed_knn without a search index" and numba notes
        return umap.UMAP(n_neighbors=k, min_dist=0.3, random_state=seed, n_jobs=1,
                         precomputed_knn=(idx, dist.astype(np.float32), None)).fit_transform(z)


def point_size(n_cells: int) -> float:
    """scanpy's rule (120,000 / n cells), kept between 1 and 40 so small sets stay visible."""
    return float(min(40.0, max(1.0, 120_000 / max(n_cells, 1))))


def mapping_cells(adata: Any, model: Any, condition_key: str, label_key: str | None) -> UmapCells:
    """A mapped query (latent in ``obsm``, predictions in ``obs``) plus the model's reference
    cells where the model holds them. Query cells are coloured by their study and predicted label."""
    from fedarches.model import LATENT_KEY

    latents = [np.asarray(adata.obsm[LATENT_KEY], dtype=np.float32)]
    source = [adata.obs[condition_key].astype(str).to_numpy()]
    pred = f"{label_key}_pred" if label_key else None
    labels = [adata.obs[pred].astype(str).to_numpy() if pred and pred in adata.obs else np.full(adata.n_obs, "?")]
    unk = f"{label_key}_unknown" if label_key else None
    unknown = [adata.obs[unk].to_numpy(dtype=bool) if unk and unk in adata.obs else np.zeros(adata.n_obs, bool)]
    ref = getattr(model, "reference", None)
    if ref is not None:
        points, point_labels = ref.points()
        latents.insert(0, np.asarray(points, dtype=np.float32))
        source.insert(0, np.full(len(points), reference_source(ref)))
        labels.insert(0, np.asarray(point_labels).astype(str))
        unknown.insert(0, np.zeros(len(points), bool))
    return UmapCells(np.concatenate(latents), np.concatenate(source), np.concatenate(labels),
                     np.concatenate(unknown))


def plot_mapping(adata: Any, model: Any, condition_key: str, out_png: str | Path, *, title: str,
                 seed: int = 0) -> Path:
    """``--plot`` of ``map``, ``site map`` and ``embed``: the query (and the model's reference
    cells where it holds them) by study, by predicted label, and the unknown calls."""
    cells = mapping_cells(adata, model, condition_key, getattr(model, "label_key", None))
    label_title = "cell type (predicted)" if getattr(model, "label_key", None) else "cell type (no labels in the model)"
    return draw_atlas_umap(cells, Path(out_png), title=title, seed=seed, label_title=label_title,
                           query_name="query")


def draw_atlas_umap(cells: UmapCells, out_png: Path, *, title: str, seed: int = 0,
                    label_title: str = "cell type (true)", query_name: str = "site") -> Path:
    """Three panels on one UMAP: where cells come from, cell type, and the unknown-cell calls.

    Conventions (scanpy's): point size from the number of cells; one palette per
    meaning (studies never share colours with cell types; the reference is always
    grey, unknown always red); reference cells are drawn first and faint, so query
    cells are never hidden, and each panel draws groups in a seeded random order.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    emb = umap_coordinates(cells.latent, seed)
    size = point_size(len(cells.latent))
    fig, axes = plt.subplots(1, 3, figsize=(19, 6))
    is_ref = np.isin(cells.source, ATLAS_SOURCES)
    order = np.random.default_rng(seed).permutation(len(cells.latent))
    order = np.concatenate([order[is_ref[order]], order[~is_ref[order]]])  # reference underneath, query on top
    _categorical_panel(axes[0], emb, cells.source, order, size, "where the cells come from",
                       _palette(plt, cells.source, "Dark2", "tab20b"), faint=is_ref)
    _categorical_panel(axes[1], emb, cells.labels, order, size, label_title,
                       _palette(plt, cells.labels, "tab10", "tab20"), faint=is_ref)
    _unknown_panel(axes[2], emb, cells, size, query_name)
    for a in axes:
        a.set_xticks([])
        a.set_yticks([])
        a.set_xlabel("UMAP1")
        a.set_ylabel("UMAP2")
    fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    make_dirs(out_png.parent)
    fig.savefig(out_png, dpi=110)
    os.chmod(out_png, PRIVATE_FILE)  # a picture of the site's cells: private whatever the umask
    plt.close(fig)
    return out_png


# red is reserved for "unknown", grey for the reference: drop them from the category cycles
_NO_RED = {"tab10": (3, 7), "tab20": (6, 7, 14, 15), "Dark2": (1, 7), "tab20b": (12, 13, 14, 15)}


def _palette(plt: Any, values: np.ndarray, small: str, large: str) -> dict[str, Any]:
    cats = sorted(set(values.tolist()) - {*ATLAS_SOURCES, "Unknown"})
    name = small if len(cats) <= 6 else large
    cmap = plt.get_cmap(name)
    cycle = [cmap(i) for i in range(cmap.N) if i not in _NO_RED.get(name, ())]
    colors: dict[str, Any] = {c: cycle[i % len(cycle)] for i, c in enumerate(cats)}
    for atlas in ATLAS_SOURCES:
        colors[atlas] = (0.7, 0.7, 0.7, 1.0)
    colors["Unknown"] = (0.84, 0.15, 0.16, 1.0)
    return colors


def _categorical_panel(ax: Any, emb: np.ndarray, values: np.ndarray, order: np.ndarray, size: float,
                       title: str, colors: dict[str, Any], faint: np.ndarray) -> None:
    rgba = np.array([colors[v] for v in values[order]])
    rgba[faint[order], 3] = 0.35
    ax.scatter(emb[order, 0], emb[order, 1], s=size, c=rgba, linewidths=0)
    present = set(values.tolist())
    for c, col in colors.items():
        if c in present:
            ax.scatter([], [], s=25, color=col, label=c)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


def _unknown_panel(ax: Any, emb: np.ndarray, cells: UmapCells, size: float, query_name: str) -> None:
    is_q = ~np.isin(cells.source, ATLAS_SOURCES)
    unknown = cells.unknown
    atlas_name = next((s for s in ATLAS_SOURCES if (cells.source == s).any()), REFERENCE_SOURCE)
    groups = ((~is_q, (0.7, 0.7, 0.7, 0.35), atlas_name),
              (is_q & ~unknown, (0.25, 0.25, 0.3, 0.7), f"{query_name} cell, labelled"),
              (is_q & unknown, (0.84, 0.15, 0.16, 1.0), f"{query_name} cell, called unknown"))
    for mask, color, label in groups:
        if mask.any():
            ax.scatter(emb[mask, 0], emb[mask, 1], s=size, color=color, linewidths=0, label=label)
    ax.set_title(f"unknown-cell calls ({int((is_q & unknown).sum())} of {int(is_q.sum())} {query_name} cells)")
    ax.legend(markerscale=2, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
