"""Reading published versions and their tensors from one committed repository state.

Why one object: every intake check and every merge plan of a call must read
the same committed state (``RepoState``), and the lineage walk for earlier
contributions would otherwise parse each version manifest once per bundle.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedarches.errors import RepositoryError
from fedarches.format.version import AtlasVersion, Lineage, blob_target, version_target
from fedarches.server.repository import RepoState, TufRepository


def load_tensors(data: bytes, what: str) -> dict[str, torch.Tensor]:
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise RepositoryError(f"atlas repository check failed: {what} is not readable safetensors ({exc})") from exc


def save_tensors(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Deterministic safetensors bytes: same tensors -> same bytes -> same sha256."""
    return st_save({k: tensors[k].detach().cpu().contiguous() for k in sorted(tensors)})


class VersionStore:
    """Published versions of ``state``, parsed once and checked against their signed hashes."""

    def __init__(self, repo: TufRepository, state: RepoState):
        self.repo = repo
        self.state = state
        self._versions: dict[str, AtlasVersion] = {}

    def version(self, version_id: str) -> AtlasVersion:
        if version_id not in self._versions:
            data = self.repo.read_target(version_target(version_id), self.state)
            self._versions[version_id] = AtlasVersion.from_bytes(data, expected_id=version_id)
        return self._versions[version_id]

    def blob(self, version: AtlasVersion, filename: str) -> bytes:
        ref = version.blobs.get(filename)
        if ref is None:
            raise RepositoryError(f"atlas repository check failed: version {version.number} has no {filename}")
        return self.repo.read_target(blob_target(ref.sha256), self.state)

    def tensors(self, version: AtlasVersion, filename: str) -> dict[str, torch.Tensor]:
        return load_tensors(self.blob(version, filename), f"{filename} of version {version.number}")

    def contributions(self, lineage: Lineage) -> set[str]:
        """Digests of every bundle merged into any version of ``lineage``."""
        out: set[str] = set()
        for entry in lineage.versions:
            out.update(c.contribution for c in self.version(entry.id).conditions if c.contribution)
        return out
