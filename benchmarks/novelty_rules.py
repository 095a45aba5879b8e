"""Unknown-cell rules side by side on the same latents (issue 14: calls that survive a state shift)

    python benchmarks/novelty_rules.py [--splits cellbench,pbmc,...] [--kinds trvae,nb] [--seeds 0,1,2,3,4]
                                       [--jobs 2] [--markdown benchmarks/NOVELTY_RULES.md]

A novelty rule changes no latent: it only reads the reference and query latents
and the label calls. So each (split, model, seed) is trained and mapped once,
with fedarches' defaults, in its own process (threads=1; at most --jobs at once),
its latents and classifier probabilities are kept in
benchmarks/work/novelty/<split>/<kind>-s<seed>.npz, and every rule is then
scored on exactly the same cells. A rerun reuses the files it finds.

Rules (all with the reference-calibrated per-label thresholds and class Gaussians
of ``KNNLabelTransfer``; "raw" = the larger of the distance and Gaussian scores):

* ``reference``: raw > 1 (no adaptation to the query);
* ``guard+population``: the rule before this change: raw / g, g the query-shift
  guard, or the median of that over the cell's 15 nearest query cells, if larger;
* ``unlifted``: the default before the population's lift was capped: ``default`` with
  ``query_shift.POPULATION_LIFT`` = infinity (a population could raise any cell's score);
* ``unmixed``: ``default`` without the mixed-call clusters (``query_shift.MIXED_TOP2`` = 0: no
  query cluster counts as mixed), the rule before they were added;
* ``default``: ``KNNLabelTransfer.predict`` as it is now (``labels/query_shift.py``).

Scores per (split, model): known-type accuracy (a known cell called unknown is
wrong), known cells called unknown, and per held-out type the fraction called
unknown and the AUROC of the rule's score; mean, sd and worst over seeds.
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
sys.path.insert(0, str(HERE))
WORK = HERE / "work" / "novelty"
SPLITS = ("cellbench", "pbmc", "pbmc-cd16", "sim-technical", "sim-state", "sim-state-strong")
RULES = ("reference", "guard+population", "unlifted", "unmixed", "default")


def _npz(split: str, kind: str, seed: int) -> Path:
    return WORK / split / f"{kind}-s{seed}.npz"


# ------------------------------------------------------------------ one run
def run_one(split_name: str, kind: str, seed: int) -> None:
    """Train + map with defaults; keep what every rule needs."""
    import numpy as np
    import torch

    import anndata as ad

    import prep
    from fedarches.config import MapSettings, TrainConfig
    from fedarches.model import LATENT_KEY, FedArchesModel

    torch.set_num_threads(1)
    split = prep.quality_splits()[split_name]
    # the quality section's files: genes chosen on the reference, simulated cells drawn with the seed
    data = WORK / "data" / split_name / (f"seed{seed}" if prep.is_simulated(split) else "data") / kind
    meta = prep.prepare_quality(split, seed, data)
    ref, query = ad.read_h5ad(meta["ref"]), ad.read_h5ad(meta["query"])
    t0 = time.perf_counter()
    model = FedArchesModel.train_reference(ref, "study", "cell_type", kind=kind,  # type: ignore[arg-type]
                                           n_genes=2000, train=TrainConfig(seed=seed, threads=1), progress=False)
    mapped = model.map_query(query, "study", settings=MapSettings(seed=seed, threads=1))
    z_q = np.asarray(mapped.adata.obsm[LATENT_KEY])
    p_q = mapped.model._classifier_probabilities(z_q)
    out = _npz(split_name, kind, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.npz")
    np.savez(tmp, z_ref0=model.reference.latent.astype("f4"), z_q=z_q.astype("f4"),
             ref_codes=model.reference.labels, cats=np.array(model.reference.categories, dtype=str),
             ref_batches=ref.obs["study"].astype(str).to_numpy().astype(str),
             q_labels=query.obs["cell_type"].astype(str).to_numpy().astype(str),
             p_q=p_q if p_q is not None else np.zeros(0), seconds=time.perf_counter() - t0)
    os.replace(tmp, out)


def run_all(todo: list[tuple[str, str, int]], n_parallel: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "NUMBA_NUM_THREADS": "1"}
    queue = [j for j in todo if not _npz(*j).exists()]
    running: list[tuple[tuple[str, str, int], subprocess.Popen[bytes]]] = []
    while queue or running:
        while queue and len(running) < n_parallel:
            job = queue.pop(0)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--one", job[0], job[1], str(job[2])]
            running.append((job, subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)))
        time.sleep(1.0)
        for item in list(running):
            job, proc = item
            if proc.poll() is not None:
                running.remove(item)
                print(f"{'FAILED' if proc.returncode else 'done'} {job}", flush=True)


# ------------------------------------------------------------------ rules
def _auroc(score: Any, pos: Any, neg: Any) -> float:
    from sklearn.metrics import roc_auc_score
    import numpy as np

    return float(roc_auc_score(np.r_[np.zeros(neg.sum()), np.ones(pos.sum())], np.r_[score[neg], score[pos]]))


def score_rules(path: Path) -> dict[str, dict[str, Any]]:
    import numpy as np

    from fedarches.labels import KNNLabelTransfer
    from fedarches.labels import query_shift
    from fedarches.labels.query_shift import neighbourhood_median, shift_factors

    d = np.load(path, allow_pickle=False)
    cats = [str(c) for c in d["cats"]]
    lt = KNNLabelTransfer(workers=1).fit(d["z_ref0"], d["ref_codes"], ref_batches=d["ref_batches"],
                                         label_categories=cats)
    probs = d["p_q"] if d["p_q"].size else None
    res = lt.predict(d["z_q"], classifier_probabilities=probs)
    lift, query_shift.POPULATION_LIFT = query_shift.POPULATION_LIFT, float("inf")
    try:
        unlifted = lt.predict(d["z_q"], classifier_probabilities=probs)
    finally:
        query_shift.POPULATION_LIFT = lift
    top2, query_shift.MIXED_TOP2 = query_shift.MIXED_TOP2, 0.0
    try:
        unmixed = lt.predict(d["z_q"], classifier_probabilities=probs)
    finally:
        query_shift.MIXED_TOP2 = top2
    uncertain = res.uncertainty > lt.uncertainty_threshold
    raw = np.maximum(res.distance_score, res.gaussian_score).astype(np.float64)
    study = np.zeros(len(raw), dtype=np.int64)
    g = shift_factors(raw, study, lt.reference_median_score)
    old = np.maximum(raw / g, neighbourhood_median(d["z_q"], raw / g, study))
    calls = {"reference": raw, "guard+population": old, "unlifted": unlifted.novelty_score.astype(np.float64),
             "unmixed": unmixed.novelty_score.astype(np.float64),
             "default": res.novelty_score.astype(np.float64)}
    labels = d["q_labels"].astype(str)
    known = np.isin(labels, cats)
    held = sorted(set(labels) - set(cats))
    out = {}
    for rule, s in calls.items():
        unknown = {"default": res.is_unknown, "unlifted": unlifted.is_unknown, "unmixed": unmixed.is_unknown}.get(rule, (s > 1.0) | uncertain)
        correct = (res.knn_prediction.astype(str) == labels) & ~unknown
        out[rule] = {"accuracy_known": float(correct[known].mean()), "known_called_unknown": float(unknown[known].mean()),
                     "held_out": {h: {"called_unknown": float(unknown[labels == h].mean()),
                                      "auroc": _auroc(s, labels == h, known)} for h in held}}
    return out


def _stat(values: list[float], worst: str) -> str:
    import numpy as np

    v = np.asarray(values)
    w = v.min() if worst == "min" else v.max()
    return f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f} ({w:.3f})"


def report(scores: dict[tuple[str, str], list[dict[str, Any]]]) -> list[str]:
    lines = ["| split | model | seeds | rule | known-type accuracy | known called unknown | held-out: called unknown / AUROC |",
             "|---|---|---|---|---|---|---|"]
    for (split, kind), runs in scores.items():
        for rule in RULES:
            rows = [r[rule] for r in runs]
            held = sorted(rows[0]["held_out"])
            ho = "; ".join(f"{h}: {_stat([r['held_out'][h]['called_unknown'] for r in rows], 'min')} / "
                           f"{_stat([r['held_out'][h]['auroc'] for r in rows], 'min')}" for h in held)
            lines.append(f"| {split} | {kind} | {len(rows)} | {rule} | "
                         f"{_stat([r['accuracy_known'] for r in rows], 'min')} | "
                         f"{_stat([r['known_called_unknown'] for r in rows], 'max')} | {ho} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", nargs=3, metavar=("SPLIT", "KIND", "SEED"), help=argparse.SUPPRESS)
    p.add_argument("--splits", default=",".join(SPLITS))
    p.add_argument("--kinds", default="trvae,nb")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    a = p.parse_args(argv)
    if a.one:
        run_one(a.one[0], a.one[1], int(a.one[2]))
        return 0
    todo = [(s, k, int(sd)) for sd in a.seeds.split(",") for s in a.splits.split(",") for k in a.kinds.split(",")]
    t0 = time.time()
    run_all(todo, a.jobs)
    scores: dict[tuple[str, str], list[dict[str, Any]]] = {}
    missing = []
    for split, kind, seed in todo:
        path = _npz(split, kind, seed)
        if path.exists():
            scores.setdefault((split, kind), []).append(score_rules(path))
        else:
            missing.append(f"{split}/{kind}-s{seed}")
    head = ["# Unknown-cell rules on the same latents", "",
            f"`python benchmarks/novelty_rules.py --splits {a.splits} --kinds {a.kinds} --seeds {a.seeds}` "
            f"on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {(time.time() - t0) / 60:.1f} min "
            "(latents reused where benchmarks/work/novelty already held them). Each cell: mean ± sd over seeds "
            "(worst seed).", ""]
    if missing:
        head += [f"Not measured (training failed or not run): {', '.join(missing)}", ""]
    text = "\n".join(head + report(scores)) + "\n"
    print(text)
    if a.markdown:
        Path(a.markdown).write_text(text)
    (WORK / "scores.json").write_text(json.dumps({f"{s}/{k}": v for (s, k), v in scores.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
