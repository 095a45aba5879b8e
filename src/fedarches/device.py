"""Which torch device computes, and moving a model there and back.

Why a module of its own: every computing entry point takes one ``device``
setting (``auto``, ``cpu``, ``cuda``, ``cuda:N``) and must resolve it the same
way. The module lives on the device only while it computes: a model a caller
holds, saves or hands to another entry point is always on the CPU, so saved
safetensors and manifests never depend on where it was trained.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from fedarches.errors import SettingError

if TYPE_CHECKING:  # torch is imported where a device is resolved: the CLI's parser stays light
    import torch
    from torch import nn

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")  # the --device choices (cuda:N is accepted too)
DEFAULT_DEVICE = "auto"


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``auto`` (or None): CUDA when available, else CPU; ``cuda`` without CUDA is a
    ``SettingError`` that says what to do."""
    import torch

    name = str(device) if device is not None else DEFAULT_DEVICE
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise SettingError(
                f"setting check failed: device {name!r} asked for, but this torch build sees no CUDA device "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); use --device cpu "
                "(or auto), or install a CUDA build of torch on a machine with an NVIDIA GPU"
            )
        index = name.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise SettingError(f"setting check failed: device {name!r} does not exist "
                               f"({torch.cuda.device_count()} CUDA device(s) here)")
        return torch.device(name)
    raise SettingError(f"setting check failed: unknown device {name!r}; choose one of {', '.join(DEVICES)} "
                       "or cuda:N")


def check_device(device: str | None) -> str | None:
    """A device setting checked up front (before any data is read); returns it unchanged."""
    resolve_device(device)
    return device


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors (also inside dicts and dataclasses such as ``Nonzeros``) moved to ``device``;
    on the CPU everything is returned as it is, so CPU results cannot change."""
    import torch

    if device.type == "cpu":
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: to_device(getattr(value, f.name), device)
                                             for f in dataclasses.fields(value)})
    return value


@contextmanager
def on_device(module: nn.Module, device: str | torch.device | None) -> Iterator[torch.device]:
    """``module`` on ``device`` inside the block, back on the CPU after it (even on error)."""
    import torch

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if dev.type == "cpu":
        yield dev
        return
    module.to(dev)
    try:
        yield dev
    finally:
        module.to("cpu")
