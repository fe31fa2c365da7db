"""Per-element importance of a weight's reconstruction errors: what the searches minimise.

A weight error ``e[k, n]`` costs ``E[x_k^2] e^2`` in the output (cross terms aside), so with
calibration statistics the natural weight is the input channel's energy ``diag(X^T X) / rows``.
Anchored on llama.cpp's k-quants: with an importance matrix, ``quant_weights[k] *
sqrt(sigma2 + w^2)`` (``sigma2`` the mean square of the row's weights), and without one a
magnitude weight (``sigma2 + w^2``): large weights -- the ones that make an output head's top
logits -- keep their values, the small majority absorbs the rounding.

Each builder returns ``fn(x_chunk, c0, c1) -> weights`` for the group view ``x[N, kb, bs]``
(see :func:`._common.search_clip`); the result broadcasts to the chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .base import LayerStats

Weights = Callable[[np.ndarray, int, int], np.ndarray]

OBJECTIVES = ("mse", "magnitude")


def magnitude(x: np.ndarray, c0: int = 0, c1: int = 0) -> np.ndarray:
    """No calibration: ``sigma2 + w^2`` relative to the column's ``sigma2`` (``1 + w^2 / sigma2``).

    ``sigma2`` is the mean square of each output column's weights (padding zeros count); the
    squares are taken of ``w / max|w|`` so weights near the float32 maximum do not overflow.
    """
    amax = np.max(np.abs(x), axis=(1, 2), keepdims=True)
    y = x / np.where(amax > 0, amax, np.float32(1.0))
    np.square(y, out=y)
    s2 = np.mean(y, axis=(1, 2), keepdims=True)
    y /= np.where(s2 > 0, s2, np.float32(1.0))
    y += np.float32(1.0)
    return y


def channel_energy(stats: LayerStats, k: int, bs: int) -> np.ndarray:
    """``E[x_k^2]`` per input channel as float32 ``[kb, bs]`` (padding 0), normalised to mean 1."""
    kb = -(-k // bs)
    e = np.zeros(kb * bs, dtype=np.float64)
    if stats.rows:
        e[:k] = np.maximum(stats.energy, 0.0)
    mean = e[:k].mean() if k else 0.0
    e = e / mean if mean > 0 else np.where(np.arange(kb * bs) < k, 1.0, 0.0)
    return e.astype(np.float32).reshape(kb, bs)


def activation_weighted(stats: LayerStats, k: int, bs: int, floor: float = 1e-3) -> Weights:
    """With calibration: ``E[x_k^2] * sqrt(1 + w^2 / sigma2)`` (llama.cpp's imatrix weighting).

    ``floor`` (relative to the mean energy) keeps channels the calibration never excited from
    being ignored completely.
    """
    energy = np.maximum(channel_energy(stats, k, bs), np.float32(floor))

    def fn(x: np.ndarray, c0: int, c1: int) -> np.ndarray:
        m = magnitude(x)
        np.sqrt(m, out=m)
        m *= energy
        return m

    return fn


HEAD_NOTE = "output-head shape (N >= 8192, N >= 6 K): rtn's range kept (no calibration statistics)"


def looks_like_output_head(k: int, n: int) -> bool:
    """A vocabulary projection: many more outputs than inputs (``N >= 8192`` and ``N >= 6 K``).

    Without activation statistics no weight-space error predicts an output head's logit error:
    on SmolLM2-135M (block 128 sym, perplexity, fp32 28.35), the magnitude-weighted clip search
    gains on the 30 layers' weights (35.70 vs rtn's 37.03, head left fp32) but loses on the head
    (36.47 vs 35.99, only the head quantized). So the calibration-free searches keep rtn's range
    on such weights (MLP projections have ``N / K`` of 2.5-5.5).
    """
    return n >= 8192 and n >= 6 * k


def objective_weights(objective: str) -> Weights | None:
    """The calibration-free weighting named ``objective`` (``"mse"``: none)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is not known; use one of {OBJECTIVES}")
    return None if objective == "mse" else magnitude
