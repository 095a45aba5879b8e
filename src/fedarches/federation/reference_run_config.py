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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedarches.config import K_MIN
from fedarches.errors import SettingError


#: Rounds x local epochs of each model when the run config leaves them 0, chosen by measurement
#: against the central build (benchmarks/FEDERATED_REFERENCE.md, last sections): trVAE's
#: PBMC accuracy gap shrank with 2 local epochs instead of 5 (worst seed -0.028 -> -0.022). NB
#: drifts less with fewer local epochs (PBMC accuracy worst -0.047 at 30 x 5, -0.011 at 150 x 1)
#: but with its rows as trained loses held-out detection (CellBench A549 0.979 worst at 30 x 5,
#: 0.021 at 150 x 1), and refitting its rows, which keeps A549, fails non-IID sites (`FINAL_ROWS`).
SCHEDULES: dict[str, tuple[int, int]] = {"trvae": (75, 2), "nb": (30, 5)}
#: Class Gaussians of each model under ``gaussians = "auto"``, by the same measurement: pooled
#: ones (the central build's) cut trVAE's PBMC false alarms on known cells and kept A549; NB's
#: latent keeps more of the studies apart (lower EBM), its pooled Gaussians span them and
#: accepted A549 (CellBench detection 0.787 / 0.801 against 0.986 / 0.979 with the sites').
GAUSSIANS: dict[str, str] = {"trvae": "pooled", "nb": "site"}
#: A site's final condition rows under ``final-rows = "auto"``: as trained, for both models.
#: Refit (`reference_site.refit_rows`) kept NB's A549 on CellBench (0.993 worst of 5 seeds at
#: 150 x 1, against 0.021), but on generated non-IID sites (each lacks two types) it called
#: the query's known cells Unknown (0.093 against 0.013 as trained, seed 0; type A 37%, B 17%).
FINAL_ROWS: dict[str, str] = {"trvae": "trained", "nb": "trained"}


class ReferenceRunConfig(BaseModel):
    """Keys by their hyphenated names, as in a Flower run config."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    atlas_dir: str = Field(alias="atlas-dir", min_length=1)
    label_key: str = Field(alias="label-key", min_length=1)
    model: Literal["trvae", "nb"] = "trvae"
    # 0: the model's schedule (`SCHEDULES`)
    rounds: int = Field(0, ge=0)
    local_epochs: int = Field(0, alias="local-epochs", ge=0)
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
    # class Gaussians of the novelty test for labels two or more sites hold: fitted on every site's
    # cells from their moments ("pooled", the central build's), or the first site's ("site");
    # "auto": the model's (`GAUSSIANS`)
    gaussians: Literal["auto", "pooled", "site"] = "auto"
    bn: Literal["aggregate", "local"] = "aggregate"  # NB batch norm: FedAvg'd, or FedBN (averaged at the end)
    # each site's condition rows in version 1: as its last local epochs left them ("trained"), or
    # fitted again to the final shared weights, the way `map` fits a query's ("refit"); "auto":
    # the model's (`FINAL_ROWS`)
    final_rows: Literal["auto", "refit", "trained"] = Field("auto", alias="final-rows")
    min_sites: int = Field(1, alias="min-sites", ge=1)  # sites to wait for; usable updates a round needs
    sites_timeout: int = Field(120, alias="sites-timeout", ge=0)
    round_timeout: int = Field(600, alias="round-timeout", gt=0)
    k_min: int = Field(K_MIN, alias="k-min", ge=1)
    report: str = ""
    sim_sites: str = Field("", alias="sim-sites")
    stop_after: int = Field(0, alias="stop-after", ge=0)  # test hook: fail the run after this round's checkpoint

    @model_validator(mode="before")
    @classmethod
    def _schedule(cls, data: Any) -> Any:
        """Fill rounds / local epochs left 0 (or out), ``gaussians`` and ``final-rows`` left
        ``"auto"`` from the model's."""
        if not isinstance(data, Mapping):
            return data
        out = dict(data)
        model = str(out.get("model", "trvae"))
        rounds, epochs = SCHEDULES.get(model, SCHEDULES["trvae"])
        if out.get("gaussians", "auto") == "auto":
            out["gaussians"] = GAUSSIANS.get(model, GAUSSIANS["trvae"])
        rows_key = "final_rows" if "final_rows" in out else "final-rows"
        if out.get(rows_key, "auto") == "auto":
            out.pop("final_rows", None)
            out["final-rows"] = FINAL_ROWS.get(model, FINAL_ROWS["trvae"])
        for names, value in ((("rounds",), rounds), (("local-epochs", "local_epochs"), epochs)):
            given = [n for n in names if n in out]
            if not given or out[given[0]] in (0, None):
                for n in given:
                    out.pop(n)
                out[names[0]] = value
        return out

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


__all__ = ["FINAL_ROWS", "GAUSSIANS", "SCHEDULES", "ReferenceRunConfig"]
