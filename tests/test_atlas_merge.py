"""Contribution intake and lineage merges (real signatures, real TUF repository, no training)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fedarches.cli import main
from fedarches.format.bundle import create_bundle
from fedarches.errors import (
    AtlasMismatchError,
    ConditionCollisionError,
    ContributionError,
    EnrollmentError,
    ParentError,
    SignatureError,
    TensorShapeError,
    UnknownVersionError,
)
from fedarches.server import Atlas
from fedarches.format.signing import generate_key, keygen
from test_atlas_support import bundle_for, enrolled_key, new_atlas, tree_digest


@pytest.fixture
def atlas(tmp_path) -> Atlas:
    return new_atlas(tmp_path)


def test_two_sites_merge_in_one_step_and_order_does_not_change_the_id(atlas, tmp_path):
    ka, kb = enrolled_key(atlas, "site-a"), enrolled_key(atlas, "site-b")
    a = bundle_for(atlas, ka, "site-a", ["qa"], seed=1)
    b = bundle_for(atlas, kb, "site-b", ["qb1", "qb2"], seed=2)
    twin = Atlas(shutil.copytree(atlas.path, tmp_path / "twin"))
    r1 = atlas.merge([a, b])
    r2 = twin.merge([b, a])
    (v1,), (v2,) = r1.published, r2.published
    assert v1.number == v2.number == 2
    assert v1.id == v2.id
    blob = atlas.version(2).blobs["conditions.safetensors"]
    assert blob == twin.version(2).blobs["conditions.safetensors"]
    target = f"blobs/{blob.sha256}.safetensors"
    assert atlas.repo.read_target(target) == twin.repo.read_target(target)
    assert v1.parents == [atlas.version(1).id]
    assert [(c.name, c.site) for c in v1.conditions] == [
        ("s0", "coordinator"),
        ("s1", "coordinator"),
        ("qa", "site-a"),
        ("qb1", "site-b"),
        ("qb2", "site-b"),
    ]
    version = atlas.version(2)
    assert version.model.files["weights.safetensors"] == atlas.version(1).model.files["weights.safetensors"]
    rec = {c.name: c for c in version.conditions}
    assert rec["qa"].metrics["label_transfer.accuracy_known"] == 0.9 and rec["qa"].introduced_in == 2


def test_identical_resubmission_is_a_no_op_and_a_collision_is_refused(atlas):
    ka, kb = enrolled_key(atlas, "site-a"), enrolled_key(atlas, "site-b")
    a = bundle_for(atlas, ka, "site-a", ["qa"])
    atlas.merge([a])
    before = tree_digest(atlas.path)
    again = atlas.merge([a])
    assert again.published == [] and again.unchanged == [f"<{len(a)} bytes>"]
    assert tree_digest(atlas.path) == before
    with pytest.raises(ConditionCollisionError, match="condition collision: 'qa'.*site-a"):
        atlas.merge([bundle_for(atlas, ka, "site-a", ["qa"], seed=7)])  # a site adds its study once
    with pytest.raises(ConditionCollisionError, match="condition collision: 's0'"):
        atlas.merge([bundle_for(atlas, kb, "site-b", ["s0"], seed=7)])  # reference studies are everyone's
    assert tree_digest(atlas.path) == before


def test_two_bundles_of_one_site_claiming_one_name_refuse_both(atlas):
    ka, kb, kc = (enrolled_key(atlas, s) for s in ("site-a", "site-b", "site-c"))
    a1 = bundle_for(atlas, ka, "site-a", ["dup"], seed=1)
    a2 = bundle_for(atlas, ka, "site-a", ["dup"], seed=2)
    b = bundle_for(atlas, kb, "site-b", ["dup"], seed=4)  # another site's "dup" is its own
    c = bundle_for(atlas, kc, "site-c", ["fine"], seed=3)
    before = tree_digest(atlas.path)
    with pytest.raises(ConditionCollisionError, match="claimed by several bundles"):
        atlas.merge([a1, a2, c])
    assert tree_digest(atlas.path) == before
    r = atlas.merge([a2, c, a1, b], skip_invalid=True)
    assert len(r.rejected) == 2 and all("dup" in x.error for x in r.rejected)
    assert {x.check for x in r.rejected} == {ConditionCollisionError.check}
    assert [o.status for o in r.outcomes] == ["rejected", "accepted", "rejected", "accepted"]
    assert [(c.name, c.site) for c in r.published[0].conditions][-2:] == [("dup", "site-b"), ("fine", "site-c")]


def test_unenrolled_and_wrongly_signed_bundles_are_refused(atlas, tmp_path, capsys):
    stranger = generate_key()
    enrolled_key(atlas, "site-a")
    before = tree_digest(atlas.path)
    with pytest.raises(EnrollmentError, match="enrollment check failed: .*'site-x'.*not enrolled"):
        atlas.merge([bundle_for(atlas, stranger, "site-x", ["q"])])
    with pytest.raises(SignatureError, match="signature check failed"):
        atlas.merge([bundle_for(atlas, stranger, "site-a", ["q"])])  # claims to be site-a
    path = tmp_path / "b.safetensors"
    path.write_bytes(bundle_for(atlas, stranger, "site-x", ["q"]))
    assert main(["atlas", "merge", str(atlas.path), str(path)]) == 2
    assert "enrollment check failed" in capsys.readouterr().err
    assert tree_digest(atlas.path) == before


def test_bundle_on_a_never_published_version_is_refused(atlas):
    key = enrolled_key(atlas, "site-a")
    v1 = atlas.version(1)
    forged = create_bundle(
        key=key,
        site="site-a",
        atlas=atlas.name,
        parent="f" * 64,
        parent_number=1,
        strategy="conditions",
        tensors={
            "encoder/q": torch.zeros(v1.model.config.encoder_width),
            "decoder/q": torch.zeros(v1.model.config.decoder_width),
        },
    )
    before = tree_digest(atlas.path)
    with pytest.raises(ParentError, match="parent check failed: .*never published"):
        atlas.merge([forged])
    other = Atlas.init(atlas.path.parent / "other", "other")
    with pytest.raises(AtlasMismatchError, match="atlas check failed"):
        atlas.merge(
            [
                create_bundle(
                    key=key,
                    site="site-a",
                    atlas=other.name,
                    parent=v1.id,
                    parent_number=1,
                    strategy="conditions",
                    tensors={"encoder/q": torch.zeros(128)},
                )
            ]
        )
    assert tree_digest(atlas.path) == before


def test_wrong_shapes_and_non_finite_values_are_refused(atlas):
    key = enrolled_key(atlas, "site-a")
    v1 = atlas.version(1)
    cfg = v1.model.config
    good = {"encoder/q": torch.zeros(cfg.encoder_width), "decoder/q": torch.zeros(cfg.decoder_width)}

    def make(tensors):
        return create_bundle(
            key=key,
            site="site-a",
            atlas=atlas.name,
            parent=v1.id,
            parent_number=1,
            strategy="conditions",
            tensors=tensors,
        )

    with pytest.raises(TensorShapeError, match="tensor shape check failed: encoder/q"):
        atlas.merge([make({**good, "encoder/q": torch.zeros(cfg.encoder_width + 1)})])
    with pytest.raises(TensorShapeError, match="tensor shape check failed"):
        atlas.merge([make({"encoder/q": good["encoder/q"]})])  # missing its decoder vector
    with pytest.raises(TensorShapeError, match="tensor shape check failed"):
        atlas.merge([make({**good, "other/q": torch.zeros(4)})])
    assert len(atlas.log()) == 1


def test_late_bundle_on_an_older_main_version_lands_on_the_head(atlas):
    ka, kb = enrolled_key(atlas, "site-a"), enrolled_key(atlas, "site-b")
    late = bundle_for(atlas, kb, "site-b", ["qb"], version=1)
    atlas.merge([bundle_for(atlas, ka, "site-a", ["qa"])])
    (v3,) = atlas.merge([late]).published
    assert v3.number == 3 and v3.parent_numbers == [2, 1]
    assert [c.name for c in v3.conditions] == ["s0", "s1", "qa", "qb"]


def test_shared_weight_strategies_become_a_branch(atlas):
    key = enrolled_key(atlas, "site-a")
    v1 = atlas.version(1)
    weights = {}
    from safetensors.torch import load

    w = load(atlas.repo.read_target(f"blobs/{v1.blobs['weights.safetensors'].sha256}.safetensors"))
    name = sorted(w)[0]
    weights[f"shared/weights.safetensors/{name}"] = w[name] + 1.0
    with pytest.raises(ContributionError, match="strategy 'conditions'"):
        bundle_for(atlas, key, "site-a", ["qf"], extra=weights)
    r = atlas.merge([bundle_for(atlas, key, "site-a", ["qf"], strategy="full", extra=weights)])
    (branch,) = r.published
    assert branch.branch == "site-a/full@v1" and branch.parent_numbers == [1]
    assert r.head.number == 1, "a branch must never move the main line"
    bv = atlas.version(branch.number)
    assert bv.model.files["weights.safetensors"] != v1.model.files["weights.safetensors"]
    assert "reference.safetensors" not in bv.blobs and bv.model.label_key is None
    # a conditions-only bundle built on the branch lands on the branch, not on main
    (on_branch,) = atlas.merge([bundle_for(atlas, key, "site-a", ["qg"], version=branch.number)]).published
    assert on_branch.branch == branch.branch and atlas.head().number == 1


def test_enrollment_rules_and_cli_log(atlas, tmp_path, capsys):
    k = keygen(tmp_path / "key")
    assert main(["atlas", "enroll", str(atlas.path), "--site", "site-a", "--public-key", str(k.public)]) == 0
    assert main(["atlas", "enroll", str(atlas.path), "--site", "site-a", "--public-key", str(k.public)]) == 0
    with pytest.raises(EnrollmentError, match="already enrolled for site 'site-a'"):
        atlas.enroll("site-b", k.public)
    with pytest.raises(EnrollmentError, match="already enrolled with key"):
        atlas.enroll("site-a", generate_key().public)
    capsys.readouterr()
    assert main(["atlas", "log", str(atlas.path), "--json"]) == 0
    log = json.loads(capsys.readouterr().out)
    assert [v["number"] for v in log] == [1]
    assert {"number", "id", "parents", "branch", "conditions"} <= set(log[0])
    assert log[0]["conditions"] == [{"name": "s0", "site": "coordinator"}, {"name": "s1", "site": "coordinator"}]


def test_unknown_version_is_a_verification_error(atlas):
    with pytest.raises(UnknownVersionError, match="version check failed"):
        atlas.version(7)
    with pytest.raises(UnknownVersionError):
        atlas.version("0" * 64)
