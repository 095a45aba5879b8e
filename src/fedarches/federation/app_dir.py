"""The Flower app's configuration, and a stand-alone app directory for ``flwr run``.

``flwr run DIR`` needs a directory with a ``pyproject.toml`` that has a
``[tool.flwr.app]`` section. The project root is one (see its pyproject.toml);
`write_app_dir` writes another one, holding only that file, so ``fedarches demo``
and the deployment example work from an installed package without the source tree.
Both point at the same components and use `RunConfig`'s defaults (a test keeps the
project's pyproject.toml equal to them).
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

RUN_CONFIG_DEFAULTS: dict[str, Any] = RunConfig.defaults()


def app_pyproject(version: str | None = None) -> dict[str, Any]:
    from fedarches import __version__

    return {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {
            "name": APP_NAME,
            "version": version or __version__,
            "description": "fedarches coordinator (ServerApp) and site (ClientApp) for Flower",
            "license": "BSD-3-Clause",
            # The app runs in the environment where fedarches is installed; the
            # SuperLink is started with --disable-runtime-dependency-installation.
            "dependencies": ["fedarches"],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedarches",
                    "components": {"serverapp": SERVER_APP, "clientapp": CLIENT_APP},
                    "config": dict(RUN_CONFIG_DEFAULTS),
                }
            }
        },
    }


def write_app_dir(path: str | Path) -> Path:
    """Write ``path/pyproject.toml`` (a Flower app with fedarches' ServerApp and
    ClientApp) and return ``path``. The directory name must be a valid Flower app
    name (letters, digits, hyphens)."""
    p = Path(path)
    make_dirs(p)
    write_text(p / "pyproject.toml", tomli_w.dumps(app_pyproject()))
    write_text(
        p / "README.md",
        "# fedarches Flower app\n\nWritten by `fedarches.federation.app_dir.write_app_dir`: "
        "`flwr run . <superlink>` from here runs fedarches' coordinator and sites.\n"
    )
    return p
