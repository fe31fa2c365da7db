"""How the default settings were chosen: accuracy per byte on the shared MiniLM model.

Round-to-nearest at each bits / block size / symmetry / accuracy level; prints mean cosine
similarity and nearest-neighbour agreement of the sentence embeddings against fp32 (on rows
128-255 of dev_inputs.npz) and the bytes of the quantized weights.

    python benchmarks/bench_defaults.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _minilm as M  # noqa: E402

from ort_wq import WeightOnlyConfig, quantize  # noqa: E402


def main() -> int:
    if not M.available():
        print(f"needs {M.MINILM} and {M.INPUTS}")
        return 2
    feeds = M.inputs(slice(128, 256))
    ref = M.embed(M.MINILM, feeds)
    grid = [(4, bs) for bs in (32, 64, 128, -1)] + [(8, 32), (8, 128)]
    print(f"{'bits':>4} {'block':>5} {'scheme':>6} {'acc':>3} {'cosine':>8} {'nn-agree':>8} {'weights MB':>10} {'bits/w':>6} {'time s':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "q.onnx")
        for bits, bs in grid:
            for sym in (True, False):
                for acc in (0, 4):
                    cfg = WeightOnlyConfig(bits=bits, block_size=bs, symmetric=sym, accuracy_level=acc)
                    t = time.perf_counter()
                    _, rep = quantize(str(M.MINILM), cfg, output=out, return_report=True)
                    dt = time.perf_counter() - t
                    cos, nn = M.quality(ref, M.embed(out, feeds))
                    n_w = rep.weight_bytes_before / 4
                    print(f"{bits:>4} {bs:>5} {'sym' if sym else 'asym':>6} {acc:>3} {cos:>8.5f} {nn:>8.3f} "
                          f"{rep.weight_bytes_after / 1e6:>10.2f} {8 * rep.weight_bytes_after / n_w:>6.2f} {dt:>6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
