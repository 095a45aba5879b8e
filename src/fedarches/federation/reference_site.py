"""A site's part of building the reference together: statistics, local epochs, its slices.

The site holds its studies' cells and, between rounds, its studies' condition rows
(one file per completed round under ``<results>/reference-<build digest>/``, written
atomically). Everything it sends is per gene, per weight or per label: the gene
statistics, the shared weights after its local epochs (Flower's FedAvg averages
them), and at the end one signed bundle with its condition rows and the class
summaries of its labelled cells.

Why rows per round and not one file: a coordinator that resumes from round r sends
round r's weights; the site must continue from ITS rows of round r, not from those
of a later round whose shared weights were never aggregated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save

from fedarches.atomic import PRIVATE_DIR, make_dirs, write_bytes
from fedarches.config import ModelConfig, TrainConfig
from fedarches.data.batches import minibatch_indices
from fedarches.data.gene_stats import study_gene_stats
from fedarches.data.io import read_h5ad
from fedarches.data.validation import check_gene_names, check_shape, check_values, condition_labels, get_matrix
from fedarches.federation.protocol import SiteConfig
from fedarches.federation.reference_protocol import (
    LOCAL_KEYS,
    RFF_PER_SCALE,
    STAT_FIELDS,
    BuildSetup,
    SiteStatistics,
)
from fedarches.models.cvae import CONDITION_TABLE_PREFIXES, CVAE
from fedarches.models.losses import rff_features, rff_frequencies, rff_mmd_to_targets
from fedarches.training import MatrixSource


@dataclass
class SiteData:
    """The site's cells, read and validated once per process (a simulation actor serves rounds)."""

    studies: np.ndarray  # per cell
    labels: np.ndarray | None  # per cell
    x: object  # raw counts CSR
    genes: list[str]


_DATA: dict[tuple[str, str, str, str], SiteData] = {}
_PREPARED: dict[tuple[str, str], tuple[object, np.ndarray | None]] = {}


def site_data(site: SiteConfig, label_key: str, kind: str = "nb") -> SiteData:
    key = (str(site.data), site.condition_key, label_key, kind)
    if key not in _DATA:
        adata = read_h5ad(site.data, what=f"site {site.site}'s data")
        check_shape(adata)
        check_gene_names(adata.var_names)
        studies = condition_labels(adata, site.condition_key)
        labels = condition_labels(adata, label_key, what="label") if label_key in adata.obs else None
        x = get_matrix(adata, None)
        check_values(x, require_integers=(kind == "nb"), conditions=studies)
        _DATA.clear()
        _DATA[key] = SiteData(studies=studies, labels=labels, x=x, genes=adata.var_names.astype(str).tolist())
    return _DATA[key]


def site_statistics(site: SiteConfig, label_key: str) -> SiteStatistics:
    """The statistics reply: per-study gene statistics and per-label counts, never a cell."""
    d = site_data(site, label_key)
    stats = study_gene_stats(d.x, d.genes, d.studies)
    arrays = {f"{i}/{f}": a for i, s in enumerate(stats) for f, a in zip(STAT_FIELDS, s.arrays().values())}
    counts = {} if d.labels is None else {str(k): int(v) for k, v in pd.Series(d.labels).value_counts().items()}
    return SiteStatistics(site=site.site, condition_key=site.condition_key, genes=d.genes,
                          studies=[s.study for s in stats], n_cells=[s.n_cells for s in stats],
                          label_counts=counts, stats=arrays)


# ------------------------------------------------------------------ the local model
def _studies(d: SiteData) -> list[str]:
    return sorted(set(d.studies.tolist()))


def _prepared(site: SiteConfig, d: SiteData, setup: BuildSetup,
              config: ModelConfig) -> tuple[object, np.ndarray | None]:
    from fedarches.model import _prepare_matrix

    key = (str(site.data), setup.digest)
    if key not in _PREPARED:
        p = _prepare_matrix(d.x, d.genes, d.studies, config.kind, setup.genes)
        _PREPARED.clear()
        _PREPARED[key] = (p.x, p.library)
    return _PREPARED[key]


def _seed(setup: BuildSetup, site: str, rnd: int) -> int:
    return (setup.seed * 1_000_003 + rnd * 7919 + sum(site.encode()) * 104_729) % (2**31)


def calibration_seed(setup: BuildSetup, site: str) -> int:
    """The seed of the site's calibration folds (`labels.moments.fold_of_cells`): the same at
    every calibration step of the build."""
    return _seed(setup, site, 0)


def _state_dir(site: SiteConfig, setup: BuildSetup) -> Path:
    return site.results_dir / f"reference-{setup.digest[:16]}"


_ROWS = re.compile(r"^rows-(\d+)\.safetensors$")


def _kept_rows(site: SiteConfig, setup: BuildSetup, before: int) -> dict[str, torch.Tensor] | None:
    """The site's own tensors after the latest round < ``before`` it completed (None: start)."""
    d = _state_dir(site, setup)
    rounds = sorted(int(m.group(1)) for p in (d.iterdir() if d.is_dir() else ())
                    if (m := _ROWS.match(p.name)) and int(m.group(1)) < before)
    return load_file(d / f"rows-{rounds[-1]}.safetensors") if rounds else None


def _bn_keys(module: CVAE) -> set[str]:
    names = {n for n, m in module.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    return {k for k in module.state_dict() if k.rsplit(".", 1)[0] in names}


def travelling_keys(module: CVAE, bn: str) -> list[str]:
    """The shared tensors FedAvg averages: all but counters and, with FedBN, batch norm."""
    local = _bn_keys(module) if bn == "local" else set()
    return [k for k in module.shared_state_dict() if not k.endswith(LOCAL_KEYS) and k not in local]


def local_module(site: SiteConfig, setup: BuildSetup, shared: dict[str, torch.Tensor], rnd: int) -> CVAE:
    """The model this site trains in round ``rnd``: the coordinator's shared weights and the
    site's own rows (and, with FedBN, its own batch norm) from its previous round."""
    d = site_data(site, setup.label_key)
    config = ModelConfig.model_validate_json(setup.model_config)
    torch.manual_seed(_seed(setup, site.site, 0))  # first rows: the same for a given build and site
    module = CVAE(config, _studies(d))
    kept = _kept_rows(site, setup, rnd)
    state = {**(kept or {}), **shared}
    module.load_state_dict({**module.state_dict(), **state})
    return module


def _source(site: SiteConfig, setup: BuildSetup, module: CVAE) -> MatrixSource:
    d = site_data(site, setup.label_key)
    x, library = _prepared(site, d, setup, module.config)
    index = {n: i for i, n in enumerate(module.conditions)}
    cond = np.array([index[c] for c in d.studies], dtype=np.int64)
    codes = None
    if module.config.n_labels and d.labels is not None:
        codes = pd.Categorical(d.labels, categories=setup.label_categories).codes.astype(np.int64)
    return MatrixSource(module, x, cond, library, labels=codes)


def _restrict_softmax(module: CVAE, labels: np.ndarray | None) -> torch.utils.hooks.RemovableHandle | None:
    """The classifier's softmax over the labels this site has (FedRS-style restricted softmax).

    Why: with a plain softmax every site pushes down the logits of the labels it never
    sees, and FedAvg of those updates drowns a label held by one site (measured on
    CellBench: H838, held by one of three sites, was never predicted). Masking the absent
    labels' logits during local training leaves their weights to the sites that hold them."""
    if labels is None or not module.config.n_labels:
        return None
    mask = torch.full((module.config.n_labels,), -1e4)
    mask[np.unique(labels[labels >= 0])] = 0.0
    return module.classifier.register_forward_hook(lambda _m, _i, out: out + mask)


def _frequencies(setup: BuildSetup, module: CVAE) -> tuple[torch.Tensor, torch.Tensor]:
    """The build's random features: the same at every site (seeded by the build, not the site)."""
    return rff_frequencies(module.dec_in.out_features, RFF_PER_SCALE, setup.seed * 7_919 + 17)


def study_embeddings(module: CVAE, source: MatrixSource, studies: list[str], setup: BuildSetup,
                     chunk: int = 4096) -> dict[str, np.ndarray]:
    """Per study of >= k_min cells: its cells' mean random-feature embedding of the first
    decoder layer output (posterior means), and ``<study>/n``, its cell count."""
    w, u = _frequencies(setup, module)
    sums = torch.zeros(len(studies), w.shape[0], dtype=torch.float64)
    counts = np.bincount(source.condition, minlength=len(studies))
    module.eval()
    with torch.no_grad():
        for start in range(0, source.n_cells, chunk):
            kw = source.loss_kwargs(np.arange(start, min(start + chunk, source.n_cells)))
            cond = kw["condition"]
            mu, _ = module.encode(cond, x_in=kw.get("x_in"), projection=kw.get("projection"))  # type: ignore[arg-type]
            first, _ = module.decode_hidden(mu, cond)  # type: ignore[arg-type]
            sums.index_add_(0, cond, rff_features(first, w, u).double())  # type: ignore[arg-type]
    out: dict[str, np.ndarray] = {}
    for i, study in enumerate(studies):
        if counts[i] >= setup.k_min:  # an aggregate of at least k_min cells, as every summary
            out[study] = (sums[i] / counts[i]).float().numpy()
            out[f"{study}/n"] = np.array([counts[i]], dtype=np.int64)
    return out


def train_round(site: SiteConfig, setup: BuildSetup, shared: dict[str, torch.Tensor],
                rnd: int, mu: float = 0.0, targets: dict[str, np.ndarray] | None = None,
                ) -> tuple[dict[str, torch.Tensor], int, float, dict[str, np.ndarray]]:
    """``setup.local_epochs`` epochs on the site's cells from the given shared weights
    (``mu`` > 0: FedProx's proximal term, mu/2 ||w - w_global||^2 on the shared weights).
    ``targets``: the other sites' study embeddings of the previous round (``mmd = "rff"``):
    each minibatch's studies are also pulled towards them (`rff_mmd_to_targets`).

    Returns the travelling shared tensors, the number of cells (FedAvg's weight), the mean
    training loss and (``mmd = "rff"``) this site's study embeddings after its epochs; keeps
    the site's own tensors for the next round."""
    module = local_module(site, setup, shared, rnd)
    source = _source(site, setup, module)
    rff = setup.mmd == "rff" and module.config.mmd_weight > 0
    extra = None
    if rff and targets:
        others = [v for k, v in sorted(targets.items()) if not k.endswith("/n") and k not in module.conditions]
        if others:
            w, u = _frequencies(setup, module)
            goal = torch.from_numpy(np.stack(others)).float()
            def extra(first: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
                return rff_mmd_to_targets(first, condition, w, u, goal)
    cfg = module.config
    seed = _seed(setup, site.site, rnd)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    params = module.set_trainable(None)
    optim = torch.optim.Adam(params, lr=setup.lr, eps=0.01, weight_decay=setup.weight_decay)
    warmup = max(1, setup.total_epochs // 3)
    rows = np.arange(source.n_cells)
    named = dict(module.named_parameters())
    anchor = {k: v.detach().clone() for k, v in shared.items() if k in named} if mu > 0 else {}
    running, seen = 0.0, 0
    hook = _restrict_softmax(module, source.labels)
    module.train()
    for e in range(setup.local_epochs):
        epoch = (rnd - 1) * setup.local_epochs + e  # the global epoch: one KL warm-up for the whole build
        kl_weight = cfg.kl_weight * min(1.0, (epoch + 1) / warmup)
        for batch in minibatch_indices(rows, setup.batch_size, rng):
            parts = module.loss(kl_weight=kl_weight, extra_mmd=extra,
                                **source.loss_kwargs(batch))  # type: ignore[arg-type]
            total = parts.total
            if anchor:
                total = total + 0.5 * mu * sum((named[k] - w).pow(2).sum() for k, w in anchor.items())
            optim.zero_grad(set_to_none=True)
            total.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
            optim.step()
            running += float(parts.total.detach()) * len(batch)
            seen += len(batch)
    if hook is not None:
        hook.remove()
    module.eval()
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    travel = set(travelling_keys(module, setup.bn))
    own = {k: v.contiguous() for k, v in state.items() if k not in travel}
    out = _state_dir(site, setup)
    make_dirs(out, PRIVATE_DIR)
    write_bytes(out / f"rows-{rnd}.safetensors", save(own))
    embeddings = study_embeddings(module, source, list(module.conditions), setup) if rff else {}
    return {k: state[k] for k in sorted(travel)}, int(source.n_cells), running / max(seen, 1), embeddings


def refit_rows(site: SiteConfig, setup: BuildSetup, module: CVAE, rnd: int) -> None:
    """The site's condition rows fitted again on its own cells with every shared tensor of the
    final model frozen and batch norm on its aggregated statistics: exactly how ``map`` fits a
    query's new rows (the same subsample, schedule, convergence rule and frozen normalisation).

    Why: during the rounds a site holding one study trains in train-mode batch norm, whose
    batch mean subtracts that study's row, so the row gets no gradient (NB decoder rows
    stayed at their initial norm, 0.57, against 1.0-1.4 in a central build), and the site's
    cells were normalised by their own batch statistics, not by the aggregated ones the
    published model uses. Reference cells were then embedded differently from a query
    mapped later, which lies farther from the reference than its own cells do: the
    query-shift guard divided the scores by 2-3 and CellBench's A549 went unseen
    (benchmarks/FEDERATED_REFERENCE.md). Fitted this way, a reference study is placed as a
    query study would be. Only rows move; the result is kept per build and round
    (``refit-<round>``), so every later step (calibration, bundle) reads the same rows.

    An option (``final-rows = refit``), not the default: with sites that each lack some cell
    types it called many more known query cells Unknown (`reference_run_config.FINAL_ROWS`)."""
    from fedarches.config import DEFAULT_CONVERGE_TOL, DEFAULT_FIT_CELLS
    from fedarches.query_fit import Convergence, fit_rows
    from fedarches.training import ProjectedSource
    from fedarches.training import train as train_loop

    path = _state_dir(site, setup) / f"refit-{rnd}.safetensors"
    if path.is_file():
        module.load_state_dict({**module.state_dict(), **load_file(path)})
        return
    d = site_data(site, setup.label_key)
    x, library = _prepared(site, d, setup, module.config)
    index = {n: i for i, n in enumerate(module.conditions)}
    cond = np.array([index[c] for c in d.studies], dtype=np.int64)
    rows = fit_rows(d.studies, np.arange(len(cond)), DEFAULT_FIT_CELLS, _seed(setup, site.site, rnd + 1))
    params = module.set_trainable("conditions")
    source = ProjectedSource(module, x[rows], cond[rows],  # type: ignore[index]
                             library[rows] if library is not None else None,
                             use_mse_terms=module.config.kind == "trvae")
    cfg = TrainConfig(seed=_seed(setup, site.site, rnd + 1), strategy="conditions", lr=setup.lr,
                      batch_size=setup.batch_size, weight_decay=setup.weight_decay)
    train_loop(module, source, params, cfg, query=True, progress=False, description="reference rows",
               converge=Convergence(DEFAULT_CONVERGE_TOL))
    for p in module.parameters():
        p.requires_grad_(True)
    module.eval()
    own = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()
           if k.startswith(CONDITION_TABLE_PREFIXES)}
    make_dirs(path.parent, PRIVATE_DIR)
    write_bytes(path, save(own))


def final_model(site: SiteConfig, setup: BuildSetup, shared: dict[str, torch.Tensor], rnd: int):
    """The site's model after the last round: final shared weights and its rows of round ``rnd``
    (``setup.rows == "refit"``: fitted again to those weights, `refit_rows`)."""
    from fedarches.model import FedArchesModel

    d = site_data(site, setup.label_key)
    module = local_module(site, setup, shared, rnd + 1)
    if setup.rows == "refit":
        refit_rows(site, setup, module, rnd)
    module.eval()
    model = FedArchesModel(module, genes=setup.genes, condition_key=site.condition_key,
                           train_config=TrainConfig(epochs=setup.total_epochs, seed=setup.seed),
                           label_key=setup.label_key)
    x, _ = _prepared(site, d, setup, module.config)
    index = {n: i for i, n in enumerate(module.conditions)}
    latent = model._latent(x, np.array([index[c] for c in d.studies], dtype=np.int64))
    return model, latent, d


def summarisable(n_cells: int, k_min: int) -> bool:
    """A label a site summarises in a reference build: ``k_min`` of its cells, or at least half
    that, padded to ``k_min`` with its nearest cells of other labels (``small_labels =
    "pad-drop"``, what a central build does with a small label). Why not only >= k_min: PBMC's
    dendritic cells (16 and 2 at two sites) were then in no component, and every query DC
    was called Unknown where the central build labels them."""
    return 2 * n_cells >= k_min


def site_bundle(site: SiteConfig, setup: BuildSetup, shared: dict[str, torch.Tensor], rnd: int,
                parent: str) -> tuple[bytes, dict[str, torch.Tensor]]:
    """The site's signed bundle after the last round (its condition rows and the class summaries
    of its labelled cells, in the atlas latent) and, with FedBN, its batch-norm tensors."""
    from fedarches.format.bundle import create_bundle
    from fedarches.format.signing import load_site_key
    from fedarches.format.tensor_keys import label_key
    from fedarches.labels.summaries import ClassSummaries, SummaryOptions

    model, latent, d = final_model(site, setup, shared, rnd)
    tensors = dict(model.module.condition_state(model.conditions))
    labels: list[str] = []
    counts = pd.Series(d.labels).value_counts() if d.labels is not None else pd.Series(dtype=int)
    kept = sorted(str(k) for k, n in counts.items() if summarisable(int(n), setup.k_min)
                  and str(k) in setup.label_categories)
    if kept:  # k-anonymous: every component stands for >= k_min cells, as in a central build
        keep = np.isin(d.labels, kept)
        summaries = ClassSummaries.fit(latent[keep], d.labels[keep], ref_batches=d.studies[keep],
                                       label_categories=kept, fpr=0.01, seed=setup.seed,
                                       options=SummaryOptions(k_min=setup.k_min, small_labels="pad-drop"))
        tensors |= {label_key(k): torch.from_numpy(np.ascontiguousarray(v)) for k, v in summaries.state().items()}
        labels = list(summaries.label_categories)
    bundle = create_bundle(key=load_site_key(site.key_dir), site=site.site, atlas=setup.atlas, parent=parent,
                           parent_number=1, strategy="conditions", tensors=tensors, labels=labels)
    bn = {k: v.detach().clone() for k, v in model.module.state_dict().items() if k in _bn_keys(model.module)
          and not k.endswith(LOCAL_KEYS)} if setup.bn == "local" else {}
    return bundle, bn


__all__ = ["SiteData", "calibration_seed", "final_model", "site_bundle", "local_module", "refit_rows", "site_data", "site_statistics", "summarisable",
           "study_embeddings", "train_round",
           "travelling_keys"]
