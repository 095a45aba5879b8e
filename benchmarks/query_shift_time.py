"""Time the query-adaptive step of the unknown-cell rule at a million query cells.

    python benchmarks/query_shift_time.py [--cells 1000000] [--labels 8] [--workers 2]

The population statistic (labels/query_shift.py) is a k-nearest-neighbour median over
the query itself, the larger part of label transfer at a million cells
(benchmarks/MAP_TIME.md). This times the current rule (``adapted_scores``: one tree per
study and predicted label) against the previous one (the guard, then one tree per study)
on the same generated latents: Gaussian clusters in 10 dimensions, one study, a score
and an uncertainty per cell. Then the mixed-call clusters alone (part of the current
rule), without a new type and with one (a label's cells given scattered calls and twice
the score), and how many calls the approximate assignment of unsampled cells changes.
Prints the seconds of each and the 1-minute load average.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from fedarches.labels import query_shift
from fedarches.labels.query_shift import (
    adapted_scores,
    mixed_cluster_scores,
    neighbourhood_median,
    shift_factors,
    study_groups,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=1_000_000)
    p.add_argument("--labels", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    centres = rng.normal(0.0, 4.0, (a.labels, 10))
    codes = rng.integers(0, a.labels, a.cells)
    z = centres[codes] + rng.normal(0.0, 1.0, (a.cells, 10))
    raw, unc = rng.gamma(4.0, 0.15, a.cells), rng.beta(1.0, 20.0, a.cells)
    groups = study_groups(None, a.cells)
    t0 = time.perf_counter()
    shift = shift_factors(raw, groups, 0.6)
    np.maximum(raw / shift, neighbourhood_median(z, raw / shift, groups, workers=a.workers))
    previous = time.perf_counter() - t0
    t0 = time.perf_counter()
    adapted_scores(z, raw, unc, codes, groups, 0.6, workers=a.workers)
    current = time.perf_counter() - t0
    t0 = time.perf_counter()
    mixed_cluster_scores(z, raw, codes, groups, 0.6, workers=a.workers)
    clusters_only = time.perf_counter() - t0
    # one label's cells become a new type: calls scattered over every label, scores doubled
    new = codes == 0
    scattered, lifted = codes.copy(), raw.copy()
    scattered[new], lifted[new] = rng.integers(0, a.labels, int(new.sum())), 2.0 * raw[new]
    t0 = time.perf_counter()
    flagged = mixed_cluster_scores(z, lifted, scattered, groups, 0.6, workers=a.workers) > 1.0
    with_new = time.perf_counter() - t0
    exact = (query_shift.ASSIGN_EPS, 0.0)
    query_shift.ASSIGN_EPS = exact[1]
    try:
        flagged_exact = mixed_cluster_scores(z, lifted, scattered, groups, 0.6, workers=a.workers) > 1.0
    finally:
        query_shift.ASSIGN_EPS = exact[0]
    print(f"{a.cells:,} query cells, {a.labels} labels, {a.workers} workers, load {os.getloadavg()[0]:.2f}: "
          f"previous rule {previous:.1f} s, current rule {current:.1f} s (of which mixed-call clusters "
          f"{clusters_only:.1f} s); with a new type of {int(new.sum()):,} cells: clusters {with_new:.1f} s, "
          f"{flagged[new].mean():.3f} of it flagged, {int((flagged != flagged_exact).sum())} calls differ from "
          "exact nearest-sample assignment")


if __name__ == "__main__":
    main()
