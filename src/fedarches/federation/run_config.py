"""The Flower run config as one validated model with one set of defaults.

Why validate on the coordinator: a run-config value reaches every site in the
request; a typo in ``strategy`` used to make every site fail one by one. Here it
is refused before any message is sent. The defaults below are the only ones:
``app_dir`` writes them into the app's pyproject and a test keeps the
repository's ``[tool.flwr.app.config]`` equal to them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedarches.config import STRATEGIES
from fedarches.errors import SettingError


class RunConfig(BaseModel):
    """Every ``[tool.flwr.app.config]`` key, by its hyphenated name."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    num_server_rounds: int = Field(1, alias="num-server-rounds", ge=1)
    epochs: int = Field(0, ge=0)
    strategy: str = "conditions"
    round_timeout: int = Field(600, alias="round-timeout", gt=0)
    atlas_dir: str = Field("", alias="atlas-dir")
    atlas_url: str = Field("", alias="atlas-url")
    serve_host: str = Field("127.0.0.1", alias="serve-host")
    serve_port: int = Field(0, alias="serve-port", ge=0, le=65535)
    min_sites: int = Field(1, alias="min-sites", ge=0)
    sites_timeout: int = Field(60, alias="sites-timeout", ge=0)
    report: str = ""
    sim_sites: str = Field("", alias="sim-sites")

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v: str) -> str:
        if v not in STRATEGIES:
            raise ValueError(f"unknown strategy {v!r}; allowed: {', '.join(STRATEGIES)}")
        return v

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The run config's defaults, keyed as in pyproject."""
        return cls().model_dump(by_alias=True)

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Any]) -> "RunConfig":
        """Validate a Flower run config; env ``FEDARCHES_ATLAS_DIR`` / ``FEDARCHES_ATLAS_URL``
        fill an empty ``atlas-dir`` / ``atlas-url``. Raises `SettingError` naming the key."""
        try:
            cfg = cls.model_validate(dict(rc))
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"]) or "run config"
            msg = str(err["msg"]).removeprefix("Value error, ")
            raise SettingError(
                f"setting check failed: run config {key}={err.get('input')!r}: {msg}"
            ) from None
        fill = {
            "atlas_dir": cfg.atlas_dir or os.environ.get("FEDARCHES_ATLAS_DIR", ""),
            "atlas_url": (cfg.atlas_url or os.environ.get("FEDARCHES_ATLAS_URL", "")).rstrip("/"),
        }
        if not fill["atlas_dir"]:
            raise SettingError(
                "setting check failed: no atlas directory: set run config atlas-dir "
                "(flwr run --run-config 'atlas-dir=\"/path\"') or FEDARCHES_ATLAS_DIR in the SuperLink's environment"
            )
        return cfg.model_copy(update=fill)

    @property
    def atlas_path(self) -> Path:
        return Path(os.path.expanduser(self.atlas_dir)).resolve()

    @property
    def report_path(self) -> Path | None:
        return Path(os.path.expanduser(self.report)).resolve() if self.report else None
