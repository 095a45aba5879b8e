"""The atlas learns from a round (issue 9), through the real path: a CellBench reference without
A549 built with label summaries (version 1); site 1 (CELseq2_5cl_p2, labelled) maps with
--share-labels and its bundle is merged (version 2); site 2 (CELseq2_5cl_p3) mapped onto
version 2 gets its A549 cells labelled A549, where on version 1 they were Unknown. Real atlas
directory, real keys, signed bundles, the library entry points the CLI calls (Atlas.build /
merge / export_model, client.map_local); about 30 s on 2 cores.

Known types unchanged (within 0.01): the query-shift guard reads the score against the
reference's own labels, so site 2's many A549 cells, now scored low against the site-added
A549, do not lower it (docs/LABELS.md, "Growth"). ``grow(tmp, seed, kind)`` and ``scores`` are
what the seed sweep in docs/LABELS.md ran."""

from __future__ import annotations

import anndata as ad
import pytest

from conftest import shared_data


def grow(tmp, seed: int = 0, kind: str = "trvae") -> dict:
    """Version 1, site 1's shared labels merged into version 2, site 2 mapped onto both."""
    from fedarches.client import map_local
    from fedarches.config import MapSettings
    from fedarches.data.splits import CELLBENCH
    from fedarches.format.signing import keygen
    from fedarches.server import Atlas

    ref, query = CELLBENCH.load(shared_data(CELLBENCH.file))
    study = query.obs["study"].astype(str).to_numpy()
    site1, site2 = query[study == "CELseq2_5cl_p2"].copy(), query[study == "CELseq2_5cl_p3"].copy()
    atlas = Atlas.init(tmp / "atlas", "cellbench")
    atlas.build(ref, "study", "cell_type", kind=kind, seed=seed, threads=1, label_knowledge="summaries")
    for name in ("site-1", "site-2"):
        atlas.enroll(name, keygen(tmp / name).public)
    atlas.export_model(1, tmp / "v1")
    settings = MapSettings(seed=seed, threads=1)
    r1 = map_local(tmp / "v1", key=tmp / "site-1", site="site-1", data=site1, condition_key="study",
                   out_dir=tmp / "site-1-out", settings=settings.model_copy(update={"share_labels": "cell_type"}))
    merge = atlas.merge([r1.bundle_path])
    atlas.export_model(merge.version.number, tmp / "v2")
    out = {"atlas": atlas, "r1": r1, "merge": merge, "truth": site2.obs["cell_type"].astype(str).to_numpy()}
    for v in ("v1", "v2"):
        r = map_local(tmp / v, key=tmp / "site-2", site="site-2", data=site2, condition_key="study",
                      out_dir=tmp / f"site-2-{v}", settings=settings)
        out[v] = ad.read_h5ad(r.query_path).obs
    return out


def scores(grown: dict) -> dict[str, float]:
    """Site 2's A549 called Unknown (v1) and A549 (v2), its known-type accuracy on both."""
    truth = grown["truth"]
    a549 = truth == "A549"
    v1 = grown["v1"]["cell_type_pred"].astype(str).to_numpy()
    v2 = grown["v2"]["cell_type_pred"].astype(str).to_numpy()
    return {"a549_unknown_v1": float((v1[a549] == "Unknown").mean()), "a549_labelled_v2": float((v2[a549] == "A549").mean()),
            "known_accuracy_v1": float((v1[~a549] == truth[~a549]).mean()),
            "known_accuracy_v2": float((v2[~a549] == truth[~a549]).mean())}


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    return grow(tmp_path_factory.mktemp("growth"))


def test_site_1_labels_merge_into_version_2(grown):
    merge, atlas = grown["merge"], grown["atlas"]
    assert merge.version.number == 2 and not merge.label_conflicts
    added = {e.name: e for e in merge.version.labels}
    assert "A549" in added and added["A549"].site == "site-1" and added["A549"].cells >= 20
    v2 = atlas.version(2)
    assert v2.model.label_categories[-1] == "A549"
    assert all(c >= 20 for r in v2.labels for c in r.cells)
    assert grown["r1"].report.labels["shared"]["A549"] == added["A549"].cells


def test_site_2_gets_a549_on_version_2_and_keeps_known_types(grown):
    truth = grown["truth"]
    a549 = truth == "A549"
    assert a549.sum() >= 20
    s = scores(grown)
    assert s["a549_unknown_v1"] >= 0.9 and s["a549_labelled_v2"] >= 0.9, s
    assert s["known_accuracy_v1"] >= 0.97 and s["known_accuracy_v2"] >= s["known_accuracy_v1"] - 0.01, s
    v2 = grown["v2"]["cell_type_pred"].astype(str).to_numpy()
    errors = (v2 != truth) & ~a549
    # known cells are almost never called another known type or A549: a lone cell is flagged only
    # well beyond its threshold (labels/query_shift.py), so a rare edge cell keeps a wrong label
    assert (v2[errors] != "Unknown").sum() <= max(1, round(0.01 * (~a549).sum())), v2[errors]
