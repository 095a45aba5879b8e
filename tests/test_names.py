"""The one name policy (issue 12 item 6), at the site, at intake and at enrolment.

Each bad name of the issue is refused three times over: by ``plan_contribution``
and ``fedarches site map`` before anything trains, by the coordinator when a
hostile site signs a bundle carrying it anyway, and (for site names) at
enrolment. No training anywhere: the atlas is built straight from the torch
module (``test_atlas_support``).
"""

from __future__ import annotations

import contextlib
import io
from re import escape as _re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from safetensors.torch import save as st_save

from fedarches.cli import main
from fedarches.client.plan import plan_contribution
from fedarches.errors import BundleContentError, ConditionCollisionError, InvalidNameError
from fedarches.format import bundle as bundle_format
from fedarches.format.bundle import META_MANIFEST, META_SIGNATURE, BundleManifest, TensorEntry, read_bundle
from fedarches.format.canonical import canonical_json, tensor_sha256
from fedarches.format.names import MAX_NAME_CHARS, check_name, check_new_names, skeleton
from fedarches.format.signing import PrivateKey, b64encode, generate_key, keygen
from fedarches.server import Atlas
from fedarches.server.http import serve_atlas
from test_atlas_support import N_GENES, condition_vectors, enrolled_key, new_atlas, tree_digest

HELD = ["s0", "s1"]  # the reference conditions of ``new_atlas``

# (name, what the message must say) for every bad condition name of the issue and a few more.
BAD_ALONE = [
    ("../x", "path separator"),
    ("/etc/passwd", "path separator"),
    ("..", "starts with '.'"),
    (".", "starts with '.'"),
    ("a/b", "path separator"),
    ("a\\b", "path separator"),
    (" ", "whitespace"),
    ("study ", "whitespace"),
    (" study", "whitespace"),
    ("s\u200b0", "U+200B"),  # zero-width space inside a look-alike of s0
    ("\u202eabc", "U+202E"),  # right-to-left override
    ("a\x7fb", "U+007F"),  # DEL
    ("a\x85b", "U+0085"),  # C1 control (NEL)
    ("a\nb", "U+000A"),
    ("a\tb", "U+0009"),
    ("", "is empty"),
    ("x" * (MAX_NAME_CHARS + 1), "character limit"),
    ("\ufb01le", "NFKC"),  # the "fi" ligature
    ("a\u00a0b", "U+00A0"),  # no-break space
    ("nan", "reserved"),
    ("None", "reserved"),
]
# Bad only next to the held names s0, s1.
BAD_EXISTING = [
    ("S0", "differs only in case from existing name 's0'"),
    ("\u04550", "looks like existing name 's0'"),  # Cyrillic dze + 0
    ("\u0405\u0031", "looks like existing name 's1'"),  # Cyrillic capital dze + 1
]
BAD = BAD_ALONE + BAD_EXISTING
GOOD = ["study 1", "Z\u00fcrich_1", "2024-batch-07", "\u6771\u4eac", "patient.3", "s0-b", "Stra\u00dfe"]


# ------------------------------------------------------------------ the policy


@pytest.mark.parametrize(("name", "why"), BAD_ALONE)
def test_each_rule_is_named(name, why):
    with pytest.raises(InvalidNameError, match="^name check failed: condition name .*" + _re(why)) as err:
        check_name(name, kind="condition")
    assert err.value.check == "name check"
    assert "\n" not in str(err.value) and "\u202e" not in str(err.value)  # one printable line


@pytest.mark.parametrize(("name", "why"), BAD_EXISTING)
def test_case_and_lookalikes_of_existing_names_are_refused(name, why):
    with pytest.raises(InvalidNameError, match=_re(why)):
        check_name(name, kind="condition", existing=HELD)


def test_other_inputs_and_suggestions():
    with pytest.raises(InvalidNameError, match="surrogate"):
        check_name("a\ud800", kind="condition")
    with pytest.raises(InvalidNameError, match="not text"):
        check_name(3, kind="condition")  # type: ignore[arg-type]
    with pytest.raises(InvalidNameError, match="use 'file' instead"):
        check_name("\ufb01le", kind="condition")
    with pytest.raises(InvalidNameError, match="already taken"):
        check_name("s0", kind="condition", existing=HELD)
    with pytest.raises(InvalidNameError, match="looks like existing name 'Study'"):
        check_new_names(["Study", "\u0405tudy"], kind="condition")  # two new names of one site
    assert skeleton("\u0421\u041e\u0410\u0422") == skeleton("coat") == "coat"  # Cyrillic caps
    assert skeleton("\u039a\u0391\u03a4\u0395") == "kate"  # Greek caps


@pytest.mark.parametrize("name", GOOD)
def test_good_names_pass(name):
    assert check_name(name, kind="condition", existing=HELD) == name


def test_the_bundle_header_bound_uses_the_same_length_limit():
    assert bundle_format.MAX_NAME_CHARS == MAX_NAME_CHARS


# ------------------------------------------------------------------- the site


def _query(names) -> ad.AnnData:
    n = 4 * len(names)
    rng = np.random.default_rng(0)
    a = ad.AnnData(X=rng.poisson(2.0, size=(n, N_GENES)).astype(np.float32))
    a.var_names = [f"g{i}" for i in range(N_GENES)]
    a.obs_names = [f"c{i}" for i in range(n)]
    a.obs["study"] = pd.Categorical([names[i % len(names)] for i in range(n)])
    return a


@pytest.mark.parametrize(("name", "why"), BAD)
def test_plan_refuses_bad_new_names(name, why):
    with pytest.raises(InvalidNameError, match=_re(why)):
        plan_contribution(_query(["s0", "fine", name]), "study", HELD, conditions_per_round=1)


def test_plan_keeps_good_names():
    plan = plan_contribution(_query(["s0", *GOOD]), "study", HELD)
    assert plan.held == ["s0"] and sorted(plan.new) == sorted(GOOD)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("names-site")
    atlas = new_atlas(tmp)
    key = keygen(tmp / "key")
    atlas.enroll("site-a", key.public)
    server = serve_atlas(atlas, "127.0.0.1", 0)
    try:
        yield {"tmp": tmp, "atlas": atlas, "url": server.url}
    finally:
        server.close()


@pytest.mark.parametrize(("name", "why"), BAD)
def test_site_map_refuses_bad_names_before_training(served, tmp_path, name, why):
    data = tmp_path / "query.h5ad"
    _query(["fine", name]).write_h5ad(data)
    out = tmp_path / "out"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["site", "map", "--atlas", served["url"], "--trust", str(served["atlas"].root_json),
                     "--key", str(served["tmp"] / "key"), "--site", "site-a", "--data", str(data),
                     "--condition-key", "study", "--quiet", "--cache", str(served["tmp"] / "cache"),
                     "--out", str(out), "--epochs", "1", "--threads", "1"])
    assert code == 2, err.getvalue()
    assert "name check failed" in err.getvalue() and why in err.getvalue()
    assert not out.exists()  # nothing trained, nothing written
    assert not list(tmp_path.glob(".out*"))  # no staging folder left either


# ------------------------------------------------------------------ intake


def forged_bundle(atlas: Atlas, key: PrivateKey, site: str, names) -> bytes:
    """A signed bundle as a hostile enrolled site builds it, skipping the site's own name check."""
    v = atlas.version(1)
    tensors = dict(sorted(condition_vectors(atlas, names).items()))
    manifest = BundleManifest(
        atlas=atlas.name, site=site, key_id=key.public.key_id, parent=v.id, parent_number=v.number,
        strategy="conditions", conditions=sorted(names),
        tensors={k: TensorEntry(sha256=tensor_sha256(t), shape=list(t.shape), dtype="float32")
                 for k, t in tensors.items()},
    )
    text = canonical_json(manifest)
    return st_save(tensors, metadata={META_MANIFEST: text.decode(), META_SIGNATURE: b64encode(key.sign(text))})


@pytest.fixture
def atlas(tmp_path) -> Atlas:
    return new_atlas(tmp_path)


def test_a_forged_bundle_with_good_names_is_merged(atlas):
    key = enrolled_key(atlas, "site-a")
    (v2,) = atlas.merge([forged_bundle(atlas, key, "site-a", GOOD)]).published
    assert sorted(c.name for c in v2.conditions) == sorted(HELD + GOOD)


@pytest.mark.parametrize(("name", "why"), BAD)
def test_intake_refuses_bad_names(atlas, name, why):
    key = enrolled_key(atlas, "site-a")
    data = forged_bundle(atlas, key, "site-a", [name])
    before = tree_digest(atlas.path)
    # an empty name already breaks the tensor key ("encoder/"), which is checked first
    refusal = BundleContentError if name == "" else InvalidNameError
    with pytest.raises(refusal, match=None if name == "" else _re(why)):
        atlas.merge([data])
    assert tree_digest(atlas.path) == before
    if (name, why) in BAD_ALONE:
        with pytest.raises(refusal):
            read_bundle(data)  # refused on its own, before the signature is even looked at


def test_intake_checks_against_the_target_and_within_the_bundle(atlas):
    ka, kb = enrolled_key(atlas, "site-a"), enrolled_key(atlas, "site-b")
    atlas.merge([forged_bundle(atlas, ka, "site-a", ["Study"])])
    # a site's names are checked against its own conditions and the reference studies
    with pytest.raises(InvalidNameError, match="looks like existing name 'Study'"):
        atlas.merge([forged_bundle(atlas, ka, "site-a", ["\u0405tudy"])])  # on version 1, lands on 2
    with pytest.raises(ConditionCollisionError):
        atlas.merge([forged_bundle(atlas, ka, "site-a", ["Study", "more"])])  # the same name stays a collision
    with pytest.raises(InvalidNameError, match="differs only in case from existing name 's0'"):
        atlas.merge([forged_bundle(atlas, kb, "site-b", ["S0"])])  # reference studies are everyone's
    with pytest.raises(InvalidNameError, match="differs only in case"):
        atlas.merge([forged_bundle(atlas, kb, "site-b", ["other", "OTHER"])])
    # another site's name is no clash: site-b's "Study" is its own condition
    (v3,) = atlas.merge([forged_bundle(atlas, kb, "site-b", ["Study"])]).published
    assert [(c.name, c.site) for c in v3.conditions][-2:] == [("Study", "site-a"), ("Study", "site-b")]


def test_skip_invalid_keeps_the_good_bundle(atlas):
    ka, kb = enrolled_key(atlas, "site-a"), enrolled_key(atlas, "site-b")
    res = atlas.merge([forged_bundle(atlas, ka, "site-a", ["../x"]), forged_bundle(atlas, kb, "site-b", ["qb"])],
                      skip_invalid=True)
    assert [o.status for o in res.outcomes] == ["rejected", "accepted"]
    assert res.outcomes[0].check == "name check"


# ----------------------------------------------------------------- enrolment


@pytest.mark.parametrize(
    ("site", "why"),
    [
        ("coordinator ", "whitespace"),
        ("Coordinator", "reserved"),
        ("c\u043e\u043erdinator", "reserved"),  # Cyrillic o's
        ("site-a ", "whitespace"),
        ("SITE-A", "differs only in case from existing name 'site-a'"),
        ("\u0455ite-a", "looks like existing name 'site-a'"),
        ("", "is empty"),
        ("a/b", "path separator"),
        ("\u202esite", "U+202E"),
        ("..", "starts with '.'"),
    ],
)
def test_enrolment_refuses_bad_site_names(atlas, site, why):
    enrolled_key(atlas, "site-a")
    registry = atlas.path / "sites.json"
    before = registry.read_bytes()
    with pytest.raises(InvalidNameError, match="^name check failed: site name .*" + _re(why)):
        atlas.enroll(site, generate_key().public)
    assert registry.read_bytes() == before


def test_enrolment_accepts_good_site_names_and_the_cli_refuses_bad_ones(atlas, tmp_path):
    for site in ("site-b", "Z\u00fcrich_1", "lab 3", "site-a"):
        enrolled_key(atlas, site)
    key = keygen(tmp_path / "k")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["atlas", "enroll", str(atlas.path), "--site", "Coordinator", "--public-key", str(key.public)])
    assert code == 2 and "name check failed: site name 'Coordinator' is reserved" in err.getvalue()
