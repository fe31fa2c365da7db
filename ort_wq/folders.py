"""Model folders: a folder holding one ``.onnx`` model (with its external data) and side files.

An onnxruntime-genai or optimum folder has the model plus ``genai_config.json``, tokenizer
files, a chat template and configs. Every command takes a folder where it takes a model:
:func:`resolve` finds the model in it. :func:`folder_output` writes a quantized folder
atomically: the model and copies of the side files go into a temporary folder beside the
destination, which is renamed into place only when everything was written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .model_io import ModelInputError

__all__ = ["resolve", "model_folder", "side_files", "folder_output", "is_inside", "quantize_folder"]


def resolve(path: str | os.PathLike) -> Path:
    """The model file for ``path``: the path itself, or the one ``.onnx`` of a folder.

    In a folder with several models, ``genai_config.json``'s decoder filename picks one.
    """
    p = Path(path)
    if not p.is_dir():
        return p
    models = sorted(f.name for f in p.iterdir() if f.suffix == ".onnx" and f.is_file())
    if len(models) == 1:
        return p / models[0]
    if not models:
        raise ModelInputError(f"{p}: folder holds no .onnx model")
    named = _genai_filename(p)
    if named in models:
        return p / named
    raise ModelInputError(f"{p}: folder holds several models ({', '.join(models)}); give the model file instead")


def model_folder(path: str | os.PathLike) -> Path:
    """The folder of a model path or a folder (where side files such as tokenizer.json live)."""
    p = Path(path)
    return p if p.is_dir() else (p.parent if str(p.parent) else Path("."))


def _genai_filename(folder: Path) -> str | None:
    try:
        cfg = json.loads((folder / "genai_config.json").read_text())
        return cfg["model"]["decoder"]["filename"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def side_files(folder: Path, model_file: Path, data_files: set[Path]) -> list[Path]:
    """Everything in ``folder`` except the model and its external data (files and sub-folders)."""
    skip = {model_file.resolve(), *(d.resolve() for d in data_files)}
    return sorted(f for f in folder.iterdir() if f.resolve() not in skip and not f.name.startswith(".") )


def is_inside(child: Path, parent: Path) -> bool:
    """Whether ``child`` is ``parent`` or lies inside it (after resolving links)."""
    c, p = child.resolve(), parent.resolve()
    return c == p or p in c.parents


@contextmanager
def folder_output(in_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Iterator[tuple[Path, Callable[[set[Path]], None]]]:
    """Write a model folder atomically.

    Yields ``(tmp_model_path, copy_side_files)``: write the model to ``tmp_model_path``, then call
    ``copy_side_files(data_files_of_the_input)``. On a clean exit the temporary folder becomes
    ``out_dir`` (an existing empty folder, or a previous output holding the same model file, is
    replaced); on an error it is removed and ``out_dir`` is untouched.
    """
    src, dest = Path(in_dir), Path(out_dir)
    model_file = resolve(src)
    if is_inside(dest, src):
        raise ModelInputError(f"output folder {dest} is the input folder or inside it; choose a folder elsewhere")
    if dest.suffix == ".onnx":
        raise ModelInputError(f"{dest}: for a model folder give an output folder (its model keeps the name {model_file.name})")
    if dest.exists() and not dest.is_dir():
        raise ModelInputError(f"{dest}: exists and is not a folder; give a folder for a folder input")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / model_file.name).exists():
        raise ModelInputError(f"{dest}: folder exists and holds other files; choose a new or empty folder")
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        raise ModelInputError(f"{parent}: output folder's parent does not exist")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the output private

    def copy_side_files(data_files: set[Path]) -> None:
        for f in side_files(src, model_file, data_files):
            if f.is_dir():
                shutil.copytree(f, tmp / f.name, copy_function=shutil.copyfile)
            else:
                shutil.copyfile(f, tmp / f.name)  # contents only: the copy is the user's to edit

    try:
        yield tmp / model_file.name, copy_side_files
        _swap_in(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, dest: Path) -> None:
    """Rename ``tmp`` to ``dest``; a previous ``dest`` is moved aside first and removed after."""
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
        os.replace(dest, old / dest.name)
    try:
        os.replace(tmp, dest)
    except OSError:
        if old is not None:
            os.replace(old / dest.name, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def quantize_folder(in_dir, out_dir, config, **kwargs):
    """:func:`ort_wq.quantize` on a model folder: ``out_dir`` gets the quantized model under the
    same file name plus copies of the side files, all at once (or nothing on an error)."""
    from .model_io import external_files, load_model
    from .quantize import quantize

    if out_dir is None:
        raise ModelInputError("quantize(folder) needs output=FOLDER: the input folder is never modified")
    model_file = resolve(in_dir)
    data_files = external_files(load_model(model_file))
    return_report = kwargs.pop("return_report", False)
    with folder_output(in_dir, out_dir) as (tmp_model, copy_side_files):
        result = quantize(str(model_file), config, output=tmp_model, return_report=True, **kwargs)
        copy_side_files(data_files)
    out = os.fspath(Path(out_dir))
    return (out, result[1]) if return_report else out
