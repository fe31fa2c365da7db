"""Weight quantization algorithms: from a float weight ``W[K, N]`` to quantized blocks.

Every algorithm returns a :class:`QuantizedWeight` in the kernel's unsigned form; the packing
layer turns it into bytes. Algorithms that need calibration read :class:`LayerStats`.
"""

from __future__ import annotations

from .base import LayerStats, QuantizedWeight, QuantSpec, get_algorithm, list_algorithms

__all__ = ["LayerStats", "QuantizedWeight", "QuantSpec", "get_algorithm", "list_algorithms"]
