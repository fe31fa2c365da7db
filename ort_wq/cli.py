"""``ort-wq``: quantize, inspect, validate and demo from the command line.

Exit codes: 0 ok, 1 validation failed, 2 bad usage or input (files and folders included), 130 /
143 stopped by Ctrl-C / SIGTERM (handled alike: temporary files removed), 141 stdout closed by
its reader. A user's own mistake is reported as one ``error:`` line, never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence

from . import __version__

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A mistake in the command line or its inputs (exit code 2)."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _block_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value != -1 and (value < 16 or value & (value - 1)):
        raise argparse.ArgumentTypeError(f"{value} is not a power of two >= 16 (or -1 for per-channel)")
    return value


def _add_quantize(sub) -> None:
    from .algorithms import list_algorithms
    from .config import WeightOnlyConfig

    d = WeightOnlyConfig()
    p = sub.add_parser(
        "quantize",
        help="quantize the constant MatMul/Gemm/Gather weights of a model",
        description="Replace every MatMul/Gemm/FusedMatMul whose weight is a constant with a weight-only quantized "
        "node (com.microsoft MatMulNBits by default) and every Gather of a constant table with "
        "com.microsoft GatherBlockQuantized; each tensor is quantized once, whatever reads it. The input is never modified; OUTPUT appears only if the whole "
        "job succeeds (external data, when the input had it or the result is over 2 GB, goes to OUTPUT.data, or to OUTPUT_data when that name is taken; never to the file the current OUTPUT reads).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("input", metavar="INPUT", help="ONNX model to quantize, or a model folder (one .onnx plus "
                   "side files such as genai_config.json and tokenizer files)")
    p.add_argument("output", metavar="OUTPUT", help="where to write the quantized model (for a folder INPUT: "
                   "a new folder, which gets the model under the same name and copies of the side files)")
    p.add_argument("--bits", type=int, choices=(2, 4, 8), default=d.bits, help="bits per weight")
    p.add_argument("--block-size", type=_block_size, default=d.block_size,
                   help="values per block along K: a power of two >= 16, or -1 for one block per column")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sym", dest="symmetric", action="store_true", default=d.symmetric,
                   help="symmetric blocks (no zero points)")
    g.add_argument("--asym", dest="symmetric", action="store_false", help="asymmetric blocks (with zero points)")
    p.add_argument("--format", choices=("nbits", "fpq4", "qdq"), default=d.format,
                   help="nbits: com.microsoft MatMulNBits; fpq4: legacy com.microsoft MatMulFpQ4 (4-bit, block 32); "
                   "qdq: standard DequantizeLinear + MatMul (opset 21)")
    p.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), default=d.accuracy_level,
                   help="MatMulNBits compute type: 0 exact float math, 4 int8 activations (fastest on CPU)")
    p.add_argument("--algorithm", choices=sorted(list_algorithms()), default=d.algorithm,
                   help="rtn: round to nearest (onnxruntime's numbers); rtn-clip: with a per-block clip search; "
                   "hqq: half-quadratic; imatrix (importance-weighted search, cheap), gptq, awq: use --calibration data")
    p.add_argument("--algorithm-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the algorithm, e.g. 'damp=0.05' or 'act_order=false' for gptq, "
                   "'iters=40' for hqq, 'grid=40' for rtn-clip (repeatable)")
    p.add_argument("--include", action="append", default=[], metavar="REGEX",
                   help="only quantize nodes whose name or weight name matches (repeatable)")
    p.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                   help="leave nodes whose name or weight name matches (repeatable)")
    p.add_argument("--op-types", default=",".join(d.op_types), metavar="LIST",
                   help="comma list of the consumers to convert: MatMul, Gemm, FusedMatMul (com.microsoft), "
                   "Gather (embedding tables -> com.microsoft GatherBlockQuantized; a table tied to the output head "
                   "is stored once and read by both)")
    p.add_argument("--override", action="append", default=[], metavar="REGEX=SPEC",
                   help="per-node settings, e.g. 'lm_head=bits:8,block:128' or 'proj=asym' or 'gate=skip' (repeatable)")
    p.add_argument("--zero-points", choices=("auto", "uint8", "float"), default=d.zero_points,
                   help="asymmetric MatMulNBits zero points: auto = uint8; float (2/4-bit) = more accurate "
                   "with hqq but decodes many times slower on onnxruntime's CPU kernel")
    p.add_argument("--sym-grid", choices=("mlas", "inc"), default=d.sym_grid,
                   help="symmetric grid: mlas = onnxruntime's (the block's largest-magnitude weight is exact, "
                   "codes -2^(b-1)..2^(b-1)-1); inc = scale 2*max|w|/(2^b-1) (the utilities' quant_tensor)")
    p.add_argument("--min-k", type=_positive_int, default=d.min_k, help="leave weights with fewer input channels")
    p.add_argument("--calibration", metavar="FILE.npz",
                   help="calibration inputs for imatrix/gptq/awq: arrays keyed by model input name, batch along axis 0")
    p.add_argument("--calibration-text", metavar="FILE",
                   help="calibration from UTF-8 text for imatrix/gptq/awq: tokenized, cut into windows of "
                   "--calibration-seq-len tokens, one window per batch (needs pip install 'ort-wq[llm]')")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json for --calibration-text "
                   "(default: tokenizer.json beside the model)")
    p.add_argument("--calibration-seq-len", type=_positive_int, default=512, metavar="N",
                   help="tokens per calibration window of --calibration-text")
    p.add_argument("--calibration-batches", type=_positive_int, default=None, metavar="N",
                   help="use at most N batches of the calibration file or windows of the text")
    p.add_argument("--calibration-batch-size", type=_positive_int, default=8, metavar="B",
                   help="rows of the calibration file per batch")
    p.add_argument("--threads", type=_positive_int, default=None, help="worker threads (default: all cores)")
    p.add_argument("--report-json", metavar="FILE", help="also write the report as JSON (schema in the README)")
    p.add_argument("--verbose", action="store_true", help="list every skipped node")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    p.set_defaults(run=_run_quantize)


def _run_quantize(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .algorithms import list_algorithms
    from .config import NodeOverride, WeightOnlyConfig, parse_option
    from .output_files import same_file
    from .quantize import quantize

    if os.path.isfile(args.input) and same_file(Path(args.input), Path(args.output)):
        raise UsageError(f"OUTPUT {args.output!r} is the input model; choose another path")
    try:
        overrides = [NodeOverride.parse(o) for o in args.override]
        options = dict(parse_option(o) for o in args.algorithm_option)
        config = WeightOnlyConfig(
            bits=args.bits, block_size=args.block_size, symmetric=args.symmetric, format=args.format,
            accuracy_level=args.accuracy_level, algorithm=args.algorithm, include=args.include,
            exclude=args.exclude, overrides=overrides, min_k=args.min_k, threads=args.threads,
            zero_points=args.zero_points, sym_grid=args.sym_grid, algorithm_options=options,
            op_types=args.op_types,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    needs_calibration = list_algorithms()[args.algorithm]
    given = args.calibration or args.calibration_text
    calibration = None
    if args.calibration and args.calibration_text:
        raise UsageError("give --calibration FILE.npz or --calibration-text FILE, not both")
    if given and not needs_calibration:
        print(f"ort-wq quantize: note: --algorithm {args.algorithm} does not use calibration data; "
              f"{given} is ignored (gptq and awq use it)", file=sys.stderr)
    elif args.calibration:
        from .algorithms.calibration import NpzBatches

        calibration = NpzBatches(args.calibration, args.calibration_batch_size, args.calibration_batches)
    elif args.calibration_text:
        from .text import CalibrationText, default_tokenizer, load_tokenizer

        calibration = CalibrationText(args.calibration_text, args.tokenizer or default_tokenizer(args.input),
                                      args.calibration_seq_len, args.calibration_batches)
        load_tokenizer(calibration.tokenizer)  # a missing package or file fails before any work
    elif needs_calibration:
        raise UsageError(f"--algorithm {args.algorithm} needs --calibration FILE.npz or --calibration-text FILE")
    start = time.perf_counter()
    _, report = quantize(args.input, config, output=args.output, calibration=calibration,
                         progress=not args.quiet and sys.stderr.isatty(), return_report=True)
    if args.report_json:
        from .report_json import quantize_report, write_report

        write_report(args.report_json, quantize_report(report, input=args.input, output=args.output, config=config))
    if not args.quiet:
        print(report.to_text(verbose=args.verbose))
        print(f"wrote {args.output} in {time.perf_counter() - start:.2f} s")
    return EXIT_OK


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="list quantizable and quantized nodes of a model",
                       description="List every MatMul/Gemm/FusedMatMul/Gather with its weight shape and whether "
                       "'ort-wq quantize' with default settings converts it (and why not), every already quantized "
                       "node with its settings, and the model's initializer bytes by the ops that read them.")
    p.add_argument("model", metavar="MODEL", help="ONNX model or model folder")
    p.add_argument("--report-json", metavar="FILE", help="also write the rows as JSON (schema in the README)")
    p.set_defaults(run=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    from .folders import resolve
    from .inspect import inspect_model

    path = resolve(args.model)
    print(inspect_model(path))
    if args.report_json:
        from .inspect import inspect_rows
        from .model_io import load_model
        from .report_json import inspect_report, write_report

        write_report(args.report_json, inspect_report(inspect_rows(load_model(path)), model=args.model))
    return EXIT_OK


def _add_validate(sub, full: bool = True) -> None:
    """``full=False``: the command listed, without its options (which import onnxruntime)."""
    p = sub.add_parser("validate", help="compare a quantized model with the original",
                       description="Run both models on the same inputs and report per-output errors; "
                       "exit 0 within thresholds, 1 outside, 2 on bad input.")
    if full:
        from .validate import add_validate_arguments, run_validate_command

        add_validate_arguments(p)
        p.set_defaults(run=run_validate_command)


def _add_eval(sub) -> None:
    from .evaluate import add_eval_arguments, run_eval_command

    p = sub.add_parser("eval", help="perplexity and KL divergence of a quantized language model on a text",
                       description="Score ORIGINAL and QUANTIZED on the same windows of a text: perplexity of "
                       "both, mean KL(original || quantized) of the next-token distributions and top-1 agreement, "
                       "per window and overall. Models may be files or model folders.")
    add_eval_arguments(p)
    p.set_defaults(run=run_eval_command)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="quantize a small built-in transformer and compare it with the original",
                       description="Build a small transformer-like model in memory, quantize it with the default "
                       "settings, run both in onnxruntime and print size, error and speed. Works offline.")
    p.add_argument("--layers", type=_positive_int, default=4, help="transformer layers")
    p.add_argument("--hidden", type=_positive_int, default=512, help="hidden size (a multiple of 64)")
    p.add_argument("--save", metavar="DIR", help="also save original.onnx and quantized.onnx into DIR")
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.hidden % 64:
        raise UsageError(f"--hidden {args.hidden} must be a multiple of 64")
    return run_demo(layers=args.layers, hidden=args.hidden, save_dir=args.save)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; given the ``command`` about to be parsed, other commands' options may be left out."""
    parser = argparse.ArgumentParser(
        prog="ort-wq",
        description="Weight-only quantization (2/4/8-bit, block-wise) of ONNX models for onnxruntime.",
        epilog="Run 'ort-wq COMMAND --help' for a command's options. Exit codes: 0 ok, 1 validation failed, "
        "2 bad usage or input, 130 / 143 stopped by Ctrl-C / SIGTERM (nothing written).",
    )
    parser.add_argument("--version", action="version", version=f"ort-wq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_quantize(sub)
    _add_inspect(sub)
    _add_validate(sub, full=command in (None, "validate"))
    _add_eval(sub)
    _add_demo(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the job stops and its temporary files are removed."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


# errors of the user's files and folders (exit 2), as opposed to faults of ort-wq (exit 1)
_USER_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ENOSPC,
                getattr(errno, "EDQUOT", errno.ENOSPC), errno.EROFS, errno.ENAMETOOLONG, errno.ELOOP}


def _line(exc: BaseException) -> str:
    from .model_io import first_line

    return first_line(exc)


def _silence_stdout() -> None:
    """After the reader of stdout went away (``| head``): drop further output instead of raising at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (tests capture stdout)
        pass


_COMMANDS = ("quantize", "inspect", "validate", "eval", "demo")


def entry() -> None:
    """The ``ort-wq`` command (and ``python -m ort_wq``): :func:`main`, then an immediate exit.

    When ``main`` returns, everything the command writes is complete (files in place and synced,
    output flushed). The interpreter's normal teardown would then spend ~0.3 s (more on a busy
    machine) freeing the model's objects and the modules onnx_ir and onnxscript load; the process
    ends at once instead (as mypy does). Usage errors, ``--help`` and ``--version`` exit as usual.
    """
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said
            pass
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    command = words[0] if words and words[0] in _COMMANDS else None
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return EXIT_USAGE
    in_main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    try:
        return _dispatch(args)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old)


def _dispatch(args: argparse.Namespace) -> int:
    def error(text: str, code: int) -> int:
        print(f"ort-wq {args.command}: {text}", file=sys.stderr)
        return code

    try:
        code = int(args.run(args))
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        _silence_stdout()
        return 141  # like any tool whose reader closed the pipe (128 + SIGPIPE)
    except (UsageError, ValueError) as exc:  # ModelInputError and invalid settings or input data
        return error(f"error: {_line(exc)}", EXIT_USAGE)
    except OSError as exc:
        if exc.errno not in _USER_ERRNOS:
            return _internal(args, exc)
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) not in str(exc.strerror) else ""
        return error(f"error: {exc.strerror or _line(exc)}{where}; nothing was written", EXIT_USAGE)
    except KeyboardInterrupt as exc:
        done = getattr(exc, "output_written", False) or _output_written(args)
        what = "the output was written" if done else "nothing was written"
        return error(f"{'terminated' if isinstance(exc, Terminated) else 'interrupted'}; {what}",
                     143 if isinstance(exc, Terminated) else 130)
    except MemoryError:
        return error("error: out of memory; nothing was written", EXIT_FAILED)
    except Exception as exc:  # noqa: BLE001
        cause = _user_cause(exc)
        if cause is not None:  # a worker's bad input, wrapped with what it was working on
            return error(f"error: {_line(exc)}", EXIT_USAGE)
        return _internal(args, exc)


def _output_written(args: argparse.Namespace) -> bool:
    """Whether the command had put its output in place before it was stopped."""
    if getattr(args, "output", None) is None or "ort_wq.output_files" not in sys.modules:
        return False
    from .output_files import was_written

    return was_written(args.output)


def _user_cause(exc: BaseException) -> BaseException | None:
    """The ``ValueError`` or file-system error behind a wrapped exception (``raise ... from``), if any."""
    seen = set()
    cause = exc.__cause__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ValueError) or (isinstance(cause, OSError) and cause.errno in _USER_ERRNOS):
            return cause
        cause = cause.__cause__
    return None


def _internal(args: argparse.Namespace, exc: BaseException) -> int:
    if os.environ.get("ORT_WQ_DEBUG"):
        raise exc
    print(f"ort-wq {args.command}: error: {type(exc).__name__}: {_line(exc)} "
          "(nothing was written; set ORT_WQ_DEBUG=1 for the traceback)", file=sys.stderr)
    return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
