"""Training the reference model an atlas starts from (its version 1).

Why the coordinator trains and not a site: version 1 fixes the genes, the
architecture and every shared weight that all later contributions are frozen
against; it is built once, on the coordinator's own reference data.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedarches.config import TrainConfig
from fedarches.data.io import read_h5ad
from fedarches.format.version import LineageEntry


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
) -> tuple[Any, dict[str, Any]]:
    """``FedArchesModel.train_reference`` on ``data`` (AnnData or ``.h5ad`` path) and its metrics."""
    from fedarches.model import FedArchesModel

    model = FedArchesModel.train_reference(
        read_h5ad(data),
        condition_key,
        label_key,
        kind=kind,  # type: ignore[arg-type]
        n_genes=n_genes,
        layer=layer,
        train=train,
        progress=progress,
    )
    h = model.last_history
    metrics: dict[str, Any] = {"model": kind}
    if h is not None:
        metrics.update(
            epochs=h.epochs,
            best_epoch=h.best_epoch,
            seconds=round(h.seconds, 3),
            final_loss=h.train_loss[-1] if h.train_loss else None,
        )
    return model, metrics


def build_reference(
    workdir: Path,
    publish: Callable[[Path, Mapping[str, Any]], LineageEntry],
    data: Any,
    condition_key: str,
    label_key: str | None = None,
    **train: Any,
) -> LineageEntry:
    """Train the reference, save it under ``workdir`` and hand the model directory to ``publish``."""
    model, metrics = train_reference(data, condition_key, label_key, **train)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=workdir) as tmp:
        model.save(Path(tmp) / "model")
        return publish(Path(tmp) / "model", metrics)
