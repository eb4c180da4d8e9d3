"""Where mergescale keeps what it can rebuild: built zoos, evaluator references, fit inputs, weight hashes.

``$MERGESCALE_CACHE``, else ``~/.cache/mergescale``.  On a cluster point it at a shared filesystem.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("MERGESCALE_CACHE", Path.home() / ".cache" / "mergescale"))
