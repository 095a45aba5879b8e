"""Write the generated data that federation.toml's [generate] table asks for: the
coordinator's reference (two studies, the last cell type left out) and one file per
[[site]] holding one study the reference never saw, at the paths the file names.

    python make_data.py [CONFIG]

The split is the one `fedarches demo` makes with one round (its ``_split_generated``),
so the sites reach the demo's label accuracy.
"""

from __future__ import annotations

import sys

from federation_config import load

from fedarches.data.conditions import ordered_conditions
from fedarches.data.simulate import simulate

N_REFERENCE_STUDIES = 2


def main(argv: list[str]) -> int:
    fed = load(argv[0] if argv else None)
    if fed.generate is None:
        print(f"{fed.path} has no [generate] table: nothing to generate")
        return 0
    g = fed.generate
    ckey, lkey = fed.condition_key, fed.label_key or "cell_type"
    n_studies = N_REFERENCE_STUDIES + len(fed.sites)
    adata = simulate(n_cells=g.get("cells-per-study", 600) * n_studies, n_genes=g.get("genes", 2000),
                     n_cell_types=g.get("cell-types", 6), n_studies=n_studies, seed=g.get("seed", 0))
    adata.obs = adata.obs.rename(columns={"study": ckey, "cell_type": lkey})
    studies = ordered_conditions(adata.obs[ckey])
    held_out = ordered_conditions(adata.obs[lkey])[-1]
    study = adata.obs[ckey].astype(str).to_numpy()
    ref = adata[(adata.obs[ckey].astype(str).isin(studies[:N_REFERENCE_STUDIES])
                 & (adata.obs[lkey].astype(str) != held_out)).to_numpy()].copy()
    fed.reference.parent.mkdir(parents=True, exist_ok=True)
    ref.write_h5ad(fed.reference)
    print(f"{fed.reference}: {ref.n_obs} cells x {ref.n_vars} genes, studies "
          f"{', '.join(studies[:N_REFERENCE_STUDIES])}, without {held_out!r}")
    for site, name in zip(fed.sites, studies[N_REFERENCE_STUDIES:]):
        q = adata[study == name].copy()
        q.obs[site.condition_key] = f"{site.name}-{name}"  # condition names are global in the atlas
        if site.condition_key != ckey:
            del q.obs[ckey]
        site.data.parent.mkdir(parents=True, exist_ok=True)
        q.write_h5ad(site.data)
        print(f"{site.data}: {q.n_obs} cells, study {site.name}-{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
