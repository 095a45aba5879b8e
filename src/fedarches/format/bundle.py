"""Contribution bundles: what a site sends back, and the only thing that leaves it.

Why this format: a bundle must be self-authenticating (it can travel over
Flower, HTTP or a USB stick), readable without executing anything (no pickle,
invariant 6), and small enough that its size proves it carries no cells
(invariant 4). So a bundle is ONE safetensors file:

- tensors: the site's new-condition entries, with exactly the keys they have in
  ``conditions.safetensors`` (``"encoder/<name>"``, ``"decoder/<name>"`` and for
  NB models ``"dispersion/<name>"``), each a 1-D vector whose length is a width
  of the model, never a number of cells;
- ``__metadata__["fedarches.contribution"]``: the canonical JSON of a
  ``BundleManifest`` (site, key id, atlas, parent version id and number,
  strategy, new condition names, the sha256/shape/dtype of every tensor, the
  site's scalar metrics);
- ``__metadata__["fedarches.signature"]``: base64 Ed25519 signature of exactly
  those manifest bytes. The manifest hashes every tensor, so the signature
  covers the tensors too.

Size: ``8 + header + 4 * config.condition_parameter_count(m)`` bytes for ``m``
new float32 conditions, exactly: the header is the compact JSON of what it
holds (plus safetensors' alignment to 8 bytes, nothing more) and at most
``max_header_bytes(m)``, so no byte of a ``conditions`` bundle is free for
anything the manifest does not describe. ``check_size`` enforces this at
intake; ``audit_bundle`` reports it.

Label summaries (opt-in, ``site map --share-labels KEY``): the
``ClassSummaries.state()`` of the site's own labelled cells in the atlas latent,
under ``"labels/<state field>"``, with the label names (in code order) in the
signed manifest's ``labels``. Those tensors add exactly
``label_part_bytes(L, C, d)`` = ``C (24 + 8 d + 8 d^2) + L (41 + 8 d + 8 d^2) + 112``
bytes for L labels, C components (``L <= C <= MAX_COMPONENTS_PER_LABEL * L``;
each stands for >= k_min cells) and latent dimension d; the header bound grows by
``label_header_bytes(L)``. A formula of model shape, labels and components per
label, never of cells.

Branch bundles (strategies ``input-layers`` and ``full``) touched weights that
every condition shares, so they can never be merged into the main line. They
carry, in addition to the new-condition entries, every parent tensor whose
bytes changed, under ``"shared/<blob file>/<tensor key>"`` (for example
``"shared/weights.safetensors/encoder.0.weight"``, or
``"shared/conditions.safetensors/encoder/ref_study"`` when fine-tuning moved
a reference condition). Their size is bounded by the size of the model, still
not by the number of cells. The coordinator publishes each as its own branch.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedarches.config import ModelConfig, Strategy
from fedarches.errors import (
    BundleContentError,
    BundleFileError,
    BundleFormatError,
    BundleManifestError,
    BundleMetricsError,
    BundleSizeError,
    HashError,
    SignatureError,
)
from fedarches.format.canonical import (
    OmitEmptyLabels,
    canonical_json,
    parse_json_bounded,
    sha256_bytes,
    tensor_sha256,
    validation_summary,
)
from fedarches.format.metrics import MAX_METRIC_TEXT, MAX_METRICS, MetricValue, sanitize_metrics
from fedarches.format.names import check_name, check_new_names
from fedarches.format.signing import PrivateKey, PublicKey, b64decode, b64encode, verify_canonical
from fedarches.format.tensor_keys import (
    LABEL_PREFIX,
    SHARED_PREFIX,
    is_condition_key,
    split_condition_key,
    split_shared_key,
)

BUNDLE_FORMAT = "fedarches.contribution/1"
BUNDLE_FILE = "contribution.safetensors"
META_MANIFEST = "fedarches.contribution"
META_SIGNATURE = "fedarches.signature"

# Limits checked before anything is parsed: a bundle comes from elsewhere.
# The one bundle size limit (the Flower protocol imports it). A ``conditions``
# bundle is 4 * condition_parameter_count(m) bytes plus its header, far below
# this for any model this package builds; only branch bundles (shared weights)
# approach it, and they are bounded by the model size.
MAX_BUNDLE_BYTES = 64 * 1024 * 1024
MAX_HEADER_BYTES = 1024 * 1024
MAX_NAME_CHARS = 200
CONDITION_DTYPE = "float32"
# Worst case bytes one character takes in the header: 4-byte UTF-8, or a quote
# escaped twice (manifest JSON inside header JSON).
_HEADER_CHAR_BYTES = 4
_HEADER_FIXED_BYTES = 4096  # format, atlas, site, key id, parent, strategy, signature, JSON syntax
_HEADER_METRIC_BYTES = (64 + MAX_METRIC_TEXT) * _HEADER_CHAR_BYTES + 32
# per condition: its name in the manifest's list and in three tensor keys twice
# (header and manifest), each with a tensor description
_HEADER_CONDITION_BYTES = 7 * MAX_NAME_CHARS * _HEADER_CHAR_BYTES + 3 * 512

# The label part: at most this many components per label (``SummaryOptions.max_components``),
# its tensors are float64, int64 or uint8 (``ClassSummaries.state``), and every field of the
# state is described twice (header and manifest) in at most this many bytes each.
MAX_COMPONENTS_PER_LABEL = 32
LABEL_DTYPES = ("float64", "int64", "uint8")
_LABEL_FIELDS = 26
_HEADER_LABEL_FIELD_BYTES = 2 * 512
_HEADER_LABEL_BYTES = MAX_NAME_CHARS * _HEADER_CHAR_BYTES + 8

BundleSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]



class TensorEntry(BaseModel):
    """What the signature promises about one tensor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    shape: list[int]
    dtype: str


class BundleManifest(OmitEmptyLabels):
    """The signed part of a bundle. Canonical JSON of this is what the site signs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["fedarches.contribution/1"] = BUNDLE_FORMAT
    atlas: str
    site: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    key_id: str = Field(pattern=r"^[0-9a-f]{64}$")
    parent: str = Field(pattern=r"^[0-9a-f]{64}$")
    parent_number: int = Field(ge=1)
    strategy: Strategy
    conditions: list[str]
    tensors: dict[str, TensorEntry]
    metrics: dict[str, MetricValue] = {}
    labels: list[str] = []  # shared label summaries: their names in code order (left out while empty)

    def canonical(self) -> bytes:
        return canonical_json(self)


def check_condition_name(name: str) -> None:
    """The name policy's own rules (``format.names``); intake adds the check against the target's names."""
    check_name(name, kind="condition")


@dataclass(frozen=True)
class Bundle:
    """A parsed bundle whose tensors match its manifest (signature not yet checked).

    ``digest`` (sha256 of the signed manifest bytes) identifies a contribution:
    the same site submitting the same bytes twice has the same digest, which is
    how the coordinator recognises an identical resubmission.
    """

    manifest: BundleManifest
    manifest_bytes: bytes
    signature: bytes
    tensors: dict[str, torch.Tensor]
    size: int
    header_size: int
    source: str = "<bytes>"
    metadata_keys: tuple[str, ...] = field(default=())

    @property
    def digest(self) -> str:
        return sha256_bytes(self.manifest_bytes)

    def verify_signature(self, key: PublicKey) -> None:
        """Raise ``SignatureError`` unless ``key`` signed this manifest."""
        if key.key_id != self.manifest.key_id:
            raise SignatureError(
                f"signature check failed for bundle {self.source}: it names key "
                f"{self.manifest.key_id[:16]}..., site {self.manifest.site!r} is enrolled with "
                f"{key.key_id[:16]}...; the bundle was signed by a key this atlas does not know"
            )
        verify_canonical(key, self.manifest_bytes, self.signature, what=f"bundle {self.source}")

    def condition_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.tensors.items() if is_condition_key(k)}

    def label_tensors(self) -> dict[str, torch.Tensor]:
        """The shared label summaries' state fields (``"labels/"`` stripped)."""
        return {k[len(LABEL_PREFIX):]: v for k, v in self.tensors.items() if k.startswith(LABEL_PREFIX)}

    def shared_tensors(self) -> dict[tuple[str, str], torch.Tensor]:
        return {split_shared_key(k): v for k, v in self.tensors.items() if k.startswith(SHARED_PREFIX)}


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _tensor_entry(t: torch.Tensor) -> TensorEntry:
    return TensorEntry(sha256=tensor_sha256(t), shape=list(t.shape), dtype=_dtype_name(t))


def create_bundle(
    *,
    key: PrivateKey,
    site: str,
    atlas: str,
    parent: str,
    parent_number: int,
    strategy: Strategy,
    tensors: Mapping[str, torch.Tensor],
    metrics: Mapping[str, Any] | None = None,
    labels: list[str] | None = None,
) -> bytes:
    """Sign and serialise a bundle; returns the safetensors bytes.

    ``labels``: the names of shared label summaries, in code order, when ``tensors``
    holds their state under ``"labels/<field>"``.

    ``tensors`` holds the new-condition entries (``"<table>/<name>"``) and, for
    branch strategies only, changed parent tensors (``"shared/<file>/<key>"``).
    The condition names are read off the keys, so the manifest cannot disagree
    with the tensors it describes.
    """
    if not tensors:
        raise BundleContentError("bundle content check failed: no tensors to contribute (no new condition)")
    names: set[str] = set()
    clean: dict[str, torch.Tensor] = {}
    for k, t in tensors.items():
        if k.startswith(SHARED_PREFIX):
            if strategy == "conditions":
                raise BundleContentError(
                    f"bundle content check failed: {k} is a shared tensor but strategy 'conditions' "
                    "must leave every shared tensor unchanged"
                )
            split_shared_key(k)
        elif k.startswith(LABEL_PREFIX):
            if not labels:
                raise BundleContentError(f"bundle content check failed: {k} is a label summary field but no "
                                         "label names are given")
        else:
            table, name = split_condition_key(k)
            check_condition_name(name)
            names.add(name)
        t = t.detach().cpu().contiguous()
        _check_condition_dtype(k, t, "the contribution")
        if t.ndim < 1 or not _finite(k, t):
            raise BundleContentError(f"bundle content check failed: tensor {k} is empty, scalar or not finite")
        clean[k] = t
    if not names:
        raise BundleContentError("bundle content check failed: no new condition tensors")
    manifest = BundleManifest(
        atlas=atlas,
        site=site,
        key_id=key.public.key_id,
        parent=parent,
        parent_number=parent_number,
        strategy=strategy,
        conditions=sorted(names),
        tensors={k: _tensor_entry(t) for k, t in clean.items()},
        metrics=sanitize_metrics(metrics or {}),
        labels=list(labels or []),
    )
    _check_label_names(manifest, "the contribution")
    manifest_bytes = manifest.canonical()
    signature = key.sign(manifest_bytes)
    metadata = {META_MANIFEST: manifest_bytes.decode("utf-8"), META_SIGNATURE: b64encode(signature)}
    return _sorted_header(st_save(dict(sorted(clean.items())), metadata=metadata))


def _sorted_header(data: bytes) -> bytes:
    """The same safetensors bytes with the header's JSON keys sorted.

    Why: safetensors writes ``__metadata__`` from a hash map, so its key order
    (and with it the file's bytes) changes from call to call; the same input must
    give the same bundle bytes through every entry point. Sorting keeps the header
    length, so the tensor offsets and the padding stay valid.
    """
    n = int.from_bytes(data[:8], "little")
    raw = data[8 : 8 + n]
    text = raw.decode("utf-8")
    body = text.rstrip(" ")
    header = json.loads(body)
    sorted_body = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    if len(sorted_body.encode("utf-8")) != len(body.encode("utf-8")):
        return data  # a serialiser that writes JSON differently: leave its bytes alone
    return data[:8] + sorted_body.encode("utf-8") + raw[len(body.encode("utf-8")):] + data[8 + n :]


def _read_source(source: BundleSource) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = f"<{len(data)} bytes>"
    else:
        p = Path(source)
        if not p.is_file():
            what = ("is a directory" if p.is_dir() else "is not a regular file (a FIFO, socket or device?)"
                    if p.exists() else "does not exist")
            raise BundleFileError(f"bundle file check failed: {p} {what}; pass a contribution.safetensors file")
        size = p.stat().st_size
        if size > MAX_BUNDLE_BYTES:
            raise BundleSizeError(
                f"bundle size check failed: {p} is {size} bytes, above the {MAX_BUNDLE_BYTES} byte limit"
            )
        data = p.read_bytes()
        name = str(p)
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleSizeError(f"bundle size check failed: {len(data)} bytes, above the {MAX_BUNDLE_BYTES} limit")
    return data, name


def _parse_header(data: bytes, name: str) -> tuple[int, dict[str, Any]]:
    """Read the safetensors JSON header ourselves: bounded, no code execution."""
    if len(data) < 8:
        raise BundleFormatError(f"bundle format check failed: {name} is too short to be safetensors")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise BundleFormatError(
            f"bundle format check failed: {name} declares a {n} byte header "
            f"(file {len(data)} bytes, limit {MAX_HEADER_BYTES})"
        )
    header = parse_json_bounded(
        data[8 : 8 + n], max_bytes=MAX_HEADER_BYTES, what=f"{name} header", error=BundleFormatError
    )
    if not isinstance(header, dict):
        raise BundleFormatError(f"bundle format check failed: {name} header is not an object")
    _check_header_padding(n, header, name)
    return n, header


def _check_header_padding(n: int, header: dict[str, Any], name: str) -> None:
    """The header must be the compact JSON of what it holds, aligned to 8 bytes.

    Why: whitespace, needless escapes or trailing padding are bytes the
    manifest does not describe; refusing them makes the size formula exact.
    Key order does not change the length, so any serialiser's compact output passes.
    """
    try:
        compact = len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    except UnicodeEncodeError as exc:  # a lone surrogate escape: not text a site can have written
        raise BundleFormatError(f"bundle format check failed: {name} header holds text that is not UTF-8") from exc
    if not compact <= n < compact + 8:
        raise BundleSizeError(
            f"bundle size check failed: {name} has a {n} byte header whose content takes {compact} bytes; "
            "a bundle carries no padding beyond safetensors' 8-byte alignment"
        )


def read_bundle(source: BundleSource) -> Bundle:
    """Parse a bundle and check that its tensors are exactly what the manifest signs.

    Does NOT decide whether the signer is trusted (that needs the coordinator's
    enrollment list): call ``Bundle.verify_signature`` with the enrolled key.
    """
    data, name = _read_source(source)
    header_size, header = _parse_header(data, name)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or META_MANIFEST not in meta or META_SIGNATURE not in meta:
        raise BundleFormatError(
            f"bundle format check failed: {name} has no signed fedarches manifest in its metadata; "
            "it is not a contribution bundle (write one with `fedarches site map`)"
        )
    extra_meta = sorted(set(meta) - {META_MANIFEST, META_SIGNATURE})
    if extra_meta:
        raise BundleContentError(f"bundle content check failed: {name} has unexpected metadata keys {extra_meta}")
    manifest_text = meta[META_MANIFEST]
    if not isinstance(manifest_text, str):
        raise BundleFormatError(f"bundle format check failed: {name} manifest is not text")
    manifest_bytes = manifest_text.encode("utf-8")
    signature = b64decode(str(meta[META_SIGNATURE]), what=f"signature of {name}")
    raw = parse_json_bounded(
        manifest_bytes, max_bytes=MAX_HEADER_BYTES, what=f"{name} manifest", error=BundleManifestError
    )
    try:
        manifest = BundleManifest.model_validate(raw)
    except ValidationError as exc:
        raise BundleManifestError(f"bundle manifest check failed: {name}: {validation_summary(exc)}") from exc
    if manifest.canonical() != manifest_bytes:
        raise BundleManifestError(f"bundle manifest check failed: {name} manifest is not canonical JSON")
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise BundleFormatError(f"bundle format check failed: {name} is not readable safetensors ({exc})") from exc
    if set(tensors) != set(manifest.tensors):
        missing = sorted(set(manifest.tensors) - set(tensors))
        unsigned = sorted(set(tensors) - set(manifest.tensors))
        raise BundleContentError(
            f"bundle content check failed: tensor list of {name}: missing {missing}, not in the signed manifest {unsigned}"
        )
    _check_dtypes(tensors, manifest, name)
    names: set[str] = set()
    for key, t in tensors.items():
        entry = manifest.tensors[key]
        if tensor_sha256(t) != entry.sha256 or list(t.shape) != entry.shape:
            raise HashError(f"hash check failed: tensor {key} of {name} differs from what the manifest signs")
        if key.startswith(SHARED_PREFIX):
            if manifest.strategy == "conditions":
                raise BundleContentError(
                    f"bundle content check failed: {name} carries shared tensor {key} but claims strategy 'conditions'"
                )
            split_shared_key(key)
        elif not key.startswith(LABEL_PREFIX):
            names.add(split_condition_key(key)[1])
    if names != set(manifest.conditions) or manifest.conditions != sorted(manifest.conditions):
        raise BundleContentError(
            f"bundle content check failed: {name} names conditions {manifest.conditions} "
            f"but holds tensors for {sorted(names)}"
        )
    for cname in manifest.conditions:
        check_condition_name(cname)
    _check_label_names(manifest, name)
    if sanitize_metrics(manifest.metrics) != dict(manifest.metrics):
        raise BundleMetricsError(
            f"bundle metrics check failed: {name} reports metrics that are not small finite scalars "
            f"(at most {MAX_METRICS}, text up to {MAX_METRIC_TEXT} characters)"
        )
    return Bundle(
        manifest=manifest,
        manifest_bytes=manifest_bytes,
        signature=signature,
        tensors=tensors,
        size=len(data),
        header_size=header_size,
        source=name,
        metadata_keys=tuple(sorted(meta)),
    )


def _check_dtypes(tensors: Mapping[str, torch.Tensor], manifest: BundleManifest, name: str) -> None:
    """What the manifest says of each tensor is what the file holds; condition tensors are float32."""
    for key, t in tensors.items():
        entry = manifest.tensors[key]
        if entry.dtype != _dtype_name(t):
            raise BundleContentError(
                f"bundle content check failed: {name} manifest describes tensor {key} as {entry.dtype}, "
                f"the file holds {_dtype_name(t)}"
            )
        _check_condition_dtype(key, t, name)


#: Label-state fields that may hold NaN ("not measured": a calibration mode no label used).
LABEL_MAY_BE_NAN = ("pooled_ratio_quantile",)


def _finite(key: str, t: torch.Tensor) -> bool:
    """Finite values; a label field of ``LABEL_MAY_BE_NAN`` may also hold NaN (never infinity)."""
    v = t.double()
    if key.startswith(LABEL_PREFIX) and key[len(LABEL_PREFIX):] in LABEL_MAY_BE_NAN:
        return bool((torch.isfinite(v) | torch.isnan(v)).all())
    return bool(torch.isfinite(v).all())


def label_values_finite(key: str, t: torch.Tensor) -> bool:
    """Whether a label part field (``key`` without ``labels/``) holds only allowed values."""
    return _finite(LABEL_PREFIX + key, t)


def _check_label_names(manifest: BundleManifest, name: str) -> None:
    """Label names follow the name policy (``format.names``, kind ``label``), and come with
    label tensors (and label tensors with names)."""
    has_part = any(k.startswith(LABEL_PREFIX) for k in manifest.tensors)
    if bool(manifest.labels) != has_part:
        raise BundleContentError(f"bundle content check failed: {name} names labels {manifest.labels[:5]} but "
                                 f"{'holds' if has_part else 'holds no'} label summary tensors")
    check_new_names(manifest.labels, kind="label")


def _check_condition_dtype(key: str, t: torch.Tensor, name: str) -> None:
    """Condition tensors are float32: the size formula counts 4 bytes a value; label summary
    fields are float64, int64 or uint8 (``label_part_bytes`` counts them)."""
    if key.startswith(LABEL_PREFIX):
        if _dtype_name(t) not in LABEL_DTYPES:
            raise BundleContentError(f"bundle content check failed: {name} label tensor {key} is "
                                     f"{_dtype_name(t)}, label summaries carry {LABEL_DTYPES}")
        return
    if not key.startswith(SHARED_PREFIX) and t.dtype != torch.float32:
        raise BundleContentError(
            f"bundle content check failed: {name} condition tensor {key} is {_dtype_name(t)}, "
            f"bundles carry {CONDITION_DTYPE}"
        )


def max_header_bytes(n_conditions: int, n_labels: int = 0) -> int:
    """The largest header a ``conditions`` bundle of ``n_conditions`` (and ``n_labels`` shared
    label summaries) can need.

    Every field is bounded (names, metric count and text, the label state's fields), so this is
    their worst case; a larger header holds something no manifest field explains.
    """
    labels = label_header_bytes(n_labels)
    return _HEADER_FIXED_BYTES + MAX_METRICS * _HEADER_METRIC_BYTES + n_conditions * _HEADER_CONDITION_BYTES + labels


def label_header_bytes(n_labels: int) -> int:
    """Header bytes a label part of ``n_labels`` can add: each state field twice, each name."""
    return 0 if n_labels == 0 else _LABEL_FIELDS * _HEADER_LABEL_FIELD_BYTES + n_labels * _HEADER_LABEL_BYTES


def label_part_bytes(n_labels: int, n_components: int, latent_dim: int) -> int:
    """Tensor bytes of ``n_labels`` label summaries with ``n_components`` components in ``latent_dim``
    dimensions (``ClassSummaries.state``): per component label, count, log det, mean, whitening
    factor; per label threshold, calibration mode, kind and count, class Gaussian mean, factor,
    threshold and fitted flag; 14 scalars. Zero without labels."""
    if n_labels == 0:
        return 0
    d = int(latent_dim)
    return int(n_components) * (24 + 8 * d + 8 * d * d) + int(n_labels) * (41 + 8 * d + 8 * d * d) + 14 * 8


def label_part_bound(n_labels: int, latent_dim: int) -> int:
    """The most tensor bytes ``n_labels`` shared labels can take: ``label_part_bytes`` at
    ``MAX_COMPONENTS_PER_LABEL`` components per label (a formula of labels and model shape)."""
    return label_part_bytes(n_labels, MAX_COMPONENTS_PER_LABEL * n_labels, latent_dim)


def bundle_components(bundle: Bundle) -> int:
    """How many label components the bundle's label part holds (0 without one)."""
    t = bundle.tensors.get(LABEL_PREFIX + "component_label")
    return 0 if t is None or t.ndim != 1 else int(t.shape[0])


def check_size(bundle: Bundle, config: ModelConfig) -> None:
    """Raise ``BundleSizeError`` unless a ``conditions`` bundle is exactly the size formula.

    ``8 + header + 4 * config.condition_parameter_count(m) + label_part_bytes(L, C, d)``, with
    the header at most ``max_header_bytes(m, L)`` and ``L <= C <= 32 L``: the proof that the
    bundle carries no cells. Branch bundles carry shared weights and are bounded by the model instead.
    """
    if bundle.manifest.strategy != "conditions":
        return
    m, n_labels = len(bundle.manifest.conditions), len(bundle.manifest.labels)
    limit = max_header_bytes(m, n_labels)
    if bundle.header_size > limit:
        raise BundleSizeError(
            f"bundle size check failed: {bundle.source} has a {bundle.header_size} byte header, "
            f"above the {limit} bytes {m} condition(s) and {n_labels} label(s) can need"
        )
    comps = bundle_components(bundle)
    if n_labels and not n_labels <= comps <= MAX_COMPONENTS_PER_LABEL * n_labels:
        raise BundleSizeError(
            f"bundle size check failed: {bundle.source} shares {n_labels} label(s) in {comps} components; "
            f"each label has 1 to {MAX_COMPONENTS_PER_LABEL}"
        )
    labels = label_part_bytes(n_labels, comps, config.latent_dim)
    expected = 8 + bundle.header_size + expected_tensor_bytes(config, m) + labels
    if bundle.size != expected:
        raise BundleSizeError(
            f"bundle size check failed: {bundle.source} is {bundle.size} bytes; {m} condition(s) of this "
            f"model make {expected} (8 + {bundle.header_size} header + 4 x {config.condition_parameter_count(m)}"
            f" + {labels} label summary bytes)"
        )


def expected_tensor_bytes(config: ModelConfig, n_conditions: int, itemsize: int = 4) -> int:
    """Bytes of condition tensor data in a ``conditions``-strategy bundle: the size formula."""
    return itemsize * config.condition_parameter_count(n_conditions)


def _size_ok(bundle: Bundle, config: ModelConfig) -> bool:
    try:
        check_size(bundle, config)
    except BundleSizeError:
        return False
    return True


def _label_part_report(b: Bundle) -> dict[str, Any] | None:
    """What the label part reveals: names, components and cells per label (None without one)."""
    if not b.manifest.labels:
        return None
    part = b.label_tensors()
    label, count = part.get("component_label"), part.get("component_count")
    per: dict[str, dict[str, int]] = {n: {"components": 0, "cells": 0} for n in b.manifest.labels}
    if label is not None and count is not None and label.shape == count.shape and label.ndim == 1:
        for y, c in zip(label.tolist(), count.tolist()):
            if 0 <= int(y) < len(b.manifest.labels):
                row = per[b.manifest.labels[int(y)]]
                row["components"] += 1
                row["cells"] += int(c)
    return {"names": list(b.manifest.labels), "per_label": per, "components": bundle_components(b),
            "tensor_bytes": sum(t.numel() * t.element_size() for t in part.values()),
            "k_min": int(part["k_min"].reshape(-1)[0]) if "k_min" in part and part["k_min"].numel() else None}


def audit_bundle(path: BundleSource, config: ModelConfig | None = None) -> dict[str, Any]:
    """Describe what a bundle would reveal, for a human or a test to check.

    Returns keys: ``size``, ``header_bytes`` (8-byte length prefix + JSON
    header), ``tensor_bytes``, ``tensors`` ({key: {shape, dtype}}),
    ``conditions``, ``site``, ``parent``, ``strategy``, ``metrics``,
    ``metadata_keys``, ``manifest`` (the signed JSON as a dict),
    ``max_tensor_dim``, ``labels`` (the label part: names, components and cells per label,
tensor bytes, k_min; None without one) and, when ``config`` is given, ``expected_tensor_bytes``,
    ``expected_size`` and ``size_matches_formula`` plus ``shapes_match_model``
    (every vector is as long as a model width, so none can be per-cell).
    """
    b = read_bundle(path)
    tensor_bytes = sum(t.numel() * t.element_size() for t in b.tensors.values())
    report: dict[str, Any] = {
        "source": b.source,
        "size": b.size,
        "header_bytes": 8 + b.header_size,
        "tensor_bytes": tensor_bytes,
        "tensors": {
            k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for k, t in b.tensors.items()
        },
        "conditions": list(b.manifest.conditions),
        "site": b.manifest.site,
        "parent": b.manifest.parent,
        "parent_number": b.manifest.parent_number,
        "strategy": b.manifest.strategy,
        "metrics": dict(b.manifest.metrics),
        "metadata_keys": list(b.metadata_keys),
        "manifest": json.loads(b.manifest_bytes),
        "digest": b.digest,
        "max_tensor_dim": max((max(t.shape) for t in b.tensors.values()), default=0),
        "shared_tensors": sorted(k for k in b.tensors if k.startswith(SHARED_PREFIX)),
        "labels": _label_part_report(b),
    }
    if config is not None:
        m = len(b.manifest.conditions)
        widths = {config.encoder_width, config.decoder_width} | ({config.n_genes} if config.kind == "nb" else set())
        exp = expected_tensor_bytes(config, m) + label_part_bytes(len(b.manifest.labels), bundle_components(b),
                                                                   config.latent_dim)
        report["expected_tensor_bytes"] = exp
        report["expected_size"] = 8 + b.header_size + exp
        report["size_matches_formula"] = (
            b.manifest.strategy == "conditions" and _size_ok(b, config) and tensor_bytes == exp
        )
        report["shapes_match_model"] = all(
            t.ndim == 1 and t.shape[0] in widths for k, t in b.condition_tensors().items()
        )
    return report
