"""``python -m ort_wq`` is ``ort-wq``."""

from .cli import entry

entry()
