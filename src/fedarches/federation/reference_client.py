"""Flower ClientApp of a federated reference build: a site's three answers (`reference_protocol`).

The site's settings come from its node config (deployment) or the ``sim-sites`` TOML
(simulation), as for query rounds (``protocol.site_config_from_context``). The work is
in `reference_site`; this module only decodes, calls and encodes. A failure is a Flower
``Error`` naming the site and the check, and the round goes on with the others. Node
config ``fault = "crash"`` (with ``fault-rounds``) makes the site fail in those rounds:
the fault tests use it.
"""

from __future__ import annotations

import traceback
from collections import OrderedDict
from logging import ERROR

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from fedarches.errors import FedarchesError, ProtocolError
from fedarches.federation.reference_calibration import CALIBRATE
from fedarches.federation.protocol import ERROR_INTERNAL, SiteConfig, site_config_from_context
from fedarches.federation.reference_protocol import (
    FINISH,
    PROTOCOL,
    RECORD,
    RFF_RECORD,
    STATS,
    BuildSetup,
    shared_digest,
)
from fedarches.threads import limit_process_threads

app = ClientApp()


def _site(context: Context) -> SiteConfig:
    limit_process_threads(1)  # sites train in parallel processes: one thread each
    return site_config_from_context(dict(context.node_config), dict(context.run_config))


def _failed(msg: Message, context: Context, exc: BaseException) -> Message:
    try:
        who = _site(context).site
    except FedarchesError:
        who = f"node {context.node_id}"
    if not isinstance(exc, FedarchesError):
        log(ERROR, "fedarches site %s failed:\n%s", who, traceback.format_exc())
    reason = f"site {who}: {exc}" if isinstance(exc, FedarchesError) else f"site {who}: internal error {type(exc).__name__}: {exc}"
    return Message(error=Error(code=ERROR_INTERNAL, reason=reason), reply_to=msg)


def _setup(msg: Message, site: SiteConfig) -> tuple[BuildSetup, int]:
    cfg = msg.content.config_records["config"]
    setup = BuildSetup.from_config(cfg)
    if site.site not in setup.sites:
        raise ProtocolError(f"protocol check failed: site {site.site!r} is not one of this build's sites")
    return setup, int(cfg["server-round"])


@app.query(STATS)
def statistics(msg: Message, context: Context) -> Message:
    from fedarches.federation.reference_site import site_statistics

    try:
        site = _site(context)
        cfg = msg.content.config_records[RECORD]
        if cfg.get("protocol") != PROTOCOL:
            raise ProtocolError(f"protocol check failed: expected {PROTOCOL!r}, got {cfg.get('protocol')!r}")
        return Message(content=site_statistics(site, str(cfg["label-key"])).to_content(), reply_to=msg)
    except Exception as exc:
        return _failed(msg, context, exc)


@app.train()
def train(msg: Message, context: Context) -> Message:
    from fedarches.federation.reference_site import train_round

    try:
        site = _site(context)
        setup, rnd = _setup(msg, site)
        if site.fault_in(rnd) == "crash":
            raise RuntimeError(f"injected fault: the site crashed in round {rnd}")
        shared = msg.content.array_records["arrays"].to_torch_state_dict()
        mu = float(msg.content.config_records["config"].get("proximal-mu", 0.0))
        got = msg.content.array_records.get(RFF_RECORD)
        targets = {k: v.numpy() for k, v in got.items()} if got is not None else None
        out, n, loss, embeddings = train_round(site, setup, dict(shared), rnd, mu=mu, targets=targets)
        content = RecordDict({"arrays": ArrayRecord(OrderedDict(out)),
                              "metrics": MetricRecord({"num-examples": n, "round": rnd, "loss": loss,
                                                           "site-index": setup.sites.index(site.site)})})
        if embeddings:
            content[RFF_RECORD] = ArrayRecord({k: Array(v) for k, v in embeddings.items()})
        return Message(content=content, reply_to=msg)
    except Exception as exc:
        return _failed(msg, context, exc)


@app.query(FINISH)
def finish(msg: Message, context: Context) -> Message:
    from fedarches.federation.reference_site import site_bundle

    try:
        site = _site(context)
        setup, rnd = _setup(msg, site)
        arrays = msg.content.array_records["arrays"]
        parent = shared_digest({k: v.numpy() for k, v in arrays.items()})
        bundle, bn = site_bundle(site, setup, dict(arrays.to_torch_state_dict()), rnd, parent)
        content = RecordDict({RECORD: ConfigRecord({"protocol": PROTOCOL, "site": site.site, "bundle": bundle})})
        if bn:
            content["bn"] = ArrayRecord(OrderedDict(bn))
        return Message(content=content, reply_to=msg)
    except Exception as exc:
        return _failed(msg, context, exc)


@app.query(CALIBRATE)
def calibrate(msg: Message, context: Context) -> Message:
    """Histograms of the site's cells against the merged summaries (`reference_calibration`)."""
    import numpy as np

    from fedarches.federation.reference_calibration import GAUSSIAN_KEYS, ORIGIN, site_histograms
    from fedarches.federation.reference_site import calibration_seed, final_model
    from fedarches.labels.summaries import ClassSummaries

    try:
        site = _site(context)
        setup, rnd = _setup(msg, site)
        state = {k: v.numpy() for k, v in msg.content.array_records["labels"].items()}
        origin = state.pop(ORIGIN)
        summaries = ClassSummaries.from_state(state, setup.label_categories, workers=1)
        _, latent, d = final_model(site, setup, dict(msg.content.array_records["arrays"].to_torch_state_dict()), rnd)
        labels = d.labels if d.labels is not None else np.full(len(latent), "", dtype=object)
        how = msg.content.config_records["calibration"]
        rec = msg.content.array_records.get("gaussians")
        gaussians = None if rec is None else {k: rec[k].numpy() for k in GAUSSIAN_KEYS}
        hists = site_histograms(summaries, origin, setup.sites.index(site.site), latent, labels, setup.k_min,
                                int(how["step"]), str(how.get("statistic", "loo")), gaussians,
                                calibration_seed(setup, site.site))
        return Message(content=RecordDict({"histograms": ArrayRecord({k: Array(v) for k, v in hists.items()})}),
                       reply_to=msg)
    except Exception as exc:
        return _failed(msg, context, exc)
