"""fedarches: federated scArches reference atlases.

The main user-facing names are importable from here, loaded on first use
(PEP 562): ``import fedarches`` and the CLI stay fast, and importing a light
module such as ``fedarches.errors`` never pulls in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "FedArchesModel": "fedarches.model",
    "MapResult": "fedarches.model",
    "ModelConfig": "fedarches.config",
    "TrainConfig": "fedarches.config",
    "MapSettings": "fedarches.config",
    "Atlas": "fedarches.server.atlas",
    "AtlasClient": "fedarches.client.fetch",
    "map_and_contribute": "fedarches.client.site",
    "map_local": "fedarches.client.site",
    "KNNLabelTransfer": "fedarches.labels.transfer",
    "integration_metrics": "fedarches.metrics",
    "simulate": "fedarches.data.simulate",
}
#: public submodules
_MODULES = ("errors",)

# Literal so linters and type checkers read it; tests/test_packaging.py checks it
# matches the tables above.
__all__ = [
    "Atlas",
    "AtlasClient",
    "FedArchesModel",
    "KNNLabelTransfer",
    "MapResult",
    "MapSettings",
    "ModelConfig",
    "TrainConfig",
    "__version__",
    "errors",
    "integration_metrics",
    "map_and_contribute",
    "map_local",
    "simulate",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from fedarches import errors
    from fedarches.client.fetch import AtlasClient
    from fedarches.client.site import map_and_contribute, map_local
    from fedarches.config import MapSettings, ModelConfig, TrainConfig
    from fedarches.data.simulate import simulate
    from fedarches.labels.transfer import KNNLabelTransfer
    from fedarches.metrics import integration_metrics
    from fedarches.model import FedArchesModel, MapResult
    from fedarches.server.atlas import Atlas


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(f"fedarches.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedarches' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
