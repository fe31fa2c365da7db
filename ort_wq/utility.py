"""The weight-only quantization utility API.

Same names, signatures and numerics as Intel Neural Compressor's
``neural_compressor.onnxrt.algorithms.weight_only.utility`` (checked against its outputs in
``tests/test_golden.py``), but the node builder packs exactly what onnxruntime's kernels read:
zero points padded per row, block sizes validated, scales in the weight's float type.
"""

from __future__ import annotations

import os
from collections.abc import Container
from typing import Any

import numpy as np
import onnx

from . import packing

__all__ = ["quant_tensor", "qdq_tensor", "pad_tensor", "make_matmul_weight_only_node", "prepare_inputs"]

_SCHEMES = ("sym", "asym")
_DTYPES = ("int", "uint")


def quant_range(num_bits: int, scheme: str, dtype: str) -> tuple[int, int]:
    """``(minq, maxq)``: unsigned ``[0, 2^b-1]`` for asym or uint, signed ``[-2^(b-1), 2^(b-1)-1]`` for sym int."""
    if scheme == "asym" or dtype == "uint":
        return 0, 2**num_bits - 1
    if num_bits == 1:
        return -1, 0
    return -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1


def _check_quant_args(data: np.ndarray, num_bits: int, group_size: int, scheme: str, dtype: str, ratio: float) -> None:
    if not isinstance(num_bits, (int, np.integer)) or not 1 <= num_bits <= 8:
        raise ValueError(f"num_bits={num_bits!r} is not supported; use an integer from 1 to 8")
    if scheme not in _SCHEMES:
        raise ValueError(f"scheme={scheme!r} is not supported; use one of {_SCHEMES}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {_DTYPES}")
    if not np.issubdtype(data.dtype, np.floating):
        raise ValueError(f"data must be a float array, got dtype {data.dtype}")
    if not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} must be a positive integer (pad K first, see pad_tensor)")
    if data.size % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide the data ({data.size} values, shape {data.shape}); "
            "pad K to a multiple of group_size with pad_tensor first"
        )
    if not ratio > 0:
        raise ValueError(f"ratio={ratio!r} must be > 0")


def quant_tensor(
    data: np.ndarray,
    num_bits: int = 4,
    group_size: int = 32,
    scheme: str = "asym",
    dtype: str = "int",
    ratio: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize ``data`` per group of ``group_size`` consecutive values.

    ``data`` is reshaped to ``(-1, group_size)``: pass the transposed, padded weight ``W.T`` so a
    group is ``group_size`` consecutive K values of one output column.

    - Range: ``[0, 2^b-1]`` for ``scheme="asym"`` or ``dtype="uint"``; ``[-2^(b-1), 2^(b-1)-1]`` for
      ``scheme="sym"`` with ``dtype="int"``.
    - ``rmin``/``rmax``: the group's min/max times ``ratio`` (not widened to include 0).
    - sym: ``scale = 2*max(|rmin|, |rmax|) / (maxq - minq)``; zero point 0 (``"int"``, float) or
      ``2^(b-1)`` (``"uint"``, uint8).
    - asym: ``scale = (rmax - rmin) / (maxq - minq)``; zero point ``round(-rmin/scale)``: unclipped
      float for ``"int"``, clipped to ``[0, maxq]`` uint8 for ``"uint"``.
    - A group whose range is 0 gets scale 1.
    - ``q = clip(round(data/scale + zp), minq, maxq)``, round half to even.

    Returns ``q`` (float, ``(n_groups, group_size)``), ``scale`` and ``zero_point`` (``(n_groups, 1)``).
    Float16 data gets float16 scales (``q`` is computed with the rounded scale).
    """
    data = np.asarray(data)
    _check_quant_args(data, num_bits, group_size, scheme, dtype, ratio)
    half = data.dtype == np.float16
    if data.dtype not in (np.float32, np.float64):
        data = data.astype(np.float32)
    data = data.reshape(-1, group_size)
    minq, maxq = quant_range(num_bits, scheme, dtype)
    rmin = np.min(data, axis=1, keepdims=True) * ratio
    rmax = np.max(data, axis=1, keepdims=True) * ratio
    if scheme == "sym":
        max_range = np.maximum(np.abs(rmin), np.abs(rmax))
        scale = np.where(max_range > 0, max_range.astype(np.float64) * 2.0 / (maxq - minq), 1.0)
        if half:
            scale = _to_half_scale(scale).astype(np.float64)
        if dtype == "int":
            zero_point = np.zeros(scale.shape)
        else:
            zero_point = np.full(scale.shape, 1 << (num_bits - 1), dtype=np.uint8)
    else:
        span = (rmax - rmin).astype(np.float64)
        scale = np.where(rmin != rmax, span / (maxq - minq), 1.0)
        if half:
            scale = _to_half_scale(scale).astype(np.float64)
        zero_point = np.round((0.0 - rmin) / scale)
        if dtype == "uint":
            zero_point = np.clip(zero_point, 0, maxq).astype(np.uint8)
    q = np.divide(data, scale)
    np.add(q, zero_point, out=q)
    np.round(q, out=q)
    np.clip(q, minq, maxq, out=q)
    if half:
        scale = scale.astype(np.float16)
    return q, scale, zero_point


def _to_half_scale(scale: np.ndarray) -> np.ndarray:
    """Round scales to float16, keeping them non-zero and finite."""
    tiny = np.float32(np.finfo(np.float16).smallest_subnormal)
    big = np.float32(np.finfo(np.float16).max)
    return np.clip(scale, tiny, big).astype(np.float16)


def qdq_tensor(
    data: np.ndarray,
    num_bits: int = 4,
    group_size: int = 32,
    scheme: str = "asym",
    dtype: str = "int",
    ratio: float = 1.0,
) -> np.ndarray:
    """Quantize then dequantize: ``scale * (q - zero_point)`` in ``data``'s shape."""
    data = np.asarray(data)
    q, scale, zp = quant_tensor(data, num_bits, group_size, scheme, dtype, ratio)
    return np.reshape(scale.astype(np.float64) * (q - zp), data.shape)


def pad_tensor(weight: np.ndarray, group_size: int, k_blocks: int) -> np.ndarray:
    """Zero-pad ``weight`` along axis 0 (K) to ``k_blocks * group_size`` rows.

    Returns the input unchanged for ``group_size == -1`` or when no padding is needed.
    """
    if group_size == -1:
        return weight
    weight = np.asarray(weight)
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D [K, N], got shape {weight.shape}")
    pad_len = k_blocks * group_size - weight.shape[0]
    if pad_len < 0:
        raise ValueError(
            f"k_blocks={k_blocks} x group_size={group_size} is smaller than K={weight.shape[0]}; "
            "use k_blocks = ceil(K / group_size)"
        )
    if pad_len > 0:
        weight = np.pad(weight, ((0, pad_len), (0, 0)), "constant")
    return weight


def _unique_name(base: str, taken: Container[str], used: set[str]) -> str:
    name, i = base, 0
    while name in taken or name in used:
        i += 1
        name = f"{base}_{i}"
    used.add(name)
    return name


def _to_unsigned(
    q: np.ndarray, zero_point: np.ndarray | None, num_bits: int, allow_float_zp: bool
) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """Bring ``q`` and ``zero_point`` to the kernel's unsigned form.

    Returns ``(q_uint8, zp, zp_is_float)`` where ``zp`` is ``None`` when it equals the kernel
    default ``2^(bits-1)`` everywhere (symmetric), a uint8 array, or a float array for zero points
    outside ``[0, 2^bits-1]`` (possible with ``dtype="int"`` asym groups that do not cross zero).
    """
    maxq = 2**num_bits - 1
    mid = 1 << (num_bits - 1)
    q = np.asarray(q)
    qmin, qmax = float(q.min()), float(q.max())
    if zero_point is None:
        if qmin < 0:  # signed symmetric values
            q = q + mid
        elif qmax > maxq:
            raise ValueError(f"q_weight values exceed [0, {maxq}] for num_bits={num_bits}")
        return q.astype(np.uint8), None, False
    zp = np.asarray(zero_point, dtype=np.float64)
    if qmin < 0:
        if qmin < -mid or qmax > mid - 1:
            raise ValueError(f"signed q_weight values exceed [{-mid}, {mid - 1}] for num_bits={num_bits}")
        q = q + mid
        zp = zp + mid
    elif qmax > maxq:
        raise ValueError(f"q_weight values exceed [0, {maxq}] for num_bits={num_bits}")
    q8 = q.astype(np.uint8)
    if np.all(zp == mid):
        return q8, None, False
    if np.all((zp >= 0) & (zp <= maxq) & (zp == np.round(zp))):
        return q8, zp.astype(np.uint8), False
    if not allow_float_zp:
        raise ValueError(
            f"zero points outside [0, {maxq}] cannot be stored as uint8 for this target "
            f"(num_bits={num_bits}); quantize with dtype='uint' (clipped zero points)"
        )
    return q8, zp, True


def make_matmul_weight_only_node(
    node: onnx.NodeProto,
    weight_shape: tuple[int, int],
    num_bits: int,
    group_size: int,
    k_blocks: int,
    q_weight: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None,
    accuracy_level: int = 0,
    *,
    op_type: str = "MatMulNBits",
    weight_dtype: Any = None,
    existing_names: Container[str] = (),
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """Build a com.microsoft ``MatMulNBits`` (default) or ``MatMulFpQ4`` node and its initializers.

    ``q_weight``, ``scale``, ``zero_point`` are the outputs of ``quant_tensor`` on
    ``pad_tensor(W, group_size, k_blocks).T`` (``q_weight`` ``(N * k_blocks, group_size)``);
    ``weight_shape`` is the original ``(K, N)``. ``zero_point=None`` or all-zero signed values
    mean symmetric: the zero-point input is omitted (kernel default ``2^(bits-1)``). Zero points
    are packed per row; out-of-range float zero points become a float zero-point input
    (MatMulNBits 2/4-bit only). Scales are stored in ``weight_dtype`` (default: float16 when
    ``scale`` is float16, else float32). New initializer names avoid ``existing_names``.

    ``op_type="MatMulFpQ4"`` needs 4 bits and ``group_size == 32``.
    """
    if op_type not in ("MatMulNBits", "MatMulFpQ4"):
        raise ValueError(f"op_type={op_type!r} is not supported; use 'MatMulNBits' or 'MatMulFpQ4'")
    if len(weight_shape) != 2:
        raise ValueError(f"weight_shape must be (K, N), got {tuple(weight_shape)}")
    k, n = (int(d) for d in weight_shape)
    if op_type == "MatMulFpQ4":
        if num_bits != 4 or group_size != packing.FPQ4_BLOCK_SIZE:
            raise ValueError(
                f"MatMulFpQ4 needs num_bits=4 and group_size=32, got num_bits={num_bits}, group_size={group_size}"
            )
    else:
        if num_bits not in packing.NBITS_SUPPORTED_BITS:
            raise ValueError(f"num_bits={num_bits} is not supported by MatMulNBits; use one of {packing.NBITS_SUPPORTED_BITS}")
        if group_size < 16 or group_size & (group_size - 1):
            raise ValueError(f"group_size={group_size} is not valid for MatMulNBits; use a power of two >= 16")
    if not 0 <= int(accuracy_level) <= 4:
        raise ValueError(f"accuracy_level={accuracy_level} is not valid; use 0, 1, 2, 3 or 4")
    if k_blocks != -(-k // group_size):
        raise ValueError(f"k_blocks={k_blocks} does not match K={k}, group_size={group_size}: expected {-(-k // group_size)}")
    q_weight = np.asarray(q_weight)
    if q_weight.size != n * k_blocks * group_size:
        raise ValueError(
            f"q_weight has {q_weight.size} values; expected N*k_blocks*group_size = {n}*{k_blocks}*{group_size}"
        )
    scale = np.asarray(scale)
    if scale.size != n * k_blocks:
        raise ValueError(f"scale has {scale.size} values; expected N*k_blocks = {n * k_blocks}")
    if zero_point is not None and np.asarray(zero_point).size != n * k_blocks:
        raise ValueError(f"zero_point has {np.asarray(zero_point).size} values; expected N*k_blocks = {n * k_blocks}")
    if weight_dtype is None:
        weight_dtype = np.float16 if scale.dtype == np.float16 else np.float32
    weight_dtype = np.dtype(weight_dtype)
    if weight_dtype not in (np.float16, np.float32):
        raise ValueError(f"weight_dtype={weight_dtype} is not supported; use float32 or float16")

    q3 = q_weight.reshape(n, k_blocks, group_size)
    zp2 = None if zero_point is None else np.asarray(zero_point).reshape(n, k_blocks)
    q8, zp, zp_float = _to_unsigned(q3, zp2, num_bits, allow_float_zp=op_type == "MatMulNBits" and num_bits != 8)
    if k_blocks * group_size > k:  # the kernel ignores the padded tail; keep it zero
        q8 = q8.reshape(n, -1)
        q8[:, k:] = 0
        q8 = q8.reshape(n, k_blocks, group_size)

    weight_name = node.input[1] if len(node.input) > 1 and node.input[1] else node.name or "weight"
    used: set[str] = set()
    q_name = _unique_name(f"{weight_name}_Q{num_bits}G{group_size}", existing_names, used)
    inputs = [node.input[0], q_name]
    inits: list[onnx.TensorProto] = []
    attrs: dict[str, Any] = {}
    if op_type == "MatMulNBits":
        inits.append(onnx.numpy_helper.from_array(packing.pack_nbits_weight(q8, num_bits), q_name))
        s_name = _unique_name(f"{weight_name}_scale", existing_names, used)
        inits.append(onnx.numpy_helper.from_array(scale.reshape(n, k_blocks).astype(weight_dtype), s_name))
        inputs.append(s_name)
        if zp is not None:
            z_name = _unique_name(f"{weight_name}_zp", existing_names, used)
            zp_arr = zp.astype(weight_dtype) if zp_float else packing.pack_nbits_zero_points(zp, num_bits)
            inits.append(onnx.numpy_helper.from_array(zp_arr, z_name))
            inputs.append(z_name)
        attrs.update(K=k, N=n, bits=num_bits, block_size=group_size)
        if accuracy_level:
            attrs["accuracy_level"] = int(accuracy_level)
    else:
        if weight_dtype != np.float32:
            raise ValueError("MatMulFpQ4 takes float32 inputs only; use MatMulNBits for float16 models")
        blob = packing.pack_fpq4_blob(q8, scale.reshape(n, k_blocks).astype(np.float32), zp)
        inits.append(onnx.numpy_helper.from_array(blob, q_name))
        shape_name = _unique_name(f"{weight_name}_shape", existing_names, used)
        inits.append(onnx.numpy_helper.from_array(np.array([k, n], dtype=np.int64), shape_name))
        inputs.append(shape_name)
        attrs["blk_quant_type"] = 0 if zp is None else 1
    new_node = onnx.helper.make_node(
        op_type,
        inputs=inputs,
        outputs=list(node.output),
        name=f"{node.name}_Q{num_bits}" if node.name else f"_Q{num_bits}",
        domain="com.microsoft",
        **attrs,
    )
    return new_node, inits


def prepare_inputs(model: Any, data_reader: Any, providers: Any = None) -> tuple[list[dict[str, np.ndarray]], Any]:
    """Read every calibration batch from ``data_reader`` and make session options for the model.

    ``model`` may be an ``onnx.ModelProto``, an ``onnx_ir.Model`` or a path (models over 2 GB
    with external data are fine: nothing is serialised here). ``data_reader`` is an onnxruntime
    ``CalibrationDataReader`` (``get_next()`` until it returns ``None``); it is rewound first and
    afterwards when it has ``rewind()``. The returned ``onnxruntime.SessionOptions`` have the
    onnxruntime-extensions custom-op library registered when it is installed. ``providers`` is
    accepted for compatibility (sessions built from these options choose their own).
    """
    import onnxruntime as ort

    if isinstance(model, (str, os.PathLike)) and not os.path.exists(model):
        raise ValueError(f"model path {os.fspath(model)!r} does not exist")
    if data_reader is None or not hasattr(data_reader, "get_next"):
        raise ValueError("data_reader must be a CalibrationDataReader (an object with get_next())")
    so = ort.SessionOptions()
    try:
        import onnxruntime_extensions

        so.register_custom_ops_library(onnxruntime_extensions.get_library_path())
    except (ImportError, OSError, RuntimeError):  # pragma: no cover - optional at run time
        pass
    rewind = getattr(data_reader, "rewind", None)
    if callable(rewind):
        rewind()
    inputs_list: list[dict[str, np.ndarray]] = []
    while True:
        batch = data_reader.get_next()
        if batch is None:
            break
        inputs_list.append(dict(batch))
    if callable(rewind):
        rewind()
    return inputs_list, so
