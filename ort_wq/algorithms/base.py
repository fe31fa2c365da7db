"""Shared types of the algorithm layer and the registry of algorithms by name."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class QuantSpec:
    """Resolved settings for one weight.

    ``block_size`` is the real block (a per-channel request is already resolved to one block
    over the padded K). ``float_zero_points`` says whether the target can store float zero
    points (MatMulNBits 2/4-bit); algorithms that optimise zero points (HQQ) use it.
    ``sym_grid`` is the symmetric grid: ``"mlas"`` (onnxruntime's: ``scale = signed extreme /
    -2^(b-1)``, the largest-magnitude weight exact, the scale negative when it is positive) or
    ``"inc"`` (the utilities': ``scale = 2 max|w| / (2^b - 1)``); see :mod:`.rtn`.
    """

    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    float_zero_points: bool = False
    sym_grid: str = "mlas"


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
    accumulated batch by batch. :meth:`compact` keeps only the diagonal blocks;
    ``diagonal_only`` accumulates only ``sum(x^2)`` per channel (``sq_sum``, for algorithms
    registered with ``statistics="diagonal"``: ``K`` numbers and ``rows x K`` work per batch
    instead of ``K x K`` and ``rows x K^2``).
    """

    k: int
    xtx: np.ndarray | None = None
    abs_sum: np.ndarray | None = None
    rows: int = 0
    blocks: np.ndarray | None = None  # compact form: only the diagonal blocks of X^T X
    diagonal_only: bool = False  # accumulate sum(x^2) per channel instead of X^T X
    sq_sum: np.ndarray | None = None

    def compact(self, block_size: int) -> LayerStats:
        """The same statistics keeping only the ``block_size`` diagonal blocks of ``X^T X``
        (``[kb, bs, bs]``, what a per-group search reads): ``bs / K`` of the memory."""
        if self.xtx is None:
            return self
        from ._common import hessian_blocks

        return LayerStats(self.k, None, self.abs_sum, self.rows, hessian_blocks(self.xtx, self.k, block_size))

    def diagonal_blocks(self, block_size: int) -> np.ndarray:
        """Diagonal ``block_size`` blocks of the mean ``X^T X``, float32 ``[kb, bs, bs]``."""
        from ._common import hessian_blocks

        if self.blocks is not None and self.xtx is None:
            if self.blocks.shape[-1] != block_size:
                raise ValueError(f"statistics kept for blocks of {self.blocks.shape[-1]}, not {block_size}")
            return self.blocks / np.float32(max(self.rows, 1))
        return hessian_blocks(self.hessian, self.k, block_size)

    def update(self, x: np.ndarray) -> None:
        """Add a batch: only the block upper triangle of ``X^T X`` is computed (half the
        arithmetic), in products of ``_STATS_BLOCK`` rows, then mirrored."""
        x2 = np.asarray(x, dtype=np.float32).reshape(-1, self.k)
        if self.diagonal_only:
            if self.sq_sum is None:
                self.sq_sum = np.zeros(self.k, dtype=np.float64)
                self.abs_sum = np.zeros(self.k, dtype=np.float64)
            self.sq_sum += np.square(x2).sum(axis=0, dtype=np.float64)
            self.abs_sum += np.abs(x2).sum(axis=0, dtype=np.float64)
            self.rows += x2.shape[0]
            return
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
        if self.rows and self.xtx is None and (self.sq_sum is not None or self.blocks is not None):
            raise ValueError("these statistics hold only per-channel energies, not X^T X")
        if self.xtx is None or self.rows == 0:
            raise ValueError("no calibration data was accumulated for this layer")
        return self.xtx / self.rows

    @property
    def energy(self) -> np.ndarray:
        """Mean ``x_k^2`` per input channel (float64 ``[K]``): the diagonal of :attr:`hessian`."""
        if self.rows == 0:
            raise ValueError("no calibration data was accumulated for this layer")
        if self.xtx is not None:
            return np.diagonal(self.xtx).astype(np.float64) / self.rows
        if self.sq_sum is not None:
            return self.sq_sum / self.rows
        if self.blocks is not None:
            return np.diagonal(self.blocks, axis1=1, axis2=2).reshape(-1)[: self.k].astype(np.float64) / self.rows
        raise ValueError("no calibration data was accumulated for this layer")

    @property
    def abs_mean(self) -> np.ndarray:
        if self.abs_sum is None or self.rows == 0:
            raise ValueError("no calibration data was accumulated for this layer")
        return self.abs_sum / self.rows


@dataclass(frozen=True)
class OptionSpec:
    """The type and range of one algorithm option (a keyword-only parameter of the algorithm).

    ``type``: ``int``, ``float``, ``bool`` or ``str``; ``min`` / ``max`` bound numbers (``min_open``:
    ``min`` itself is excluded); ``choices`` lists the allowed strings.
    """

    type: type
    min: float | None = None
    max: float | None = None
    min_open: bool = False
    choices: tuple[str, ...] = ()

    def check(self, where: str, value: Any) -> None:
        """``ValueError`` (one line, naming ``where`` and what is allowed) unless ``value`` fits."""
        kind = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}[self.type]
        ok = isinstance(value, self.type) and not (self.type is not bool and isinstance(value, bool))
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok or (self.type is float and not math.isfinite(value)):
            raise ValueError(f"{where}={value!r} is not valid: it takes {kind}{self._range()}")
        if self.choices and value not in self.choices:
            raise ValueError(f"{where}={value!r} is not valid; use one of {', '.join(self.choices)}")
        low_bad = self.min is not None and (value <= self.min if self.min_open else value < self.min)
        if low_bad or (self.max is not None and value > self.max):
            raise ValueError(f"{where}={value!r} is out of range: it takes {kind}{self._range()}")

    def _range(self) -> str:
        if self.type not in (int, float):
            return f" ({', '.join(self.choices)})" if self.choices else ""
        low = "" if self.min is None else f"{'>' if self.min_open else '>='} {self.min:g}"
        high = "" if self.max is None else f"<= {self.max:g}"
        return f" {' and '.join(p for p in (low, high) if p)}" if low or high else ""


Algorithm = Callable[[np.ndarray, QuantSpec, "LayerStats | None"], QuantizedWeight]
_REGISTRY: dict[str, tuple[Algorithm, bool]] = {}
_FLOAT_ZERO_POINTS: set[str] = set()
_COMPENSATING: set[str] = set()
_DIAGONAL: set[str] = set()
_INPUT_GAIN: set[str] = set()
_OPTIONS: dict[str, dict[str, OptionSpec]] = {}
_INTERNAL_OPTIONS: tuple[str, ...] = ("input_gain",)  # set by the transform only (awq's allow_input_scale is a user option too)


def register(
    name: str,
    needs_calibration: bool = False,
    float_zero_points: bool = False,
    options: dict[str, OptionSpec] | None = None,
    compensates: bool = False,
    statistics: str = "full",
    input_gain: bool = False,
) -> Callable[[Algorithm], Algorithm]:
    """Decorator: register ``fn(w[K, N], spec, stats) -> QuantizedWeight`` under ``name``.

    ``float_zero_points``: the algorithm returns float zero points for asymmetric weights when
    ``spec.float_zero_points`` allows it (the transform lays out the initializers accordingly);
    others always return uint8 zero points. ``compensates``: the algorithm moves each weight's
    rounding error into the weights not yet quantized (GPTQ), so its result fits the layer's
    outputs rather than each weight: unfit for a table that a Gather also reads as it is.
    ``statistics``: ``"full"`` (``X^T X``) or ``"diagonal"`` (the algorithm reads only
    ``LayerStats.energy`` and ``abs_mean``; calibration then skips ``X^T X``).
    ``input_gain``: the algorithm takes a keyword ``input_gain`` (float64 ``[K]`` or ``None``):
    the constant per-channel gain of the normalisation producing the weight's input, found by
    the transform (``ort_wq.transforms.norms``), a calibration-free hint of the input's energy.
    ``options``: an :class:`OptionSpec` per keyword-only
    parameter users may set, checked by :func:`check_options` before any work starts.
    """

    def deco(fn: Algorithm) -> Algorithm:
        unknown = set(options or {}) - set(_keyword_options(fn))
        if unknown:
            raise TypeError(f"algorithm {name!r}: options {sorted(unknown)} are not keyword-only parameters")
        _REGISTRY[name] = (fn, needs_calibration)
        _OPTIONS[name] = dict(options or {})
        if float_zero_points:
            _FLOAT_ZERO_POINTS.add(name)
        if compensates:
            _COMPENSATING.add(name)
        if statistics not in ("full", "diagonal"):
            raise TypeError(f"algorithm {name!r}: statistics={statistics!r} is not 'full' or 'diagonal'")
        if statistics == "diagonal":
            _DIAGONAL.add(name)
        if input_gain:
            _INPUT_GAIN.add(name)
        return fn

    return deco


def _keyword_options(fn: Algorithm) -> list[str]:
    params = inspect.signature(fn).parameters
    return sorted(n for n, p in params.items() if p.kind == p.KEYWORD_ONLY and n not in _INTERNAL_OPTIONS)


def check_options(name: str, options: dict[str, Any]) -> None:
    """``ValueError`` for an option algorithm ``name`` does not have, or a value of the wrong type or range."""
    fn, _ = get_algorithm(name)
    allowed = _keyword_options(fn)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"algorithm {name!r} has no option {', '.join(unknown)}; "
                         f"its options: {', '.join(allowed) or 'none'}")
    specs = _OPTIONS.get(name, {})
    for key, value in options.items():
        if key in specs:
            specs[key].check(f"algorithm option {key}", value)


def compensates_error(name: str) -> bool:
    """Whether algorithm ``name`` rewrites not-yet-quantized weights to absorb rounding errors (GPTQ)."""
    _load_all()
    return name in _COMPENSATING


def diagonal_statistics(name: str) -> bool:
    """Whether algorithm ``name`` reads only per-channel calibration statistics (no ``X^T X``)."""
    _load_all()
    return name in _DIAGONAL


def reads_input_gain(name: str) -> bool:
    """Whether algorithm ``name`` takes the ``input_gain`` keyword (see :func:`register`)."""
    _load_all()
    return name in _INPUT_GAIN


def uses_float_zero_points(name: str) -> bool:
    """Whether algorithm ``name`` emits float zero points where the target allows them."""
    _load_all()
    return name in _FLOAT_ZERO_POINTS


def _load_all() -> None:
    from . import rtn  # noqa: F401

    for mod in ("rtn_clip", "hqq", "imatrix", "gptq", "awq"):
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
