"""Accuracy of the algorithms side by side with onnxruntime's quantizer.

On the full SmolLM2-135M (onnxruntime-genai fp32 folder, ``../shared/llm/build_smollm2.sh``):
teacher-forced perplexity on ``smollm2-2l/dev_tokens.npz`` (8 x 256 tokens of the GPL text),
output size and quantization time, onnxruntime's ``MatMulNBitsQuantizer`` (default RTN) and ours
in the same run; the tied embedding stays fp32 for its Gather on both sides (like with like:
onnxruntime's quantizer leaves it), calibration (imatrix/gptq/awq) on 8 x 256 tokens of the same
text after the evaluation tokens. On the shared MiniLM model: each of ours at 4-bit, block 32
and 128, sym and asym. Calibration uses rows 0-127 of ``dev_inputs.npz``; quality (mean cosine
of the embeddings to fp32, nearest-neighbour agreement) is measured on rows 128-255. Then a
generated LM-like model with outlier activation channels, where the activation-aware algorithms
must beat round-to-nearest. Prints tables and rewrites its section of ``benchmarks/README.md``.

    python benchmarks/bench_algorithms.py [--algorithms rtn,hqq,...] [--blocks 32,128]
        [--llm-algorithms rtn,imatrix] [--llm-settings 128-sym,32-sym] [--skip-llm] [--no-readme]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _llm as L  # noqa: E402
import _minilm as M  # noqa: E402

from ort_wq import WeightOnlyConfig, quantize  # noqa: E402

ALGORITHMS = ["rtn", "rtn-clip", "hqq", "imatrix", "gptq", "awq"]
CALIBRATED = ("imatrix", "gptq", "awq")
MATMULS = ("MatMul", "Gemm", "FusedMatMul")


def _ort(src: str, out: str, block: int, sym: bool) -> float:
    t = time.perf_counter()
    cmd = [sys.executable, os.path.join(HERE, "_ort_quantize.py"), src, out, "--bits", "4", "--block-size", str(block),
           "--sym" if sym else "--asym", "--accuracy-level", "0"]
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t


def _ours(src, out: str, algorithm: str, block: int, sym: bool, calibration) -> float:
    # the embedding Gather stays float, as onnxruntime's quantizer leaves it: like with like
    cfg = WeightOnlyConfig(bits=4, block_size=block, symmetric=sym, algorithm=algorithm, accuracy_level=0,
                           op_types=MATMULS)
    t = time.perf_counter()
    quantize(src, cfg, output=out, calibration=calibration if algorithm in CALIBRATED else None)
    return time.perf_counter() - t


def minilm_table(algorithms: list[str], blocks: list[int]) -> list[str]:
    calib_rows, eval_rows = slice(0, 128), slice(128, 256)
    calib = M.inputs(calib_rows)
    calibration = [{k: v[i : i + 16] for k, v in calib.items()} for i in range(0, 128, 16)]
    feeds = M.inputs(eval_rows)
    ref = M.embed(M.MINILM, feeds)
    rows = ["| quantizer | block | scheme | cosine | nn-agree | time s |", "| --- | --- | --- | --- | --- | --- |"]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "q.onnx")
        for block in blocks:
            for sym in (True, False):
                scheme = "sym" if sym else "asym"
                dt = _ort(str(M.MINILM), out, block, sym)
                cos, nn = M.quality(ref, M.embed(out, feeds))
                rows.append(f"| onnxruntime MatMulNBitsQuantizer | {block} | {scheme} | {cos:.4f} | {nn:.3f} | {dt:.1f} |")
                print(rows[-1], flush=True)
                for alg in algorithms:
                    dt = _ours(str(M.MINILM), out, alg, block, sym, calibration)
                    cos, nn = M.quality(ref, M.embed(out, feeds))
                    rows.append(f"| ort-wq {alg} | {block} | {scheme} | {cos:.4f} | {nn:.3f} | {dt:.1f} |")
                    print(rows[-1], flush=True)
    return rows


def smollm2_table(algorithms: list[str], settings: list[tuple[int, bool]], folder=L.SMOLLM2,
                  ids: np.ndarray | None = None) -> list[str]:
    src = folder / "model.onnx"
    ids = L.dev_tokens() if ids is None else ids
    ref = L.log_probs(src, ids)
    toks = L.calibration_tokens(8, 256)
    calibration = None if toks is None else [L.feeds_for(src, toks[i : i + 2]) for i in range(0, len(toks), 2)]
    rows = [f"fp32: perplexity {np.exp(L.nll(ref, ids)):.2f}, {L.model_bytes(src) / 1e6:.0f} MB", "",
            "| quantizer | block | scheme | perplexity | KL to fp32 | size MB | time s |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (block, sym) in enumerate(settings):
            scheme = "sym" if sym else "asym"
            runs = [("onnxruntime MatMulNBitsQuantizer", None), *((f"ort-wq {a}", a) for a in algorithms)]
            for j, (label, alg) in enumerate(runs):
                if alg in CALIBRATED and calibration is None:
                    print(f"skipping {alg}: the optional 'tokenizers' package is needed for calibration tokens")
                    continue
                out = os.path.join(tmp, f"{i}-{j}", "model.onnx")
                os.makedirs(os.path.dirname(out))
                if alg is None:
                    dt = _ort(str(src), out, block, sym)
                else:
                    cfg = WeightOnlyConfig(bits=4, block_size=block, symmetric=sym, algorithm=alg, accuracy_level=0,
                                           op_types=MATMULS)
                    t = time.perf_counter()
                    quantize(str(src), cfg, output=out, calibration=calibration if alg in CALIBRATED else None)
                    dt = time.perf_counter() - t
                lp = L.log_probs(out, ids)
                rows.append(f"| {label} | {block} | {scheme} | {np.exp(L.nll(lp, ids)):.2f} | {L.kl(ref, lp):.4f} | "
                            f"{L.model_bytes(out) / 1e6:.1f} | {dt:.1f} |")
                print(rows[-1], flush=True)
                del lp
    return rows


def lm_table(algorithms: list[str], block: int = 128) -> list[str]:
    import onnxruntime as ort

    from ort_wq.demo import build_transformer

    model = build_transformer(layers=4, hidden=512, vocab=2000, outlier_channels=8, seed=1)
    rng = np.random.default_rng(0)
    calibration = [{"input_ids": rng.integers(0, 2000, (4, 64), dtype=np.int64)} for _ in range(8)]
    ev = {"input_ids": rng.integers(0, 2000, (8, 64), dtype=np.int64)}

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, ev)[0]

    ref = run(model).reshape(-1, 2000).astype(np.float64)
    rows = ["| algorithm | scheme | rel. L2 error of logits | top-1 agree | time s |", "| --- | --- | --- | --- | --- |"]
    for sym in (True, False):
        for alg in algorithms:
            cfg = WeightOnlyConfig(bits=4, block_size=block, symmetric=sym, algorithm=alg, accuracy_level=0)
            t = time.perf_counter()
            q = quantize(model, cfg, calibration=calibration if alg in CALIBRATED else None)
            dt = time.perf_counter() - t
            out = run(q).reshape(-1, 2000).astype(np.float64)
            rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
            top1 = np.mean(out.argmax(1) == ref.argmax(1))
            rows.append(f"| {alg} | {'sym' if sym else 'asym'} | {rel:.4f} | {top1:.3f} | {dt:.1f} |")
            print(rows[-1], flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algorithms", default=",".join(ALGORITHMS))
    ap.add_argument("--blocks", default="32,128")
    ap.add_argument("--llm-algorithms", default="rtn,rtn-clip,hqq,imatrix,gptq,awq")
    ap.add_argument("--llm-settings", default="32-sym,128-sym,32-asym,128-asym", help="block-scheme list")
    ap.add_argument("--skip-llm", action="store_true", help="no SmolLM2 table")
    ap.add_argument("--llm", type=Path, default=L.SMOLLM2, metavar="DIR",
                    help="the onnxruntime-genai fp32 model folder of the LLM table (default: the full SmolLM2-135M; "
                         "e.g. a cut one from build_smollm2.sh --layers N)")
    ap.add_argument("--llm-text", choices=("dev", "held-out"), default="dev",
                    help="the LLM table's evaluation tokens: dev = dev_tokens.npz (8 x 256, what the defaults were "
                         "chosen on); held-out = the windows of dev_text.txt after it and the calibration tokens "
                         "(13 x 256; needs the tokenizers package)")
    ap.add_argument("--skip-minilm", action="store_true", help="no MiniLM table")
    ap.add_argument("--no-readme", action="store_true", help="do not rewrite benchmarks/README.md")
    args = ap.parse_args()
    algorithms = args.algorithms.split(",")
    blocks = [int(b) for b in args.blocks.split(",")]
    sections = []
    if args.skip_llm:
        pass
    elif L.available(args.llm):
        settings = [(int(b), s == "sym") for b, s in (x.split("-") for x in args.llm_settings.split(","))]
        name = "SmolLM2-135M-Instruct (full, 30 layers, onnxruntime-genai fp32)" if args.llm == L.SMOLLM2 else f"`{args.llm.name}`"
        ids = None
        text = "the 8 x 256 tokens of `smollm2-2l/dev_tokens.npz`"
        if args.llm_text == "held-out":
            ids = L.held_out_tokens()
            if ids is None:
                print("--llm-text held-out needs the tokenizers package (pip install tokenizers)", file=sys.stderr)
                return 2
            text = f"the {ids.shape[0]} x {ids.shape[1]} held-out tokens of `dev_text.txt` (after the dev and calibration tokens)"
        print(f"{args.llm.name} (4-bit, accuracy_level 0; perplexity on {text})")
        sections += [f"{name}, 4-bit, accuracy_level 0: "
                     f"teacher-forced perplexity and mean KL(fp32 || quantized) per token on {text}; "
                     "the tied embedding stays fp32 for its Gather on both sides; "
                     "imatrix/gptq/awq calibrated on the next 2,048 tokens of the same text; time = quantization "
                     "(load, calibrate, quantize, save). Its linear weights lie on a Q4_1 grid: asymmetric block 32 "
                     "favours every asymmetric method there.", "",
                     *smollm2_table(args.llm_algorithms.split(","), settings, args.llm, ids), ""]
    else:
        print(f"skipping the LLM table: {args.llm} has no model.onnx (bash ../shared/llm/build_smollm2.sh)")
    if args.skip_minilm:
        pass
    elif M.available():
        print("MiniLM (4-bit, accuracy_level 0; calibrate rows 0-127, evaluate rows 128-255)")
        sections += ["MiniLM sentence embedder, 4-bit, accuracy_level 0; mean cosine similarity of the embeddings to "
                     "fp32 and nearest-neighbour agreement on rows 128-255 of dev_inputs.npz (imatrix/gptq/awq calibrated on "
                     "rows 0-127); time = quantization (load, calibrate, quantize, save).", "",
                     *minilm_table(algorithms, blocks), ""]
    else:
        print(f"skipping MiniLM: {M.MINILM} not found")
    print("generated LM-like model with outlier channels (4 layers, hidden 512, 4-bit block 128)")
    sections += ["Generated LM-like model with outlier activation channels (`ort_wq.demo.build_transformer`, 4 layers, "
                 "hidden 512, 8 LayerNorm channels scaled 20-50x), 4-bit block 128: error of the logits vs fp32 on "
                 "held-out token ids.", "",
                 *lm_table(algorithms), ""]
    if not args.no_readme:
        from _report import machine, update_readme

        header = f"### Accuracy: algorithms vs onnxruntime's quantizer\n\n`python benchmarks/bench_algorithms.py` — {machine()}."
        update_readme("bench_algorithms", "\n".join([header, "", *sections]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
