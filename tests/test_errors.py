"""One class per failed check: every check has a name, a family, and real failures raise it.

Callers (the CLI, the Flower coordinator's report, operators' scripts) react to
the class, never to the message text; the message still starts with the check
name so a person reading one line knows which check failed.
"""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from fedarches import errors
from fedarches.config import ModelConfig, TrainConfig
from fedarches.data.validation import check_values, condition_labels
from fedarches.format.bundle import META_MANIFEST, create_bundle, read_bundle
from fedarches.format.model_dir import CONDITIONS, MANIFEST, WEIGHTS, ModelManifest, load_model_dir, save_model_dir
from fedarches.format.signing import generate_key
from fedarches.format.version import (
    ATLAS_VERSION_FILE,
    AtlasVersion,
    BlobRef,
    ConditionRecord,
    read_atlas_version,
)
from test_contribution import _rewrite_header

FAMILIES = (errors.InputDataError, errors.ModelFileError, errors.VerificationError, errors.ContributionError)


def test_every_check_class_has_a_unique_name_and_one_family():
    classes = errors.check_classes()
    assert len(classes) > 30
    names = [c.check for c in classes]
    assert all(isinstance(n, str) and n.strip() for n in names)
    assert len(set(names)) == len(names), sorted(n for n in names if names.count(n) > 1)
    for cls in classes:
        assert sum(issubclass(cls, f) for f in FAMILIES) == 1, cls


# ------------------------------------------------------------------ real failures


def _bundle(key=None) -> bytes:
    key = key or generate_key()
    cfg = ModelConfig.paper_defaults("trvae", 20)
    tensors = {
        "encoder/q1": torch.randn(cfg.encoder_width),
        "decoder/q1": torch.randn(cfg.decoder_width),
    }
    return create_bundle(
        key=key, site="s", atlas="a", parent="a" * 64, parent_number=1, strategy="conditions", tensors=tensors
    )


def _tampered_tensor():
    data = bytearray(_bundle())
    data[-3] ^= 0xFF
    read_bundle(bytes(data))


def _bad_signature():
    read_bundle(_bundle()).verify_signature(generate_key().public)


def _non_canonical_manifest():
    def spaced(h):
        h["__metadata__"][META_MANIFEST] = json.dumps(json.loads(h["__metadata__"][META_MANIFEST]), indent=1)

    read_bundle(_rewrite_header(_bundle(), spaced))


def _truncated_safetensors():
    data = _bundle()
    read_bundle(data[: len(data) - 5])


def _negative_counts():
    check_values(sp.csr_matrix(np.array([[1.0, -2.0]], dtype=np.float32)), require_integers=True)


def _missing_obs_column():
    adata = ad.AnnData(np.ones((2, 2), dtype=np.float32), obs=pd.DataFrame({"x": ["a", "b"]}, index=["c1", "c2"]))
    condition_labels(adata, "study")


def _model_dir(tmp_path):
    cfg = ModelConfig.paper_defaults("trvae", 3)
    manifest = ModelManifest(
        config=cfg, train=TrainConfig(), genes=["g1", "g2", "g3"], conditions=["s1"], condition_key="study"
    )
    blobs = {WEIGHTS: {"w": torch.ones(2, 2)}, CONDITIONS: {"encoder/s1": torch.ones(cfg.encoder_width)}}
    d = tmp_path / "model"
    manifest = save_model_dir(d, manifest, blobs)
    version = AtlasVersion(
        atlas="a",
        number=1,
        branch="main",
        parents=[],
        strategy="reference",
        conditions=[ConditionRecord(name="s1", site="coordinator", introduced_in=1)],
        model=manifest,
        blobs={k: BlobRef(sha256=v, length=(d / k).stat().st_size) for k, v in manifest.files.items()},
    )
    (d / ATLAS_VERSION_FILE).write_bytes(version.canonical())
    assert read_atlas_version(d).id == version.id
    return d


@pytest.fixture
def model_dir(tmp_path):
    return _model_dir(tmp_path)


def _damaged_model_manifest(d):
    (d / MANIFEST).write_bytes(b'{"format": "fedarches.model/1", "config": [[[')
    read_atlas_version(d)


def _damaged_version_manifest(d):
    (d / ATLAS_VERSION_FILE).write_bytes(b"[" * 100_000)
    read_atlas_version(d)


def _blob_hash_mismatch(d):
    blob = d / WEIGHTS
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    load_model_dir(d)


@pytest.mark.parametrize(
    "failure,expected",
    [
        (_tampered_tensor, errors.HashError),
        (_bad_signature, errors.SignatureError),
        (_non_canonical_manifest, errors.BundleManifestError),
        (_truncated_safetensors, errors.BundleFormatError),
        (_negative_counts, errors.CountValueError),
        (_missing_obs_column, errors.ColumnError),
    ],
)
def test_real_failures_raise_their_check_class(failure, expected):
    with pytest.raises(expected) as info:
        failure()
    assert type(info.value) is expected
    assert str(info.value).startswith(f"{expected.check} failed"), str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "failure,expected",
    [
        (_damaged_model_manifest, errors.ManifestError),
        (_damaged_version_manifest, errors.VersionManifestError),
        (_blob_hash_mismatch, errors.BlobHashError),
    ],
)
def test_damaged_model_directories_raise_their_check_class(model_dir, failure, expected):
    with pytest.raises(expected) as info:
        failure(model_dir)
    assert type(info.value) is expected
    assert str(info.value).startswith(f"{expected.check} failed"), str(info.value)
    assert "\n" not in str(info.value)


def test_invalid_model_manifest_field_is_one_line(model_dir):
    raw = json.loads((model_dir / MANIFEST).read_bytes())
    raw["genes"] = 3
    (model_dir / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(errors.ManifestError, match="^manifest check failed: .* invalid at genes") as info:
        read_atlas_version(model_dir)
    assert "\n" not in str(info.value)
