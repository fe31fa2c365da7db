"""Round-to-nearest: the quantize utilities applied block by block, in parallel column chunks.

The result is exactly ``quant_tensor(pad_tensor(W).T, bits, block, "sym"|"asym", "uint")``:
groups are independent, so quantizing column chunks on several threads changes no bit.
"""

from __future__ import annotations

import numpy as np

from ..utility import pad_tensor, quant_tensor
from .base import LayerStats, QuantizedWeight, QuantSpec, register

# columns per chunk: bounds the float64 temporaries to a few tens of MB per thread
_CHUNK_VALUES = 1 << 21


def rtn_reference(w: np.ndarray, spec: QuantSpec) -> QuantizedWeight:
    """The reference path: one ``quant_tensor`` call over the whole padded, transposed weight."""
    k, n = w.shape
    bs = spec.block_size
    kb = -(-k // bs)
    q, scale, zp = quant_tensor(pad_tensor(w, bs, kb).T, spec.bits, bs, "sym" if spec.symmetric else "asym", "uint")
    return _result(q, scale, zp, spec, k, n, kb)


def _result(q, scale, zp, spec: QuantSpec, k: int, n: int, kb: int) -> QuantizedWeight:
    bs = spec.block_size
    q8 = q.astype(np.uint8).reshape(n, kb, bs)
    if kb * bs > k:
        q8.reshape(n, -1)[:, k:] = 0
    scale_dtype = np.float16 if scale.dtype == np.float16 else np.float32
    zero_point = None if spec.symmetric else zp.reshape(n, kb).astype(np.uint8)
    return QuantizedWeight(q8, scale.reshape(n, kb).astype(scale_dtype), zero_point, spec.bits, k)


def quantize_columns(w: np.ndarray, spec: QuantSpec, executor=None) -> QuantizedWeight:
    """RTN over column chunks (optionally on an executor); identical to :func:`rtn_reference`."""
    k, n = w.shape
    bs = spec.block_size
    kb = -(-k // bs)
    step = max(1, _CHUNK_VALUES // max(1, kb * bs))
    if n <= step:
        return rtn_reference(w, spec)
    chunks = [(c, min(n, c + step)) for c in range(0, n, step)]

    def one(c0: int, c1: int) -> QuantizedWeight:
        return rtn_reference(np.ascontiguousarray(w[:, c0:c1]), spec)

    parts = list(executor.map(lambda c: one(*c), chunks)) if executor else [one(*c) for c in chunks]
    q = np.concatenate([p.q for p in parts], axis=0)
    scale = np.concatenate([p.scale for p in parts], axis=0)
    zp = None if spec.symmetric else np.concatenate([p.zero_point for p in parts], axis=0)
    return QuantizedWeight(q, scale, zp, spec.bits, k)


@register("rtn")
def rtn(w: np.ndarray, spec: QuantSpec, stats: LayerStats | None = None) -> QuantizedWeight:
    """Round to nearest, min/max range per block (no calibration)."""
    return quantize_columns(w, spec)
