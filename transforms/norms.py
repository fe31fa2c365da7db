"""Normalisations that produce a weight's input, and their constant per-channel gain.

Two readers ask this module about the node producing a MatMul's activation ``x``:

- AWQ's fold (:mod:`.awq_fold`) divides ``x`` by a per-channel scale by rewriting the
  per-channel constants :func:`channel_inputs` names (``NORMS``: which inputs of a norm);
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

from ._weights import const_tensor, domain_of

# (domain, op) -> the inputs holding per-channel constants; the first one is the gain
NORMS: dict[tuple[str, str], tuple[int, ...]] = {
    ("", "LayerNormalization"): (1, 2), ("", "RMSNormalization"): (1,),
    ("com.microsoft", "SimplifiedLayerNormalization"): (1,), ("", "SimplifiedLayerNormalization"): (1,),
    ("com.microsoft", "SkipSimplifiedLayerNormalization"): (2,),
    ("com.microsoft", "SkipLayerNormalization"): (2, 3),
}


def shape_reason(value: ir.Value, tensor: ir.TensorProtocol, k: int) -> str:
    """'' when the constant ``tensor`` behind ``value`` is ``k`` values along the last axis (any
    leading axes of 1), else why not."""
    dims = [int(d) for d in tensor.shape]
    if not dims or dims[-1] != k or any(d != 1 for d in dims[:-1]):
        return f"constant {value.name!r} has shape {dims}, not [{k}]"
    return ""


def channel_inputs(x: ir.Value) -> tuple[ir.Node | None, tuple[int, ...], bool, str]:
    """``(producer, inputs, every, reason)``: the inputs of ``x``'s producer that may hold the
    per-channel constants it applies last. A matched norm: its present ``NORMS`` inputs, all of
    them (``every``), only through output 0; a ``Mul``: operand 1 or 0, the first that is one.
    Any other producer: no inputs and no reason (other readers may know it)."""
    node = x.producer()
    if node is None:
        return None, (), False, "the activation is a graph input"
    key = (domain_of(node), node.op_type)
    if key in NORMS:
        if node.outputs[0] is not x:
            return node, (), True, f"{node.op_type} output {x.name!r} is not its normalised output"
        present = tuple(i for i in NORMS[key] if i < len(node.inputs) and node.inputs[i] is not None)
        return node, present, True, ""
    if key == ("", "Mul"):
        return node, (1, 0), False, ""
    return node, (), False, ""


def input_gain(x: ir.Value | None, k: int) -> np.ndarray | None:
    """``|g|`` float64 ``[k]``: the constant per-channel gain applied last to ``x``, or ``None``.

    ``x`` must be a matched norm's output 0 (or the Mul's output) and the gain a constant of
    ``k`` values; anything else (a graph input, an attention output, a gain that is computed)
    gives ``None``.
    """
    if x is None:
        return None
    node, inputs, every, _ = channel_inputs(x)
    for idx in inputs[:1] if every else inputs:  # a norm's gain is its first per-channel input
        tensor, _ = const_tensor(node.inputs[idx])
        if tensor is not None and not shape_reason(node.inputs[idx], tensor, k):
            g = np.asarray(tensor.numpy(), dtype=np.float64).reshape(k)
            return np.abs(g) if np.isfinite(g).all() else None
    return None
