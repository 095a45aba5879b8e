"""Helpers shared by the atlas / site tests (no tests here).

Model directories are built straight from the torch module (``models.cvae``)
through the storage API, so TUF, signing, intake and merge tests run in well
under a second each without training anything. The tests that need real
mapping (merge exactness) live in ``test_site_map.py``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sys
from pathlib import Path

import torch

from fedarches.config import ModelConfig, TrainConfig
from fedarches.format.bundle import create_bundle
from fedarches.models.cvae import CVAE
from fedarches.server import Atlas, make_server
from fedarches.format.signing import PrivateKey, generate_key
from fedarches.format.model_dir import CONDITIONS, ModelManifest, WEIGHTS, save_model_dir

N_GENES = 20
CLI = [sys.executable, "-c", "import sys; from fedarches.cli import main; sys.exit(main(sys.argv[1:]))"]


def free_port() -> int:
    """A port that was free a moment ago (the server then binds it explicitly)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_model_dir(path: Path, conditions=("s0", "s1"), kind: str = "trvae", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    cfg = ModelConfig.paper_defaults(kind, N_GENES)  # type: ignore[arg-type]
    module = CVAE(cfg, list(conditions))
    manifest = ModelManifest(
        config=cfg,
        train=TrainConfig(epochs=1),
        genes=[f"g{i}" for i in range(N_GENES)],
        conditions=list(conditions),
        condition_key="study",
    )
    save_model_dir(path, manifest, {WEIGHTS: module.shared_state_dict(), CONDITIONS: module.condition_state()})
    return path


def condition_vectors(atlas: Atlas, names, seed: int = 1, version: int = 1) -> dict[str, torch.Tensor]:
    """Random new-condition vectors with the shapes the atlas version needs (what a site trains)."""
    return random_condition_vectors(atlas.version(version).model.config, names, seed)


def random_condition_vectors(cfg, names, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ``<table>/<condition>`` vectors with the shapes ``cfg`` gives new conditions."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in names:
        out[f"encoder/{n}"] = torch.randn(cfg.encoder_width, generator=g)
        out[f"decoder/{n}"] = torch.randn(cfg.decoder_width, generator=g)
        if cfg.kind == "nb":
            out[f"dispersion/{n}"] = torch.randn(cfg.n_genes, generator=g)
    return out


def bundle_for(
    atlas: Atlas,
    key: PrivateKey,
    site: str,
    names,
    *,
    version: int = 1,
    seed: int = 1,
    strategy: str = "conditions",
    extra: dict[str, torch.Tensor] | None = None,
) -> bytes:
    v = atlas.version(version)
    tensors = condition_vectors(atlas, names, seed=seed, version=version)
    tensors.update(extra or {})
    return create_bundle(
        key=key,
        site=site,
        atlas=atlas.name,
        parent=v.id,
        parent_number=v.number,
        strategy=strategy,  # type: ignore[arg-type]
        tensors=tensors,
        metrics={"epochs": 3, "label_transfer.accuracy_known": 0.9},
    )


def new_atlas(tmp: Path, name: str = "demo", **kw) -> Atlas:
    atlas = Atlas.init(tmp / "atlas", name, **kw)
    atlas.publish_reference(make_model_dir(tmp / "ref"))
    return atlas


def enrolled_key(atlas: Atlas, site: str) -> PrivateKey:
    key = generate_key()
    atlas.enroll(site, key.public)
    return key


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (to prove "state unchanged")."""
    out = {}
    if not path.exists():
        return out
    for p in sorted(path.rglob("*")):
        if p.is_file() and not p.is_symlink() and p.name != ".lock":
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_symlink():
            out[str(p.relative_to(path))] = "->" + os.readlink(p)
    return out


class Served:
    """Serve a directory on loopback at an explicit free port for the test's duration."""

    def __init__(self, directory: Path):
        self.server = make_server(directory, "127.0.0.1", free_port())
        self.server.start_background()
        self.url = self.server.url

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def mirror(atlas: Atlas, dest: Path) -> Path:
    """A copy of the published repository (what a mirror or CDN would hold)."""
    shutil.copytree(atlas.repository_dir, dest)
    return dest
