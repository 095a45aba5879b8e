"""Scores of the quality section (runs in fedarches' venv), computed the same way
for every tool, rule, split and seed.

A rule turns a tool's output into, per query cell, a prediction, an unknown call
and a score (higher = more likely a type the reference lacks):

- ``own``: the tool's own labels. fedarches: what ``map_query`` wrote into obs
  (``<label>_pred`` / ``_unknown`` / ``_novelty``); SCANVI: its classifier,
  unknown only where the max probability < 0.5, score 1 - max probability.
  Tools without a classifier (SCVI, TRVAE) have no own rule.
- ``paper-knn``: the scArches paper's kNN (k=50) on the tool's latent: the
  argmax label, unknown where the uncertainty > 0.5, score = uncertainty.
- ``fedarches-rule``: ``fedarches.labels.KNNLabelTransfer`` (its current default
  novelty rule) on the tool's latent: prediction / is_unknown / novelty_score.

Both kNN rules come from the installed fedarches library, so a rule change in
src/ shows up here without touching the benchmark.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

RULES = ("own", "paper-knn", "fedarches-rule")
PAPER_K = 50
PAPER_UNCERTAINTY = 0.5
SCANVI_MIN_PROBABILITY = 0.5
# metric -> which direction is worse over seeds
WORSE = {"accuracy_known": "min", "known_called_unknown": "max", "called_unknown": "min", "auroc": "min"}

Calls = tuple[np.ndarray, np.ndarray, np.ndarray]  # prediction (str), is_unknown (bool), score (float)


def own_calls(tool_dir: Path) -> Calls | None:
    """The tool's own labels from its ``own_labels.npz``; None when it has none."""
    f = Path(tool_dir) / "own_labels.npz"
    if not f.exists():
        return None
    d = np.load(f, allow_pickle=False)
    pred = np.asarray(d["prediction"]).astype(str)
    if "max_probability" in d:  # a classifier (SCANVI)
        p = np.asarray(d["max_probability"], dtype=np.float64)
        return pred, p < SCANVI_MIN_PROBABILITY, 1.0 - p
    return pred, np.asarray(d["is_unknown"], dtype=bool), np.asarray(d["novelty"], dtype=np.float64)


def knn_calls(z_ref: np.ndarray, ref_labels: np.ndarray, ref_batches: np.ndarray,
              z_query: np.ndarray) -> dict[str, Calls]:
    """Both kNN rules from one fit on the tool's latent."""
    from fedarches.labels import KNNLabelTransfer

    res = KNNLabelTransfer().fit(z_ref, ref_labels, ref_batches=ref_batches, k=PAPER_K).predict(z_query)
    unc = np.asarray(res.uncertainty, dtype=np.float64)
    return {
        "paper-knn": (np.asarray(res.knn_prediction).astype(str), unc > PAPER_UNCERTAINTY, unc),
        "fedarches-rule": (np.asarray(res.prediction).astype(str), np.asarray(res.is_unknown, dtype=bool),
                           np.asarray(res.novelty_score, dtype=np.float64)),
    }


def _auroc(score: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if not positive.any() or not negative.any():
        return None
    m = positive | negative
    s = np.nan_to_num(score[m], nan=0.0, posinf=np.finfo(np.float64).max, neginf=-np.finfo(np.float64).max)
    return float(roc_auc_score(positive[m], s))


def score_calls(calls: Calls, query_labels: np.ndarray, held_out: list[str]) -> dict[str, Any]:
    """Known-type accuracy (a known cell called unknown counts as wrong), known cells
    called unknown, and per held-out type: fraction called unknown and the AUROC of
    the score (that type's cells positive, known-type cells negative)."""
    pred, unknown, score = calls
    labels = np.asarray(query_labels).astype(str)
    known = ~np.isin(labels, held_out)
    correct = (pred == labels) & ~unknown
    out: dict[str, Any] = {
        "accuracy_known": float(correct[known].mean()) if known.any() else None,
        "known_called_unknown": float(unknown[known].mean()) if known.any() else None,
        "n_known": int(known.sum()),
        "heldout": {},
    }
    for t in held_out:
        pos = labels == t
        out["heldout"][t] = {"n": int(pos.sum()),
                             "called_unknown": float(unknown[pos].mean()) if pos.any() else None,
                             "auroc": _auroc(score, pos, known)}
    return out


def score_tool(tool_dir: Path, ref_labels: np.ndarray, ref_batches: np.ndarray, query_labels: np.ndarray,
               held_out: list[str]) -> dict[str, dict]:
    """Every rule that applies to one tool's output in ``tool_dir``."""
    lat = np.load(Path(tool_dir) / "latent.npz", allow_pickle=False)
    rules = knn_calls(lat["reference"], ref_labels, ref_batches, lat["query"])
    own = own_calls(tool_dir)
    if own is not None:
        rules = {"own": own, **rules}
    return {r: score_calls(c, query_labels, held_out) for r, c in rules.items()}


def _stat(values: dict[str, float | None], worse: str) -> dict[str, Any] | None:
    vals = {s: v for s, v in values.items() if v is not None}
    if not vals:
        return None
    x = np.array(list(vals.values()), dtype=np.float64)
    pick = min if worse == "min" else max
    seed = pick(vals, key=lambda s: vals[s])
    return {"mean": float(x.mean()), "sd": float(x.std(ddof=1)) if len(x) > 1 else 0.0,
            "worst": float(vals[seed]), "worst_seed": seed, "n_seeds": len(x)}


def aggregate(per_seed: dict[str, dict[str, dict[str, dict]]]) -> dict[str, dict[str, dict]]:
    """per_seed[seed][tool][rule] = score_calls(...) -> [tool][rule] = mean, sd, worst
    and the worst seed's id per figure (worst = min for accuracy, detection and
    AUROC, max for false alarms)."""
    out: dict[str, dict[str, dict]] = {}
    keys = {(t, r) for s in per_seed.values() for t, rules in s.items() for r in rules}
    for tool, rule in sorted(keys):
        got = {seed: s[tool][rule] for seed, s in per_seed.items() if rule in s.get(tool, {})}
        agg: dict[str, Any] = {m: _stat({s: g[m] for s, g in got.items()}, WORSE[m])
                               for m in ("accuracy_known", "known_called_unknown")}
        types = sorted({t for g in got.values() for t in g["heldout"]})
        agg["heldout"] = {t: {m: _stat({s: g["heldout"].get(t, {}).get(m) for s, g in got.items()}, WORSE[m])
                              for m in ("called_unknown", "auroc")} for t in types}
        out.setdefault(tool, {})[rule] = agg
    return out
