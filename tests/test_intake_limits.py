"""Intake limits: the exact size formula, manifest/tensor agreement, bounded metrics, hostile JSON.

Issue 12 items 1 and 5: a padded bundle, a signed manifest that lies about
dtypes, huge metrics and pre-authentication JSON bombs are each refused with
their own check, and ``skip_invalid`` still publishes the good bundles given
with them. The byte-level forgery helpers here are shared with
``test_fuzz_intake.py``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

import pytest
import torch
from safetensors.torch import save as st_save

from fedarches.cli import main
from fedarches.config import ModelConfig
from fedarches.errors import (
    BundleContentError,
    BundleFormatError,
    BundleManifestError,
    BundleMetricsError,
    BundleSizeError,
    TensorShapeError,
)
from fedarches.format.bundle import (
    META_MANIFEST,
    META_SIGNATURE,
    audit_bundle,
    check_size,
    create_bundle,
    max_header_bytes,
    read_bundle,
)
from fedarches.format.canonical import canonical_json, tensor_sha256
from fedarches.format.metrics import MAX_METRIC_INT, sanitize_metrics
from fedarches.format.signing import PrivateKey, b64encode, generate_key
from test_atlas_support import bundle_for, enrolled_key, new_atlas, random_condition_vectors, tree_digest


def split(data: bytes) -> tuple[bytes, bytes]:
    """(header bytes, tensor bytes) of a safetensors file."""
    (n,) = struct.unpack("<Q", data[:8])
    return data[8 : 8 + n], data[8 + n :]


def with_header(header: bytes, body: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + body


def rewrite_header(data: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """The bundle with its header JSON edited and written compactly (aligned to 8)."""
    raw, body = split(data)
    header = json.loads(raw)
    edit(header)
    new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return with_header(new + b" " * (-len(new) % 8), body)


def resign(data: bytes, key: PrivateKey, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """The bundle with its manifest edited and signed again by ``key`` (what a hostile enrolled site can send)."""

    def change(header: dict[str, Any]) -> None:
        manifest = json.loads(header["__metadata__"][META_MANIFEST])
        edit(manifest)
        text = canonical_json(manifest)
        header["__metadata__"][META_MANIFEST] = text.decode()
        header["__metadata__"][META_SIGNATURE] = b64encode(key.sign(text))

    return rewrite_header(data, change)


def replace_manifest_text(data: bytes, text: str) -> bytes:
    """The bundle with its manifest string replaced (signature left as it was)."""

    def change(header: dict[str, Any]) -> None:
        header["__metadata__"][META_MANIFEST] = text

    return rewrite_header(data, change)


# ------------------------------------------------------------------ size formula


def test_a_padded_bundle_is_refused_against_the_formula(tmp_path):
    atlas = new_atlas(tmp_path)
    key = enrolled_key(atlas, "site-a")
    data = bundle_for(atlas, key, "site-a", ["q1"])
    cfg = atlas.version(1).model.config
    assert audit_bundle(data, cfg)["size_matches_formula"]
    raw, body = split(data)
    padded = with_header(raw + b" " * (901_888 - len(data)), body)
    assert len(padded) == 901_888
    before = tree_digest(atlas.path)
    for check in (read_bundle, lambda d: audit_bundle(d, cfg), atlas.verify_bundle):
        with pytest.raises(BundleSizeError, match="^bundle size check failed"):
            check(padded)
    # whitespace inside the JSON is padding too
    spaced = with_header(json.dumps(json.loads(raw), indent=4).encode(), body)
    with pytest.raises(BundleSizeError):
        read_bundle(spaced)
    assert tree_digest(atlas.path) == before


def test_intake_checks_the_formula_against_the_parent_model(tmp_path):
    atlas = new_atlas(tmp_path)
    key = enrolled_key(atlas, "site-a")
    v = atlas.version(1)
    wider = ModelConfig.paper_defaults("nb", 20)  # adds a dispersion vector the atlas model lacks
    assert wider.condition_parameter_count(1) != v.model.config.condition_parameter_count(1)
    data = create_bundle(
        key=key, site="site-a", atlas=atlas.name, parent=v.id, parent_number=1, strategy="conditions",
        tensors=random_condition_vectors(wider, ["q1"]),
    )
    with pytest.raises(TensorShapeError):  # the more specific message comes first
        atlas.verify_bundle(data)
    assert not audit_bundle(data, v.model.config)["size_matches_formula"]
    with pytest.raises(BundleSizeError, match="4 x 148"):
        check_size(read_bundle(data), v.model.config)


def test_the_header_is_bounded_per_condition():
    cfg = ModelConfig.paper_defaults("trvae", 50)
    data = create_bundle(
        key=generate_key(), site="s", atlas="x" * 100_000,
        parent="a" * 64, parent_number=1, strategy="conditions", tensors=random_condition_vectors(cfg, ["q1"]),
    )
    b = read_bundle(data)
    assert b.header_size > max_header_bytes(1)
    with pytest.raises(BundleSizeError, match="header"):
        check_size(b, cfg)
    assert not audit_bundle(data, cfg)["size_matches_formula"]


# ------------------------------------------------------------ manifest vs tensors


def test_a_signed_manifest_lying_about_dtype_is_refused(tmp_path):
    atlas = new_atlas(tmp_path)
    key = enrolled_key(atlas, "site-a")
    data = bundle_for(atlas, key, "site-a", ["q1"])

    def int8(m: dict[str, Any]) -> None:
        for entry in m["tensors"].values():
            entry["dtype"] = "int8"

    forged = resign(data, key, int8)
    with pytest.raises(BundleContentError, match="as int8, the file holds float32"):
        read_bundle(forged)
    with pytest.raises(BundleContentError):
        atlas.verify_bundle(forged)


def test_only_float32_condition_tensors(tmp_path):
    cfg = ModelConfig.paper_defaults("trvae", 50)
    key = generate_key()
    doubles = {k: t.double() for k, t in random_condition_vectors(cfg, ["q1"]).items()}
    with pytest.raises(BundleContentError, match="float64, bundles carry float32"):
        create_bundle(key=key, site="s", atlas="demo", parent="a" * 64, parent_number=1,
                      strategy="conditions", tensors=doubles)
    # a correctly signed float64 bundle made by hand is refused at read as well
    good = create_bundle(key=key, site="s", atlas="demo", parent="a" * 64, parent_number=1,
                         strategy="conditions", tensors=random_condition_vectors(cfg, ["q1"]))
    raw, _ = split(good)
    meta = json.loads(raw)["__metadata__"]
    manifest = json.loads(meta[META_MANIFEST])
    for k, t in doubles.items():
        manifest["tensors"][k] = {"sha256": tensor_sha256(t), "shape": list(t.shape), "dtype": "float64"}
    text = canonical_json(manifest)
    forged = st_save(doubles, metadata={META_MANIFEST: text.decode(), META_SIGNATURE: b64encode(key.sign(text))})
    with pytest.raises(BundleContentError, match="float64, bundles carry float32"):
        read_bundle(forged)


# ------------------------------------------------------------------ metrics


def test_metric_bounds_in_the_one_sanitiser():
    got = sanitize_metrics({
        "ok": 0.5, "big": 3e38, "edge": 1e12, "over": 1.0001e12, "n": MAX_METRIC_INT, "n2": MAX_METRIC_INT + 1,
        "neg": -MAX_METRIC_INT - 1, "digits": 10**400, "text": "x" * 200, "long": "x" * 201, "ctl": "a\nb",
        "c1": "a\x85b", "t": torch.tensor(2.5), "tbig": torch.tensor(1e30),
    })
    assert got == {"ok": 0.5, "edge": 1e12, "n": MAX_METRIC_INT, "text": "x" * 200, "t": 2.5}
    assert MAX_METRIC_INT < 2**63


@pytest.mark.parametrize(
    "value,error",
    [("1" * 401, BundleManifestError), ("1" * 25, BundleMetricsError), (repr(3e38), BundleMetricsError),
     (repr(-2e12), BundleMetricsError)],
)
def test_huge_metrics_are_refused_at_read(tmp_path, value, error):
    atlas = new_atlas(tmp_path)
    key = enrolled_key(atlas, "site-a")
    good = bundle_for(atlas, key, "site-a", ["q1"])
    marker = 987654321

    def edit(m: dict[str, Any]) -> None:
        m["metrics"]["huge"] = marker

    forged = resign(good, key, edit)
    forged = _replace_in_manifest(forged, str(marker), value)
    with pytest.raises(error):
        read_bundle(forged)
    result = atlas.merge([forged, good], skip_invalid=True)
    assert [o.status for o in result.outcomes] == ["rejected", "accepted"]
    assert result.outcomes[0].check == error.check
    assert "huge" not in json.dumps([atlas.version(n).model_dump(mode="json") for n in (1, 2)])


def _replace_in_manifest(data: bytes, old: str, new: str) -> bytes:
    """Swap a number's text inside the manifest (no JSON round trip, so Python never parses it)."""
    raw, body = split(data)
    header = raw.rstrip(b" ").replace(old.encode(), new.encode())
    return with_header(header + b" " * (-len(header) % 8), body)


# ------------------------------------------- pre-authentication JSON bombs, skip_invalid


def _bombs(good: bytes) -> dict[str, bytes]:
    raw, body = split(good)
    inner = raw.rstrip(b" ")
    digits = b"7" * 5000
    deep = b"[" * 100_000 + b"]" * 100_000
    header_int = inner[:-1] + b',"x":' + digits + b"}"
    header_deep = inner[:-1] + b',"x":' + deep + b"}"
    return {
        "header integer": with_header(header_int, body),
        "header nesting": with_header(header_deep, body),
        "manifest integer": replace_manifest_text(good, '{"parent_number":' + "7" * 5000 + "}"),
        "manifest nesting": replace_manifest_text(good, '{"a":' + "[" * 100_000 + "]" * 100_000 + "}"),
    }


def test_json_bombs_are_refused_and_skip_invalid_keeps_the_good_bundle(tmp_path, capsys):
    atlas = new_atlas(tmp_path)
    key = enrolled_key(atlas, "site-a")
    good = bundle_for(atlas, key, "site-a", ["q1"])
    bombs = _bombs(good)
    for what, data in bombs.items():
        cls = BundleFormatError if what.startswith("header") else BundleManifestError
        with pytest.raises(cls, match=f"^{cls.check} failed"):
            read_bundle(data)
    result = atlas.merge([*bombs.values(), good], skip_invalid=True)
    statuses = [(o.status, o.check) for o in result.outcomes]
    assert statuses == [
        ("rejected", "bundle format check"), ("rejected", "bundle format check"),
        ("rejected", "bundle manifest check"), ("rejected", "bundle manifest check"), ("accepted", ""),
    ]
    assert [c.name for c in atlas.version(2).conditions if c.name == "q1"] == ["q1"]
    path = tmp_path / "bomb.safetensors"
    for data in bombs.values():
        path.write_bytes(data)
        capsys.readouterr()
        assert main(["atlas", "audit", str(path)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "failed" in err, err


def test_a_lone_surrogate_escape_is_a_format_error():
    key = generate_key()
    cfg = ModelConfig.paper_defaults("trvae", 50)
    good = create_bundle(key=key, site="s", atlas="demo", parent="a" * 64, parent_number=1,
                         strategy="conditions", tensors=random_condition_vectors(cfg, ["q1"]))
    raw, body = split(good)
    header = raw.rstrip(b" ")[:-1] + b',"x":"\\ud800"}'
    with pytest.raises(BundleFormatError, match="not UTF-8"):
        read_bundle(with_header(header, body))
