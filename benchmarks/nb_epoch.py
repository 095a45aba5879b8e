"""Seconds per reference epoch: fedarches NB (and trVAE) against scvi-tools' SCVI at the same
widths (n_hidden=128, n_layers=2, n_latent=10, batch 128, gene_likelihood="nb"), on the
generated scale data (benchmarks/gen_data.py), one thread each, runs interleaved.

    python benchmarks/nb_epoch.py run --data /work/gen --sizes 10000 100000 --reps 2 \\
        --out nb_epoch.json [--fed-src OLD_SRC_DIR ...] [--scvi-steps 1000000=1500]

Each measurement is a fresh subprocess (fedarches in this venv, SCVI in the peers' venv,
benchmarks/setup_peers.sh), so peak memory and caches do not carry over, and the tools
alternate: fedarches, SCVI, fedarches, SCVI ... so that load on a shared machine falls on
both. fedarches' epoch is its training loop's own epoch time: the minibatch pass over 90%
of the cells and the validation pass over the held-out 10% that early stopping monitors.
SCVI's is the Lightning epoch (its default train() validates only at the end of training).
``--fed-src`` adds fedarches trees (e.g. the code before a change) to the rotation.
With ``--scvi-steps SIZE=N`` SCVI runs N minibatches at that size, scaled to its epoch.

    python benchmarks/nb_epoch.py table nb_epoch.json   # the markdown table of NB_EPOCH.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import EpochClock, peak_rss_bytes, set_threads  # noqa: E402

PEERS_PY = Path(os.environ.get("PEERS_PYTHON", "/work/peers-venv/bin/python"))
SCVI_WIDTHS = {"n_hidden": 128, "n_layers": 2, "n_latent": 10, "gene_likelihood": "nb"}


class _BothClocks:
    """Stands in for the ``time`` module of fedarches.training: its perf_counter() is the wall
    clock, and each call also notes the process CPU time, so the one training epoch is
    measured in CPU seconds too (less sensitive to other work on a shared machine)."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, float]] = []

    def perf_counter(self) -> float:
        self.calls.append((time.perf_counter(), time.process_time()))
        return self.calls[-1][0]


class _CpuEpochClock(EpochClock):
    def __init__(self) -> None:
        super().__init__()
        self.cpu: list[float] = []

    def begin(self) -> None:
        super().begin()
        self._c0 = time.process_time()

    def end(self) -> None:
        super().end()
        self.cpu.append(time.process_time() - self._c0)


def _fed(a: argparse.Namespace) -> dict:
    import anndata as ad

    import fedarches.training as training
    from fedarches.config import TrainConfig
    from fedarches.model import FedArchesModel

    ref = ad.read_h5ad(a.data)
    clocks = _BothClocks()
    training.time = clocks  # type: ignore[assignment]
    model = FedArchesModel.train_reference(ref, "study", None, kind=a.kind, n_genes=ref.n_vars,
                                           train=TrainConfig(epochs=1, threads=1, seed=a.seed), progress=False)
    h = model.last_history
    (w0, c0), (w1, c1) = clocks.calls[1], clocks.calls[2]  # the loop's clock at the epoch's start and end
    assert abs((w1 - w0) - h.epoch_seconds[0]) < 1e-6
    return {"epoch_seconds": float(h.epoch_seconds[0]), "epoch_cpu_seconds": c1 - c0, "n_cells": int(ref.n_obs)}


def _scvi(a: argparse.Namespace) -> dict:
    import math

    import anndata as ad
    import scvi
    import torch
    from peers_runner import SCVI_ARCHES_PARAMS, _scvi_train

    torch.set_num_threads(1)
    scvi.settings.seed = a.seed
    scvi.settings.dl_num_workers = 0
    ref = ad.read_h5ad(a.data)
    scvi.model.SCVI.setup_anndata(ref, batch_key="study")
    model = scvi.model.SCVI(ref, **{**SCVI_ARCHES_PARAMS, **SCVI_WIDTHS})
    epochs, steps = _CpuEpochClock(), EpochClock()
    _scvi_train(model, 1, epochs, steps, a.steps, batch_size=128)
    n_train = len(model.train_indices)
    per_epoch = math.ceil(n_train / 128)
    scale = per_epoch / max(len(steps.times), 1)
    return {"epoch_seconds": epochs.times[0] * scale, "epoch_cpu_seconds": epochs.cpu[0] * scale,
            "measured_seconds": epochs.times[0], "steps_run": len(steps.times),
            "steps_per_epoch": per_epoch, "n_cells": int(ref.n_obs)}


def _child(a: argparse.Namespace) -> None:
    set_threads(1)
    out = _scvi(a) if a.tool == "scvi" else _fed(a)
    out["peak_rss_bytes"] = peak_rss_bytes()
    print("RESULT " + json.dumps(out), flush=True)


def _measure(tool: str, data: Path, kind: str, src: str | None, steps: int | None, seed: int) -> dict:
    py = str(PEERS_PY) if tool == "scvi" else sys.executable
    argv = [py, str(Path(__file__).resolve()), "child", "--tool", tool, "--data", str(data), "--kind", kind,
            "--seed", str(seed)]
    if steps:
        argv += ["--steps", str(steps)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    if src:
        env["PYTHONPATH"] = src
    load = os.getloadavg()[0]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        raise RuntimeError(f"{tool} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return {**json.loads(line[-1][7:]), "load_1min_before": load, "load_1min_after": os.getloadavg()[0]}


def _run(a: argparse.Namespace) -> None:
    scvi_steps = {int(k): int(v) for k, v in (s.split("=") for s in a.scvi_steps)}
    fed_trees = [("fedarches", a.src)] + [(f"fedarches@{Path(s).parent.name or s}", s) for s in a.fed_src]
    results: list[dict] = []
    for n in a.sizes:
        data = Path(a.data) / f"n{n}" / "ref.h5ad"
        for rep in range(a.reps):
            rotation = [(name, "nb", src) for name, src in fed_trees] + [("scvi-tools", "nb", None)]
            if "trvae" in a.kinds and rep < a.trvae_reps:
                rotation.insert(1, ("fedarches", "trvae", a.src))
            for tool, kind, src in rotation:
                r = _measure("scvi" if tool == "scvi-tools" else "fed", data, kind, src,
                             scvi_steps.get(n) if tool == "scvi-tools" else None, a.seed)
                r.update(tool=tool, kind=kind, size=n, rep=rep, src=src)
                results.append(r)
                print(f"[nb_epoch] n={n} rep={rep} {tool} {kind}: {r['epoch_seconds']:.2f} s/epoch "
                      f"(load {r['load_1min_before']:.1f})", flush=True)
                Path(a.out).write_text(json.dumps({"results": results}, indent=2) + "\n")


def _table(paths: list[str]) -> str:
    from statistics import median

    res = [r for p in paths for r in json.loads(Path(p).read_text())["results"]]
    rows = ["| cells | tool | model | wall s/epoch | CPU s/epoch | reps | load (1 min) before each | "
            "SCVI / this (wall) | SCVI / this (CPU) |", "|---|---|---|---|---|---|---|---|---|"]
    for n in sorted({r["size"] for r in res}):
        at = [r for r in res if r["size"] == n]
        scvi = median(r["epoch_seconds"] for r in at if r["tool"] == "scvi-tools")
        scvi_cpu = median(r["epoch_cpu_seconds"] for r in at if r["tool"] == "scvi-tools")
        for key in dict.fromkeys((r["tool"], r["kind"]) for r in at):
            rs = [r for r in at if (r["tool"], r["kind"]) == key]
            s = median(r["epoch_seconds"] for r in rs)
            c = median(r["epoch_cpu_seconds"] for r in rs)
            loads = ", ".join(f"{r['load_1min_before']:.1f}" for r in rs)
            ratio = "n/a | n/a" if key[0] == "scvi-tools" else f"{scvi / s:.2f}x | {scvi_cpu / c:.2f}x"
            how = ""
            if key[0] == "scvi-tools" and rs[0]["steps_run"] < rs[0]["steps_per_epoch"]:
                how = f" ({rs[0]['steps_run']} of {rs[0]['steps_per_epoch']} steps, scaled)"
            rows.append(f"| {n:,} | {key[0]} | {key[1]} | {s:.2f}{how} | {c:.2f} | {len(rs)} | {loads} | {ratio} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("child")
    c.add_argument("--tool", choices=["fed", "scvi"], required=True)
    c.add_argument("--data", required=True)
    c.add_argument("--kind", default="nb")
    c.add_argument("--steps", type=int, default=None)
    c.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run")
    r.add_argument("--data", default="/work/gen")
    r.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    r.add_argument("--reps", type=int, default=2)
    r.add_argument("--kinds", nargs="+", default=["nb", "trvae"])
    r.add_argument("--trvae-reps", type=int, default=1, help="reps that also time fedarches' trVAE")
    r.add_argument("--src", default=None, help="PYTHONPATH of the fedarches tree measured (default: installed)")
    r.add_argument("--fed-src", nargs="*", default=[], help="more fedarches trees (their src/) to interleave")
    r.add_argument("--scvi-steps", nargs="*", default=[], help="SIZE=STEPS: SCVI minibatches at that size")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", required=True)
    t = sub.add_parser("table")
    t.add_argument("json", nargs="+")
    a = p.parse_args()
    if a.cmd == "child":
        _child(a)
    elif a.cmd == "run":
        _run(a)
    else:
        print(_table(a.json))


if __name__ == "__main__":
    main()
