"""Normalisations that produce a weight's input, and their constant per-channel gain.

Two readers ask this module about the node producing a MatMul's activation ``x``:

- AWQ's fold (:mod:`.awq_fold`) divides ``x`` by a per-channel scale by rewriting the norm's
  per-channel constants (``NORMS``: which inputs those are);
- the calibration-free searches (rtn-clip, hqq) read the norm's gain ``g`` (:func:`input_gain`):
  ``x_k = g_k * xhat_k``, so ``E[x_k^2] = g_k^2 E[xhat_k^2]`` and the gain is the one piece of the
  input's channel energy that the weights alone reveal.

Matched: ``LayerNormalization``, ``RMSNormalization``, ``SimplifiedLayerNormalization`` (scale,
input 1), com.microsoft ``SkipSimplifiedLayerNormalization`` / ``SkipLayerNormalization``
(``gamma``, input 2), each through its normalised output 0 only; and ``Mul`` by a constant
vector along the last axis (the RMSNorm of torch's dynamo export, ``Mul(weight, Mul(x,
rsqrt(mean(x^2) + eps)))``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ._weights import const_tensor

# (domain, op) -> the inputs holding per-channel constants; the first one is the gain
NORMS: dict[tuple[str, str], tuple[int, ...]] = {
    ("", "LayerNormalization"): (1, 2), ("", "RMSNormalization"): (1,),
    ("com.microsoft", "SimplifiedLayerNormalization"): (1,), ("", "SimplifiedLayerNormalization"): (1,),
    ("com.microsoft", "SkipSimplifiedLayerNormalization"): (2,),
    ("com.microsoft", "SkipLayerNormalization"): (2, 3),
}


def domain_of(node: ir.Node) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


def _vector(value: ir.Value | None, k: int) -> np.ndarray | None:
    tensor, _ = const_tensor(value)
    if tensor is None:
        return None
    dims = [int(d) for d in tensor.shape]
    if not dims or dims[-1] != k or any(d != 1 for d in dims[:-1]):
        return None
    return np.asarray(tensor.numpy(), dtype=np.float64).reshape(k)


def input_gain(x: ir.Value | None, k: int) -> np.ndarray | None:
    """``|g|`` float64 ``[k]``: the constant per-channel gain applied last to ``x``, or ``None``.

    ``x`` must be a matched norm's output 0 (or the Mul's output) and the gain a constant of
    ``k`` values; anything else (a graph input, an attention output, a gain that is computed)
    gives ``None``.
    """
    node = x.producer() if x is not None else None
    if node is None:
        return None
    key = (domain_of(node), node.op_type)
    if key in NORMS:
        idx = NORMS[key][0]
        if node.outputs[0] is not x or idx >= len(node.inputs):
            return None
        g = _vector(node.inputs[idx], k)
    elif key == ("", "Mul"):
        g = next((v for v in (_vector(node.inputs[i], k) for i in (1, 0)) if v is not None), None)
    else:
        return None
    return None if g is None or not np.isfinite(g).all() else np.abs(g)
