"""What ort-wq promises about files: the input is never written, bad input is refused in one line.

Every case checks the exit code, a one-line message without traceback, that no file appeared,
and that every input file has the same sha256 before and after.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ort_wq import WeightOnlyConfig, quantize
from ort_wq.cli import main
from ort_wq.model_io import ModelInputError

from .helpers import run_model
from .models import matmul_model


def _digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (links by their own name), names of folders."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[str(p.relative_to(folder))] = "<dir>"
    return out


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.fixture()
def ext_model(tmp_path):
    """``model.onnx`` reading two data files, ``model.onnx.data`` and ``w2.bin``."""
    m1, _ = matmul_model(k=64, n=32, seed=1)
    w2 = np.random.default_rng(2).standard_normal((32, 16)).astype(np.float32)
    g = m1.graph
    g.node.append(helper.make_node("MatMul", ["y", "W2"], ["z"], name="mm2"))
    g.initializer.append(numpy_helper.from_array(w2, "W2"))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["M", 16]))
    onnx.external_data_helper.convert_model_to_external_data(m1, location="model.onnx.data", size_threshold=0)
    for t in g.initializer:
        if t.name == "W2":
            for e in t.external_data:
                if e.key == "location":
                    e.value = "w2.bin"
    onnx.save_model(m1, tmp_path / "model.onnx")
    return tmp_path / "model.onnx"


@pytest.mark.parametrize("target", ["model.onnx.data", "w2.bin", "link-to-data", "link-to-model", "./model.onnx"])
def test_output_naming_an_input_file_is_refused(ext_model, capsys, target):
    folder = ext_model.parent
    (folder / "link-to-data").symlink_to("model.onnx.data")
    (folder / "link-to-model").symlink_to("model.onnx")
    before = _digests(folder)
    assert main(["quantize", str(ext_model), str(folder / target)]) == 2
    msg = _one_line(capsys)
    assert "input" in msg and "choose another" in msg
    assert _digests(folder) == before
    with pytest.raises(ModelInputError, match="input"):
        quantize(str(ext_model), WeightOnlyConfig(), output=folder / target)
    assert _digests(folder) == before


def test_hard_linked_data_is_refused_untouched(ext_model, capsys):
    folder = ext_model.parent
    os.link(folder / "model.onnx.data", folder / "hard.onnx")
    before = _digests(folder)
    assert main(["quantize", str(ext_model), str(folder / "hard.onnx")]) == 2
    assert "hard links" in _one_line(capsys)
    assert _digests(folder) == before


def test_quantize_external_model_keeps_input(ext_model, capsys):
    folder = ext_model.parent
    before = _digests(folder)
    out = folder / "q.onnx"
    assert main(["quantize", str(ext_model), str(out), "--quiet", "--accuracy-level", "0"]) == 0
    after = _digests(folder)
    assert {k: v for k, v in after.items() if k in before} == before
    new = sorted(set(after) - set(before))
    assert new == ["q.onnx", "q.onnx.data"]
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    assert run_model(out, {"x": x})[0].shape == (2, 16)


def _save_with(tmp_path, mutate, name="bad.onnx") -> Path:
    model, _ = matmul_model(k=64, n=32)
    onnx.save_model(model, tmp_path / name, save_as_external_data=True, location=name + ".data", size_threshold=0)
    proto = onnx.load(tmp_path / name, load_external_data=False)
    mutate(proto, tmp_path)
    onnx.save_model(proto, tmp_path / name)
    return tmp_path / name


def _set_info(key, value):
    def mutate(proto, folder):
        for e in proto.graph.initializer[0].external_data:
            if e.key == key:
                e.value = value
                return
        proto.graph.initializer[0].external_data.add(key=key, value=value)
    return mutate


def _truncate(proto, folder):
    data = folder / "bad.onnx.data"
    data.write_bytes(data.read_bytes()[:100])


def _bad_dims(proto, folder):
    proto.graph.initializer[0].dims[1] = 40


def _duplicate(proto, folder):
    proto.graph.initializer.append(copy.deepcopy(proto.graph.initializer[0]))


def _inline_mismatch(proto, folder):
    t = numpy_helper.from_array(np.ones((64, 32), np.float32), "W")
    t.raw_data = t.raw_data[:-4]
    proto.graph.initializer[0].CopyFrom(t)


@pytest.mark.parametrize("mutate, message", [
    (_truncate, "truncated"),
    (_set_info("length", "100"), "declares 100 bytes"),
    (_bad_dims, "needs"),
    (_duplicate, "defined twice"),
    (_inline_mismatch, "bytes of data"),
    (_set_info("location", "../outside.bin"), "outside the model's folder"),
    (_set_info("location", "/etc/passwd"), "outside the model's folder"),
])
@pytest.mark.parametrize("command", ["quantize", "inspect", "validate"])
def test_bad_model_files_exit_2(tmp_path, capsys, mutate, message, command):
    src = _save_with(tmp_path, mutate)
    before = _digests(tmp_path)
    argv = {"quantize": [str(src), str(tmp_path / "out.onnx")], "inspect": [str(src)],
            "validate": [str(src), str(src)]}[command]
    assert main([command, *argv]) == 2
    assert message in _one_line(capsys)
    assert _digests(tmp_path) == before


def test_outside_paths_disclose_nothing(tmp_path, capsys):
    """The message is the same whether the outside file exists or not, and never gives its size."""
    messages = []
    for i, loc in enumerate(["/etc/passwd", "/no/such/file", "../../etc/passwd"]):
        src = _save_with(tmp_path, _set_info("location", loc), name=f"m{i}.onnx")
        assert main(["inspect", str(src)]) == 2
        messages.append(_one_line(capsys).replace(f"m{i}.onnx", "M").replace(repr(loc), "LOC"))
    assert len(set(messages)) == 1 and "bytes" not in messages[0]


def test_output_folder_problems(tmp_path, capsys):
    model, _ = matmul_model()
    src = tmp_path / "m.onnx"
    onnx.save_model(model, src)
    (tmp_path / "folder.onnx").mkdir()
    assert main(["quantize", str(src), str(tmp_path / "folder.onnx")]) == 2
    assert "is a folder" in _one_line(capsys)
    assert main(["quantize", str(src), str(tmp_path / "nowhere" / "q.onnx")]) == 2
    assert "does not exist" in _one_line(capsys)
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        assert main(["quantize", str(src), str(ro / "q.onnx")]) == 2
        assert "not writable" in _one_line(capsys)


def test_a_folder_named_like_the_old_data_file_is_left_alone(tmp_path, capsys):
    model, _ = matmul_model()
    src = tmp_path / "m.onnx"
    onnx.save_model(model, src, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    (tmp_path / "q.onnx.data").mkdir()
    assert main(["quantize", str(src), str(tmp_path / "q.onnx"), "--quiet"]) == 0
    assert (tmp_path / "q.onnx.data").is_dir()


def test_stale_data_files_of_the_output_are_removed(tmp_path):
    model, _ = matmul_model(k=64, n=32)
    src = tmp_path / "m.onnx"
    onnx.save_model(copy.deepcopy(model), src, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    plain = tmp_path / "plain.onnx"
    onnx.save_model(model, plain)
    out = tmp_path / "q.onnx"
    onnx.save_model(copy.deepcopy(model), out, save_as_external_data=True, location="q.onnx.data", size_threshold=0)
    (tmp_path / "q.onnx.data.keep").write_text("not ours")
    quantize(str(src), WeightOnlyConfig(), output=out)  # replaces the old q.onnx and its q.onnx.data
    assert _locations(out) == {"q.onnx_data"} and not (tmp_path / "q.onnx.data").exists()
    quantize(str(src), WeightOnlyConfig(), output=out)  # the names alternate
    assert _locations(out) == {"q.onnx.data"} and not (tmp_path / "q.onnx_data").exists()
    (tmp_path / "q.onnx_data").write_text("not ours either")  # both names taken: a name of its own
    quantize(str(src), WeightOnlyConfig(), output=out)
    (own,) = _locations(out)
    assert re.fullmatch(r"q\.onnx\.[0-9a-f]{12}\.data", own) and not (tmp_path / "q.onnx.data").exists()
    assert (tmp_path / "q.onnx_data").read_text() == "not ours either"
    (tmp_path / "q.onnx_data").unlink()
    quantize(str(plain), WeightOnlyConfig(), output=out)  # no external data any more: none left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data", "plain.onnx", "q.onnx",
                                                           "q.onnx.data.keep"]


def _locations(path: Path) -> set[str]:
    proto = onnx.load(path, load_external_data=False)
    return {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}


def test_an_old_output_reading_the_inputs_data_keeps_it(tmp_path):
    """The old output's data file is removed only when the new input does not read it."""
    model, _ = matmul_model(k=64, n=32)
    out = tmp_path / "q.onnx"
    onnx.save_model(copy.deepcopy(model), out, save_as_external_data=True, location="q.onnx.data", size_threshold=0)
    src = tmp_path / "m.onnx"
    onnx.save_model(copy.deepcopy(model), src, save_as_external_data=True, location="q.onnx.data", size_threshold=0)
    before = hashlib.sha256((tmp_path / "q.onnx.data").read_bytes()).hexdigest()
    quantize(str(src), WeightOnlyConfig(), output=out)
    assert hashlib.sha256((tmp_path / "q.onnx.data").read_bytes()).hexdigest() == before


@pytest.fixture()
def model_file(tmp_path):
    model, _ = matmul_model(k=64, n=32)
    onnx.save_model(model, tmp_path / "m.onnx")
    return tmp_path / "m.onnx"


@pytest.mark.parametrize("args, message", [
    (["--algorithm", "rtn-clip", "--algorithm-option", "grid=abc"], "grid='abc' is not valid"),
    (["--algorithm", "hqq", "--algorithm-option", "iters=nan"], "iters=nan is not valid"),
    (["--algorithm", "hqq", "--algorithm-option", "iters=-5"], "iters=-5 is out of range"),
    (["--algorithm", "rtn-clip", "--algorithm-option", "grid=0"], "grid=0 is out of range"),
    (["--algorithm", "hqq", "--algorithm-option", "init=fancy"], "use one of auto, minmax, clip"),
    (["--override", "mm="], "sets nothing"),
    (["--override", "=bits:8"], "no REGEX"),
    (["--algorithm", "gptq", "--calibration", "FOLDER"], "is a folder"),
    (["--algorithm", "gptq", "--calibration", "TEXT"], "not a .npz archive"),
    (["--algorithm", "gptq", "--calibration", "NAN"], "NaN"),
])
def test_bad_options_exit_2_before_any_work(model_file, tmp_path, capsys, args, message):
    (tmp_path / "calib").mkdir()
    (tmp_path / "text.npz").write_text("x = 1\n")
    np.savez(tmp_path / "nan.npz", x=np.full((4, 64), np.nan, np.float32))
    names = {"FOLDER": "calib", "TEXT": "text.npz", "NAN": "nan.npz"}
    args = [str(tmp_path / names[a]) if a in names else a for a in args]
    before = _digests(tmp_path)
    assert main(["quantize", str(model_file), str(tmp_path / "q.onnx"), *args]) == 2
    msg = _one_line(capsys)
    assert message in msg and "pickled" not in msg
    assert _digests(tmp_path) == before


def test_a_bad_model_is_named_before_its_calibration_file(tmp_path, capsys):
    """The model is read (once) before the calibration file: a broken model with a broken
    calibration file reports the model."""
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07garbage, not a model")
    np.savez(tmp_path / "nan.npz", x=np.full((4, 64), np.nan, np.float32))
    before = _digests(tmp_path)
    assert main(["quantize", str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx"), "--algorithm", "gptq",
                 "--calibration", str(tmp_path / "nan.npz")]) == 2
    msg = _one_line(capsys)
    assert "m.onnx" in msg and "NaN" not in msg, msg
    assert _digests(tmp_path) == before


def test_calibration_unused_by_the_algorithm_is_reported(model_file, tmp_path, capsys):
    np.savez(tmp_path / "c.npz", x=np.ones((4, 64), np.float32))
    assert main(["quantize", str(model_file), str(tmp_path / "q.onnx"), "--calibration", str(tmp_path / "c.npz"),
                 "--quiet"]) == 0
    assert "does not use calibration data" in _one_line(capsys)


def test_closed_stdout_pipe_exits_quietly(model_file):
    proc = subprocess.Popen([sys.executable, "-m", "ort_wq", "inspect", str(model_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written (like `| head -0`)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and err == ""


def test_installed_console_script_runs(model_file, tmp_path):
    exe = shutil.which("ort-wq", path=os.path.dirname(sys.executable)) or shutil.which("ort-wq")
    if exe is None:
        pytest.skip("the ort-wq console script is not installed")
    out = tmp_path / "q.onnx"
    res = subprocess.run([exe, "quantize", str(model_file), str(out), "--quiet"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stderr == "" and out.exists(), res.stderr
    res = subprocess.run([exe, "quantize", str(model_file), str(model_file)], capture_output=True, text=True)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    res = subprocess.run([exe, "inspect", str(out)], capture_output=True, text=True)
    assert res.returncode == 0 and "MatMulNBits" in res.stdout


@pytest.mark.parametrize("location, inside", [
    ("m.onnx.data", True), ("sub/w.bin", True), ("a/../w.bin", True), ("../w.bin", False), ("a/../../w.bin", False),
    ("/etc/passwd", False), ("C:/w.bin", False), ("\\\\server\\share\\w.bin", False), ("..\\w.bin", False), ("", False),
])
def test_external_locations_are_judged_on_their_text(location, inside):
    from ort_wq.model_io import _inside_folder

    assert _inside_folder(location) is inside
