"""Out-of-core reference training: peak memory against the number of cells.

Subcommands (fedarches' venv; big ones under ``flock /work/tools/bigmem.lock``):

  gen   --n N --out FILE.h5ad   simulate N cells x 2,000 genes in chunks (simulate(cell_seed=)),
                                appending to a CSR h5ad with h5py: never more than one chunk in memory
  head  --src FILE --n N --out FILE   the first N cells of a generated file (same cells, same density)
  read  --data FILE             h5py row blocks against anndata's backed mode, interleaved
  train --data FILE [--memory]  one reference training run in this process; prints one JSON line with
                                peak RSS, wall seconds and seconds per step (training loop only)

Each ``train`` runs in its own process, so its peak RSS is that run's alone; the commands of one
run are in benchmarks/OUT_OF_CORE.md.

Figures go to benchmarks/OUT_OF_CORE.md, never into docstrings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_bytes  # noqa: E402

N_GENES = 2000
N_STUDIES = 3


def gen(n: int, out: Path, chunk: int, library_size: float, seed: int) -> None:
    import h5py
    import numpy as np
    import pandas as pd
    from anndata.io import write_elem

    from fedarches.data.simulate import simulate

    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    study, ctype, nnz = [], [], 0
    with h5py.File(out, "w") as f:
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        g = f.create_group("X")
        g.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (n, N_GENES)})
        data = g.create_dataset("data", (0,), dtype="float32", maxshape=(None,), chunks=(1 << 20,))
        indices = g.create_dataset("indices", (0,), dtype="int32", maxshape=(None,), chunks=(1 << 20,))
        indptr = [np.zeros(1, dtype=np.int64)]
        var = None
        for c, s in enumerate(range(0, n, chunk)):
            a = simulate(n_cells=min(chunk, n - s), n_genes=N_GENES, n_studies=N_STUDIES, seed=seed,
                         library_size=library_size, cell_seed=c)
            x = a.X
            for ds, arr in ((data, x.data), (indices, x.indices.astype(np.int32))):
                ds.resize((nnz + arr.size,))
                ds[nnz:] = arr
            indptr.append(x.indptr[1:].astype(np.int64) + nnz)
            nnz += x.nnz
            study.append(a.obs["study"].cat.codes.to_numpy())
            ctype.append(a.obs["cell_type"].cat.codes.to_numpy())
            cats = (a.obs["study"].cat.categories, a.obs["cell_type"].cat.categories)
            var = a.var[[]]
            print(f"chunk {c}: {s + x.shape[0]} cells, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        g.create_dataset("indptr", data=np.concatenate(indptr))
        obs = pd.DataFrame({
            "study": pd.Categorical.from_codes(np.concatenate(study), categories=cats[0]),
            "cell_type": pd.Categorical.from_codes(np.concatenate(ctype), categories=cats[1]),
        }, index=pd.Index([f"c{i}" for i in range(n)]))
        write_elem(f, "obs", obs)
        write_elem(f, "var", var)
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(f, key, {})
    print(json.dumps({"cells": n, "nnz": nnz, "density": nnz / (n * N_GENES), "library_size": library_size,
                      "seconds": round(time.perf_counter() - t0, 1), "bytes": out.stat().st_size,
                      "peak_rss_gib": round(peak_rss_bytes() / 2**30, 2)}))


def head(src: Path, n: int, out: Path) -> None:
    import h5py
    import numpy as np
    from anndata.io import read_elem, write_elem

    with h5py.File(src, "r") as f, h5py.File(out, "w") as o:
        o.attrs.update(dict(f.attrs))
        ip = f["X/indptr"][: n + 1]
        g = o.create_group("X")
        g.attrs.update(dict(f["X"].attrs))
        g.attrs["shape"] = (n, f["X"].attrs["shape"][1])
        for name in ("data", "indices"):
            end = int(ip[-1])
            d = g.create_dataset(name, (end,), dtype=f["X"][name].dtype, chunks=(1 << 20,))
            step = 1 << 26
            for s in range(0, end, step):
                d[s: min(end, s + step)] = f["X"][name][s: min(end, s + step)]
        g.create_dataset("indptr", data=np.asarray(ip, dtype=np.int64))
        write_elem(o, "obs", read_elem(f["obs"]).iloc[:n])
        for key in ("var", "obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(o, key, read_elem(f[key]))


def train(data: str, memory: bool, kind: str, steps: int | None, epochs: int, chunk_cells: int,
          buffer_chunks: int, label_key: str | None, threads: int) -> dict:
    import anndata as ad

    from fedarches.config import TrainConfig
    from fedarches.data.backed import ChunkSettings
    from fedarches.model import FedArchesModel

    if memory and steps is not None:
        _cap_in_memory_steps(steps)
    t0 = time.perf_counter()
    src = ad.read_h5ad(data) if memory else data
    loaded = time.perf_counter() - t0
    cfg = TrainConfig(epochs=epochs, threads=threads, device="cpu", early_stopping_patience=10**6)
    chunks = ChunkSettings(chunk_cells=chunk_cells, buffer_chunks=buffer_chunks, max_steps=steps)
    model = FedArchesModel.train_reference(src, "study", label_key, kind=kind, n_genes=N_GENES, train=cfg,
                                           progress=False, chunks=None if memory else chunks)
    h = model.last_history
    n = src.n_obs if memory else _n_cells(data)
    per_epoch = -(-(n - int(round(n * cfg.validation_fraction))) // cfg.batch_size)
    steps_done = h.epochs * (per_epoch if steps is None else min(steps, per_epoch))
    return {"data": data, "mode": "memory" if memory else "backed", "kind": kind, "label_key": label_key,
            "chunk_cells": chunk_cells, "buffer_chunks": buffer_chunks, "epochs": h.epochs,
            "cells": n, "steps": steps_done, "train_seconds": round(h.seconds, 2),
            "seconds_per_step": round(sum(h.epoch_seconds) / steps_done, 5), "epoch_seconds": [round(s, 2) for s in h.epoch_seconds],
            "read_seconds": round(loaded, 2), "wall_seconds": round(time.perf_counter() - t0, 2),
            "peak_rss_gib": round(peak_rss_bytes() / 2**30, 3), "loadavg_1m": os.getloadavg()[0],
            "final_loss": h.train_loss[-1]}


def read_speed(path: str, chunk_cells: int, max_cells: int) -> dict:
    """Seconds to read the first ``max_cells`` rows in blocks: h5py (fedarches.data.backed.CSRFile)
    against anndata's backed mode (``read_h5ad(backed="r").X[a:b]``), interleaved A/B/A/B."""
    import anndata as ad

    from fedarches.data.backed import CSRFile

    n = min(max_cells, _n_cells(path))
    out: dict[str, list[float]] = {"h5py": [], "anndata_backed": []}
    for _ in range(2):
        with CSRFile(path) as f:
            t0 = time.perf_counter()
            for s in range(0, n, chunk_cells):
                f.range(s, min(n, s + chunk_cells))
            out["h5py"].append(round(time.perf_counter() - t0, 2))
        a = ad.read_h5ad(path, backed="r")
        t0 = time.perf_counter()
        for s in range(0, n, chunk_cells):
            a.X[s: min(n, s + chunk_cells)]
        out["anndata_backed"].append(round(time.perf_counter() - t0, 2))
        a.file.close()
    return {"data": path, "cells": n, "chunk_cells": chunk_cells, **out, "loadavg_1m": os.getloadavg()[0]}


def _cap_in_memory_steps(steps: int) -> None:
    """The in-memory path has no step cap (ChunkSettings.max_steps is the backed path's): for the
    same number of steps in both, this harness caps the training minibatches of the real
    MatrixSource that train_reference builds (validation and everything else unchanged)."""
    import itertools

    import fedarches.model
    from fedarches.training import MatrixSource

    class CappedMatrixSource(MatrixSource):
        def minibatches(self, rows, batch_size, rng):  # type: ignore[no-untyped-def]
            it = super().minibatches(rows, batch_size, rng)
            return itertools.islice(it, steps) if rng is not None else it

    fedarches.model.MatrixSource = CappedMatrixSource  # type: ignore[misc]


def _n_cells(path: str) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        return int(f["X"].attrs["shape"][0])


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gen")
    g.add_argument("--n", type=int, required=True)
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--chunk", type=int, default=250_000)
    g.add_argument("--library-size", type=float, default=300.0,
                   help="expected UMIs per cell over the 2,000 genes (300: about 6.7%% non-zero)")
    g.add_argument("--seed", type=int, default=0)
    h = sub.add_parser("head")
    h.add_argument("--src", type=Path, required=True)
    h.add_argument("--n", type=int, required=True)
    h.add_argument("--out", type=Path, required=True)
    t = sub.add_parser("train")
    t.add_argument("--data", required=True)
    t.add_argument("--memory", action="store_true", help="read the whole file and train in memory")
    t.add_argument("--kind", default="trvae")
    t.add_argument("--steps", type=int, default=None, help="backed: minibatches per epoch (default: all)")
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--chunk-cells", type=int, default=65536)
    t.add_argument("--buffer-chunks", type=int, default=4)
    t.add_argument("--label-key", default=None)
    t.add_argument("--threads", type=int, default=1)
    r = sub.add_parser("read")
    r.add_argument("--data", required=True)
    r.add_argument("--chunk-cells", type=int, default=65536)
    r.add_argument("--max-cells", type=int, default=1_000_000)
    a = p.parse_args()
    if a.cmd == "gen":
        gen(a.n, a.out, a.chunk, a.library_size, a.seed)
    elif a.cmd == "read":
        print(json.dumps(read_speed(a.data, a.chunk_cells, a.max_cells)))
    elif a.cmd == "head":
        head(a.src, a.n, a.out)
    else:
        print(json.dumps(train(a.data, a.memory, a.kind, a.steps, a.epochs, a.chunk_cells, a.buffer_chunks,
                               a.label_key, a.threads)))


if __name__ == "__main__":
    main()
