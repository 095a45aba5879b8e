"""The query-adaptive part of the novelty test: what the query's own structure says.

Why: thresholds calibrated on the reference alone assume a query of known types
lies as far from the reference as one reference study lies from another. A query
in another biological state (disease, stimulation) is farther: every type moves,
so a reference-only threshold flags whole known types (measured: one known cell
in ten on a stimulated PBMC query). Two facts about the query separate "a known
type in a new state" from "a type the reference lacks":

* the bulk of a query study is its known types, and a state moves them together,
  so the study's median novelty score over the reference's median is the excess
  the state causes. Scores are divided by it (never by less than 1, so a query no
  farther than the reference keeps the reference calibration). A type the
  reference lacks is a minority and barely moves the median.
* a new type forms a population: its cells' query neighbours are new too. The
  median score of a cell's ``k`` nearest query cells of the same study *and the
  same predicted label* is the statistic that decides; a cell's own score decides
  alone only when it exceeds the threshold ``ISOLATED_FACTOR`` times over. A known
  type in a new state moves as a whole and keeps its label, so its population
  median stays low while single cells at its edge scatter above the threshold
  (those were most false alarms). The population confirms a cell near its
  threshold but never overrules one well inside it: it raises a cell's score to at
  most ``POPULATION_LIFT`` times its own, so a small known type whose label a new
  type also takes (PBMC's dendritic cells and the held-out B cells) keeps its calls;
  restricting the neighbours to the cell's label keeps a known type next to a new
  one that gets another label from inheriting its neighbours' scores. A label with
  fewer than ``MIN_POPULATION`` cells of the study takes its population from the
  study's nearest cells, any label.
* a new type has no label of its own to map to, so its calls scatter: a query
  cluster (Leiden on the study's kNN graph) whose two most common calls cover less
  than ``MIXED_TOP2`` of its cells and whose median score is ``MIXED_MEDIAN`` times
  the reference median is a new population as a whole, though its cells may each
  sit near their label's threshold. A known type in a new state keeps one label,
  and one the model mis-maps splits over two, so neither is mixed in this sense;
  the median keeps a mixed cluster of known types (T cells split between CD4 and
  CD8 and NK calls) out, because known types score as the reference does.
* a new type placed between known types gets a label the classifier is unsure of,
  while a shifted known type keeps a confident one: the score is multiplied by
  ``1 + UNCERTAINTY_WEIGHT * (1 - max p)`` before the guard, so an unsure call needs
  less distance to count as new.

docs/LABELS.md has the measurements behind the choice.
"""

from __future__ import annotations

import random

import igraph
import numpy as np
from scipy.spatial import cKDTree

from fedarches.labels.knn import spatial_order
from fedarches.neighbours import label_strings

MIN_SHIFT_CELLS = 50  # fewer query cells of one study cannot place their own median
NEIGHBOURS = 15  # query neighbours of the population statistic
MIN_POPULATION = 20  # fewer cells of one (study, predicted label): the study's population instead
ISOLATED_FACTOR = 1.5  # a cell's own score decides alone above this many thresholds
POPULATION_LIFT = 1.25  # a population raises a cell's score to at most this many times its own
UNCERTAINTY_WEIGHT = 0.5  # score x (1 + this x label uncertainty)
MAX_TREE_CELLS = 200_000  # above this, neighbours come from a seeded sample of the study
#: a sampled group's neighbours are (1 + eps)-approximate: its tree is a sample anyway, and the
#: exact search was 3/4 of the population step at a million cells (docs/LABELS.md)
SAMPLED_EPS = 0.5
MIXED_TOP2 = 0.9  # a cluster whose two most common calls cover less than this share is mixed
MIXED_MEDIAN = 1.5  # ... and a new population when its median score is this many reference medians
MAX_CLUSTER_CELLS = 30_000  # a larger study is clustered on a seeded sample, the rest join their nearest
#: the other cells of a sampled study join the cluster of a sampled cell within (1 + eps) of their
#: nearest: a boundary cell may change cluster, a population does not (benchmarks/query_shift_time.py)
ASSIGN_EPS = 2.0


def study_groups(batches: object | None, n: int) -> np.ndarray:
    """Query study of each cell as an integer group (all one group without batches)."""
    if batches is None:
        return np.zeros(n, dtype=np.int64)
    return np.unique(label_strings(batches, n, "query batches"), return_inverse=True)[1].ravel().astype(np.int64)


def shift_factors(raw: np.ndarray, groups: np.ndarray, reference_median: float) -> np.ndarray:
    """Per cell, ``max(1, median raw score of its study / reference median)``."""
    shift = np.ones(raw.shape[0], dtype=np.float64)
    if not (np.isfinite(reference_median) and reference_median > 0):
        return shift
    for g in np.unique(groups):
        members = groups == g
        values = raw[members]
        finite = values[np.isfinite(values)]
        if finite.size >= MIN_SHIFT_CELLS:
            shift[members] = max(1.0, float(np.median(finite)) / reference_median)
    return shift


def adapted_scores(latent: np.ndarray, raw: np.ndarray, uncertainty: np.ndarray, codes: np.ndarray,
                   groups: np.ndarray, reference_median: float, *, guard_score: np.ndarray | None = None,
                   workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(novelty score, shift guard) per cell from the reference-calibrated ``raw`` score
    (> 1: beyond its label's threshold), the call's ``uncertainty`` (1 - max p), the
    predicted label ``codes`` and the query study ``groups``. ``guard_score``: the score
    the guard's median is taken of, when it differs from ``raw`` (class summaries)."""
    boost = 1.0 + UNCERTAINTY_WEIGHT * np.asarray(uncertainty, dtype=np.float64)
    boosted = raw * boost
    shift = shift_factors(boosted if guard_score is None else guard_score * boost, groups, reference_median)
    own = boosted / shift
    alone = own / ISOLATED_FACTOR
    n_codes = int(codes.max()) + 1 if codes.size else 1
    by_label = groups * n_codes + codes
    # a label with too few query cells of the study for a population of its own (a new type spread over
    # several labels, a rare known type): the population of its study's nearest cells, whatever their label
    _, inverse, counts = np.unique(by_label, return_inverse=True, return_counts=True)
    few = counts[inverse.ravel()] < MIN_POPULATION
    study = neighbourhood_median(latent, own, groups, k=NEIGHBOURS, workers=workers, fallback=alone, only=few) \
        if few.any() else alone
    # each label's tree is sampled as densely as a study's would be (MAX_TREE_CELLS per study)
    rate = min(1.0, MAX_TREE_CELLS / float(np.bincount(groups).max()))
    population = neighbourhood_median(latent, own, by_label, k=NEIGHBOURS, workers=workers,
                                      min_cells=MIN_POPULATION, fallback=study, sample_rate=rate)
    score = np.maximum(alone, np.minimum(population, POPULATION_LIFT * own))
    return np.maximum(score, mixed_cluster_scores(latent, own, codes, groups, reference_median,
                                                  workers=workers)), shift


def query_clusters(latent: np.ndarray, *, k: int = NEIGHBOURS, seed: int = 0,
                   workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(clustered cells, their Leiden cluster): modularity Leiden (igraph) on the ``k``-NN
    graph of one study's cells, or of a seeded sample of ``MAX_CLUSTER_CELLS`` of them.

    A population that matters here has hundreds of cells, so it survives the sample,
    and the graph stays small at a million cells. igraph's random generator is seeded
    for the call and given back to Python's ``random`` module (igraph's default)."""
    n = latent.shape[0]
    rng = np.random.default_rng(seed)
    pool = np.sort(rng.choice(n, MAX_CLUSTER_CELLS, replace=False)) if n > MAX_CLUSTER_CELLS else np.arange(n)
    kk = min(k, pool.size - 1)
    if kk < 1:
        return pool, np.zeros(pool.size, dtype=np.int64)
    _, idx = cKDTree(latent[pool]).query(latent[pool], kk + 1, workers=workers)
    edges = np.c_[np.repeat(np.arange(pool.size), kk), idx[:, 1:].ravel()]
    graph = igraph.Graph(n=pool.size, edges=edges)
    graph.simplify()
    igraph.set_random_number_generator(random.Random(seed))
    try:
        found = graph.community_leiden(objective_function="modularity", n_iterations=-1)
    finally:
        igraph.set_random_number_generator(random)
    return pool, np.asarray(found.membership, dtype=np.int64)


def mixed_cluster_scores(latent: np.ndarray, own: np.ndarray, codes: np.ndarray, groups: np.ndarray,
                         reference_median: float, *, workers: int = 1) -> np.ndarray:
    """Per cell: its query cluster's median ``own`` score over ``MIXED_MEDIAN`` reference
    medians where the cluster's calls are mixed (its two most common labels cover less
    than ``MIXED_TOP2``), 0 elsewhere; above 1 means a new population. Clusters of
    fewer than ``MIN_POPULATION`` clustered cells, and every cell when there is no
    reference median (states saved before it), get 0. In a sampled study the clusters
    are judged on the sample; only when one is mixed do the other cells join the
    cluster of their nearest sampled cell (``ASSIGN_EPS``-approximate), so a query
    without a mixed population pays for the sample alone."""
    out = np.zeros(own.shape[0], dtype=np.float64)
    if not (np.isfinite(reference_median) and reference_median > 0):
        return out
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        if members.size < MIN_POPULATION:
            continue
        pool, clusters = query_clusters(latent[members], workers=workers)
        cells = members[pool]
        value = np.zeros(int(clusters.max()) + 1, dtype=np.float64)
        for c in np.unique(clusters):
            in_c = cells[clusters == c]
            if in_c.size < MIN_POPULATION:
                continue
            counts = np.sort(np.bincount(codes[in_c]))[::-1]
            if counts[:2].sum() < MIXED_TOP2 * in_c.size:
                value[c] = float(np.median(own[in_c])) / (MIXED_MEDIAN * reference_median)
        if not value.any():
            continue
        if pool.size == members.size:
            out[members] = value[clusters]
            continue
        tree = cKDTree(latent[cells])
        for start in range(0, members.size, 65536):
            rows = members[start:start + 65536]
            _, nearest = tree.query(latent[rows], 1, workers=workers, eps=ASSIGN_EPS)
            out[rows] = value[clusters[nearest]]
    return out


def neighbourhood_median(latent: np.ndarray, values: np.ndarray, groups: np.ndarray, *,
                         k: int = NEIGHBOURS, workers: int = 1, seed: int = 0, min_cells: int = MIN_SHIFT_CELLS,
                         fallback: np.ndarray | None = None, only: np.ndarray | None = None,
                         sample_rate: float = 1.0) -> np.ndarray:
    """Median of ``values`` over each cell's ``k`` nearest cells of its own group (itself
    included); groups smaller than ``min_cells`` keep ``fallback`` (default: their own values).
    ``only`` (bool per cell): compute it for these cells alone, the others keep ``fallback``.
    Neighbours come from a seeded sample of each group: ``sample_rate`` of its cells, never
    more than ``MAX_TREE_CELLS`` (a denser tree costs more per query and changes no median much);
    in a sampled group they are ``SAMPLED_EPS``-approximate (cKDTree's ``eps``: each within
    ``1 + eps`` of the true k-th distance), an unsampled group's are exact."""
    out = (values if fallback is None else fallback).astype(np.float64).copy()
    rng = np.random.default_rng(seed)
    for g in np.unique(groups if only is None else groups[only]):
        members = np.flatnonzero(groups == g)
        if members.size < min_cells:
            continue
        size = min(MAX_TREE_CELLS, max(min_cells, int(np.ceil(sample_rate * members.size))))
        sampled = members.size > size
        pool = np.sort(rng.choice(members, size, replace=False)) if sampled else members
        eps = SAMPLED_EPS if sampled else 0.0
        kk = min(k, pool.size)
        tree = cKDTree(latent[pool])
        asked = members if only is None else members[only[members]]
        walk = asked[spatial_order(latent[asked])]  # neighbouring queries walk the same nodes
        for start in range(0, walk.size, 65536):
            rows = walk[start:start + 65536]
            _, idx = tree.query(latent[rows], kk, workers=workers, eps=eps)
            out[rows] = np.median(values[pool][idx.reshape(rows.size, kk)], axis=1)
    return out
