"""Does alignment erase biology? (issue 14, "Alignment that does not erase biology")

    python benchmarks/alignment.py [--seeds 0,1] [--splits cellbench,pbmc,pbmc-cd16,sim-state]
                                   [--configs trvae-m20-c100,...] [--jobs 2]

The trVAE's MMD term pulls the studies' latents together; on a query in another
state (or with a type the reference lacks) it can pull an unseen type onto its
nearest known one, which no novelty rule can then undo. This grid (MMD weight x
classifier weight for the trVAE, classifier weight for NB) measures that per
held-out type: how often it is called unknown, the AUROC of the novelty score
(held-out vs known query cells) and its kNN purity in the joint reference+query
latent (the fraction of a held-out cell's 15 nearest neighbours of its own type:
low = merged into a known type), next to known-type accuracy and false alarms,
so defaults are chosen on every split together (worst seed), not on one.

Each (split, seed, config) run is its own subprocess (threads=1, at most --jobs
at once); results are appended to benchmarks/work/alignment.json as they come, so
an interrupted grid keeps what finished and a rerun skips it. The table goes to
benchmarks/work/alignment.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
DATA = Path(os.environ.get("FEDARCHES_DATA", "/work/shared/data"))
SPLITS = ("cellbench", "pbmc", "pbmc-cd16", "sim-state")
K_PURITY = 15

#: name -> (model kind, config overrides); trVAE paper MMD weight is 20, NB has no MMD.
CONFIGS: dict[str, tuple[str, dict[str, float]]] = {
    "trvae-m20-c100": ("trvae", {"mmd_weight": 20.0, "classifier_weight": 100.0}),
    "trvae-m5-c100": ("trvae", {"mmd_weight": 5.0, "classifier_weight": 100.0}),
    "trvae-m0-c100": ("trvae", {"mmd_weight": 0.0, "classifier_weight": 100.0}),
    "trvae-m20-c0": ("trvae", {"mmd_weight": 20.0, "classifier_weight": 0.0}),
    "trvae-m5-c0": ("trvae", {"mmd_weight": 5.0, "classifier_weight": 0.0}),
    "trvae-m0-c0": ("trvae", {"mmd_weight": 0.0, "classifier_weight": 0.0}),
    "nb-c100": ("nb", {"classifier_weight": 100.0}),
    "nb-c0": ("nb", {"classifier_weight": 0.0}),
}
DEFAULTS = ("trvae-m20-c100", "nb-c100")


# ------------------------------------------------------------------ one run
def _load(split_name: str, seed: int) -> tuple[Any, Any]:
    from fedarches.data.splits import QUALITY_SPLITS, Split

    split = QUALITY_SPLITS[split_name]
    if isinstance(split, Split):
        return split.load(DATA / split.file)
    return split.make(seed)


def _purity_by_type(z_ref: Any, ref_labels: Any, z_q: Any, q_labels: Any, held_out: list[str]) -> dict[str, float]:
    """Per held-out type: mean over its query cells of the same-type fraction among
    its K_PURITY nearest neighbours (itself excluded) in the joint latent."""
    import numpy as np
    from scipy.spatial import cKDTree

    z = np.vstack([z_ref, z_q])
    labels = np.concatenate([ref_labels, q_labels])
    tree = cKDTree(z)
    offset = len(z_ref)
    out = {}
    for t in held_out:
        rows = offset + np.nonzero(q_labels == t)[0]
        _, idx = tree.query(z[rows], k=K_PURITY + 1, workers=1)
        out[t] = float((labels[idx[:, 1:]] == t).mean())
    return out


def run_one(split_name: str, seed: int, config_name: str) -> dict[str, Any]:
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from fedarches.config import TrainConfig
    from fedarches.metrics import entropy_batch_mixing
    from fedarches.model import LATENT_KEY, FedArchesModel

    torch.set_num_threads(1)
    kind, overrides = CONFIGS[config_name]
    ref, query = _load(split_name, seed)
    t0 = time.perf_counter()
    model = FedArchesModel.train_reference(ref, "study", "cell_type", kind=kind,  # type: ignore[arg-type]
                                           train=TrainConfig(seed=seed, threads=1), progress=False,
                                           config=dict(overrides))
    t_ref = time.perf_counter() - t0
    mapped = model.map_query(query, "study", seed=seed, threads=1, progress=False)
    wall = time.perf_counter() - t0
    obs = mapped.adata.obs
    truth = obs["cell_type"].astype(str).to_numpy()
    pred = obs["cell_type_pred"].astype(str).to_numpy()
    unknown = obs["cell_type_unknown"].to_numpy(dtype=bool)
    novelty = obs["cell_type_novelty"].to_numpy(dtype=float)
    known_types = set(model.reference.categories)
    known = np.isin(truth, list(known_types))
    held_out = sorted(set(truth) - known_types)
    z_q = np.asarray(mapped.adata.obsm[LATENT_KEY])
    z_ref = model.reference.latent
    ref_labels = np.asarray(model.reference.categories, dtype=object)[model.reference.labels].astype(str)
    purity = _purity_by_type(z_ref, ref_labels, z_q, truth, held_out)
    per_type = {t: {"n": int((truth == t).sum()),
                    "called_unknown": float(unknown[truth == t].mean()),
                    "auroc": float(roc_auc_score(np.r_[np.zeros(known.sum()), np.ones((truth == t).sum())],
                                                 np.r_[novelty[known], novelty[truth == t]])),
                    "purity": purity[t]} for t in held_out}
    studies = np.concatenate([ref.obs["study"].astype(str).to_numpy(), query.obs["study"].astype(str).to_numpy()])
    ebm = entropy_batch_mixing(np.vstack([z_ref, z_q]), studies, seed=0, workers=1)
    return {
        "split": split_name, "seed": seed, "config": config_name, "kind": kind, "overrides": overrides,
        "known_accuracy": float((pred[known] == truth[known]).mean()),
        "known_called_unknown": float(unknown[known].mean()),
        "held_out": per_type, "ebm": float(ebm),
        "wall_s": round(wall, 1), "reference_s": round(t_ref, 1),
    }


# ---------------------------------------------------------------- the grid
def _results_path() -> Path:
    return WORK / "alignment.json"


def load_results() -> list[dict[str, Any]]:
    path = _results_path()
    return json.loads(path.read_text()) if path.exists() else []


def _save(results: list[dict[str, Any]]) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    tmp = _results_path().with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, _results_path())


def run_grid(jobs_todo: list[tuple[str, int, str]], n_parallel: int) -> None:
    """Runs each job as `alignment.py --one ...` (its own process, threads=1)."""
    results = load_results()
    done = {(r["split"], r["seed"], r["config"]) for r in results}
    queue = [j for j in jobs_todo if j not in done]
    running: list[tuple[tuple[str, int, str], subprocess.Popen[str]]] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "NUMBA_NUM_THREADS": "1"}
    while queue or running:
        while queue and len(running) < n_parallel:
            job = queue.pop(0)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--one", job[0], str(job[1]), job[2]]
            running.append((job, subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)))
        time.sleep(1.0)
        for item in list(running):
            job, proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            out = proc.stdout.read() if proc.stdout else ""
            if proc.returncode != 0:
                print(f"FAILED {job}: rc {proc.returncode}", flush=True)
                continue
            record = json.loads(out.strip().splitlines()[-1])
            results.append(record)
            _save(results)
            print(f"{job[0]:10s} seed {job[1]} {job[2]:15s} acc {record['known_accuracy']:.3f} "
                  f"FA {record['known_called_unknown']:.3f} {record['wall_s']:.0f}s", flush=True)


# ------------------------------------------------------------------ report
def _cell(records: list[dict[str, Any]]) -> str:
    """'acc / FA / detection / AUROC / purity' as mean (worst seed); held-out
    figures are the worst held-out type of each run."""
    if not records:
        return "-"
    rows = [(r["known_accuracy"], r["known_called_unknown"],
             min(h["called_unknown"] for h in r["held_out"].values()),
             min(h["auroc"] for h in r["held_out"].values()),
             min(h["purity"] for h in r["held_out"].values())) for r in records]
    worst = (min, max, min, min, min)
    parts = []
    for i, f in enumerate(worst):
        vals = [row[i] for row in rows]
        parts.append(f"{sum(vals) / len(vals):.2f}" + (f" ({f(vals):.2f})" if len(vals) > 1 else ""))
    return " / ".join(parts)


def _per_type_table(results: list[dict[str, Any]], splits: list[str], configs: list[str]) -> list[str]:
    lines = ["", "Per held-out type, mean over seeds: called unknown / AUROC / kNN purity (k=15) / EBM of the run", "",
             "| split | type | " + " | ".join(configs) + " |", "|---|---|" + "---|" * len(configs)]
    for s in splits:
        types = sorted({t for r in results if r["split"] == s for t in r["held_out"]})
        for t in types:
            cells = []
            for c in configs:
                rs = [r for r in results if r["split"] == s and r["config"] == c]
                if not rs:
                    cells.append("-")
                    continue
                m = lambda key: sum(r["held_out"][t][key] for r in rs) / len(rs)  # noqa: E731
                ebm = sum(r["ebm"] for r in rs) / len(rs)
                cells.append(f"{m('called_unknown'):.2f} / {m('auroc'):.2f} / {m('purity'):.2f} / {ebm:.2f}")
            lines.append(f"| {s} | {t} | " + " | ".join(cells) + " |")
    return lines


def _summary(results: list[dict[str, Any]], c: str, splits: list[str]) -> dict[str, float]:
    """Across every split and seed: worst accuracy, worst false alarms, worst AUROC, worst purity."""
    rs = [r for r in results if r["config"] == c and r["split"] in splits]
    if not rs:
        return {}
    return {"runs": len(rs),
            "worst_acc": min(r["known_accuracy"] for r in rs),
            "mean_acc": sum(r["known_accuracy"] for r in rs) / len(rs),
            "worst_fa": max(r["known_called_unknown"] for r in rs),
            "worst_auroc": min(h["auroc"] for r in rs for h in r["held_out"].values()),
            "mean_auroc": sum(h["auroc"] for r in rs for h in r["held_out"].values())
            / sum(len(r["held_out"]) for r in rs),
            "worst_purity": min(h["purity"] for r in rs for h in r["held_out"].values()),
            "mean_s": sum(r["wall_s"] for r in rs) / len(rs)}


def report(results: list[dict[str, Any]], splits: list[str], configs: list[str]) -> str:
    seeds = sorted({r["seed"] for r in results})
    lines = [f"# Alignment grid (seeds {', '.join(map(str, seeds))}; threads=1)", "",
             "Each cell: known-type accuracy (Unknown = wrong) / known cells called unknown / held-out "
             "type called unknown / AUROC of cell_type_novelty (held-out vs known query cells) / kNN purity "
             f"(k={K_PURITY}) of held-out query cells in the joint reference+query latent; held-out figures take "
             "the worst held-out type of the run; mean over seeds (worst seed).", "",
             "| config | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
    for c in configs:
        cells = [_cell([r for r in results if r["split"] == s and r["config"] == c]) for s in splits]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines += _per_type_table(results, splits, configs)
    lines += ["", "All splits together (every seed): worst / mean accuracy, worst FA, worst / mean AUROC, "
              "worst purity, mean wall s", "",
              "| config | runs | worst acc | mean acc | worst FA | worst AUROC | mean AUROC | worst purity | s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in configs:
        s = _summary(results, c, splits)
        if s:
            lines.append(f"| {c} | {s['runs']} | {s['worst_acc']:.3f} | {s['mean_acc']:.3f} | {s['worst_fa']:.3f} "
                         f"| {s['worst_auroc']:.3f} | {s['mean_auroc']:.3f} | {s['worst_purity']:.3f} "
                         f"| {s['mean_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--one", nargs=3, metavar=("SPLIT", "SEED", "CONFIG"), help="run one job, print its JSON")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--splits", default=",".join(SPLITS))
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(run_one(a.one[0], int(a.one[1]), a.one[2])))
        return 0
    splits, configs = a.splits.split(","), a.configs.split(",")
    seeds = [int(s) for s in a.seeds.split(",")]
    if not a.report_only:  # seed-major: a cut-short grid still has every config on every split
        run_grid([(s, seed, c) for seed in seeds for c in configs for s in splits], a.jobs)
    table = report(load_results(), splits, configs)
    (WORK / "alignment.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
