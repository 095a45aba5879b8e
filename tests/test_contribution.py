"""Contribution bundle format: signed manifest in safetensors metadata, size formula, tampering."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from fedarches.config import ModelConfig
from fedarches.format.bundle import META_MANIFEST, audit_bundle, create_bundle, read_bundle
from fedarches.format.metrics import sanitize_metrics
from fedarches.errors import (
    BundleContentError,
    BundleFileError,
    BundleFormatError,
    BundleMetricsError,
    HashError,
    SignatureError,
)
from fedarches.format.signing import generate_key
from test_atlas_support import random_condition_vectors

PARENT = "a" * 64


def _bundle(key, cfg, names=("q1",), **kw):
    args = dict(
        key=key,
        site="site-a",
        atlas="demo",
        parent=PARENT,
        parent_number=1,
        strategy="conditions",
        tensors=random_condition_vectors(cfg, names),
        metrics={"epochs": 5, "accuracy": 0.93},
    )
    args.update(kw)
    return create_bundle(**args)


def _rewrite_header(data: bytes, edit) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (-len(new) % 8)
    return struct.pack("<Q", len(new)) + new + data[8 + n :]


@pytest.mark.parametrize("kind,m", [("trvae", 1), ("trvae", 3), ("nb", 2)])
def test_size_is_the_formula_of_the_model_shape(tmp_path, kind, m):
    cfg = ModelConfig.paper_defaults(kind, 300)
    names = [f"study {i}" for i in range(m)]
    path = tmp_path / "c.safetensors"
    path.write_bytes(_bundle(generate_key(), cfg, names))
    rep = audit_bundle(path, cfg)
    assert rep["tensor_bytes"] == 4 * cfg.condition_parameter_count(m) == rep["expected_tensor_bytes"]
    assert rep["size"] == rep["header_bytes"] + rep["tensor_bytes"] == rep["expected_size"]
    assert rep["size_matches_formula"] and rep["shapes_match_model"]
    assert rep["metadata_keys"] == ["fedarches.contribution", "fedarches.signature"]
    assert sorted(rep["conditions"]) == sorted(names)
    assert rep["header_bytes"] < 4096  # bounded by names and metrics, not by any data size


def test_signature_covers_manifest_and_tensors():
    key = generate_key()
    cfg = ModelConfig.paper_defaults("trvae", 50)
    data = _bundle(key, cfg)
    b = read_bundle(data)
    b.verify_signature(key.public)
    with pytest.raises(SignatureError, match="^signature check failed"):
        b.verify_signature(generate_key().public)

    # a changed metric in the manifest: parses, but the signature no longer matches
    def bump(h):
        m = json.loads(h["__metadata__"][META_MANIFEST])
        m["metrics"]["accuracy"] = 1.0
        h["__metadata__"][META_MANIFEST] = json.dumps(m, sort_keys=True, separators=(",", ":"))

    forged = read_bundle(_rewrite_header(data, bump))
    with pytest.raises(SignatureError, match="^signature check failed"):
        forged.verify_signature(key.public)

    # a flipped tensor byte: caught by the signed per-tensor sha256 before any signature check
    tampered = bytearray(data)
    tampered[-3] ^= 0xFF
    with pytest.raises(HashError, match="^hash check failed: tensor"):
        read_bundle(bytes(tampered))


def test_unsigned_extra_tensor_and_shared_tensors_are_refused():
    key = generate_key()
    cfg = ModelConfig.paper_defaults("trvae", 50)
    with pytest.raises(BundleContentError, match="strategy 'conditions'"):
        _bundle(key, cfg, tensors={**random_condition_vectors(cfg, ["q"]), "shared/weights.safetensors/x": torch.ones(3)})

    data = _bundle(key, cfg)

    def drop_entry(h):
        m = json.loads(h["__metadata__"][META_MANIFEST])
        del m["tensors"]["decoder/q1"]
        h["__metadata__"][META_MANIFEST] = json.dumps(m, sort_keys=True, separators=(",", ":"))

    with pytest.raises(BundleContentError, match="^bundle content check failed: tensor list"):
        read_bundle(_rewrite_header(data, drop_entry))


def test_garbage_and_foreign_files_name_the_check(tmp_path):
    with pytest.raises(BundleFormatError, match="^bundle format check failed"):
        read_bundle(b"\x00" * 4)
    with pytest.raises(BundleFormatError, match="^bundle format check failed"):
        read_bundle(struct.pack("<Q", 1 << 40) + b"{}")
    from safetensors.torch import save

    with pytest.raises(BundleFormatError, match="not a contribution bundle"):
        read_bundle(save({"x": torch.ones(2)}))
    with pytest.raises(BundleFileError, match="does not exist"):
        read_bundle(tmp_path / "missing.safetensors")


def test_metrics_are_scalar_and_finite():
    got = sanitize_metrics(
        {"acc": 0.9, "nan": float("nan"), "arr": [1, 2], "epochs": 3, "ok": True, "path": "/data/x", "bad key!": 1}
    )
    assert got == {"acc": 0.9, "epochs": 3, "ok": True}


def test_oversized_metrics_are_refused_before_any_trust_decision():
    cfg = ModelConfig.paper_defaults("trvae", 50)
    data = _bundle(generate_key(), cfg)

    def stuff(h):
        m = json.loads(h["__metadata__"][META_MANIFEST])
        m["metrics"]["notes"] = "x" * 10000
        h["__metadata__"][META_MANIFEST] = json.dumps(m, sort_keys=True, separators=(",", ":"))

    with pytest.raises(BundleMetricsError, match="^bundle metrics check failed"):
        read_bundle(_rewrite_header(data, stuff))


@pytest.mark.parametrize("payload", [b"1" * 5000, b"[" * 100_000, b'{"a":NaN}', b"1e999"])
def test_hostile_header_json_is_a_bundle_format_error(payload):
    """Bounded parsing: never a RecursionError, a bare ValueError or an inf."""
    data = struct.pack("<Q", len(payload)) + payload
    with pytest.raises(BundleFormatError, match="^bundle format check failed"):
        read_bundle(data)


def test_hostile_manifest_json_is_a_bundle_manifest_error():
    from fedarches.errors import BundleManifestError

    key = generate_key()
    data = _bundle(key, ModelConfig.paper_defaults("trvae", 50))

    def deep(h):
        h["__metadata__"][META_MANIFEST] = "[" * 10_000

    with pytest.raises(BundleManifestError, match="^bundle manifest check failed.*deeper"):
        read_bundle(_rewrite_header(data, deep))
