"""`fedarches atlas ...`: the coordinator's commands (thin wrappers over ``server.Atlas``)."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedarches.cli.core import device_option, label_knowledge_options
from fedarches.config import MODEL_KINDS
from fedarches.device import check_device
from fedarches.errors import DataFileError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("atlas", help="coordinator: create, build, grow and serve a signed atlas")
    asub = p.add_subparsers(dest="atlas_command", required=True, metavar="SUBCOMMAND")

    q = asub.add_parser("init", help="create an atlas directory (keys + empty signed repository)")
    q.add_argument("atlas_dir", metavar="ATLAS_DIR")
    q.add_argument("--name", required=True, help="atlas name (bundles name it; sites see it)")
    q.set_defaults(func=cmd_init)

    q = asub.add_parser("build", help="train the reference model and publish it as version 1")
    q.add_argument("atlas_dir", metavar="ATLAS_DIR")
    q.add_argument("--data", required=True, help="reference .h5ad with raw counts")
    q.add_argument("--condition-key", required=True, help="obs column with the study / batch")
    q.add_argument("--label-key", default=None, help="obs column with cell types (enables label transfer)")
    q.add_argument("--reference-studies", default=None, metavar="A,B,...",
                   help="comma-separated values of --condition-key that form the reference (default: all)")
    q.add_argument("--model", choices=list(MODEL_KINDS), default="trvae")
    q.add_argument("--epochs", type=int, default=None)
    q.add_argument("--n-genes", type=int, default=2000, help="highly variable genes to keep (0 = all)")
    q.add_argument("--layer", default=None, help="read counts from this layer instead of .X")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--threads", type=int, default=None,
                   help="threads for every pool: torch, BLAS, OpenMP, faiss, numba (default: measured, docs/THREADS.md)")
    device_option(q)
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    label_knowledge_options(q)
    q.set_defaults(func=cmd_build)

    _register_build_federated(asub)

    q = asub.add_parser("enroll", help="accept contributions signed by this site key")
    q.add_argument("atlas_dir", metavar="ATLAS_DIR")
    q.add_argument("--site", required=True, help="site name (must match the --site the site signs with)")
    q.add_argument("--public-key", required=True, help="the site's site.pub from `fedarches site keygen`")
    q.add_argument("--replace", action="store_true",
                   help="rotate the key of an already enrolled site (its old key is refused from then on)")
    q.set_defaults(func=cmd_enroll)

    q = asub.add_parser("merge", help="verify contribution bundles and publish the next version")
    q.add_argument("atlas_dir", metavar="ATLAS_DIR")
    q.add_argument("bundles", nargs="+", metavar="BUNDLE")
    q.add_argument(
        "--skip-invalid",
        action="store_true",
        help="merge the bundles that verify and report the others (default: refuse all on any failure)",
    )
    q.set_defaults(func=cmd_merge)

    q = asub.add_parser("log", help="print the lineage of published versions")
    q.add_argument("atlas_dir", metavar="ATLAS_DIR")
    q.add_argument("--json", action="store_true", help="JSON list of versions")
    q.set_defaults(func=cmd_log)

    q = asub.add_parser("diff", help="print what changed between two versions (conditions, label components)")
    q.add_argument("atlas_dir", metavar="ATLAS_DIR")
    q.add_argument("a", type=int, metavar="A", help="version number")
    q.add_argument("b", type=int, metavar="B", help="version number")
    q.add_argument("--json", action="store_true", help="the same as JSON")
    q.set_defaults(func=cmd_diff)

    q = asub.add_parser("serve", help="serve the published repository over HTTP")
    q.add_argument("atlas_dir", metavar="ATLAS_DIR")
    q.add_argument("--host", default="127.0.0.1")
    q.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    q.add_argument("--verbose", action="store_true", help="log every request")
    q.set_defaults(func=cmd_serve)

    q = asub.add_parser("refresh", help="re-sign metadata before it expires (run at least weekly)")
    q.add_argument("atlas_dir", metavar="ATLAS_DIR")
    q.add_argument("--force", action="store_true", help="re-sign even if not yet due")
    q.set_defaults(func=cmd_refresh)

    q = asub.add_parser("report", help="print a Flower run's report: each site's outcome and scores per round")
    q.add_argument("report", metavar="REPORT_JSON",
                   help="the coordinator's run report (run config `report`, or "
                   "<atlas-dir>/federation/run-<id>/report.json)")
    q.add_argument("--holdout", default=None, metavar="CELL_TYPE",
                   help="the cell type the reference was built without (names it in the legend)")
    q.set_defaults(func=cmd_report)

    q = asub.add_parser("audit", help="show what a contribution bundle holds (no trust decision)")
    q.add_argument("bundle", metavar="BUNDLE")
    q.set_defaults(func=cmd_audit)


def _conditions(entry) -> str:  # type: ignore[no-untyped-def]
    return ", ".join(f"{c.name}@{c.site}" for c in entry.conditions)


def cmd_init(args: argparse.Namespace) -> int:
    from fedarches.server import Atlas

    atlas = Atlas.init(args.atlas_dir, args.name)
    print(f"created atlas {atlas.name!r} in {atlas.path}")
    print(f"serve this directory: {atlas.repository_dir}")
    print(f"trust root (hand it to every site out of band): {atlas.root_json.resolve()}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from fedarches.data.conditions import parse_names
    from fedarches.server import Atlas

    atlas = Atlas(args.atlas_dir)
    built = atlas.build(
        args.data,
        args.condition_key,
        args.label_key,
        kind=args.model,
        epochs=args.epochs,
        n_genes=args.n_genes,
        seed=args.seed,
        threads=args.threads,
        device=check_device(args.device),
        layer=args.layer,
        progress=not args.quiet,
        reference_studies=parse_names(args.reference_studies),
        label_knowledge=args.label_knowledge,
        k_min=args.k_min,
    )
    for line in built.summary.lines():
        print(line)
    print(f"published version {built.number} (id {built.id}) of atlas {atlas.name!r}: {_conditions(built.entry)}")
    return 0


def cmd_enroll(args: argparse.Namespace) -> int:
    from fedarches.server import Atlas

    entry = Atlas(args.atlas_dir).enroll(args.site, args.public_key, replace=args.replace)
    print(f"enrolled site {entry.site!r} with key {entry.key_id}")
    last = entry.previous_keys[-1] if entry.previous_keys else None
    if last is not None and last.replaced == entry.enrolled:
        print(f"it replaced key {last.key_id} (refused from {last.replaced} on); "
              "the rotation is published in the signed lineage (`fedarches atlas log`)")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from fedarches.server import Atlas

    result = Atlas(args.atlas_dir).merge(args.bundles, skip_invalid=args.skip_invalid)
    for r in result.rejected:
        print(f"rejected {r.source}: {r.error}", file=sys.stderr)
    for src in result.unchanged:
        print(f"already merged (no-op): {src}")
    for e in result.published:
        parents = ", ".join(str(n) for n in e.parent_numbers)
        print(f"published version {e.number} (id {e.id}) on branch {e.branch!r}, parents [{parents}]: {_conditions(e)}")
        _print_labels(e.labels)
    for c in result.label_conflicts:
        print(c.line())
    if not result.published:
        head = result.head
        print(f"nothing new to publish; head of main is version {head.number if head else '-'}")
    return 2 if result.rejected and not result.published and not result.unchanged else 0


def cmd_log(args: argparse.Namespace) -> int:
    from fedarches.server import Atlas

    atlas = Atlas(args.atlas_dir)
    entries = atlas.log()
    if args.json:
        print(json.dumps([e.model_dump(mode="json") for e in entries], indent=2))
        return 0
    _print_key_changes(atlas.lineage().key_changes)
    if not entries:
        print(f"atlas {atlas.name!r} has no versions yet (run `fedarches atlas build`)")
        return 0
    for e in reversed(entries):
        parents = ",".join(str(n) for n in e.parent_numbers) or "-"
        print(f"v{e.number:<4} {e.id[:12]}  {e.branch:<12} parents {parents:<6} {e.strategy:<12} {e.published}")
        if e.build:
            print("      built over Flower: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in e.build.items()))
        added = [c for c in atlas.version(e.number).conditions if c.introduced_in == e.number]
        total = len(e.conditions)
        print(f"      added {len(added)} of {total} conditions:")
        for c in added:
            print(f"        {c.name}@{c.site}{_metric_note(c.metrics)}")
        _print_labels(e.labels)
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from fedarches.server import Atlas
    from fedarches.server.diff import version_diff

    atlas = Atlas(args.atlas_dir)
    d = version_diff(atlas.version(args.a), atlas.version(args.b))
    if args.json:
        print(json.dumps(d.to_dict(), indent=2))
        return 0
    print(f"v{d.a} {d.a_id[:12]} -> v{d.b} {d.b_id[:12]}")
    for title, rows in (("added", d.conditions_added), ("removed", d.conditions_removed)):
        print(f"  conditions {title}: {len(rows)}")
        for c in rows:
            print(f"    {c['name']}@{c['site']} (since v{c['introduced_in']})")
    for title, labels in (("added", d.labels_added), ("removed", d.labels_removed)):
        if labels:
            print(f"  label components {title}: {sum(r.components for r in labels)}")
        for r in labels:
            print(f"    {r.name}@{r.site}: {r.components} components, {r.cells} cells (since v{r.introduced_in})")
    if d.label_names_added:
        print(f"  new labels: {', '.join(d.label_names_added)}")
    print(f"  blobs changed: {', '.join(d.blobs_changed) or 'none'}" + ("; gene list changed" if d.genes_changed else ""))
    return 0


def _print_labels(labels) -> None:  # type: ignore[no-untyped-def]
    """The label components a version added (label summaries), by label and source site."""
    if labels:
        print(f"      added {sum(r.components for r in labels)} label components:")
    for r in labels:
        print(f"        {r.name}@{r.site}: {r.components} components, {r.cells} cells")


def _print_key_changes(changes) -> None:  # type: ignore[no-untyped-def]
    """Key rotations from the signed lineage, newest first (versions follow)."""
    for c in reversed(changes):
        print(f"key   {c.replaced}  site {c.site!r}: key {c.old_key_id[:16]}... replaced by {c.new_key_id[:16]}...")


# the scalar figures a version records per condition, as `atlas log` shows them
_LOG_METRICS = (
    ("label_transfer.accuracy_known", "accuracy"),
    ("label_transfer.unseen_called_unknown", "unseen->unknown"),
    ("label_transfer.known_called_unknown", "known->unknown"),
    ("reference.knn_purity", "kNN purity"),
    ("reference.ebm", "EBM"),
    ("epochs", "epochs"),
)


def _metric_note(metrics) -> str:  # type: ignore[no-untyped-def]
    parts = []
    for key, name in _LOG_METRICS:
        v = metrics.get(key)
        if isinstance(v, bool) or v is None:
            continue
        parts.append(f"{name} {v:.3f}" if isinstance(v, float) else f"{name} {v}")
    return f"  ({', '.join(parts)})" if parts else ""


def cmd_serve(args: argparse.Namespace) -> int:
    from fedarches.server import Atlas, serve_atlas

    atlas = Atlas(args.atlas_dir)
    server = serve_atlas(atlas, args.host, args.port, verbose=args.verbose)  # re-signs while it serves
    print(f"serving atlas {atlas.name!r} from {atlas.repository_dir} at {server.url} (Ctrl-C stops)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


def cmd_refresh(args: argparse.Namespace) -> int:
    from fedarches.server import Atlas

    done = Atlas(args.atlas_dir).refresh(force=args.force)
    print("re-signed targets, snapshot and timestamp metadata" if done else "metadata not yet due for re-signing")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from fedarches.format.bundle import audit_bundle

    report = audit_bundle(args.bundle)
    report.pop("manifest", None)
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0


# ----------------------------------------------------------------------------- run report

_TABLE_COLUMNS = (("round", "right"), ("site", "left"), ("status", "left"), ("new studies / note", "left"),
                  ("label accuracy", "right"), ("unseen -> unknown", "right"),
                  ("known -> unknown", "right"), ("seconds", "right"))


def console() -> Any:
    """A rich console; wide enough for the tables when the output is a file or a pipe."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=130)


def site_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per site and round of a coordinator run report (``federation.coordinator``),
    sorted by round then site; scores a site did not send are None."""
    rows = []
    for rnd in report.get("rounds", []):
        for s in rnd.get("sites", []):
            m = s.get("metrics", {})
            rows.append({
                "round": rnd["round"],
                "site": s.get("site") or f"node {s.get('node_id')}",
                "status": s.get("status"),
                "conditions": ", ".join(s.get("conditions", [])),
                "acc": m.get("label_transfer.accuracy_known"),
                "unseen_unknown": m.get("label_transfer.unseen_called_unknown"),
                "known_unknown": m.get("label_transfer.known_called_unknown"),
                "seconds": m.get("seconds"),
                "message": s.get("message", ""),
            })
    return sorted(rows, key=lambda r: (r["round"], r["site"]))


def _fmt(v: Any, pct: bool = True) -> str:
    if v is None:
        return "-"
    return f"{100 * float(v):.1f}%" if pct else f"{float(v):.1f}"


def print_run_report(report: Mapping[str, Any], holdout: str | None = None) -> None:
    """The per-round, per-site table of a run report, and what its columns mean."""
    from rich.table import Table

    out = console()
    out.rule("sites, as reported to the coordinator")
    table = Table(caption="scores are computed at each site on its own labels; only the scores travel")
    for col, just in _TABLE_COLUMNS:
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in site_rows(report):
        note = r["conditions"] if r["status"] in ("accepted", "contributed") else r["message"][:60]
        table.add_row(str(r["round"]), r["site"], str(r["status"]), note, _fmt(r["acc"]),
                      _fmt(r["unseen_unknown"]), _fmt(r["known_unknown"]), _fmt(r["seconds"], pct=False))
    out.print(table)
    unseen = (f"cells of {holdout!r}, which the reference never saw," if holdout
              else "cells of types absent from the reference")
    out.print(
        "label accuracy: cells of types the reference knows that got their true label (unknown counts as "
        f"wrong); unseen -> unknown: {unseen} called unknown; known -> unknown: false alarms."
    )


def read_run_report(path: str | Path) -> dict[str, Any]:
    """A coordinator run report, refused with the data file check when it is not one."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataFileError(f"data file check failed: no run report at {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataFileError(f"data file check failed: {path} is not a JSON run report ({exc})") from None
    if not isinstance(report, dict) or not isinstance(report.get("rounds"), list):
        raise DataFileError(f"data file check failed: {path} is not a coordinator run report (no 'rounds' list)")
    return report


def cmd_report(args: argparse.Namespace) -> int:
    report = read_run_report(args.report)
    versions = [str(r.get("head_number")) for r in report["rounds"]]
    print(f"run {report.get('run_id', '?')} of atlas {report.get('atlas', '?')!r}: {report.get('status', '?')}, "
          f"{len(report['rounds'])} round(s), head version after each: {', '.join(versions) or '-'}")
    if report.get("error"):
        print(f"error: {report['error']}")
    sys.stdout.flush()
    print_run_report(report, args.holdout)
    return 0 if report.get("status") == "completed" else 1


def _register_build_federated(asub: argparse._SubParsersAction) -> None:
    q = asub.add_parser("build-federated", help="train version 1 over Flower with the sites that hold the "
                        "reference studies (simulation on this machine); no cell leaves its site")
    q.add_argument("atlas_dir", metavar="ATLAS_DIR")
    q.add_argument("--sites", required=True, metavar="SITES.toml",
                   help="one [[site]] table per site: site, data, condition-key, key-dir (sites enrolled first)")
    q.add_argument("--label-key", required=True, help="obs column with cell types at every site")
    q.add_argument("--model", choices=list(MODEL_KINDS), default="trvae")
    q.add_argument("--rounds", type=int, default=0,
                   help="Flower rounds (default 0: the model's measured schedule, trVAE 75, NB 30)")
    q.add_argument("--n-genes", type=int, default=2000, help="highly variable genes to keep (0 = all)")
    q.add_argument("--local-epochs", type=int, default=0,
                   help="epochs each site trains per round (default 0: the model's, trVAE 2, NB 5)")
    q.add_argument("--strategy", choices=["fedavg", "fedprox"], default="fedavg", help="Flower strategy")
    q.add_argument("--mmd", choices=["local", "rff", "none"], default="rff",
                   help="trVAE: rff: MMD among each site's own studies and against the other sites' studies "
                        "through their random-feature mean embeddings (aggregates, exchanged each round); "
                        "local: among each site's own studies only; or none")
    q.add_argument("--bn", choices=["aggregate", "local"], default="aggregate",
                   help="NB batch norm: averaged every round, or kept at the sites (FedBN) and averaged at the end")
    q.add_argument("--calibration", choices=["pooled", "cross-site", "site"], default="pooled",
                   help="novelty thresholds of labels several sites hold, from histograms of distances after the "
                        "last round (never a cell): pooled (every site's cells, as a central build), cross-site "
                        "(against the other sites' components only), or site (each label's first site's own)")
    q.add_argument("--gaussians", choices=["auto", "pooled", "site"], default="auto",
                   help="class Gaussians of the novelty test for labels several sites hold: fitted on every "
                        "site's cells from per-label moments (pooled, as a central build) or the first site's; "
                        "auto: the model's measured choice (trVAE pooled, NB site)")
    q.add_argument("--final-rows", choices=["auto", "refit", "trained"], default="auto",
                   help="each site's condition rows in version 1: fitted again to the final shared weights, "
                        "as `map` fits a query's (refit), or as the rounds left them (trained); auto: the "
                        "measured choice (trained, both models)")
    q.add_argument("--min-sites", type=int, default=None,
                   help="usable updates a round needs (default: every site)")
    q.add_argument("--round-timeout", type=int, default=600)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--report", default="", help="write the run report (JSON) here")
    q.set_defaults(func=cmd_build_federated)


def cmd_build_federated(args: argparse.Namespace) -> int:
    from fedarches.federation.reference_run_config import ReferenceRunConfig
    from fedarches.federation.reference_simulation import build_federated, read_sites

    n_sites = len(read_sites(args.sites))
    cfg = ReferenceRunConfig.from_run_config({
        "atlas-dir": str(Path(args.atlas_dir).resolve()), "label-key": args.label_key, "model": args.model,
        "rounds": args.rounds, "n-genes": args.n_genes, "local-epochs": args.local_epochs,
        "strategy": args.strategy, "mmd": args.mmd, "bn": args.bn, "seed": args.seed,
        "calibration": args.calibration, "gaussians": args.gaussians, "final-rows": args.final_rows,
        "min-sites": args.min_sites or n_sites, "round-timeout": args.round_timeout,
        "report": str(Path(args.report).resolve()) if args.report else "",
    })
    report = build_federated(cfg, args.sites)
    v = report["version"]
    sites = ", ".join(s["site"] for s in report["sites"].values())
    print(f"published version {v['number']} (id {v['id']}) of atlas {report['atlas']!r}, built over Flower "
          f"({args.strategy}, {cfg.rounds} rounds x {cfg.local_epochs} local epochs) by {sites}; "
          f"{report['genes']} genes chosen from the sites' statistics")
    return 0
