"""Diversity selection: seeded k-means on embeddings, then a selection spread evenly over the clusters.

k-means (Lloyd's algorithm) with k-means++ seeding (Arthur & Vassilvitskii 2007,
https://theory.stanford.edu/~sergei/papers/kMeansPP-soda.pdf) minimizes
``sum_i ||x_i - c_{a(i)}||^2``: assign each point to its nearest centre, move each centre to the
mean of its points, repeat until no assignment changes (or ``max_iterations``).

Selection takes rows cluster by cluster in rounds (round-robin), each cluster giving its rows
nearest the centre first, until ``count`` rows are chosen: small clusters (rare topics) keep all
their rows, large ones (over-represented topics) are thinned. Selected rows keep dataset order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Clustering:
    labels: np.ndarray      # cluster of each point
    centres: np.ndarray     # k x d
    distances: np.ndarray   # each point's squared distance to its centre


def kmeans(points: np.ndarray, k: int, seed: int, max_iterations: int = 50) -> Clustering:
    """Seeded k-means++ / Lloyd on ``points`` (n x d, float); ``k`` is capped at the number of points."""
    points = np.asarray(points, dtype=np.float64)
    k = max(1, min(k, len(points)))
    rng = np.random.default_rng(seed)
    centres = _kmeans_plus_plus(points, k, rng)
    labels = np.full(len(points), -1)
    for _ in range(max_iterations):
        distances = _squared_distances(points, centres)
        new_labels = distances.argmin(axis=1)
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
        for cluster in range(k):
            members = points[labels == cluster]
            if len(members):  # an emptied cluster keeps its centre
                centres[cluster] = members.mean(axis=0)
    distances = _squared_distances(points, centres)
    labels = distances.argmin(axis=1)
    return Clustering(labels, centres, distances[np.arange(len(points)), labels])


def _squared_distances(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    squared = (points ** 2).sum(1)[:, None] - 2 * points @ centres.T + (centres ** 2).sum(1)[None, :]
    return np.maximum(squared, 0.0)


def _kmeans_plus_plus(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """First centre uniform, each next one drawn with probability proportional to D(x)^2."""
    centres = [points[rng.integers(len(points))]]
    nearest = _squared_distances(points, np.array(centres))[:, 0]
    for _ in range(1, k):
        total = nearest.sum()
        index = rng.choice(len(points), p=nearest / total) if total > 0 else rng.integers(len(points))
        centres.append(points[index])
        nearest = np.minimum(nearest, _squared_distances(points, points[index][None, :])[:, 0])
    return np.array(centres)


def spread_selection(clustering: Clustering, count: int) -> np.ndarray:
    """Indices of up to ``count`` points taken round-robin over clusters, nearest-to-centre first; sorted."""
    queues = []
    for cluster in np.unique(clustering.labels):
        members = np.flatnonzero(clustering.labels == cluster)
        # stable: equally distant members keep dataset order
        queues.append(members[np.argsort(clustering.distances[members], kind="stable")].tolist())
    chosen: list[int] = []
    depth = 0
    while len(chosen) < count and any(depth < len(q) for q in queues):
        for queue in queues:
            if depth < len(queue) and len(chosen) < count:
                chosen.append(queue[depth])
        depth += 1
    return np.sort(np.array(chosen, dtype=np.int64))


def diverse_subset(embeddings: np.ndarray, count: int, clusters: int, seed: int) -> tuple[np.ndarray, Clustering]:
    """Indices of ``count`` rows spread over ``clusters`` k-means clusters of their embeddings."""
    clustering = kmeans(embeddings, clusters, seed)
    return spread_selection(clustering, count), clustering
