"""The run config of a federated reference build: one validated model, one set of defaults.

The same keys reach the ServerApp from ``flwr run --run-config`` with real SuperNodes
and from ``fedarches atlas build-federated`` in simulation, so the build is the same
either way; a typo is refused before any site is asked.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedarches.config import K_MIN
from fedarches.errors import SettingError


class ReferenceRunConfig(BaseModel):
    """Keys by their hyphenated names, as in a Flower run config."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    atlas_dir: str = Field(alias="atlas-dir", min_length=1)
    label_key: str = Field(alias="label-key", min_length=1)
    model: Literal["trvae", "nb"] = "trvae"
    rounds: int = Field(20, ge=1)
    local_epochs: int = Field(5, alias="local-epochs", ge=1)
    n_genes: int = Field(2000, alias="n-genes", ge=0)
    seed: int = 0
    strategy: Literal["fedavg", "fedprox"] = "fedavg"
    proximal_mu: float = Field(0.01, alias="proximal-mu", ge=0)
    # trVAE: MMD among a site's own studies and against the other sites' studies through their
    # random-feature mean embeddings ("rff"); among a site's own studies only ("local"); or none
    mmd: Literal["local", "rff", "none"] = "rff"
    # novelty thresholds of labels two or more sites hold, after the last round from histograms
    # (`reference_calibration`): "pooled" (every site's cells against all the label's components,
    # the central build's in-sample calibration), "cross-site" (against other sites' components),
    # or "site" (each label's first site's own)
    calibration: Literal["pooled", "cross-site", "site"] = "pooled"
    bn: Literal["aggregate", "local"] = "aggregate"  # NB batch norm: FedAvg'd, or FedBN (averaged at the end)
    min_sites: int = Field(1, alias="min-sites", ge=1)  # sites to wait for; usable updates a round needs
    sites_timeout: int = Field(120, alias="sites-timeout", ge=0)
    round_timeout: int = Field(600, alias="round-timeout", gt=0)
    k_min: int = Field(K_MIN, alias="k-min", ge=1)
    report: str = ""
    sim_sites: str = Field("", alias="sim-sites")
    stop_after: int = Field(0, alias="stop-after", ge=0)  # test hook: fail the run after this round's checkpoint

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every key with its default, the required ones empty, as the app's pyproject holds
        them (Flower refuses a ``--run-config`` key the app does not declare; an empty
        ``atlas-dir`` or ``label-key`` is refused here)."""
        return {f.alias or name: "" if f.is_required() else f.default for name, f in cls.model_fields.items()}

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Any]) -> "ReferenceRunConfig":
        try:
            return cls.model_validate(dict(rc))
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"]) or "run config"
            raise SettingError(f"setting check failed: run config {key}={err.get('input')!r}: "
                               f"{str(err['msg']).removeprefix('Value error, ')}") from None

    def to_run_config(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True)

    @property
    def atlas_path(self) -> Path:
        return Path(os.path.expanduser(self.atlas_dir)).resolve()


__all__ = ["ReferenceRunConfig"]
