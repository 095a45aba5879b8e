"""Flower ServerApp: the coordinator's side of a federated round.

Each round, for the current head of the atlas's main line:

1. send every connected site (SuperNode) a ``train`` message with the atlas URL,
   the version number and id, and the atlas trust root (`protocol.MapRequest`);
2. collect the replies: a signed contribution bundle, "nothing new" (every
   condition the site holds is already in the atlas), or an error. An error reply,
   an undecodable reply or a site that does not answer in time is logged and
   recorded; the round goes on with the others;
3. hand the bundles to ``Atlas.merge(..., skip_invalid=True)``, which verifies each
   one (enrolled signer, published parent, shapes, no collisions) and publishes
   what verifies as the next version, in one atomic TUF commit.

R rounds therefore give up to R successive versions; a round in which no site
has anything new publishes none. Bundles are kept as received under
``<atlas-dir>/federation/run-<run id>/round-<r>/`` (the audit trail), and a JSON
report of the run (per round: parent version, replies, accepted and rejected
bundles, published versions) is written to the run config's ``report`` path.

Run config (pyproject ``[tool.flwr.app.config]``, ``flwr run --run-config``):
``atlas-dir`` (or env ``FEDARCHES_ATLAS_DIR``), ``atlas-url`` (or env
``FEDARCHES_ATLAS_URL``; empty: this app serves ``atlas-dir`` on
``serve-host:serve-port`` for the duration of the run), ``num-server-rounds``,
``epochs``, ``strategy``, ``round-timeout``, ``min-sites``, ``sites-timeout``,
``report``.
"""

from __future__ import annotations

import json
import os
import re
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any, Iterator

from flwr.app import Context, Message, MessageType
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedarches.errors import FedarchesError, InputDataError
from fedarches.federation.protocol import (
    STATUS_CONTRIBUTED,
    STATUS_NOTHING_NEW,
    MapReply,
    MapRequest,
)

app = ServerApp()


@dataclass(frozen=True)
class CoordinatorConfig:
    atlas_dir: Path
    atlas_url: str = ""
    rounds: int = 1
    epochs: int = 0
    strategy: str = "conditions"
    round_timeout: float = 600.0
    serve_host: str = "127.0.0.1"
    serve_port: int = 0
    min_sites: int = 1
    sites_timeout: float = 60.0
    report: Path | None = None

    @classmethod
    def from_run_config(cls, rc: dict[str, Any]) -> "CoordinatorConfig":
        atlas_dir = str(rc.get("atlas-dir", "") or os.environ.get("FEDARCHES_ATLAS_DIR", ""))
        if not atlas_dir:
            raise InputDataError(
                "no atlas directory: set run config atlas-dir (flwr run --run-config 'atlas-dir=\"/path\"') "
                "or FEDARCHES_ATLAS_DIR in the SuperLink's environment"
            )
        report = str(rc.get("report", "") or "")
        rounds = int(rc.get("num-server-rounds", 1))
        if rounds < 1:
            raise InputDataError(f"num-server-rounds must be >= 1, got {rounds}")
        return cls(
            atlas_dir=Path(os.path.expanduser(atlas_dir)).resolve(),
            atlas_url=str(rc.get("atlas-url", "") or os.environ.get("FEDARCHES_ATLAS_URL", "")).rstrip("/"),
            rounds=rounds,
            epochs=int(rc.get("epochs", 0)),
            strategy=str(rc.get("strategy", "conditions")),
            round_timeout=float(rc.get("round-timeout", 600)),
            serve_host=str(rc.get("serve-host", "127.0.0.1")),
            serve_port=int(rc.get("serve-port", 0)),
            min_sites=int(rc.get("min-sites", 1)),
            sites_timeout=float(rc.get("sites-timeout", 60)),
            report=Path(os.path.expanduser(report)).resolve() if report else None,
        )


@dataclass
class SiteOutcome:
    """One site's answer in one round, as the coordinator records it."""

    node_id: int
    status: str  # contributed | nothing-new | error | no-reply | accepted | rejected
    site: str = ""
    message: str = ""
    conditions: list[str] = field(default_factory=list)
    metrics: dict[str, float | int] = field(default_factory=dict)
    bundle_file: str = ""
    bundle_bytes: int = 0
    error_code: int | None = None


@dataclass
class RoundReport:
    round: int
    parent_number: int
    parent_id: str
    sites: list[SiteOutcome] = field(default_factory=list)
    published: list[dict[str, Any]] = field(default_factory=list)
    head_number: int = 0
    head_id: str = ""
    seconds: float = 0.0


_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def _safe_name(name: str) -> str:
    return _SAFE.sub("_", name)[:80] or "site"


@contextmanager
def _atlas_url(cfg: CoordinatorConfig, atlas: Any) -> Iterator[str]:
    """The URL sites fetch from: the configured one, or a server this run starts."""
    if cfg.atlas_url:
        yield cfg.atlas_url
        return
    from fedarches.server.http import make_server

    server = make_server(atlas.repository_dir, host=cfg.serve_host, port=cfg.serve_port)
    server.start_background()
    try:
        log(INFO, "fedarches: serving atlas %s at %s for this run", atlas.name, server.url)
        yield server.url
    finally:
        server.shutdown()
        server.server_close()


def _wait_for_sites(grid: Grid, cfg: CoordinatorConfig) -> list[int]:
    deadline = time.monotonic() + cfg.sites_timeout
    nodes = sorted(grid.get_node_ids())
    while len(nodes) < cfg.min_sites and time.monotonic() < deadline:
        time.sleep(1.0)
        nodes = sorted(grid.get_node_ids())
    if len(nodes) < cfg.min_sites:
        log(WARNING, "fedarches: only %d site(s) connected after %.0fs (min-sites=%d); going on",
            len(nodes), cfg.sites_timeout, cfg.min_sites)
    return nodes


def _outcome_from_reply(reply: Message) -> tuple[SiteOutcome, MapReply | None]:
    node = int(reply.metadata.src_node_id)
    if reply.has_error():
        err = reply.error
        reason = (err.reason or "").strip()
        site = ""
        if reason.startswith("site ") and ":" in reason:
            site = reason[len("site "):].split(":", 1)[0].strip()
        return SiteOutcome(node_id=node, status="error", site=site,
                           message=reason or f"error code {err.code}", error_code=int(err.code)), None
    try:
        r = MapReply.from_message(reply)
    except (FedarchesError, ValueError, TypeError) as exc:
        return SiteOutcome(node_id=node, status="error", message=f"undecodable reply: {exc}"), None
    outcome = SiteOutcome(node_id=node, status=r.status, site=r.site, message=r.message,
                          conditions=list(r.conditions), metrics=dict(r.metrics), bundle_bytes=len(r.bundle))
    return outcome, r


def run_round(grid: Grid, atlas: Any, cfg: CoordinatorConfig, url: str, rnd: int, run_dir: Path) -> RoundReport:
    t0 = time.monotonic()
    head = atlas.head()
    if head is None:
        raise InputDataError(f"atlas {atlas.name!r} has no version yet; run `fedarches atlas build` first")
    report = RoundReport(round=rnd, parent_number=head.number, parent_id=head.id)
    nodes = sorted(grid.get_node_ids())
    log(INFO, "fedarches: round %d: asking %d site(s) to map onto version %d (%s...)",
        rnd, len(nodes), head.number, head.id[:12])
    if not nodes:
        log(WARNING, "fedarches: round %d: no site connected", rnd)
        report.head_number, report.head_id = head.number, head.id
        return report
    request = MapRequest(
        round=rnd, atlas_url=url, version=head.number, version_id=head.id,
        trust_root=atlas.root_json.read_bytes(), epochs=cfg.epochs, strategy=cfg.strategy,
    )
    messages = [
        Message(content=request.to_content(), dst_node_id=n, message_type=MessageType.TRAIN, group_id=str(rnd))
        for n in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))

    round_dir = run_dir / f"round-{rnd}"
    files: dict[str, SiteOutcome] = {}
    answered: set[int] = set()
    for reply in sorted(replies, key=lambda m: int(m.metadata.src_node_id)):
        outcome, parsed = _outcome_from_reply(reply)
        answered.add(outcome.node_id)
        report.sites.append(outcome)
        who = outcome.site or f"node {outcome.node_id}"
        if outcome.status == "error":
            log(ERROR, "fedarches: round %d: site %s failed: %s", rnd, who, outcome.message)
        elif outcome.status == STATUS_NOTHING_NEW:
            log(INFO, "fedarches: round %d: site %s has nothing new (%s)", rnd, who, outcome.message)
        elif outcome.status == STATUS_CONTRIBUTED and parsed is not None:
            round_dir.mkdir(parents=True, exist_ok=True)
            path = round_dir / f"{len(files):02d}-{_safe_name(outcome.site)}.contribution.safetensors"
            path.write_bytes(parsed.bundle)
            outcome.bundle_file = str(path)
            files[str(path)] = outcome
            log(INFO, "fedarches: round %d: site %s sent a %d-byte bundle adding %s",
                rnd, who, outcome.bundle_bytes, ", ".join(outcome.conditions))
    for n in nodes:
        if n not in answered:
            report.sites.append(SiteOutcome(node_id=n, status="no-reply",
                                            message=f"no reply within {cfg.round_timeout:.0f}s"))
            log(ERROR, "fedarches: round %d: node %d did not reply within %.0fs", rnd, n, cfg.round_timeout)

    if files:
        result = atlas.merge(sorted(files), skip_invalid=True)
        rejected = {r.source: r.error for r in result.rejected}
        for src, outcome in files.items():
            if src in rejected:
                outcome.status = "rejected"
                outcome.message = rejected[src]
                log(ERROR, "fedarches: round %d: bundle of site %s rejected: %s", rnd, outcome.site, rejected[src])
            elif src in result.unchanged:
                outcome.status = "unchanged"
                outcome.message = "identical bundle already merged"
            else:
                outcome.status = "accepted"
        for entry in result.published:
            report.published.append(
                {"number": entry.number, "id": entry.id, "branch": entry.branch, "strategy": entry.strategy,
                 "parents": list(entry.parent_numbers),
                 "conditions": [{"name": c.name, "site": c.site} for c in entry.conditions]}
            )
            log(INFO, "fedarches: round %d: published version %d (%s..., branch %s)",
                rnd, entry.number, entry.id[:12], entry.branch)
    if not report.published:
        log(INFO, "fedarches: round %d: nothing to merge; version %d stays the head", rnd, head.number)
    new_head = atlas.head()
    report.head_number, report.head_id = new_head.number, new_head.id
    report.seconds = round(time.monotonic() - t0, 2)
    return report


def run_coordinator(grid: Grid, cfg: CoordinatorConfig, run_id: int) -> dict[str, Any]:
    """All rounds of one run; the JSON report is written after every round and at the
    end, also when the run fails (with ``status: failed`` and the error)."""
    from fedarches.server.atlas import Atlas

    run_dir = cfg.atlas_dir / "federation" / f"run-{run_id}"
    report_path = cfg.report or run_dir / "report.json"
    summary: dict[str, Any] = {"atlas_dir": str(cfg.atlas_dir), "run_id": run_id, "rounds": [], "status": "running"}
    t0 = time.monotonic()
    try:
        atlas = Atlas(cfg.atlas_dir)
        summary["atlas"] = atlas.name
        if atlas.head() is None:
            raise InputDataError(
                f"atlas {atlas.name!r} in {cfg.atlas_dir} has no version yet; run `fedarches atlas build` first"
            )
        with _atlas_url(cfg, atlas) as url:
            summary["atlas_url"] = url
            nodes = _wait_for_sites(grid, cfg)
            log(INFO, "fedarches: %d site(s) connected; %d round(s)", len(nodes), cfg.rounds)
            for rnd in range(1, cfg.rounds + 1):
                rep = run_round(grid, atlas, cfg, url, rnd, run_dir)
                summary["rounds"].append(asdict(rep))
                _write_json(report_path, summary)
        summary["status"] = "completed"
    except BaseException as exc:
        summary["status"] = "failed"
        summary["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        summary["seconds"] = round(time.monotonic() - t0, 2)
        _write_json(report_path, summary)
        log(INFO, "fedarches: run report written to %s", report_path)
    return summary


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


@app.main()
def main(grid: Grid, context: Context) -> None:
    import torch

    torch.set_num_threads(1)
    try:
        cfg = CoordinatorConfig.from_run_config(dict(context.run_config))
        run_coordinator(grid, cfg, int(context.run_id))
    except FedarchesError as exc:
        log(ERROR, "fedarches coordinator: %s", exc)
        raise
    except Exception:
        log(ERROR, "fedarches coordinator failed:\n%s", traceback.format_exc())
        raise
