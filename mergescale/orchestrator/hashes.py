"""Weight hashes of model directories, remembered in ``$MERGESCALE_CACHE/weight-hashes.json`` by file
sizes and mtimes (hashing big checkpoints on every rerun of a study would take minutes)."""

from __future__ import annotations

import json
from pathlib import Path

from mergescale import files
from mergescale.cache import cache_root
from mergescale.checkpoints import weights_sha256


def weight_hashes(paths: list[str]) -> dict[str, str]:
    """The weights sha256 of every directory in ``paths`` (rehashed only when its files changed)."""
    memo_file = cache_root() / "weight-hashes.json"
    memo = json.loads(memo_file.read_text()) if memo_file.is_file() else {}
    out, changed = {}, False
    for p in dict.fromkeys(paths):
        stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(Path(p).glob("*.safetensors"))]
        known = memo.get(p)
        if known and known["files"] == stamp:
            out[p] = known["sha256"]
        else:
            out[p], changed = weights_sha256(p), True
            memo[p] = {"files": stamp, "sha256": out[p]}
    if changed:
        files.write_text(memo_file, json.dumps(memo, indent=1, sort_keys=True))
    return out
