"""Flower ClientApp: a site's side of a federated round.

On a ``train`` message (`protocol.MapRequest`) the site reads its settings
(`protocol.SiteConfig`), fetches and verifies the requested version through TUF
(pinning its own ``trust-root`` when it has one) and calls the same
``client.site.map_local`` as ``fedarches site map``: it decides what is new, maps
only that, and signs the bundle. The reply carries the bundle bytes and scalar
metrics, never cells. A failed check is a ``failed`` reply naming the check; a
Flower ``Error`` means a bug.
"""

from __future__ import annotations

import time
import traceback
from logging import ERROR, INFO, WARNING

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from fedarches.atomic import PRIVATE_DIR, make_dirs
from fedarches.errors import DataFileError, FedarchesError, TrustRootError, UnknownVersionError
from fedarches.federation.protocol import (
    ERROR_INTERNAL,
    STATUS_CONTRIBUTED,
    MapReply,
    MapRequest,
    SiteConfig,
    reply_metrics,
    site_config_from_context,
)
from fedarches.threads import limit_process_threads

app = ClientApp()


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
    make_dirs(results, PRIVATE_DIR)
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


@app.train()
def train(msg: Message, context: Context) -> Message:
    limit_process_threads(1)  # sites run in parallel processes: one thread each
    name = str(context.node_config.get("site", "")) or f"node {context.node_id}"
    try:
        site = site_config_from_context(dict(context.node_config), dict(context.run_config))
        name = site.site
        request = MapRequest.from_message(msg)
        log(INFO, "fedarches site %s: round %d, mapping onto version %d from %s",
            name, request.round, request.version, request.atlas_url)
        reply = handle_request(site, request)
        log(INFO, "fedarches site %s: %s (%s)", name, reply.status, reply.message)
    except FedarchesError as exc:
        log(ERROR, "fedarches site %s: %s", name, exc)
        reply = MapReply.failed(name, exc)
    except Exception as exc:  # a bug or a broken environment: report, don't crash the SuperNode
        log(ERROR, "fedarches site %s failed:\n%s", name, traceback.format_exc())
        return Message(error=Error(code=ERROR_INTERNAL, reason=f"internal error {type(exc).__name__}: {exc}"),
                       reply_to=msg)
    return Message(content=reply.to_content(), reply_to=msg)
