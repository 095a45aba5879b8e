"""Peer runner: scvi-tools SCVI (+ SCANVI) and scarches TRVAE, run INSIDE the peers' venv.

The harness (benchmarks/run.py, fedarches' venv) starts this script as a subprocess
and exchanges only files with it: it reads h5ad files written by the harness and
writes `latent.npz` + `report.json` into --out. Nothing here imports fedarches.

    quality  reference training -> save -> load_query_data (surgery) -> query training
             -> latent of reference and query cells (query model); with --scanvi-out,
             SCANVI.from_scvi_model on the same reference SCVI, its own surgery, and
             its classifier's predictions for the query cells
    scale    one reference epoch (or --steps minibatches) and one query epoch on large
             generated data, for seconds per epoch and peak memory
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    EpochClock,
    peak_rss_bytes,
    per_epoch_summary,
    set_threads,
    write_json,
)


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("task", choices=["quality", "scale"])
    p.add_argument("--tool", choices=["scvi", "trvae"], required=True)
    p.add_argument("--ref", required=True)
    p.add_argument("--query", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ref-epochs", type=int, default=None, help="None: the tool's tutorial default")
    p.add_argument("--query-epochs", type=int, default=None, help="None: the tool's tutorial default")
    p.add_argument("--steps", type=int, default=None, help="scale: minibatches per phase (None: one full epoch)")
    p.add_argument("--condition-key", default="study")
    p.add_argument("--label-key", default="cell_type")
    p.add_argument("--scanvi-out", default=None,
                   help="scvi quality: also train SCANVI from the same reference SCVI and write it here")
    return p.parse_args()


# ----------------------------------------------------------------------------- scvi-tools

# scvi-tools' scArches tutorial ("Reference mapping with scvi-tools"): these model
# settings for the reference, default `train()` for the reference, and
# `train(max_epochs=200, plan_kwargs={"weight_decay": 0.0})` for the query.
SCVI_ARCHES_PARAMS = {
    "use_layer_norm": "both",
    "use_batch_norm": "none",
    "encode_covariates": True,
    "dropout_rate": 0.2,
    "n_layers": 2,
    "n_hidden": 128,
    "n_latent": 10,
}
SCVI_QUERY_EPOCHS = 200


def _scvi_callbacks(epochs: EpochClock, steps: EpochClock | None = None):
    from lightning.pytorch.callbacks import Callback

    class Timer(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            epochs.begin()

        def on_train_epoch_end(self, trainer, pl_module):
            epochs.end()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if steps is not None:
                steps.begin()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if steps is not None:
                steps.end()

    return [Timer()]


def _scvi_train(model, max_epochs, clock, steps=None, limit=None, **kw):
    trainer_kw = {
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": False,
        "enable_checkpointing": False,
        "callbacks": _scvi_callbacks(clock, steps),
    }
    if limit is not None:
        trainer_kw["limit_train_batches"] = limit
    t0, c0 = time.perf_counter(), time.process_time()
    model.train(max_epochs=max_epochs, **kw, **trainer_kw)
    CPU.append(time.process_time() - c0)
    return time.perf_counter() - t0


CPU: list[float] = []  # process CPU seconds of each fit, in order (reference, query)


def _param_snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


def _changed_entries(before, module) -> tuple[int, dict[str, int]]:
    """Entries of the state dict that query training changed (exact, elementwise)."""
    after = module.state_dict()
    per = {}
    for k, v0 in before.items():
        v1 = after[k]
        if v1.shape != v0.shape:
            continue
        n = int((v1.detach() != v0).sum())
        if n:
            per[k] = n
    return sum(per.values()), per


def run_scvi(a, ref, query, out: Path) -> dict:
    import numpy as np
    import scvi
    import torch

    scvi.settings.seed = a.seed
    scvi.settings.dl_num_workers = 0
    torch.set_num_threads(a.threads)

    ref = ref.copy()
    scvi.model.SCVI.setup_anndata(ref, batch_key=a.condition_key)
    model = scvi.model.SCVI(ref, **SCVI_ARCHES_PARAMS)
    ref_params = sum(p.numel() for p in model.module.parameters())
    ref_trainable = sum(p.numel() for p in model.module.parameters() if p.requires_grad)
    ref_clock, ref_steps = EpochClock(), EpochClock()
    scale = a.task == "scale"
    ref_epochs = 1 if scale else a.ref_epochs  # None -> scvi's own default schedule
    ref_seconds = _scvi_train(model, ref_epochs, ref_clock, ref_steps if scale else None, a.steps if scale else None)
    ref_dir = out / "scvi_ref"
    model.save(str(ref_dir), overwrite=True)

    q = query.get().copy()
    scvi.model.SCVI.prepare_query_anndata(q, str(ref_dir))
    qmodel = scvi.model.SCVI.load_query_data(q, str(ref_dir), accelerator="cpu")
    before = _param_snapshot(qmodel.module)
    optim_params = sum(p.numel() for p in qmodel.module.parameters() if p.requires_grad)
    q_clock, q_steps = EpochClock(), EpochClock()
    q_epochs = 1 if scale else (a.query_epochs or SCVI_QUERY_EPOCHS)
    q_seconds = _scvi_train(
        qmodel, q_epochs, q_clock, q_steps if scale else None, a.steps if scale else None,
        plan_kwargs={"weight_decay": 0.0},
    )
    changed, changed_per = _changed_entries(before, qmodel.module)

    rep = {
        "tool": "scvi-tools",
        "version": scvi.__version__,
        "model": "SCVI " + ", ".join(f"{k}={v}" for k, v in SCVI_ARCHES_PARAMS.items()),
        "reference": {**per_epoch_summary(ref_clock.times), "fit_seconds": ref_seconds, "fit_cpu_seconds": CPU[0],
                      "total_parameters": ref_params, "trainable_parameters": ref_trainable},
        "query": {**per_epoch_summary(q_clock.times), "fit_seconds": q_seconds, "fit_cpu_seconds": CPU[1],
                  "optimizer_parameters": optim_params,
                  "trainable_parameters": changed,
                  "trainable_tensors": changed_per,
                  "upload_bytes": 4 * changed},
        "n_ref_cells": int(ref.n_obs), "n_query_cells": int(q.n_obs), "n_genes": int(ref.n_vars),
        "reference_peak_rss_bytes": query.reference_peak_rss_bytes,
    }
    if scale:
        import math

        for phase, m, steps, n in (("reference", model, ref_steps, ref.n_obs),
                                    ("query", qmodel, q_steps, q.n_obs)):
            idx = getattr(m, "train_indices", None)
            n_train = len(idx) if idx is not None else round(0.9 * n)
            r = rep[phase]
            r["step_seconds"] = steps.times
            r["steps_run"] = len(steps.times)
            r["n_train_cells"] = n_train
            r["steps_per_epoch"] = math.ceil(n_train / 128)
            # seconds per FULL epoch: wall time of the (possibly limited) epoch, scaled to all steps
            r["seconds_per_epoch_measured_steps"] = r["seconds_total"]
            r["seconds_per_epoch"] = r["seconds_total"] / max(len(steps.times), 1) * r["steps_per_epoch"]
    else:
        full = __import__("anndata").concat([ref, q], join="inner")
        full.obs[a.condition_key] = full.obs[a.condition_key].astype(str).astype("category")
        t0 = time.perf_counter()
        z_ref = qmodel.get_latent_representation(ref)
        z_q = qmodel.get_latent_representation(q)
        rep["embed_seconds"] = time.perf_counter() - t0
        np.savez(out / "latent.npz", reference=z_ref.astype("float32"), query=z_q.astype("float32"))
    return rep, model


# ----------------------------------------------------------------------------- scvi-tools SCANVI

# scvi-tools' scArches tutorial ("Reference mapping with scvi-tools", scANVI part):
# SCANVI.from_scvi_model(reference SCVI, unlabeled_category="Unknown"),
# train(max_epochs=20, n_samples_per_label=100); query labels set to the unlabeled
# category, SCANVI.load_query_data, train(max_epochs=100, weight_decay 0,
# check_val_every_n_epoch=10).
SCANVI_UNLABELED = "Unknown"
SCANVI_REF_TRAIN = {"max_epochs": 20, "n_samples_per_label": 100}
SCANVI_QUERY_TRAIN = {"max_epochs": 100, "plan_kwargs": {"weight_decay": 0.0}, "check_val_every_n_epoch": 10}
SCANVI_LABELS = "_scanvi_label"


def run_scanvi(a, scvi_model, query, out: Path) -> dict:
    """SCANVI on the reference SCVI the scvi run just trained (same cells, genes, seed)."""
    import numpy as np
    import scvi

    scvi.settings.seed = a.seed
    out.mkdir(parents=True, exist_ok=True)
    ref = scvi_model.adata
    ref.obs[SCANVI_LABELS] = ref.obs[a.label_key].astype(str).to_numpy()
    model = scvi.model.SCANVI.from_scvi_model(scvi_model, unlabeled_category=SCANVI_UNLABELED,
                                              labels_key=SCANVI_LABELS)
    n_cpu = len(CPU)
    ref_clock = EpochClock()
    epochs = SCANVI_REF_TRAIN["max_epochs"] if a.ref_epochs is None else min(a.ref_epochs, SCANVI_REF_TRAIN["max_epochs"])
    ref_seconds = _scvi_train(model, epochs, ref_clock, n_samples_per_label=SCANVI_REF_TRAIN["n_samples_per_label"])
    ref_dir = out / "scanvi_ref"
    model.save(str(ref_dir), overwrite=True)

    q = query.get().copy()
    q.obs[SCANVI_LABELS] = SCANVI_UNLABELED  # the query's labels are not given to the model
    scvi.model.SCANVI.prepare_query_anndata(q, str(ref_dir))
    qmodel = scvi.model.SCANVI.load_query_data(q, str(ref_dir), accelerator="cpu")
    before = _param_snapshot(qmodel.module)
    q_clock = EpochClock()
    q_kw = {k: v for k, v in SCANVI_QUERY_TRAIN.items() if k != "max_epochs"}
    q_seconds = _scvi_train(qmodel, a.query_epochs or SCANVI_QUERY_TRAIN["max_epochs"], q_clock, **q_kw)
    changed, changed_per = _changed_entries(before, qmodel.module)

    t0 = time.perf_counter()
    z_ref = qmodel.get_latent_representation(ref)
    z_q = qmodel.get_latent_representation(q)
    pred = np.asarray(qmodel.predict(q)).astype(str)
    soft = qmodel.predict(q, soft=True)
    embed = time.perf_counter() - t0
    np.savez(out / "latent.npz", reference=z_ref.astype("float32"), query=z_q.astype("float32"))
    np.savez(out / "own_labels.npz", prediction=pred,
             max_probability=np.asarray(soft).max(axis=1).astype("float32"),
             classes=np.asarray(list(soft.columns)).astype(str))
    return {
        "tool": "scvi-tools SCANVI",
        "version": scvi.__version__,
        "model": "SCANVI.from_scvi_model(SCVI " + ", ".join(f"{k}={v}" for k, v in SCVI_ARCHES_PARAMS.items())
        + f"), unlabeled_category={SCANVI_UNLABELED!r}; reference train {SCANVI_REF_TRAIN}; query train "
        f"{SCANVI_QUERY_TRAIN}",
        "reference": {**per_epoch_summary(ref_clock.times), "fit_seconds": ref_seconds,
                      "fit_cpu_seconds": CPU[n_cpu],
                      "total_parameters": sum(p.numel() for p in model.module.parameters())},
        "query": {**per_epoch_summary(q_clock.times), "fit_seconds": q_seconds, "fit_cpu_seconds": CPU[n_cpu + 1],
                  "trainable_parameters": changed, "trainable_tensors": changed_per,
                  "upload_bytes": 4 * changed},
        "embed_seconds": embed,
        "n_ref_cells": int(ref.n_obs), "n_query_cells": int(q.n_obs), "n_genes": int(ref.n_vars),
    }


# ----------------------------------------------------------------------------- scarches TRVAE

# scarches' trVAE surgery tutorial: early stopping settings, n_epochs=500,
# alpha_epoch_anneal=200, query weight_decay=0. Architecture set to the scArches
# paper's trVAE (MSE on log-normalised data, [128, 20], z=10, MMD on the first
# decoder layer) so it matches fedarches' trVAE layer for layer.
TRVAE_EARLY_STOPPING = {
    "early_stopping_metric": "val_unweighted_loss",
    "threshold": 0,
    "patience": 20,
    "reduce_lr": True,
    "lr_patience": 13,
    "lr_factor": 0.1,
}
TRVAE_PARAMS = {"hidden_layer_sizes": [128, 20], "latent_dim": 10, "recon_loss": "mse", "use_mmd": True, "mmd_on": "y"}
TRVAE_EPOCHS = 500


def run_trvae(a, ref, query, out: Path) -> dict:
    import anndata
    import numpy as np
    import torch

    anndata.read = anndata.read_h5ad  # scarches 0.6.1 still calls anndata.read
    warnings.filterwarnings("ignore")
    import scarches as sca
    from scarches.trainers.trvae.trainer import Trainer

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    clock = {"c": EpochClock()}
    orig_begin, orig_end = Trainer.on_epoch_begin, Trainer.on_epoch_end

    def on_epoch_begin(self, lr, eps):
        clock["c"].begin()
        return orig_begin(self, lr, eps)

    def on_epoch_end(self):
        r = orig_end(self)
        clock["c"].end()
        return r

    Trainer.on_epoch_begin, Trainer.on_epoch_end = on_epoch_begin, on_epoch_end

    def lognorm(ad):
        ad = ad.copy()
        ad.X = ad.layers["lognorm"].toarray() if hasattr(ad.layers["lognorm"], "toarray") else ad.layers["lognorm"]
        del ad.layers["lognorm"]
        return ad

    ref = lognorm(ref)
    conds = ref.obs[a.condition_key].astype(str).unique().tolist()
    ref.obs[a.condition_key] = ref.obs[a.condition_key].astype(str)
    model = sca.models.TRVAE(adata=ref, condition_key=a.condition_key, conditions=conds, **TRVAE_PARAMS)
    ref_params = sum(p.numel() for p in model.model.parameters())
    t0, c0 = time.perf_counter(), time.process_time()
    model.train(n_epochs=a.ref_epochs or TRVAE_EPOCHS, alpha_epoch_anneal=200,
                early_stopping_kwargs=TRVAE_EARLY_STOPPING, monitor=False, seed=a.seed)
    ref_seconds = time.perf_counter() - t0
    ref_cpu = time.process_time() - c0
    ref_times = clock["c"].times
    ref_dir = out / "trvae_ref"
    model.save(str(ref_dir), overwrite=True)

    clock["c"] = EpochClock()
    lazy, query = query, lognorm(query.get())
    query.obs[a.condition_key] = query.obs[a.condition_key].astype(str)
    qmodel = sca.models.TRVAE.load_query_data(adata=query, reference_model=str(ref_dir))
    before = _param_snapshot(qmodel.model)
    optim_params = sum(p.numel() for p in qmodel.model.parameters() if p.requires_grad)
    t0, c0 = time.perf_counter(), time.process_time()
    qmodel.train(n_epochs=a.query_epochs or TRVAE_EPOCHS, alpha_epoch_anneal=200,
                 early_stopping_kwargs=TRVAE_EARLY_STOPPING, weight_decay=0, monitor=False, seed=a.seed)
    q_seconds = time.perf_counter() - t0
    q_cpu = time.process_time() - c0
    changed, changed_per = _changed_entries(before, qmodel.model)

    t0 = time.perf_counter()
    z_ref = qmodel.get_latent(ref.X, ref.obs[a.condition_key].values, mean=True)
    z_q = qmodel.get_latent(query.X, query.obs[a.condition_key].values, mean=True)
    embed = time.perf_counter() - t0
    np.savez(out / "latent.npz", reference=np.asarray(z_ref, "float32"), query=np.asarray(z_q, "float32"))
    return {
        "tool": "scarches TRVAE",
        "version": sca.__version__ if hasattr(sca, "__version__") else "0.6.1",
        "model": "TRVAE " + ", ".join(f"{k}={v}" for k, v in TRVAE_PARAMS.items()),
        "reference": {**per_epoch_summary(ref_times), "fit_seconds": ref_seconds, "fit_cpu_seconds": ref_cpu,
                      "total_parameters": ref_params, "trainable_parameters": ref_params},
        "query": {**per_epoch_summary(clock["c"].times), "fit_seconds": q_seconds, "fit_cpu_seconds": q_cpu,
                  "optimizer_parameters": optim_params,
                  "trainable_parameters": changed, "trainable_tensors": changed_per,
                  "upload_bytes": 4 * changed},
        "embed_seconds": embed,
        "reference_peak_rss_bytes": lazy.reference_peak_rss_bytes,
        "n_ref_cells": int(ref.n_obs), "n_query_cells": int(query.n_obs), "n_genes": int(ref.n_vars),
    }


class LazyQuery:
    """Reads the query h5ad on first use and records the peak RSS before that."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.reference_peak_rss_bytes: int | None = None
        self._a = None

    def get(self):
        if self._a is None:
            import anndata

            self.reference_peak_rss_bytes = peak_rss_bytes()
            self._a = anndata.read_h5ad(self.path)
        return self._a


def main() -> None:
    a = _args()
    set_threads(a.threads)
    warnings.filterwarnings("ignore")
    import anndata

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ref = anndata.read_h5ad(a.ref)
    load = time.perf_counter() - t0
    # the query is read only after reference training, so the peak RSS at that point
    # is the reference phase's own
    query = LazyQuery(a.query)
    if a.tool == "scvi":
        rep, scvi_model = run_scvi(a, ref, query, out)
    else:
        rep = run_trvae(a, ref, query, out)
    _write_report(a, rep, out, load)  # before SCANVI: a SCANVI crash keeps SCVI's result
    if a.tool == "scvi" and a.scanvi_out and a.task == "quality":
        _write_report(a, run_scanvi(a, scvi_model, query, Path(a.scanvi_out)), Path(a.scanvi_out), load)


def _write_report(a, r: dict, where: Path, load: float) -> None:
    r["load_seconds"] = load
    r["threads"] = a.threads
    r["seed"] = a.seed
    r["peak_rss_bytes"] = peak_rss_bytes()  # the process' peak so far: SCANVI runs after SCVI in it
    r["pid"] = os.getpid()
    write_json(where / "report.json", r)
    print(f"{r['tool']}: peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
