"""Time to an annotated query: the whole `fedarches map` command (model directory + query
file -> written, annotated query.h5ad) next to scvi-tools' and scarches' surgery.

    PYTHONPATH=src FEDARCHES_DATA=../shared/data .venv/bin/python benchmarks/map_time.py \
        --datasets cellbench,pbmc,gen10k,gen100k --models trvae,nb --seeds 0 --markdown benchmarks/MAP_TIME.md
    flock /work/tools/bigmem.lock .venv/bin/python benchmarks/map_time.py --datasets gen1m --no-peers

What is timed, per (data set, model, seed):

* fedarches, "fast": `fedarches map` with its defaults (the new rows fitted on at most
  ``--fit-cells`` cells per new condition, stopping on parameter convergence), one process
  as a user runs it, wall seconds from start to exit (Python start-up and imports included)
  and peak RSS; the phases (read, fit, embed, label transfer, write) from one in-process run
  of the same library calls.
* fedarches, "full": the same command with ``--fit-cells 0 --converge-tol 0`` (every cell,
  the model's whole schedule): the mapping this replaces, for equal quality.
* scvi-tools SCVI (`load_query_data`, the tutorial's 200 query epochs) and scarches TRVAE
  (500 epochs with its early stopping), run by benchmarks/peers_runner.py in the peers'
  venv; their map time is query training + the query's latent + label transfer with
  fedarches.labels.KNNLabelTransfer on their latent (the reference side of label transfer
  is reference building for every tool and is not counted). On generated data the peers run
  one query epoch and their time is that epoch times the schedule ("est." in the table).

Quality: accuracy on known types and the fraction of held-out cells called unknown (real
splits) from each tool's predictions, so "equal quality" is visible beside the ratios.
The machine is shared: every row reports the 1-minute load average next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prep import SPLITS, _clean, prepare_split  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PEERS_PYTHON = Path(os.environ.get("PEERS_VENV", "/work/peers-venv")) / "bin" / "python"
GEN = Path(os.environ.get("FEDARCHES_GEN", "/work/gen"))
#: generated data sets: (folder under GEN, reference cells drawn from its ref.h5ad, reference epochs)
GENERATED = {"gen10k": ("n10000", 5000, 20), "gen100k": ("n100000", 20000, 20), "gen1m": ("n1000000", 50000, 10)}
SCVI_QUERY_EPOCHS = 200  # peers_runner.SCVI_QUERY_EPOCHS (the tutorial's)
TRVAE_EPOCHS = 500  # peers_runner.TRVAE_EPOCHS (an upper bound: its early stopping may end sooner)
CLI = "import sys; from fedarches.cli import main; sys.exit(main())"


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="cellbench,pbmc,gen10k,gen100k")
    p.add_argument("--models", default="trvae,nb")
    p.add_argument("--seeds", default="0")
    p.add_argument("--work", default=str(GEN / "fastmap-bench"))
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--no-full", action="store_true", help="skip the every-cell, whole-schedule fedarches run")
    p.add_argument("--no-phases", action="store_true", help="skip the in-process run that splits the time by phase")
    p.add_argument("--from-results", default=None, help="only write --markdown from this --results file")
    p.add_argument("--threads", type=int, default=None, help="--threads of fedarches map (default: its own)")
    p.add_argument("--results", default=None, help="append one JSON line per measurement here")
    p.add_argument("--markdown", default=None, help="write the table here (e.g. benchmarks/MAP_TIME.md)")
    return p.parse_args()


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def _run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[float, int, float]:
    """Wall seconds, peak RSS (bytes) and CPU seconds (user + system) of one command, run as a
    user runs it. On a shared machine the CPU seconds are the steadier figure: with one
    training thread they bound what the command takes on an idle machine."""
    stats = log.with_suffix(".time")
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", str(stats), *cmd], stdout=fh,
                       stderr=subprocess.STDOUT, check=True, env=env)
    rss, user, system = stats.read_text().split()[-3:]
    return time.perf_counter() - t0, int(rss) * 1024, float(user) + float(system)


# ----------------------------------------------------------------------------- data and references

def dataset_files(name: str, work: Path) -> dict:
    """ref.h5ad / query.h5ad (and for real splits the held-out types) of one data set."""
    d = work / "data" / name
    if name in SPLITS:
        meta = d / "meta.json"
        if not meta.exists():
            meta.parent.mkdir(parents=True, exist_ok=True)
            meta.write_text(json.dumps(prepare_split(SPLITS[name], d)))
        return json.loads(meta.read_text())
    folder, n_ref, _ = GENERATED[name]
    ref = d / "ref.h5ad"
    if not ref.exists():  # a seeded subsample of the same simulate call's reference half
        d.mkdir(parents=True, exist_ok=True)
        backed = ad.read_h5ad(GEN / folder / "ref.h5ad", backed="r")
        rows = np.sort(np.random.default_rng(0).choice(backed.n_obs, size=min(n_ref, backed.n_obs), replace=False))
        backed[rows].to_memory().write_h5ad(ref)
    return {"ref": str(ref), "query": str(GEN / folder / "query.h5ad"), "held_out_types": []}


def peer_files(name: str, files: dict, work: Path) -> dict:
    """The peers need a lognorm layer (scarches' MSE model): real splits have it; generated
    data gets a copy with it (the query: one epoch's worth of cells is enough to time)."""
    if name in SPLITS:
        return files
    d = work / "data" / f"{name}-peers"
    if not (d / "query.h5ad").exists():
        d.mkdir(parents=True, exist_ok=True)
        for side in ("ref", "query"):
            a = ad.read_h5ad(files[side])
            _clean(a, list(a.var_names)).write_h5ad(d / f"{side}.h5ad")
    return {**files, "ref": str(d / "ref.h5ad"), "query": str(d / "query.h5ad")}


def reference_dir(name: str, files: dict, kind: str, seed: int, work: Path, env: dict[str, str]) -> Path:
    out = work / "models" / f"{name}-{kind}-s{seed}"
    if not (out / "manifest.json").exists():
        epochs = [] if name in SPLITS else ["--epochs", str(GENERATED[name][2])]
        _run([sys.executable, "-c", CLI, "train-reference", "--data", files["ref"], "--condition-key", "study",
              "--label-key", "cell_type", "--model", kind, "--out", str(out), "--seed", str(seed), "--threads", "1",
              "--quiet", *epochs], work / f"train-{name}-{kind}-s{seed}.log", env)
    return out


# ----------------------------------------------------------------------------- fedarches

def fedarches_map(name: str, files: dict, model: Path, kind: str, seed: int, variant: str, work: Path,
                  env: dict[str, str], threads: int | None) -> dict:
    out = work / "out" / f"{name}-{kind}-s{seed}-{variant}"
    extra = ["--fit-cells", "0", "--converge-tol", "0"] if variant == "full" else []
    extra += ["--threads", str(threads)] if threads else []
    load = load1()
    seconds, rss, cpu = _run([sys.executable, "-c", CLI, "map", "--model", str(model), "--data", files["query"],
                         "--condition-key", "study", "--out", str(out), "--seed", str(seed), "--quiet", *extra],
                        work / f"map-{name}-{kind}-s{seed}-{variant}.log", env)
    rep = json.loads((out / "report.json").read_text())
    lt = rep.get("label_transfer") or {}
    return {"tool": f"fedarches {kind}", "variant": variant, "seconds": seconds, "cpu_seconds": cpu, "estimated": False,
            "peak_rss_bytes": rss, "load": load, "epochs": rep.get("epochs"), "n_cells_trained": rep.get("n_cells_trained"),
            "accuracy": lt.get("accuracy_known"), "detection": lt.get("unseen_called_unknown")}


def fedarches_phases(files: dict, model_dir: Path, seed: int, work: Path) -> dict:
    """Where one in-process map spends its time: read, fit, embed, label transfer, write."""
    from fedarches.config import MapSettings
    from fedarches.data.io import read_h5ad
    from fedarches.mapping import write_h5ad
    from fedarches.model import FedArchesModel, ReferenceIndex, SummaryIndex

    spent: dict[str, float] = {"embed": 0.0, "label transfer": 0.0, "embed cpu": 0.0, "label transfer cpu": 0.0}

    def timed(fn, key):  # noqa: ANN001, ANN202
        def inner(*a, **k):  # noqa: ANN002, ANN003, ANN202
            t, c = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t
                spent[f"{key} cpu"] += time.process_time() - c
        return inner

    orig = (FedArchesModel._latent, ReferenceIndex.predict, SummaryIndex.predict)
    FedArchesModel._latent = timed(orig[0], "embed")
    ReferenceIndex.predict, SummaryIndex.predict = timed(orig[1], "label transfer"), timed(orig[2], "label transfer")
    try:
        t, c = time.perf_counter(), time.process_time()
        model = FedArchesModel.load(model_dir)
        query = read_h5ad(files["query"])
        spent["read"], spent["read cpu"] = time.perf_counter() - t, time.process_time() - c
        t, c = time.perf_counter(), time.process_time()
        res = model.map_query(query, "study", settings=MapSettings(seed=seed), copy_data=False)
        total, total_cpu = time.perf_counter() - t, time.process_time() - c
        h = res.model.last_history
        spent["fit"] = h.seconds + h.setup_seconds
        spent["prepare and rest"] = total - spent["fit"] - spent["embed"] - spent["label transfer"]
        spent["map cpu"] = total_cpu
        out = work / "phases"
        shutil.rmtree(out, ignore_errors=True)
        t, c = time.perf_counter(), time.process_time()
        out.mkdir(parents=True)
        res.model.save(out / "model")
        write_h5ad(res.adata, out / "query.h5ad")
        spent["write"], spent["write cpu"] = time.perf_counter() - t, time.process_time() - c
    finally:
        FedArchesModel._latent, ReferenceIndex.predict, SummaryIndex.predict = orig
    return {k: round(v, 2) for k, v in spent.items()}


# ----------------------------------------------------------------------------- peers

def peer_map(name: str, files: dict, tool: str, seed: int, work: Path) -> dict:
    """A peer's surgery (peers_runner.py, its venv) + fedarches' label transfer on its latent."""
    from fedarches.labels import KNNLabelTransfer

    out = work / "peers" / f"{name}-{tool}-s{seed}"
    generated = name not in SPLITS
    epochs = ["--ref-epochs", "1", "--query-epochs", "1"] if generated else []
    load = load1()
    _, _, cpu = _run([str(PEERS_PYTHON), str(ROOT / "benchmarks" / "peers_runner.py"), "quality", "--tool", tool,
          "--ref", files["ref"], "--query", files["query"], "--out", str(out), "--seed", str(seed), "--threads", "1",
          *epochs], work / f"peer-{name}-{tool}-s{seed}.log", None)
    rep = json.loads((out / "report.json").read_text())
    lat = np.load(out / "latent.npz")
    ref, query = ad.read_h5ad(files["ref"], backed="r"), ad.read_h5ad(files["query"], backed="r")
    n_ref, n_q = ref.n_obs, query.n_obs
    ref_labels = ref.obs["cell_type"].astype(str).to_numpy()
    transfer = KNNLabelTransfer().fit(lat["reference"], ref_labels, ref_batches=ref.obs["study"].astype(str).to_numpy(),
                                      fpr=0.01)
    t = time.perf_counter()
    res = transfer.predict(lat["query"])
    label_seconds = time.perf_counter() - t
    schedule = SCVI_QUERY_EPOCHS if tool == "scvi" else TRVAE_EPOCHS
    q = rep["query"]
    fit = (q.get("seconds_per_epoch") or q["fit_seconds"]) * schedule if generated else q["fit_seconds"]
    embed = rep.get("embed_seconds", 0.0) * n_q / (n_ref + n_q)
    truth = query.obs["cell_type"].astype(str).to_numpy()
    known = np.isin(truth, np.unique(ref_labels))
    pred = np.asarray(res.prediction).astype(str)
    unknown = np.asarray(res.is_unknown, dtype=bool)
    return {"tool": "scvi-tools SCVI" if tool == "scvi" else "scarches TRVAE", "variant": "tutorial",
            "seconds": fit + embed + label_seconds, "cpu_seconds": None if generated else q.get("fit_cpu_seconds"),
            "estimated": generated, "load": load,
            "peak_rss_bytes": rep.get("peak_rss_bytes"), "epochs": q.get("epochs"),
            "accuracy": float((pred[known] == truth[known]).mean()) if known.any() else None,
            "detection": float(unknown[~known].mean()) if (~known).any() else None}


# ----------------------------------------------------------------------------- table

def _fmt(v: object, digits: int = 3) -> str:
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def markdown(rows: list[dict], phases: list[dict]) -> str:
    lines = ["# Time to an annotated query (`benchmarks/map_time.py`)", "",
             "Whole `fedarches map` commands (process start to exit, the annotated `query.h5ad` written) next to "
             "the peers' surgery + latent + the same label transfer; est. = one measured query epoch times the "
             "peer's schedule. 2 shared cores; `load` is the 1-minute load average when the run started. "
             "CPU seconds: the whole fedarches process (start-up and imports included), the peers' query fit "
             "alone (their start-up, latent and label transfer not included). docs/SPEED.md explains the method.",
             "",
             "| data | seed | tool | variant | seconds | CPU seconds | x faster than SCVI | accuracy (known) "
             "| held-out called unknown | epochs | cells fitted | peak RSS GiB | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        scvi = next((x["seconds"] for x in rows if x["data"] == r["data"] and x["seed"] == r["seed"]
                     and x["tool"] == "scvi-tools SCVI"), None)
        scvi_cpu = next((x.get("cpu_seconds") for x in rows if x["data"] == r["data"] and x["seed"] == r["seed"]
                         and x["tool"] == "scvi-tools SCVI"), None)
        ratio = f"{scvi / r['seconds']:.1f}" if scvi and r["tool"].startswith("fedarches") else "-"
        if scvi_cpu and r.get("cpu_seconds") and r["tool"].startswith("fedarches"):
            ratio += f" (CPU {scvi_cpu / r['cpu_seconds']:.1f})"
        secs = f"{r['seconds']:.1f}{' est.' if r['estimated'] else ''}"
        rss = f"{r['peak_rss_bytes'] / 2**30:.2f}" if r.get("peak_rss_bytes") else "-"
        lines.append(f"| {r['data']} | {r['seed']} | {r['tool']} | {r['variant']} | {secs} | "
                     f"{_fmt(r.get('cpu_seconds'), 1)} | {ratio} | "
                     f"{_fmt(r['accuracy'])} | {_fmt(r['detection'])} | {_fmt(r.get('epochs'))} | "
                     f"{_fmt(r.get('n_cells_trained'))} | {rss} | {r['load']} |")
    if phases:
        keys = ["read", "fit", "embed", "label transfer", "prepare and rest", "write", "map cpu"]
        lines += ["", "Where an in-process fedarches map spends its time (seconds, default settings):", "",
                  "| data | model | " + " | ".join(keys) + " | load |", "|---|---|" + "---|" * (len(keys) + 1)]
        for p in phases:
            lines.append(f"| {p['data']} | {p['model']} | " + " | ".join(_fmt(p.get(k), 1) for k in keys)
                         + f" | {p['load']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    a = _args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    rows: list[dict] = []
    phases: list[dict] = []
    if a.from_results:
        recs = [json.loads(line) for line in open(a.from_results)]
        Path(a.markdown).write_text(markdown([r for r in recs if "phases" not in r], [r for r in recs if "phases" in r]))
        return
    sink = open(a.results, "a") if a.results else None  # noqa: SIM115

    def record(r: dict, **where: object) -> None:
        r.update(where)
        (phases if "phases" in where else rows).append(r)
        print(r, flush=True)
        if sink:
            sink.write(json.dumps(r) + "\n")
            sink.flush()

    for name in a.datasets.split(","):
        files = dataset_files(name, work)
        for seed in (int(s) for s in a.seeds.split(",")):
            for kind in a.models.split(","):
                model = reference_dir(name, files, kind, seed, work, env)
                variants = ["fast"] if a.no_full or name == "gen1m" else ["fast", "full"]
                for variant in variants:
                    record(fedarches_map(name, files, model, kind, seed, variant, work, env, a.threads),
                           data=name, seed=seed)
                if seed == int(a.seeds.split(",")[0]) and not a.no_phases:
                    record({"load": load1(), **fedarches_phases(files, model, seed, work)}, data=name, model=kind,
                           phases=True)
            if not a.no_peers and name != "gen1m":
                pf = peer_files(name, files, work)
                for tool in ("scvi", "trvae"):
                    record(peer_map(name, pf, tool, seed, work), data=name, seed=seed)
    if a.markdown:
        Path(a.markdown).write_text(markdown(rows, phases))
        print(f"wrote {a.markdown}")


if __name__ == "__main__":
    main()
