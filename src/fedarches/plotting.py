"""Pictures of a latent space: UMAP of an atlas's reference cells with query (site) cells.

Why here: drawing is a library job (the demo, notebooks and scripts draw the same
picture), kept apart from command-line code. matplotlib and umap-learn are
imported only when a picture is drawn.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedarches.errors import ModelDirError

__all__ = ["REFERENCE_SOURCE", "UmapCells", "atlas_cells", "draw_atlas_umap", "umap_coordinates"]

REFERENCE_SOURCE = "atlas (reference)"


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
        raise ModelDirError("model directory check failed: the atlas has no reference latent (built without "
                            "--label-key); nothing to draw")
    latents = [np.asarray(ref.latent, dtype=np.float32)]
    source = [REFERENCE_SOURCE] * len(ref.latent)
    labels = [ref.categories[i] for i in np.asarray(ref.labels)]
    unknown = [False] * len(ref.latent)
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


def draw_atlas_umap(cells: UmapCells, out_png: Path, *, title: str, seed: int = 0) -> Path:
    """Three panels on one UMAP: atlas vs sites, true cell type, and the unknown-cell calls."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    emb = umap_coordinates(cells.latent, seed)
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    order = np.random.default_rng(seed).permutation(len(cells.latent))  # no group hides another
    for ax, values, name in ((axes[0], cells.source, "atlas vs sites"), (axes[1], cells.labels, "cell type (true)")):
        _categorical_panel(plt, ax, emb, values, order, name)
    _unknown_panel(axes[2], emb, cells)
    for a in axes:
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _categorical_panel(plt, ax, emb: np.ndarray, values: np.ndarray, order: np.ndarray, title: str) -> None:  # noqa: ANN001
    cats = sorted(set(values.tolist()), key=lambda c: (c != REFERENCE_SOURCE, c))
    cmap = plt.get_cmap("tab10" if len(cats) <= 10 else "tab20")
    colors = {c: cmap(i % cmap.N) for i, c in enumerate(cats)}
    ax.scatter(emb[order, 0], emb[order, 1], s=3, c=[colors[v] for v in values[order]], alpha=0.8, linewidths=0)
    for c in cats:
        ax.scatter([], [], s=12, color=colors[c], label=c)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="best", frameon=False)


def _unknown_panel(ax, emb: np.ndarray, cells: UmapCells) -> None:  # noqa: ANN001
    is_site = cells.source != REFERENCE_SOURCE
    unknown = cells.unknown
    ax.scatter(emb[~is_site, 0], emb[~is_site, 1], s=3, color="lightgrey", label=REFERENCE_SOURCE, linewidths=0)
    ax.scatter(emb[is_site & ~unknown, 0], emb[is_site & ~unknown, 1], s=3, color="tab:blue",
               label="site cell, labelled", linewidths=0, alpha=0.6)
    ax.scatter(emb[is_site & unknown, 0], emb[is_site & unknown, 1], s=4, color="tab:red",
               label="site cell, called unknown", linewidths=0)
    ax.set_title("label transfer at the sites: unknown-cell calls")
    ax.legend(markerscale=3, fontsize=7, loc="best", frameon=False)
