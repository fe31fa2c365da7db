"""Fault injection: whatever happens to a write, OUTPUT names a complete, loadable model (or nothing).

Writers run in child processes that are killed with SIGKILL at random moments and at each step of
the replacement, or get SIGTERM, or race each other; afterwards the output must load in
onnxruntime and compute exactly one writer's result. ``ORT_WQ_FAULT_TRIALS`` sets the number of
random kills (default 4; try 50 locally).
"""

from __future__ import annotations

import copy
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from ort_wq import WeightOnlyConfig, quantize
from ort_wq.model_io import ModelInputError

fcntl = pytest.importorskip("fcntl")  # POSIX: the locks and signals below
TRIALS = int(os.environ.get("ORT_WQ_FAULT_TRIALS", "4"))
K, N, LAYERS = 768, 768, 10

# the child: quantize argv[1] -> argv[2] with argv[3] bits; SIGKILL itself right after the
# argv[4]-th os.replace (0: never). It prints "ready" once imported, so kills land in the job.
_CHILD = textwrap.dedent("""
    import os, signal, sys
    from ort_wq import WeightOnlyConfig, quantize
    from ort_wq import output_files, transforms  # imported before "ready": the kills land in the work
    src, out, bits, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    real, calls = os.replace, [0]
    def replace(a, b):
        real(a, b)
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    output_files.os.replace = replace
    print("ready", flush=True)
    quantize(src, WeightOnlyConfig(bits=bits, block_size=32, accuracy_level=0), output=out)
    print("done", flush=True)
""")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A chain of MatMuls with external data, and the outputs of its 4- and 8-bit versions."""
    folder = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(LAYERS):
        inits.append(numpy_helper.from_array((rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32), f"W{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"h{i}"], name=f"mm{i}"))
        prev = f"h{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, K])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [2, N])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    src = folder / "src.onnx"
    onnx.save_model(copy.deepcopy(model), src, save_as_external_data=True, location="src.onnx.data", size_threshold=0)
    x = rng.standard_normal((2, K)).astype(np.float32)
    expected = {}
    for bits in (4, 8):
        q = quantize(copy.deepcopy(model), WeightOnlyConfig(bits=bits, block_size=32, accuracy_level=0))
        expected[bits] = _run(q.SerializeToString(), x)
    return src, x, expected


def _run(model, x):
    sess = ort.InferenceSession(str(model) if isinstance(model, Path) else model, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _child(src, out, bits, kill_at=0):
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(src), str(out), str(bits), str(kill_at)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _which(out: Path, x, expected) -> int:
    """The bits of the complete model at ``out`` (fails if it does not load or matches neither)."""
    y = _run(out, x)
    for bits, want in expected.items():
        if np.array_equal(y, want):
            return bits
    raise AssertionError(f"{out} computes neither writer's result")


def _leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("." + name))


def _data_files(folder: Path, name: str) -> list[str]:
    """The output's data files: ``NAME.data``, ``NAME_data`` (alternating) or ``NAME.<token>.data``."""
    token = re.compile(re.escape(name) + r"\.[0-9a-f]{12}\.data")
    return sorted(p.name for p in folder.iterdir() if p.name in (name + ".data", name + "_data") or token.fullmatch(p.name))


def test_kill_at_each_step_of_the_replacement(source, tmp_path):
    src, x, expected = source
    out = tmp_path / "out.onnx"
    assert _child(src, out, 8).wait() == 0
    assert _which(out, x, expected) == 8
    # 1: after the new data file moved in (graph not yet replaced); 2: after the graph was replaced
    for kill_at, now in ((1, 8), (2, 4)):
        assert _child(src, out, 4, kill_at).wait() == -signal.SIGKILL
        assert _which(out, x, expected) == now
        if kill_at == 1:  # the new data file is in place but unreferenced; the next write removes it
            assert len(_data_files(tmp_path, "out.onnx")) == 2
    assert _child(src, out, 8).wait() == 0
    assert _which(out, x, expected) == 8
    assert len(_data_files(tmp_path, "out.onnx")) == 1 and _leftovers(tmp_path, "out.onnx") == []


def _ready(proc) -> float:
    """Wait until the child finished importing; returns the time."""
    assert proc.stdout.readline().strip() == b"ready"
    return time.monotonic()


def test_kill_at_random_moments(source, tmp_path):
    src, x, expected = source
    out = tmp_path / "out.onnx"
    proc = _child(src, out, 8)
    start = _ready(proc)
    assert proc.stdout.readline().strip() == b"done" and proc.wait() == 0
    duration = time.monotonic() - start  # of the job alone, without the interpreter's exit
    rng = random.Random(int(os.environ.get("ORT_WQ_FAULT_SEED", "0")))
    have = 8
    for _ in range(TRIALS):
        bits = 12 - have  # alternate 4 and 8 so a replacement is always visible
        proc = _child(src, out, bits)
        _ready(proc)
        time.sleep(rng.uniform(0.0, duration * 1.05))
        proc.kill()
        rc = proc.wait()
        got = _which(out, x, expected)
        assert got == (bits if rc == 0 else got)  # a finished writer is visible; a killed one may be
        have = got
    assert _child(src, out, 4).wait() == 0  # the next write cleans up after the killed ones
    assert _which(out, x, expected) == 4
    assert len(_data_files(tmp_path, "out.onnx")) == 1 and _leftovers(tmp_path, "out.onnx") == []


def test_concurrent_writers_always_leave_a_complete_model(source, tmp_path):
    src, x, expected = source
    out = tmp_path / "out.onnx"
    assert _child(src, out, 8).wait() == 0
    procs = [_child(src, out, bits) for bits in (4, 8, 4)]
    seen = set()
    while any(p.poll() is None for p in procs):
        try:  # the graph and then its data: if the data went missing, the graph must have changed meanwhile
            before = out.read_bytes()
            seen.add(_which(out, x, expected))
        except Exception:
            if out.read_bytes() == before:
                raise
        time.sleep(0.01)
    assert [p.wait() for p in procs] == [0, 0, 0]
    assert _which(out, x, expected) in (4, 8) and seen <= {4, 8}
    assert len(_data_files(tmp_path, "out.onnx")) == 1 and _leftovers(tmp_path, "out.onnx") == []


def test_sigterm_leaves_nothing_behind(source, tmp_path):
    src, _, _ = source
    out = tmp_path / "out.onnx"
    proc = subprocess.Popen([sys.executable, "-m", "ort_wq", "quantize", str(src), str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not _leftovers(tmp_path, "out.onnx") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)  # until the job writes its temporary files
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    if proc.returncode in (0, -signal.SIGTERM) and out.exists():  # finished first (or was exiting)
        assert _leftovers(tmp_path, "out.onnx") == [] and len(_data_files(tmp_path, "out.onnx")) == 1
        pytest.skip("the job finished before SIGTERM arrived")
    assert proc.returncode == 143 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    if "the output was written" in err:  # SIGTERM came during the final renames: held until done
        assert _leftovers(tmp_path, "out.onnx") == [] and len(_data_files(tmp_path, "out.onnx")) == 1
    else:
        assert "terminated; nothing was written" in err
        assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_stale_temporaries_of_killed_writers_are_removed(source, tmp_path):
    src, x, expected = source
    out = tmp_path / "out.onnx"
    stale = tmp_path / ".out.onnx.0123456789ab.tmp"  # a killed writer's (no lock held)
    stale.mkdir()
    (stale / "out.onnx.0123456789ab.data").write_bytes(b"\0" * 1000)
    live = tmp_path / ".out.onnx.ba9876543210.tmp"  # a running writer's: locked
    live.mkdir()
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    orphan = tmp_path / "out.onnx.00000000beef.data"  # moved in by a writer killed before its graph
    orphan.write_bytes(b"\0" * 1000)
    try:
        quantize(str(src), WeightOnlyConfig(bits=4, block_size=32, accuracy_level=0), output=out)
        assert not stale.exists() and live.exists() and not orphan.exists()
    finally:
        os.close(fd)
    assert _which(out, x, expected) == 4


def test_failed_graph_rename_keeps_the_old_output(source, tmp_path, monkeypatch):
    """Like an immutable OUTPUT (chattr +i): the graph cannot be replaced; the old model still loads."""
    src, x, expected = source
    out = tmp_path / "out.onnx"
    quantize(str(src), WeightOnlyConfig(bits=8, block_size=32, accuracy_level=0), output=out)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    from ort_wq import output_files

    real = os.replace

    def replace(a, b):
        if Path(b) == out:
            raise PermissionError(1, "Operation not permitted", str(a), None, str(b))
        real(a, b)

    monkeypatch.setattr(output_files.os, "replace", replace)
    with pytest.raises(ModelInputError, match=r"Operation not permitted \(.*out\.onnx\); nothing was written"):
        quantize(str(src), WeightOnlyConfig(bits=4, block_size=32, accuracy_level=0), output=out)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert _which(out, x, expected) == 8


def _ctrl_c_between_the_renames(monkeypatch, handler):
    """Make SIGINT's handler ``handler`` and send SIGINT from inside each rename; returns the
    handler to put back."""
    from ort_wq import output_files

    real = os.replace

    def replace(a, b):
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # to the main thread, which renames
        real(a, b)

    monkeypatch.setattr(output_files.os, "replace", replace)
    return signal.signal(signal.SIGINT, handler)


def test_ctrl_c_during_the_renames_is_held_until_they_are_done(source, tmp_path, monkeypatch):
    src, x, expected = source
    out = tmp_path / "out.onnx"
    # Python's own handler, as under a terminal (a shell starts background jobs, pytest among
    # them, with SIGINT ignored)
    previous = _ctrl_c_between_the_renames(monkeypatch, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt) as info:
            quantize(str(src), WeightOnlyConfig(bits=4, block_size=32, accuracy_level=0), output=out)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert info.value.output_written is True
    assert _which(out, x, expected) == 4 and len(_data_files(tmp_path, "out.onnx")) == 1
    assert _leftovers(tmp_path, "out.onnx") == []


def test_an_ignored_ctrl_c_stays_ignored_during_the_renames(source, tmp_path, monkeypatch):
    """Started with SIGINT ignored (nohup, a background job), the write completes and SIGINT is
    still ignored afterwards."""
    src, x, expected = source
    out = tmp_path / "out.onnx"
    previous = _ctrl_c_between_the_renames(monkeypatch, signal.SIG_IGN)
    try:
        quantize(str(src), WeightOnlyConfig(bits=4, block_size=32, accuracy_level=0), output=out)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert _which(out, x, expected) == 4 and len(_data_files(tmp_path, "out.onnx")) == 1
    assert _leftovers(tmp_path, "out.onnx") == []


def test_full_disk_while_streaming_is_exit_2_and_leaves_nothing(source, tmp_path, capsys, monkeypatch):
    import errno

    from ort_wq import output_files
    from ort_wq.cli import main

    src, _, _ = source
    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(output_files, "open", lambda *a, **k: Full(real_open(*a, **k)), raising=False)
    out = tmp_path / "out.onnx"
    assert main(["quantize", str(src), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "No space left on device" in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
