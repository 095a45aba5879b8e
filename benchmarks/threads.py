"""Thread policy benchmark: wall time of the whole `fedarches train-reference` and `fedarches map`
commands at --threads 1, 2 and the default, on an idle machine and beside CPU-bound processes.

    .venv/bin/python benchmarks/threads.py                       # CellBench, both models, 3 repeats
    .venv/bin/python benchmarks/threads.py --datasets cellbench,gen100k --repeats 3

Each command runs as its own process, as a user would run it. "busy" starts ``--competitors``
processes that spin in pure Python (one core each) for the duration of that condition and
stops them by PID. Variant ``api`` imports torch before the CLI, so the CLI cannot choose
OpenMP passive waiting: what a Python-API user whose process already imported torch gets.
Prints one table (median of the repeats, min-max) and the load average; ``--json`` keeps it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

CLI = "import sys; from fedarches.cli import main; sys.exit(main())"
CLI_AFTER_TORCH = "import sys, torch; from fedarches.cli import main; sys.exit(main())"
SPIN = "while True: pass"
# variant -> (--threads value or None, torch imported before the CLI)
VARIANTS = {"1": ("1", False), "2": ("2", False), "default": (None, False),
            "2-api": ("2", True), "default-api": (None, True)}


def prepare(dataset: str, work: Path) -> tuple[Path, Path, dict[str, str]]:
    """Reference and query .h5ad for ``dataset`` and the training options that go with it."""
    ref, query = work / f"{dataset}-ref.h5ad", work / f"{dataset}-query.h5ad"
    if dataset == "cellbench":
        opts = {"condition_key": "study", "label_key": "cell_type", "ref_epochs": "50", "map_epochs": "50"}
    else:  # gen100k: 100k reference cells (4 studies), a 25k-cell query study; few epochs
        opts = {"condition_key": "study", "label_key": "cell_type", "ref_epochs": "2", "map_epochs": "5"}
    if ref.exists() and query.exists():
        return ref, query, opts
    if dataset == "cellbench":
        from fedarches.data.splits import CELLBENCH

        data_dir = Path(os.environ.get("FEDARCHES_DATA", "/work/shared/data"))
        r, q = CELLBENCH.load(data_dir / CELLBENCH.file)
    elif dataset == "gen100k":
        from fedarches.data.simulate import simulate

        adata = simulate(n_cells=125_000, n_genes=2000, n_studies=5, seed=0)
        is_query = (adata.obs["study"].astype(str) == "study_4").to_numpy()
        r, q = adata[~is_query].copy(), adata[is_query].copy()
    else:
        raise SystemExit(f"unknown dataset {dataset!r}: cellbench or gen100k")
    r.write_h5ad(ref)
    q.write_h5ad(query)
    return ref, query, opts


def run_cli(args: list[str], variant: str) -> float:
    threads, after_torch = VARIANTS[variant]
    cmd = [sys.executable, "-c", CLI_AFTER_TORCH if after_torch else CLI, *args, "--quiet"]
    if threads is not None:
        cmd += ["--threads", threads]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def train_args(ref: Path, out: Path, model: str, opts: dict[str, str]) -> list[str]:
    return ["train-reference", "--data", str(ref), "--condition-key", opts["condition_key"], "--label-key",
            opts["label_key"], "--model", model, "--epochs", opts["ref_epochs"], "--out", str(out)]


def map_args(model_dir: Path, query: Path, out: Path, opts: dict[str, str]) -> list[str]:
    return ["map", "--model", str(model_dir), "--data", str(query), "--condition-key", opts["condition_key"],
            "--epochs", opts["map_epochs"], "--out", str(out)]


class Competitors:
    """``n`` CPU-bound processes for the duration of a ``with`` block, stopped by PID."""

    def __init__(self, n: int) -> None:
        self.n, self.procs = n, []  # type: ignore[var-annotated]

    def __enter__(self) -> Competitors:
        self.procs = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(self.n)]
        time.sleep(1.0)
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def measure(a: argparse.Namespace) -> list[dict]:
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for dataset in a.datasets.split(","):
        ref, query, opts = prepare(dataset, work)
        for model in a.models.split(","):
            base = work / f"{dataset}-{model}-base"
            if not (base / "manifest.json").exists():
                run_cli(train_args(ref, base, model, opts), "default")
            for load in a.loads.split(","):
                with Competitors(a.competitors if load == "busy" else 0):
                    load_before = os.getloadavg()[0]
                    variants = a.variants.split(",")
                    times: dict[tuple[str, str], list[float]] = {
                        (v, c): [] for v in variants for c in a.commands.split(",")}
                    for rep in range(a.repeats):  # repeats outermost: a change in outside load hits every variant
                        for (variant, command), ts in times.items():
                            out = work / f"out-{dataset}-{model}-{load}-{variant}-{rep}-{command}"
                            shutil.rmtree(out, ignore_errors=True)
                            args = (train_args(ref, out / "ref", model, opts) if command == "train-reference"
                                    else map_args(base, query, out / "map", opts))
                            ts.append(run_cli(args, variant))
                    for (variant, command), ts in times.items():
                        rows.append({"dataset": dataset, "model": model, "command": command, "load": load,
                                     "variant": variant, "seconds": ts, "median": statistics.median(ts),
                                     "loadavg_1min": round(load_before, 2)})
                        print(f"{dataset:9s} {model:5s} {command:15s} {load:4s} {variant:11s} "
                              f"median {statistics.median(ts):6.2f} s  runs {[round(t, 2) for t in ts]}",
                              flush=True)
    return rows


KNN_VARIANTS = {"1": 1, "2": 2, "default": None}


def measure_knn(a: argparse.Namespace) -> list[dict]:
    """Label transfer alone (fit on ``--knn-cells`` reference cells, predict as many query cells,
    10 latent dimensions, 8 labels, 4 studies), in this process, under ``thread_limits``."""
    import numpy as np

    from fedarches.labels import KNNLabelTransfer
    from fedarches.threads import thread_limits

    rng = np.random.default_rng(0)
    n = a.knn_cells
    centres = rng.normal(scale=3.0, size=(8, 10))
    labels = rng.integers(0, 8, size=2 * n)
    latent = (centres[labels] + rng.normal(size=(2 * n, 10))).astype(np.float32)
    studies = rng.integers(0, 4, size=n).astype(str)
    rows = []
    for load in a.loads.split(","):
        with Competitors(a.competitors if load == "busy" else 0):
            load_before = os.getloadavg()[0]
            for variant, threads in KNN_VARIANTS.items():
                ts = []
                for _ in range(a.repeats):
                    t0 = time.perf_counter()
                    with thread_limits(threads, "inference"):
                        lt = KNNLabelTransfer().fit(latent[:n], labels[:n].astype(str), ref_batches=studies)
                        lt.predict(latent[n:])
                    ts.append(time.perf_counter() - t0)
                rows.append({"dataset": f"random {n // 1000}k x 10", "model": "-", "command": "label transfer",
                             "load": load, "variant": variant, "seconds": ts, "median": statistics.median(ts),
                             "loadavg_1min": round(load_before, 2)})
                print(f"knn {load:4s} {variant:8s} median {statistics.median(ts):6.2f} s  "
                      f"runs {[round(t, 2) for t in ts]}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """One line per dataset/model/command/load; each variant's median and its ratio to the best."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    head = "| data | model | command | load (1-min avg) | " + " | ".join(f"--threads {v}" for v in variants) + " |"
    lines = [head, "|" + "---|" * (4 + len(variants))]
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["model"], r["command"], r["load"]), {})[r["variant"]] = r
    for (dataset, model, command, load), by in groups.items():
        best = min(r["median"] for r in by.values())
        cells = []
        for v in variants:
            r = by.get(v)
            cells.append("-" if r is None else
                         f"{r['median']:.1f} s ({min(r['seconds']):.1f}-{max(r['seconds']):.1f}), "
                         f"{r['median'] / best:.2f}x")
        avg = max(r["loadavg_1min"] for r in by.values())
        lines.append(f"| {dataset} | {model} | {command} | {load} ({avg}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="cellbench", help="comma-separated: cellbench, gen100k")
    p.add_argument("--models", default="trvae,nb")
    p.add_argument("--loads", default="idle,busy")
    p.add_argument("--variants", default="1,2,default", help=f"comma-separated of {', '.join(VARIANTS)}")
    p.add_argument("--commands", default="train-reference,map")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--competitors", type=int, default=2, help="CPU-bound processes in the busy condition")
    p.add_argument("--work", default=str(Path(__file__).resolve().parent / "work" / "threads"))
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--knn-cells", type=int, default=100_000,
                   help="label transfer alone at this many reference (and query) cells; 0 = skip")
    p.add_argument("--only-knn", action="store_true", help="skip the CLI commands")
    a = p.parse_args()
    t0 = time.perf_counter()
    rows = [] if a.only_knn else measure(a)
    if a.knn_cells:
        rows += measure_knn(a)
    print(f"\n{os.cpu_count()} cores; load average now {os.getloadavg()}; {time.perf_counter() - t0:.0f} s in all\n")
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
