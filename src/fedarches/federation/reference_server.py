"""Flower ServerApp of a federated reference build; the build itself is `reference_coordinator`.

With real SuperNodes: ``flwr run`` of the app `app_dir.write_reference_app_dir` writes (it
declares every key of `reference_run_config.ReferenceRunConfig`) with ``--run-config``
(docs/FEDERATED_REFERENCE.md; tests/test_federated_reference_deploy.py). In simulation
(``fedarches atlas build-federated``), `server_app` closes over the validated config,
since ``run_simulation`` passes no run config.
"""

from __future__ import annotations

import traceback
from logging import ERROR
from typing import Any

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedarches.errors import FedarchesError
from fedarches.federation.reference_coordinator import run_reference_build
from fedarches.federation.reference_run_config import ReferenceRunConfig
from fedarches.threads import limit_process_threads


def _run(grid: Grid, cfg: ReferenceRunConfig | dict[str, Any], outcome: dict[str, Any]) -> None:
    limit_process_threads(1)
    try:
        outcome["report"] = run_reference_build(grid, cfg)
    except FedarchesError as exc:
        outcome["error"] = exc
        log(ERROR, "fedarches coordinator: %s", exc)
        raise
    except Exception as exc:
        outcome["error"] = exc
        log(ERROR, "fedarches coordinator failed:\n%s", traceback.format_exc())
        raise


def server_app(cfg: ReferenceRunConfig, outcome: dict[str, Any]) -> ServerApp:
    """A ServerApp running the build with ``cfg``; ``outcome`` gets its report or its error."""
    sapp = ServerApp()

    @sapp.main()
    def main(grid: Grid, context: Context) -> None:
        _run(grid, cfg, outcome)

    return sapp


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    _run(grid, dict(context.run_config), {})
