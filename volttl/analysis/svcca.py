"""SVCCA (Raghu et al., 2017): how much of a layer's features survive finetuning.

For two feature matrices ``X`` (n points x d1) and ``Y`` (n x d2) of the same inputs:
centre each feature, keep the top singular directions that explain ``keep`` (99%) of
the variance of each (the PCA step that drops noise), then CCA between the two reduced
sets: the canonical correlations are the singular values of ``Qx^T Qy`` for orthonormal
bases ``Qx``, ``Qy`` of the reduced sets. They lie in [0, 1]; 1 means a direction the
two share exactly (up to any invertible linear map).

For a convolutional feature map ``(N, C, D, H, W)`` the points are the N x D x H x W
positions and the features are the C channels (the convention of the SVCCA paper for
conv layers), subsampled to at most ``max_points`` positions.

CCA coefficients of two *independent* sets are far from 0 when d is not small against n,
so the TTL paper (Appendix C.1) compares against the coefficients of two independent
random feature sets of the same shape; where the two distributions overlap, feature
reuse has stopped. The overlap measure used here is the overlapping coefficient of the
two histograms on [0, 1] (``sum(min(p, q))`` over ``bins`` bins): 1 for identical
distributions, 0 for disjoint ones.
"""

from __future__ import annotations

import numpy as np


def _reduce(x: np.ndarray, keep: float) -> np.ndarray:
    """Centred ``x`` projected on its top singular directions holding ``keep`` of the variance."""
    x = x - x.mean(axis=0, keepdims=True)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    energy = np.cumsum(s ** 2)
    if energy[-1] <= 0:
        return x[:, :0]
    k = int(np.searchsorted(energy / energy[-1], keep) + 1)
    return u[:, :k] * s[:k]


def cca_coefficients(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Canonical correlations of two centred sets ``(n, d1)`` and ``(n, d2)``, descending."""
    if x.shape[1] == 0 or y.shape[1] == 0:
        return np.zeros(0)
    qx, _ = np.linalg.qr(x - x.mean(axis=0))
    qy, _ = np.linalg.qr(y - y.mean(axis=0))
    return np.clip(np.linalg.svd(qx.T @ qy, compute_uv=False), 0.0, 1.0)


def svcca(x: np.ndarray, y: np.ndarray, keep: float = 0.99, return_dims: bool = False):
    """SVCCA coefficients (descending) between ``x`` and ``y``, both ``(points, features)``;
    with ``return_dims`` also the numbers of directions the PCA step kept of each."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"SVCCA needs the same points: {x.shape[0]} vs {y.shape[0]}")
    rx = _reduce(np.asarray(x, dtype=np.float64), keep)
    ry = _reduce(np.asarray(y, dtype=np.float64), keep)
    coefficients = cca_coefficients(rx, ry)
    return (coefficients, (rx.shape[1], ry.shape[1])) if return_dims else coefficients


def feature_points(feature_map: np.ndarray, index: np.ndarray | None = None) -> np.ndarray:
    """``(N, C, ...)`` to ``(positions, C)``, optionally keeping only ``index`` positions."""
    points = np.moveaxis(feature_map.reshape(feature_map.shape[0], feature_map.shape[1], -1), 1, 2)
    points = points.reshape(-1, feature_map.shape[1])
    return points if index is None else points[index]


def random_baseline(points: int, dims: tuple[int, int], keep: float = 0.99, seed: int = 0) -> np.ndarray:
    """SVCCA coefficients of two independent Gaussian sets of the given shapes (pass the
    dimensions the PCA step kept of the real features, and ``keep=1.0``, to compare like
    with like: the baseline depends on dimensions over points)."""
    rng = np.random.default_rng(seed)
    return svcca(rng.standard_normal((points, dims[0])), rng.standard_normal((points, dims[1])), keep)


def overlap(a: np.ndarray, b: np.ndarray, bins: int = 20) -> float:
    """Overlapping coefficient of two distributions on [0, 1] (histograms, ``bins`` bins)."""
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    edges = np.linspace(0.0, 1.0, bins + 1)
    p = np.histogram(np.clip(a, 0, 1), edges)[0] / len(a)
    q = np.histogram(np.clip(b, 0, 1), edges)[0] / len(b)
    return float(np.minimum(p, q).sum())


def suggest_cut(names: list[str], overlaps: list[float], threshold: float = 0.5) -> str | None:
    """Appendix C.1, step 4: the first cut point whose coefficients overlap the random
    baseline by at least ``threshold``; None when feature reuse never stops."""
    for name, value in zip(names, overlaps, strict=True):
        if np.isfinite(value) and value >= threshold:
            return name
    return None
