"""What coordinator and sites say to each other while they build the reference together.

Four exchanges, all plain records (no pickle, nothing per cell):

1. ``query.fedarches_stats`` (coordinator -> every site, content: ConfigRecord
   ``fedarches`` with ``protocol`` and ``label-key``). Reply: the site's name, its
   studies, its condition key, its gene names, per label the number of its cells
   (a count per label, bounded by the label count), and per study n and the per-gene
   vectors of ``data.gene_stats.StudyGeneStats`` (ArrayRecord ``stats``, keys
   ``<study index>/<field>``). The coordinator picks the genes from these.
2. ``train`` (Flower's FedAvg: ArrayRecord ``arrays`` = the shared weights,
   ConfigRecord ``config`` = `BuildSetup` fields + ``server-round``). Reply:
   ArrayRecord ``arrays`` (the site's shared weights after its local epochs) and
   MetricRecord ``metrics`` with ``num-examples`` (its cells: FedAvg's weight) and
   ``round`` (the round the update was built on: the coordinator refuses any other).
   Each study's condition rows stay at its site. With ``mmd = "rff"`` (trVAE) the
   round's message also holds ArrayRecord ``mmd``: per study of every site, the mean
   random-Fourier-feature embedding of its cells' first decoder layer output after the
   previous round (`RFF_RECORD`; a mean over >= k_min cells, never a cell), and each
   reply adds its own studies' means after its local epochs.
3. ``query.fedarches_finish`` (arrays = the final shared weights, config as in 2).
   Reply: ConfigRecord ``fedarches`` with ``bundle``: the site's signed contribution
   bundle (``format.bundle``, the format ``site map`` writes) holding its studies'
   condition rows and the class summaries of its labelled cells; its ``parent`` is
   `shared_digest` of the final shared weights, which binds the slices to them.
4. ``query.fedarches_calibrate`` (`reference_calibration`, twice; arrays as in 3,
   ArrayRecord ``labels`` = the merged class summaries' state plus each component's
   site, ConfigRecord ``calibration`` with ``step``). Reply: ArrayRecord ``histograms``,
   per label counts of the site's cells' novelty statistics on one fixed logarithmic
   grid (labels of >= k_min cells at the site; 800 bins each), so the coordinator sets
   each label several sites hold its threshold from all their cells, as the central
   build does from its pooled cells.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedarches.errors import ProtocolError

PROTOCOL = "fedarches.reference/1"
RECORD = "fedarches"
STATS = "fedarches_stats"
FINISH = "fedarches_finish"
RFF_RECORD = "mmd"
RFF_PER_SCALE = 64  # random features per kernel scale: 13 scales x 64 = 832 numbers per study
STAT_FIELDS = ("mean", "variance", "variance-norm")
#: the keys of a shared state dict that do not travel: integer counters, not weights
LOCAL_KEYS = ("num_batches_tracked",)


_LISTS = ("sites", "genes", "label_categories")


@dataclass(frozen=True)
class BuildSetup:
    """Everything a site needs to train its part of the same model; sent with every round.

    Why in every message and not once: a site keeps nothing but its condition rows,
    so a site that restarts, or a coordinator that resumes, needs no extra exchange.
    """

    atlas: str
    sites: list[str]  # the sites taking part (a node not named here refuses the round)
    genes: list[str]
    model_config: str  # canonical JSON of ModelConfig
    label_key: str
    label_categories: list[str]
    local_epochs: int
    total_epochs: int  # rounds x local epochs: the KL warm-up runs over a third of them
    seed: int = 0
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-6
    k_min: int = 10
    bn: str = "aggregate"  # batch-norm tensors: "aggregate" (FedAvg) or "local" (FedBN)
    mmd: str = "local"  # trVAE: "local" (a site's own studies), "rff" (+ other sites' mean embeddings), "none"
    rows: str = "trained"  # a site's final rows: "trained" (its last local epochs') or "refit" (`reference_site.refit_rows`)

    @property
    def digest(self) -> str:
        """Names this build: a site's kept rows and the coordinator's checkpoint belong to it."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    def to_config(self, **extra: Any) -> ConfigRecord:
        d = asdict(self)
        for k in _LISTS:
            d[k] = json.dumps(d[k])
        return ConfigRecord({"protocol": PROTOCOL, **{k.replace("_", "-"): v for k, v in d.items()}, **extra})

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "BuildSetup":
        if cfg.get("protocol") != PROTOCOL:
            raise ProtocolError(f"protocol check failed: expected {PROTOCOL!r}, got {cfg.get('protocol')!r}")
        kw: dict[str, Any] = {}
        for name, f in cls.__dataclass_fields__.items():
            key = name.replace("_", "-")
            if key in cfg:
                kw[name] = cfg[key]
            elif f.default is MISSING:
                raise ProtocolError(f"protocol check failed: the build setup has no {key!r}")
        for k in _LISTS:
            kw[k] = [str(v) for v in json.loads(str(kw[k]))]
        return cls(**kw)


@dataclass(frozen=True)
class SiteStatistics:
    """A site's answer to the statistics query."""

    site: str
    condition_key: str
    genes: list[str]
    studies: list[str]
    n_cells: list[int]
    label_counts: dict[str, int]
    stats: dict[str, np.ndarray]  # "<study index>/<field>" -> float64 [genes]

    def to_content(self) -> RecordDict:
        cfg = ConfigRecord({"protocol": PROTOCOL, "site": self.site, "condition-key": self.condition_key,
                            "genes": json.dumps(self.genes), "studies": json.dumps(self.studies),
                            "n-cells": json.dumps(self.n_cells), "label-counts": json.dumps(self.label_counts)})
        arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in self.stats.items()})
        return RecordDict({RECORD: cfg, "stats": arrays})

    @classmethod
    def from_message(cls, msg: Message) -> "SiteStatistics":
        try:
            cfg = msg.content.config_records[RECORD]
            arrays = msg.content.array_records["stats"]
            if cfg.get("protocol") != PROTOCOL:
                raise ProtocolError(f"protocol check failed: reply speaks {cfg.get('protocol')!r}")
            out = cls(site=str(cfg["site"]), condition_key=str(cfg["condition-key"]),
                      genes=[str(g) for g in json.loads(str(cfg["genes"]))],
                      studies=[str(s) for s in json.loads(str(cfg["studies"]))],
                      n_cells=[int(n) for n in json.loads(str(cfg["n-cells"]))],
                      label_counts={str(k): int(v) for k, v in json.loads(str(cfg["label-counts"])).items()},
                      stats={k: np.asarray(v.numpy(), dtype=np.float64) for k, v in arrays.items()})
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"protocol check failed: malformed statistics reply: {exc}") from None
        if len(out.studies) != len(out.n_cells) or set(out.stats) != {
                f"{i}/{f}" for i in range(len(out.studies)) for f in STAT_FIELDS}:
            raise ProtocolError(f"protocol check failed: statistics of site {out.site!r} do not match its studies")
        return out


def shared_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over the shared weights (keys sorted, dtype, shape, bytes): a bundle's parent."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def record_bytes(record: ArrayRecord) -> int:
    """Tensor bytes of an ArrayRecord (what one direction of a round sends)."""
    return int(sum(len(a.data) for a in record.values()))


__all__ = ["BuildSetup", "SiteStatistics", "shared_digest", "record_bytes", "PROTOCOL", "STATS", "FINISH",
           "LOCAL_KEYS", "RFF_RECORD", "RFF_PER_SCALE"]
