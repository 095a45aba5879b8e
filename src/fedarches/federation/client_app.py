"""Flower ClientApp: a site's side of a federated round.

On a ``train`` message (`protocol.MapRequest`) the site reads its settings
(`protocol.SiteConfig`), fetches and verifies the requested version through TUF
(pinning its own ``trust-root`` when it has one) and calls the same
``client.site.map_local`` as ``fedarches site map``: it decides what is new, maps
only that, and signs the bundle. The reply carries the bundle bytes and scalar
metrics, never cells. A failed check is a ``failed`` reply naming the check; a
Flower ``Error`` means a bug.

Time budget: the request's TTL is the coordinator's round timeout, and the work
runs in a forked child process the ClientApp kills when that budget is spent
(replying ``failed``, check "round deadline check", shortly before the round
ends). Why a process and not a check between phases: a hang is inside one phase
(a stalled download, a training loop), and Flower's simulation engine joins its
workers only after every ClientApp call returned, so a hung call used to hold the
whole ``flwr run`` until it finished, long after the round had moved on.

Fault-injection hook, for tests only: ``FEDARCHES_TEST_SITE_HANG="NAME=SECONDS[,...]"``
in the ClientApp's environment makes site NAME sleep SECONDS inside that child
before it starts (it stands for a site that hangs). Never set it in production.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
import traceback
from logging import ERROR, INFO, WARNING

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from fedarches.errors import DataFileError, FedarchesError, RoundDeadlineError, TrustRootError, UnknownVersionError
from fedarches.federation.protocol import (
    ERROR_INTERNAL,
    STATUS_CONTRIBUTED,
    MapReply,
    MapRequest,
    SiteConfig,
    reply_metrics,
    site_config_from_context,
)

app = ClientApp()

TEST_HANG_ENV = "FEDARCHES_TEST_SITE_HANG"
# The site gives up this long (at most 10% of the budget) before the request
# expires, so its "failed" reply still reaches the coordinator inside the round.
REPLY_MARGIN_S = 3.0


def _trust_root(site: SiteConfig, request: MapRequest) -> bytes:
    """The pinned root when the site has one; else the one the coordinator sent."""
    if site.trust_root is None:
        return request.trust_root
    if not site.trust_root.is_file():
        raise TrustRootError(f"trust root check failed: node config trust-root {site.trust_root} does not exist")
    pinned = site.trust_root.read_bytes()
    if pinned != request.trust_root:
        log(WARNING, "fedarches site %s: the coordinator sent a different root.json than the pinned one; "
            "using the pinned root (TUF verifies any rotation from it)", site.site)
    return pinned


def handle_request(site: SiteConfig, request: MapRequest) -> MapReply:
    """Fetch the requested version, map onto it, and build the reply (raises on failure)."""
    from fedarches.client.fetch import AtlasClient
    from fedarches.client.site import map_local
    from fedarches.config import MapSettings
    from fedarches.format.bundle import read_bundle
    from fedarches.format.metrics import sanitize_metrics

    t0 = time.perf_counter()
    if not site.data.is_file():
        raise DataFileError(f"data file check failed: site data {site.data} does not exist (node config 'data')")
    results = site.results_dir
    results.mkdir(parents=True, exist_ok=True)
    client = AtlasClient(request.atlas_url, _trust_root(site, request), cache_dir=results / ".tuf-cache")
    fetched = client.fetch(results / "atlas" / f"v{request.version}", request.version)
    if fetched.id != request.version_id:
        raise UnknownVersionError(
            f"version check failed: the coordinator asked for version {request.version} "
            f"({request.version_id[:12]}...), the atlas serves {fetched.id[:12]}... under that number"
        )
    epochs = site.epochs or (request.epochs if request.epochs > 0 else None)
    settings = MapSettings(epochs=epochs, strategy=request.strategy, threads=1,
                           conditions_per_round=site.conditions_per_round)
    result = map_local(fetched.path, key=site.key_dir, site=site.site, data=site.data,
                       condition_key=site.condition_key, out_dir=results / f"map-v{fetched.number}",
                       settings=settings, atlas_url=request.atlas_url)
    seconds = {"seconds": round(time.perf_counter() - t0, 3)}
    if result.status != STATUS_CONTRIBUTED:
        return MapReply(status=result.status, site=site.site, metrics=seconds,
                        message=f"all studies of this site are already in version {fetched.number}")
    bundle = result.bundle_bytes()
    metrics = reply_metrics(sanitize_metrics(read_bundle(bundle).manifest.metrics)) | seconds
    return MapReply(
        status=STATUS_CONTRIBUTED, site=site.site, conditions=tuple(result.conditions),
        bundle=bundle, metrics=metrics,
        message=f"mapped {', '.join(result.conditions)} onto version {fetched.number}; "
                f"results in {result.out_dir.name}/",
    )


def time_budget(msg: Message) -> float:
    """Seconds this site may spend on ``msg``: until the request expires, less the reply margin."""
    md = msg.metadata
    left = float(md.created_at) + float(md.ttl) - time.time()
    return max(0.0, left - min(REPLY_MARGIN_S, 0.1 * float(md.ttl)))


def _test_hang(site: str) -> None:
    """The fault-injection hook (see the module docstring); a no-op unless the env names ``site``."""
    for item in os.environ.get(TEST_HANG_ENV, "").split(","):
        name, _, seconds = item.strip().rpartition("=")
        if name and name == site:
            log(WARNING, "fedarches site %s: %s: hanging %ss (test fault injection)", site, TEST_HANG_ENV, seconds)
            time.sleep(float(seconds))


def _answer(site: SiteConfig, request: MapRequest) -> tuple[str, object]:
    """("reply", MapReply) or ("error", reason): what the child sends back (picklable)."""
    try:
        _test_hang(site.site)
        reply = handle_request(site, request)
        log(INFO, "fedarches site %s: %s (%s)", site.site, reply.status, reply.message)
        return "reply", reply
    except FedarchesError as exc:
        log(ERROR, "fedarches site %s: %s", site.site, exc)
        return "reply", MapReply.failed(site.site, exc)
    except Exception as exc:  # a bug or a broken environment: report, don't crash the SuperNode
        log(ERROR, "fedarches site %s failed:\n%s", site.site, traceback.format_exc())
        return "error", f"internal error {type(exc).__name__}: {exc}"


def _child(conn: "multiprocessing.connection.Connection", site: SiteConfig, request: MapRequest) -> None:
    os.setsid()  # its own process group: killing it also ends anything it started
    conn.send(_answer(site, request))
    conn.close()


def _kill(proc: "multiprocessing.process.BaseProcess") -> None:
    if proc.pid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    if proc.is_alive():
        proc.kill()
    proc.join(timeout=10)


def _deadline_reply(site: SiteConfig, budget_s: float) -> tuple[str, object]:
    err = RoundDeadlineError(
        f"round deadline check failed: site {site.site} did not finish within {max(budget_s, 0):.0f}s, the time "
        "left in the coordinator's round (run config round-timeout); its work was stopped"
    )
    log(ERROR, "fedarches site %s: %s", site.site, err)
    return "reply", MapReply.failed(site.site, err)


def answer_within(site: SiteConfig, request: MapRequest, budget_s: float) -> tuple[str, object]:
    """`_answer` in a forked child, killed (with its process group) after ``budget_s``."""
    if "fork" not in multiprocessing.get_all_start_methods():  # no fork: no way to stop a hung call
        return _answer(site, request)
    import fedarches.client.fetch  # noqa: F401  imported before the fork, so no child pays for it
    import fedarches.client.site  # noqa: F401

    if budget_s <= 0:
        return _deadline_reply(site, budget_s)
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, site, request), name=f"fedarches-site-{site.site}")
    proc.start()
    send.close()
    try:
        if recv.poll(budget_s):
            return recv.recv()
        return _deadline_reply(site, budget_s)
    except EOFError:
        return "error", f"internal error: the site's worker process ended without a reply (exit code {proc.exitcode})"
    finally:
        recv.close()
        _kill(proc)


def _internal_error(msg: Message, name: str, exc: Exception) -> Message:
    log(ERROR, "fedarches site %s failed:\n%s", name, traceback.format_exc())
    return Message(error=Error(code=ERROR_INTERNAL, reason=f"internal error {type(exc).__name__}: {exc}"),
                   reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    import torch

    torch.set_num_threads(1)
    name = str(context.node_config.get("site", "")) or f"node {context.node_id}"
    try:
        site = site_config_from_context(dict(context.node_config), dict(context.run_config))
        name = site.site
        request = MapRequest.from_message(msg)
        budget = time_budget(msg)
        log(INFO, "fedarches site %s: round %d, mapping onto version %d from %s (time budget %.0fs)",
            name, request.round, request.version, request.atlas_url, budget)
        kind, payload = answer_within(site, request, budget)
    except FedarchesError as exc:
        log(ERROR, "fedarches site %s: %s", name, exc)
        return Message(content=MapReply.failed(name, exc).to_content(), reply_to=msg)
    except Exception as exc:  # a bug or a broken environment: report, don't crash the SuperNode
        return _internal_error(msg, name, exc)
    if kind == "error":
        return Message(error=Error(code=ERROR_INTERNAL, reason=str(payload)), reply_to=msg)
    assert isinstance(payload, MapReply)
    return Message(content=payload.to_content(), reply_to=msg)
