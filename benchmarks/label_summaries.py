"""Label knowledge as class summaries vs per-cell reference latents (issue 9), side by side.

    python benchmarks/label_summaries.py [--seeds 0,1,2] [--splits cellbench,pbmc] [--models nb,trvae]
                                         [--latents-only] [--table-only] [--calibration C]

Both rules are scored on the SAME latents: per (split, model, seed) one reference is
trained (threads=1) and the query mapped once; the reference latent, its labels and
studies, the query latent and the reference classifier's p(label | z) on the query are
cached in benchmarks/work/label_summaries/ (a rerun reuses them). Then the per-cell
path (``KNNLabelTransfer`` fitted on the reference cells) and the summaries path
(``ClassSummaries`` fitted on the same cells, predicting from the summaries alone)
label the query, both with the classifier making the call and with the query-shift
guard (one guard for the whole query, as ``fedarches map`` does). Printed: known-type
accuracy (unknown = wrong), known cells called unknown (false alarms) and the
held-out type called unknown, mean / sd / worst seed, and the summaries-minus-cells
difference of the worst seed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
WORK = HERE / "work" / "label_summaries"
DATA = Path(os.environ.get("FEDARCHES_DATA", "/work/shared/data"))
SPLITS = ("cellbench", "pbmc")
MODELS = ("nb", "trvae")


def _latents_path(split: str, kind: str, seed: int) -> Path:
    return WORK / f"{split}-{kind}-s{seed}.npz"


def make_latents(split_name: str, kind: str, seed: int) -> Path:
    """Train the reference, map the query, cache what both label rules need."""
    import torch

    from fedarches.config import TrainConfig
    from fedarches.data.splits import QUALITY_SPLITS
    from fedarches.model import LATENT_KEY, FedArchesModel

    path = _latents_path(split_name, kind, seed)
    if path.exists():
        return path
    torch.set_num_threads(1)
    split = QUALITY_SPLITS[split_name]
    ref, query = split.load(DATA / split.file)  # type: ignore[union-attr]
    model = FedArchesModel.train_reference(ref, "study", "cell_type", kind=kind,  # type: ignore[arg-type]
                                           train=TrainConfig(seed=seed, threads=1), progress=False,
                                           label_knowledge="cells")
    mapped = model.map_query(query, "study", seed=seed, threads=1, progress=False)
    z_q = np.asarray(mapped.adata.obsm[LATENT_KEY], dtype=np.float32)
    probs = mapped.model._classifier_probabilities(z_q)
    assert model.reference is not None
    WORK.mkdir(parents=True, exist_ok=True)
    np.savez(path, z_ref=model.reference.latent, ref_labels=np.asarray(model.reference.categories)[
        model.reference.labels].astype(str), ref_studies=ref.obs["study"].astype(str).to_numpy().astype(str),
        z_q=z_q, q_labels=query.obs["cell_type"].astype(str).to_numpy().astype(str),
        categories=np.asarray(model.reference.categories), probs=probs if probs is not None else np.zeros((0, 0)))
    return path


def _scores(pred: np.ndarray, unknown: np.ndarray, truth: np.ndarray, known_types: list[str]) -> dict[str, float]:
    known = np.isin(truth, known_types)
    return {"accuracy": float((pred[known] == truth[known]).mean()),
            "false_alarms": float(unknown[known].mean()),
            "detection": float(unknown[~known].mean()) if (~known).any() else float("nan")}


def evaluate(path: Path, **summary_options: Any) -> dict[str, dict[str, float]]:
    """Both label rules on one cached set of latents."""
    from fedarches.labels import KNNLabelTransfer
    from fedarches.labels.summaries import ClassSummaries

    f = np.load(path, allow_pickle=False)
    cats = [str(c) for c in f["categories"]]
    probs = f["probs"] if f["probs"].size else None
    out: dict[str, dict[str, float]] = {}
    t = time.perf_counter()
    cells = KNNLabelTransfer(workers=1).fit(f["z_ref"], f["ref_labels"], ref_batches=f["ref_studies"],
                                            label_categories=cats)
    res = cells.predict(f["z_q"], classifier_probabilities=probs)
    out["cells"] = {**_scores(res.prediction.astype(str), res.is_unknown, f["q_labels"], cats),
                    "seconds": time.perf_counter() - t}
    t = time.perf_counter()
    summ = ClassSummaries.fit(f["z_ref"], f["ref_labels"], ref_batches=f["ref_studies"], label_categories=cats,
                              **summary_options)
    summ = ClassSummaries.from_state(summ.state(), cats)  # predict from what is published, nothing else
    res = summ.predict(f["z_q"], classifier_probabilities=probs)
    out["summaries"] = {**_scores(res.prediction.astype(str), res.is_unknown, f["q_labels"], cats),
                        "seconds": time.perf_counter() - t, "components": float(summ.n_components)}
    if probs is not None:  # the generative rule alone (what a label the classifier lacks gets)
        res = summ.predict(f["z_q"])
        out["summaries, generative"] = _scores(res.prediction.astype(str), res.is_unknown, f["q_labels"], cats)
    return out


def scale(n_query: int, n_reference: int, workers: int, seed: int = 0) -> dict[str, float]:
    """Fit on ``n_reference`` and label ``n_query`` synthetic 10-d cells (6 types, each spread along 3
    of the 10 dimensions as a VAE latent is along a few, 3 studies with a small offset, a seventh
    type only in the query) from the summaries alone."""
    from fedarches.labels.summaries import ClassSummaries

    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(7, 10))
    scales = np.concatenate([rng.uniform(0.6, 1.2, size=(7, 3)), rng.uniform(0.05, 0.15, size=(7, 7))], axis=1)
    scales = np.take_along_axis(scales, np.argsort(rng.random((7, 10)), axis=1), axis=1)

    def draw(n: int, types: int, offset: float) -> tuple[np.ndarray, np.ndarray]:
        t = rng.integers(0, types, size=n)
        return (centres[t] + rng.normal(size=(n, 10)) * scales[t] + offset).astype(np.float32), t

    z_ref, t_ref = draw(n_reference, 6, 0.0)
    studies = rng.integers(0, 3, size=n_reference)
    z_ref += (studies[:, None] * 0.1).astype(np.float32)
    z_q, t_q = draw(n_query, 7, 0.05)
    t0 = time.perf_counter()
    summ = ClassSummaries.fit(z_ref, t_ref.astype(str), ref_batches=studies.astype(str), workers=workers)
    t1, c1 = time.perf_counter(), time.process_time()
    res = summ.predict(z_q)
    t2, c2 = time.perf_counter(), time.process_time()
    summ.predict(z_q, adapt_to_query=False)  # the same without the query-shift guard and population statistic
    t3, c3 = time.perf_counter(), time.process_time()
    new = t_q == 6
    return {"fit_s": t1 - t0, "predict_s": t2 - t1, "predict_cpu_s": c2 - c1,
            "predict_without_population_statistic_s": t3 - t2, "its_cpu_s": c3 - c2, "load_1min": os.getloadavg()[0],
            "components": float(summ.n_components), "new_called_unknown": float(res.is_unknown[new].mean()),
            "known_called_unknown": float(res.is_unknown[~new].mean())}


def table(records: dict[tuple[str, str, int], dict[str, dict[str, float]]]) -> list[str]:
    lines = ["| split | model | rule | seeds | known accuracy mean (sd) worst | false alarms mean (sd) worst "
             "| held-out called unknown mean (sd) worst |", "|---|---|---|---|---|---|---|"]
    keys = sorted({(s, k) for s, k, _ in records})
    for split, kind in keys:
        runs = [v for (s, k, _), v in sorted(records.items()) if (s, k) == (split, kind)]
        for rule in runs[0]:
            cells = []
            for metric, worst in (("accuracy", min), ("false_alarms", max), ("detection", min)):
                vals = np.array([r[rule][metric] for r in runs])
                cells.append(f"{vals.mean():.3f} ({vals.std():.3f}) {worst(vals):.3f}")
            lines.append(f"| {split} | {kind} | {rule} | {len(runs)} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--splits", default=",".join(SPLITS))
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--latents-only", action="store_true", help="train and cache the latents, score nothing")
    p.add_argument("--table-only", action="store_true", help="score cached latents only, train nothing")
    p.add_argument("--scale", type=int, default=0, metavar="N",
                   help="instead: time fit + predict of N synthetic query cells on N reference cells")
    p.add_argument("--workers", type=int, default=2, help="threads of the query-neighbour search (--scale)")
    p.add_argument("--calibration", default="in-sample",
                   help="the summaries' distance calibration (labels.summaries.CALIBRATIONS)")
    args = p.parse_args(argv)
    from fedarches.labels.summaries import SummaryOptions

    if args.scale:
        print({k: round(v, 3) for k, v in scale(args.scale, args.scale, args.workers).items()})
        return 0
    seeds = [int(s) for s in args.seeds.split(",")]
    records: dict[tuple[str, str, int], dict[str, dict[str, float]]] = {}
    for seed in seeds:
        for split in args.splits.split(","):
            for kind in args.models.split(","):
                path = _latents_path(split, kind, seed)
                if not args.table_only:
                    t = time.perf_counter()
                    make_latents(split, kind, seed)
                    print(f"latents {split} {kind} seed {seed}: {time.perf_counter() - t:.0f} s", flush=True,
                          file=sys.stderr)
                if args.latents_only or not path.exists():
                    continue
                records[(split, kind, seed)] = evaluate(path, options=SummaryOptions(calibration=args.calibration))
    if records:
        print("\n".join(table(records)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
