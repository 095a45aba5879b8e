"""Federated reference building (`fedarches atlas build-federated`) beside the centralized
`atlas build`, on the same studies and the same genes (the federated gene choice equals the
pooled one: tests/test_federated_reference_genes.py).

For each split: the reference studies go to sites (CellBench: one study per site, 3 sites;
PBMC: one chemistry per site, 2 sites; generated ``gen-iid`` / ``gen-noniid``: one study per
site, 5 sites, see `generated`), the build runs in a Flower simulation, version 1 is
exported, and the held-out query is mapped onto it exactly as onto the centralized model
(``map_query``, same seed and epochs). Reported: known-type accuracy and held-out detection of
that mapping, kNN purity and EBM of the query latent, rounds x local epochs, bytes per site
per round (each direction), wall time, and the 1-minute load average beside each time.

    PYTHONPATH=src FEDARCHES_DATA=../shared/data FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \
      RAY_USAGE_STATS_ENABLED=0 .venv/bin/python benchmarks/federated_reference.py \
      --splits cellbench,pbmc --models trvae,nb --rounds 40 --local-epochs 5 --work /tmp/fedref-bench
    ... --splits gen-iid,gen-noniid --models trvae --n-genes 500 --rounds 30 --local-epochs 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import tomli_w

from fedarches.config import TrainConfig
from fedarches.data.simulate import cell_type_names, simulate, study_names
from fedarches.data.splits import CELLBENCH, PBMC_HOLDOUT, Split
from fedarches.format.signing import keygen
from fedarches.mapping import write_h5ad
from fedarches.metrics import entropy_batch_mixing, knn_purity
from fedarches.model import LATENT_KEY, FedArchesModel
from fedarches.server import Atlas

SPLITS: dict[str, Split] = {"cellbench": CELLBENCH, "cellbench2": CELLBENCH, "pbmc": PBMC_HOLDOUT}
#: which reference studies each site holds (default: one study per site). "cellbench2": two
#: studies at one site, so trVAE's MMD among a site's own studies has something to compare.
LAYOUTS: dict[str, list[list[str]]] = {"cellbench2": [["CELseq2_3cl", "Dropseq_3cl"], ["CELseq2_5cl_p1"]]}
#: generated 5-site regimes: how many of the reference's known types each site misses
GENERATED: dict[str, int] = {"gen-iid": 0, "gen-noniid": 2}
GEN_SITES, GEN_QUERY, GEN_CELLS_PER_STUDY, GEN_GENES, GEN_TYPES = 5, 2, 600, 1000, 6


def generated(name: str, seed: int) -> tuple[Split, object, object]:
    """Simulated studies (``data.simulate``): 5 reference studies, one per site, and 2 query
    studies; the last type is in no reference study (held-out detection). "gen-iid": every site
    holds every other type; "gen-noniid": site i misses ``GENERATED[name]`` of them in turn
    (types i, i+1, ... mod 5), so each known type is at 3 of the 5 sites."""
    studies, types = study_names(GEN_SITES + GEN_QUERY), cell_type_names(GEN_TYPES)
    known, novel = types[:-1], types[-1]
    missing = GENERATED[name]
    held_out = {st: [novel, *(known[(i + j) % len(known)] for j in range(missing))]
                for i, st in enumerate(studies[:GEN_SITES])}
    adata = simulate(n_cells=GEN_CELLS_PER_STUDY * len(studies), n_genes=GEN_GENES, n_cell_types=GEN_TYPES,
                     n_studies=len(studies), held_out=held_out, seed=seed)
    split = Split(name=name, file="", reference_studies=tuple(studies[:GEN_SITES]),
                  query_studies=tuple(studies[GEN_SITES:]), held_out_types=(novel,))
    return (split, *split.apply(adata))


def rounds_to_converge(losses: list[float], tol: float = 0.01) -> int | None:
    """The first round after which the mean training loss changes by less than ``tol``
    (relative) in every later round; None when it still does in the last round."""
    if any(v is None for v in losses):
        return None
    steady = [abs(b - a) <= tol * abs(a) for a, b in zip(losses, losses[1:])]
    if not steady or not steady[-1]:
        return None
    k = len(steady)
    while k and steady[k - 1]:
        k -= 1
    return k + 1


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _scores(model: FedArchesModel, query, split: Split, seed: int, query_epochs: int | None) -> dict:
    res = model.map_query(query, split.study_key, seed=seed, threads=1, progress=False, epochs=query_epochs)
    lt = res.report.label_transfer
    z = res.adata.obsm[LATENT_KEY]
    labels = query.obs[split.label_key].astype(str).to_numpy()
    return {"accuracy_known": lt.accuracy_known, "heldout_detected": lt.unseen_called_unknown,
            "known_called_unknown": lt.known_called_unknown,
            "knn_purity": float(knn_purity(z, labels)),
            "ebm": float(entropy_batch_mixing(z, query.obs[split.study_key].astype(str).to_numpy()))}


def centralized(ref, query, split: Split, kind: str, n_genes: int, seed: int, query_epochs: int | None) -> dict:
    t0, load = time.perf_counter(), _load()
    model = FedArchesModel.train_reference(ref, split.study_key, split.label_key, kind=kind, n_genes=n_genes,
                                           train=TrainConfig(seed=seed, threads=1), progress=False,
                                           label_knowledge="summaries")
    seconds = time.perf_counter() - t0
    out = _scores(model, query, split, seed, query_epochs)
    return {**out, "epochs": model.last_history.epochs, "seconds": round(seconds, 1), "load": load,
            "genes": model.genes}


def federated(ref, query, split: Split, kind: str, n_genes: int, seed: int, rounds: int, local_epochs: int,
              work: Path, query_epochs: int | None, groups: list[list[str]] | None = None, **settings) -> dict:
    from fedarches.federation.reference_run_config import ReferenceRunConfig
    from fedarches.federation.reference_simulation import build_federated

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    atlas = Atlas.init(work / "atlas", f"bench-{split.name}")
    tables = []
    for i, studies in enumerate(groups or [[s] for s in split.reference_studies]):
        d = work / f"site-{i}"
        d.mkdir()
        write_h5ad(ref[ref.obs[split.study_key].astype(str).isin(studies).to_numpy()].copy(), d / "data.h5ad")
        keys = keygen(d / "keys")
        atlas.enroll(f"site-{i}", keys.public)
        tables.append({"site": f"site-{i}", "data": str(d / "data.h5ad"), "condition-key": split.study_key,
                       "key-dir": str(d / "keys"), "out-dir": str(d / "results")})
    (work / "sites.toml").write_text(tomli_w.dumps({"site": tables}))
    cfg = ReferenceRunConfig.from_run_config({
        "atlas-dir": str(atlas.path), "label-key": split.label_key, "model": kind, "rounds": rounds,
        "local-epochs": local_epochs, "n-genes": n_genes, "seed": seed, "min-sites": len(tables),
        **{k.replace("_", "-"): v for k, v in settings.items()}})
    t0, load = time.perf_counter(), _load()
    report = build_federated(cfg, work / "sites.toml")
    seconds = time.perf_counter() - t0
    model = FedArchesModel.load(atlas.export_model(1, work / "v1"))
    out = _scores(model, query, split, seed, query_epochs)
    per_round = report["rounds"]
    up = [b for r in per_round for b in r["bytes_up"].values()]
    return {**out, "epochs": rounds * local_epochs, "rounds": rounds, "local_epochs": local_epochs,
            "seconds": round(seconds, 1), "load": load, "bytes_down_per_site_round": per_round[0]["bytes_down"],
            "bytes_up_per_site_round": int(np.mean(up)), "sites": len(tables), "genes": model.genes,
            "loss_by_round": [r["loss"] for r in per_round],
            "rounds_to_converge": rounds_to_converge([r["loss"] for r in per_round]), **settings}


def _f(v, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and v != v) else f"{v:.{digits}f}"


def table(rows: list[dict]) -> str:
    """The markdown table of benchmarks/FEDERATED_REFERENCE.md; deltas against the centralized
    row of the same split, model and seed."""
    head = ("| split | model | build | epochs (rounds x E) | accuracy known | held-out detected | kNN purity | EBM "
            "| d acc | d det | d purity | d EBM | KiB per site per round (down / up) | wall s (load) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    central = {(r["split"], r["model"], r.get("seed")): r for r in rows if r["build"] == "centralized"}
    for r in rows:
        c = central.get((r["split"], r["model"], r.get("seed")), r)
        fed = r["build"] != "centralized"
        d = [_f(r[k] - c[k]) if fed and r[k] is not None and c[k] is not None else "" for k in
             ("accuracy_known", "heldout_detected", "knn_purity", "ebm")]
        ep = f"{r['epochs']} ({r['rounds']} x {r['local_epochs']})" if fed else f"{r['epochs']} (early stop)"
        steady = rounds_to_converge(r.get("loss_by_round") or []) if fed else None
        if steady:
            ep += f"; loss steady from round {steady}"
        kib = f"{r['bytes_down_per_site_round'] / 1024:.0f} / {r['bytes_up_per_site_round'] / 1024:.0f}" if fed else ""
        name = r["split"] + (f" (seed {r['seed']})" if "seed" in r else "")
        lines.append(f"| {name} | {r['model']} | {r['build']} | {ep} | {_f(r['accuracy_known'])} | "
                     f"{_f(r['heldout_detected'])} | {_f(r['knn_purity'])} | {_f(r['ebm'])} | {' | '.join(d)} | {kib} | "
                     f"{r['seconds']} ({r['load']}) |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--splits", default="cellbench,pbmc")
    p.add_argument("--models", default="trvae,nb")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--local-epochs", type=int, default=5)
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--query-epochs", type=int, default=None)
    p.add_argument("--variants", default="default",
                   help="comma list of federated variants: default, mmd-local, mmd-none, mmd-rff, bn-local, fedprox, "
                        "site-calibration, mmd-rff-site-calibration, site-gaussians, pooled-gaussians, refit-rows, "
                        "trained-rows, site-gaussians-trained-rows")
    p.add_argument("--work", type=Path, default=Path("/tmp/fedref-bench"))
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    p.add_argument("--render", type=Path, default=None,
                   help="print the markdown table of the JSON rows in this file (a --out file or this script's "
                        "output, one JSON row per line) and exit")
    args = p.parse_args()
    if args.render:
        text = args.render.read_text()
        rows = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.startswith("{")]
        print(table(rows))
        return
    variants = {"default": {}, "mmd-local": {"mmd": "local"}, "mmd-none": {"mmd": "none"}, "mmd-rff": {"mmd": "rff"}, "bn-local": {"bn": "local"},
                "fedprox": {"strategy": "fedprox"}, "site-calibration": {"calibration": "site"}, "cross-site-calibration": {"calibration": "cross-site"},
                "mmd-rff-site-calibration": {"mmd": "rff", "calibration": "site"}, "default-nb": {},
                "site-gaussians": {"gaussians": "site"}, "pooled-gaussians": {"gaussians": "pooled"},
                "refit-rows": {"final_rows": "refit"}, "trained-rows": {"final_rows": "trained"},
                "site-gaussians-trained-rows": {"gaussians": "site", "final_rows": "trained"}}
    rows = []
    for name in args.splits.split(","):
        if name in GENERATED:
            split, ref, query = generated(name, args.seed)
        else:
            split = SPLITS[name]
            ref, query = split.load(Path(os.environ.get("FEDARCHES_DATA", "../shared/data")) / split.file)
        for kind in args.models.split(","):
            c = centralized(ref, query, split, kind, args.n_genes, args.seed, args.query_epochs)
            rows.append({"split": name, "model": kind, "build": "centralized", "seed": args.seed, **c})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "genes"}), flush=True)
            for v in args.variants.split(","):
                if (v.startswith("mmd-") and kind != "trvae") or (v in ("bn-local", "default-nb") and kind != "nb"):
                    continue
                f = federated(ref, query, split, kind, args.n_genes, args.seed, args.rounds, args.local_epochs,
                              args.work / f"{name}-{kind}-{v}", args.query_epochs, LAYOUTS.get(name),
                              **variants[v])
                f["same_genes"] = f.pop("genes") == c["genes"]
                rows.append({"split": name, "model": kind, "build": f"federated/{v}", "seed": args.seed, **f})
                print(json.dumps(rows[-1]), flush=True)
            c.pop("genes", None)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
