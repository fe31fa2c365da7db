"""What a quantization run did: converted nodes, skipped nodes with reasons, sizes, time."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class ConvertedNode:
    node: str
    op_type: str
    new_op: str
    weight: str
    k: int
    n: int
    bits: int
    block_size: int
    symmetric: bool
    algorithm: str
    bytes_before: int
    bytes_after: int
    shared: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass
class SkippedNode:
    node: str
    op_type: str
    reason: str
    weight: str = ""


@dataclass
class QuantReport:
    """Returned by :func:`ort_wq.quantize` (and kept on the pass as ``last_report``)."""

    converted: list[ConvertedNode] = field(default_factory=list)
    skipped: list[SkippedNode] = field(default_factory=list)
    seconds: float = 0.0
    model_bytes_before: int = 0
    model_bytes_after: int = 0

    @property
    def weight_bytes_before(self) -> int:
        return sum(c.bytes_before for c in self.converted if not c.shared)

    @property
    def weight_bytes_after(self) -> int:
        return sum(c.bytes_after for c in self.converted if not c.shared)

    def counts(self) -> Counter:
        """Converted nodes by ``(new_op, bits)``."""
        return Counter((c.new_op, c.bits) for c in self.converted)

    def skip_reasons(self) -> Counter:
        return Counter(s.reason for s in self.skipped)

    def to_text(self, verbose: bool = False) -> str:
        """A human summary table."""
        lines = []
        counts = self.counts()
        lines.append(f"converted: {len(self.converted)} node(s)")
        for (op, bits), c in sorted(counts.items()):
            algos = sorted({x.algorithm for x in self.converted if x.new_op == op and x.bits == bits})
            lines.append(f"  {op:<14} {bits}-bit  x{c:<5} algorithm: {', '.join(algos)}")
        lines.append(f"skipped:   {len(self.skipped)} node(s)")
        if verbose:
            for s in self.skipped:
                w = f" (weight {s.weight})" if s.weight else ""
                lines.append(f"  {s.op_type:<8} {s.node or '<unnamed>'}{w}: {s.reason}")
        else:
            for reason, c in self.skip_reasons().most_common():
                lines.append(f"  x{c:<5} {reason}")
        notes = [(c.node, n) for c in self.converted for n in c.notes]
        for node, note in notes[: 50 if not verbose else None]:
            lines.append(f"  note: {node}: {note}")
        wb, wa = self.weight_bytes_before, self.weight_bytes_after
        if wb:
            lines.append(f"weights:   {_mb(wb)} -> {_mb(wa)} ({wb / max(wa, 1):.1f}x smaller)")
        if self.model_bytes_before:
            lines.append(f"model:     {_mb(self.model_bytes_before)} -> {_mb(self.model_bytes_after)}")
        lines.append(f"time:      {self.seconds:.2f} s")
        return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"
