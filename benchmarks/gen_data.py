"""Generated data for the scale benchmark (fedarches' venv): fedarches.data.simulate.simulate
at ``--n`` reference cells and ``--n`` query cells x 2,000 genes, written as CSR h5ad
(counts in .X; nothing is ever densified beyond one chunk)."""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_bytes, write_json

N_GENES = 2000
REF_STUDIES = 3
QUERY_STUDIES = 3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, required=True, help="cells in the reference AND in the query")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    import numpy as np
    import scipy.sparse as sp

    from fedarches.data.simulate import simulate

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    sig = inspect.signature(simulate).parameters
    n_studies = REF_STUDIES + QUERY_STUDIES
    kw = {}
    for name, val in (("n_cells", 2 * a.n), ("n_genes", N_GENES), ("n_studies", n_studies), ("seed", a.seed)):
        if name in sig:
            kw[name] = val
    t0 = time.perf_counter()
    adata = simulate(**kw)
    gen = time.perf_counter() - t0
    if not sp.issparse(adata.X):
        raise SystemExit("simulate returned a dense matrix; the scale benchmark needs CSR")
    import anndata as ad

    x = adata.X if sp.isspmatrix_csr(adata.X) else sp.csr_matrix(adata.X)
    study = adata.obs["study"].astype(str).to_numpy()
    names = sorted(set(study))
    ref_names, q_names = names[:REF_STUDIES], names[REF_STUDIES:]
    is_ref = np.isin(study, ref_names)
    # simulate orders cells by study, so each side is one contiguous block of rows:
    # slice the CSR arrays directly (views + an int32 copy of the indices) instead of
    # fancy indexing, which would copy the whole 2n-cell matrix's share at int64.
    first_q = int(np.argmin(is_ref)) if not is_ref.all() else len(study)
    if not (is_ref[:first_q].all() and not is_ref[first_q:].any()):
        raise SystemExit("simulate did not return cells ordered by study; cannot split by rows")
    ip = x.indptr

    def rows(a: int, b: int) -> sp.csr_matrix:
        s0, s1 = int(ip[a]), int(ip[b])
        return sp.csr_matrix(
            (x.data[s0:s1], x.indices[s0:s1].astype(np.int32), (ip[a: b + 1] - s0).astype(np.int64)),
            shape=(b - a, x.shape[1]),
        )

    t0 = time.perf_counter()
    info = {}
    for side, (a0, b0) in (("ref", (0, min(first_q, a.n))), ("query", (first_q, min(len(study), first_q + a.n)))):
        obs = adata.obs.iloc[a0:b0][["study", "cell_type"]].copy()
        for c in obs:
            obs[c] = obs[c].astype(str).astype("category")
        part = ad.AnnData(X=rows(a0, b0), obs=obs, var=adata.var[[]].copy())
        part.write_h5ad(out / f"{side}.h5ad")
        info[side] = (int(part.n_obs), int(part.X.nnz))
        del part
    write = time.perf_counter() - t0
    n_ref, nnz_ref = info["ref"]
    n_q, _ = info["query"]
    density = nnz_ref / (n_ref * x.shape[1])
    write_json(out / "data.json", {
        "n_reference_cells": n_ref, "n_query_cells": n_q, "n_genes": int(x.shape[1]),
        "reference_studies": ref_names, "query_studies": q_names,
        "cell_types": sorted(set(adata.obs["cell_type"].astype(str))),
        "density": density, "nnz_reference": nnz_ref,
        "simulate_kwargs": kw, "generate_seconds": gen, "write_seconds": write,
        "peak_rss_bytes": peak_rss_bytes(),
        "description": f"fedarches.data.simulate.simulate({', '.join(f'{k}={v}' for k, v in kw.items())}); "
                       f"reference = studies {ref_names}, query = studies {q_names}; "
                       f"{100 * density:.1f}% non-zero; raw counts, float32 CSR",
    })


if __name__ == "__main__":
    main()
