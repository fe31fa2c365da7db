"""Quantize speed and memory: ``ort-wq quantize`` against onnxruntime's ``MatMulNBitsQuantizer``.

For each model (generated LLM-shaped models of the given sizes, cached with external data; the
shared MiniLM; and the full SmolLM2-135M from ``../shared/llm/build_smollm2.sh``, a real LLM with a
tied embedding/head, run with ort-wq's default asymmetric setting) and each block size, both tools
run round-to-nearest 4-bit (symmetric on the generated models) with ``accuracy_level=4``, each in its own process, alternating (ours first on even repeats, theirs
first on odd ones), ``--repeats`` times. Reported per tool: median wall time of the whole process
(interpreter start, load, quantize, save), fp32 MatMul weights per second, peak RSS of the
process as the kernel reports it (``ru_maxrss`` from ``wait4``), output size, MatMulNBits nodes;
and the ratios ours/theirs. Then the speed and memory targets, checked on the largest generated model.

    python benchmarks/bench_quantize.py                       # 0.5 and 2.5 GB, blocks 32 and 128, 3 repeats
    python benchmarks/bench_quantize.py --sizes 0.5 --repeats 5
    python benchmarks/bench_quantize.py --quick               # smoke run: a 0.1 GB model, one repeat

Models are cached in ``$ORT_WQ_BENCH_DIR`` (default ``/tmp/ort-wq-bench``). A full run rewrites
its section of ``benchmarks/README.md`` (not with ``--quick`` or ``--no-readme``). Exit status 1
when a target check fails (or a tool failed), else 0.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _gen
import _report as R

# speed and memory targets (ratios measured side by side in one run)
TARGET_WALL = 0.8  # ours / onnxruntime, wall time, on the 2.5 GB model
TARGET_RSS = 0.5  # ours / onnxruntime, peak RSS, on the 2.5 GB model
TARGET_RSS_ABS = 1.5  # ours < 1.5 x (quantized output + largest fp32 weight)
TARGET_LLM = 0.5  # ours / onnxruntime, wall time and peak RSS, on the full SmolLM2 with the defaults
DEFAULT_LLM = Path(os.environ.get("ORT_WQ_DEV_CACHE", Path.home() / ".cache" / "ort-wq-dev")) / "smollm2-135m"


@dataclass
class Model:
    label: str
    path: Path
    weights: int  # fp32 MatMul weight values (both tools quantize these)
    weight_bytes: int
    largest: int  # bytes of the largest single fp32 initializer
    generated: bool
    symmetric: bool = True  # the real LLM runs the defaults (asymmetric), both tools alike


@dataclass
class Cell:
    runs: list[R.ChildRun] = field(default_factory=list)
    out_bytes: int = 0
    nodes: int = 0
    error: str = ""

    def ok_runs(self) -> list[R.ChildRun]:
        return [r for r in self.runs if r.ok]

    @property
    def wall(self) -> float:
        return R.median([r.wall for r in self.ok_runs()]) if self.ok_runs() else float("nan")

    @property
    def rss(self) -> float:
        return R.median([r.peak_rss for r in self.ok_runs()]) if self.ok_runs() else float("nan")


def matmul_weight_stats(path: Path) -> tuple[int, int, int]:
    """(values, bytes) of the 2-D float initializers feeding MatMul input B, and the largest initializer's bytes."""
    import numpy as np
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in m.graph.initializer}
    sizes = {n: int(np.prod(t.dims)) * (4 if t.data_type == onnx.TensorProto.FLOAT else 2)
             for n, t in inits.items()}
    seen, values, nbytes = set(), 0, 0
    for node in m.graph.node:
        if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in inits and node.input[1] not in seen:
            t = inits[node.input[1]]
            if len(t.dims) == 2 and t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
                seen.add(node.input[1])
                values += int(np.prod(t.dims))
                nbytes += sizes[node.input[1]]
    return values, nbytes, max(sizes.values())


def count_nbits(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return sum(n.op_type in ("MatMulNBits", "GatherBlockQuantized") for n in m.graph.node)


def tool_commands(block: int, src: Path, out: Path, symmetric: bool = True) -> dict[str, list[str]]:
    exe = Path(sys.executable).parent / "ort-wq"
    ours = [str(exe)] if exe.exists() else [sys.executable, "-m", "ort_wq"]
    common = ["--bits", "4", "--block-size", str(block), "--sym" if symmetric else "--asym", "--accuracy-level", "4"]
    return {
        "ort-wq": [*ours, "quantize", str(src), str(out / "ours.onnx"), *common, "--quiet"],
        "onnxruntime": [sys.executable, str(HERE / "_ort_quantize.py"), str(src), str(out / "ort.onnx"), *common],
    }


def out_file(tool: str, out: Path) -> Path:
    return out / ("ours.onnx" if tool == "ort-wq" else "ort.onnx")


def measure(model: Model, block: int, repeats: int, log) -> dict[str, Cell]:
    cells = {"ort-wq": Cell(), "onnxruntime": Cell()}
    out = _gen.bench_dir() / "out"
    for r in range(repeats):
        order = ["ort-wq", "onnxruntime"] if r % 2 == 0 else ["onnxruntime", "ort-wq"]
        for tool in order:
            cell = cells[tool]
            if cell.error:
                continue
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            os.sync()
            run = R.run_child(tool_commands(block, model.path, out, model.symmetric)[tool])
            cell.runs.append(run)
            if not run.ok:
                tail = [ln for ln in run.stderr.strip().splitlines() if ln.strip()][-1:] or [f"exit {run.returncode}"]
                cell.error = f"exit {run.returncode}: {tail[0][:200]}"
                log(f"  {tool:12} block {block:>4}  FAILED ({cell.error})")
                continue
            f = out_file(tool, out)
            cell.out_bytes = _gen.file_bytes(f)
            cell.nodes = count_nbits(f)
            log(f"  {tool:12} block {block:>4}  run {r + 1}/{repeats}: {run.wall:7.2f} s, "
                f"peak RSS {run.peak_rss / 2**20:7.0f} MiB, output {cell.out_bytes / 1e6:.0f} MB, "
                f"{cell.nodes} MatMulNBits")
    shutil.rmtree(out, ignore_errors=True)
    return cells


def fmt(x: float, spec: str) -> str:
    return "n/a" if math.isnan(x) else format(x, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="0.5,2.5", help="GB of fp32 MatMul weights of the generated models (comma list)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per tool, alternating")
    ap.add_argument("--blocks", default="32,128", help="block sizes (comma list)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--mlp", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--no-minilm", action="store_true", help="skip the shared MiniLM model")
    ap.add_argument("--llm", type=Path, default=DEFAULT_LLM,
                    help="genai fp32 folder of the full SmolLM2 (../shared/llm/build_smollm2.sh); skipped if absent")
    ap.add_argument("--quick", action="store_true", help="smoke run: one 0.1 GB model (hidden 1024), block 32, one repeat")
    ap.add_argument("--no-readme", action="store_true", help="do not rewrite benchmarks/README.md")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.blocks = "0.1", 1, "32"
        args.hidden, args.mlp, args.vocab = 1024, 4096, 2048
    sizes = [float(s) for s in args.sizes.split(",") if s.strip()]
    blocks = [int(b) for b in args.blocks.split(",") if b.strip()]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    started = time.time()
    info = R.machine()
    log(f"machine: {info}")
    models: list[Model] = []
    specs = {}
    for gb in sizes:
        spec = _gen.spec_for_size(gb, args.hidden, args.mlp, args.vocab)
        path = _gen.generate(spec, log=log)
        values, nbytes, largest = matmul_weight_stats(path)
        models.append(Model(f"LLM {nbytes / 1e9:.2f} GB ({spec.layers}L h{spec.hidden} m{spec.mlp})", path,
                            values, nbytes, largest, True))
        specs[path] = spec
    if not args.no_minilm:
        import _minilm

        if _minilm.MINILM.exists():
            values, nbytes, largest = matmul_weight_stats(_minilm.MINILM)
            models.append(Model(f"MiniLM-L6 ({nbytes / 1e6:.0f} MB)", _minilm.MINILM, values, nbytes, largest, False))
        else:
            log(f"MiniLM not found at {_minilm.MINILM}: skipped")

    llm = None
    if args.llm and (args.llm / "model.onnx").exists() and not args.quick:
        values, nbytes, largest = matmul_weight_stats(args.llm / "model.onnx")
        llm = Model(f"SmolLM2-135M ({nbytes / 1e6:.0f} MB, tied table), 4-bit asym", args.llm / "model.onnx",
                    values, nbytes, largest, False, symmetric=False)
        models.append(llm)
    elif not args.quick:
        log(f"SmolLM2 not found at {args.llm}: skipped (build it with ../shared/llm/build_smollm2.sh)")

    results: dict[tuple[str, int], dict[str, Cell]] = {}
    for model in models:
        log(f"{model.label}: {model.path}")
        _gen.warm_cache(model.path)
        for block in blocks:
            results[(model.label, block)] = measure(model, block, args.repeats, log)

    headers = ["model", "block", "tool", "wall s: median (min-max)", "M weights/s", "peak RSS MiB", "output MB",
               "quantized nodes", "wall ours/ort", "RSS ours/ort"]
    rows = []
    for model in models:
        for block in blocks:
            cells = results[(model.label, block)]
            ours, theirs = cells["ort-wq"], cells["onnxruntime"]
            for tool, cell in cells.items():
                wall, rss = cell.wall, cell.rss
                ratio_w = ratio_r = ""
                if tool == "ort-wq":
                    ratio_w = fmt(ours.wall / theirs.wall, ".2f") + "x"
                    ratio_r = fmt(ours.rss / theirs.rss, ".2f") + "x"
                walls = [r.wall for r in cell.ok_runs()]
                spread = f" ({min(walls):.2f}-{max(walls):.2f})" if len(walls) > 1 else ""
                rows.append([model.label, block, tool if not cell.error else f"{tool} (FAILED: {cell.error})",
                             fmt(wall, ".2f") + spread, fmt(model.weights / wall / 1e6, ".0f"), fmt(rss / 2**20, ".0f"),
                             fmt(cell.out_bytes / 1e6, ".0f") if cell.out_bytes else "n/a",
                             cell.nodes if cell.nodes else "n/a", ratio_w, ratio_r])
    table = R.md_table(headers, rows)

    checks = []
    gen = [m for m in models if m.generated]
    if gen:
        big = max(gen, key=lambda m: m.weight_bytes)
        note = "" if big.weight_bytes >= 2.3e9 else f" (the 2.5 GB model was not run: checked on {big.label})"
        for block in blocks:
            ours, theirs = results[(big.label, block)]["ort-wq"], results[(big.label, block)]["onnxruntime"]
            rw, rr = ours.wall / theirs.wall, ours.rss / theirs.rss
            bound = TARGET_RSS_ABS * (ours.out_bytes + big.largest)
            checks.append((f"block {block}: wall time ours/onnxruntime <= {TARGET_WALL}{note}",
                           rw <= TARGET_WALL, f"{rw:.2f}x ({ours.wall:.1f} s vs {theirs.wall:.1f} s)"))
            checks.append((f"block {block}: peak RSS ours/onnxruntime <= {TARGET_RSS}{note}",
                           rr <= TARGET_RSS, f"{rr:.2f}x ({ours.rss / 2**20:.0f} vs {theirs.rss / 2**20:.0f} MiB)"))
            checks.append(((f"block {block}: peak RSS ours < {TARGET_RSS_ABS} x (output {ours.out_bytes / 2**20:.0f} MiB "
                           f"+ largest fp32 weight {big.largest / 2**20:.0f} MiB) = {bound / 2**20:.0f} MiB{note}"),
                           ours.rss < bound, f"{ours.rss / 2**20:.0f} MiB"))
    if llm is not None and 32 in blocks:
        ours, theirs = results[(llm.label, 32)]["ort-wq"], results[(llm.label, 32)]["onnxruntime"]
        rw, rr = ours.wall / theirs.wall, ours.rss / theirs.rss
        checks.append((f"SmolLM2, defaults (4-bit asym block 32): wall time ours/onnxruntime <= {TARGET_LLM}",
                       rw <= TARGET_LLM, f"{rw:.2f}x ({ours.wall:.1f} s vs {theirs.wall:.1f} s)"))
        checks.append((f"SmolLM2, defaults: peak RSS ours/onnxruntime <= {TARGET_LLM}",
                       rr <= TARGET_LLM, f"{rr:.2f}x ({ours.rss / 2**20:.0f} vs {theirs.rss / 2**20:.0f} MiB)"))
    check_lines = [f"- {'PASS' if ok else 'FAIL'}: {what}: {value}" for what, ok, value in checks]

    body = "\n".join([
        "### Quantize: ort-wq vs onnxruntime's MatMulNBitsQuantizer",
        "",
        (f"`{R.command_line()}` — {time.strftime('%Y-%m-%d')}, {info}; "
        f"{args.repeats} runs per tool, alternating, median; total {(time.time() - started) / 60:.1f} min."),
        "",
        ("RTN 4-bit (symmetric; SmolLM2: asymmetric, ort-wq's default), accuracy_level 4, MatMulNBits "
        "(ort-wq also converts embedding Gathers; a tied table is stored once); each run is a fresh process "
        "(`ort-wq quantize ... --quiet` / `benchmarks/_ort_quantize.py`: onnx.load + MatMulNBitsQuantizer "
        "DEFAULT + save with external data), wall time = whole process, peak RSS = the process's ru_maxrss. "
        "Inputs are in the page cache (read once before timing)."),
        "",
        table,
        "",
        "Targets (largest generated model):",
        "",
        *check_lines,
    ])
    print()
    print(body)
    if not (args.quick or args.no_readme):
        R.update_readme("bench_quantize", body)
        log(f"\nwrote {R.README}")
    failed = any(c.error for cells in results.values() for c in cells.values())
    return 0 if all(ok for _, ok, _ in checks) and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
