"""A site's work in one round: fetch the requested version, map onto it, build the reply.

Runs in the site's job process (`worker`), never in the ClientApp's own process, so
that the ClientApp can stop it at the round's deadline. It calls the same
``client.site.map_local`` as ``fedarches site map``. A ``fault`` in the site's node
config (`protocol.FAULTS`) makes it misbehave here, mid-round, after the fetch, the
way a broken site would: the coordinator sees a real crash, hang or corrupted bundle.
"""

from __future__ import annotations

import os
import signal
import time
from logging import WARNING

from flwr.common.logger import log

from fedarches.atomic import PRIVATE_DIR, make_dirs
from fedarches.errors import DataFileError, TrustRootError, UnknownVersionError
from fedarches.federation.protocol import STATUS_CONTRIBUTED, MapReply, MapRequest, SiteConfig, reply_metrics

#: How long a ``hang`` fault sleeps: past any round timeout a test or benchmark sets.
HANG_SECONDS = 3600.0


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


def _misbehave(fault: str) -> None:
    """The faults that stop the job where it stands."""
    if fault == "crash":
        raise RuntimeError("injected fault: the site's job crashed mid-round")
    if fault == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "hang":
        time.sleep(HANG_SECONDS)


def corrupt(bundle: bytes) -> bytes:
    """The bundle with its last tensor bytes flipped: well-formed, but its hashes no longer match."""
    n = min(16, len(bundle))
    return bundle[:-n] + bytes(b ^ 0xFF for b in bundle[-n:])


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
    fault = site.fault_in(request.round)
    _misbehave(fault)
    epochs = site.epochs or (request.epochs if request.epochs > 0 else None)
    settings = MapSettings(epochs=epochs, strategy=request.strategy, threads=1,
                           conditions_per_round=site.conditions_per_round, share_labels=site.share_labels)
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
        bundle=corrupt(bundle) if fault == "garbage" else bundle, metrics=metrics,
        message=f"mapped {', '.join(result.conditions)} onto version {fetched.number}; "
                f"results in {result.out_dir.name}/",
    )
