"""One BLAS thread for the calling thread, where numpy's OpenBLAS offers it.

GPTQ's blocked factorisation and row sweep are many medium-size matrix products. Threaded
OpenBLAS runs them slower than one thread as soon as the cores are shared: measured on 2 busy
cores, a 3000 x 3000 blocked Cholesky + triangular inverse took 3.6 + 6.5 s threaded and
0.6 + 0.65 s on one thread; and the transform already quantizes weights on all cores in
parallel. ``openblas_set_num_threads_local`` (OpenBLAS >= 0.3.27) sets the count for the
calling thread only; without it (another BLAS, an older OpenBLAS) nothing changes.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_fn: object = None  # None: not looked up yet; False: unavailable


def _setter():
    global _fn
    with _lock:
        if _fn is None:
            _fn = False
            import numpy

            libs = os.path.join(os.path.dirname(numpy.__file__), os.pardir, "numpy.libs", "*openblas*")
            for lib in sorted(glob.glob(libs)):
                try:
                    fn = ctypes.CDLL(lib).openblas_set_num_threads_local
                except (OSError, AttributeError):
                    continue
                fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
                _fn = fn
                break
    return _fn or None


@contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` BLAS threads in this thread (no-op where it cannot be set)."""
    fn = _setter()
    if fn is None:
        yield
        return
    previous = fn(n)
    try:
        yield
    finally:
        fn(previous if previous > 0 else 0)


def one_blas_thread(fn):
    """Decorator: ``fn`` runs with one BLAS thread (its signature is kept, for option checks)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with blas_threads(1):
            return fn(*args, **kwargs)

    return wrapper
