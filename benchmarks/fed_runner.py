"""fedarches runner: the same tasks as peers_runner.py, run in fedarches' venv as a
subprocess so its peak memory (ru_maxrss) is measured exactly like the peers'.

    quality  FedArchesModel.train_reference -> map_query(strategy="conditions")
             -> latent of reference and query cells from the extended model, and the
             labels map_query wrote (<label>_pred / _unknown / _novelty) per query cell
    scale    one reference epoch and one query epoch on large generated data
    transfer KNNLabelTransfer fit + predict timing on two latent files
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_bytes, per_epoch_summary, set_threads, write_json


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("task", choices=["quality", "scale", "transfer"])
    p.add_argument("--kind", choices=["trvae", "nb"], default="nb")
    p.add_argument("--ref", required=True)
    p.add_argument("--query", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ref-epochs", type=int, default=None, help="None: fedarches' default schedule")
    p.add_argument("--query-epochs", type=int, default=None, help="None: fedarches' default schedule")
    p.add_argument("--hidden", default=None, help="comma-separated layer widths (default: paper Table 1)")
    p.add_argument("--condition-key", default="study")
    p.add_argument("--label-key", default="cell_type")
    p.add_argument("--k", type=int, default=50)
    return p.parse_args()


def _history(h) -> dict:
    if h is None:
        return {}
    d = per_epoch_summary(list(h.epoch_seconds))
    d["setup_seconds"] = float(getattr(h, "setup_seconds", 0.0))
    d["stopped_early"] = bool(getattr(h, "stopped_early", False))
    d["best_epoch"] = int(getattr(h, "best_epoch", 0))
    d["train_seconds"] = float(getattr(h, "seconds", 0.0))
    return d


def run_model(a) -> dict:
    import anndata as ad
    import numpy as np
    import torch

    from fedarches.config import TrainConfig
    from fedarches.model import FedArchesModel

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    t0 = time.perf_counter()
    ref = ad.read_h5ad(a.ref)
    load = time.perf_counter() - t0
    scale = a.task == "scale"
    ref_epochs = 1 if scale else a.ref_epochs
    q_epochs = 1 if scale else a.query_epochs
    train = TrainConfig(epochs=ref_epochs, threads=a.threads, seed=a.seed)
    config = {"hidden": tuple(int(w) for w in a.hidden.split(","))} if a.hidden else None
    c0 = time.process_time()
    t0 = time.perf_counter()
    model = FedArchesModel.train_reference(
        ref, a.condition_key, (None if scale else a.label_key) or None, kind=a.kind, n_genes=2000, train=train,
        config=config, progress=False,
    )
    ref_seconds = time.perf_counter() - t0
    ref_cpu = time.process_time() - c0
    ref_hist = model.last_history
    total_params = sum(p.numel() for p in model.module.parameters())
    ref_peak = peak_rss_bytes()  # before the query is even read: the reference phase's peak
    query = ad.read_h5ad(a.query)

    c0 = time.process_time()
    t0 = time.perf_counter()
    res = model.map_query(query, a.condition_key, strategy="conditions", epochs=q_epochs, seed=a.seed,
                          threads=a.threads, progress=False)
    q_seconds = time.perf_counter() - t0
    q_cpu = time.process_time() - c0
    q_hist = res.model.last_history
    new = list(res.report.new_conditions)
    slices = res.model.condition_slices(new)
    upload = int(sum(t.numel() * t.element_size() for t in slices.values()))
    import fedarches

    rep = {
        "tool": "fedarches",
        "version": getattr(fedarches, "__version__", ""),
        "model": f"fedarches {a.kind} hidden={model.config.hidden} z={model.config.latent_dim} "
        f"norm={model.config.norm} dropout={model.config.dropout}",
        "kind": a.kind,
        "reference": {**_history(ref_hist), "fit_seconds": ref_seconds, "fit_cpu_seconds": ref_cpu, "total_parameters": int(total_params),
                      "trainable_parameters": int(total_params)},
        "query": {**_history(q_hist), "fit_seconds": q_seconds, "fit_cpu_seconds": q_cpu,
                  "map_query_report_seconds": res.report.seconds,
                  "trainable_parameters": int(res.report.trainable_parameters),
                  "expected_trainable_parameters": res.report.expected_trainable_parameters,
                  "upload_bytes": upload,
                  "condition_slice_entries": {k: int(v.numel()) for k, v in slices.items()}},
        "n_ref_cells": int(ref.n_obs), "n_query_cells": int(query.n_obs), "n_genes": len(model.genes),
        "load_seconds": load,
        "reference_peak_rss_bytes": ref_peak,
        "report": {k: v for k, v in res.report.to_dict().items() if k != "label_transfer"},
    }
    if not scale:
        t0 = time.perf_counter()
        z_ref = res.model.get_latent(ref, a.condition_key)
        z_q = np.asarray(res.adata.obsm["X_fedarches"])
        rep["embed_seconds"] = time.perf_counter() - t0
        np.savez(out / "latent.npz", reference=z_ref.astype("float32"), query=z_q.astype("float32"))
        obs, lk = res.adata.obs, a.label_key
        if f"{lk}_pred" in obs:  # the labels map_query wrote: what a user of fedarches gets
            np.savez(out / "own_labels.npz", prediction=np.asarray(obs[f"{lk}_pred"].astype(str), dtype=str),
                     is_unknown=obs[f"{lk}_unknown"].to_numpy(dtype=bool),
                     novelty=obs[f"{lk}_novelty"].to_numpy(dtype=np.float32))
    else:
        # latents for the 1M-vs-1M label-transfer timing (embedding is not timed as training)
        t0 = time.perf_counter()
        z_ref = res.model.get_latent(ref, a.condition_key)
        z_q = res.model.get_latent(query, a.condition_key)
        rep["embed_seconds"] = time.perf_counter() - t0
        np.savez(out / "latent.npz", reference=z_ref.astype("float32"), query=z_q.astype("float32"),
                 reference_labels=np.asarray(ref.obs[a.label_key].astype(str).to_numpy(), dtype=str)
                 if a.label_key in ref.obs else np.array([], dtype=str),
                 reference_batches=np.asarray(ref.obs[a.condition_key].astype(str).to_numpy(), dtype=str))
    return rep


def run_transfer(a) -> dict:
    """Label transfer timing: --ref / --query are .npz latents (written by `scale`)."""
    import numpy as np

    from fedarches.labels import KNNLabelTransfer

    r = np.load(a.ref, allow_pickle=False)
    q = np.load(a.query, allow_pickle=False)
    z_ref, z_q = r["reference"], q["query"]
    labels, batches = r["reference_labels"], r["reference_batches"]
    t0 = time.perf_counter()
    lt = KNNLabelTransfer().fit(z_ref, labels, ref_batches=batches, k=a.k)
    fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = lt.predict(z_q)
    pred = time.perf_counter() - t0
    method = getattr(lt, "method", None) or getattr(lt, "neighbor_method", None) or type(getattr(lt, "_index", None)).__name__
    return {
        "tool": "fedarches.labels",
        "n_reference": len(z_ref), "n_query": len(z_q), "k": a.k,
        "fit_seconds": fit, "predict_seconds": pred, "total_seconds": fit + pred,
        "neighbour_method": str(method),
        "unknown_fraction": float(np.mean(res.is_unknown)),
    }


def main() -> None:
    a = _args()
    set_threads(a.threads)
    warnings.filterwarnings("ignore")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    rep = run_transfer(a) if a.task == "transfer" else run_model(a)
    rep["threads"] = a.threads
    rep["seed"] = a.seed
    rep["peak_rss_bytes"] = peak_rss_bytes()
    rep["pid"] = os.getpid()
    write_json(Path(a.out) / "report.json", rep)
    print(f"{rep['tool']}: peak RSS {rep['peak_rss_bytes'] / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
