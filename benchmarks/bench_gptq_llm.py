"""Calibrated algorithms at LLM scale: time and peak RSS, ort-wq against onnxruntime's GPTQ.

Two cases, every run a fresh process (``benchmarks/_gptq_child.py``), tools alternating:

1. one LLM down projection, ``MatMul`` with an 11008 x 1024 fp32 weight (K = 11008), calibrated
   on the same ``--batches`` x ``[1, --rows, 11008]`` activations: ort-wq ``gptq`` vs
   onnxruntime's ``MatMulNBitsQuantizer`` with ``GPTQWeightOnlyQuantConfig`` (4-bit, block 32,
   asymmetric, accuracy_level 4 for both);
2. the full SmolLM2-135M folder (``/root/.cache/ort-wq-dev/smollm2-135m``, 30 layers, 151 MatMuls)
   calibrated on the same ``--windows`` x ``--seq-len`` tokens of ``dev_text.txt``: ort-wq
   ``rtn`` (no calibration, the memory yardstick), ``gptq`` and ``awq``, and onnxruntime's GPTQ
   (``--no-ort-llm`` skips it).

Targets: gptq on the layer <= 0.35x onnxruntime's GPTQ time and <= 0.5x its peak RSS; gptq and
awq on the whole LLM <= 2x ort-wq rtn's peak RSS.

    python benchmarks/bench_gptq_llm.py                 # both cases, 1 repeat
    python benchmarks/bench_gptq_llm.py --case layer --repeats 3

onnxruntime's GPTQ imports torch: ``pip install torch==2.13.0`` in the benchmark's environment.
Exit status 1 when a target is missed or a run failed. A full run rewrites its section of
``benchmarks/README.md`` (not with ``--no-readme``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _report as R  # noqa: E402

TARGET_LAYER_WALL, TARGET_LAYER_RSS, TARGET_LLM_RSS = 0.35, 0.5, 2.0
SMOLLM2 = Path(os.environ.get("ORT_WQ_DEV_CACHE", Path.home() / ".cache" / "ort-wq-dev")) / "smollm2-135m"
WORK = Path(os.environ.get("ORT_WQ_BENCH_DIR", "/tmp/ort-wq-bench"))


def layer_model(k: int, n: int) -> Path:
    """A one-MatMul model ``x [batch, rows, k] @ W[k, n]`` with external data (cached)."""
    path = WORK / f"layer_{k}x{n}.onnx"
    if path.exists():
        return path
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    WORK.mkdir(parents=True, exist_ok=True)
    w = (np.random.default_rng(0).standard_normal((k, n)) * 0.02).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="down_proj")], "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "rows", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "rows", n])], [numpy_helper.from_array(w, "W")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.save(model, path, save_as_external_data=True, location=path.name + ".data")
    return path


def run(case: str, tool: str, model: Path, extra: list[str]) -> R.ChildRun:
    out = WORK / f"out_{case}_{tool}"
    shutil.rmtree(out, ignore_errors=True)
    for p in WORK.glob(f"out_{case}_{tool}.onnx*"):
        p.unlink()
    target = out if case == "llm" else WORK / f"out_{case}_{tool}.onnx"
    cmd = [sys.executable, str(HERE / "_gptq_child.py"), case, tool, str(model), str(target), *extra]
    result = R.run_child(cmd)
    shutil.rmtree(out, ignore_errors=True)
    for p in WORK.glob(f"out_{case}_{tool}.onnx*"):
        p.unlink()
    os.sync()
    return result


def measure(case: str, tools: list[str], model: Path, extra: list[str], repeats: int) -> dict[str, list[R.ChildRun]]:
    runs: dict[str, list[R.ChildRun]] = {t: [] for t in tools}
    for r in range(repeats):
        for tool in tools if r % 2 == 0 else tools[::-1]:
            res = run(case, tool, model, extra)
            print(f"  {case} {tool}: {res.wall:.1f} s, {res.peak_rss / 2**20:.0f} MiB"
                  + ("" if res.ok else f"  FAILED: {res.stderr.strip().splitlines()[-1:]}"), flush=True)  # fmt: skip
            runs[tool].append(res)
    return runs


def summary(runs: dict[str, list[R.ChildRun]]) -> dict[str, tuple[float, float, bool]]:
    out = {}
    for tool, rs in runs.items():
        ok = [r for r in rs if r.ok]
        out[tool] = (R.median([r.wall for r in ok]) if ok else float("nan"),
                     R.median([r.peak_rss for r in ok]) / 2**20 if ok else float("nan"), len(ok) == len(rs))  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=("layer", "llm", "both"), default="both")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--batches", type=int, default=8, help="layer case: calibration batches")
    ap.add_argument("--rows", type=int, default=512, help="layer case: rows per batch")
    ap.add_argument("--windows", type=int, default=8, help="LLM case: calibration windows")
    ap.add_argument("--seq-len", type=int, default=256, help="LLM case: tokens per window")
    ap.add_argument("--no-ort-llm", action="store_true", help="LLM case: skip onnxruntime's GPTQ")
    ap.add_argument("--no-readme", action="store_true")
    args = ap.parse_args()
    start = time.time()
    lines, failed = [], False
    header = ["case", "tool", "wall s (median)", "peak RSS MiB", "wall / anchor", "RSS / anchor", "target"]
    rows = []
    if args.case in ("layer", "both"):
        model = layer_model(11008, 1024)
        print(f"layer 11008x1024, {args.batches} x [1, {args.rows}, 11008] calibration rows", flush=True)
        s = summary(measure("layer", ["ours", "ort"], model, ["--batches", str(args.batches), "--rows", str(args.rows)],
                            args.repeats))  # fmt: skip
        (ow, orss, ook), (tw, trss, tok) = s["ours"], s["ort"]
        met = ook and tok and ow <= TARGET_LAYER_WALL * tw and orss <= TARGET_LAYER_RSS * trss
        failed |= not met
        rows.append(["11008x1024 layer", "onnxruntime GPTQ", f"{tw:.1f}", f"{trss:.0f}", "1", "1", ""])
        rows.append(["11008x1024 layer", "ort-wq gptq", f"{ow:.1f}", f"{orss:.0f}", f"{ow / tw:.2f}x", f"{orss / trss:.2f}x",
                     f"<= {TARGET_LAYER_WALL}x time, <= {TARGET_LAYER_RSS}x RSS: {'met' if met else 'MISSED'}"])  # fmt: skip
    if args.case in ("llm", "both"):
        if not (SMOLLM2 / "model.onnx").exists():
            print(f"{SMOLLM2} is absent (build it with ../shared/llm/build_smollm2.sh); LLM case skipped")
        else:
            tools = ["ours-rtn", "ours-gptq", "ours-awq"] + ([] if args.no_ort_llm else ["ort-gptq"])
            print(f"SmolLM2-135M, {args.windows} x {args.seq_len} calibration tokens", flush=True)
            s = summary(measure("llm", tools, SMOLLM2, ["--windows", str(args.windows), "--seq-len", str(args.seq_len)],
                                args.repeats))  # fmt: skip
            rw, rrss, _ = s["ours-rtn"]
            for tool in tools:
                w, rss, ok = s[tool]
                target = ""
                if tool in ("ours-gptq", "ours-awq"):
                    met = ok and rss <= TARGET_LLM_RSS * rrss
                    failed |= not met
                    target = f"<= {TARGET_LLM_RSS}x rtn RSS: {'met' if met else 'MISSED'}"
                name = {"ours-rtn": "ort-wq rtn", "ours-gptq": "ort-wq gptq", "ours-awq": "ort-wq awq",
                        "ort-gptq": "onnxruntime GPTQ"}[tool]  # fmt: skip
                rows.append(["SmolLM2-135M", name + ("" if ok else " (FAILED)"), f"{w:.1f}", f"{rss:.0f}",
                             f"{w / rw:.2f}x", f"{rss / rrss:.2f}x", target])  # fmt: skip
    table = R.md_table(header, rows)
    lines = [f"### Calibrated algorithms at LLM scale: ort-wq vs onnxruntime's GPTQ", "",
             f"`{R.command_line()}` — {time.strftime('%Y-%m-%d')}, {R.machine()}; {args.repeats} run(s) per tool, "
             f"alternating, median; total {(time.time() - start) / 60:.1f} min.", "",
             "4-bit, block 32, asymmetric, accuracy_level 4; each run a fresh process (load, calibrate, quantize, "
             "save); peak RSS = the process's ru_maxrss. Anchor: onnxruntime's GPTQ for the layer, ort-wq rtn for "
             f"the LLM. Layer: {args.batches} x [1, {args.rows}, 11008] activations (same for both). LLM: "
             f"{args.windows} windows x {args.seq_len} tokens of dev_text.txt.", "", table]  # fmt: skip
    text = "\n".join(lines)
    print(text)
    if not args.no_readme and args.case == "both":
        R.update_readme("bench_gptq_llm", text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
