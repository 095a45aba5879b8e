"""What the coordinator and the sites say to each other over Flower.

One exchange per round and site, both directions plain records (no pickle):

request (ServerApp -> ClientApp, message type ``train``), ``content["fedarches"]``
(a ConfigRecord):

    protocol     "fedarches.map/1"
    round        int, 1-based
    atlas-url    base URL of the atlas's published TUF repository
    version      number of the version to map onto (the current main-line head)
    version-id   its id (sha256 of its manifest), for the logs
    trust-root   bytes of the atlas's root.json (used only when the site has not
                 pinned one in its node config; see `resolve_trust_root`)
    epochs       int, 0 = the model's default schedule
    strategy     fine-tuning strategy ("conditions" merges; others make branches)

reply (ClientApp -> ServerApp), ``content["fedarches"]`` (ConfigRecord):

    status       "contributed" | "nothing-new" | "failed"
    site         the site's name
    conditions   list of condition names the bundle adds (empty for nothing-new)
    bundle       bytes of the signed contribution bundle (only when contributed)
    message      one human-readable line
    check        (failed only) the failed check, ``FedarchesError.check``
    error-class  (failed only) the error's class name, e.g. "ColumnError"

plus ``content["metrics"]``, a MetricRecord of the site's scalar metrics
(label-transfer accuracy, fraction of unknown cells, seconds, ...). No cell, count,
gene value or cell id is ever in a reply; the bundle is the same file
`fedarches site map` writes and is verified by its signature, not by the channel.

A site whose input or configuration is wrong (a ``FedarchesError``) answers with
a normal reply of status ``failed``, so the coordinator reads the site name and
the failed check from fields instead of parsing error text. A Flower ``Error``
(code `ERROR_INTERNAL`) is kept for bugs; the coordinator records its node id
and reason as they are. Either way the round goes on with the other sites.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedarches.atomic import PUBLIC_FILE, write_text
from fedarches.errors import FedarchesError, ProtocolError, SettingError

PROTOCOL = "fedarches.map/1"
RECORD = "fedarches"
METRICS = "metrics"
# The site job's outcomes, as `fedarches.client.site` names them (a test keeps them equal). Written
# out rather than imported: this module is what a ClientApp process loads before any message
# arrives, and the site's libraries (torch, anndata) load in the job process only.
STATUS_CONTRIBUTED = "contributed"
STATUS_NOTHING_NEW = "nothing-new"
STATUS_FAILED = "failed"
STATUSES = (STATUS_CONTRIBUTED, STATUS_NOTHING_NEW, STATUS_FAILED)
ERROR_INTERNAL = 5001  # a bug or an environment problem at the site



@dataclass(frozen=True)
class MapRequest:
    round: int
    atlas_url: str
    version: int
    version_id: str
    trust_root: bytes
    epochs: int = 0
    strategy: str = "conditions"

    def to_content(self) -> RecordDict:
        return RecordDict(
            {
                RECORD: ConfigRecord(
                    {
                        "protocol": PROTOCOL,
                        "round": int(self.round),
                        "atlas-url": self.atlas_url,
                        "version": int(self.version),
                        "version-id": self.version_id,
                        "trust-root": bytes(self.trust_root),
                        "epochs": int(self.epochs),
                        "strategy": self.strategy,
                    }
                )
            }
        )

    @classmethod
    def from_message(cls, msg: Message) -> "MapRequest":
        return cls.from_content(msg.content)

    @classmethod
    def from_content(cls, content: RecordDict) -> "MapRequest":
        if RECORD not in content.config_records:
            raise ProtocolError(f"protocol check failed: message has no '{RECORD}' config record; not a fedarches request")
        rec = content.config_records[RECORD]
        if rec.get("protocol") != PROTOCOL:
            raise ProtocolError(
                f"protocol check failed: coordinator speaks {rec.get('protocol')!r}, this site {PROTOCOL!r}"
            )
        try:
            return cls(
                round=int(rec["round"]),
                atlas_url=str(rec["atlas-url"]),
                version=int(rec["version"]),
                version_id=str(rec["version-id"]),
                trust_root=bytes(rec["trust-root"]),
                epochs=int(rec.get("epochs", 0)),
                strategy=str(rec.get("strategy", "conditions")),
            )
        except KeyError as exc:
            raise ProtocolError(f"protocol check failed: request is missing field {exc}") from exc


@dataclass(frozen=True)
class MapReply:
    status: str
    site: str
    message: str = ""
    conditions: tuple[str, ...] = ()
    bundle: bytes = b""
    metrics: dict[str, float | int] = field(default_factory=dict)
    check: str = ""
    error_class: str = ""

    @classmethod
    def failed(cls, site: str, exc: FedarchesError) -> "MapReply":
        """The reply of a site whose input failed a check: named fields, no text to parse."""
        return cls(status=STATUS_FAILED, site=site, message=str(exc), check=exc.check,
                   error_class=type(exc).__name__)

    def to_content(self) -> RecordDict:
        cfg: dict[str, Any] = {
            "status": self.status,
            "site": self.site,
            "message": self.message,
            "conditions": list(self.conditions),
        }
        if self.status == STATUS_FAILED:
            cfg["check"], cfg["error-class"] = self.check, self.error_class
        if self.bundle:
            cfg["bundle"] = bytes(self.bundle)
        return RecordDict({RECORD: ConfigRecord(cfg), METRICS: MetricRecord(dict(self.metrics))})

    @classmethod
    def from_message(cls, msg: Message) -> "MapReply":
        return cls.from_content(msg.content)

    @classmethod
    def from_content(cls, content: RecordDict) -> "MapReply":
        if RECORD not in content.config_records:
            raise ProtocolError("protocol check failed: reply has no 'fedarches' config record")
        rec = content.config_records[RECORD]
        status = str(rec.get("status", ""))
        if status not in STATUSES:
            raise ProtocolError(f"protocol check failed: reply status {status!r} is not one of {STATUSES}")
        from fedarches.format.bundle import MAX_BUNDLE_BYTES

        bundle = rec.get("bundle", b"")
        if not isinstance(bundle, bytes):
            raise ProtocolError("protocol check failed: reply field 'bundle' is not bytes")
        if len(bundle) > MAX_BUNDLE_BYTES:
            raise ProtocolError(f"protocol check failed: reply bundle is {len(bundle)} bytes, above the {MAX_BUNDLE_BYTES} byte limit")
        if status == STATUS_CONTRIBUTED and not bundle:
            raise ProtocolError("protocol check failed: reply says 'contributed' but carries no bundle")
        conditions = rec.get("conditions", [])
        if isinstance(conditions, str):
            conditions = [conditions]
        metrics: dict[str, float | int] = {}
        if METRICS in content.metric_records:
            for k, v in content.metric_records[METRICS].items():
                if isinstance(v, (int, float)) and math.isfinite(float(v)):
                    metrics[str(k)] = v
        return cls(
            status=status,
            site=str(rec.get("site", "")),
            message=str(rec.get("message", "")),
            conditions=tuple(str(c) for c in conditions),
            bundle=bundle,
            metrics=metrics,
            check=str(rec.get("check", "")),
            error_class=str(rec.get("error-class", "")),
        )


def reply_metrics(values: Mapping[str, Any]) -> dict[str, float | int]:
    """What a MetricRecord takes of already sanitised metrics: numbers, booleans as 0/1."""
    return {k: int(v) if isinstance(v, bool) else v for k, v in values.items()
            if isinstance(v, (bool, int, float))}


# --------------------------------------------------------------------------- site config

NODE_KEYS = ("site", "data", "condition-key", "key-dir", "out-dir", "trust-root", "epochs", "conditions-per-round",
             "fault", "fault-rounds", "share-labels")
#: What a ``fault`` node config makes a site do mid-round, as a broken site would (a test hook:
#: the fault tests and benchmarks/faults.py drive real site processes with it). ``crash``: the
#: job raises; ``kill``: the site's process dies (SIGKILL); ``hang``: it sleeps past any
#: deadline; ``garbage``: it sends its signed bundle with corrupted bytes.
FAULTS = ("crash", "kill", "hang", "garbage")
REQUIRED_NODE_KEYS = ("site", "data", "condition-key", "key-dir")


@dataclass(frozen=True)
class SiteConfig:
    """A site's local settings, from its SuperNode's node config.

    ``--node-config`` keys: ``site`` (name, as enrolled at the coordinator), ``data``
    (path of the site's .h5ad), ``condition-key`` (obs column naming the study),
    ``key-dir`` (from ``fedarches site keygen``); optional ``out-dir`` (where
    results stay; default ``<key-dir>/../<site>-results``), ``trust-root`` (a pinned
    root.json; without it the site trusts the root the coordinator sends, over the
    TLS-authenticated Flower channel), ``epochs`` (overrides the coordinator's),
    ``conditions-per-round`` (map at most this many new studies per round, first
    ones first; 0 = all), ``share-labels`` (obs column of the site's own labels: their
    class summaries travel in the bundle, as ``site map --share-labels``). If the data
    holds the atlas's label column, the site
    scores label transfer against it and reports only the scores. ``fault`` (one of
    `FAULTS`) and ``fault-rounds`` (comma-separated round numbers; empty = every
    round) are a test hook that makes the site misbehave mid-round.
    """

    site: str
    data: Path
    condition_key: str
    key_dir: Path
    out_dir: Path | None = None
    trust_root: Path | None = None
    epochs: int | None = None
    conditions_per_round: int = 0
    fault: str = ""
    fault_rounds: tuple[int, ...] = ()
    share_labels: str | None = None

    def fault_in(self, rnd: int) -> str:
        """The fault this site injects in round ``rnd`` ("" = none)."""
        return self.fault if self.fault and (not self.fault_rounds or rnd in self.fault_rounds) else ""

    @property
    def results_dir(self) -> Path:
        return self.out_dir if self.out_dir is not None else self.key_dir.parent / f"{self.site}-results"

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any], where: str = "node config") -> "SiteConfig":
        missing = [k for k in REQUIRED_NODE_KEYS if not str(cfg.get(k, "")).strip()]
        if missing:
            raise SettingError(
                f"setting check failed: {where} is missing {', '.join(missing)}; start the SuperNode with "
                "--node-config 'site=\"NAME\" data=\"/path/site.h5ad\" condition-key=\"study\" "
                "key-dir=\"/path/keys\"'"
            )

        def opt(key: str) -> str | None:
            v = cfg.get(key)
            return str(v) if v is not None and str(v).strip() != "" else None

        epochs = cfg.get("epochs")
        fault = opt("fault") or ""
        if fault and fault not in FAULTS:
            raise SettingError(f"setting check failed: {where} fault={fault!r}; allowed: {', '.join(FAULTS)}")
        try:
            rounds = tuple(int(r) for r in str(cfg.get("fault-rounds", "") or "").replace(",", " ").split())
        except ValueError:
            raise SettingError(f"setting check failed: {where} fault-rounds={cfg.get('fault-rounds')!r} "
                               "is not a list of round numbers") from None
        return cls(
            site=str(cfg["site"]),
            data=Path(os.path.expanduser(str(cfg["data"]))),
            condition_key=str(cfg["condition-key"]),
            key_dir=Path(os.path.expanduser(str(cfg["key-dir"]))),
            out_dir=Path(os.path.expanduser(opt("out-dir"))) if opt("out-dir") else None,
            trust_root=Path(os.path.expanduser(opt("trust-root"))) if opt("trust-root") else None,
            epochs=int(epochs) if epochs not in (None, "") and int(epochs) > 0 else None,
            conditions_per_round=int(cfg.get("conditions-per-round", 0) or 0),
            fault=fault,
            fault_rounds=rounds,
            share_labels=opt("share-labels"),
        )

    def to_node_config(self) -> dict[str, str | int]:
        out: dict[str, str | int] = {
            "site": self.site,
            "data": str(self.data),
            "condition-key": self.condition_key,
            "key-dir": str(self.key_dir),
        }
        if self.out_dir is not None:
            out["out-dir"] = str(self.out_dir)
        if self.trust_root is not None:
            out["trust-root"] = str(self.trust_root)
        if self.epochs:
            out["epochs"] = int(self.epochs)
        if self.conditions_per_round:
            out["conditions-per-round"] = int(self.conditions_per_round)
        if self.fault:
            out["fault"] = self.fault
        if self.share_labels:
            out["share-labels"] = self.share_labels
        if self.fault_rounds:
            out["fault-rounds"] = ",".join(str(r) for r in self.fault_rounds)
        return out


def load_sim_sites(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Per-site settings for simulation: a TOML file with one ``[[site]]`` table per
    simulated SuperNode (same keys as ``--node-config``), indexed by partition-id."""
    import tomllib

    p = Path(path)
    if not p.is_file():
        raise SettingError(f"setting check failed: simulation sites file {p} does not exist (run config 'sim-sites')")
    with p.open("rb") as fh:
        doc = tomllib.load(fh)
    sites = doc.get("site")
    if not isinstance(sites, list) or not sites:
        raise SettingError(f"setting check failed: {p} has no [[site]] tables")
    return [dict(s) for s in sites]


def write_sim_sites(path: str | os.PathLike[str], sites: list[SiteConfig]) -> Path:
    import tomli_w

    p = Path(path)
    write_text(p, tomli_w.dumps({"site": [s.to_node_config() for s in sites]}), mode=PUBLIC_FILE)
    return p


#: where a simulated SuperNode finds the sites file when the run config has no ``sim-sites``
#: (set by ``atlas build-federated`` for the duration of its simulation only)
SIM_SITES_ENV = "FEDARCHES_SIM_SITES"


def site_config_from_context(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> SiteConfig:
    """Deployment: the SuperNode's node config names the site. Simulation: Flower gives
    each simulated SuperNode only ``partition-id``; the run config's ``sim-sites``
    file maps that to the site's settings."""
    if "site" in node_config or "data" in node_config:
        return SiteConfig.from_mapping(node_config)
    if "partition-id" in node_config:
        sim = str(run_config.get("sim-sites", "") or os.environ.get(SIM_SITES_ENV, ""))
        if not sim:
            raise SettingError(
                "setting check failed: simulated SuperNode without site settings: set run config 'sim-sites' to a TOML file "
                "with one [[site]] table per simulated SuperNode"
            )
        sites = load_sim_sites(sim)
        pid = int(node_config["partition-id"])
        if not 0 <= pid < len(sites):
            raise SettingError(f"setting check failed: partition-id {pid} has no [[site]] table in {sim} ({len(sites)} sites)")
        return SiteConfig.from_mapping(sites[pid], where=f"{sim} [[site]] #{pid}")
    return SiteConfig.from_mapping(node_config)
