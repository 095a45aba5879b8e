"""fedarches vs scvi-tools and scarches, measured in ONE run.

    python benchmarks/run.py --mode quick   # minutes; CI: fails only on a crash
    python benchmarks/run.py --mode full    # the RESULTS.md tables (hours: see README)
    python benchmarks/run.py --mode full --sections quality --seeds 0,1,2,3,4

Runs in fedarches' venv. The peers (scvi-tools SCVI, scarches TRVAE) live in their own
venv (benchmarks/setup_peers.sh creates it: benchmarks/work/peers-venv) and are run as
subprocesses that exchange only files (h5ad in; npz latents and json reports out).
fedarches runs as a subprocess too, so every tool's peak memory is its own process'
ru_maxrss. Every subprocess uses the same number of torch threads, and no two run
at the same time.

Quality is computed here, identically for every tool, from each tool's latent of
reference and query cells: fedarches.labels (weighted kNN label transfer, paper
eqs. 17-22, and fedarches' calibrated novelty test) and fedarches.metrics.

The quality section (``--sections quality``) maps every split of
fedarches.data.splits.QUALITY_SPLITS with every tool for each seed in --seeds (the
tool's seed = the run seed; simulated splits also draw their cells with it) and
scores three rules per tool (benchmarks/quality_scores.py); verdicts use the worst seed.

Writes benchmarks/results.json and benchmarks/RESULTS.md. Speed is reported as
ratios between tools measured in this same run; nothing is asserted about speed.
Sections not run this time are kept from the existing results file, marked with
the command and date of the run that measured them.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from common import read_json, write_json
from quality_scores import aggregate, score_tool

WORK = HERE / "work"
PEERS_VENV = Path(os.environ.get("PEERS_VENV", WORK / "peers-venv"))
PEERS_PY = PEERS_VENV / "bin" / "python"

MODES: dict[str, dict[str, Any]] = {
    # quick: real pipeline, few epochs, small generated data; numbers are smoke, not results
    "quick": {
        "ref_epochs": 25,
        "query_epochs": 15,
        "scale_sizes": [10_000],
        "scvi_scale_steps": {10_000: 40},
        "transfer_size": 10_000,
        "quality_seeds": [0],
        "quality_splits": ["cellbench", "sim-state"],  # one real, one simulated (else the first two)
    },
    # full: every tool's default schedule (scvi-tools tutorial: 400 ref epochs for
    # small data, 200 query epochs; scarches tutorial: 500 + early stopping; fedarches:
    # its default + early stopping)
    "full": {
        "ref_epochs": None,
        "query_epochs": None,
        "scale_sizes": [10_000, 100_000, 1_000_000],
        # scvi-tools at 1M: a fixed number of minibatches, scaled to a full epoch
        # (one full 1M epoch takes ~10 min per phase here); smaller sizes: full epochs
        "scvi_scale_steps": {10_000: None, 100_000: None, 1_000_000: 1500},
        "transfer_size": 1_000_000,
        "quality_seeds": [0, 1, 2, 3, 4],
        "quality_splits": None,  # all
    },
}
ALL_SECTIONS = ("splits", "scale", "quality")

QUALITY_TOOLS = ["fedarches-nb", "fedarches-trvae", "fedarches-trvae-w128", "scvi-tools", "scarches-trvae"]
# fed_runner.py arguments per fedarches tool. fedarches-trvae-w128 is the trVAE at SCVI's
# widths ([128,128], z=10): the same-widths comparison for the model where the
# hidden-dimension MSE applies (the paper's trVAE is [128,20], which SCVI cannot express).
FED_ARGS = {
    "fedarches-nb": ["--kind", "nb"],
    "fedarches-trvae": ["--kind", "trvae"],
    "fedarches-trvae-w128": ["--kind", "trvae", "--hidden", "128,128"],
}
SCALE_TOOLS = ("fedarches-nb", "fedarches-trvae", "fedarches-trvae-w128", "scvi-tools")
TOOL_LABEL = {
    "fedarches-nb": "fedarches NB CVAE [128,128]",
    "fedarches-trvae": "fedarches trVAE [128,20]",
    "fedarches-trvae-w128": "fedarches trVAE [128,128]",
    "scvi-tools": "scvi-tools SCVI [128,128]",
    "scarches-trvae": "scarches TRVAE [128,20]",
    "scanvi": "scvi-tools SCANVI [128,128]",
}
# the quality section's tools; scanvi is trained in the scvi-tools process, from its
# reference SCVI (SCANVI.from_scvi_model), so both share one reference training
STATE_TOOLS = ("fedarches-nb", "fedarches-trvae", "scvi-tools", "scanvi", "scarches-trvae")


# ----------------------------------------------------------------------------- subprocesses

class Runner:
    def __init__(self, log_dir: Path, threads: int, timeout: float | None) -> None:
        self.log_dir = log_dir
        self.threads = threads
        self.timeout = timeout
        self.commands: list[str] = []

    def run(self, name: str, argv: list[str], allow_fail: bool = False) -> dict:
        log = self.log_dir / f"{name}.log"
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
            env[var] = str(self.threads)
        env["PYTHONWARNINGS"] = "ignore"
        env.setdefault("MPLBACKEND", "Agg")
        cmd = " ".join(shlex.quote(a) for a in argv)
        self.commands.append(cmd)
        load_before = _loadavg()
        t0 = time.perf_counter()
        print(f"[bench] {name} ...", flush=True)
        with open(log, "w") as fh:
            fh.write(cmd + "\n")
            fh.flush()
            proc = subprocess.run(argv, check=False, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                  timeout=self.timeout)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = log.read_text().splitlines()[-30:]
            if allow_fail:
                print(f"[bench] {name} FAILED (exit {proc.returncode}); recorded, continuing", flush=True)
                return {"error": f"exit {proc.returncode}", "log_tail": tail[-8:], "wall_seconds": wall,
                        "log": os.path.relpath(log, ROOT)}
            raise RuntimeError(f"{name} failed (exit {proc.returncode}); log {log}:\n" + "\n".join(tail))
        print(f"[bench] {name} done in {wall:.1f} s", flush=True)
        # other work on the machine skews timings: the 1-minute load average before and
        # after each process is kept with its figures
        return {"wall_seconds": wall, "log": os.path.relpath(log, ROOT),
                "loadavg_1min_before": load_before, "loadavg_1min_after": _loadavg()}


def _loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def ensure_peers_venv() -> None:
    subprocess.run(["bash", str(HERE / "setup_peers.sh")], check=True, cwd=ROOT)


# ----------------------------------------------------------------------------- quality

def _label_transfer(z_ref, ref_labels, ref_batches, z_q, q_labels, unseen: set[str]) -> dict:
    """Accuracy on query cells of types the reference knows (a known cell called
    unknown counts as wrong) and the fraction of unseen-type cells called unknown,
    under two rules: the paper's kNN uncertainty alone (> 0.5 = unknown), and
    fedarches' calibrated novelty test (LabelTransferResult.is_unknown)."""
    import numpy as np

    from fedarches.labels import KNNLabelTransfer

    lt = KNNLabelTransfer().fit(z_ref, ref_labels, ref_batches=ref_batches, k=50)
    res = lt.predict(z_q)
    q_labels = np.asarray(q_labels).astype(str)
    known = ~np.isin(q_labels, list(unseen))
    knn_pred = np.asarray(res.knn_prediction).astype(str)
    knn_unknown = np.asarray(res.uncertainty) > 0.5
    fed_pred = np.asarray(res.prediction).astype(str)
    fed_unknown = np.asarray(res.is_unknown).astype(bool)

    def rule(pred, unknown):
        correct = (pred == q_labels) & ~unknown
        return {
            "accuracy_known": float(correct[known].mean()) if known.any() else None,
            "known_called_unknown": float(unknown[known].mean()) if known.any() else None,
            "heldout_called_unknown": float(unknown[~known].mean()) if (~known).any() else None,
        }

    per_type = {}
    for t in sorted(set(q_labels)):
        m = q_labels == t
        per_type[t] = {
            "n": int(m.sum()),
            "knn_correct": float(((knn_pred == q_labels) & ~knn_unknown)[m].mean()),
            "knn_unknown": float(knn_unknown[m].mean()),
            "novelty_correct": float(((fed_pred == q_labels) & ~fed_unknown)[m].mean()),
            "novelty_unknown": float(fed_unknown[m].mean()),
        }
    return {
        "per_type": per_type,
        "knn_uncertainty": rule(knn_pred, knn_unknown),
        "fedarches_novelty": rule(fed_pred, fed_unknown),
        "n_known": int(known.sum()),
        "n_heldout": int((~known).sum()),
    }


def _integration_metrics(z, batches, labels) -> dict:
    import numpy as np

    try:
        from fedarches import metrics
    except ImportError as e:  # recorded and shown as "not measured", never invented
        return {"error": f"fedarches.metrics not importable: {e}"}

    fn = getattr(metrics, "integration_metrics", None) or getattr(metrics, "compute_metrics", None) \
        or getattr(metrics, "evaluate", None) or metrics.all_metrics
    out = fn(np.asarray(z, dtype=np.float32), np.asarray(batches).astype(str), np.asarray(labels).astype(str))
    if hasattr(out, "model_dump"):
        out = out.model_dump()
    elif hasattr(out, "_asdict"):
        out = out._asdict()
    elif not isinstance(out, dict):
        out = dict(vars(out))
    return {k: (float(v) if isinstance(v, (int, float)) or hasattr(v, "item") else v) for k, v in out.items()}


def quality(latent_npz: Path, ref_h5ad: Path, query_h5ad: Path) -> dict:
    import anndata as ad
    import numpy as np

    lat = np.load(latent_npz, allow_pickle=False)
    ref = ad.read_h5ad(ref_h5ad, backed="r")
    query = ad.read_h5ad(query_h5ad, backed="r")
    r_lab = ref.obs["cell_type"].astype(str).to_numpy()
    q_lab = query.obs["cell_type"].astype(str).to_numpy()
    r_bat = ref.obs["study"].astype(str).to_numpy()
    q_bat = query.obs["study"].astype(str).to_numpy()
    unseen = set(q_lab) - set(r_lab)
    t0 = time.perf_counter()
    lt = _label_transfer(lat["reference"], r_lab, r_bat, lat["query"], q_lab, unseen)
    z = np.concatenate([lat["reference"], lat["query"]])
    met = _integration_metrics(z, np.concatenate([r_bat, q_bat]), np.concatenate([r_lab, q_lab]))
    return {"label_transfer": lt, "metrics": met, "unseen_types": sorted(unseen),
            "quality_seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- sections

def run_splits(mode: dict, runner: Runner, work: Path, py: str, threads: int, checkpoint=lambda: None,
               out: dict | None = None) -> dict:
    import prep

    out = {} if out is None else out
    for name, split in prep.SPLITS.items():
        d = work / "splits" / name
        meta = prep.prepare_split(split, d)
        res: dict[str, Any] = {"split": meta, "tools": {}}
        epochs = []
        if mode["ref_epochs"] is not None:
            epochs += ["--ref-epochs", str(mode["ref_epochs"])]
        if mode["query_epochs"] is not None:
            epochs += ["--query-epochs", str(mode["query_epochs"])]
        common = ["--ref", meta["ref"], "--query", meta["query"], "--threads", str(threads), *epochs]
        for tool in QUALITY_TOOLS:
            td = d / tool
            if td.exists():
                shutil.rmtree(td)
            td.mkdir(parents=True)
            if tool.startswith("fedarches"):
                argv = [py, str(HERE / "fed_runner.py"), "quality", *FED_ARGS[tool], "--out", str(td), *common]
            else:
                peer = "scvi" if tool == "scvi-tools" else "trvae"
                argv = [str(PEERS_PY), str(HERE / "peers_runner.py"), "quality", "--tool", peer, "--out", str(td),
                        *common]
            run = runner.run(f"{name}-{tool}", argv)
            rep = read_json(td / "report.json")
            rep["run"] = run
            rep["quality"] = quality(td / "latent.npz", Path(meta["ref"]), Path(meta["query"]))
            res["tools"][tool] = rep
            out[name] = res
            checkpoint()
    return out


def run_scale(mode: dict, runner: Runner, work: Path, py: str, threads: int, checkpoint=lambda: None,
              out: dict | None = None) -> dict:
    out = {} if out is None else out
    probe = subprocess.run([py, "-c", "import fedarches.data.simulate"], check=False, capture_output=True, text=True)
    if probe.returncode != 0:
        msg = probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else "import failed"
        print(f"[bench] scale section not run: fedarches.data.simulate is not importable ({msg})", flush=True)
        out["not_run"] = f"fedarches.data.simulate not importable: {msg}"
        return out
    for n in mode["scale_sizes"]:
        d = work / "scale" / f"n{n}"
        d.mkdir(parents=True, exist_ok=True)
        gen = runner.run(f"scale-{n}-generate", [py, str(HERE / "gen_data.py"), "--n", str(n), "--out", str(d)])
        meta = read_json(d / "data.json")
        meta["generate"] = gen
        res: dict[str, Any] = {"data": meta, "tools": {}}
        common = ["--ref", str(d / "ref.h5ad"), "--query", str(d / "query.h5ad"), "--threads", str(threads)]
        for tool in SCALE_TOOLS:
            td = d / tool
            td.mkdir(exist_ok=True)
            if tool.startswith("fedarches"):
                argv = [py, str(HERE / "fed_runner.py"), "scale", *FED_ARGS[tool], "--out", str(td), *common]
            else:
                steps = mode["scvi_scale_steps"].get(n)
                argv = [str(PEERS_PY), str(HERE / "peers_runner.py"), "scale", "--tool", "scvi", "--out", str(td),
                        *common, *(["--steps", str(steps)] if steps else [])]
            # at 1M a crash (e.g. out of memory) is itself a result: recorded, and the
            # other tools still run; below that any crash fails the run
            (td / "report.json").unlink(missing_ok=True)
            run = runner.run(f"scale-{n}-{tool}", argv, allow_fail=n >= 1_000_000)
            if "error" in run:
                res["tools"][tool] = {"tool": tool, "error": run["error"], "run": run,
                                      "reference": {}, "query": {}}
                out[str(n)] = res
                checkpoint()
                continue
            rep = read_json(td / "report.json")
            rep["run"] = run
            for phase in ("reference", "query"):
                r = rep[phase]
                r.setdefault("seconds_per_epoch", r.get("seconds_per_epoch_median"))
                r.pop("step_seconds", None)
            res["tools"][tool] = rep
            out[str(n)] = res
            checkpoint()
        if n == mode["transfer_size"]:
            td = d / "transfer"
            td.mkdir(exist_ok=True)
            lat = next((d / t / "latent.npz" for t in ("fedarches-nb", "fedarches-trvae")
                        if (d / t / "latent.npz").exists() and "error" not in res["tools"].get(t, {})), None)
            if lat is None:
                res["label_transfer"] = {"error": "no fedarches latent at this size"}
                out[str(n)] = res
                checkpoint()
                continue
            run = runner.run(f"scale-{n}-label-transfer",
                             [py, str(HERE / "fed_runner.py"), "transfer", "--ref", str(lat), "--query", str(lat),
                              "--out", str(td), "--threads", str(os.cpu_count() or 1)])
            rep = read_json(td / "report.json")
            rep["run"] = run
            res["label_transfer"] = rep
        out[str(n)] = res
        checkpoint()
        # the big files are not needed after this size
        for f in ("ref.h5ad", "query.h5ad"):
            (d / f).unlink(missing_ok=True)
    return out


def _quality_processes(py: str, meta: dict, d: Path, threads: int, seed: int, epochs: list[str]) -> list[tuple]:
    """(name, argv, tool dirs it writes), longest first so two jobs finish together."""
    common = ["--ref", meta["ref"], "--query", meta["query"], "--threads", str(threads), "--seed", str(seed),
              *epochs]
    peers = [str(PEERS_PY), str(HERE / "peers_runner.py"), "quality"]
    return [
        ("scvi-tools+scanvi", [*peers, "--tool", "scvi", "--out", str(d / "scvi-tools"),
                               "--scanvi-out", str(d / "scanvi"), *common], ["scvi-tools", "scanvi"]),
        ("scarches-trvae", [*peers, "--tool", "trvae", "--out", str(d / "scarches-trvae"), *common],
         ["scarches-trvae"]),
        *[(t, [py, str(HERE / "fed_runner.py"), "quality", *FED_ARGS[t], "--out", str(d / t), *common], [t])
          for t in ("fedarches-nb", "fedarches-trvae")],
    ]


def _score_seed(meta: dict, d: Path, tools: dict) -> None:
    import anndata as ad

    ref = ad.read_h5ad(meta["ref"], backed="r")
    q_lab = ad.read_h5ad(meta["query"], backed="r").obs["cell_type"].astype(str).to_numpy()
    r_lab = ref.obs["cell_type"].astype(str).to_numpy()
    r_bat = ref.obs["study"].astype(str).to_numpy()
    held = sorted(set(q_lab) - set(r_lab))
    for tool, t in tools.items():
        if not t.get("error") and "scores" not in t:
            try:
                t["scores"] = score_tool(d / tool, r_lab, r_bat, q_lab, held)
            except (OSError, KeyError, ValueError) as e:  # recorded and shown, never invented
                t["error"] = f"scoring failed: {type(e).__name__}: {e}"


def run_quality(mode: dict, runner: Runner, work: Path, py: str, threads: int, seeds: list[int],
                names: list[str] | None, jobs: int = 1, checkpoint=lambda: None, out: dict | None = None) -> dict:
    """Every (split, seed): the same files for every tool, each tool a process of its
    own (at most `jobs` at a time), scored and checkpointed before the next."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import prep

    lock = threading.Lock()  # with 2 jobs, a report lands while the other checkpoints
    out = {} if out is None else out
    splits = prep.quality_splits()
    want = mode["quality_splits"]
    if names is None and want is not None:
        names = [n for n in want if n in splits]
        names = names if len(names) == len(want) else list(splits)[: len(want)]
    names = names or list(splits)
    epochs = [*(["--ref-epochs", str(mode["ref_epochs"])] if mode["ref_epochs"] is not None else []),
              *(["--query-epochs", str(mode["query_epochs"])] if mode["query_epochs"] is not None else [])]
    # seed-major: a run stopped early still holds every split for the seeds it finished
    for seed, name in [(s_, n_) for s_ in seeds for n_ in names]:
        split = splits[name]
        res = out.setdefault(name, {"simulated": prep.is_simulated(split), "seeds": {}})
        sim = prep.is_simulated(split)
        d = work / "quality" / name / (f"seed{seed}" if sim else "data")
        if sim or not (d / "query.h5ad").exists() or "data" not in res:
            res["data"] = prep.prepare_quality(split, seed, d)
        meta = res["data"]
        sd = work / "quality" / name / f"seed{seed}"
        entry = res["seeds"][str(seed)] = {"data": meta, "tools": {}}
        t0 = time.perf_counter()

        def one(proc, sd=sd, entry=entry, seed=seed):
            pname, argv, dirs = proc
            for t in dirs:
                shutil.rmtree(sd / t, ignore_errors=True)
                (sd / t).mkdir(parents=True)
            run = runner.run(f"quality-{name}-s{seed}-{pname}", argv, allow_fail=True)
            for t in dirs:  # a failed process may still have written the first tool's report
                f = sd / t / "report.json"
                rep = read_json(f) if f.exists() else {"error": run.get("error", "no report")}
                with lock:
                    entry["tools"][t] = {"run": run, **{k: rep.get(k) for k in (
                        "tool", "version", "model", "error", "reference", "query", "peak_rss_bytes", "n_genes")}}
            with lock:
                checkpoint()
            return pname

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            list(pool.map(one, _quality_processes(py, meta, sd, threads, seed, epochs)))
        _score_seed(meta, sd, entry["tools"])
        entry["seconds"] = time.perf_counter() - t0
        res["aggregate"] = aggregate({s: {t: v["scores"] for t, v in e["tools"].items() if "scores" in v}
                                      for s, e in res["seeds"].items()})
        checkpoint()
    return out


# ----------------------------------------------------------------------------- environment

def _pip_versions(py: str) -> dict[str, str]:
    try:
        txt = subprocess.run([py, "-m", "pip", "freeze", "--all"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:  # pragma: no cover
        return {"error": str(e)}
    out = {}
    for line in txt.splitlines():
        if "==" in line:
            k, v = line.split("==", 1)
            out[k] = v
        elif " @ " in line:
            k, v = line.split(" @ ", 1)
            out[k] = v
    return out


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    nproc = subprocess.run(["nproc"], check=False, capture_output=True, text=True).stdout.strip()
    return {"nproc": nproc, "memory": mem, "cpu": cpu, "platform": platform.platform(),
            "python": platform.python_version()}


KEY_PACKAGES = ["fedarches", "torch", "numpy", "scipy", "anndata", "scanpy", "scikit-learn", "pynndescent",
                "scvi-tools", "scArches", "lightning", "pytorch-lightning", "flwr"]


# ----------------------------------------------------------------------------- main

def _carry_over(results: dict, path: Path, sections: list[str]) -> None:
    """Sections this run does not measure are kept from the results file it replaces
    (same mode), each marked with the command and start of the run that measured it."""
    if not path.exists():
        return
    try:
        old = read_json(path)
    except ValueError:
        return
    if old.get("mode") != results["mode"]:
        return
    carried = {}
    for sec in ALL_SECTIONS:
        if sec in sections or sec not in old:
            continue
        results[sec] = old[sec]
        prev = (old.get("carried_over") or {}).get(sec)
        carried[sec] = prev or {"command": old.get("command"), "started": old.get("started")}
    if carried:
        results["carried_over"] = carried


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=sorted(MODES), default="quick")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training process (all tools alike)")
    p.add_argument("--sections", default=",".join(ALL_SECTIONS), help="comma list: " + ", ".join(ALL_SECTIONS))
    p.add_argument("--seeds", default=None, help="quality: comma list of seeds (default: full 0,1,2,3,4; quick 0)")
    p.add_argument("--quality-splits", default=None,
                   help="quality: comma list of split names (default: full all of QUALITY_SPLITS; quick the first 2)")
    p.add_argument("--jobs", type=int, default=1, choices=(1, 2),
                   help="quality: tool processes at a time (each with --threads threads)")
    p.add_argument("--work", default=None, help="scratch directory (default benchmarks/work/<mode>)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per subprocess")
    # quick runs are smoke tests: they never overwrite the committed full results
    p.add_argument("--results", default=None, help="default: benchmarks/results.json (full), "
                   "benchmarks/work/quick/results.json (quick)")
    p.add_argument("--markdown", default=None, help="default: benchmarks/RESULTS.md (full), "
                   "benchmarks/work/quick/RESULTS.md (quick)")
    p.add_argument("--render-only", action="store_true",
                   help="re-render RESULTS.md (and the summary) from an existing results.json; measures nothing")
    a = p.parse_args(argv)
    out_dir = HERE if a.mode == "full" else WORK / a.mode
    a.results = a.results or str(out_dir / "results.json")
    a.markdown = a.markdown or str(out_dir / "RESULTS.md")
    if a.render_only:
        from report import summarise, write_markdown

        results = read_json(a.results)
        results["summary"] = summarise(results)
        write_json(a.results, results)
        write_markdown(results, Path(a.markdown))
        print(f"[bench] re-rendered {a.markdown} from {a.results}")
        return 0
    mode = MODES[a.mode]
    work = (Path(a.work) if a.work else WORK / a.mode).resolve()  # logs are named relative to the root
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.time()
    ensure_peers_venv()
    runner = Runner(logs, a.threads, a.timeout)
    py = sys.executable
    sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    results: dict[str, Any] = {
        "command": "python benchmarks/run.py " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:])),
        "mode": a.mode,
        "mode_settings": {k: (v if not isinstance(v, dict) else {str(kk): vv for kk, vv in v.items()})
                          for k, v in mode.items()},
        "threads": a.threads,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "machine": machine(),
    }
    fed = _pip_versions(py)
    peers = _pip_versions(str(PEERS_PY))
    results["versions"] = {
        "fedarches_venv": {k: v for k, v in fed.items() if k in KEY_PACKAGES},
        "peers_venv": {k: v for k, v in peers.items() if k in KEY_PACKAGES},
        "fedarches_venv_all": fed,
        "peers_venv_all": peers,
    }

    def checkpoint(final: bool = False) -> None:
        """results.json + RESULTS.md after every measured process, so an interrupted
        run still shows what it measured (marked as partial)."""
        from report import summarise, write_markdown

        results["complete"] = final
        results["subprocess_commands"] = runner.commands
        results["seconds"] = time.time() - started
        results["summary"] = summarise(results)
        write_json(a.results, results)
        write_markdown(results, Path(a.markdown))

    results["sections"] = sections
    results["jobs"] = a.jobs
    _carry_over(results, Path(a.results), sections)
    if "splits" in sections:
        results["splits"] = {}
        run_splits(mode, runner, work, py, a.threads, checkpoint, results["splits"])
    if "scale" in sections:
        results["scale"] = {}
        run_scale(mode, runner, work, py, a.threads, checkpoint, results["scale"])
    if "quality" in sections:
        results["quality"] = {}
        seeds = [int(x) for x in a.seeds.split(",")] if a.seeds else mode["quality_seeds"]
        names = [x.strip() for x in a.quality_splits.split(",") if x.strip()] if a.quality_splits else None
        results["quality_seeds"] = seeds
        run_quality(mode, runner, work, py, a.threads, seeds, names, a.jobs, checkpoint, results["quality"])
    checkpoint(final=True)
    print(f"[bench] wrote {a.results} and {a.markdown} in {results['seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
