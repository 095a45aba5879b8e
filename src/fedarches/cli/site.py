"""`fedarches site ...`: a site's commands (thin wrappers over ``fedarches.client``)."""

from __future__ import annotations

import argparse

from fedarches.config import STRATEGIES


def _atlas_args(q: argparse.ArgumentParser) -> None:
    q.add_argument("--atlas", required=True, metavar="URL", help="base URL the coordinator serves the atlas at")
    q.add_argument("--trust", required=True, metavar="ROOT_JSON", help="the atlas's root.json, received out of band")
    q.add_argument(
        "--cache",
        default=None,
        metavar="DIR",
        help="trusted-metadata cache (default: $FEDARCHES_CACHE or ~/.cache/fedarches); keeps rollback protection",
    )


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
    q.set_defaults(func=cmd_fetch)

    q = ssub.add_parser("map", help="map private data onto the atlas and write a signed contribution")
    _atlas_args(q)
    q.add_argument("--key", required=True, metavar="KEY_DIR", help="directory from `fedarches site keygen`")
    q.add_argument("--site", required=True, help="this site's enrolled name")
    q.add_argument("--data", required=True, help="query .h5ad with raw counts (never leaves the site)")
    q.add_argument("--condition-key", required=True, help="obs column with the study / batch names to add")
    q.add_argument("--epochs", type=int, default=None)
    q.add_argument(
        "--strategy",
        choices=list(STRATEGIES),
        default="conditions",
        help="conditions: merges into the main line; input-layers/full: published as a branch",
    )
    q.add_argument("--version", type=int, default=None, help="version number to map onto (default: newest)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
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

    f = AtlasClient(args.atlas, args.trust, cache_dir=args.cache).fetch(args.out, args.version)
    names = ", ".join(f.version.condition_names())
    print(f"verified version {f.number} (id {f.id}) of atlas {f.version.atlas!r} -> {f.path}")
    print(f"conditions: {names}")
    return 0


def cmd_map(args: argparse.Namespace) -> int:
    from fedarches.client import map_and_contribute

    r = map_and_contribute(
        atlas_url=args.atlas,
        trust=args.trust,
        key=args.key,
        site=args.site,
        data=args.data,
        condition_key=args.condition_key,
        out_dir=args.out,
        epochs=args.epochs,
        strategy=args.strategy,
        version=args.version,
        cache_dir=args.cache,
        seed=args.seed,
        threads=args.threads,
        progress=not args.quiet,
    )
    rep = r.report
    b = rep["bundle"]
    print(
        f"mapped {', '.join(r.conditions)} onto version {r.parent.number} ({rep['strategy']}, "
        f"{rep['trainable_parameters']} trainable parameters, {rep['epochs']} epochs, {rep['seconds']:.1f} s)"
    )
    lt = rep.get("label_transfer") or {}
    if lt.get("accuracy_known") is not None:
        print(f"label transfer accuracy on known types: {lt['accuracy_known']:.3f}")
    print(f"results (stay here): {r.query_path}, {r.report_path}")
    print(f"contribution (send this file to the coordinator): {r.bundle_path} ({b['bytes']} bytes)")
    return 0
