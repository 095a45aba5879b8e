"""Turning planned versions into one TUF commit, and the reference version 1.

Why one commit for many versions: the lineage, every new manifest and every
new blob become visible to sites at the single ``timestamp.json`` rename (see
``server/repository.py``), so a crash never publishes half a merge; and
before that rename a fresh TUF client must accept the lineage and the new
manifests (``server/publish_checks.py``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedarches.errors import RepositoryError
from fedarches.format.canonical import sha256_bytes
from fedarches.format.metrics import sanitize_metrics
from fedarches.format.model_dir import LABELS, load_model_dir
from fedarches.format.version import (
    LINEAGE_TARGET,
    MAIN_BRANCH,
    REFERENCE_SITE,
    AtlasVersion,
    BlobRef,
    ConditionRecord,
    Lineage,
    LineageEntry,
    blob_target,
    entry_for,
    version_target,
)
from fedarches.server.labels import reference_label_records
from fedarches.server.repository import RepoState, TufRepository, utc_timestamp


def _version_files(
    repo: TufRepository, state: RepoState, version: AtlasVersion, blobs: Mapping[str, bytes], files: dict[str, bytes]
) -> None:
    """Add ``version``'s new blobs and manifest to ``files``; shared old blobs must still be intact."""
    version.check()
    for filename, ref in version.blobs.items():
        target = blob_target(ref.sha256)
        if filename in blobs:
            data = blobs[filename]
            if sha256_bytes(data) != ref.sha256 or len(data) != ref.length:
                raise RepositoryError(
                    f"atlas repository check failed: {filename} does not match the version manifest"
                )
            files[target] = data
        elif target not in files:
            # a blob shared with an earlier version: it must still be intact on disk,
            # or the new version would be published pointing at a corrupt file
            repo.read_target(target, state)
    files[version_target(version.id)] = version.canonical()


def publish_versions(
    repo: TufRepository,
    state: RepoState,
    lineage: Lineage,
    versions: Sequence[tuple[AtlasVersion, Mapping[str, bytes]]],
) -> list[LineageEntry]:
    """One TUF commit for all ``versions`` (their blobs, manifests and the new lineage)."""
    files: dict[str, bytes] = {}
    entries: list[LineageEntry] = []
    now = utc_timestamp()
    for version, blobs in versions:
        if version.number != lineage.next_number():
            raise ValueError(f"would publish version {version.number}, next is {lineage.next_number()}")
        _version_files(repo, state, version, blobs, files)
        entry = entry_for(version, lineage, now)
        lineage = lineage.model_copy(update={"versions": [*lineage.versions, entry]})
        entries.append(entry)
    files[LINEAGE_TARGET] = lineage.canonical()
    # a fresh site must get the lineage and every new manifest; blobs are bound to them by hash
    repo.publish(files, check=[LINEAGE_TARGET, *(version_target(v.id) for v, _ in versions)])
    return entries


def reference_version(
    atlas: str, model_dir: str | os.PathLike[str], metrics: Mapping[str, Any] | None = None
) -> tuple[AtlasVersion, dict[str, bytes]]:
    """Version 1 of the main line from a trained model directory (every blob hash checked)."""
    manifest, tensors = load_model_dir(model_dir)
    blobs = {name: (Path(model_dir) / name).read_bytes() for name in manifest.files}
    clean = sanitize_metrics(metrics or {})
    version = AtlasVersion(
        atlas=atlas,
        number=1,
        branch=MAIN_BRANCH,
        parents=[],
        strategy="reference",
        conditions=[
            ConditionRecord(name=c, site=REFERENCE_SITE, introduced_in=1, metrics=clean) for c in manifest.conditions
        ],
        model=manifest,
        blobs={n: BlobRef(sha256=sha256_bytes(b), length=len(b)) for n, b in blobs.items()},
        labels=reference_label_records(tensors[LABELS], manifest.label_categories) if LABELS in tensors else [],
    )
    return version, blobs
