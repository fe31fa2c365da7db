"""Where the time and memory of one quantize run go: phases and an RSS timeline, in process.

Runs ort-wq's steps one by one (imports, load, the quantization pass, save) — or, with ``--ort``,
onnxruntime's (imports, ``onnx.load``, ``MatMulNBitsQuantizer.process``, save) — and prints the
time of each phase with the process's anonymous and file-backed RSS (``/proc/self/status``)
sampled every 20 ms, so memory can be attributed to a phase. For the hot functions use a
sampling profiler on the CLI, e.g. ``py-spy record -f raw --threads -- ort-wq quantize ...``.

    python benchmarks/profile_quantize.py                     # the cached 2.5 GB model, block 32
    python benchmarks/profile_quantize.py --size 0.5 --block-size 128 --ort
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

T0 = time.perf_counter()
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) // 1024
    return out


class Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, int, int]] = []

    def run(self) -> None:
        while True:
            s = _status()
            self.samples.append((time.perf_counter() - T0, s.get("RssAnon", 0), s.get("RssFile", 0)))
            time.sleep(0.02)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", help="model to quantize (default: the generated model of --size)")
    ap.add_argument("--size", type=float, default=2.5, help="GB of the generated model when no model is given")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--asym", action="store_true", help="asymmetric (default: symmetric, as bench_quantize.py)")
    ap.add_argument("--ort", action="store_true", help="profile onnxruntime's MatMulNBitsQuantizer instead")
    ap.add_argument("--timeline", type=float, default=1.0, help="print the RSS timeline every N seconds (0: off)")
    args = ap.parse_args(argv)

    sampler = Sampler()
    sampler.start()
    phases: list[tuple[str, float, dict]] = []

    def mark(name: str) -> None:
        phases.append((name, time.perf_counter() - T0, _status()))

    import _gen

    src = Path(args.model) if args.model else _gen.generate(_gen.spec_for_size(args.size))
    out_dir = Path(tempfile.mkdtemp(prefix="profile.", dir=_gen.bench_dir()))
    out = out_dir / "out.onnx"
    sym = not args.asym
    mark("start")
    try:
        if args.ort:
            import logging

            import onnx
            from onnxruntime.quantization.matmul_nbits_quantizer import (
                DefaultWeightOnlyQuantConfig,
                MatMulNBitsQuantizer,
            )

            logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
            mark("imports")
            model = onnx.load(str(src))
            mark("onnx.load (weights into the ModelProto)")
            cfg = DefaultWeightOnlyQuantConfig(block_size=args.block_size, is_symmetric=sym, accuracy_level=4, bits=4)
            quant = MatMulNBitsQuantizer(model, bits=4, block_size=args.block_size, is_symmetric=sym,
                                         accuracy_level=4, algo_config=cfg)
            quant.process()
            mark("MatMulNBitsQuantizer.process")
            quant.model.save_model_to_file(str(out), use_external_data_format=True)
            mark("save_model_to_file (external data)")
        else:
            from ort_wq.transforms import WeightOnlyQuantPass

            from ort_wq.config import WeightOnlyConfig
            from ort_wq.model_io import load_model, save_model

            mark("imports")
            model = load_model(src)
            mark("load_model (graph only, weights memory-mapped)")
            cfg = WeightOnlyConfig(bits=4, block_size=args.block_size, symmetric=sym, accuracy_level=4)
            WeightOnlyQuantPass(cfg)(model)
            mark("WeightOnlyQuantPass (rewrite + quantize + materialize)")
            save_model(model, out, external_data=True)
            mark("save_model (external data)")
        out_bytes = _gen.file_bytes(out)
    finally:
        import shutil

        shutil.rmtree(out_dir, ignore_errors=True)

    tool = "onnxruntime MatMulNBitsQuantizer" if args.ort else "ort-wq"
    print(f"{tool}: {src} ({_gen.file_bytes(src) / 2**20:.0f} MiB) -> {out_bytes / 2**20:.0f} MiB, "
          f"4-bit {'sym' if sym else 'asym'} block {args.block_size}")
    print(f"{'phase':58} {'end s':>7} {'took s':>7} {'anon MiB':>9} {'file MiB':>9} {'peak MiB':>9}")
    prev = phases[0][1]
    for name, t, s in phases[1:]:
        print(f"{name:58} {t:7.2f} {t - prev:7.2f} {s.get('RssAnon', 0):9d} {s.get('RssFile', 0):9d} {s.get('VmHWM', 0):9d}")
        prev = t
    peak = max(sampler.samples, key=lambda x: x[1] + x[2])
    print(f"largest sampled RSS: {peak[1] + peak[2]} MiB at {peak[0]:.2f} s (anon {peak[1]}, file {peak[2]}); "
          f"kernel peak (VmHWM) {_status()['VmHWM']} MiB")
    if args.timeline:
        print("timeline (s, anon MiB, file MiB):")
        nxt = 0.0
        for t, a, f in sampler.samples:
            if t >= nxt:
                print(f"  {t:7.2f} {a:7d} {f:7d}")
                nxt = t + args.timeline
    return 0


if __name__ == "__main__":
    sys.exit(main())
