"""`fedarches train-reference | map | embed`: thin wrappers over FedArchesModel."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from fedarches.config import STRATEGIES, TrainConfig
from fedarches.data.io import read_h5ad
from fedarches.errors import InputDataError


def _check_out_dir(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputDataError(f"--out {out} exists and is not a directory")
    return out


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layer", default=None, help="read counts from this layer instead of .X")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-reference", help="train a reference model on one or more studies")
    p.add_argument("--data", required=True, help="reference .h5ad with raw counts")
    p.add_argument("--condition-key", required=True, help="obs column with the study / batch")
    p.add_argument("--label-key", default=None, help="obs column with cell types (enables label transfer)")
    p.add_argument("--model", choices=["trvae", "nb"], default="trvae")
    p.add_argument("--n-genes", type=int, default=2000, help="highly variable genes to keep (0 = all)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--out", required=True, help="model directory to write")
    _common(p)
    p.set_defaults(func=cmd_train_reference)

    p = sub.add_parser("map", help="map a query study onto a model by architecture surgery")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--data", required=True, help="query .h5ad with raw counts")
    p.add_argument("--condition-key", required=True)
    p.add_argument("--strategy", choices=list(STRATEGIES), default="conditions")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--out", required=True, help="output directory (query.h5ad, model/, report.json)")
    _common(p)
    p.set_defaults(func=cmd_map)

    p = sub.add_parser("embed", help="latent and labels for cells of conditions the model holds")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--condition-key", required=True)
    p.add_argument("--out", required=True, help="output .h5ad")
    p.add_argument("--layer", default=None)
    p.set_defaults(func=cmd_embed)


def cmd_train_reference(args: argparse.Namespace) -> int:
    from fedarches.model import FedArchesModel

    out = _check_out_dir(args.out)
    adata = read_h5ad(args.data)
    cfg = TrainConfig(epochs=args.epochs, seed=args.seed, threads=args.threads)
    model = FedArchesModel.train_reference(
        adata, args.condition_key, args.label_key, kind=args.model, n_genes=args.n_genes,
        layer=args.layer, train=cfg, progress=not args.quiet,
    )
    model.save(out)
    h = model.last_history
    print(f"reference model ({args.model}, {len(model.genes)} genes, {len(model.conditions)} conditions, "
          f"{h.epochs if h else '?'} epochs) written to {out}")
    return 0


def cmd_map(args: argparse.Namespace) -> int:
    from fedarches.model import FedArchesModel

    out = _check_out_dir(args.out)
    model = FedArchesModel.load(args.model)
    adata = read_h5ad(args.data)
    res = model.map_query(adata, args.condition_key, strategy=args.strategy, epochs=args.epochs,
                          seed=args.seed, layer=args.layer, threads=args.threads, progress=not args.quiet)
    out.mkdir(parents=True, exist_ok=True)
    res.model.save(out / "model")
    _write_h5ad_atomic(res.adata, out / "query.h5ad")
    (out / "report.json").write_text(json.dumps(res.report, indent=2) + "\n")
    r = res.report
    print(f"mapped {r['n_cells']} cells ({', '.join(r['new_conditions'])}) with strategy {r['strategy']}: "
          f"{r['trainable_parameters']} trainable of {r['total_parameters']} parameters, {r['epochs']} epochs, "
          f"{r['seconds']:.1f} s -> {out}")
    if "label_transfer" in r:
        lt = r["label_transfer"]
        if lt.get("accuracy_known") is not None:
            print(f"label transfer accuracy on known types: {lt['accuracy_known']:.3f}")
        if lt.get("unseen_called_unknown") is not None:
            print(f"cells of types absent from the reference called unknown: {lt['unseen_called_unknown']:.3f}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from fedarches.model import FedArchesModel

    model = FedArchesModel.load(args.model)
    adata = read_h5ad(args.data)
    out = model.embed(adata, args.condition_key, layer=args.layer)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    _write_h5ad_atomic(out, Path(args.out))
    print(f"embedded {out.n_obs} cells -> {args.out}")
    return 0


def _write_h5ad_atomic(adata, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    adata.write_h5ad(tmp, compression="gzip")
    os.replace(tmp, path)
