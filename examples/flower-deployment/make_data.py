"""Write generated example data: a reference (two studies, one cell type held out)
and one query file per site, each holding studies the reference never saw.

    python make_data.py OUT_DIR site-a site-b ...
"""

import sys
from pathlib import Path

from fedarches.data.simulate import simulate

out = Path(sys.argv[1])
sites = sys.argv[2:] or ["site-a", "site-b"]
out.mkdir(parents=True, exist_ok=True)
n_ref = 2
adata = simulate(n_cells=600 * (n_ref + len(sites)), n_genes=1000, n_cell_types=5,
                 n_studies=n_ref + len(sites), seed=0)
study = adata.obs["study"].astype(str)
ctype = adata.obs["cell_type"].astype(str)
studies = sorted(set(study))
held_out = sorted(set(ctype))[-1]
ref = adata[study.isin(studies[:n_ref]) & (ctype != held_out)].copy()
ref.write_h5ad(out / "reference.h5ad")
print(f"{out / 'reference.h5ad'}: {ref.n_obs} cells, studies {studies[:n_ref]}, without {held_out!r}")
for site, name in zip(sites, studies[n_ref:]):
    q = adata[study == name].copy()
    q.obs["study"] = f"{site}-{name}"  # condition names are global in the atlas: make them unique
    q.write_h5ad(out / f"{site}.h5ad")
    print(f"{out / f'{site}.h5ad'}: {q.n_obs} cells, study {site}-{name}")
