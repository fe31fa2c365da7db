"""Inference speed and accuracy of ort-wq's quantized models against fp32, in onnxruntime (CPU).

The generated LLM-shaped model (default: the 0.5 GB one of ``bench_quantize.py``, same cache) is
quantized by ort-wq with the default settings (4-bit asymmetric, block 32) and with 4-bit
symmetric block 128, each at ``accuracy_level`` 0 (float math) and 4 (int8 activations, the
default). All sessions are created once; then, round after round (``--rounds``), each session
runs a batch-1 single-token step (M=1) and a 128-token prompt in turn, in a rotating order, and
the median latency over all rounds is reported with the speed-up over fp32. Accuracy: logits of
four random 128-token prompts against fp32 (relative L2 error, mean cosine per token, top-1
agreement).

    python benchmarks/bench_inference.py                 # 0.5 GB model
    python benchmarks/bench_inference.py --size 2.5 --rounds 3
    python benchmarks/bench_inference.py --quick         # smoke run on a 0.1 GB model

A full run rewrites its section of ``benchmarks/README.md`` (not with ``--quick`` or ``--no-readme``).
Exit status 1 when the target check fails, else 0.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _gen
import _report as R

TARGET_SPEEDUP_M1 = 3.0  # our default output vs fp32, single-token step

# (label, symmetric, block_size, accuracy_level); the first is ort-wq's default
VARIANTS = [
    ("4-bit asym b32, acc 4 (default)", False, 32, 4),
    ("4-bit asym b32, acc 0", False, 32, 0),
    ("4-bit sym b128, acc 4", True, 128, 4),
    ("4-bit sym b128, acc 0", True, 128, 0),
]


def session(path: Path, threads: int | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def timed(sess, feeds, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        sess.run(None, feeds)
        out.append(time.perf_counter() - t)
    return out


def accuracy(ref: np.ndarray, out: np.ndarray) -> tuple[float, float, float]:
    r = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    o = out.reshape(-1, out.shape[-1]).astype(np.float64)
    rel = float(np.linalg.norm(o - r) / np.linalg.norm(r))
    cos = float(np.mean(np.sum(r * o, 1) / (np.linalg.norm(r, axis=1) * np.linalg.norm(o, axis=1))))
    top1 = float(np.mean(r.argmax(1) == o.argmax(1)))
    return rel, cos, top1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=float, default=0.5, help="GB of fp32 MatMul weights of the generated model")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--mlp", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--prompt", type=int, default=128, help="prompt length (tokens)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds over all sessions (alternation)")
    ap.add_argument("--step-runs", type=int, default=20, help="timed single-token runs per session per round")
    ap.add_argument("--prompt-runs", type=int, default=3, help="timed prompt runs per session per round")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    ap.add_argument("--quick", action="store_true", help="smoke run: a 0.1 GB model (hidden 1024), 2 rounds")
    ap.add_argument("--no-readme", action="store_true", help="do not rewrite benchmarks/README.md")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.hidden, args.mlp, args.vocab = 0.1, 1024, 4096, 2048
        args.rounds, args.step_runs, args.prompt_runs = 2, 5, 1

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    from ort_wq import WeightOnlyConfig, quantize

    started = time.time()
    info = R.machine()
    log(f"machine: {info}")
    spec = _gen.spec_for_size(args.size, args.hidden, args.mlp, args.vocab)
    src = _gen.generate(spec, log=log)
    work = Path(tempfile.mkdtemp(prefix="infer.", dir=_gen.bench_dir()))
    try:
        paths = {"fp32": src}
        for label, sym, block, acc in VARIANTS:
            out = work / f"q_{'sym' if sym else 'asym'}{block}_acc{acc}.onnx"
            cfg = WeightOnlyConfig(bits=4, block_size=block, symmetric=sym, accuracy_level=acc)
            t = time.perf_counter()
            quantize(str(src), cfg, output=str(out))
            log(f"quantized {label} in {time.perf_counter() - t:.1f} s: {_gen.file_bytes(out) / 1e6:.0f} MB")
            paths[label] = out
        sessions = {label: session(p, args.threads) for label, p in paths.items()}

        rng = np.random.default_rng(1)
        step = {"input_ids": rng.integers(0, spec.vocab, size=(1, 1), dtype=np.int64)}
        prompt = {"input_ids": rng.integers(0, spec.vocab, size=(1, args.prompt), dtype=np.int64)}
        check = {"input_ids": rng.integers(0, spec.vocab, size=(4, args.prompt), dtype=np.int64)}

        ref = sessions["fp32"].run(None, check)[0]
        acc = {label: accuracy(ref, s.run(None, check)[0]) for label, s in sessions.items() if label != "fp32"}
        for s in sessions.values():  # warm-up
            s.run(None, step)
            s.run(None, prompt)

        times: dict[str, dict[str, list[float]]] = {label: {"step": [], "prompt": []} for label in sessions}
        labels = list(sessions)
        for r in range(args.rounds):
            order = labels[r % len(labels):] + labels[: r % len(labels)]
            for label in order:
                times[label]["step"] += timed(sessions[label], step, args.step_runs)
                times[label]["prompt"] += timed(sessions[label], prompt, args.prompt_runs)
            log(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{lb.split(' (')[0]} {1e3 * R.median(times[lb]['step']):.1f} ms" for lb in labels))
        del sessions
    finally:
        sizes = {label: _gen.file_bytes(p) for label, p in paths.items()} if "paths" in locals() else {}
        shutil.rmtree(work, ignore_errors=True)

    med = {label: {k: R.median(v) for k, v in t.items()} for label, t in times.items()}
    base = med["fp32"]
    headers = ["model", "size MB", "M=1 step ms", "speed-up", f"{args.prompt}-token prompt ms", "speed-up",
               "rel. L2 error", "cosine", "top-1 agree"]
    rows = [["fp32", f"{sizes['fp32'] / 1e6:.0f}", f"{1e3 * base['step']:.2f}", "1.00x",
             f"{1e3 * base['prompt']:.1f}", "1.00x", "0", "1", "100%"]]
    for label, *_ in VARIANTS:
        m = med[label]
        rel, cos, top1 = acc[label]
        rows.append([f"ort-wq {label}", f"{sizes[label] / 1e6:.0f}", f"{1e3 * m['step']:.2f}",
                     f"{base['step'] / m['step']:.2f}x", f"{1e3 * m['prompt']:.1f}",
                     f"{base['prompt'] / m['prompt']:.2f}x", f"{rel:.4f}", f"{cos:.5f}", f"{top1:.1%}"])
    table = R.md_table(headers, rows)

    default = VARIANTS[0][0]
    speedup = base["step"] / med[default]["step"]
    ok = speedup >= TARGET_SPEEDUP_M1
    acc_cost = [f"accuracy_level 4 vs 0: {lb4.split(',')[0]}: rel. error {acc[lb4][0]:.4f} vs {acc[lb0][0]:.4f}, "
                f"cosine {acc[lb4][1]:.5f} vs {acc[lb0][1]:.5f}"
                for (lb4, *_), (lb0, *_) in zip(VARIANTS[0::2], VARIANTS[1::2])]
    body = "\n".join([
        "### Inference: fp32 vs ort-wq's quantized model in onnxruntime",
        "",
        (f"`{R.command_line()}` — {time.strftime('%Y-%m-%d')}, {info}; model: {spec.describe()}; "
        f"onnxruntime CPU, {args.threads or 'default'} intra-op threads; median of {args.rounds} rounds x "
        f"{args.step_runs} steps / {args.prompt_runs} prompts per session, sessions alternating; "
        f"total {(time.time() - started) / 60:.1f} min."),
        "",
        ("Batch 1: `M=1 step` = one token (`input_ids` [1, 1]); prompt = [1, "
        f"{args.prompt}]. Accuracy: logits of 4 random {args.prompt}-token prompts vs fp32 "
        "(random weights, so these are relative measures of the quantization error, not task quality)."),
        "",
        table,
        "",
        *[f"- {line}" for line in acc_cost],
        "",
        "Target:",
        "",
        (f"- {'PASS' if ok else 'FAIL'}: M=1 step, ort-wq default ({default.split(' (')[0]}) >= {TARGET_SPEEDUP_M1:.0f}x faster "
        f"than fp32: {speedup:.2f}x ({1e3 * base['step']:.2f} ms -> {1e3 * med[default]['step']:.2f} ms)"),
    ])
    print()
    print(body)
    if not (args.quick or args.no_readme):
        R.update_readme("bench_inference", body)
        log(f"\nwrote {R.README}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
