"""Model and training settings, as pydantic models so they round-trip through
the canonical JSON manifest exactly (a model directory must say how it was
built, and two sites must agree on the architecture byte for byte).

Defaults are the scArches paper's Table 1.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ModelKind = Literal["trvae", "nb"]
MODEL_KINDS: tuple[str, ...] = ("trvae", "nb")  # every --model choice list and check reads this
#: What a reference publishes for label transfer (--label-knowledge): k-anonymous class
#: summaries, or the per-cell reference latent (public references). The default is chosen by
#: measurement (benchmarks/label_summaries.py, docs/LABELS.md "Label knowledge").
LabelKnowledge = Literal["summaries", "cells"]
LABEL_KNOWLEDGE: tuple[str, ...] = ("summaries", "cells")
DEFAULT_LABEL_KNOWLEDGE: LabelKnowledge = "cells"
K_MIN = 20  # every published label component stands for at least this many cells
#: Query mapping (``fedarches.query_fit``, measured in docs/SPEED.md): the new condition rows are
#: fitted on at most this many cells per new condition (0 = every cell) ...
DEFAULT_FIT_CELLS = 2000
#: ... until they change by less than this (relative, per epoch) several epochs in a row (0 = off).
DEFAULT_CONVERGE_TOL = 1e-3
CONVERGE_PATIENCE = 5
Strategy = Literal["conditions", "input-layers", "full"]
STRATEGIES: tuple[str, ...] = ("conditions", "input-layers", "full")


class ModelConfig(BaseModel):
    """Architecture and loss weights of a conditional VAE."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ModelKind = "trvae"
    n_genes: int = Field(gt=0)
    hidden: tuple[int, ...] = (128, 20)
    latent_dim: int = 10
    dropout: float = 0.05
    decoder_dropout: float = 0.05
    norm: Literal["none", "batch"] = "none"
    kl_weight: float = 0.001  # alpha
    mmd_weight: float = 20.0  # beta
    recon_weight: float = 1000.0  # eta
    grad_clip: float = 5.0
    # Label-aware reference (scANVI's idea): a linear classifier on the latent,
    # trained with the reference labels, so cell types the reference tells apart
    # stay apart in the latent. 0 labels = no classifier. It is a frozen shared
    # weight after surgery, so bundles and the surgery invariants do not change.
    n_labels: int = Field(default=0, ge=0)
    classifier_weight: float = Field(default=0.0, ge=0.0)

    @classmethod
    def paper_defaults(cls, kind: ModelKind, n_genes: int) -> "ModelConfig":
        if kind == "trvae":
            return cls(kind="trvae", n_genes=n_genes)
        return cls(
            kind="nb",
            n_genes=n_genes,
            hidden=(128, 128),
            latent_dim=10,
            dropout=0.1,
            decoder_dropout=0.0,
            norm="batch",
            kl_weight=0.0002,
            mmd_weight=0.0,
            recon_weight=1.0,
            grad_clip=3.0,
        )

    @property
    def encoder_width(self) -> int:
        """Width p of the first encoder layer (the one that takes conditions)."""
        return self.hidden[0]

    @property
    def decoder_width(self) -> int:
        """Width q of the first decoder layer (the one that takes conditions)."""
        return self.hidden[-1]

    def condition_parameter_count(self, n_conditions: int) -> int:
        """Trainable parameters that `n_conditions` new conditions add (paper: m x (p + q),
        plus one dispersion vector per condition for the NB likelihood)."""
        per = self.encoder_width + self.decoder_width
        if self.kind == "nb":
            per += self.n_genes
        return n_conditions * per


class TrainConfig(BaseModel):
    """How a model was (or will be) trained; stored in the manifest for provenance."""

    model_config = ConfigDict(extra="forbid")

    epochs: int | None = None  # None: chosen from the number of cells
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-6
    validation_fraction: float = 0.1
    early_stopping_patience: int = 20
    kl_warmup_epochs: int | None = None  # None: a third of the epochs
    seed: int = 0
    threads: int | None = None  # None: leave torch's own setting
    strategy: Strategy = "conditions"
    # Where it computes (fedarches.device: auto = CUDA when available). A runtime setting,
    # never stored: a manifest's bytes (and so a version id) do not depend on the machine.
    device: str = Field(default="auto", exclude=True)


class MapSettings(BaseModel):
    """How a site (or a single machine) maps a query: one object from the CLI or
    the Flower run config down to ``map_query``, so no layer rebuilds it from
    loose keyword arguments and every entry point maps the same way."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int | None = None  # None: the model's own schedule
    strategy: Strategy = "conditions"
    seed: int = 0
    threads: int | None = Field(default=None, ge=1)
    conditions_per_round: int = Field(default=0, ge=0)  # 0 = map every new condition
    progress: bool = False
    # the new rows are fitted on at most fit_cells cells per new condition (0: every cell), then
    # every cell is embedded; training stops once they move less than converge_tol (0: off)
    fit_cells: int = DEFAULT_FIT_CELLS
    converge_tol: float = DEFAULT_CONVERGE_TOL
    lr: float | None = None  # learning rate of the query fit (None: the reference's)
    # obs column of the site's own labels: share their class summaries in the bundle (opt-in;
    # only onto a version whose label knowledge is summaries). None: share no label knowledge.
    share_labels: str | None = None
    device: str = Field(default="auto", exclude=True)  # as TrainConfig.device: runtime only, never stored
