"""Reference mapping with an unseen cell type (the scArches paper's hold-out design).

Reference = CELseq2_3cl, Dropseq_3cl, CELseq2_5cl_p1 without A549; query =
CELseq2_5cl_p2, CELseq2_5cl_p3. Prints label-transfer accuracy on known types and
the fraction of A549 cells called unknown, for both models with default settings.

    .venv/bin/python examples/cellbench_holdout.py [--data ../shared/data/cellbench_lung_celllines.h5ad]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedarches.config import TrainConfig
from fedarches.data.splits import cellbench_holdout
from fedarches.model import FedArchesModel

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "cellbench_lung_celllines.h5ad"


def run(path: Path, kind: str, seed: int = 0, threads: int | None = None, progress: bool = True) -> dict:
    ref, query = cellbench_holdout(path)
    model = FedArchesModel.train_reference(ref, "study", "cell_type", kind=kind,
                                           train=TrainConfig(seed=seed, threads=threads), progress=progress)
    res = model.map_query(query, "study", seed=seed, threads=threads, progress=progress)
    lt = res.report.label_transfer
    return {
        "model": kind,
        "reference_epochs": model.last_history.epochs if model.last_history else None,
        "query_epochs": res.report.epochs,
        "accuracy_known": lt.accuracy_known,
        "a549_called_unknown": lt.unseen_called_unknown,
        "known_called_unknown": lt.known_called_unknown,
        "trainable_parameters": res.report.trainable_parameters,
        "query_seconds": res.report.seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT)
    p.add_argument("--model", choices=["trvae", "nb", "both"], default="both")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    kinds = ["trvae", "nb"] if args.model == "both" else [args.model]
    for kind in kinds:
        print(json.dumps(run(args.data, kind, args.seed)))


if __name__ == "__main__":
    main()
