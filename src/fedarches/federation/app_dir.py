"""The Flower app's configuration, and a stand-alone app directory for ``flwr run``.

``flwr run DIR`` needs a directory with a ``pyproject.toml`` that has a
``[tool.flwr.app]`` section. The project root is one (see its pyproject.toml);
`write_app_dir` writes another one, holding only that file, so ``fedarches demo``
and the deployment example work from an installed package without the source tree.
Both point at the same components and use `RunConfig`'s defaults (a test keeps the
project's pyproject.toml equal to them).

`write_reference_app_dir` writes the app of a federated reference build
(``atlas build-federated`` with real SuperNodes): its own components and
`ReferenceRunConfig`'s keys. A separate app, because Flower refuses a
``--run-config`` key the app's pyproject does not declare, and the two run configs
have different keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomli_w

from fedarches.atomic import make_dirs, write_text
from fedarches.federation.run_config import RunConfig

SERVER_APP = "fedarches.federation.server_app:app"
CLIENT_APP = "fedarches.federation.client_app:app"
APP_NAME = "fedarches-federation"
REFERENCE_SERVER_APP = "fedarches.federation.reference_server:app"
REFERENCE_CLIENT_APP = "fedarches.federation.reference_client:app"
REFERENCE_APP_NAME = "fedarches-reference"

RUN_CONFIG_DEFAULTS: dict[str, Any] = RunConfig.defaults()


def app_pyproject(version: str | None = None, *, name: str = APP_NAME, serverapp: str = SERVER_APP,
                  clientapp: str = CLIENT_APP, config: dict[str, Any] | None = None,
                  description: str = "fedarches coordinator (ServerApp) and site (ClientApp) for Flower",
                  ) -> dict[str, Any]:
    from fedarches import __version__

    return {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {
            "name": name,
            "version": version or __version__,
            "description": description,
            "license": "BSD-3-Clause",
            # The app runs in the environment where fedarches is installed; the
            # SuperLink is started with --disable-runtime-dependency-installation.
            "dependencies": ["fedarches"],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedarches",
                    "components": {"serverapp": serverapp, "clientapp": clientapp},
                    "config": dict(RUN_CONFIG_DEFAULTS if config is None else config),
                }
            }
        },
    }


def reference_app_pyproject(version: str | None = None) -> dict[str, Any]:
    """The Flower app of a federated reference build: `ReferenceRunConfig`'s keys, the
    required ones (``atlas-dir``, ``label-key``) empty, to be given with ``--run-config``."""
    from fedarches.federation.reference_run_config import ReferenceRunConfig

    return app_pyproject(version, name=REFERENCE_APP_NAME, serverapp=REFERENCE_SERVER_APP,
                         clientapp=REFERENCE_CLIENT_APP, config=ReferenceRunConfig.defaults(),
                         description="fedarches federated reference build (ServerApp: coordinator, "
                                     "ClientApp: a site holding reference studies) for Flower")


def _write(path: str | Path, pyproject: dict[str, Any], writer: str, what: str) -> Path:
    p = Path(path)
    make_dirs(p)
    write_text(p / "pyproject.toml", tomli_w.dumps(pyproject))
    write_text(p / "README.md", f"# fedarches Flower app\n\nWritten by `fedarches.federation.app_dir.{writer}`: "
               f"`flwr run . <superlink>` from here runs {what}.\n")
    return p


def write_app_dir(path: str | Path) -> Path:
    """Write ``path/pyproject.toml`` (a Flower app with fedarches' ServerApp and
    ClientApp) and return ``path``. The directory name must be a valid Flower app
    name (letters, digits, hyphens)."""
    return _write(path, app_pyproject(), "write_app_dir", "fedarches' coordinator and sites")


def write_reference_app_dir(path: str | Path) -> Path:
    """Write the app of a federated reference build (`reference_app_pyproject`) at
    ``path`` and return ``path``; ``flwr run`` it with ``--run-config`` giving at least
    ``atlas-dir`` and ``label-key``."""
    return _write(path, reference_app_pyproject(), "write_reference_app_dir",
                  "a federated reference build (run config: atlas-dir, label-key, rounds, ...)")
