"""What a quantization run did: converted nodes, quantized tensors, skipped nodes, sizes on disk.

Sizes are counted from the initializers actually in the output (what is written to disk): a
tensor's quantized bytes once however many nodes read them, and the float original where some
node still reads it (e.g. an excluded consumer), so "smaller" is never claimed for bytes that
are still there. :func:`initializer_bytes_by_reader` is shared with ``ort-wq inspect``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

_LOOK_THROUGH = {"Reshape", "Transpose", "Slice", "Cast", "DequantizeLinear", "Identity", "Unsqueeze", "Squeeze"}


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
    shared: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass
class QuantizedTensor:
    """One quantized tensor: its float size, its quantized bytes, and whether the float stays."""

    name: str
    shape: list[int]
    bits: int
    block_size: int
    symmetric: bool
    consumers: list[str]  # "<op_type> <node name>" of every node reading the quantized bytes
    bytes_before: int
    bytes_after: int  # quantized initializers (+ the float tensor when it is kept)
    float_kept: str = ""  # why the float original is still in the output ('' when it is gone)
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
    tensors: list[QuantizedTensor] = field(default_factory=list)
    skipped: list[SkippedNode] = field(default_factory=list)
    seconds: float = 0.0
    model_bytes_before: int = 0
    model_bytes_after: int = 0
    bytes_by_reader: dict[str, int] = field(default_factory=dict)  # output initializers by the ops reading them

    @property
    def weight_bytes_before(self) -> int:
        return sum(t.bytes_before for t in self.tensors)

    @property
    def weight_bytes_after(self) -> int:
        return sum(t.bytes_after for t in self.tensors)

    def counts(self) -> Counter:
        """Converted nodes by ``(new_op, bits)``."""
        return Counter((c.new_op, c.bits) for c in self.converted)

    def skip_reasons(self) -> Counter:
        return Counter(s.reason for s in self.skipped)

    def to_text(self, verbose: bool = False) -> str:
        """A human summary table."""
        lines = [f"converted: {len(self.converted)} node(s), {len(self.tensors)} tensor(s)"]
        for (op, bits), c in sorted(self.counts().items()):
            algos = sorted({x.algorithm for x in self.converted if x.new_op == op and x.bits == bits})
            lines.append(f"  {op:<22} {bits}-bit  x{c:<5} algorithm: {', '.join(algos)}")
        shared = [t for t in self.tensors if len(t.consumers) > 1]
        for t in shared[: None if verbose else 10]:
            lines.append(f"  shared: {t.name} ({_mb(t.bytes_after)}) read by {', '.join(t.consumers)}")
        lines.append(f"skipped:   {len(self.skipped)} node(s)")
        if verbose:
            for s in self.skipped:
                w = f" (weight {s.weight})" if s.weight else ""
                lines.append(f"  {s.op_type:<8} {s.node or '<unnamed>'}{w}: {s.reason}")
        else:
            for reason, c in self.skip_reasons().most_common():
                lines.append(f"  x{c:<5} {reason}")
        for t in self.tensors:
            if t.float_kept:
                lines.append(f"  kept in float: {t.name} ({_mb(t.bytes_before)}): {t.float_kept}")
        notes = list(dict.fromkeys([(t.name, n) for t in self.tensors for n in t.notes]
                                   + [(c.node, n) for c in self.converted for n in c.notes]))
        if verbose:
            lines.extend(f"  note: {where}: {note}" for where, note in notes)
        else:  # a note shared by many tensors (an algorithm's settings) is shown once, counted
            places: dict[str, list[str]] = {}
            for where, note in notes:
                places.setdefault(note, []).append(where)
            for note, wheres in list(places.items())[:50]:
                where = wheres[0] if len(wheres) == 1 else f"{len(wheres)} tensors/nodes"
                lines.append(f"  note: {where}: {note}")
        wb, wa = self.weight_bytes_before, self.weight_bytes_after
        if wb:
            lines.append(f"weights:   {_mb(wb)} -> {_mb(wa)} ({wb / max(wa, 1):.1f}x smaller, float kept included)")
        if self.model_bytes_before:
            lines.append(f"model:     {_mb(self.model_bytes_before)} -> {_mb(self.model_bytes_after)} of initializers")
        if self.bytes_by_reader:
            lines.append("on disk:   " + format_by_reader(self.bytes_by_reader))
        lines.append(f"time:      {self.seconds:.2f} s")
        return "\n".join(lines)


def _by_size(d: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(d.items(), key=lambda kv: -kv[1])


def format_by_reader(d: dict[str, int], min_bytes: int = 10_000) -> str:
    """``op A MB, op B MB, other C MB``: readers under ``min_bytes`` summed as ``other``."""
    big = [(k, v) for k, v in _by_size(d) if v >= min_bytes]
    rest = sum(v for v in d.values() if v < min_bytes)
    return ", ".join(f"{k} {_mb(v)}" for k, v in [*big, *([("other", rest)] if rest else [])])


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def initializer_bytes(value: Any) -> int:
    t = value.const_value
    return int(t.nbytes) if t is not None else 0


def readers(value: Any) -> list[str]:
    """Op types of the nodes that read ``value``, looking through Reshape/Transpose/DequantizeLinear/..."""
    out, todo, seen = set(), [value], set()
    while todo:
        v = todo.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if v.is_graph_output():
            out.add("graph output")
        for use in v.uses():
            node = use.node
            if node.op_type in _LOOK_THROUGH and use.idx == 0:
                todo.extend(node.outputs)
            else:
                out.add(node.op_type)
    return sorted(out)


def initializer_bytes_by_reader(model: Any) -> dict[str, int]:
    """Bytes of every initializer of the model (subgraphs included), by the ops that read it."""
    totals: Counter = Counter()
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            label = "+".join(readers(value)) or "unused"
            totals[label] += initializer_bytes(value)
    return dict(totals)
