"""Flower ClientApp: a site's side of a federated round.

On a ``train`` message from the coordinator (`protocol.MapRequest`) the site:

1. reads its settings from the SuperNode's node config (`protocol.SiteConfig`:
   site name, data path, condition key, key directory, ...; in simulation the
   run config's ``sim-sites`` file indexed by partition-id);
2. fetches and verifies the requested atlas version through TUF, pinning its
   own ``trust-root`` when the node config names one, else the root the
   coordinator sent over the authenticated Flower channel;
3. compares the studies in its data with the conditions the version holds:
   nothing new -> replies ``nothing-new`` (not an error);
4. otherwise maps its new studies (surgery + fine-tuning of their condition
   vectors only, ``client.site.map_local``), keeps every output under its results
   directory, and replies with the signed contribution bundle bytes plus scalar
   metrics. Cells, counts and cell ids never leave: they are not in the reply.

Any failure is answered with a Flower ``Error`` naming the site, so the
coordinator logs it and carries on with the other sites.
"""

from __future__ import annotations

import time
import traceback
from logging import ERROR, INFO, WARNING

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from fedarches.data.io import read_h5ad
from fedarches.errors import FedarchesError, InputDataError
from fedarches.federation.protocol import (
    ERROR_INPUT,
    ERROR_INTERNAL,
    STATUS_CONTRIBUTED,
    STATUS_NOTHING_NEW,
    MapReply,
    MapRequest,
    SiteConfig,
    scalar_metrics,
    site_config_from_context,
)

app = ClientApp()

def _trust_root(site: SiteConfig, request: MapRequest) -> bytes:
    """The pinned root when the site has one; else the one the coordinator sent."""
    if site.trust_root is None:
        return request.trust_root
    if not site.trust_root.is_file():
        raise InputDataError(f"node config trust-root {site.trust_root} does not exist")
    pinned = site.trust_root.read_bytes()
    if pinned != request.trust_root:
        log(WARNING, "fedarches site %s: the coordinator sent a different root.json than the pinned one; "
            "using the pinned root (TUF verifies any rotation from it)", site.site)
    return pinned


def map_for_request(site: SiteConfig, request: MapRequest) -> MapReply:
    """Everything a site does for one request; returns the reply (raises on failure)."""
    import numpy as np

    from fedarches.client.fetch import AtlasClient
    from fedarches.client.site import map_local

    t0 = time.perf_counter()
    if not site.data.is_file():
        raise InputDataError(f"site data {site.data} does not exist (node config 'data')")
    results = site.results_dir
    results.mkdir(parents=True, exist_ok=True)
    client = AtlasClient(request.atlas_url, _trust_root(site, request), cache_dir=results / ".tuf-cache")
    fetched = client.fetch(results / "atlas" / f"v{request.version}", request.version)
    if fetched.id != request.version_id:
        raise InputDataError(
            f"version check failed: the coordinator asked for version {request.version} "
            f"({request.version_id[:12]}...), the atlas serves {fetched.id[:12]}... under that number"
        )
    held = set(fetched.version.condition_names())

    adata = read_h5ad(site.data, "site data")
    if site.condition_key not in adata.obs:
        raise InputDataError(
            f"condition key {site.condition_key!r} is not a column of {site.data} "
            f"(obs has: {', '.join(map(str, list(adata.obs.columns)[:10]))})"
        )
    column = adata.obs[site.condition_key]
    values = column.astype(str).to_numpy()
    if hasattr(column, "cat"):
        present = [str(c) for c in column.cat.categories if str(c) in set(values)]
    else:
        present = sorted(set(values))
    new = [c for c in present if c not in held]
    if not new:
        return MapReply(
            status=STATUS_NOTHING_NEW,
            site=site.site,
            message=f"all {len(present)} studies of this site are already in version {fetched.number}",
            metrics={"seconds": round(time.perf_counter() - t0, 3)},
        )
    if site.conditions_per_round > 0:
        new = new[: site.conditions_per_round]
    query = adata[np.isin(values, new)].copy()

    result = map_local(
        fetched.path,
        key=site.key_dir,
        site=site.site,
        data=query,
        condition_key=site.condition_key,
        out_dir=results / f"map-v{fetched.number}",
        epochs=site.epochs or (request.epochs if request.epochs > 0 else None),
        strategy=request.strategy,  # type: ignore[arg-type]
        threads=1,
        atlas_url=request.atlas_url,
    )
    bundle = result.bundle_bytes()
    metrics = scalar_metrics(result.report.get("bundle", {}).get("metrics", {}))
    metrics["seconds"] = round(time.perf_counter() - t0, 3)
    metrics["new_conditions"] = len(result.conditions)
    return MapReply(
        status=STATUS_CONTRIBUTED,
        site=site.site,
        message=f"mapped {', '.join(result.conditions)} onto version {fetched.number}; results in {result.out_dir.name}/",
        conditions=tuple(result.conditions),
        bundle=bundle,
        metrics=metrics,
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    import torch

    torch.set_num_threads(1)
    name = str(context.node_config.get("site", "")) or f"node {context.node_id}"
    try:
        site = site_config_from_context(dict(context.node_config), dict(context.run_config))
        name = site.site
        request = MapRequest.from_message(msg)
        log(INFO, "fedarches site %s: round %d, mapping onto version %d from %s",
            name, request.round, request.version, request.atlas_url)
        reply = map_for_request(site, request)
        log(INFO, "fedarches site %s: %s (%s)", name, reply.status, reply.message)
        return Message(content=reply.to_content(), reply_to=msg)
    except FedarchesError as exc:
        log(ERROR, "fedarches site %s: %s", name, exc)
        return Message(error=Error(code=ERROR_INPUT, reason=f"site {name}: {exc}"), reply_to=msg)
    except Exception as exc:  # a bug or a broken environment: report, don't crash the SuperNode
        log(ERROR, "fedarches site %s failed:\n%s", name, traceback.format_exc())
        return Message(
            error=Error(code=ERROR_INTERNAL, reason=f"site {name}: internal error {type(exc).__name__}: {exc}"),
            reply_to=msg,
        )
