"""Shared by the benchmarks: machine description, tables, child processes measured by the OS,
and the marked sections of ``benchmarks/README.md`` that each script rewrites."""

from __future__ import annotations

import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parent / "README.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, AttributeError):
        pass
    import numpy
    import onnxruntime

    load = ""
    if hasattr(os, "getloadavg"):
        load = f", load average {os.getloadavg()[0]:.1f} at start"
    return (f"{os.cpu_count()} cores ({cpu}){mem}{load}; Python {platform.python_version()}, "
            f"onnxruntime {onnxruntime.__version__}, numpy {numpy.__version__}")


def command_line() -> str:
    script = os.path.relpath(sys.argv[0], Path(__file__).resolve().parents[1])
    return " ".join(["python", script, *map(shlex.quote, sys.argv[1:])])


def md_table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(lines)


def update_readme(section: str, body: str) -> None:
    """Replace the text between ``<!-- section:begin -->`` and ``<!-- section:end -->`` (appended if absent)."""
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = README.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, README)


@dataclass
class ChildRun:
    wall: float  # seconds, process start to exit (interpreter start-up and imports included)
    peak_rss: int  # bytes: the child's ru_maxrss as reported by the kernel (wait4)
    returncode: int
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run_child(cmd: list[str], env: dict | None = None) -> ChildRun:
    """Run ``cmd``; wall time and the child's own peak RSS from ``wait4`` (not its siblings')."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text = err.read().decode(errors="replace")
    return ChildRun(wall, usage.ru_maxrss * 1024, proc.returncode, text)


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
