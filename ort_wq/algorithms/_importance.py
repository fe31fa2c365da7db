"""Per-element importance of a weight's reconstruction errors: what the searches minimise.

A weight error ``e[k, n]`` costs ``E[x_k^2] e^2`` in the output (cross terms aside), so with
calibration statistics the natural weight is the input channel's energy ``diag(X^T X) / rows``.
Anchored on llama.cpp's k-quants: with an importance matrix, ``quant_weights[k] *
sqrt(sigma2 + w^2)`` (``sigma2`` the mean square of the row's weights), and without one a
magnitude weight (``sigma2 + w^2``): large weights -- the ones that make an output head's top
logits -- keep their values, the small majority absorbs the rounding.

Each builder returns ``fn(x_chunk, c0, c1) -> weights`` for the group view ``x[N, kb, bs]``
(see :func:`._search.search_clip`); the result broadcasts to the chunk.
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


def _per_block(e: np.ndarray, k: int, bs: int) -> np.ndarray:
    """Per-channel energies ``e[:k]`` (float64, zero-padded to ``kb * bs``) as float32 ``[kb, bs]``
    normalised to mean 1 over the ``k`` channels (all 1 if they sum to 0), padding 0."""
    kb = -(-k // bs)
    mean = e[:k].mean() if k else 0.0
    e = e / mean if mean > 0 else np.where(np.arange(kb * bs) < k, 1.0, 0.0)
    return e.astype(np.float32).reshape(kb, bs)


def _padded(k: int, bs: int) -> np.ndarray:
    return np.zeros(-(-k // bs) * bs, dtype=np.float64)


def channel_energy(stats: LayerStats, k: int, bs: int) -> np.ndarray:
    """``E[x_k^2]`` per input channel as float32 ``[kb, bs]`` (padding 0), normalised to mean 1."""
    e = _padded(k, bs)
    if stats.rows:
        e[:k] = np.maximum(stats.energy, 0.0)
    return _per_block(e, k, bs)


def energy_weighted(energy: np.ndarray) -> Weights:
    """``energy[kb, bs] * sqrt(1 + w^2 / sigma2)``: per-channel input energy times llama.cpp's magnitude term."""

    def fn(x: np.ndarray, c0: int, c1: int) -> np.ndarray:
        m = magnitude(x)
        np.sqrt(m, out=m)
        m *= energy
        return m

    return fn


def activation_weighted(stats: LayerStats, k: int, bs: int, floor: float = 1e-3) -> Weights:
    """With calibration: ``E[x_k^2] * sqrt(1 + w^2 / sigma2)`` (llama.cpp's imatrix weighting).

    ``floor`` (relative to the mean energy) keeps channels the calibration never excited from
    being ignored completely.
    """
    return energy_weighted(np.maximum(channel_energy(stats, k, bs), np.float32(floor)))


HEAD_NOTE = ("output-head shape (N >= 8192, N >= 6 K): weighted by the vocabulary's own channel energy "
             "(no calibration statistics)")
GAIN_NOTE = ("output-head shape (N >= 8192, N >= 6 K): weighted by the vocabulary's channel energy "
             "plus its input norm's gain^4 (no calibration statistics)")
GAIN_POWER = 4.0


def looks_like_output_head(k: int, n: int) -> bool:
    """A vocabulary projection: many more outputs than inputs (``N >= 8192`` and ``N >= 6 K``).

    MLP projections have ``N / K`` of 2.5-5.5. Without activation statistics such a weight is
    searched with :func:`vocabulary_energy` as its input energy (see there); any other
    weight-space error loses to rtn on a head (SmolLM2-135M, block 128 sym, only the head
    quantized, perplexity / KL vs fp32 28.36: rtn 35.99 / 0.236, the magnitude-weighted clip
    search 36.47 / 0.246, the same weighting on imatrix's candidates 36.56 / 0.267).
    """
    return n >= 8192 and n >= 6 * k


def vocabulary_energy(w: np.ndarray, bs: int) -> np.ndarray:
    """An output head's input-energy proxy from its own weight: ``mean_n W[k, n]^2`` as ``[kb, bs]``.

    The head scores the final hidden state ``h`` against every token's column, ``logit_n = h .
    W[:, n]``; a well-predicted token has ``h`` aligned with its column, so over the tokens the
    hidden state's energy per channel follows the columns' (``E[h_k^2] ~ sum_n p_n W[k, n]^2``,
    here with a uniform ``p``). On SmolLM2-135M's head (K = 576) the real ``E[h_k^2]`` spans
    0.1-140x its mean (correlation of the logarithms with this proxy: 0.43); weighting by the
    proxy gives, head only quantized at block 128 sym, perplexity 34.96 and KL 0.178 vs rtn's
    35.99 and 0.236 (the measured energy: 31.32 / 0.107). Normalised to mean 1, padding 0,
    accumulated in float64 a few rows at a time (no float64 copy of the weight).
    """
    k, n = w.shape
    e = _padded(k, bs)
    step = max(1, (1 << 20) // max(1, n))
    for r0 in range(0, k, step):
        rows = np.asarray(w[r0 : r0 + step], dtype=np.float64)
        e[r0 : r0 + rows.shape[0]] = np.einsum("kn,kn->k", rows, rows) / max(1, n)
    return _per_block(e, k, bs)


def gain_energy(gain: np.ndarray, k: int, bs: int, power: float = GAIN_POWER, floor: float = 1e-3) -> np.ndarray:
    """An output head's second input-energy proxy, from the gain of the norm before it: ``|g_k|^power``.

    ``h_k = g_k * xhat_k`` (the final norm), so ``E[h_k^2] = g_k^2 E[xhat_k^2]``; on a trained LLM
    the normalised residual ``xhat`` is itself larger where the gain is: on SmolLM2-135M's final
    norm the measured ``log E[h_k^2]`` follows ``2.43 log g_k^2`` (correlation 0.60; the
    vocabulary proxy's 0.42), hence ``power`` 4. On smollm2-2l (the same weights cut to 2 layers,
    so the final norm was trained for another residual stream) the gain says nothing (correlation
    -0.01; the vocabulary proxy's 0.15). The two proxies are uncorrelated with each other on both
    (-0.01), so the head search takes their mean (a channel counts if either marks it) and keeps
    a group's result only where it is no worse than rtn's under each (:mod:`.rtn_clip`).

    Measured, rtn-clip with the head weighted as listed: SmolLM2-135M every MatMul 4-bit
    (perplexity on 8 x 256 dev tokens, fp32 28.36) and smollm2-2l (KL of rows 4-7, block 128 sym):

    | head weighted by | b128 sym | b128 asym | b32 sym | 2-layer KL |
    | --- | --- | --- | --- | --- |
    | (rtn) | 48.39 | 40.25 | 37.91 | 0.154 |
    | vocabulary energy | 45.84 | 42.42 | 36.54 | 0.150 |
    | ``g^2`` | 43.69 | 40.47 | 35.97 | |
    | ``g^4`` | 42.85 | 39.76 | 35.95 | 0.244 |
    | ``g^2`` x vocabulary energy | 46.24 | | | |
    | mean of vocabulary energy and ``g^4`` | 45.56 | 41.85 | 36.01 | 0.136 |
    | the mean, guarded by each (rtn-clip's rule) | 45.53 | 40.39 | 35.96 | 0.139 |

    Normalised to mean 1 over the ``k`` channels, floored at ``floor``, padding 0, ``[kb, bs]``.
    """
    e = _padded(k, bs)
    g = np.abs(np.asarray(gain, dtype=np.float64).reshape(k))
    gmax = g.max() if k else 0.0
    if gmax > 0:
        e[:k] = (g / gmax) ** power  # relative to the largest: no overflow
    out = _per_block(e, k, bs)
    flat = out.reshape(-1)
    flat[:k] = np.maximum(flat[:k], np.float32(floor))
    return out


def objective_weights(objective: str) -> Weights | None:
    """The calibration-free weighting named ``objective`` (``"mse"``: none)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is not known; use one of {OBJECTIVES}")
    return None if objective == "mse" else magnitude
