"""Writing a model so that its path names a complete model at every instant (or nothing).

A model with external data is two files, and no pair of renames replaces two files at once. So a
write never reuses the data file the current graph reads: it takes ``<OUTPUT>.data`` or, when
that name is in use, ``<OUTPUT>_data`` (the two names onnxruntime-genai's builder and optimum
write), and ``<OUTPUT>.<token>.data`` (``token``: 12 random hex digits) only when both exist.
Consecutive writes of one output alternate between the two plain names. The order is:

1. graph and data are written (and fsync'ed) in a temporary folder ``.<OUTPUT>.<token>.tmp``
   beside ``OUTPUT``; a failure (or Ctrl-C / SIGTERM) removes that folder and nothing else;
2. under an exclusive lock on the output folder (``flock``, so concurrent writers take turns),
   the data file's name is chosen (a name no file has), written into the graph, and the data
   file is renamed into the folder under it: nothing refers to it yet;
3. the graph is renamed onto ``OUTPUT``: the only step readers can see, atomic;
4. data files of earlier writes of ``OUTPUT`` (``<OUTPUT>.<token>.data`` not referenced by the
   new graph, and the plain names when the old graph read them) are removed, never a file the
   input reads.

A process killed between 2 and 3 leaves an unreferenced data file (its temporary folder, left
too, names it); one killed before leaves its temporary folder. Both are removed by the next write
of the same output: a temporary folder is held by an ``flock`` while its writer lives (taken
under the folder lock, as is the clean-up), so only those of dead writers are taken.
Ctrl-C and SIGTERM during steps 2-4 are held back until step 4 is done.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import threading
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking (one writer at a time assumed)
    fcntl = None  # type: ignore[assignment]

from .fs_utils import (
    O_DIRECTORY,
    as_input_error,
    fsync_dir,
    fsync_file,
    in_background,
    lock_path,
    locked_folder,
    signals_held,
)
from .model_io import ModelInputError, external_files, release
from .output_proto import locations, relocate, serialize

__all__ = ["AtomicModelWriter", "ExternalDataSink", "same_file", "was_written"]




_WRITTEN: set[str] = set()  # outputs this process has put in place (for what an interrupted CLI reports)


def was_written(path: str | os.PathLike) -> bool:
    """Whether this process has completed a write of ``path``."""
    return os.path.abspath(path) in _WRITTEN


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name the same file (links and hard links included); never raises."""
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


class ExternalDataSink:
    """Appends tensors to one external-data file as they are produced (thread-safe).

    Each ``put`` writes the bytes at a 64-byte aligned offset and returns an ``ir.ExternalTensor``
    pointing at them, so the data leaves memory as soon as it is computed.
    """

    ALIGN = 64

    def __init__(self, folder: Path, name: str) -> None:
        self.folder, self.name = folder, name
        self._file = open(folder / name, "xb")  # noqa: SIM115 - closed by close()
        self._offset = 0
        self._lock = threading.Lock()

    def put(self, name: str, array: np.ndarray) -> ir.ExternalTensor:
        data = np.ascontiguousarray(array)
        tensor = ir.Tensor(data, name=name)
        raw = tensor.tobytes()
        with self._lock:
            pad = -self._offset % self.ALIGN
            try:
                if pad:
                    self._file.write(b"\0" * pad)
                self._file.write(raw)
            except OSError as exc:  # a full disk, a quota: the user's to fix
                raise as_input_error(exc, self.folder.parent) from None
            offset = self._offset + pad
            self._offset = offset + len(raw)
        return ir.ExternalTensor(self.name, offset, len(raw), tensor.dtype, shape=tensor.shape, name=name,
                                 base_dir=str(self.folder))

    def close(self, sync: bool = False) -> None:
        if not self._file.closed:
            if sync:
                self._file.flush()
                os.fsync(self._file.fileno())
            self._file.close()


class AtomicModelWriter:
    """Writes a model into a temporary folder beside ``path``; files move into place only in ``finish``.

    With ``external_data``, :attr:`sink` streams tensors to the write's own data file while the
    model is being built; ``finish`` moves the initializers still held in memory or in other
    files there too. Used as a context manager: leaving it without ``finish`` removes everything.
    See the module docstring for the order of the steps.
    """

    def __init__(self, path: str | os.PathLike, external_data: bool, durable: bool = True) -> None:
        self.dest = Path(path)
        self.durable = durable  # fsync before the renames (off for throw-away copies)
        if self.dest.is_dir():
            raise ModelInputError(f"{self.dest}: is a folder; give a file name for the output model")
        self.parent = self.dest.parent if str(self.dest.parent) else Path(".")
        if not self.parent.is_dir():
            raise ModelInputError(f"{self.parent}: output folder does not exist")
        if not os.access(self.parent, os.W_OK | os.X_OK):
            raise ModelInputError(f"{self.parent}: output folder is not writable (check its permissions)")
        self.external_data = external_data
        self.token = secrets.token_hex(6)
        self.data_name = f"{self.dest.name}.{self.token}.data"  # in the temporary folder; renamed in step 2
        self.plain_names = (f"{self.dest.name}.data", f"{self.dest.name}_data")
        self._data_re = re.compile(re.escape(self.dest.name) + r"\.[0-9a-f]{12}\.data")
        self._tmp_re = re.compile(r"\." + re.escape(self.dest.name) + r"\.[0-9a-f]{12}\.tmp")
        self.tmp: Path | None = None
        self.sink: ExternalDataSink | None = None
        self._tmp_fd: int | None = None
        self._protected: list[Path] = []

    def check_inputs(self, model: ir.Model, source: str | os.PathLike | None = None) -> None:
        """Refuse an output that is, or links to, a file the input reads (its graph or data files).

        Those files are also never removed as an earlier output's data.
        """
        inputs = sorted(external_files(model))
        if source is not None:
            inputs.insert(0, Path(source))
        self._protected = inputs
        for f in inputs:
            if same_file(self.dest, f):
                what = "is the input model" if f == (Path(source) if source else None) else "holds the input's weights"
                raise ModelInputError(f"output {self.dest} {what} ({f.name}) and would be overwritten; "
                                      "choose another output name")

    def __enter__(self) -> AtomicModelWriter:
        tmp = self.parent / f".{self.dest.name}.{self.token}.tmp"
        try:
            # under the folder lock: no other writer's cleanup sees our folder before it is locked
            with locked_folder(self.parent):
                self._remove_stale_temporaries()
                self.tmp = tmp  # before mkdir: a signal handled as mkdir returns must still remove it
                try:
                    tmp.mkdir()
                except FileExistsError:  # not ours (48 random bits never repeat in practice)
                    self.tmp = None
                    raise
                self._tmp_fd = lock_path(tmp)
            if self.external_data:
                self.sink = ExternalDataSink(tmp, self.data_name)
        except BaseException as exc:
            self.__exit__()
            if isinstance(exc, OSError):
                raise as_input_error(exc, self.parent) from None
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.sink is not None:
            self.sink.close()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        if self._tmp_fd is not None:
            os.close(self._tmp_fd)
            self._tmp_fd = None

    def finish(self, model: ir.Model) -> list[Path]:
        """Write the graph (and the remaining tensors), then move the files into place."""
        assert self.tmp is not None, "use AtomicModelWriter as a context manager"
        self._protected += sorted(external_files(model))  # still read by the model: never removed
        try:
            self._move_tensors(model)
            if self.sink is not None:
                with in_background(self.sink.close, sync=self.durable):  # the data reaches the disk meanwhile
                    proto = serialize(model)
            else:
                proto = serialize(model)
        except OSError as exc:
            raise as_input_error(exc, self.parent) from None
        with signals_held(), locked_folder(self.parent):
            written, data_name = self._commit(proto)
            _WRITTEN.add(os.path.abspath(self.dest))
        if self.sink is not None:
            _point_to(model, self.sink.folder, self.parent, data_name)
        return written

    def _move_tensors(self, model: ir.Model) -> None:
        sink = self.sink
        for graph in (model.graph, *model.graph.subgraphs()):
            for value in graph.initializers.values():
                t = value.const_value
                if t is None or (sink is not None and isinstance(t, ir.ExternalTensor) and Path(t.base_dir) == sink.folder):
                    continue
                if sink is not None and t.nbytes >= 1024:
                    value.const_value = sink.put(value.name, t.numpy())
                elif isinstance(t, ir.ExternalTensor):  # another file's data: the output must not depend on it
                    value.const_value = ir.Tensor(np.array(t.numpy()), name=value.name)
                else:
                    continue
                release(t)

    def _commit(self, proto: onnx.ModelProto) -> tuple[list[Path], str]:
        """Steps 2-4 of the module docstring (the caller holds the folder lock); returns the files
        written and the data file's name."""
        assert self.tmp is not None
        exists = any(os.path.lexists(self.parent / n) for n in self.plain_names)
        old_refs = locations(self.dest) if exists else set()  # what the current graph reads
        self._remove_orphans(old_refs)
        name = self.data_name
        if self.sink is not None:
            name = next((n for n in self.plain_names if not os.path.lexists(self.parent / n)), self.data_name)
            relocate(proto, self.data_name, name)
        graph = self.tmp / self.dest.name
        written = []
        moved: Path | None = None
        try:
            graph.write_bytes(proto.SerializeToString())
            if self.durable:
                fsync_file(graph)
            if self.sink is not None:
                moved = self.parent / name
                if moved.exists():  # a 48-bit name clash: never replace a file
                    raise ModelInputError(f"{moved}: exists; run again")
                # what a writer killed from here on leaves undone (see _remove_orphans)
                (self.tmp / _MOVED).write_text("\n".join([name, *sorted(old_refs & set(self.plain_names) - {name})]))
                os.replace(self.tmp / self.data_name, moved)
                written.append(moved)
            os.replace(graph, self.dest)
        except BaseException as exc:
            if moved is not None:
                with contextlib.suppress(OSError):
                    moved.unlink()
            if isinstance(exc, OSError):
                raise as_input_error(exc, self.parent) from None
            raise
        written.append(self.dest)
        if self.durable:
            fsync_dir(self.parent)
        self._remove_old_data(old_refs, name)
        return written, name

    def _remove_old_data(self, old_refs: set[str], keep: str) -> None:
        """Data files of earlier writes of this output (never ours, never one the input reads)."""
        for entry in os.scandir(self.parent):
            name = entry.name
            if name == keep or not (self._data_re.fullmatch(name) or (name in self.plain_names and name in old_refs)):
                continue
            self._remove(self.parent / name)

    def _remove(self, path: Path) -> None:
        if path.is_file() and not path.is_symlink() and not any(same_file(path, p) for p in self._protected):
            with contextlib.suppress(OSError):
                path.unlink()

    def _remove_orphans(self, old_refs: set[str]) -> None:
        """What writers killed after step 2 left undone; their folders' notes say what it is.

        A note names the data file moved in, then the old data files to remove. If the current
        graph (which reads ``old_refs``) does not read the moved file, the writer died before
        step 3 and the file is removed; otherwise step 4 is done for it.
        """
        for entry in self._dead_temporaries(noted=True):
            with contextlib.suppress(OSError):
                moved, *old = (Path(entry.path) / _MOVED).read_text().splitlines()
                for name in (old if moved in old_refs else [moved]):
                    if name in self.plain_names and name not in old_refs:
                        self._remove(self.parent / name)
            shutil.rmtree(entry.path, ignore_errors=True)

    def _remove_stale_temporaries(self) -> None:
        """Temporary folders of earlier writes of this output whose writer no longer runs.

        Those that name a data file they moved in are left to ``_remove_orphans`` (in step 2,
        when what the input reads is known).
        """
        for entry in self._dead_temporaries(noted=False):
            shutil.rmtree(entry.path, ignore_errors=True)

    def _dead_temporaries(self, noted: bool):
        """Temporary folders of this output that no live writer holds (with or without a ``_MOVED`` note)."""
        if fcntl is None:
            return
        try:
            entries = [e for e in os.scandir(self.parent) if self._tmp_re.fullmatch(e.name)]
        except OSError:
            return
        for entry in entries:
            if self.tmp is not None and entry.name == self.tmp.name:
                continue
            if os.path.exists(os.path.join(entry.path, _MOVED)) != noted:
                continue
            try:
                fd = os.open(entry.path, os.O_RDONLY | O_DIRECTORY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held: its writer is alive
                os.close(fd)
                continue
            try:
                yield entry
            finally:
                os.close(fd)


_MOVED = "moved"  # in a temporary folder: the name its data file was moved in under


def _point_to(model: ir.Model, folder: Path, parent: Path, name: str) -> None:
    """Point the in-memory tensors written to ``folder`` at the data file ``parent / name``."""
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            t = value.const_value
            if isinstance(t, ir.ExternalTensor) and Path(t.base_dir) == folder:
                if t.location == name:
                    t.base_dir = str(parent)
                else:
                    release(t)
                    value.const_value = ir.ExternalTensor(name, t.offset, t.length, t.dtype, shape=t.shape,
                                                          name=t.name, base_dir=str(parent))


