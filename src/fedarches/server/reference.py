"""Training the reference model an atlas starts from (its version 1).

Why the coordinator trains and not a site: version 1 fixes the genes, the
architecture and every shared weight that all later contributions are frozen
against; it is built once, on the coordinator's own reference data. Warnings
raised while training are collected into the build's summary (printed as
lines by the CLI), so no raw Python warning with a source path reaches the
operator's console (``reference_summary.train_reference_with_summary``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedarches.config import DEFAULT_LABEL_KNOWLEDGE, K_MIN, LabelKnowledge, TrainConfig
from fedarches.data.io import read_h5ad
from fedarches.format.version import LineageEntry
from fedarches.reference_summary import ReferenceSummary, train_reference_with_summary


@dataclass(frozen=True)
class ReferenceBuild:
    """A published reference: its lineage entry and what went into it."""

    entry: LineageEntry
    summary: ReferenceSummary

    @property
    def number(self) -> int:
        return self.entry.number

    @property
    def id(self) -> str:
        return self.entry.id


def train_reference(
    data: Any,
    condition_key: str,
    label_key: str | None = None,
    *,
    kind: str,
    train: TrainConfig,
    n_genes: int,
    layer: str | None,
    progress: bool,
    reference_studies: Sequence[str] | None = None,
    label_knowledge: LabelKnowledge = DEFAULT_LABEL_KNOWLEDGE,
    k_min: int = K_MIN,
) -> tuple[Any, ReferenceSummary]:
    """The reference model on the chosen studies of ``data`` (AnnData or ``.h5ad``) and its summary.

    ``label_knowledge``: what version 1 publishes for label transfer: "summaries" (class
    summaries, each component >= ``k_min`` cells, no per-cell array: the default for a
    consortium reference once measured good enough) or "cells" (the per-cell reference latent)."""
    return train_reference_with_summary(read_h5ad(data), condition_key, label_key,
                                        reference_studies=reference_studies, kind=kind, n_genes=n_genes,
                                        layer=layer, train=train, progress=progress,
                                        label_knowledge=label_knowledge, k_min=k_min)


def build_reference(
    workdir: Path,
    publish: Callable[[Path, Mapping[str, Any]], LineageEntry],
    data: Any,
    condition_key: str,
    label_key: str | None = None,
    **train: Any,
) -> ReferenceBuild:
    """Train the reference, save it under ``workdir`` and hand the model directory to ``publish``."""
    model, summary = train_reference(data, condition_key, label_key, **train)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=workdir) as tmp:
        model.save(Path(tmp) / "model")
        return ReferenceBuild(publish(Path(tmp) / "model", summary.metrics()), summary)
