"""What a reference build produced, in the words a coordinator checks before publishing.

Why it exists: a reference trained without labels, on the wrong studies or
with a poor integration is silently the base every later site maps onto. The
summary says which studies and how many cells went in, how many genes were
kept, which labels (or a warning that there are none), how training went, and
how well the studies mix and the labels separate in the latent space (EBM,
kNN purity, silhouettes on the reference cells), plus any warning the build
raised, as plain lines instead of raw Python warnings.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

INTEGRATION_KEYS = ("ebm", "knn_purity", "asw_celltype", "asw_batch")


@dataclass(frozen=True)
class ReferenceSummary:
    kind: str
    studies: dict[str, int]
    n_genes: int
    label_key: str | None
    labels: dict[str, int] = field(default_factory=dict)
    epochs: int | None = None
    best_epoch: int | None = None
    seconds: float | None = None
    final_loss: float | None = None
    integration: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def n_cells(self) -> int:
        return sum(self.studies.values())

    def metrics(self) -> dict[str, Any]:
        """Scalars recorded with the reference conditions in version 1 (no cell counts)."""
        out: dict[str, Any] = {"model": self.kind}
        for k in ("epochs", "best_epoch", "seconds", "final_loss"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        out.update({f"reference.{k}": round(v, 4) for k, v in self.integration.items() if math.isfinite(v)})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.kind, "studies": dict(self.studies), "n_cells": self.n_cells, "n_genes": self.n_genes,
            "label_key": self.label_key, "labels": dict(self.labels), "epochs": self.epochs,
            "best_epoch": self.best_epoch, "seconds": self.seconds, "final_loss": self.final_loss,
            "integration": dict(self.integration), "warnings": list(self.warnings),
        }

    def lines(self) -> list[str]:
        studies = ", ".join(f"{s} ({n})" for s, n in self.studies.items())
        out = [f"reference ({self.kind}): {self.n_cells} cells from {len(self.studies)} studies: {studies}",
               f"genes: {self.n_genes}"]
        if self.label_key:
            labels = ", ".join(f"{k} ({n})" for k, n in sorted(self.labels.items(), key=lambda kv: -kv[1]))
            out.append(f"labels ({self.label_key!r}, {len(self.labels)}): {labels}")
        else:
            out.append("warning: no --label-key: sites will get a latent space but no cell-type predictions "
                       "or unknown-cell calls")
        if self.epochs is not None:
            best = f", best epoch {self.best_epoch}" if self.best_epoch is not None else ""
            secs = f", {self.seconds:.1f} s" if self.seconds is not None else ""
            out.append(f"training: {self.epochs} epochs{best}{secs}")
        if self.integration:
            out.append("reference integration: " + ", ".join(
                f"{k} {v:.3f}" if math.isfinite(v) else f"{k} n/a" for k, v in self.integration.items()))
        out += [f"warning: {w}" for w in self.warnings]
        return out


def summarize_reference(model: Any, adata: Any, condition_key: str, label_key: str | None,
                        warnings: list[str] | None = None, *, max_cells: int = 20_000) -> ReferenceSummary:
    """Summary of a freshly trained ``FedArchesModel`` on the data it was trained on."""
    from fedarches.metrics import integration_metrics

    studies = Counter(adata.obs[condition_key].astype(str).tolist())
    order = [c for c in model.conditions if c in studies]
    labels = dict(Counter(adata.obs[label_key].astype(str).tolist())) if label_key else {}
    integration: dict[str, float] = {}
    latent = getattr(model, "training_latent", None)  # in memory after training, whatever is published
    if latent is None and model.reference is not None:
        latent = getattr(model.reference, "latent", None)
    if latent is not None and label_key:
        latent = np.asarray(latent)
        batch = adata.obs[condition_key].astype(str).to_numpy()
        lab = adata.obs[label_key].astype(str).to_numpy()
        scores = integration_metrics(latent, batch, lab, max_cells=max_cells, workers=1)
        integration = {k: float(scores[k]) for k in INTEGRATION_KEYS}
    h = model.last_history
    return ReferenceSummary(
        kind=model.config.kind,
        studies={s: studies[s] for s in order},
        n_genes=len(model.genes),
        label_key=label_key,
        labels=labels,
        epochs=h.epochs if h else None,
        best_epoch=h.best_epoch if h else None,
        seconds=round(h.seconds, 3) if h else None,
        final_loss=(h.train_loss[-1] if h and h.train_loss else None),
        integration=integration,
        warnings=list(warnings or []),
    )


def train_reference_with_summary(
    adata: Any,
    condition_key: str,
    label_key: str | None = None,
    *,
    reference_studies: Sequence[str] | None = None,
    **options: Any,
) -> tuple[Any, ReferenceSummary]:
    """``FedArchesModel.train_reference`` on the chosen studies, and its summary.

    ``options`` are ``train_reference``'s keywords (kind, n_genes, layer, train,
    progress). UserWarnings raised while training become summary lines, so no
    raw Python warning with a source path reaches a console.
    """
    from fedarches.data.conditions import select_conditions
    from fedarches.model import FedArchesModel

    adata = select_conditions(adata, condition_key, reference_studies)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = FedArchesModel.train_reference(adata, condition_key, label_key, **options)
    notes = list(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)))
    return model, summarize_reference(model, adata, condition_key, label_key, notes)
