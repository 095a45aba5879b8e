"""The coordinator's side of a federated reference build, over any `flwr.serverapp.Grid`.

1. Ask every connected site for its gene statistics; pick the genes
   (``data.gene_stats.choose_genes``), the studies (each held by one site) and the
   labels; fix the model (paper defaults, the label-aware classifier).
2. Rounds with Flower's FedAvg / FedProx (`reference_strategy`): the shared weights
   travel, each study's condition rows stay at its site. After each round the weights
   are checkpointed under ``ATLAS_DIR/federation/reference-<build>/`` (atomic writes);
   a rerun of the same build (same sites, genes, settings) resumes after the last
   completed round.
3. Ask each site for its signed slices and class summaries, verify them
   (`reference_assembly`), calibrate the labels two or more sites hold on all their cells
   (`reference_calibration`: histograms, never a cell), assemble the model and publish it
   as version 1 (``Atlas.publish_federated_reference``).

The run report (``report.json`` there, or the run config's ``report``) is rewritten
after every round and at the end.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from fedarches.atomic import write_bytes, write_text
from fedarches.config import ModelConfig, TrainConfig
from fedarches.data.gene_stats import StudyGeneStats, choose_genes
from fedarches.errors import (
    ConditionCollisionError,
    EnrollmentError,
    FedarchesError,
    ProtocolError,
    ReferenceExistsError,
    SettingError,
)
from fedarches.federation.reference_protocol import (
    FINISH,
    PROTOCOL,
    RECORD,
    STAT_FIELDS,
    STATS,
    BuildSetup,
    SiteStatistics,
    shared_digest,
)
from fedarches.federation.reference_run_config import ReferenceRunConfig
from fedarches.federation.reference_strategy import make_strategy

CHECKPOINT = "checkpoint.safetensors"


def _wait_for_sites(grid: Grid, cfg: ReferenceRunConfig) -> list[int]:
    deadline = time.monotonic() + cfg.sites_timeout
    while len(nodes := sorted(grid.get_node_ids())) < cfg.min_sites and time.monotonic() < deadline:
        time.sleep(1.0)
    return nodes


def _ask(grid: Grid, nodes: list[int], content: RecordDict, kind: str, timeout: int) -> list[Message]:
    msgs = [Message(content=content, dst_node_id=n, message_type=f"query.{kind}", ttl=float(timeout)) for n in nodes]
    return list(grid.send_and_receive(msgs, timeout=timeout))


def collect_statistics(grid: Grid, nodes: list[int], cfg: ReferenceRunConfig,
                       report: dict[str, Any]) -> dict[int, SiteStatistics]:
    content = RecordDict({RECORD: ConfigRecord({"protocol": PROTOCOL, "label-key": cfg.label_key,
                                                "model": cfg.model})})
    out: dict[int, SiteStatistics] = {}
    for reply in _ask(grid, nodes, content, STATS, cfg.round_timeout):
        node = int(reply.metadata.src_node_id)
        if reply.has_error():
            report["failed"].append({"node": node, "step": "statistics", "reason": reply.error.reason})
            log(ERROR, "fedarches: node %d sent no statistics: %s", node, reply.error.reason)
            continue
        try:
            out[node] = SiteStatistics.from_message(reply)
        except FedarchesError as exc:
            report["failed"].append({"node": node, "step": "statistics", "reason": str(exc)})
    return out


def _check_sites(stats: dict[int, SiteStatistics], enrolled: set[str]) -> None:
    owner: dict[str, str] = {}
    for s in stats.values():
        if s.site not in enrolled:
            raise EnrollmentError(f"enrollment check failed: site {s.site!r} is not enrolled at this atlas; "
                                  "run `fedarches atlas enroll` first")
        for study in s.studies:
            if study in owner:
                raise ConditionCollisionError(f"condition collision: study {study!r} is held by sites "
                                              f"{owner[study]!r} and {s.site!r}; a study must be at one site")
            owner[study] = s.site
    if len({s.site for s in stats.values()}) != len(stats):
        raise SettingError("setting check failed: two nodes answered with the same site name")


def plan_build(stats: dict[int, SiteStatistics], cfg: ReferenceRunConfig, atlas: str) -> BuildSetup:
    """Genes, labels and model of this build, from the sites' statistics alone."""
    from fedarches.model import _reference_config

    genes = list(next(iter(stats.values())).genes)
    for s in stats.values():
        if s.genes != genes:
            keep = set(s.genes)
            genes = [g for g in genes if g in keep]
    study_stats = []
    for s in stats.values():
        pos = {g: i for i, g in enumerate(s.genes)}
        idx = np.array([pos[g] for g in genes], dtype=np.int64)
        for i, (study, n) in enumerate(zip(s.studies, s.n_cells)):
            a = [s.stats[f"{i}/{f}"][idx] for f in STAT_FIELDS]
            study_stats.append(StudyGeneStats(study=study, n_cells=n, mean=a[0], variance=a[1], variance_norm=a[2]))
    chosen = choose_genes(study_stats, genes, cfg.n_genes)
    # every label a site has trains the classifier, as in a central build; labels some site holds
    # >= k_min / 2 cells of get class summaries (`reference_site.summarisable`; the others join
    # with no component). Why:
    # leaving the rare labels out of the classifier (their cells trained as unlabelled) lost the
    # held-out type on PBMC (trVAE, seed 4: B cells called Unknown 0.42; 1.00 with them in),
    # whether the studies sat at one site or two (benchmarks/FEDERATED_REFERENCE.md)
    categories = sorted({label for s in stats.values() for label, n in s.label_counts.items() if n >= 1})
    overrides = {"mmd_weight": 0.0} if cfg.mmd == "none" else None
    config = _reference_config(cfg.model, len(chosen), len(categories), overrides)
    train = TrainConfig()
    return BuildSetup(atlas=atlas, sites=sorted(s.site for s in stats.values()), genes=chosen,
                      model_config=config.model_dump_json(), label_key=cfg.label_key, label_categories=categories,
                      local_epochs=cfg.local_epochs, total_epochs=cfg.rounds * cfg.local_epochs, seed=cfg.seed,
                      batch_size=train.batch_size, lr=train.lr, weight_decay=train.weight_decay, k_min=cfg.k_min,
                      bn=cfg.bn, mmd=cfg.mmd if config.kind == "trvae" else "none", rows=cfg.final_rows)


def initial_arrays(setup: BuildSetup, studies: list[str]) -> ArrayRecord:
    """The starting shared weights: seeded, as a central build starts (condition rows never travel)."""
    from fedarches.federation.reference_site import travelling_keys
    from fedarches.models.cvae import CVAE

    torch.manual_seed(setup.seed)
    module = CVAE(ModelConfig.model_validate_json(setup.model_config), studies)
    state = module.state_dict()
    return ArrayRecord({k: Array(state[k].detach().numpy().copy()) for k in travelling_keys(module, setup.bn)})


EMBEDDINGS = "mmd/"  # checkpoint key prefix of the stored study mean embeddings (--mmd rff)


def _load_checkpoint(path: Path, setup: BuildSetup) -> tuple[int, ArrayRecord, dict[str, Array]] | None:
    if not path.is_file():
        return None
    data = path.read_bytes()
    from safetensors import safe_open  # metadata only

    with safe_open(str(path), framework="np") as fh:
        meta = fh.metadata() or {}
    if meta.get("build") != setup.digest:
        return None
    arrays = st_load(data)
    weights = ArrayRecord({k: Array(v) for k, v in sorted(arrays.items()) if not k.startswith(EMBEDDINGS)})
    means = {k[len(EMBEDDINGS):]: Array(v) for k, v in sorted(arrays.items()) if k.startswith(EMBEDDINGS)}
    return int(meta["round"]), weights, means


def _save_checkpoint(path: Path, setup: BuildSetup, rnd: int, arrays: ArrayRecord,
                     embeddings: dict[str, Array] | None = None) -> None:
    """The weights after round ``rnd`` and the study embeddings the next round sends (so a
    resumed build trains exactly as an uninterrupted one)."""
    tensors = {k: np.ascontiguousarray(v.numpy()) for k, v in arrays.items()}
    tensors |= {EMBEDDINGS + k: np.ascontiguousarray(v.numpy()) for k, v in (embeddings or {}).items()}
    write_bytes(path, st_save(tensors, metadata={"build": setup.digest, "round": str(rnd)}))


def finish(grid: Grid, stats: dict[int, SiteStatistics], setup: BuildSetup, arrays: ArrayRecord, rounds: int,
           cfg: ReferenceRunConfig, report: dict[str, Any]) -> dict[int, tuple[bytes, dict[str, np.ndarray]]]:
    """Each site's signed bundle (and, with FedBN, its batch norm) for the final weights."""
    content = RecordDict({"arrays": arrays, "config": setup.to_config(**{"server-round": rounds})})
    out: dict[int, tuple[bytes, dict[str, np.ndarray]]] = {}
    for reply in _ask(grid, sorted(stats), content, FINISH, cfg.round_timeout):
        node = int(reply.metadata.src_node_id)
        if reply.has_error():
            report["failed"].append({"node": node, "step": "finish", "reason": reply.error.reason})
            continue
        rec = reply.content.config_records.get(RECORD)
        if rec is None or "bundle" not in rec:
            report["failed"].append({"node": node, "step": "finish", "reason": "no bundle in the reply"})
            continue
        bn = reply.content.array_records.get("bn")
        out[node] = (bytes(rec["bundle"]), {k: v.numpy() for k, v in (bn or ArrayRecord()).items()})
    return out


def _publish(grid: Grid, atlas: Any, cfg: ReferenceRunConfig, setup: BuildSetup, stats: dict[int, SiteStatistics],
             arrays: ArrayRecord, finals: dict[int, tuple[bytes, dict[str, np.ndarray]]], report: dict[str, Any]) -> Any:
    from fedarches.federation.reference_assembly import (
        assemble_module,
        merged_summaries,
        save_reference,
        site_summaries,
        verify_slices,
        weighted_mean,
    )
    from fedarches.federation.reference_calibration import calibrate_across_sites, component_origins
    from fedarches.federation.reference_site import summarisable
    from fedarches.server.registry import read_registry

    shared = {k: v.numpy() for k, v in arrays.items()}
    parent = shared_digest(shared)
    config = ModelConfig.model_validate_json(setup.model_config)
    registry = read_registry(atlas.path / "sites.json")
    missing = sorted(stats[n].site for n in stats if n not in finals)
    if missing:
        raise ProtocolError(f"protocol check failed: sites {missing} sent no final slices; their studies "
                            "cannot be in version 1 (rerun: the build resumes from its checkpoint)")
    slices = [verify_slices(finals[n][0], site=stats[n].site, studies=stats[n].studies, atlas=atlas.name,
                            parent=parent, registry=registry, config=config, n_cells=sum(stats[n].n_cells))
              for n in sorted(finals)]
    if setup.bn == "local":
        shared |= weighted_mean([(finals[n][1], sum(stats[n].n_cells)) for n in sorted(finals)])
    studies = sorted(st for s in stats.values() for st in s.studies)
    module = assemble_module(config, studies, {k: torch.from_numpy(np.array(v)) for k, v in shared.items()}, slices)
    most = {c: max(s.label_counts.get(c, 0) for s in stats.values()) for c in setup.label_categories}
    summaries = merged_summaries(slices, setup.label_categories,
                                 [c for c, n in most.items() if not summarisable(n, setup.k_min)])
    if summaries is not None and cfg.calibration != "site":
        parts = [(setup.sites.index(site), p) for site, p in site_summaries(slices)]
        summaries = calibrate_across_sites(grid, sorted(finals), summaries, component_origins(summaries, parts), arrays,
                                           setup.to_config(**{"server-round": cfg.rounds}), cfg.round_timeout, report,
                                           statistic="cross" if cfg.calibration == "cross-site" else "loo",
                                           gaussians=cfg.gaussians)
    holders = {st: s.site for s in stats.values() for st in s.studies}
    ckey = next(iter(stats.values())).condition_key
    with tempfile.TemporaryDirectory(prefix=".build-federated-", dir=atlas.path) as tmp:
        model_dir = save_reference(Path(tmp) / "model", module, genes=setup.genes, condition_key_=ckey,
                                   label_key=setup.label_key, summaries=summaries,
                                   train=TrainConfig(epochs=setup.total_epochs, seed=setup.seed))
        build = {"federated_sites": ",".join(setup.sites), "federated_rounds": cfg.rounds,
                 "federated_strategy": {"fedavg": "FedAvg", "fedprox": "FedProx"}[cfg.strategy],
                 "federated_local_epochs": setup.local_epochs, "federated_bn": setup.bn,
                 "federated_rows": setup.rows,
                 "federated_mmd": cfg.mmd if config.kind == "trvae" else "none",
                 "federated_calibration": report.get("calibration", {}).get("status", "site"),
                 "federated_gaussians": cfg.gaussians if report.get("calibration", {}).get("pooled_gaussians")
                 else "site"}
        return atlas.publish_federated_reference(model_dir, holders=holders, build=build)


def run_reference_build(grid: Grid, run_config: ReferenceRunConfig | dict[str, Any]) -> dict[str, Any]:
    """The whole build (module docstring); returns the report."""
    from fedarches.server.atlas import Atlas

    cfg = run_config if isinstance(run_config, ReferenceRunConfig) else ReferenceRunConfig.from_run_config(run_config)
    atlas = Atlas(cfg.atlas_path)
    if atlas.head() is not None:
        raise ReferenceExistsError(f"reference check failed: atlas {atlas.name!r} already has a reference "
                                   "(version 1); build a federated reference into a new atlas directory")
    t0 = time.monotonic()
    report: dict[str, Any] = {"atlas": atlas.name, "status": "running", "rounds": [], "failed": [],
                              "settings": cfg.to_run_config()}
    report_path = Path(cfg.report) if cfg.report else None
    try:
        nodes = _wait_for_sites(grid, cfg)
        stats = collect_statistics(grid, nodes, cfg, report)
        if len(stats) < cfg.min_sites:
            raise ProtocolError(f"protocol check failed: {len(stats)} site(s) sent statistics, min-sites is "
                                f"{cfg.min_sites}")
        _check_sites(stats, set(_enrolled(atlas)))
        setup = plan_build(stats, cfg, atlas.name)
        work = atlas.path / "federation" / f"reference-{setup.digest[:16]}"
        report_path = report_path or work / "report.json"
        report["sites"] = {str(n): {"site": s.site, "studies": s.studies, "cells": sum(s.n_cells)}
                           for n, s in sorted(stats.items())}
        report["genes"] = len(setup.genes)
        studies = sorted(st for s in stats.values() for st in s.studies)
        resumed = _load_checkpoint(work / CHECKPOINT, setup)
        done, arrays, means = resumed if resumed else (0, initial_arrays(setup, studies), {})
        report["resumed_after"] = done
        if done:
            log(INFO, "fedarches: resuming build %s after round %d", setup.digest[:12], done)

        def checkpoint(rnd: int, record: ArrayRecord) -> None:
            _save_checkpoint(work / CHECKPOINT, setup, rnd, record, strategy.embeddings)
            report["rounds"] = [asdict(r) for r in strategy.rounds]
            report["seconds"] = round(time.monotonic() - t0, 2)
            _write(report_path, report)
            if cfg.stop_after and rnd >= cfg.stop_after:
                raise RuntimeError(f"stop-after: run stopped after round {rnd} (test hook)")

        kw = {"proximal_mu": cfg.proximal_mu} if cfg.strategy == "fedprox" else {}
        strategy = make_strategy(cfg.strategy, offset=done, min_replies=cfg.min_sites, checkpoint=checkpoint,
                                 exchange_embeddings=setup.mmd == "rff", k_min=setup.k_min,
                                 min_available_nodes=cfg.min_sites, min_train_nodes=cfg.min_sites, **kw)
        strategy.embeddings = dict(means)
        if done < cfg.rounds:
            result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=cfg.rounds - done,
                                    timeout=cfg.round_timeout, train_config=setup.to_config(),
                                    evaluate_fn=strategy.evaluate_centralized)
            arrays = result.arrays if len(result.arrays) else arrays
        report["rounds"] = [asdict(r) for r in strategy.rounds]
        finals = finish(grid, stats, setup, arrays, cfg.rounds, cfg, report)
        entry = _publish(grid, atlas, cfg, setup, stats, arrays, finals, report)
        report.update(status="completed", version={"number": entry.number, "id": entry.id})
        log(INFO, "fedarches: published version %d (%s...) built by %s", entry.number, entry.id[:12],
            ", ".join(setup.sites))
    except BaseException as exc:
        report.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        log(WARNING, "fedarches: reference build failed: %s", exc)
        raise
    finally:
        report["seconds"] = round(time.monotonic() - t0, 2)
        if report_path is not None:
            _write(report_path, report)
    return report


def _enrolled(atlas: Any) -> list[str]:
    from fedarches.server.registry import read_registry

    return list(read_registry(atlas.path / "sites.json").sites)


def _write(path: Path, data: dict[str, Any]) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str))


__all__ = ["collect_statistics", "finish", "initial_arrays", "plan_build", "run_reference_build"]
