"""Turns results.json into the summary (ratios, targets) and RESULTS.md.

Every number printed here comes from results.json of the same run; nothing is
typed in by hand. Ratios are peer / fedarches (so > 1 means fedarches is faster).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

GiB = 2**30
MiB = 2**20

QUERY_OPTIMISATIONS = [
    ("Precomputed first-layer expression projection W_x x + b for each query cell (once, before epoch 1)",
     "yes", "yes",
     ("exact: W_x and b are frozen under strategy `conditions`; a query cell's pre-activation is "
      "projection + new condition row")),
    ("No gradients for frozen weights (only the new condition rows are leaf tensors that require grad)",
     "yes", "yes", "exact: autograd never builds the gene-sized weight gradients"),
    (("MSE loss in the hidden dimension: ||x - W h - b||^2 = ||x - b||^2 - 2 h.(W^T (x - b)) + h^T (W^T W) h, "
      "with ||x - b||^2 and W^T (x - b) per cell and W^T W precomputed once"),
     "yes", "no (NB likelihood is not quadratic in the decoder output)",
     "exact up to float rounding; needs a frozen output layer, which `conditions` guarantees"),
    (("Multi-scale RBF MMD (trVAE's 19 bandwidths): one kernel evaluation per unordered pair of cells, "
      "kernel derivative reduced in the same pass, arguments below log(smallest normal float) floored "
      "(avoids denormal results, each a slow CPU microcode assist); validation at the training batch size"),
     "yes (reference and query)", "no MMD",
     "terms below e^-79 are changed by < 1e-34 each; otherwise exact up to float rounding"),
]


FED_TOOLS = ("fedarches-nb", "fedarches-trvae", "fedarches-trvae-w128")
# fedarches models at scvi-tools SCVI's widths ([128,128], z=10): the query and reference targets
SAME_RULES = ("kNN uncertainty both", "novelty test both")
SAME_WIDTH = {"fedarches-nb": "NB CVAE [128,128]", "fedarches-trvae-w128": "trVAE [128,128]"}


def _get(d: Any, *path, default=None):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


def _ratio(a, b):
    if a is None or b is None or not b:
        return None
    return a / b


def _lt(t: dict, rule: str, key: str):
    return _get(t, "quality", "label_transfer", rule, key)


def _fmt(x, nd=3):
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        if abs(x) >= 100:
            return f"{x:.1f}"
        if abs(x) >= 1:
            return f"{x:.{max(nd - 1, 1)}f}" if nd > 2 else f"{x:.2f}"
        return f"{x:.{nd}g}" if abs(x) < 0.01 else f"{x:.{nd}f}"
    return str(x)


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _mib(b):
    return "n/a" if b is None else f"{b / MiB:,.0f} MiB"


def _x(r):
    return "n/a" if r is None else f"{r:.1f}x"


def _metric(met: dict, *names):
    for n in names:
        for k, v in met.items():
            if k.lower() == n.lower():
                return v
    return None


# ----------------------------------------------------------------------------- summary

def summarise(res: dict) -> dict:
    s: dict[str, Any] = {"query_speedup": [], "reference_speedup": [], "quality_vs_scvi": [], "targets": {}}
    for split, sr in (res.get("splits") or {}).items():
        t = sr["tools"]
        for fed in FED_TOOLS:
            for peer in ("scvi-tools", "scarches-trvae"):
                if fed in t and peer in t:
                    s["query_speedup"].append({
                        "where": f"{split} split", "fedarches": fed, "peer": peer,
                        "n_genes": t[fed]["n_genes"],
                        "ratio": _ratio(_get(t[peer], "query", "seconds_per_epoch_median"),
                                        _get(t[fed], "query", "seconds_per_epoch_median")),
                    })
                    s["reference_speedup"].append({
                        "where": f"{split} split", "fedarches": fed, "peer": peer,
                        "ratio": _ratio(_get(t[peer], "reference", "seconds_per_epoch_median"),
                                        _get(t[fed], "reference", "seconds_per_epoch_median")),
                    })
        for fed in FED_TOOLS:
            if fed in t and "scvi-tools" in t:
                f_lt = _get(t[fed], "quality", "label_transfer")
                p_lt = _get(t["scvi-tools"], "quality", "label_transfer")
                row = {"split": split, "fedarches": fed}
                for rule_f, rule_p, tag in (("fedarches_novelty", "knn_uncertainty", "own rules"),
                                            ("knn_uncertainty", "knn_uncertainty", "kNN uncertainty both"),
                                            ("fedarches_novelty", "fedarches_novelty", "novelty test both")):
                    fa, pa = _get(f_lt, rule_f, "accuracy_known"), _get(p_lt, rule_p, "accuracy_known")
                    fh, ph = _get(f_lt, rule_f, "heldout_called_unknown"), _get(p_lt, rule_p, "heldout_called_unknown")
                    row[tag] = {
                        "fedarches_accuracy": fa, "scvi_accuracy": pa,
                        "fedarches_heldout_unknown": fh, "scvi_heldout_unknown": ph,
                        "at_least_as_good": (fa is not None and pa is not None and fa >= pa - 1e-12
                                             and (fh is None or ph is None or fh >= ph - 1e-12)),
                    }
                s["quality_vs_scvi"].append(row)
    for n, sc in _scale_items(res):
        t = sc["tools"]
        if "scvi-tools" not in t:
            continue
        for fed in FED_TOOLS:
            if fed in t:
                s["query_speedup"].append({
                    "where": f"generated {int(n):,} cells", "fedarches": fed, "peer": "scvi-tools",
                    "n_genes": t[fed]["n_genes"],
                    "ratio": _ratio(_get(t["scvi-tools"], "query", "seconds_per_epoch"),
                                    _get(t[fed], "query", "seconds_per_epoch_median")),
                })
                s["reference_speedup"].append({
                    "where": f"generated {int(n):,} cells", "fedarches": fed, "peer": "scvi-tools",
                    "ratio": _ratio(_get(t["scvi-tools"], "reference", "seconds_per_epoch"),
                                    _get(t[fed], "reference", "seconds_per_epoch_median")),
                })

    # --- targets (same widths: fedarches NB CVAE and trVAE at [128,128] vs SCVI n_layers=2, n_hidden=128)
    def same_width(rows, fed, where_prefix=None):
        return [r for r in rows if r["fedarches"] == fed and r["peer"] == "scvi-tools"
                and r["ratio"] is not None and (where_prefix is None or r["where"].startswith(where_prefix))]

    per_model = {}
    for fed in SAME_WIDTH:
        q_rows = same_width(s["query_speedup"], fed)
        if not q_rows:
            continue
        worst = min(q_rows, key=lambda r: r["ratio"])
        qual = [r for r in s["quality_vs_scvi"] if r["fedarches"] == fed]
        # quality judged under the SAME unknown rule for both tools (the label-transfer code is
        # identical, so only the mapping differs), for each of the two rules
        qual_ok = (all(r[rule]["at_least_as_good"] for r in qual for rule in SAME_RULES) if qual else None)
        per_model[fed] = {
            "quality": qual,
            "measured_min_ratio": worst["ratio"], "at": worst["where"],
            "all": [(r["where"], r["ratio"]) for r in q_rows],
            "speed_met": worst["ratio"] >= 10,
            "quality_met": qual_ok,
            "met": bool(worst["ratio"] >= 10 and (qual_ok is not False)),
        }
    if per_model:
        s["targets"]["query_10x"] = {
            "target": ">= 10x faster per query epoch than scvi-tools surgery, same widths and genes; "
                      "accuracy and held-out detection at least as good",
            "models": per_model,
            "met_by": [f for f, m in per_model.items() if m["met"]],
            "met": any(m["met"] for m in per_model.values()),
        }
    t_rows = [r for r in s["query_speedup"] if r["fedarches"] == "fedarches-trvae" and r["peer"] == "scvi-tools"
              and r["ratio"] is not None]
    if t_rows:
        s["targets"]["query_10x_trvae"] = {"all": [(r["where"], r["ratio"]) for r in t_rows],
                                           "min": min(r["ratio"] for r in t_rows)}
    per_model = {}
    for fed in SAME_WIDTH:
        r_rows = same_width(s["reference_speedup"], fed)
        if r_rows:
            worst = min(r_rows, key=lambda r: r["ratio"])
            per_model[fed] = {"measured_min_ratio": worst["ratio"], "at": worst["where"],
                              "all": [(r["where"], r["ratio"]) for r in r_rows], "met": worst["ratio"] >= 1.5}
    if per_model:
        s["targets"]["reference_1_5x"] = {
            "target": ">= 1.5x faster per reference epoch than scvi-tools SCVI at the same widths",
            "models": per_model,
            "met_by": [f for f, m in per_model.items() if m["met"]],
            "met": any(m["met"] for m in per_model.values()),
        }
    scale = dict(_scale_items(res))
    big = str(max((int(k) for k in scale), default=0)) if scale else None
    if big and big in scale:
        t = scale[big]["tools"]
        n_cells = int(big)
        n_genes = _get(scale[big], "data", "n_genes") or 2000
        dense = n_cells * n_genes * 4
        peaks = {k: _get(v, "reference_peak_rss_bytes") for k, v in t.items()}
        fed_peak = max((v for k, v in peaks.items() if k.startswith("fedarches") and v), default=None)
        nnz = _get(scale[big], "data", "nnz_reference") or 0
        s["targets"]["million_reference_memory"] = {
            "target": "1M cells x 2,000 genes reference training within 24 GiB, matrix kept sparse",
            "n_cells": n_cells,
            "csr_bytes": nnz * 8 + (n_cells + 1) * 8,
            "reference_peak_rss_bytes": peaks,
            "dense_float32_matrix_bytes": dense,
            "met": (n_cells >= 1_000_000 and fed_peak is not None and fed_peak < 24 * GiB) if n_cells >= 1_000_000
            else None,
        }
        lt = _get(scale[big], "label_transfer")
        if lt:
            s["targets"]["label_transfer_1m"] = {
                "target": "label transfer, 1M query vs 1M reference cells, under 60 s on 2 cores",
                "n_reference": lt["n_reference"], "n_query": lt["n_query"],
                "seconds": lt["total_seconds"], "method": lt.get("neighbour_method"),
                "met": (lt["total_seconds"] < 60) if lt["n_reference"] >= 1_000_000 else None,
            }
    return s


# ----------------------------------------------------------------------------- markdown

def _why_missed(res: dict, s: dict, add) -> None:
    """Reasons behind the missed targets, with the figures of this run that show them."""
    tq = s["targets"].get("query_10x")
    if not tq or tq.get("met") is True and all(m["met"] for m in tq["models"].values()):
        return
    add("")
    add("## Why the missed targets were missed")
    add("")
    scale = _scale_items(res)
    if scale:
        n, sc = scale[-1]
        t = sc["tools"]
        n_q = sc["data"].get("n_query_cells", int(n))
        steps = -(-int(round(n_q * 0.9)) // 128)  # fedarches' training minibatches per epoch (10% validation)
        per_step = {k: _get(v, "query", "seconds_per_epoch") for k, v in t.items()}
        nb_q, nb_r = _get(t, "fedarches-nb", "query", "seconds_per_epoch"), _get(t, "fedarches-nb", "reference",
                                                                                     "seconds_per_epoch")
        if nb_q and nb_r:
            add(f"- **Query 10x, NB CVAE**: the NB likelihood is evaluated over every gene of every cell in each "
                f"step (softmax over genes, log and exp per entry, lgamma/digamma at the nonzero counts). That is "
                f"exact work that scvi-tools does too, and none of it is frozen: at {int(n):,} cells fedarches' NB "
                f"query epoch still costs {nb_q / nb_r:.0%} of its own reference epoch ({_fmt(nb_q)} s vs "
                f"{_fmt(nb_r)} s), so skipping the frozen first layer and weight gradients cannot reach 10x.")
        ms = {k: 1000 * v / steps for k, v in per_step.items() if v and k.startswith("fedarches-trvae")}
        scvi_ms = 1000 * per_step["scvi-tools"] / steps if per_step.get("scvi-tools") else None
        if ms and scvi_ms:
            add(f"- **Query 10x, trVAE**: with all three exact optimisations the query step never touches the "
                f"gene dimension; what is left is a fixed cost of ~100 small tensor operations per minibatch of "
                f"128 cells (dispatch overhead, four dropout masks, Adam). At {int(n):,} cells (incl. the "
                f"validation pass): " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items())
                + f" per training minibatch vs scvi-tools {scvi_ms:.1f} ms; the ratio is set by that fixed cost, "
                "not by the data size.")
    for fed, m in tq["models"].items():
        bad = []
        for q in m.get("quality", []):
            for rule in SAME_RULES:
                r = q[rule]
                if not r["at_least_as_good"]:
                    parts = []
                    if r["fedarches_accuracy"] is not None and r["fedarches_accuracy"] < r["scvi_accuracy"]:
                        parts.append(f"accuracy {_pct(r['fedarches_accuracy'])} vs {_pct(r['scvi_accuracy'])}")
                    if (r["fedarches_heldout_unknown"] or 0) < (r["scvi_heldout_unknown"] or 0):
                        parts.append(f"held-out called unknown {_pct(r['fedarches_heldout_unknown'])} vs "
                                     f"{_pct(r['scvi_heldout_unknown'])}")
                    bad.append(f"`{q['split']}` ({rule}): " + ", ".join(parts))
        if bad:
            split_types = []
            for split, sr in (res.get("splits") or {}).items():
                tools = sr["tools"]
                pt_f = _get(tools, fed, "quality", "label_transfer", "per_type") or {}
                pt_s = _get(tools, "scvi-tools", "quality", "label_transfer", "per_type") or {}
                worse = [f"{ty} {_pct(pt_f[ty]['knn_correct'])} vs {_pct(pt_s[ty]['knn_correct'])}"
                         for ty in sorted(pt_f) if ty in pt_s and pt_f[ty].get("n", 0) >= 10
                         and pt_f[ty]["knn_correct"] + 0.05 < pt_s[ty]["knn_correct"]]
                if worse:
                    split_types.append(f"`{split}`: " + ", ".join(worse))
            add(f"- **Quality, {fed}** (same unknown rule for both tools): " + "; ".join(bad) + "."
                + (" Known types where its kNN label is 5+ points less often right than scvi-tools' (types with "
                   ">= 10 query cells): " + "; ".join(split_types) + "." if split_types else "")
                + " The label-transfer code is identical for both tools, so the difference is in the "
                "embedding; scvi-tools' tutorial model differs from the paper's architectures in layer norm, "
                "covariates encoded in every layer and dropout 0.2 (which of these matters was not measured).")


def _verdict(t: dict | None) -> str:
    if not t:
        return "not measured in this run"
    m = t.get("met")
    return "MET" if m is True else ("MISSED" if m is False else "not measured at target size in this run")


def _scale_items(res: dict) -> list[tuple[str, dict]]:
    return [(k, v) for k, v in (res.get("scale") or {}).items() if isinstance(v, dict) and "tools" in v]


def _named_runs(res: dict) -> list[tuple[str, dict]]:
    out = []
    for split, sr in (res.get("splits") or {}).items():
        out += [(f"{split}/{k}", t.get("run") or {}) for k, t in sr["tools"].items()]
    for n, sc in _scale_items(res):
        out += [(f"scale {int(n):,}/{k}", t.get("run") or {}) for k, t in sc["tools"].items()]
        if sc.get("label_transfer"):
            out.append((f"scale {int(n):,}/label transfer", sc["label_transfer"].get("run") or {}))
    return out + _quality_runs(res)


def _quality_runs(res: dict) -> list[tuple[str, dict]]:
    out = []
    for split, q in (res.get("quality") or {}).items():
        for seed, e in (q.get("seeds") or {}).items():
            out += [(f"quality {split} seed {seed}/{k}", t.get("run") or {}) for k, t in e["tools"].items()
                    if k != "scanvi"]  # scanvi runs in the scvi-tools process
    return out


def _runs(res: dict) -> list[dict]:
    out = [r for _, r in _quality_runs(res)]
    for sr in (res.get("splits") or {}).values():
        out += [t.get("run") or {} for t in sr["tools"].values()]
    for _, sc in _scale_items(res):
        out += [t.get("run") or {} for t in sc["tools"].values()]
        if sc.get("label_transfer"):
            out.append(sc["label_transfer"].get("run") or {})
    return out


def write_markdown(res: dict, path: Path) -> None:
    L: list[str] = []
    add = L.append
    s = res["summary"]
    add("# fedarches benchmarks")
    add("")
    add(f"Generated by `{res['command']}` (mode **{res['mode']}**) on {res['started']}, "
        f"{res['seconds'] / 60:.1f} min wall. Every figure below was measured in that one run; "
        "ratios are peer / fedarches from the same run (> 1 = fedarches faster). "
        "Reproduce: `make bench` (full) or `make bench-quick`.")
    if not res.get("complete", True):
        add("")
        add("> **PARTIAL**: this run was still going (or was stopped) when this file was written; "
            "sections or tools missing below were not measured.")
    for sec, c in (res.get("carried_over") or {}).items():
        add("")
        add(f"> Section **{sec}** was not re-measured by this command: it is kept from `{c.get('command')}` "
            f"started {c.get('started')}.")
    if res["mode"] != "full":
        add("")
        add("> **Quick mode**: few epochs and small generated data; a smoke test of the harness, not results. "
            "The numbers that answer the targets come from `--mode full`.")
    m = res["machine"]
    add("")
    add(f"Machine: `nproc` = {m['nproc']}, memory {m['memory']}, CPU {m['cpu']}, {m['platform']}, "
        f"Python {m['python']}. Torch threads per training process: {res['threads']} (every tool alike; "
        + ("one process at a time" if res.get("jobs", 1) == 1 else f"quality section: {res['jobs']} processes at a time")
        + "); label transfer: all cores.")

    loads = [x for r in _runs(res) for x in (r.get("loadavg_1min_before"), r.get("loadavg_1min_after"))
             if x is not None]
    if loads:
        add("")
        add(f"1-minute load average around the measured processes: min {min(loads):.2f}, max {max(loads):.2f} "
            f"(one benchmark process with {res['threads']} thread(s) gives about {res['threads']}; more means other "
            "work shared the 2 cores and timings are pessimistic for whichever tool ran then).")

    busy = [(name, r) for name, r in _named_runs(res)
             if max(r.get("loadavg_1min_before") or 0, r.get("loadavg_1min_after") or 0) > 2.0]
    if busy:
        add("")
        add("Processes measured while other work was running (1-min load > 2 before or after): " + ", ".join(
            f"{n} ({r.get('loadavg_1min_before')} -> {r.get('loadavg_1min_after')})" for n, r in busy)
            + ". Compare their wall times with the CPU seconds reported next to them.")

    # targets
    add("")
    add("## Targets")
    add("")
    add("| target | measured | verdict |")
    add("|---|---|---|")
    tq = s["targets"].get("query_10x")
    if tq:
        for fed, m in tq["models"].items():
            detail = "; ".join(f"{w}: {_x(r)}" for w, r in m["all"])
            r = m["measured_min_ratio"]
            short = f" (speed short by {10 / r:.1f}x at worst)" if r and r < 10 else ""
            add(f"| query mapping >= 10x faster per epoch than scvi-tools surgery, quality at least as good: "
                f"fedarches {SAME_WIDTH[fed]} vs SCVI [128,128], same genes | worst {_x(r)} ({m['at']}); {detail}; "
                f"quality at least as good on every split under the same rule: {_fmt(m['quality_met'])} | "
                f"{_verdict(m)}{short} |")
            for q in m.get("quality", []):
                for rule, what in (("kNN uncertainty both", "both tools with the paper's kNN uncertainty rule"),
                                   ("novelty test both", "both tools with fedarches' novelty test"),
                                   ("own rules", "for information: fedarches' novelty test vs scvi-tools' kNN "
                                                 "uncertainty rule")):
                    r = q[rule]
                    verdict = "at least as good" if r["at_least_as_good"] else "WORSE"
                    add(f"| ... quality on `{q['split']}`, {what} | accuracy on known types "
                        f"{_pct(r['fedarches_accuracy'])} vs {_pct(r['scvi_accuracy'])}; held-out type called "
                        f"unknown {_pct(r['fedarches_heldout_unknown'])} vs {_pct(r['scvi_heldout_unknown'])} | "
                        f"{verdict if rule != 'own rules' else '(' + verdict.lower() + ')'} |")
    else:
        add("| query mapping >= 10x | n/a | not measured in this run |")
    tt = s["targets"].get("query_10x_trvae")
    if tt:
        detail = "; ".join(f"{w}: {_x(r)}" for w, r in tt["all"])
        worst = _x(tt["min"])
        verdict = ">= 10x everywhere" if tt["min"] >= 10 else f">= 10x only where listed at or above 10x (worst {worst})"
        add(f"| (for information) the same query ratio for the paper's trVAE [128,20] vs SCVI [128,128] (not the "
            f"same widths: SCVI has one width for all hidden layers) | {detail} | {verdict} |")
    tr = s["targets"].get("reference_1_5x")
    if tr:
        for fed, m in tr["models"].items():
            detail = "; ".join(f"{w}: {_x(r)}" for w, r in m["all"])
            add(f"| reference training >= 1.5x faster per epoch than scvi-tools SCVI, same widths: fedarches "
                f"{SAME_WIDTH[fed]} | worst {_x(m['measured_min_ratio'])} ({m['at']}); {detail} | {_verdict(m)} |")
    else:
        add("| reference training >= 1.5x | n/a | not measured in this run |")
    tm = s["targets"].get("million_reference_memory")
    if tm:
        peaks = ", ".join(f"{k}: {_mib(v)}" for k, v in tm["reference_peak_rss_bytes"].items())
        add(f"| {tm['n_cells']:,} x 2,000 reference training in 24 GiB without densifying | peak RSS of the "
            f"reference phase: {peaks}. The CSR matrix is {_mib(tm.get('csr_bytes'))}; a densified float32 copy "
            f"would add {_mib(tm['dense_float32_matrix_bytes'])}, so any run that densified would peak above "
            f"{_mib((tm.get('csr_bytes') or 0) + tm['dense_float32_matrix_bytes'])}; fedarches feeds minibatches "
            f"of 128 dense rows (data/batches.py) | {_verdict(tm)} |")
    else:
        add("| 1M reference in 24 GiB | n/a | not measured in this run |")
    tl = s["targets"].get("label_transfer_1m")
    if tl:
        add(f"| label transfer 1M query vs 1M reference < 1 min | {tl['n_query']:,} vs {tl['n_reference']:,} cells: "
            f"{_fmt(tl['seconds'])} s ({tl['method']}) | {_verdict(tl)} |")
    else:
        add("| label transfer 1M vs 1M | n/a | not measured in this run |")

    _why_missed(res, s, add)

    # splits
    for split, sr in (res.get("splits") or {}).items():
        meta = sr["split"]
        add("")
        add(f"## Split `{split}`: quality and cost")
        add("")
        add(f"{meta['description']}. Reference {meta['n_reference_cells']:,} cells, query "
            f"{meta['n_query_cells']:,} cells, {meta['n_genes']:,} genes "
            f"({'2,000 HVGs chosen on the reference' if meta['n_genes'] < meta['n_genes_available'] else 'all genes: the file has fewer than 2,000'}), "
            "same files for every tool.")
        add("")
        tools = sr["tools"]
        cols = list(tools)
        add("| | " + " | ".join(f"{(tools[c].get('tool'))}: {c}" for c in cols) + " |")
        add("|---|" + "---|" * len(cols))

        def row(label, fn, cols=cols, tools=tools):
            vals = []
            for c in cols:
                try:
                    vals.append(fn(tools[c]))
                except (KeyError, TypeError):  # a missing figure is shown as n/a, never invented
                    vals.append("n/a")
            add(f"| {label} | " + " | ".join(vals) + " |")

        lt = lambda t, rule, k: _get(t, "quality", "label_transfer", rule, k)
        row("accuracy, known types (kNN uncertainty > 0.5 = unknown)", lambda t: _pct(_lt(t, "knn_uncertainty", "accuracy_known")))
        row("held-out type called unknown (kNN uncertainty)", lambda t: _pct(_lt(t, "knn_uncertainty", "heldout_called_unknown")))
        row("accuracy, known types (fedarches novelty test)", lambda t: _pct(_lt(t, "fedarches_novelty", "accuracy_known")))
        row("held-out type called unknown (fedarches novelty test)", lambda t: _pct(_lt(t, "fedarches_novelty", "heldout_called_unknown")))
        row("known cells called unknown (novelty test)", lambda t: _pct(_lt(t, "fedarches_novelty", "known_called_unknown")))
        met0 = _get(tools[cols[0]], "quality", "metrics") or {}
        if "error" in met0:
            add(f"| integration metrics | not measured: {met0['error']} |" + " |" * (len(cols) - 1))
        met_keys = [k for k in met0 if k != "error"]
        for k in met_keys:
            row(k, lambda t, k=k: _fmt(_get(t, "quality", "metrics", k)))
        row("reference s/epoch (median)", lambda t: _fmt(t["reference"]["seconds_per_epoch_median"]))
        row("reference epochs run / s total", lambda t: f"{t['reference']['epochs']} / {_fmt(t['reference']['fit_seconds'])}")
        row("query s/epoch (median)", lambda t: _fmt(t["query"]["seconds_per_epoch_median"]))
        row("query epochs run", lambda t: str(t["query"]["epochs"]))
        row("query s to convergence (surgery + training, tool's schedule)", lambda t: _fmt(t["query"]["fit_seconds"]))
        row("CPU s of the fits, reference / query (process time)",
            lambda t: f"{_fmt(t['reference']['fit_cpu_seconds'])} / {_fmt(t['query']['fit_cpu_seconds'])}")
        row("trainable parameters, query (entries that changed / trained)", lambda t: _fmt(t["query"]["trainable_parameters"]))
        row("parameters handed to the optimiser, query", lambda t: _fmt(t["query"].get("optimizer_parameters", t["query"]["trainable_parameters"])))
        row("bytes a site uploads (new-condition weights, float32)", lambda t: _fmt(t["query"]["upload_bytes"]))
        row("total parameters", lambda t: _fmt(t["reference"]["total_parameters"]))
        row("peak RSS, reference phase", lambda t: _mib(t.get("reference_peak_rss_bytes")))
        row("peak RSS, whole process", lambda t: _mib(t.get("peak_rss_bytes")))
        types = sorted({ty for c in cols for ty in (_get(tools[c], "quality", "label_transfer", "per_type") or {})})
        if types:
            add("")
            add("Per query cell type (cells): correct under the kNN-uncertainty rule / called unknown by the "
                "novelty test (held-out types: only the second figure matters):")
            add("")
            add("| type | " + " | ".join(cols) + " |")
            add("|---|" + "---|" * len(cols))
            for ty in types:
                vals = []
                for c in cols:
                    d = _get(tools[c], "quality", "label_transfer", "per_type", ty)
                    vals.append("n/a" if not d else f"{_pct(d['knn_correct'])} / {_pct(d['novelty_unknown'])}")
                n_ty = next((_get(tools[c], "quality", "label_transfer", "per_type", ty, "n") for c in cols), None)
                held = " (held out)" if ty in (_get(tools[cols[0]], "quality", "unseen_types") or []) else ""
                add(f"| {ty}{held} ({n_ty}) | " + " | ".join(vals) + " |")
        add("")
        add("Speed ratios on this split (peer / fedarches, per epoch): " + "; ".join(
            f"query {r['peer']} / {r['fedarches']} = {_x(r['ratio'])}"
            for r in s["query_speedup"] if r["where"] == f"{split} split") + ". " + "; ".join(
            f"reference {r['peer']} / {r['fedarches']} = {_x(r['ratio'])}"
            for r in s["reference_speedup"] if r["where"] == f"{split} split") + ".")

    # scale
    if (res.get("scale") or {}).get("not_run"):
        add("")
        add("## Scale")
        add("")
        add(f"Not measured in this run: {res['scale']['not_run']}.")
    if _scale_items(res):
        add("")
        add("## Scale: generated data x 2,000 genes (fedarches.data.simulate)")
        add("")
        add("Seconds per epoch of minibatch training (batch 128). fedarches: one full epoch measured (includes its "
            "per-epoch validation pass). scvi-tools: one full epoch, or at 1M a fixed number of minibatches "
            "whose wall time is scaled to the epoch's minibatch count (stated per row). Query: "
            "surgery + strategy `conditions`; fedarches' one-off projection precompute is listed separately.")
        add("")
        add("| cells (ref / query) | tool | ref s/epoch | query s/epoch | query setup s | peak RSS ref phase | peak RSS process | measured how | ref ratio scvi/this | query ratio scvi/this |")
        add("|---|---|---|---|---|---|---|---|---|---|")
        for n, sc in _scale_items(res):
            t = sc["tools"]
            scvi = t.get("scvi-tools")
            for tool, r in t.items():
                ref_s = _get(r, "reference", "seconds_per_epoch")
                q_s = _get(r, "query", "seconds_per_epoch")
                how = "1 full epoch"
                if r.get("error"):
                    how = f"FAILED ({r['error']}; see {_get(r, 'run', 'log')})"
                if tool == "scvi-tools" and _get(r, "reference", "steps_run") and \
                        _get(r, "reference", "steps_run") < _get(r, "reference", "steps_per_epoch", default=0):
                    how = (f"{r['reference']['steps_run']} of {r['reference']['steps_per_epoch']} steps (ref), "
                           f"{r['query']['steps_run']} of {r['query']['steps_per_epoch']} (query), scaled")
                rr = _ratio(_get(scvi, "reference", "seconds_per_epoch"), ref_s) if scvi and tool != "scvi-tools" else None
                qr = _ratio(_get(scvi, "query", "seconds_per_epoch"), q_s) if scvi and tool != "scvi-tools" else None
                add(f"| {int(n):,} / {sc['data'].get('n_query_cells', int(n)):,} | {tool} | {_fmt(ref_s)} | {_fmt(q_s)} | "
                    f"{_fmt(_get(r, 'query', 'setup_seconds'))} | {_mib(r.get('reference_peak_rss_bytes'))} | "
                    f"{_mib(r.get('peak_rss_bytes'))} | {how} | {_x(rr)} | {_x(qr)} |")
        for n, sc in _scale_items(res):
            lt = sc.get("label_transfer")
            if lt:
                add("")
                add(f"Label transfer (fedarches.labels.KNNLabelTransfer, k={lt['k']}, {lt.get('threads')} threads): "
                    f"{lt['n_query']:,} query vs {lt['n_reference']:,} reference cells: fit "
                    f"{_fmt(lt['fit_seconds'])} s + predict {_fmt(lt['predict_seconds'])} s = "
                    f"{_fmt(lt['total_seconds'])} s; nearest-neighbour method: {lt.get('neighbour_method')}; "
                    f"peak RSS {_mib(lt.get('peak_rss_bytes'))}.")
        add("")
        add("Generated data, per size (one simulate call per size, so reference and query share the cell-type "
            "programs; reference = the first three studies, query = the other three, each a contiguous block of "
            "rows, so the generator never copies the matrix through fancy indexing):")
        for n, sc in _scale_items(res):
            d = sc["data"]
            add(f"- {int(n):,}: {d.get('description', '')}; generated in {_fmt(d.get('generate_seconds'))} s")

    _quality_section(res, add)

    # optimisations
    add("")
    add("## Which query optimisations apply to which model")
    add("")
    add("| optimisation | trVAE (MSE) | NB CVAE (scVI-like) | why it is exact |")
    add("|---|---|---|---|")
    for o in QUERY_OPTIMISATIONS:
        add(f"| {o[0]} | {o[1]} | {o[2]} | {o[3]} |")
    add("")
    add("The peers train the same trainable set (the new condition columns) but recompute the frozen "
        "gene-sized first layer and output layer every step, and scvi-tools masks gradients of the frozen "
        "columns with hooks after computing them (its optimiser holds the full injected layers, listed above as "
        "'parameters handed to the optimiser').")

    # settings
    add("")
    add("## Settings per tool")
    add("")
    for split, sr in list((res.get("splits") or {}).items())[:1]:
        for tool, t in sr["tools"].items():
            add(f"- **{tool}** ({t.get('tool')} {t.get('version', '')}): {t.get('model')}")
    add("- scvi-tools: its scArches tutorial: `SCVI(use_layer_norm='both', use_batch_norm='none', "
        "encode_covariates=True, dropout_rate=0.2, n_layers=2)`, default `train()` for the reference, "
        "`SCVI.load_query_data` + `train(max_epochs=200, plan_kwargs={'weight_decay': 0.0})` for the query; "
        "counts in `.X`.")
    add("- scarches TRVAE: its surgery tutorial's schedule (n_epochs=500, alpha_epoch_anneal=200, early stopping "
        "on val_unweighted_loss, patience 20, lr reduction; query weight_decay=0) with the paper's trVAE "
        "architecture to match fedarches' trVAE layer for layer: MSE on log1p(CP10k), [128, 20], z=10, MMD on "
        "the first decoder layer.")
    add("- fedarches: paper Table 1 defaults, its own schedule (epochs from the number of cells, early stopping "
        "patience 20), strategy `conditions`. fedarches-trvae-w128 is the same trVAE with hidden layers "
        "[128,128] (SCVI's widths), for the same-widths comparison.")
    add("- Quality is computed identically for every tool from its latent of reference and query cells "
        "(query model): fedarches.labels.KNNLabelTransfer (k=50) and fedarches.metrics on reference + query. "
        "Two unknown rules are reported for every tool: the paper's kNN uncertainty alone (> 0.5), and "
        "fedarches' calibrated novelty test. A known-type cell called unknown counts as wrong.")
    if res.get("quality"):
        add("- scvi-tools SCANVI (quality section): its scArches tutorial: `SCANVI.from_scvi_model(<the reference "
            "SCVI above>, unlabeled_category='Unknown')`, `train(max_epochs=20, n_samples_per_label=100)`; query "
            "labels set to 'Unknown', `SCANVI.load_query_data` + `train(max_epochs=100, plan_kwargs={'weight_decay': "
            "0.0}, check_val_every_n_epoch=10)`; its labels: `predict()`, max of `predict(soft=True)`.")
    if res["mode"] != "full":
        add(f"- Quick mode epochs: reference {res['mode_settings'].get('ref_epochs')}, query "
            f"{res['mode_settings'].get('query_epochs')} for every tool.")

    # versions
    add("")
    add("## Versions")
    add("")
    v = res["versions"]
    add("fedarches venv: " + ", ".join(f"{k} {val}" for k, val in sorted(v["fedarches_venv"].items())))
    add("")
    add("peers venv (benchmarks/work/peers-venv, pinned by benchmarks/peers-constraints.txt): "
        + ", ".join(f"{k} {val}" for k, val in sorted(v["peers_venv"].items())))
    add("")
    add("Full package lists of both venvs are in results.json (`versions.*_all`).")
    add("")
    add("## Commands")
    add("")
    add("```")
    add(res["command"])
    for c in res.get("subprocess_commands", []):
        add(c.replace(str(Path(__file__).resolve().parents[1]) + "/", ""))
    add("```")
    path.write_text("\n".join(L) + "\n")


# ----------------------------------------------------------------------------- quality under state shift

QUALITY_ROWS = [  # (tool, rule, row label)
    ("fedarches-nb", "own", "fedarches NB, its own labels (map_query)"),
    ("fedarches-trvae", "own", "fedarches trVAE, its own labels (map_query)"),
    ("scanvi", "own", "scvi-tools SCANVI, its own classifier"),
    ("fedarches-nb", "paper-knn", "fedarches NB + paper kNN"),
    ("fedarches-trvae", "paper-knn", "fedarches trVAE + paper kNN"),
    ("scvi-tools", "paper-knn", "scvi-tools SCVI + paper kNN"),
    ("scanvi", "paper-knn", "scvi-tools SCANVI latent + paper kNN"),
    ("scarches-trvae", "paper-knn", "scarches TRVAE + paper kNN"),
    ("fedarches-nb", "fedarches-rule", "fedarches NB + fedarches rule"),
    ("fedarches-trvae", "fedarches-rule", "fedarches trVAE + fedarches rule"),
    ("scvi-tools", "fedarches-rule", "scvi-tools SCVI + fedarches rule"),
    ("scanvi", "fedarches-rule", "scvi-tools SCANVI latent + fedarches rule"),
    ("scarches-trvae", "fedarches-rule", "scarches TRVAE + fedarches rule"),
]
FALSE_ALARM_MAX = 0.05


def _ms(st: dict | None, pct: bool = True) -> str:
    """mean ± sd (worst, seed): the worst seed is what verdicts use."""
    if not st:
        return "n/a"
    f = (lambda x: f"{100 * x:.1f}%") if pct else (lambda x: f"{x:.3f}")
    sd = f"{100 * st['sd']:.1f}" if pct else f"{st['sd']:.3f}"
    return f"{f(st['mean'])} ± {sd} ({f(st['worst'])}, s{st['worst_seed']})"


def _worst(agg: dict, tool: str, rule: str, *path):
    return _get(agg, tool, rule, *path, "worst")


def _quality_section(res: dict, add) -> None:
    q = res.get("quality") or {}
    if not q:
        return
    add("")
    add("## Quality under state shift")
    add("")
    add(f"Seeds {', '.join(str(s) for s in res.get('quality_seeds', []))}; each cell: mean ± sd over seeds "
        "(worst seed's value, its seed). Every tool of a (split, seed) gets the same cells and genes and its seed "
        "set to the run seed (simulated splits also draw their cells with it). Known-type accuracy counts a known "
        "cell called unknown as wrong; held-out types: fraction called unknown and AUROC of the rule's score "
        "(that type's cells vs known-type cells). Rules: **own** = the tool's own labels (fedarches: map_query's "
        "`_pred` / `_unknown` / `_novelty`; SCANVI: its classifier, unknown where max probability < 0.5, score "
        "1 - max probability); **paper kNN** = k=50 on the tool's latent, unknown where uncertainty > 0.5, score "
        "= uncertainty; **fedarches rule** = fedarches.labels.KNNLabelTransfer defaults on the tool's latent "
        "(score = novelty).")
    verdicts = []
    for split, sq in q.items():
        agg = sq.get("aggregate") or {}
        meta = sq.get("data") or {}
        seeds = sorted(sq.get("seeds") or {}, key=int)
        types = sorted({t for tool in agg.values() for r in tool.values() for t in r.get("heldout", {})})
        add("")
        add(f"### `{split}`")
        add("")
        desc = (meta.get("description") or "").rstrip(".")
        add(f"{desc + '. ' if desc else ''}Reference {meta.get('n_reference_cells', 0):,} cells, query "
            f"{meta.get('n_query_cells', 0):,}, {meta.get('n_genes', 0):,} genes; held out: "
            f"{', '.join(types) or 'none'}; seeds measured: {', '.join(seeds)}"
            f"{' (cells drawn per seed)' if sq.get('simulated') else ''}. Wall time per seed (all tools): "
            + ", ".join(f"s{s} {(sq['seeds'][s].get('seconds') or 0) / 60:.1f} min" for s in seeds) + ".")
        failed = [f"{t} (seed {s}: {v['error']})" for s in seeds for t, v in sq["seeds"][s]["tools"].items()
                  if v.get("error")]
        if failed:
            add("")
            add("Failed (not scored): " + "; ".join(failed) + ".")
        add("")
        head = ["known-type accuracy", "known called unknown"]
        head += [x for t in types for x in (f"{t} called unknown", f"{t} AUROC")]
        add("| tool + rule | " + " | ".join(head) + " |")
        add("|---|" + "---|" * len(head))
        for tool, rule, label in QUALITY_ROWS:
            a = _get(agg, tool, rule)
            if not a:
                continue
            cells = [_ms(a.get("accuracy_known")), _ms(a.get("known_called_unknown"))]
            for t in types:
                h = _get(a, "heldout", t) or {}
                cells += [_ms(h.get("called_unknown")), _ms(h.get("auroc"), pct=False)]
            add(f"| {label} | " + " | ".join(cells) + " |")
        verdicts.append((split, agg, types))

    add("")
    add("### Verdicts (worst seed)")
    add("")
    add("Accuracy bar: fedarches' own labels >= the best of scvi-tools SCANVI (own classifier) and SCVI + paper kNN, "
        f"worst seed against worst seed. False alarms: known cells called unknown <= {FALSE_ALARM_MAX:.0%} (worst "
        "seed). Detection: held-out cells called unknown and AUROC (worst seed).")
    add("")
    add("| split | fedarches NB own | fedarches trVAE own | SCANVI own | SCVI + paper kNN | accuracy >= best peer "
        "(NB / trVAE) | false alarms NB / trVAE | false alarms <= 5% (NB / trVAE) | held-out called unknown, NB / "
        "trVAE / SCANVI | held-out AUROC, NB / trVAE / SCANVI |")
    add("|---|---|---|---|---|---|---|---|---|---|")
    for split, agg, types in verdicts:
        acc = {k: _worst(agg, t, r, "accuracy_known") for k, t, r in (
            ("nb", "fedarches-nb", "own"), ("tr", "fedarches-trvae", "own"), ("scanvi", "scanvi", "own"),
            ("scvi", "scvi-tools", "paper-knn"))}
        peers = [v for v in (acc["scanvi"], acc["scvi"]) if v is not None]
        best = max(peers) if peers else None

        def bar(v, best=best):
            return "n/a" if v is None or best is None else ("yes" if v >= best - 1e-12 else
                                                            f"NO ({100 * (v - best):+.1f} pts)")
        fa = [_worst(agg, t, "own", "known_called_unknown") for t in ("fedarches-nb", "fedarches-trvae")]
        fa_ok = ["n/a" if v is None else ("yes" if v <= FALSE_ALARM_MAX else "NO") for v in fa]

        def per_type(metric, pct=True):
            parts = []
            for ty in types:
                vals = [_worst(agg, t, "own", "heldout", ty, metric) for t in ("fedarches-nb", "fedarches-trvae",
                                                                               "scanvi")]
                fmt = _pct if pct else (lambda x: "n/a" if x is None else f"{x:.3f}")
                parts.append(f"{ty}: " + " / ".join(fmt(v) for v in vals))
            return "; ".join(parts) or "no held-out type"
        add(f"| `{split}` | {_pct(acc['nb'])} | {_pct(acc['tr'])} | {_pct(acc['scanvi'])} | {_pct(acc['scvi'])} | "
            f"{bar(acc['nb'])} / {bar(acc['tr'])} | {_pct(fa[0])} / {_pct(fa[1])} | {fa_ok[0]} / {fa_ok[1]} | "
            f"{per_type('called_unknown')} | {per_type('auroc', pct=False)} |")
