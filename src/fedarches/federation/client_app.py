"""Flower ClientApp: a site's side of a federated round.

On a ``train`` message (`protocol.MapRequest`) the site reads its settings
(`protocol.SiteConfig`) and runs its job (`site_job.handle_request`: fetch and
verify the requested version through TUF, then the same ``client.site.map_local``
as ``fedarches site map``) in a separate process (`worker`) that is stopped at the
request's deadline, so a hung site never holds the round, its SuperNode or a
simulation past the round timeout. The reply carries the bundle bytes and scalar
metrics, never cells. A failed check, the deadline included, is a ``failed`` reply
naming the check; a Flower ``Error`` means a bug or a crashed job.
"""

from __future__ import annotations

import traceback
from logging import ERROR, INFO

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from fedarches.errors import FedarchesError
from fedarches.federation.protocol import ERROR_INTERNAL, MapReply, MapRequest, site_config_from_context
from fedarches.federation.worker import SiteProcessError, request_deadline, run_site_job
from fedarches.threads import limit_process_threads

app = ClientApp()

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
        deadline = request_deadline(msg.metadata.created_at, msg.metadata.ttl)
        reply = run_site_job(site, request, deadline)
        if reply.check:
            log(ERROR, "fedarches site %s: %s", name, reply.message)
        else:
            log(INFO, "fedarches site %s: %s (%s)", name, reply.status, reply.message)
    except FedarchesError as exc:
        log(ERROR, "fedarches site %s: %s", name, exc)
        reply = MapReply.failed(name, exc)
    except SiteProcessError as exc:
        log(ERROR, "fedarches site %s: %s", name, exc)
        return Message(error=Error(code=ERROR_INTERNAL, reason=str(exc)), reply_to=msg)
    except Exception as exc:  # a bug or a broken environment: report, don't crash the SuperNode
        log(ERROR, "fedarches site %s failed:\n%s", name, traceback.format_exc())
        return Message(error=Error(code=ERROR_INTERNAL, reason=f"internal error {type(exc).__name__}: {exc}"),
                       reply_to=msg)
    return Message(content=reply.to_content(), reply_to=msg)
