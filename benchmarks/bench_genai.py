"""Decode speed in onnxruntime-genai: the fp32 model, the genai builder's int4, ort-wq's output.

    python benchmarks/bench_genai.py [--model DIR] [--builder-int4 DIR] [--tokens 64] [--repeats 3]

Each folder is loaded with ``onnxruntime_genai.Model``; greedy generation from the chat prompt
"What is the capital of France?" for ``--tokens`` new tokens; reported: prompt time, decode
tokens/s (median of ``--repeats``), and the start of the answer. ort-wq's output is made in a
temporary folder from ``--model`` with the default settings (side files copied). Needs
``pip install onnxruntime-genai``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import command_line, machine, md_table, median  # noqa: E402
from _llm import SMOLLM2 as DEFAULT_MODEL  # noqa: E402

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def decode(folder: Path, tokens: int) -> tuple[float, float, str]:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    tok = og.Tokenizer(model)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=4096, do_sample=False)
    gen = og.Generator(model, params)
    ids = tok.encode(PROMPT)
    t0 = time.perf_counter()
    gen.append_tokens(ids)
    t1 = time.perf_counter()
    n = 0
    while not gen.is_done() and n < tokens:
        gen.generate_next_token()
        n += 1
    t2 = time.perf_counter()
    text = tok.decode(gen.get_sequence(0)[len(ids):])
    return t1 - t0, n / (t2 - t1), text.replace("\n", " ")[:40]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--builder-int4", type=Path)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import ort_wq

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_genai_") as tmp:
        ours = Path(tmp) / "ort-wq"
        ours.mkdir()
        for f in args.model.iterdir():
            if not f.name.startswith("model.onnx"):
                shutil.copy(f, ours / f.name)
        ort_wq.quantize(str(args.model / "model.onnx"), ort_wq.WeightOnlyConfig(), output=ours / "model.onnx")
        folders = [("fp32", args.model)]
        if args.builder_int4:
            folders.append(("onnxruntime-genai builder int4", args.builder_int4))
        folders.append(("ort-wq default", ours))
        for label, folder in folders:
            runs = [decode(folder, args.tokens) for _ in range(args.repeats)]
            mb = sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx")) / 1e6
            rows.append([label, f"{mb:.1f}", f"{median([r[0] for r in runs]) * 1e3:.0f}",
                         f"{median([r[1] for r in runs]):.1f}", repr(runs[0][2])])
            print(" | ".join(rows[-1]), flush=True)
    print(f"\n`{command_line()}` on {machine()}\n")
    print(md_table(["model", "MB", "prompt ms", "decode tokens/s", "answer"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
