"""Shared types of the algorithm layer and the registry of algorithms by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class QuantSpec:
    """Resolved settings for one weight.

    ``block_size`` is the real block (a per-channel request is already resolved to one block
    over the padded K). ``float_zero_points`` says whether the target can store float zero
    points (MatMulNBits 2/4-bit); algorithms that optimise zero points (HQQ) use it.
    """

    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    float_zero_points: bool = False


@dataclass
class QuantizedWeight:
    """Quantized blocks of one weight ``W[K, N]`` in the kernel's unsigned form.

    - ``q``: uint8 ``[N, k_blocks, block_size]`` in ``[0, 2^bits - 1]``; the padded tail is zero.
    - ``scale``: float32 (or float16) ``[N, k_blocks]``.
    - ``zero_point``: ``None`` (symmetric, the kernel default ``2^(bits-1)``), uint8
      ``[N, k_blocks]``, or float ``[N, k_blocks]`` (only where the target supports it).
    - ``input_scale``: ``None``, or float ``[K]`` when the algorithm scaled the weight's rows
      (AWQ): the quantized weight approximates ``diag(input_scale) @ W`` and the activation must
      be divided by ``input_scale`` (folded into its producer by the transform).
    """

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    bits: int
    k: int
    input_scale: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return int(self.q.shape[0])

    @property
    def k_blocks(self) -> int:
        return int(self.q.shape[1])

    @property
    def block_size(self) -> int:
        return int(self.q.shape[2])

    def zero_point_array(self) -> np.ndarray:
        """Zero points as float64 ``[N, k_blocks]`` (the default filled in)."""
        if self.zero_point is None:
            return np.full(self.scale.shape, 1 << (self.bits - 1), dtype=np.float64)
        return np.asarray(self.zero_point, dtype=np.float64)

    def dequantize(self) -> np.ndarray:
        """Float32 ``W[K, N]`` as the kernel sees it (input_scale not undone)."""
        deq = (self.q.astype(np.float32) - self.zero_point_array()[..., None].astype(np.float32)) * np.asarray(
            self.scale, dtype=np.float32
        )[..., None]
        return deq.reshape(self.n, -1)[:, : self.k].T


_STATS_BLOCK = 1024  # rows of X^T X per matrix product in LayerStats.update


@dataclass
class LayerStats:
    """Calibration statistics of one MatMul's input activation ``X[..., K]``.

    ``xtx`` is ``sum(X^T X)`` over all rows seen (``[K, K]``, float32 when accumulated here: half
    the memory of float64, which matters with one such matrix per activation of an LLM),
    ``abs_sum`` the sum of ``|X|`` per channel (float64), ``rows`` the number of rows;
    accumulated batch by batch.
    """

    k: int
    xtx: np.ndarray | None = None
    abs_sum: np.ndarray | None = None
    rows: int = 0

    def update(self, x: np.ndarray) -> None:
        """Add a batch: only the block upper triangle of ``X^T X`` is computed (half the
        arithmetic), in products of ``_STATS_BLOCK`` rows, then mirrored."""
        x2 = np.asarray(x, dtype=np.float32).reshape(-1, self.k)
        if self.xtx is None:
            self.xtx = np.zeros((self.k, self.k), dtype=np.float32)
            self.abs_sum = np.zeros(self.k, dtype=np.float64)
        k, b = self.k, _STATS_BLOCK
        for j0 in range(0, k, b):
            j1 = min(j0 + b, k)
            self.xtx[j0:j1, j0:] += x2[:, j0:j1].T @ x2[:, j0:]
        for j0 in range(0, k, b):
            j1 = min(j0 + b, k)
            self.xtx[j1:, j0:j1] = self.xtx[j0:j1, j1:].T
        self.abs_sum += np.abs(x2).sum(axis=0, dtype=np.float64)
        self.rows += x2.shape[0]

    @property
    def hessian(self) -> np.ndarray:
        """Mean ``X^T X`` (``[K, K]``, the dtype of ``xtx``)."""
        if self.xtx is None or self.rows == 0:
            raise ValueError("no calibration data was accumulated for this layer")
        return self.xtx / self.rows

    @property
    def abs_mean(self) -> np.ndarray:
        if self.abs_sum is None or self.rows == 0:
            raise ValueError("no calibration data was accumulated for this layer")
        return self.abs_sum / self.rows


Algorithm = Callable[[np.ndarray, QuantSpec, "LayerStats | None"], QuantizedWeight]
_REGISTRY: dict[str, tuple[Algorithm, bool]] = {}
_FLOAT_ZERO_POINTS: set[str] = set()


def register(name: str, needs_calibration: bool = False, float_zero_points: bool = False) -> Callable[[Algorithm], Algorithm]:
    """Decorator: register ``fn(w[K, N], spec, stats) -> QuantizedWeight`` under ``name``.

    ``float_zero_points``: the algorithm returns float zero points for asymmetric weights when
    ``spec.float_zero_points`` allows it (the transform lays out the initializers accordingly);
    others always return uint8 zero points.
    """

    def deco(fn: Algorithm) -> Algorithm:
        _REGISTRY[name] = (fn, needs_calibration)
        if float_zero_points:
            _FLOAT_ZERO_POINTS.add(name)
        return fn

    return deco


def uses_float_zero_points(name: str) -> bool:
    """Whether algorithm ``name`` emits float zero points where the target allows them."""
    _load_all()
    return name in _FLOAT_ZERO_POINTS


def _load_all() -> None:
    from . import rtn  # noqa: F401

    for mod in ("rtn_clip", "hqq", "gptq", "awq"):
        try:
            __import__(f"{__package__}.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{mod}":
                raise


def list_algorithms() -> dict[str, bool]:
    """Registered algorithm names -> whether they need calibration data."""
    _load_all()
    return {name: needs for name, (_, needs) in sorted(_REGISTRY.items())}


def get_algorithm(name: str) -> tuple[Algorithm, bool]:
    """``(function, needs_calibration)`` for an algorithm name; ``ValueError`` names the choices."""
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"algorithm={name!r} is not known; use one of {sorted(_REGISTRY)}")
    return _REGISTRY[name]
