"""``python -m ort_wq`` is ``ort-wq``."""

import sys

from .cli import main

sys.exit(main())
