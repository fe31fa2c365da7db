"""Independent numpy oracles: quantization and the dequantization of what a quantized model holds.

Written from the documented semantics (``quant_tensor``'s docstring, ``../shared/notes/onnx-facts.md``
and the op schemas), sharing no code with ``ort_wq``: a bug shared by the library's quantizer,
packers and transforms cannot also hide here.

- :func:`quantize_groups`: ``quant_tensor``'s numbers, group by group.
- :func:`onnxruntime_groups`: onnxruntime's (MLAS's) round-to-nearest rule, what ``rtn`` stores.
- :func:`dequantized_model`: a copy of a quantized model in which every ``MatMulNBits``,
  ``MatMulFpQ4``, ``GatherBlockQuantized`` and constant ``DequantizeLinear`` is replaced by plain
  ``MatMul`` / ``Gather`` / initializers holding the weight this module unpacks from the bytes.
  Running both in onnxruntime and comparing checks that the bytes mean what we think.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# ---------------------------------------------------------------------------------------------
# quantization (quant_tensor's documented semantics)


def quantize_groups(data, bits: int, group: int, scheme: str, dtype: str, ratio: float = 1.0):
    """``(q, scale, zero_point)`` per group of ``group`` consecutive values, as ``quant_tensor`` documents.

    Unsigned range ``[0, 2^b-1]`` for asym or uint, signed ``[-2^(b-1), 2^(b-1)-1]`` for sym int;
    sym scale ``2 max|r| / (maxq - minq)``, asym ``(rmax - rmin) / (maxq - minq)``; scale 1 for a
    zero range; asym zero point ``round(-rmin / scale)`` (clipped to ``[0, maxq]`` for uint);
    sym zero point 0 (int) or ``2^(b-1)`` (uint); ``q = clip(round(x / scale + zp))``.
    """
    x = np.asarray(data, dtype=np.float64).reshape(-1, group)
    if scheme == "asym" or dtype == "uint":
        minq, maxq = 0, 2**bits - 1
    else:
        minq, maxq = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    rmin = x.min(axis=1, keepdims=True) * ratio
    rmax = x.max(axis=1, keepdims=True) * ratio
    if scheme == "sym":
        amax = np.maximum(np.abs(rmin), np.abs(rmax))
        scale = np.where(amax > 0, 2 * amax / (maxq - minq), 1.0)
        zp = np.zeros_like(scale) if dtype == "int" else np.full_like(scale, 2 ** (bits - 1))
    else:
        scale = np.where(rmax != rmin, (rmax - rmin) / (maxq - minq), 1.0)
        zp = np.round(-rmin / scale)
        if dtype == "uint":
            zp = np.clip(zp, 0, maxq)
    q = np.clip(np.round(x / scale + zp), minq, maxq)
    return q, scale, zp


def onnxruntime_groups(data, bits: int, group: int, sym: bool):
    """``(q, scale, zero_point)`` per group as onnxruntime's blockwise quantizer computes them (float32).

    Symmetric: ``scale = e / -2^(b-1)``, ``e`` the group's value of largest magnitude (the
    minimum on a tie), zero point ``2^(b-1)``. Asymmetric: range widened to include 0,
    ``scale = (max - min) / (2^b - 1)``, zero point ``round(-min / scale)``. A zero scale gives
    code ``zp``. ``q = clip(round(x * (1 / scale) + zp), 0, 2^b - 1)``, halves rounded up.
    """
    x = np.asarray(data, dtype=np.float32).reshape(-1, group)
    maxq, mid = 2**bits - 1, 2 ** (bits - 1)
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    if sym:
        scale = np.where(np.abs(hi) > np.abs(lo), hi, lo) / np.float32(-mid)
        zp = np.full_like(scale, mid)
    else:
        lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
        scale = (hi - lo) / np.float32(maxq)
        zp = np.clip(np.floor(np.where(scale != 0, -lo / np.where(scale != 0, scale, 1), 0) + np.float32(0.5)), 0, maxq)
    inv = np.where(scale != 0, np.float32(1) / np.where(scale != 0, scale, 1), 0).astype(np.float32)
    q = np.clip(np.floor(x * inv + zp + np.float32(0.5)), 0, maxq)
    return q.astype(np.float64), scale.astype(np.float64), zp.astype(np.float64)


# ---------------------------------------------------------------------------------------------
# unpacking


def unpack_lsb_first(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Codes packed along the last axis, lowest bits first; the first ``count`` of them (int64)."""
    packed = np.asarray(packed, dtype=np.uint8).astype(np.int64)
    if bits == 8:
        return packed[..., :count]
    per = 8 // bits
    parts = [(packed >> (bits * j)) & (2**bits - 1) for j in range(per)]
    codes = np.stack(parts, axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * per)
    return codes[..., :count]


def dequant_nbits(b, scales, zero_points, k: int, n: int, bits: int, block_size: int) -> np.ndarray:
    """``W[K, N]`` (float64) of a MatMulNBits node: ``(q[n, k] - zp[n, k // bs]) * scale[n, k // bs]``."""
    kb = -(-k // block_size)
    q = unpack_lsb_first(np.asarray(b).reshape(n, kb, -1), bits, block_size).reshape(n, kb * block_size)
    s = np.asarray(scales, dtype=np.float64).reshape(n, kb)
    if zero_points is None:
        zp = np.full((n, kb), 2 ** (bits - 1), dtype=np.float64)
    elif np.asarray(zero_points).dtype == np.uint8:
        zp = unpack_lsb_first(np.asarray(zero_points).reshape(n, -1), bits, kb).astype(np.float64)
    else:
        zp = np.asarray(zero_points, dtype=np.float64).reshape(n, kb)
    w = (q - np.repeat(zp, block_size, axis=1)) * np.repeat(s, block_size, axis=1)
    return w[:, :k].T


def dequant_fpq4(blob, b_shape, blk_quant_type: int) -> np.ndarray:
    """``W[K, N]`` of a MatMulFpQ4 node: per column, per block of 32, fp32 scale (+ uint8 zp) + 16 bytes."""
    k, n = (int(v) for v in np.asarray(b_shape).reshape(-1))
    kb = -(-k // 32)
    rec = 20 if blk_quant_type == 0 else 21
    raw = np.asarray(blob, dtype=np.uint8).reshape(n, kb, rec)
    scale = raw[..., :4].copy().view("<f4")[..., 0].astype(np.float64)
    zp = np.full((n, kb), 8.0) if rec == 20 else raw[..., 4].astype(np.float64)
    data = raw[..., rec - 16:].astype(np.int64)
    q = np.concatenate([data & 15, data >> 4], axis=-1)  # byte[l] = q[l] | q[l + 16] << 4
    w = (q - zp[..., None]) * scale[..., None]
    return w.reshape(n, kb * 32)[:, :k].T


def _expand_blocks(values: np.ndarray, axis: int, block: int, size: int) -> np.ndarray:
    return np.take(np.repeat(values, block, axis=axis), np.arange(size), axis=axis)


def dequant_linear(x, scale, zero_point, axis: int, block_size: int) -> np.ndarray:
    """DequantizeLinear (per tensor, per axis or blocked) in float64."""
    x = np.asarray(x).astype(np.float64)
    s = np.asarray(scale, dtype=np.float64)
    zp = np.zeros_like(s) if zero_point is None else np.asarray(zero_point).astype(np.float64)
    axis = axis % max(x.ndim, 1)
    if s.ndim == 0 or s.size == 1:
        return (x - zp.reshape(())) * s.reshape(())
    if block_size:
        s, zp = (_expand_blocks(a, axis, block_size, x.shape[axis]) for a in (s, zp))
    else:
        shape = [1] * x.ndim
        shape[axis] = -1
        s, zp = s.reshape(shape), zp.reshape(shape)
    return (x - zp) * s


def dequant_gather_table(data, scales, zero_points, bits: int, block_size: int, quantize_axis: int) -> np.ndarray:
    """The float table a GatherBlockQuantized node gathers from (float64)."""
    data = np.asarray(data)
    packed = data.dtype == np.uint8 and bits < 8
    codes = unpack_lsb_first(data, bits, data.shape[-1] * 8 // bits) if packed else data.astype(np.int64)
    s = np.asarray(scales, dtype=np.float64)
    axis = quantize_axis % codes.ndim
    if zero_points is None:
        zp = np.full(s.shape, 2 ** (bits - 1) if data.dtype == np.uint8 else 0, dtype=np.float64)
    else:
        z = np.asarray(zero_points)
        z = unpack_lsb_first(z, bits, z.shape[-1] * 8 // bits) if packed else z.astype(np.int64)
        zp = z[tuple(slice(0, d) for d in s.shape)].astype(np.float64)
    s, zp = (_expand_blocks(a, axis, block_size, codes.shape[axis]) for a in (s, zp))
    return (codes - zp) * s


# ---------------------------------------------------------------------------------------------
# the dequantized model


class _Scope:
    """Constant values visible in one graph: initializers, Constant nodes, folded Reshape/Slice/Cast."""

    def __init__(self, graph: onnx.GraphProto, parent: _Scope | None = None) -> None:
        self.parent = parent
        self.values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        self.producers = {o: nd for nd in graph.node for o in nd.output}

    def get(self, name: str):
        if not name:
            return None
        if name in self.values:
            return self.values[name]
        node = self.producers.get(name)
        if node is not None:
            value = self._fold(node)
            if value is not None:
                self.values[name] = value
            return value
        return self.parent.get(name) if self.parent else None

    def _fold(self, node: onnx.NodeProto):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Constant":
            if "value" in attrs:
                return numpy_helper.to_array(attrs["value"])
            for key, dtype in (("value_ints", np.int64), ("value_int", np.int64), ("value_floats", np.float32),
                               ("value_float", np.float32)):
                if key in attrs:
                    return np.array(attrs[key], dtype=dtype)
            return None
        ins = [self.get(i) for i in node.input]
        if any(v is None for i, v in zip(node.input, ins) if i):
            return None
        if node.op_type == "Reshape":
            shape = [d if d != 0 else ins[0].shape[i] for i, d in enumerate(ins[1].tolist())]
            return ins[0].reshape(shape)
        if node.op_type == "Slice":
            x, starts, ends = ins[0], ins[1], ins[2]
            axes = ins[3] if len(ins) > 3 and ins[3] is not None else range(len(starts))
            steps = ins[4] if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
            idx = [slice(None)] * x.ndim
            for a, b, e, st in zip(axes, starts, ends, steps):
                idx[int(a)] = slice(int(b), int(min(e, 2**62)), int(st))
            return x[tuple(idx)]
        if node.op_type == "Transpose":
            return np.transpose(ins[0], attrs.get("perm"))
        return None


def _np_dtype(elem: int):
    return helper.tensor_dtype_to_np_dtype(elem)


def _const(name: str, value: np.ndarray, elem: int) -> onnx.TensorProto:
    t = numpy_helper.from_array(np.asarray(value, dtype=np.float64).astype(np.float32), name)
    if elem == TensorProto.FLOAT:
        return t
    if elem == TensorProto.BFLOAT16:
        return helper.make_tensor(name, elem, value.shape, np.asarray(value, np.float32).reshape(-1).tolist())
    return numpy_helper.from_array(np.asarray(value).astype(_np_dtype(elem)), name)


def _elem_of(scope: _Scope, graph_init: dict, name: str) -> int:
    t = graph_init.get(name)
    if t is not None:
        return t.data_type
    return helper.np_dtype_to_tensor_dtype(np.asarray(scope.get(name)).dtype)


def _rewrite_graph(graph: onnx.GraphProto, parent: _Scope | None, counts: dict) -> None:
    scope = _Scope(graph, parent)
    inits = {i.name: i for i in graph.initializer}
    out_nodes, new_inits = [], []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        for a in node.attribute:  # subgraphs first (they see this graph's constants)
            if a.type == onnx.AttributeProto.GRAPH:
                _rewrite_graph(a.g, scope, counts)
        name = f"oracle_w{len(counts['all'])}"
        if node.domain == "com.microsoft" and node.op_type == "MatMulNBits":
            ins = list(node.input) + [""] * (6 - len(node.input))
            w = dequant_nbits(scope.get(ins[1]), scope.get(ins[2]), scope.get(ins[3]),
                              attrs["K"], attrs["N"], attrs.get("bits", 4), attrs["block_size"])
            elem = _elem_of(scope, inits, ins[2])
            new_inits.append(_const(name, w, elem))
            if ins[5]:
                mid = name + "_mm"
                out_nodes += [helper.make_node("MatMul", [ins[0], name], [mid]),
                              helper.make_node("Add", [mid, ins[5]], list(node.output))]
            else:
                out_nodes.append(helper.make_node("MatMul", [ins[0], name], list(node.output)))
        elif node.domain == "com.microsoft" and node.op_type == "MatMulFpQ4":
            w = dequant_fpq4(scope.get(node.input[1]), scope.get(node.input[2]), attrs.get("blk_quant_type", 1))
            new_inits.append(_const(name, w, TensorProto.FLOAT))
            out_nodes.append(helper.make_node("MatMul", [node.input[0], name], list(node.output)))
        elif node.domain == "com.microsoft" and node.op_type == "GatherBlockQuantized":
            ins = list(node.input) + [""] * (4 - len(node.input))
            table = dequant_gather_table(scope.get(ins[0]), scope.get(ins[2]), scope.get(ins[3]), attrs.get("bits", 4),
                                         attrs.get("block_size", 128), attrs.get("quantize_axis", 1))
            new_inits.append(_const(name, table, _elem_of(scope, inits, ins[2])))
            out_nodes.append(helper.make_node("Gather", [name, ins[1]], list(node.output),
                                              axis=attrs.get("gather_axis", 0)))
        elif node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx") and scope.get(node.input[0]) is not None:
            ins = list(node.input) + [""] * (3 - len(node.input))
            w = dequant_linear(scope.get(ins[0]), scope.get(ins[1]), scope.get(ins[2]),
                               attrs.get("axis", 1), attrs.get("block_size", 0))
            new_inits.append(_const(node.output[0], w, _elem_of(scope, inits, ins[1])))
        else:
            out_nodes.append(node)
            continue
        counts["all"].append(node.op_type)
    del graph.node[:]
    graph.node.extend(out_nodes)
    graph.initializer.extend(new_inits)


def dequantized_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """``(copy with every quantized node replaced by float ops, op types replaced)``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    counts: dict = {"all": []}
    _rewrite_graph(out.graph, None, counts)
    _drop_unused(out.graph)
    return out, counts["all"]


def _used_names(graph: onnx.GraphProto) -> set[str]:
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                used |= _used_names(a.g)
    return used


def _drop_unused(graph: onnx.GraphProto) -> None:
    used = _used_names(graph)
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _drop_unused(a.g)
