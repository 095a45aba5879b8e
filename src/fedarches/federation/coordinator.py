"""The coordinator's rounds: ask every site, keep what they send, merge, report.

Each round, for the current head of the atlas's main line: send every connected
SuperNode a `protocol.MapRequest`; record each reply (a bundle, "nothing new", a
``failed`` reply naming the site and check, a Flower error, or silence); hand the
bundles to ``Atlas.merge(..., skip_invalid=True)`` and match its per-source
outcomes back to the replies by index. Bundles are kept as received under
``<atlas-dir>/federation/run-<run id>/round-<r>/`` (the audit trail); the JSON
report is rewritten after every round and at the end, also when the run fails.
Kept apart from the ServerApp so that ``server_app`` stays as thin as Flower's
examples and the rounds can be driven by any `flwr.serverapp.Grid`.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import Message, MessageType
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedarches.atomic import write_bytes, write_text
from fedarches.errors import AtlasDirError, FedarchesError
from fedarches.federation.protocol import STATUS_CONTRIBUTED, STATUS_FAILED, STATUS_NOTHING_NEW, MapReply, MapRequest
from fedarches.federation.run_config import RunConfig


@dataclass
class SiteOutcome:
    """One site's answer in one round, as the coordinator records it."""

    node_id: int
    status: str  # nothing-new | failed | error | no-reply | accepted | unchanged | rejected
    site: str = ""
    message: str = ""
    check: str = ""
    error_class: str = ""
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
    wait_seconds: float = 0.0  # asking the sites and waiting for them (at most the round timeout)
    label_conflicts: list[dict[str, Any]] = field(default_factory=list)  # site labels reported, not merged


_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def _safe_name(name: str) -> str:
    return _SAFE.sub("_", name)[:80] or "site"


def _wait_for_sites(grid: Grid, cfg: RunConfig) -> list[int]:
    deadline = time.monotonic() + cfg.sites_timeout
    nodes = sorted(grid.get_node_ids())
    while len(nodes) < cfg.min_sites and time.monotonic() < deadline:
        time.sleep(1.0)
        nodes = sorted(grid.get_node_ids())
    if len(nodes) < cfg.min_sites:
        log(WARNING, "fedarches: only %d site(s) connected after %ds (min-sites=%d); going on",
            len(nodes), cfg.sites_timeout, cfg.min_sites)
    return nodes


def outcome_from_reply(reply: Message) -> tuple[SiteOutcome, MapReply | None]:
    """A reply as the report records it; a Flower error (a bug) keeps its reason as is."""
    node = int(reply.metadata.src_node_id)
    if reply.has_error():
        err = reply.error
        return SiteOutcome(node_id=node, status="error", message=(err.reason or "").strip()
                           or f"error code {err.code}", error_code=int(err.code)), None
    try:
        r = MapReply.from_message(reply)
    except (FedarchesError, ValueError, TypeError) as exc:
        return SiteOutcome(node_id=node, status="error", message=f"undecodable reply: {exc}"), None
    outcome = SiteOutcome(node_id=node, status=r.status, site=r.site, message=r.message, check=r.check,
                          error_class=r.error_class, conditions=list(r.conditions), metrics=dict(r.metrics),
                          bundle_bytes=len(r.bundle))
    return outcome, r


def _log_reply(rnd: int, outcome: SiteOutcome) -> None:
    who = outcome.site or f"node {outcome.node_id}"
    if outcome.status in ("error", STATUS_FAILED):
        log(ERROR, "fedarches: round %d: site %s failed: %s", rnd, who, outcome.message)
    elif outcome.status == STATUS_NOTHING_NEW:
        log(INFO, "fedarches: round %d: site %s has nothing new (%s)", rnd, who, outcome.message)
    else:
        log(INFO, "fedarches: round %d: site %s sent a %d-byte bundle adding %s",
            rnd, who, outcome.bundle_bytes, ", ".join(outcome.conditions))


def _merge(atlas: Any, rnd: int, report: RoundReport, sent: list[tuple[Path, SiteOutcome]]) -> None:
    """Merge the kept bundles; outcomes come back in the order given, matched by index."""
    result = atlas.merge([p for p, _ in sent], skip_invalid=True)
    for merged in result.outcomes:
        outcome = sent[merged.index][1]
        outcome.status = merged.status
        if merged.status == "rejected":
            outcome.message, outcome.check = merged.error, merged.check
            log(ERROR, "fedarches: round %d: bundle of site %s rejected: %s", rnd, outcome.site, merged.error)
        elif merged.status == "unchanged":
            outcome.message = "identical bundle already merged"
    for c in result.label_conflicts:
        report.label_conflicts.append({"site": c.site, "label": c.label, "called": c.called, "share": c.share})
        log(INFO, "fedarches: round %d: %s", rnd, c.line())
    for entry in result.published:
        report.published.append(
            {"number": entry.number, "id": entry.id, "branch": entry.branch, "strategy": entry.strategy,
             "parents": list(entry.parent_numbers),
             "conditions": [{"name": c.name, "site": c.site} for c in entry.conditions],
             **({"labels": [r.model_dump(mode="json") for r in entry.labels]} if entry.labels else {})}
        )
        log(INFO, "fedarches: round %d: published version %d (%s..., branch %s)",
            rnd, entry.number, entry.id[:12], entry.branch)


def run_round(grid: Grid, atlas: Any, cfg: RunConfig, url: str, rnd: int, run_dir: Path) -> RoundReport:
    """One round: ask every connected site to map onto the head, keep and merge the bundles."""
    t0 = time.monotonic()
    head = atlas.head()
    report = RoundReport(round=rnd, parent_number=head.number, parent_id=head.id)
    nodes = sorted(grid.get_node_ids())
    log(INFO, "fedarches: round %d: asking %d site(s) to map onto version %d (%s...)",
        rnd, len(nodes), head.number, head.id[:12])
    request = MapRequest(round=rnd, atlas_url=url, version=head.number, version_id=head.id,
                         trust_root=atlas.root_json.read_bytes(), epochs=cfg.epochs, strategy=cfg.strategy)
    # The TTL is the round timeout: the site reads its time budget from it (and stops
    # its work when it is spent), and Flower drops the request if nobody took it in time.
    messages = [Message(content=request.to_content(), dst_node_id=n, message_type=MessageType.TRAIN,
                        ttl=float(cfg.round_timeout), group_id=str(rnd)) for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout)) if nodes else []
    report.wait_seconds = round(time.monotonic() - t0, 2)

    sent: list[tuple[Path, SiteOutcome]] = []
    for reply in sorted(replies, key=lambda m: int(m.metadata.src_node_id)):
        outcome, parsed = outcome_from_reply(reply)
        report.sites.append(outcome)
        _log_reply(rnd, outcome)
        if outcome.status == STATUS_CONTRIBUTED and parsed is not None:
            path = run_dir / f"round-{rnd}" / f"{len(sent):02d}-{_safe_name(outcome.site)}.contribution.safetensors"
            write_bytes(path, parsed.bundle)  # makes the round folder (0755)
            outcome.bundle_file = str(path)
            sent.append((path, outcome))
    answered = {o.node_id for o in report.sites}
    for n in nodes:
        if n not in answered:
            report.sites.append(SiteOutcome(node_id=n, status="no-reply",
                                            message=f"no reply within {cfg.round_timeout}s"))
            log(ERROR, "fedarches: round %d: node %d did not reply within %ds", rnd, n, cfg.round_timeout)
    if sent:
        _merge(atlas, rnd, report, sent)
    if not report.published:
        log(INFO, "fedarches: round %d: nothing to merge; version %d stays the head", rnd, head.number)
    new_head = atlas.head()
    report.head_number, report.head_id = new_head.number, new_head.id
    report.seconds = round(time.monotonic() - t0, 2)
    return report


def run_coordinator(grid: Grid, run_config: RunConfig | dict[str, Any], run_id: int) -> dict[str, Any]:
    """All rounds of one run. A run config that does not validate is refused here,
    before any site is asked."""
    from fedarches.server.atlas import Atlas
    from fedarches.server.http import serve_atlas

    cfg = run_config if isinstance(run_config, RunConfig) else RunConfig.from_run_config(run_config)
    run_dir = cfg.atlas_path / "federation" / f"run-{run_id}"
    report_path = cfg.report_path or run_dir / "report.json"
    summary: dict[str, Any] = {"atlas_dir": str(cfg.atlas_path), "run_id": run_id, "rounds": [], "status": "running"}
    t0 = time.monotonic()
    server = None
    try:
        atlas = Atlas(cfg.atlas_path)
        summary["atlas"] = atlas.name
        if atlas.head() is None:
            raise AtlasDirError(f"atlas directory check failed: atlas {atlas.name!r} in {cfg.atlas_path} "
                                "has no version yet; run `fedarches atlas build` first")
        url = cfg.atlas_url
        if not url:
            server = serve_atlas(atlas, cfg.serve_host, cfg.serve_port)
            url = server.url
            log(INFO, "fedarches: serving atlas %s at %s for this run", atlas.name, url)
        summary["atlas_url"] = url
        nodes = _wait_for_sites(grid, cfg)
        log(INFO, "fedarches: %d site(s) connected; %d round(s)", len(nodes), cfg.num_server_rounds)
        for rnd in range(1, cfg.num_server_rounds + 1):
            summary["rounds"].append(asdict(run_round(grid, atlas, cfg, url, rnd, run_dir)))
            _write_json(report_path, summary)
        summary["status"] = "completed"
    except BaseException as exc:
        summary["status"] = "failed"
        summary["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        if server is not None:
            server.close()
        summary["seconds"] = round(time.monotonic() - t0, 2)
        _write_json(report_path, summary)
        log(INFO, "fedarches: run report written to %s", report_path)
    return summary


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str))
