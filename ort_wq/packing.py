"""Bytes the onnxruntime kernels read: packing and unpacking of quantized weights.

Layouts (checked against onnxruntime's CPU kernels by ``tests/test_kernel_packing.py``):

``MatMulNBits`` weight ``B``: uint8 ``[N, k_blocks, block_size * bits / 8]``. Inside a block the
K values are packed in order, least significant bits first: for 4-bit, element ``j`` of a block
goes to byte ``j // 2`` (even ``j`` in the low nibble); for 2-bit, byte ``j // 4`` at bit
``2 * (j % 4)``; 8-bit is one byte per element.

``MatMulNBits`` zero points: uint8 ``[N, ceil(k_blocks * bits / 8)]``, the block index packed the
same way and padded per row (each output column starts on a fresh byte).

``MatMulFpQ4`` blob: 1-D uint8; for each column ``n``, for each block of 32 K values, one record:
fp32 scale (4 bytes, little endian), then for ``blk_quant_type=1`` one uint8 zero point, then 16
data bytes with ``byte[l] = q[l] | q[l + 16] << 4``. Type 0 records have no zero point (the kernel
uses 8).
"""

from __future__ import annotations

import sys

import numpy as np

__all__ = [
    "CONTRIB_OPS",
    "NBITS_SUPPORTED_BITS",
    "FPQ4_BLOCK_SIZE",
    "pack_nbits_weight",
    "unpack_nbits_weight",
    "pack_nbits_zero_points",
    "unpack_nbits_zero_points",
    "nbits_blob_size",
    "pack_fpq4_blob",
    "unpack_fpq4_blob",
    "fpq4_record_size",
]

CONTRIB_OPS = ("MatMulNBits", "MatMulFpQ4", "GatherBlockQuantized")  # the com.microsoft ops written and read here
NBITS_SUPPORTED_BITS = (2, 4, 8)
FPQ4_BLOCK_SIZE = 32


def _check_bits(bits: int) -> None:
    if bits not in NBITS_SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported for MatMulNBits packing; use one of {NBITS_SUPPORTED_BITS}")


def _pack_last_axis(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack values ``< 2**bits`` along the last axis (length divisible by 8 // bits), LSB first."""
    q = np.asarray(q)
    if bits == 8:
        return q.astype(np.uint8, copy=True)
    if bits == 4 and sys.byteorder == "little":
        # each pair (lo, hi) read as one uint16 lo | hi << 8: the byte is lo | (hi & 15) << 4,
        # what the general path below computes, in three whole-array operations
        pairs = np.ascontiguousarray(q, dtype=np.uint8).view(np.uint16)
        out = pairs >> 4
        out &= 0x00F0
        out |= pairs
        return out.astype(np.uint8)
    per = 8 // bits
    grouped = q.astype(np.uint8).reshape(*q.shape[:-1], q.shape[-1] // per, per)
    out = grouped[..., 0].copy()
    for j in range(1, per):
        out |= grouped[..., j] << np.uint8(bits * j)
    return out


def _unpack_last_axis(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of ``_pack_last_axis``: the first ``count`` values of the last axis."""
    packed = np.asarray(packed, dtype=np.uint8)
    if bits == 8:
        return packed[..., :count].copy()
    per = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    shifts = (np.arange(per, dtype=np.uint8) * np.uint8(bits)).astype(np.uint8)
    values = (packed[..., :, None] >> shifts) & mask
    return values.reshape(*packed.shape[:-1], packed.shape[-1] * per)[..., :count]


def nbits_blob_size(block_size: int, bits: int) -> int:
    """Bytes per block in a MatMulNBits weight: ``block_size * bits / 8``."""
    _check_bits(bits)
    return block_size * bits // 8


def pack_nbits_weight(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned quantized values ``q[N, k_blocks, block_size]`` into MatMulNBits ``B``.

    Values must lie in ``[0, 2**bits - 1]``; the padded tail of the last block should be zero.
    Returns uint8 ``[N, k_blocks, block_size * bits / 8]``.
    """
    _check_bits(bits)
    q = np.asarray(q)
    if q.ndim != 3:
        raise ValueError(f"q must be 3-D [N, k_blocks, block_size], got shape {q.shape}")
    if (q.shape[2] * bits) % 8:
        raise ValueError(f"block_size={q.shape[2]} does not fill whole bytes at bits={bits}")
    return _pack_last_axis(q, bits)


def unpack_nbits_weight(packed: np.ndarray, bits: int, block_size: int | None = None) -> np.ndarray:
    """Unpack MatMulNBits ``B`` ``[N, k_blocks, blob]`` to uint8 ``[N, k_blocks, block_size]``."""
    _check_bits(bits)
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.ndim != 3:
        raise ValueError(f"packed weight must be 3-D [N, k_blocks, blob_size], got shape {packed.shape}")
    full = packed.shape[2] * 8 // bits
    return _unpack_last_axis(packed, bits, full if block_size is None else block_size)


def pack_nbits_zero_points(zp: np.ndarray, bits: int) -> np.ndarray:
    """Pack zero points ``zp[N, k_blocks]`` (ints in ``[0, 2**bits - 1]``) per row.

    Returns uint8 ``[N, ceil(k_blocks * bits / 8)]``; the unused high bits of a row's last byte
    are zero.
    """
    _check_bits(bits)
    zp = np.asarray(zp)
    if zp.ndim != 2:
        raise ValueError(f"zero points must be 2-D [N, k_blocks], got shape {zp.shape}")
    n, k_blocks = zp.shape
    per = 8 // bits
    width = -(-k_blocks // per) * per
    padded = np.zeros((n, width), dtype=np.uint8)
    padded[:, :k_blocks] = zp
    return _pack_last_axis(padded, bits)


def unpack_nbits_zero_points(packed: np.ndarray, bits: int, k_blocks: int) -> np.ndarray:
    """Unpack per-row packed zero points ``[N, ceil(k_blocks*bits/8)]`` to uint8 ``[N, k_blocks]``."""
    _check_bits(bits)
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.ndim == 1:
        raise ValueError("zero points packed flat across rows are not supported; expected [N, bytes] per row")
    return _unpack_last_axis(packed, bits, k_blocks)


def fpq4_record_size(blk_quant_type: int) -> int:
    """Bytes per 32-value block record of MatMulFpQ4: 20 (type 0) or 21 (with zero point)."""
    return 20 if blk_quant_type == 0 else 21


def pack_fpq4_blob(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None) -> np.ndarray:
    """Build a MatMulFpQ4 blob from ``q[N, k_blocks, 32]`` (uint8 in [0, 15]), fp32 ``scale[N, k_blocks]``.

    ``zero_point`` ``[N, k_blocks]`` uint8 gives ``blk_quant_type=1`` records (21 bytes); ``None``
    gives type 0 records (20 bytes, implicit zero point 8). Returns a 1-D uint8 array.
    """
    q = np.asarray(q)
    if q.ndim != 3 or q.shape[2] != FPQ4_BLOCK_SIZE:
        raise ValueError(f"q must be [N, k_blocks, {FPQ4_BLOCK_SIZE}] for MatMulFpQ4, got shape {q.shape}")
    n, k_blocks, _ = q.shape
    q8 = q.astype(np.uint8)
    data = q8[..., :16] | (q8[..., 16:] << np.uint8(4))
    scale_bytes = np.ascontiguousarray(np.asarray(scale, dtype="<f4").reshape(n, k_blocks)).view(np.uint8)
    scale_bytes = scale_bytes.reshape(n, k_blocks, 4)
    parts = [scale_bytes]
    if zero_point is not None:
        parts.append(np.asarray(zero_point).astype(np.uint8).reshape(n, k_blocks, 1))
    parts.append(data)
    return np.concatenate(parts, axis=2).reshape(-1)


def unpack_fpq4_blob(
    blob: np.ndarray, k: int, n: int, blk_quant_type: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split a MatMulFpQ4 blob into ``q[N, k_blocks, 32]``, ``scale[N, k_blocks]``, ``zp[N, k_blocks]``.

    Type 0 blobs report the implicit zero point 8. Raises ``ValueError`` when the blob size does not
    match ``K``, ``N`` and the block type.
    """
    blob = np.asarray(blob, dtype=np.uint8).reshape(-1)
    k_blocks = -(-k // FPQ4_BLOCK_SIZE)
    rec = fpq4_record_size(blk_quant_type)
    expected = n * k_blocks * rec
    if blob.size != expected:
        raise ValueError(
            f"MatMulFpQ4 blob has {blob.size} bytes but B_shape [{k}, {n}] with blk_quant_type={blk_quant_type} "
            f"needs {expected} ({n} columns x {k_blocks} blocks x {rec} bytes)"
        )
    records = blob.reshape(n, k_blocks, rec)
    scale = np.ascontiguousarray(records[..., :4]).view("<f4").reshape(n, k_blocks).astype(np.float32)
    if rec == 21:
        zp = records[..., 4].copy()
        data = records[..., 5:]
    else:
        zp = np.full((n, k_blocks), 8, dtype=np.uint8)
        data = records[..., 4:]
    q = np.concatenate([data & np.uint8(0x0F), data >> np.uint8(4)], axis=2)
    return q, scale, zp
