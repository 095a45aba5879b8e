"""`fedarches site ...`: a site's commands (thin wrappers over ``fedarches.client``)."""

from __future__ import annotations

import argparse

from fedarches.cli.core import draw_plot, map_options, map_settings, plot_option


def _atlas_args(q: argparse.ArgumentParser) -> None:
    q.add_argument("--atlas", required=True, metavar="URL", help="base URL the coordinator serves the atlas at")
    q.add_argument("--trust", required=True, metavar="ROOT_JSON", help="the atlas's root.json, received out of band")
    q.add_argument(
        "--cache",
        default=None,
        metavar="DIR",
        help="trusted-metadata cache, which keeps rollback protection (default: one per site, "
        "$FEDARCHES_CACHE or ~/.cache/fedarches, then sites/<site>-<hash>/tuf/<root digest>)",
    )
    q.add_argument("--download-deadline", type=float, default=300.0, metavar="SECONDS",
                   help="refuse a fetch that takes longer than this in all (default 300; a read that "
                   "stalls for 20 s is refused earlier)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("site", help="site: key, verified fetch, mapping and signed contributions")
    ssub = p.add_subparsers(dest="site_command", required=True, metavar="SUBCOMMAND")

    q = ssub.add_parser("keygen", help="create this site's Ed25519 key pair")
    q.add_argument("--out", required=True, metavar="KEY_DIR")
    q.set_defaults(func=cmd_keygen)

    q = ssub.add_parser("fetch", help="download and verify an atlas version as a model directory")
    _atlas_args(q)
    q.add_argument("--out", required=True, metavar="MODEL_DIR")
    q.add_argument("--version", type=int, default=None, help="version number (default: newest on the main line)")
    q.add_argument("--site", default=None, help="this site's name: use the same trust cache as its `site map`")
    q.add_argument("--force", action="store_true",
                   help="replace --out even when it holds a newer version of this atlas")
    q.set_defaults(func=cmd_fetch)

    q = ssub.add_parser("map", help="map private data onto the atlas and write a signed contribution")
    _atlas_args(q)
    q.add_argument("--key", required=True, metavar="KEY_DIR", help="directory from `fedarches site keygen`")
    q.add_argument("--site", required=True, help="this site's enrolled name")
    q.add_argument("--data", required=True, help="query .h5ad with raw counts (never leaves the site)")
    q.add_argument("--version", type=int, default=None, help="version number to map onto (default: newest)")
    plot_option(q)
    map_options(q)
    q.add_argument("--share-labels", default=None, metavar="KEY",
                   help="obs column of this site's own labels: class summaries of labels with >= k_min cells "
                   "travel signed in the bundle (only onto a version built with --label-knowledge summaries)")
    q.add_argument("--out", required=True, metavar="OUT_DIR")
    q.set_defaults(func=cmd_map)


def cmd_keygen(args: argparse.Namespace) -> int:
    from fedarches.format.signing import keygen

    k = keygen(args.out)
    print(f"private key (keep it here, mode 0600): {k.private}")
    print(f"public key (send to the coordinator for `fedarches atlas enroll`): {k.public}")
    print(f"key id: {k.key_id}")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from fedarches.client import AtlasClient
    from fedarches.format.identity import REFERENCE_SITE

    client = AtlasClient(args.atlas, args.trust, cache_dir=args.cache, site=args.site,
                         deadline_s=args.download_deadline)
    f = client.fetch(args.out, args.version, replace_newer=args.force)
    names = ", ".join(c.name if c.site == REFERENCE_SITE else f"{c.name}@{c.site}" for c in f.version.conditions)
    print(f"verified version {f.number} (id {f.id}) of atlas {f.version.atlas!r} -> {f.path}")
    print(f"conditions: {names}")
    return 0


def cmd_map(args: argparse.Namespace) -> int:
    from fedarches.client import STATUS_NOTHING_NEW, map_and_contribute

    r = map_and_contribute(
        atlas_url=args.atlas,
        trust=args.trust,
        key=args.key,
        site=args.site,
        data=args.data,
        condition_key=args.condition_key,
        out_dir=args.out,
        settings=map_settings(args).model_copy(update={"share_labels": args.share_labels}),
        version=args.version,
        cache_dir=args.cache,
        download_deadline=args.download_deadline,
    )
    if r.status == STATUS_NOTHING_NEW:
        print(f"nothing new: all {len(r.plan.present)} studies of this site ({', '.join(r.plan.present)}) "
              f"are already in version {r.parent.number}; report in {r.report_path}")
        return 0
    m, b = r.report.map, r.report.bundle
    assert m is not None and b is not None
    print(
        f"mapped {', '.join(r.conditions)} onto version {r.parent.number} ({m.strategy}, "
        f"{m.trainable_parameters} trainable parameters, {m.epochs} epochs, {m.seconds:.1f} s)"
    )
    if m.label_transfer is not None and m.label_transfer.accuracy_known is not None:
        print(f"label transfer accuracy on known types: {m.label_transfer.accuracy_known:.3f}")
    print(f"results (stay here): {r.query_path}, {r.report_path}")
    if r.report.labels is not None:
        lab = r.report.labels
        print(f"label summaries shared (k_min {lab['k_min']}): {', '.join(sorted(lab['shared']))}")
        if lab["left_out"]:
            print(f"labels left out (fewer than {lab['k_min']} cells): "
                  + ", ".join(f"{n} ({c})" for n, c in sorted(lab["left_out"].items())))
    print(f"contribution (send this file to the coordinator): {r.bundle_path} ({b.bytes} bytes)")
    if args.plot:
        import anndata as ad

        from fedarches.model import FedArchesModel

        draw_plot(args.plot, ad.read_h5ad(r.query_path), FedArchesModel.load(r.model_dir), args.condition_key,
                  f"fedarches site map: {args.site} onto version {r.parent.number}")
    return 0
