"""com.microsoft ``GatherBlockQuantized``: embedding rows read from the ``nbits`` storage.

``W.T[ids]`` for a table ``W.T = E[V, K]`` whose codes are packed along K, exactly the MatMulNBits
layout (``B[V, kb, blob]``, ``scales[V, kb]``, zero points ``[V, ceil(kb * bits / 8)]``, packed
per row). ``GatherBlockQuantized(data[V, kb * blob], ids, scales, zero_points)`` with
``quantize_axis=1`` reads the very same scales and zero points, so a tied embedding and head
share every byte: when ``B`` is the 3-D MatMulNBits initializer the Gather reads a ``Reshape``
of it (the layout the onnxruntime-genai builder writes for ``shared_embeddings``). Rows hold whole
blocks; a ``Slice`` cuts them back to K when K is not a multiple of the block.
"""

from __future__ import annotations

import onnx_ir as ir

from ort_wq.algorithms import QuantSpec

OP_TYPE = GATHER_OP_TYPE = "GatherBlockQuantized"


def emit_gather(op, ids, values: dict[str, ir.Value], spec: QuantSpec, k: int, n: int):
    kb = -(-k // spec.block_size)
    data = values["B"]
    if data.shape is not None and len(data.shape) == 3:
        data = op.Reshape(data, op.Constant(value_ints=[n, kb * spec.block_size * spec.bits // 8]))
    inputs = [data, ids, values["scales"]]
    if "zero_points" in values:
        inputs.append(values["zero_points"])
    y = op.GatherBlockQuantized(*inputs, bits=spec.bits, block_size=spec.block_size, gather_axis=0,
                                quantize_axis=1, _domain="com.microsoft")
    if kb * spec.block_size != k:
        y = op.Slice(y, op.Constant(value_ints=[0]), op.Constant(value_ints=[k]), op.Constant(value_ints=[-1]))
    return y
