"""File-system steps of the atomic writer (:mod:`ort_wq.output_files`): folder locks, fsync,
signals held back during the renames, work in the background, and OS errors as input errors."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
from pathlib import Path
from typing import Any

from .model_io import ModelInputError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking (one writer at a time assumed)
    fcntl = None  # type: ignore[assignment]

O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
ENV_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EACCES, errno.EPERM, errno.EROFS,
               errno.EISDIR, errno.ENOTDIR}


def as_input_error(exc: OSError, folder: Path) -> ModelInputError | OSError:
    if exc.errno in ENV_ERRNOS:
        where = exc.filename2 or exc.filename  # a rename names its destination second
        return ModelInputError(f"cannot write the output in {folder}: {exc.strerror or exc}"
                               f"{f' ({where})' if where else ''}; nothing was written")
    return exc


def lock_path(path: Path) -> int | None:
    """An exclusive ``flock`` on a folder, held until the returned descriptor is closed.

    ``None`` where the platform or file system has no such locks (then writers are not serialised).
    """
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY | O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise
    return fd


@contextlib.contextmanager
def locked_folder(folder: Path):
    fd = lock_path(folder)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing releases the flock


@contextlib.contextmanager
def in_background(fn, **kwargs):
    """Run ``fn(**kwargs)`` in a thread while the block runs; its exception is raised after the block."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            fn(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="ort-wq-fsync")
    thread.start()
    try:
        yield
    finally:
        thread.join()
    if failure:
        raise failure[0]


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def signals_held():
    """Hold SIGINT / SIGTERM back while the files move (main thread only); re-deliver them after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    sigs = [signal.SIGINT, signal.SIGTERM]
    old: dict[int, Any] = {}
    completed = False
    try:
        for s in sigs:
            old[s] = signal.signal(s, lambda num, frame: pending.append(num))
        yield
        completed = True
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for s in pending[:1]:
            handler = old[s]
            try:
                if callable(handler):
                    handler(s, None)
                elif handler == signal.SIG_DFL:
                    signal.raise_signal(s)
            except KeyboardInterrupt as exc:  # the files are in place: say so to whoever reports it
                exc.output_written = completed  # type: ignore[attr-defined]
                raise
