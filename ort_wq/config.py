"""What to quantize and how: :class:`WeightOnlyConfig` and its per-node resolution."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from .algorithms.base import QuantSpec

FORMATS = ("nbits", "fpq4", "qdq")
SYM_GRIDS = ("mlas", "inc")
# the consumer ops whose constant weights are quantized (transforms/targets.py holds their table)
OP_TYPES = ("MatMul", "Gemm", "FusedMatMul", "Gather")
BITS_BY_FORMAT = {"nbits": (2, 4, 8), "fpq4": (4,), "qdq": (4, 8)}


def parse_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as bool (true/false), int, float or text."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"algorithm option {text!r} must look like KEY=VALUE, e.g. damp=0.05")
    low = raw.strip().lower()
    value: Any
    if low in ("true", "false", "yes", "no"):
        value = low in ("true", "yes")
    else:
        for cast in (int, float):
            try:
                value = cast(raw)
                break
            except ValueError:
                continue
        else:
            value = raw
    return key.strip(), value


@dataclass
class NodeOverride:
    """Settings for the nodes whose name or weight name matches ``pattern`` (a regex, ``re.search``).

    ``None`` keeps the global setting; ``skip=True`` leaves matching nodes unquantized.
    """

    pattern: str
    bits: int | None = None
    block_size: int | None = None
    symmetric: bool | None = None
    skip: bool = False

    @classmethod
    def parse(cls, text: str) -> NodeOverride:
        """Parse ``REGEX=bits:8,block:128,sym|asym|skip`` (the CLI's ``--override``)."""
        if "=" not in text:
            raise ValueError(f"override {text!r} must look like REGEX=bits:8,block:128 (or REGEX=skip)")
        pattern, _, spec = text.rpartition("=")
        if not pattern:
            raise ValueError(f"override {text!r} has no REGEX before '='; to change every node use --bits/--block-size")
        if not spec.strip(" ,"):
            raise ValueError(f"override {text!r} sets nothing; give bits:N, block:N, sym, asym or skip after '='")
        out = cls(pattern)
        for item in filter(None, (s.strip() for s in spec.split(","))):
            key, _, value = item.partition(":")
            try:
                if key == "bits":
                    out.bits = int(value)
                elif key in ("block", "block_size"):
                    out.block_size = int(value)
                elif key in ("sym", "asym") and not value:
                    out.symmetric = key == "sym"
                elif key == "skip" and not value:
                    out.skip = True
                else:
                    raise ValueError
            except ValueError:
                raise ValueError(
                    f"override {text!r}: cannot read {item!r}; use bits:N, block:N, sym, asym or skip"
                ) from None
        return out


@dataclass
class WeightOnlyConfig:
    """Weight-only quantization settings.

    - ``bits``: 2, 4 or 8 (``fpq4``: 4; ``qdq``: 4 or 8).
    - ``block_size``: a power of two >= 16, or -1 for one block over the whole (padded) K.
    - ``symmetric``: no zero points (the kernel's default midpoint) when true.
    - ``format``: ``nbits`` (com.microsoft MatMulNBits), ``fpq4`` (com.microsoft MatMulFpQ4,
      4-bit blocks of 32), ``qdq`` (DequantizeLinear + MatMul, opset >= 21).
    - ``accuracy_level``: MatMulNBits compute type, 0..4 (4: int8 activations, fastest on CPU).
    - ``algorithm``: ``rtn`` and the others listed by ``ort_wq.algorithms.list_algorithms()``.
    - ``include`` / ``exclude``: regexes on node or weight name; ``op_types``: which consumers to
      convert, from ``MatMul``, ``Gemm``, ``FusedMatMul`` (com.microsoft), ``Gather`` (embedding
      tables, to com.microsoft GatherBlockQuantized; all four by default).
    - ``overrides``: :class:`NodeOverride` list, the last match wins (mixed precision).
    - ``min_k`` / ``min_n``: smaller weights are left alone.
    - ``threads``: worker threads (default: all cores).
    - ``algorithm_options``: keyword arguments of the algorithm, e.g. ``{"damp": 0.05,
      "act_order": False}`` for GPTQ (see each algorithm's signature in ``ort_wq.algorithms``).
    - ``zero_points`` (asymmetric MatMulNBits): ``auto`` (uint8; float only for an algorithm
      registered to prefer them), ``uint8`` or ``float`` (2/4-bit; more accurate for HQQ, but
      onnxruntime's CPU kernel runs them many times slower, see ``benchmarks/bench_zero_points.py``).
    - ``sym_grid``: the symmetric grid, ``mlas`` (onnxruntime's: the block's signed extreme maps
      to code ``-2^(b-1)`` exactly) or ``inc`` (the utilities' ``2 max|w| / (2^b - 1)``).
    """

    # defaults measured on the shared MiniLM model (benchmarks/bench_defaults.py, README)
    bits: int = 4
    block_size: int = 32
    symmetric: bool = False
    format: str = "nbits"
    accuracy_level: int = 4
    algorithm: str = "rtn"
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    op_types: tuple[str, ...] = OP_TYPES
    overrides: list[NodeOverride] = field(default_factory=list)
    min_k: int = 16
    min_n: int = 1
    threads: int | None = None
    zero_points: str = "auto"
    sym_grid: str = "mlas"
    algorithm_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` for settings no target supports (one line, naming the fix)."""
        if self.format not in FORMATS:
            raise ValueError(f"format={self.format!r} is not supported; use one of {FORMATS}")
        if isinstance(self.op_types, str):
            self.op_types = tuple(t.strip() for t in self.op_types.split(",") if t.strip())
        unknown = [t for t in self.op_types if t not in OP_TYPES]
        if unknown or not self.op_types:
            raise ValueError(f"op_types {', '.join(map(repr, unknown)) or '(empty)'} not known; "
                             f"use one or more of {', '.join(OP_TYPES)}")
        self._check_spec(self.bits, self.block_size, self.symmetric, "")
        if self.sym_grid not in SYM_GRIDS:
            raise ValueError(f"sym_grid={self.sym_grid!r} is not valid; use one of {SYM_GRIDS}")
        if self.zero_points not in ("auto", "uint8", "float"):
            raise ValueError(f"zero_points={self.zero_points!r} is not valid; use 'auto', 'uint8' or 'float'")
        if self.zero_points == "float" and (self.format != "nbits" or self.symmetric):
            raise ValueError("float zero points need format 'nbits' with asymmetric blocks (--asym)")
        if not 0 <= self.accuracy_level <= 4:
            raise ValueError(f"accuracy_level={self.accuracy_level} is not valid; use 0, 1, 2, 3 or 4")
        for pat in [*self.include, *self.exclude, *(o.pattern for o in self.overrides)]:
            try:
                re.compile(pat)
            except re.error as exc:
                raise ValueError(f"pattern {pat!r} is not a valid regular expression: {exc}") from None
        for o in self.overrides:
            self._check_spec(
                o.bits or self.bits, o.block_size or self.block_size,
                self.symmetric if o.symmetric is None else o.symmetric, f" (override {o.pattern!r})",
            )
        from .algorithms import list_algorithms
        from .algorithms.base import check_options

        if self.algorithm not in list_algorithms():
            raise ValueError(f"algorithm={self.algorithm!r} is not known; use one of {sorted(list_algorithms())}")
        check_options(self.algorithm, self.algorithm_options)

    def _check_spec(self, bits: int, block_size: int, symmetric: bool, where: str) -> None:
        allowed = BITS_BY_FORMAT[self.format]
        if self.zero_points == "float" and bits == 8:
            raise ValueError(f"8-bit MatMulNBits with float zero points is refused by onnxruntime's CPU kernel{where}; "
                             "use zero points 'uint8' (or 'auto')")
        if bits not in allowed:
            raise ValueError(f"bits={bits} is not supported by format {self.format!r}{where}; use one of {allowed}")
        if self.format == "fpq4":
            if block_size != 32:
                raise ValueError(f"format 'fpq4' uses blocks of 32, got block_size={block_size}{where}")
        elif block_size != -1 and (block_size < 16 or block_size & (block_size - 1)):
            raise ValueError(f"block_size={block_size} is not valid{where}; use a power of two >= 16, or -1 (per channel)")

    def with_(self, **changes) -> WeightOnlyConfig:
        return replace(self, **changes)

    def selected(self, names: list[str], op_type: str) -> str | None:
        """``None`` when a node is selected, else the reason it is not."""
        if op_type not in self.op_types:
            return f"op type {op_type} not in op_types"
        if self.include and not any(re.search(p, n) for p in self.include for n in names if n):
            return "not matched by include patterns"
        for p in self.exclude:
            if any(n and re.search(p, n) for n in names):
                return f"excluded by pattern {p!r}"
        if any(o.skip for o in self._overrides_for(names)):
            return "skipped by override"
        return None

    def _overrides_for(self, names: list[str]) -> list[NodeOverride]:
        return [o for o in self.overrides if any(n and re.search(o.pattern, n) for n in names)]

    def spec_for(self, names: list[str], k: int) -> QuantSpec:
        """The resolved :class:`QuantSpec` for a tensor whose own and consumers' names are ``names``
        (overrides applied in order, the last match wins; per-channel resolved)."""
        bits, block, sym = self.bits, self.block_size, self.symmetric
        for o in self._overrides_for(names):
            bits = o.bits or bits
            block = o.block_size or block
            sym = sym if o.symmetric is None else o.symmetric
        if block == -1:
            block = max(16, 1 << max(0, k - 1).bit_length())
        float_zp = self.format == "nbits" and bits in (2, 4) and self.zero_points != "uint8"
        return QuantSpec(bits=bits, block_size=block, symmetric=sym, float_zero_points=float_zp, sym_grid=self.sym_grid)
