"""Flower ServerApp: the coordinator. The rounds themselves are in `coordinator`.

Run config (pyproject ``[tool.flwr.app.config]``, ``flwr run --run-config``):
the keys of `run_config.RunConfig`, validated before any site is asked.
"""

from __future__ import annotations

import traceback
from logging import ERROR

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedarches.errors import FedarchesError
from fedarches.federation.coordinator import run_coordinator
from fedarches.threads import limit_process_threads

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    limit_process_threads(1)
    try:
        run_coordinator(grid, dict(context.run_config), int(context.run_id))
    except FedarchesError as exc:
        log(ERROR, "fedarches coordinator: %s", exc)
        raise
    except Exception:
        log(ERROR, "fedarches coordinator failed:\n%s", traceback.format_exc())
        raise
