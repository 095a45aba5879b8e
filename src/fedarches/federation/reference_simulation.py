"""``fedarches atlas build-federated``: the reference build in a Flower simulation on one machine.

The sites file (``SITES.toml``: one ``[[site]]`` table per site, the keys of a SuperNode's
node config: ``site``, ``data``, ``condition-key``, ``key-dir``) becomes the simulation's
``sim-sites``: simulated SuperNode i is site i. Every site is checked (its settings and
its enrolment) before Ray starts, so a typo costs no simulation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fedarches.errors import EnrollmentError, FedarchesError, ProtocolError
from fedarches.federation.protocol import SIM_SITES_ENV, SiteConfig, load_sim_sites
from fedarches.federation.reference_run_config import ReferenceRunConfig


def read_sites(path: str | os.PathLike[str]) -> list[SiteConfig]:
    """The sites of ``SITES.toml``, each validated as a node config."""
    return [SiteConfig.from_mapping(s, where=f"{path} [[site]] #{i}") for i, s in enumerate(load_sim_sites(path))]


def build_federated(cfg: ReferenceRunConfig, sites_toml: str | os.PathLike[str], *,
                    parallel: int | None = None) -> dict[str, Any]:
    """Run the build (``reference_coordinator``) with one simulated SuperNode per site; returns
    its report, or raises the coordinator's error."""
    from flwr.simulation import run_simulation

    from fedarches.federation.reference_client import app as client_app
    from fedarches.federation.reference_server import server_app
    from fedarches.server.atlas import Atlas
    from fedarches.server.registry import read_registry

    sites = read_sites(sites_toml)
    enrolled = read_registry(Atlas(cfg.atlas_path).path / "sites.json").sites
    missing = [s.site for s in sites if s.site not in enrolled]
    if missing:
        raise EnrollmentError(f"enrollment check failed: sites {missing} are not enrolled at this atlas; "
                              "run `fedarches atlas enroll` for each first")
    cfg = cfg.model_copy(update={"sim_sites": str(Path(sites_toml).resolve()),
                                 "min_sites": max(cfg.min_sites, 1)})
    for k in ("FLWR_TELEMETRY_ENABLED", "RAY_USAGE_STATS_ENABLED"):
        os.environ.setdefault(k, "0")
    outcome: dict[str, Any] = {}
    n = len(sites)
    # the simulated sites (Ray workers, started by run_simulation) read their settings from
    # it; put back as it was afterwards, so it never leaks into the caller's later runs
    previous = os.environ.get(SIM_SITES_ENV)
    os.environ[SIM_SITES_ENV] = cfg.sim_sites
    try:
        run_simulation(server_app=server_app(cfg, outcome), client_app=client_app, num_supernodes=n,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": int(parallel or min(n, os.cpu_count() or 1))}})
    except Exception:
        if "error" not in outcome:
            raise
    finally:
        if previous is None:
            os.environ.pop(SIM_SITES_ENV, None)
        else:
            os.environ[SIM_SITES_ENV] = previous
    if isinstance(outcome.get("error"), FedarchesError):
        raise outcome["error"]
    if "error" in outcome:
        raise RuntimeError(f"federated reference build failed: {outcome['error']}") from outcome["error"]
    if "report" not in outcome:
        raise ProtocolError("protocol check failed: the simulation ended without a build report")
    return outcome["report"]


__all__ = ["build_federated", "read_sites"]
