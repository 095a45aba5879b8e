"""`fedarches train-reference | map | embed`: argparse and printing over the library."""

from __future__ import annotations

import argparse

from fedarches.config import CONVERGE_PATIENCE, DEFAULT_CONVERGE_TOL, DEFAULT_FIT_CELLS, DEFAULT_LABEL_KNOWLEDGE, K_MIN, LABEL_KNOWLEDGE, MODEL_KINDS, STRATEGIES, MapSettings, TrainConfig
from fedarches.data.io import read_h5ad
from fedarches.device import DEFAULT_DEVICE, DEVICES, check_device
from fedarches.mapping import check_out_dir
from fedarches.threads import check_threads


def map_settings(args: argparse.Namespace) -> MapSettings:
    """The one place command-line options become ``MapSettings`` (``map`` and ``site map``)."""
    from fedarches.query_fit import check_fit_settings

    check_fit_settings(args.fit_cells, args.converge_tol)
    return MapSettings(epochs=args.epochs, strategy=args.strategy, seed=args.seed, threads=check_threads(args.threads),
                       progress=not args.quiet, device=check_device(args.device), fit_cells=args.fit_cells,
                       converge_tol=args.converge_tol)


def map_options(p: argparse.ArgumentParser) -> None:
    """Options every mapping command takes."""
    p.add_argument("--condition-key", required=True, help="obs column with the study / batch names to add")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--strategy", choices=list(STRATEGIES), default="conditions",
                   help="conditions: only the new condition vectors train; input-layers/full: more (a branch)")
    p.add_argument("--fit-cells", type=int, default=DEFAULT_FIT_CELLS, metavar="N",
                   help="strategy conditions: fit the new rows on at most N cells per new condition, then embed "
                        f"every cell (0: fit on every cell; default {DEFAULT_FIT_CELLS}; docs/SPEED.md)")
    p.add_argument("--converge-tol", type=float, default=DEFAULT_CONVERGE_TOL, metavar="TOL",
                   help="stop once the trained parameters change by less than TOL (relative) per epoch "
                        f"{CONVERGE_PATIENCE} epochs in a row (0: off, the full schedule; default {DEFAULT_CONVERGE_TOL:g})")
    _run_options(p)


def plot_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="also draw a UMAP (query by study, predicted label and unknown calls; the model's "
                   "reference cells where it holds them) to this PNG file")


def draw_plot(path: str | None, adata, model, condition_key: str, title: str) -> None:  # noqa: ANN001
    """``--plot``: one library call, then say where the picture is."""
    if not path:
        return
    from fedarches.plotting import plot_mapping

    print(f"UMAP: {plot_mapping(adata, model, condition_key, path, title=title)}")


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="threads for every pool: torch, BLAS, OpenMP, faiss, numba (default: measured, docs/THREADS.md)")
    device_option(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def device_option(p: argparse.ArgumentParser) -> None:
    """--device, on every command that computes."""
    p.add_argument("--device", default=DEFAULT_DEVICE, metavar="|".join(DEVICES),
                   help="where torch computes: auto (CUDA when available, else CPU), cpu, cuda or cuda:N "
                        "(default auto; docs/OUT_OF_CORE.md)")


def backed_options(p: argparse.ArgumentParser) -> None:
    """Out-of-core training (docs/OUT_OF_CORE.md)."""
    p.add_argument("--backed", action="store_true",
                   help="train from the file without loading its matrix: row blocks are read as needed, so "
                        "memory is bounded by --chunk-cells x --buffer-chunks, not by the number of cells "
                        "(the matrix must be CSR)")
    p.add_argument("--chunk-cells", type=int, default=65536,
                   help="with --backed: cells per contiguous block read from the file (default 65536)")
    p.add_argument("--buffer-chunks", type=int, default=4,
                   help="with --backed: blocks held at once; minibatches are shuffled within them (default 4)")


def label_knowledge_options(p: argparse.ArgumentParser) -> None:
    """--label-knowledge and --k-min, shared by `train-reference` and `atlas build`."""
    p.add_argument("--label-knowledge", choices=list(LABEL_KNOWLEDGE), default=DEFAULT_LABEL_KNOWLEDGE,
                   help="what the model publishes for label transfer: class summaries (no per-cell array; "
                        "each component stands for >= --k-min cells) or the per-cell reference latent "
                        f"(public references); default {DEFAULT_LABEL_KNOWLEDGE}")
    p.add_argument("--k-min", type=int, default=K_MIN,
                   help=f"with summaries: fewest cells a published label component stands for (default {K_MIN})")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-reference", help="train a reference model on one or more studies")
    p.add_argument("--data", required=True, help="reference .h5ad with raw counts")
    p.add_argument("--condition-key", required=True, help="obs column with the study / batch")
    p.add_argument("--label-key", default=None, help="obs column with cell types (enables label transfer)")
    p.add_argument("--reference-studies", default=None, metavar="A,B,...",
                   help="comma-separated values of --condition-key that form the reference (default: all)")
    p.add_argument("--model", choices=list(MODEL_KINDS), default="trvae")
    p.add_argument("--n-genes", type=int, default=2000, help="highly variable genes to keep (0 = all)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--layer", default=None, help="read counts from this layer instead of .X")
    backed_options(p)
    label_knowledge_options(p)
    _run_options(p)
    p.set_defaults(func=cmd_train_reference)

    p = sub.add_parser("map", help="map a query study onto a model by architecture surgery")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--data", required=True, help="query .h5ad with raw counts")
    p.add_argument("--out", required=True, help="output directory (query.h5ad, model/, report.json)")
    p.add_argument("--layer", default=None, help="read counts from this layer instead of .X")
    plot_option(p)
    map_options(p)
    p.set_defaults(func=cmd_map)

    p = sub.add_parser("embed", help="latent and labels for cells of conditions the model holds")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--condition-key", required=True)
    p.add_argument("--out", required=True, help="output .h5ad")
    p.add_argument("--layer", default=None)
    p.add_argument("--site", default=None,
                   help="whose data this is: its study names find that site's own conditions in an atlas version")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for every pool: torch, BLAS, OpenMP, faiss, numba (default: measured, docs/THREADS.md)")
    device_option(p)
    plot_option(p)
    p.set_defaults(func=cmd_embed)


def cmd_train_reference(args: argparse.Namespace) -> int:
    from fedarches.data.conditions import parse_names
    from fedarches.reference_summary import train_reference_with_summary

    out = check_out_dir(args.out, marker="manifest.json")
    cfg = TrainConfig(epochs=args.epochs, seed=args.seed, threads=args.threads, device=check_device(args.device))
    studies = parse_names(args.reference_studies)
    options = {}
    if args.backed:
        from fedarches.data.backed import BackedData, ChunkSettings

        options["chunks"] = ChunkSettings(chunk_cells=args.chunk_cells, buffer_chunks=args.buffer_chunks).check()
        data = BackedData.open(args.data, args.layer).select(args.condition_key, studies)
        studies = None
    else:
        data = read_h5ad(args.data)
    model, summary = train_reference_with_summary(
        data, args.condition_key, args.label_key,
        reference_studies=studies, kind=args.model, n_genes=args.n_genes,
        layer=args.layer, train=cfg, progress=not args.quiet,
        label_knowledge=args.label_knowledge, k_min=args.k_min, **options,
    )
    model.save(out)
    for line in summary.lines():
        print(line)
    print(f"reference model written to {out}")
    return 0


def cmd_map(args: argparse.Namespace) -> int:
    from fedarches.mapping import map_to_directory
    from fedarches.model import FedArchesModel

    check_out_dir(args.out)
    res = map_to_directory(FedArchesModel.load(args.model), read_h5ad(args.data), args.condition_key, args.out,
                           map_settings(args), layer=args.layer, copy_data=False)
    r = res.result.report
    print(f"mapped {r.n_cells} cells ({', '.join(r.new_conditions)}) with strategy {r.strategy}: "
          f"{r.trainable_parameters} trainable of {r.total_parameters} parameters, {r.epochs} epochs, "
          f"{r.seconds:.1f} s -> {res.out_dir}")
    print_label_transfer(r)
    draw_plot(args.plot, res.result.adata, res.result.model, args.condition_key, f"fedarches map: {res.out_dir}")
    return 0


def print_label_transfer(r) -> None:
    lt = r.label_transfer
    if lt is None:
        return
    if lt.accuracy_known is not None:
        print(f"label transfer accuracy on known types: {lt.accuracy_known:.3f}")
    if lt.unseen_called_unknown is not None:
        print(f"cells of types absent from the reference called unknown: {lt.unseen_called_unknown:.3f}")


def cmd_embed(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedarches.atomic import make_dirs
    from fedarches.mapping import write_h5ad
    from fedarches.model import FedArchesModel

    model = FedArchesModel.load(args.model)
    out = model.embed(read_h5ad(args.data), args.condition_key, layer=args.layer, threads=args.threads,
                      site=args.site, device=check_device(args.device))
    path = Path(args.out)
    make_dirs(path.parent)
    write_h5ad(out, path)
    print(f"embedded {out.n_obs} cells -> {args.out}")
    draw_plot(args.plot, out, model, args.condition_key, f"fedarches embed: {args.out}")
    return 0
