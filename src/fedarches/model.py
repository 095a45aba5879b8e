"""``FedArchesModel``: AnnData in, AnnData out.

This is the layer a scanpy / scvi-tools user touches. It validates input, matches
genes by name, applies the normalisation the model needs (users hand in counts),
runs reference training or surgery + query fine-tuning, transfers labels, and
reads/writes model directories. The torch module underneath knows nothing of
AnnData (as scvi-tools separates ``module`` from ``model``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from fedarches.config import (
    DEFAULT_LABEL_KNOWLEDGE,
    K_MIN,
    LABEL_KNOWLEDGE,
    MODEL_KINDS,
    STRATEGIES,
    LabelKnowledge,
    MapSettings,
    ModelConfig,
    ModelKind,
    TrainConfig,
)
from fedarches.data.backed import BackedData, ChunkSettings, as_backed, is_backed, scan_reference
from fedarches.data.conditions import ordered_conditions
from fedarches.data.genes import align_genes, select_genes
from fedarches.data.validation import check_gene_names, check_shape, check_values, condition_labels, get_matrix
from fedarches.errors import (
    InputDataError,
    ModelFileError,
    NothingToMapError,
    SettingError,
    UnknownConditionError,
)
from fedarches.labels import KNNLabelTransfer, LabelTransferResult
from fedarches.labels.summaries import ClassSummaries, SummaryOptions
from fedarches.neighbours import encode_labels
from fedarches.models.cvae import CVAE
from fedarches.report import LabelTransferSummary, MapReport
from fedarches.format.identity import ConditionIndex, condition_id
from fedarches.format.model_dir import (
    CONDITIONS,
    LABELS,
    REFERENCE,
    WEIGHTS,
    ModelManifest,
    load_model_dir,
    save_model_dir,
)
from fedarches.device import check_device, on_device
from fedarches.query_fit import Convergence, check_fit_settings, fit_rows
from fedarches.threads import check_threads, thread_limits
from fedarches.training import (
    BackedSource,
    MatrixSource,
    PreparedRows,
    ProjectedSource,
    TrainHistory,
    copy_module,
    prepared_rows,
)
from fedarches.training import train as train_loop

LATENT_KEY = "X_fedarches"
TARGET_SUM = 1e4
LATENT_CHUNK = 8192  # cells per encoder pass: one dense chunk of 8192 x genes at a time


@dataclass
class PreparedData:
    """A dataset lined up with a model: the matrix the model trains on, per-cell
    condition indices, and (NB) library sizes."""

    x: sp.csr_matrix  # log-normalised for trVAE (counts while row_scale is set), counts for NB; model genes
    conditions: np.ndarray  # str per cell
    library: np.ndarray | None
    gene_overlap: float
    #: trVAE, prepared lazily: ``x`` still holds counts, and :meth:`rows` scales and log-transforms
    #: the rows it returns, so mapping a million cells never holds a second normalised matrix
    row_scale: np.ndarray | None = None

    def rows(self, idx: np.ndarray | slice) -> sp.csr_matrix:
        """The model's input for ``idx`` (CSR), the same bytes as eager preparation gives."""
        sub = self.x[idx]
        if self.row_scale is None:
            return sub
        return _log_normalise(sub, self.row_scale[idx])


@dataclass
class MapResult:
    model: "FedArchesModel"
    adata: ad.AnnData
    report: MapReport


@dataclass
class ReferenceIndex:
    """Reference latent + labels and the fitted label-transfer calibration."""

    latent: np.ndarray
    labels: np.ndarray  # int64 codes into categories
    categories: list[str]
    transfer: KNNLabelTransfer

    def predict(self, latent: np.ndarray, batches: np.ndarray | None = None,
                probabilities: np.ndarray | None = None) -> LabelTransferResult:
        """``batches``: the study of each cell, so each study gets its own query-shift guard;
        ``probabilities``: the label-aware reference's classifier output, which makes the call."""
        return self.transfer.predict(latent, query_batches=batches, classifier_probabilities=probabilities)

    @property
    def knowledge(self) -> LabelKnowledge:
        return "cells"

    def points(self) -> tuple[np.ndarray, np.ndarray]:
        """What a picture draws for the atlas: its reference cells and their labels."""
        return self.latent, np.asarray(self.categories, dtype=object)[self.labels].astype(str)

    def blob(self) -> tuple[str, dict[str, torch.Tensor]]:
        ref = {"latent": torch.from_numpy(self.latent), "labels": torch.from_numpy(self.labels)}
        for k, v in self.transfer.state().items():
            ref[f"transfer/{k}"] = torch.from_numpy(np.ascontiguousarray(v))
        return REFERENCE, ref


@dataclass
class SummaryIndex:
    """Label knowledge as class summaries (``fedarches.labels.summaries``): no reference cell."""

    categories: list[str]
    summaries: ClassSummaries

    def predict(self, latent: np.ndarray, batches: np.ndarray | None = None,
                probabilities: np.ndarray | None = None) -> LabelTransferResult:
        """As :meth:`ReferenceIndex.predict`, from the summaries alone."""
        return self.summaries.predict(latent, query_batches=batches, classifier_probabilities=probabilities)

    @property
    def knowledge(self) -> LabelKnowledge:
        return "summaries"

    def points(self) -> tuple[np.ndarray, np.ndarray]:
        """What a picture draws for the atlas: one point per label component (its mean)."""
        c = self.summaries.components
        return c.means.astype(np.float32), np.asarray(self.categories, dtype=object)[c.label].astype(str)

    def blob(self) -> tuple[str, dict[str, torch.Tensor]]:
        return LABELS, {f"summaries/{k}": torch.from_numpy(np.ascontiguousarray(v))
                        for k, v in self.summaries.state().items()}


LabelIndex = ReferenceIndex | SummaryIndex


def label_index(latent: np.ndarray, labels: np.ndarray, studies: np.ndarray, categories: list[str], *,
                knowledge: LabelKnowledge, fpr: float, k_min: int = K_MIN) -> LabelIndex:
    """The label knowledge a reference publishes, fitted on its latent (``knowledge``: summaries
    or cells)."""
    if knowledge not in LABEL_KNOWLEDGE:
        raise SettingError(f"setting check failed: label knowledge must be one of {', '.join(LABEL_KNOWLEDGE)}, "
                           f"got {knowledge!r}")
    if knowledge == "summaries":
        summaries = ClassSummaries.fit(latent, labels, ref_batches=studies, label_categories=categories, fpr=fpr,
                                       options=SummaryOptions(k_min=int(k_min)))
        return SummaryIndex(categories=list(summaries.label_categories), summaries=summaries)
    transfer = KNNLabelTransfer().fit(latent, labels, ref_batches=studies, fpr=fpr, label_categories=categories)
    codes = pd.Categorical(labels, categories=transfer.label_categories).codes.astype(np.int64)
    return ReferenceIndex(latent=latent, labels=codes, categories=list(transfer.label_categories), transfer=transfer)


def _log_normalise(x: sp.csr_matrix, scale: np.ndarray) -> sp.csr_matrix:
    """Rows scaled to TARGET_SUM and log1p'd (trVAE's input)."""
    x = (sp.diags(scale.astype(np.float32)) @ x).tocsr()
    np.log1p(x.data, out=x.data)
    return x.astype(np.float32)


def _prepare(adata: ad.AnnData, kind: ModelKind, genes: list[str] | None, condition_key: str,
             layer: str | None, *, lazy: bool = False) -> tuple[PreparedData, list[str]]:
    """Validate and line up ``adata``; returns the prepared data and the gene list used."""
    if not isinstance(adata, ad.AnnData):
        raise InputDataError(f"expected an AnnData object, got {type(adata).__name__}")
    check_shape(adata)
    check_gene_names(adata.var_names)
    conditions = condition_labels(adata, condition_key)
    x = get_matrix(adata, layer)
    check_values(x, require_integers=(kind == "nb"), conditions=conditions)
    var_names = adata.var_names.astype(str).tolist()
    data = _prepare_matrix(x, var_names, conditions, kind, genes, lazy=lazy)
    return data, genes if genes is not None else var_names


def _prepare_matrix(x: sp.csr_matrix, var_names: list[str], conditions: np.ndarray, kind: ModelKind,
                    genes: list[str] | None, *, lazy: bool = False) -> PreparedData:
    """Columns lined up with ``genes`` and the normalisation the model needs (validated input);
    ``lazy``: trVAE's normalisation is applied by :meth:`PreparedData.rows`, per chunk."""
    overlap = 1.0
    if genes is not None:
        x, overlap = align_genes(x, var_names, genes)
    library = np.asarray(x.sum(axis=1)).ravel().astype(np.float32)
    if kind == "trvae":
        # log-normalise over the model's genes, so reference and query share one scale
        scale = np.divide(TARGET_SUM, library, out=np.zeros_like(library), where=library > 0)
        if lazy:
            return PreparedData(x=x, conditions=conditions, library=None, gene_overlap=overlap, row_scale=scale)
        return PreparedData(x=_log_normalise(x, scale), conditions=conditions, library=None, gene_overlap=overlap)
    return PreparedData(x=x, conditions=conditions, library=np.maximum(library, 1.0), gene_overlap=overlap)


class FedArchesModel:
    """A reference (possibly extended by surgery) conditional VAE and its label index."""

    def __init__(
        self,
        module: CVAE,
        *,
        genes: list[str],
        condition_key: str,
        train_config: TrainConfig,
        label_key: str | None = None,
        reference: LabelIndex | None = None,
    ) -> None:
        if len(genes) != module.config.n_genes:
            raise ValueError(f"{len(genes)} genes for a model of {module.config.n_genes}")
        self.module = module
        self.genes = list(genes)
        self.condition_key = condition_key
        self.label_key = label_key
        self.train_config = train_config
        self.reference = reference
        self.last_history: TrainHistory | None = None
        # {condition id: (site, name)} recorded by the atlas version (format.identity); ids say the rest
        self.condition_owners: dict[str, tuple[str, str]] = {}
        #: the reference latent of the last train_reference, in memory only (never saved)
        self.training_latent: np.ndarray | None = None

    # ------------------------------------------------------------ properties
    @property
    def config(self) -> ModelConfig:
        return self.module.config

    @property
    def conditions(self) -> list[str]:
        """Condition ids in one-hot order: a site's are ``"<site>/<name>"`` (``format.identity``)."""
        return self.module.conditions

    def condition_index(self) -> ConditionIndex:
        return ConditionIndex.from_ids(self.conditions, self.condition_owners)

    def __repr__(self) -> str:
        c = self.config
        return (f"FedArchesModel(kind={c.kind!r}, genes={c.n_genes}, hidden={c.hidden}, latent={c.latent_dim}, "
                f"conditions={len(self.conditions)}, labels={self.label_key!r})")

    # -------------------------------------------------------------- building
    @classmethod
    def train_reference(
        cls,
        adata: ad.AnnData | BackedData | str | os.PathLike[str],
        condition_key: str,
        label_key: str | None = None,
        *,
        kind: ModelKind = "trvae",
        n_genes: int = 2000,
        layer: str | None = None,
        train: TrainConfig | None = None,
        config: dict[str, Any] | None = None,
        novelty_fpr: float = 0.01,
        progress: bool = True,
        label_knowledge: LabelKnowledge = DEFAULT_LABEL_KNOWLEDGE,
        k_min: int = K_MIN,
        chunks: ChunkSettings | None = None,
    ) -> "FedArchesModel":
        """Train a reference model on one or more studies (``condition_key``).

        Genes: ``n_genes`` highly variable genes chosen on this reference, per study
        (0 keeps all); the list is stored in the model. ``config`` overrides paper
        defaults (e.g. ``{"hidden": (128, 128)}``). ``train.threads``: every thread
        pool's count (None: the measured defaults; ``fedarches.threads``);
        ``train.device``: where it computes (``fedarches.device``).
        ``label_knowledge`` (with labels): what the model saves for label transfer, class
        summaries whose every component stands for >= ``k_min`` cells ("summaries", no
        per-cell array) or the per-cell reference latent ("cells", public references).

        Out of core: a path to an ``.h5ad``, a ``BackedData`` or a backed AnnData
        (``anndata.read_h5ad(path, backed="r")``) is read in row blocks and never loaded
        whole; ``chunks`` bounds what is in memory (``fedarches.data.backed.ChunkSettings``,
        docs/OUT_OF_CORE.md). An in-memory AnnData trains in memory.
        """
        if label_knowledge not in LABEL_KNOWLEDGE:
            raise SettingError(f"setting check failed: label knowledge must be one of {', '.join(LABEL_KNOWLEDGE)}, "
                               f"got {label_knowledge!r}")
        SummaryOptions(k_min=int(k_min)).check()  # before training, not after
        if kind not in MODEL_KINDS:
            raise SettingError(f"setting check failed: unknown model {kind!r}; choose one of {', '.join(MODEL_KINDS)}")
        train = train or TrainConfig()
        check_threads(train.threads)
        check_device(train.device)
        fit = dict(kind=kind, label_key=label_key, train=train, config=config, novelty_fpr=novelty_fpr,
                   progress=progress, label_knowledge=label_knowledge, k_min=k_min)
        if is_backed(adata):
            return cls._train_backed(as_backed(adata, layer), condition_key, n_genes=n_genes,
                                     chunks=(chunks or ChunkSettings()).check(), **fit)  # type: ignore[arg-type]
        assert isinstance(adata, ad.AnnData)
        check_shape(adata)
        check_gene_names(adata.var_names)
        conditions = condition_labels(adata, condition_key)
        labels = condition_labels(adata, label_key, what="label") if label_key else None
        x_full = get_matrix(adata, layer)
        check_values(x_full, require_integers=(kind == "nb"), conditions=conditions)
        var_names = adata.var_names.astype(str).tolist()
        genes = select_genes(x_full, var_names, conditions, n_genes)
        data = _prepare_matrix(x_full, var_names, conditions, kind, genes)
        del x_full

        def source(module: CVAE, cond_idx: np.ndarray, codes: np.ndarray | None) -> MatrixSource:
            return MatrixSource(module, data.x, cond_idx, data.library, labels=codes)

        def latent(model: FedArchesModel, cond_idx: np.ndarray) -> np.ndarray:
            return model._latent(data.x, cond_idx, train.device)

        return cls._fit(genes, ordered_conditions(adata.obs[condition_key]), condition_key, conditions, labels,
                        source, latent, **fit)  # type: ignore[arg-type]

    @classmethod
    def _train_backed(cls, data: BackedData, condition_key: str, *, n_genes: int, chunks: ChunkSettings,
                      kind: ModelKind, **fit: Any) -> "FedArchesModel":
        """``train_reference`` from a file: every pass over the counts reads row blocks."""
        probe = ad.AnnData(obs=data.obs, var=pd.DataFrame(index=data.var_names))
        check_shape(probe)
        check_gene_names(data.var_names)
        conditions = condition_labels(probe, condition_key)
        label_key = fit["label_key"]
        labels = condition_labels(probe, label_key, what="label") if label_key else None
        var_names = data.var_names.tolist()
        reader = data.matrix()
        try:
            genes = scan_reference(data, reader, conditions, n_genes, require_integers=(kind == "nb"),
                                   chunk_cells=chunks.chunk_cells)
            rows = data.file_rows()

            def read(pos: np.ndarray) -> PreparedRows:
                prep = _prepare_matrix(reader.rows(rows[pos]), var_names, conditions[pos], kind, genes)
                return prepared_rows(pos, prep.x, prep.library)

            def source(module: CVAE, cond_idx: np.ndarray, codes: np.ndarray | None) -> BackedSource:
                return BackedSource(module, read, data.n_obs, cond_idx, labels=codes, chunk_cells=chunks.chunk_cells,
                                    buffer_chunks=chunks.buffer_chunks, max_batches=chunks.max_steps)

            def latent(model: FedArchesModel, cond_idx: np.ndarray) -> np.ndarray:
                out = np.empty((data.n_obs, model.config.latent_dim), dtype=np.float32)
                for pos in np.array_split(np.arange(data.n_obs), max(1, -(-data.n_obs // chunks.chunk_cells))):
                    out[pos] = model._latent(read(pos).x, cond_idx[pos], fit["train"].device)
                return out

            return cls._fit(genes, ordered_conditions(data.obs[condition_key]), condition_key, conditions, labels,
                            source, latent, kind=kind, **fit)
        finally:
            reader.close()

    @classmethod
    def _fit(cls, genes: list[str], names: list[str], condition_key: str, conditions: np.ndarray,
             labels: np.ndarray | None, source: Any, latent: Any, *, kind: ModelKind, label_key: str | None,
             train: TrainConfig, config: dict[str, Any] | None, novelty_fpr: float, progress: bool,
             label_knowledge: LabelKnowledge, k_min: int) -> "FedArchesModel":
        """What both paths share: the module, training, the reference latent and label index."""
        categories, codes = encode_labels(labels, len(conditions)) if labels is not None else ([], None)
        model_config = _reference_config(kind, len(genes), len(categories), config)
        torch.manual_seed(train.seed)
        module = CVAE(model_config, names)
        cond_idx = pd.Index(names).get_indexer(conditions).astype(np.int64)
        params = module.set_trainable(None)
        history = train_loop(module, source(module, cond_idx, codes if model_config.n_labels else None), params,
                             train, query=False, progress=progress, description=f"reference ({kind})")
        model = cls(module, genes=genes, condition_key=condition_key, train_config=train, label_key=label_key)
        model.last_history = history
        if labels is not None:
            with thread_limits(train.threads, "inference"):
                z = latent(model, cond_idx)
                model.reference = label_index(z, labels, conditions, categories, knowledge=label_knowledge,
                                              fpr=novelty_fpr, k_min=k_min)
            model.training_latent = z
        return model

    # --------------------------------------------------------------- mapping
    def map_query(
        self,
        adata: ad.AnnData,
        condition_key: str | None = None,
        *,
        settings: MapSettings | None = None,
        layer: str | None = None,
        site: str | None = None,
        copy_data: bool = True,
        **legacy: Any,
    ) -> MapResult:
        """Architecture surgery + fine-tuning on a query, then embedding and label transfer.

        Only the query's new conditions are added; ``settings.strategy`` says what
        trains (``conditions``: only their rows). The keyword arguments
        ``strategy``, ``epochs``, ``seed``, ``threads`` and ``progress`` still
        work and override ``settings`` (default progress: on). Returns the
        extended model (this one is left untouched), the query with latent and
        predictions, and a typed report. ``site``: whose data this is; its new
        conditions get ids qualified by it, and names it already holds (or
        reference studies) are not mapped again (``format.identity``).
        ``copy_data=False``: the returned AnnData shares the input's matrices instead of
        copying them (for callers that drop the input, as ``fedarches map`` does).
        """
        settings = _map_settings(settings, legacy)
        check_fit_settings(settings.fit_cells, settings.converge_tol, settings.lr)
        strategy = settings.strategy
        key = condition_key or self.condition_key
        data, _ = _prepare(adata, self.config.kind, self.genes, key, layer, lazy=True)
        names = self.condition_index()
        ids = {c: names.resolve(c, site) for c in ordered_conditions(adata.obs[key])}
        new = [c for c, cid in ids.items() if cid is None]
        if not new:
            raise NothingToMapError(
                f"new condition check failed: every condition in {key!r} "
                f"({', '.join(sorted(set(data.conditions)))}) is already in the model; nothing to map by surgery. "
                "Use `fedarches embed` (FedArchesModel.embed) for conditions the model holds"
            )
        t_start = time.perf_counter()
        module = copy_module(self.module)
        ids.update({c: condition_id(site, c) for c in new})
        module.add_conditions([ids[c] for c in new])
        index = {n: i for i, n in enumerate(module.conditions)}
        cond_idx = np.array([index[ids[c]] for c in data.conditions], dtype=np.int64)
        rows = np.nonzero(np.isin(data.conditions, new))[0]
        if strategy == "conditions":  # study-level rows: a per-condition subsample fits them (query_fit)
            rows = fit_rows(data.conditions, rows, settings.fit_cells, settings.seed)
        params = module.set_trainable(strategy)
        cfg = self.train_config.model_copy(update={
            "epochs": settings.epochs, "seed": settings.seed, "strategy": strategy,
            "lr": settings.lr if settings.lr is not None else self.train_config.lr,
            "threads": settings.threads if settings.threads is not None else self.train_config.threads,
            "device": settings.device,
        })
        sub_x = data.rows(rows)
        sub_lib = data.library[rows] if data.library is not None else None
        if strategy == "conditions":
            source: Any = ProjectedSource(module, sub_x, cond_idx[rows], sub_lib,
                                          use_mse_terms=self.config.kind == "trvae")
        else:
            source = MatrixSource(module, sub_x, cond_idx[rows], sub_lib)
        setup = time.perf_counter() - t_start
        converge = Convergence(settings.converge_tol) if settings.converge_tol > 0 else None
        history = train_loop(module, source, params, cfg, query=True, progress=settings.progress,
                             description=f"query ({strategy})", converge=converge)
        history.setup_seconds = setup
        for p in module.parameters():
            p.requires_grad_(True)
        model = FedArchesModel(module, genes=self.genes, condition_key=self.condition_key,
                               train_config=self.train_config, label_key=self.label_key, reference=self.reference)
        model.condition_owners = {**self.condition_owners, **({ids[c]: (site, c) for c in new} if site else {})}
        model.last_history = history
        with thread_limits(cfg.threads, "inference"):
            out = model._annotate(adata, data, cond_idx, settings.device, copy=copy_data)
        label_transfer = None
        if self.label_key and self.label_key in adata.obs and self.reference is not None:
            label_transfer = _accuracy_summary(out, self.label_key, self.reference.categories)
        report = MapReport(
            strategy=strategy,
            model=self.config.kind,
            new_conditions=new,
            n_cells=int(adata.n_obs),
            n_cells_trained=int(len(rows)),
            gene_overlap=round(data.gene_overlap, 6),
            trainable_parameters=int(sum(p.numel() for p in params)),
            total_parameters=int(sum(p.numel() for p in module.parameters())),
            expected_trainable_parameters=(
                self.config.condition_parameter_count(len(new)) if strategy == "conditions" else None
            ),
            epochs=history.epochs,
            best_epoch=history.best_epoch,
            stopped_early=history.stopped_early,
            seconds=round(time.perf_counter() - t_start, 4),
            setup_seconds=round(setup, 4),
            seconds_per_epoch=round(float(np.mean(history.epoch_seconds)), 6) if history.epoch_seconds else None,
            final_loss=history.train_loss[-1] if history.train_loss else None,
            label_transfer=label_transfer,
        )
        return MapResult(model=model, adata=out, report=report)

    def embed(self, adata: ad.AnnData, condition_key: str | None = None, *, layer: str | None = None,
              threads: int | None = None, site: str | None = None, device: str | None = None) -> ad.AnnData:
        """Latent (and label predictions) for cells of conditions the model holds; no training.
        ``threads``: every thread pool's count (None: the measured default; ``fedarches.threads``).
        ``site``: whose data this is: its names find its own conditions, then the reference
        studies (None: an id, or a name only one site uses; ``format.identity``).
        ``device``: where the encoder runs (``fedarches.device``; None: auto)."""
        key = condition_key or self.condition_key
        data, _ = _prepare(adata, self.config.kind, self.genes, key, layer, lazy=True)
        names = self.condition_index()
        ids = {c: names.resolve(c, site) for c in sorted(set(data.conditions))}
        unknown = [c for c, cid in ids.items() if cid is None]
        if unknown:
            held = names.visible_names(site)
            raise UnknownConditionError(
                f"known condition check failed: conditions {unknown} are not in the model"
                f"{f' for site {site!r}' if site else ''} (it holds {len(held)}: "
                f"{', '.join(held[:8])}{'...' if len(held) > 8 else ''}); map them first "
                "(`fedarches map` on a single machine, `fedarches site map` at a site)"
            )
        index = {n: i for i, n in enumerate(self.conditions)}
        cond_idx = np.array([index[ids[c]] for c in data.conditions], dtype=np.int64)
        with thread_limits(threads, "inference"):
            return self._annotate(adata, data, cond_idx, check_device(device))

    def get_latent(self, adata: ad.AnnData, condition_key: str | None = None, *, layer: str | None = None,
                   threads: int | None = None, site: str | None = None) -> np.ndarray:
        return np.asarray(self.embed(adata, condition_key, layer=layer, threads=threads, site=site).obsm[LATENT_KEY])

    def _latent(self, x: sp.csr_matrix | PreparedData, cond_idx: np.ndarray, device: str | None = None) -> np.ndarray:
        """The posterior mean of every cell, a chunk of rows at a time (only one chunk is dense)."""
        self.module.eval()
        n = x.x.shape[0] if isinstance(x, PreparedData) else x.shape[0]
        out = np.empty((n, self.config.latent_dim), dtype=np.float32)
        with torch.no_grad(), on_device(self.module, device) as dev:
            for start in range(0, n, LATENT_CHUNK):
                sl = slice(start, min(n, start + LATENT_CHUNK))
                sub = x.rows(sl) if isinstance(x, PreparedData) else x[sl]
                xb = torch.from_numpy(sub.toarray().astype(np.float32, copy=False)).to(dev)
                z = self.module.latent(torch.from_numpy(cond_idx[sl]).to(dev), self.module.encoder_input(xb))
                out[sl] = z.cpu().numpy()
        return out

    def _classifier_probabilities(self, latent: np.ndarray) -> np.ndarray | None:
        """p(label | z) from the label-aware reference's classifier, if it has one and its
        labels are the label index's (a model whose index was rebuilt elsewhere may not)."""
        c = self.config
        if not (c.n_labels and c.classifier_weight > 0) or self.reference is None:
            return None
        # summaries grown by merge append labels after the classifier's own (ClassSummaries.merged)
        known = len(self.reference.categories)
        if c.n_labels > known or (c.n_labels != known and self.reference.knowledge == "cells"):
            return None
        out = np.empty((latent.shape[0], c.n_labels), dtype=np.float32)
        for start in range(0, latent.shape[0], 65536):
            z = torch.from_numpy(np.ascontiguousarray(latent[start:start + 65536], dtype=np.float32))
            out[start:start + 65536] = self.module.label_probabilities(z).numpy()
        return out

    def _annotate(self, adata: ad.AnnData, data: PreparedData, cond_idx: np.ndarray,
                  device: str | None = None, *, copy: bool = True) -> ad.AnnData:
        out = adata.copy() if copy or adata.is_view else _sharing_matrices(adata)
        out.obsm[LATENT_KEY] = self._latent(data, cond_idx, device)
        if self.reference is not None and self.label_key:
            # One query-shift guard for everything annotated together (the cells of one
            # site share a state; per-study guards lost A549 on CellBench, where one
            # plate is 40% A549: docs/LABELS.md).
            res = self.reference.predict(out.obsm[LATENT_KEY], None, self._classifier_probabilities(out.obsm[LATENT_KEY]))
            lk = self.label_key
            out.obs[f"{lk}_pred"] = pd.Categorical(res.prediction)
            out.obs[f"{lk}_uncertainty"] = res.uncertainty.astype(np.float32)
            out.obs[f"{lk}_novelty"] = res.novelty_score.astype(np.float32)
            out.obs[f"{lk}_unknown"] = res.is_unknown.astype(bool)
            out.obs[f"{lk}_knn_pred"] = pd.Categorical(res.knn_prediction)
        return out

    # ------------------------------------------------------- condition slices
    def condition_slices(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The ``"<table>/<condition>"`` rows of ``names``: what a site contributes."""
        from fedarches.errors import UnknownConditionError

        missing = [n for n in names if n not in self.conditions]
        if missing:
            raise UnknownConditionError(f"known condition check failed: conditions {missing} are not in the model")
        return self.module.condition_state(names)

    def with_condition_slices(self, slices: dict[str, torch.Tensor]) -> "FedArchesModel":
        """A new model holding this one's conditions plus those in ``slices``.

        Merges by name with ``format.conditions.merge_conditions``, the function
        the coordinator merges with, so the Python API and a published version
        agree on names and order (new names sorted).
        """
        from fedarches.format.conditions import merge_conditions
        from fedarches.format.tensor_keys import condition_key

        tables = {name: torch.zeros(t.width) for name, t in self.module.condition_tables().items()}
        names, merged = merge_conditions(self.conditions, self.module.condition_state(), [slices], tables=tables)
        new = names[len(self.conditions):]
        module = copy_module(self.module)
        if new:
            for tname, table in module.condition_tables().items():
                table.add_conditions(new, torch.stack([merged[condition_key(tname, n)] for n in new]))
        out = FedArchesModel(module, genes=self.genes, condition_key=self.condition_key,
                             train_config=self.train_config, label_key=self.label_key, reference=self.reference)
        out.condition_owners = dict(self.condition_owners)
        return out

    # ------------------------------------------------------------------ files
    def manifest(self) -> ModelManifest:
        return ModelManifest(
            config=self.config, train=self.train_config, genes=self.genes, conditions=self.conditions,
            condition_key=self.condition_key, label_key=self.label_key,
            label_categories=self.reference.categories if self.reference else [],
        )

    def blobs(self) -> dict[str, dict[str, torch.Tensor]]:
        blobs = {WEIGHTS: self.module.shared_state_dict(), CONDITIONS: self.module.condition_state()}
        if self.reference is not None:
            name, tensors = self.reference.blob()
            blobs[name] = tensors
        return blobs

    def save(self, path: str | Path) -> ModelManifest:
        """Write a model directory (atomically); returns the manifest with file hashes."""
        return save_model_dir(path, self.manifest(), self.blobs())

    @classmethod
    def load(cls, path: str | Path) -> "FedArchesModel":
        manifest, blobs = load_model_dir(path)
        model = cls.from_blobs(manifest, blobs, source=str(path))
        model.condition_owners = _recorded_owners(path, manifest)
        return model

    @classmethod
    def from_blobs(cls, manifest: ModelManifest, blobs: dict[str, dict[str, torch.Tensor]],
                   source: str = "model") -> "FedArchesModel":
        """Rebuild a model from a manifest and its tensors (already hash-checked)."""
        module = CVAE(manifest.config, manifest.conditions)
        shared = blobs[WEIGHTS]
        expected = module.shared_state_dict()
        if set(shared) != set(expected):
            diff = sorted(set(shared) ^ set(expected))[:5]
            raise ModelFileError(f"{source}: {WEIGHTS} does not match the manifest's architecture (keys {diff})")
        for k, v in expected.items():
            if shared[k].shape != v.shape:
                raise ModelFileError(f"{source}: tensor {k} has shape {tuple(shared[k].shape)}, expected {tuple(v.shape)}")
        module.load_state_dict(shared, strict=False)
        conds = blobs[CONDITIONS]
        with torch.no_grad():
            for tname, table in module.condition_tables().items():
                if not manifest.conditions:
                    continue
                try:
                    rows = torch.stack([conds[f"{tname}/{n}"] for n in manifest.conditions])
                except KeyError as exc:
                    raise ModelFileError(f"{source}: {CONDITIONS} has no row {exc.args[0]!r}") from exc
                if rows.shape != table.blocks[0].shape:
                    raise ModelFileError(f"{source}: condition table {tname} has shape {tuple(rows.shape)}")
                table.blocks[0].copy_(rows)
        module.eval()
        reference: LabelIndex | None = None
        if LABELS in blobs and manifest.label_key:
            cats = list(manifest.label_categories)
            state = {k.split("/", 1)[1]: v.numpy() for k, v in blobs[LABELS].items() if k.startswith("summaries/")}
            reference = SummaryIndex(categories=cats, summaries=ClassSummaries.from_state(state, cats))
        elif REFERENCE in blobs and manifest.label_key:
            ref = blobs[REFERENCE]
            latent = ref["latent"].numpy().astype(np.float32)
            codes = ref["labels"].numpy().astype(np.int64)
            cats = list(manifest.label_categories)
            state = {k.split("/", 1)[1]: v.numpy() for k, v in ref.items() if k.startswith("transfer/")}
            labels = np.asarray(cats, dtype=object)[codes]
            transfer = KNNLabelTransfer.from_state(latent, labels, state)
            reference = ReferenceIndex(latent=latent, labels=codes, categories=cats, transfer=transfer)
        return cls(module, genes=manifest.genes, condition_key=manifest.condition_key,
                   train_config=manifest.train, label_key=manifest.label_key, reference=reference)



#: Weight of the reference classifier's cross-entropy (0 = no classifier), per
#: model kind, relative to that kind's reconstruction term; chosen by measurement
#: (benchmarks/RESULTS.md, quality section).
CLASSIFIER_WEIGHT: dict[str, float] = {"trvae": 100.0, "nb": 100.0}


def _sharing_matrices(adata: ad.AnnData) -> ad.AnnData:
    """A new AnnData holding ``adata``'s matrices (not copies) and copies of its tables, so
    annotating it never writes into ``adata``'s obs, obsm or uns."""
    return ad.AnnData(X=adata.X, obs=adata.obs.copy(), var=adata.var.copy(), uns=dict(adata.uns),
                      obsm=dict(adata.obsm), varm=dict(adata.varm), layers=dict(adata.layers),
                      obsp=dict(adata.obsp), varp=dict(adata.varp))


def _reference_config(kind: ModelKind, n_genes: int, n_labels: int, overrides: dict[str, Any] | None) -> ModelConfig:
    """Paper defaults, the label-aware classifier when labels are given, then the caller's overrides."""
    base = ModelConfig.paper_defaults(kind, n_genes).model_dump()
    if n_labels:
        base.update(n_labels=n_labels, classifier_weight=CLASSIFIER_WEIGHT[kind])
    merged = {**base, **(overrides or {})}
    if not merged.get("classifier_weight"):  # no classifier term: no classifier weights either
        merged.update(n_labels=0, classifier_weight=0.0)
    return ModelConfig.model_validate(merged)


_LEGACY_MAP_ARGS = ("strategy", "epochs", "seed", "threads", "progress")


def _map_settings(settings: MapSettings | None, legacy: dict[str, Any]) -> MapSettings:
    """One ``MapSettings`` from a settings object and/or the older keyword arguments."""
    unknown = sorted(set(legacy) - set(_LEGACY_MAP_ARGS))
    if unknown:
        raise TypeError(f"map_query() got unexpected keyword arguments {unknown}")
    strategy = legacy.get("strategy", settings.strategy if settings else "conditions")
    if strategy not in STRATEGIES:
        raise SettingError(
            f"setting check failed: unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}"
        )
    base = settings if settings is not None else MapSettings(progress=True)
    return base.model_copy(update=legacy) if legacy else base


def _accuracy_summary(adata: ad.AnnData, label_key: str, known: list[str]) -> LabelTransferSummary:
    """Accuracy on cells whose true type the reference holds (unknown counts as wrong),
    and the fraction of cells of unseen types called unknown."""
    truth = adata.obs[label_key].astype(str).to_numpy()
    pred = adata.obs[f"{label_key}_pred"].astype(str).to_numpy()
    unknown = adata.obs[f"{label_key}_unknown"].to_numpy(dtype=bool)
    is_known = np.isin(truth, known)
    return LabelTransferSummary(
        n_known=int(is_known.sum()),
        n_unseen=int((~is_known).sum()),
        accuracy_known=float((pred[is_known] == truth[is_known]).mean()) if is_known.any() else None,
        unseen_called_unknown=float(unknown[~is_known].mean()) if (~is_known).any() else None,
        known_called_unknown=float(unknown[is_known].mean()) if is_known.any() else None,
    )


def _recorded_owners(path: str | Path, manifest: ModelManifest) -> dict[str, tuple[str, str]]:
    """Owners from a fetched directory's ``atlas-version.json`` (what a pre-qualification id lacks).

    A directory without one (a local model, a site's mapped ``model/``) relies
    on what its ids say; a damaged one is checked where it matters (a site's
    ``read_parent``), not here.
    """
    from fedarches.errors import FedarchesError
    from fedarches.format.version import ATLAS_VERSION_FILE, AtlasVersion

    file = Path(path) / ATLAS_VERSION_FILE
    try:
        version = AtlasVersion.from_bytes(file.read_bytes()) if file.is_file() else None
    except (FedarchesError, OSError):
        return {}
    if version is None or list(version.model.conditions) != list(manifest.conditions):
        return {}
    return version.condition_index().owners()
