"""Decode-speed cost of float zero points: onnxruntime MatMulNBits at M=1, uint8 vs float zero points.

One MatMulNBits node per SmolLM2-sized weight (K x N = 576 x 1536, 1536 x 576, 576 x 49152),
4-bit, asymmetric, block 32 and 128, accuracy_level 0 and 4, fed one token (M = 1), as a decoder
step does. Same codes and scales; only the zero points' type differs. Reports the median time
per call and the ratio float / uint8.

    python benchmarks/bench_zero_points.py [--repeat 200]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def _model(k: int, n: int, bs: int, level: int, float_zp: bool):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    kb = -(-k // bs)
    b = rng.integers(0, 256, (n, kb, bs // 2), dtype=np.uint8)
    scales = (rng.uniform(0.5, 1.5, n * kb) * 0.01).astype(np.float32)
    if float_zp:
        zp = rng.uniform(0, 15, n * kb).astype(np.float32)
    else:
        zp = rng.integers(0, 256, n * -(-kb // 2), dtype=np.uint8)
    node = helper.make_node("MatMulNBits", ["a", "b", "s", "z"], ["y"], domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=bs, accuracy_level=level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [numpy_helper.from_array(b, "b"), numpy_helper.from_array(scales, "s"),
                               numpy_helper.from_array(zp, "z")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def _time(model, k: int, repeat: int) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    a = np.random.default_rng(1).standard_normal((1, k)).astype(np.float32)
    for _ in range(5):
        sess.run(None, {"a": a})
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        sess.run(None, {"a": a})
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=200)
    args = ap.parse_args()
    print("| K x N | block | accuracy_level | uint8 zp us | float zp us | float / uint8 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for k, n in ((576, 1536), (1536, 576), (576, 49152)):
        for bs in (32, 128):
            for level in (0, 4):
                t_u8 = _time(_model(k, n, bs, level, False), k, args.repeat)
                t_fl = _time(_model(k, n, bs, level, True), k, args.repeat)
                print(f"| {k} x {n} | {bs} | {level} | {t_u8 * 1e6:.0f} | {t_fl * 1e6:.0f} | {t_fl / t_u8:.1f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
