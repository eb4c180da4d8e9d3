"""How far apart model versions are, for fine-tuning transfer (docs/ALGORITHMS.md#fine-tuning-transfer):
for every ordered pair (source s, target t) of versions — each a base θ and its fine-tune θ_ft, Δ = θ_ft − θ —
the relative distance of the bases ‖θ_s − θ_t‖ / ‖θ_t‖, the cosine of the bases cos(θ_s, θ_t) and the cosine of
their fine-tuning differences cos(Δ_s, Δ_t).  One pass over every float tensor (one tensor of every model in
memory at a time), in fp64; remembered under ``$MERGESCALE_CACHE/geometry/`` by the models' weight hashes."""

from __future__ import annotations

import hashlib
import json
import math

import torch

from mergescale import files
from mergescale.cache import cache_root
from mergescale.checkpoints import ModelDir


def version_geometry(versions: dict[str, tuple[str, str]], hashes: dict[str, str]) -> dict[str, dict[str, dict]]:
    """``{source: {target: {"distance", "base_cosine", "delta_cosine"}}}`` for ``versions`` = {name: (base
    directory, fine-tune directory)}; ``hashes``: the weights sha256 of every directory."""
    names = list(versions)
    key = json.dumps([[n, hashes[b], hashes[f]] for n, (b, f) in versions.items()])
    memo = cache_root() / "geometry" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
    if memo.is_file():
        return json.loads(memo.read_text())
    bases = {n: ModelDir(b) for n, (b, _) in versions.items()}
    tuned = {n: ModelDir(f) for n, (_, f) in versions.items()}
    k = len(names)
    base_dot, delta_dot = torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, k, dtype=torch.float64)
    for tensor in bases[names[0]].names:
        if not bases[names[0]].dtype(tensor).is_floating_point:
            continue
        b = torch.stack([bases[n].tensor(tensor).to(torch.float64).reshape(-1) for n in names])
        d = torch.stack([tuned[n].tensor(tensor).to(torch.float64).reshape(-1) for n in names]) - b
        base_dot += b @ b.T
        delta_dot += d @ d.T
    out: dict[str, dict[str, dict]] = {}
    for i, s in enumerate(names):
        for j, t in enumerate(names):
            dist2 = base_dot[i, i] + base_dot[j, j] - 2 * base_dot[i, j]
            out.setdefault(s, {})[t] = {
                "distance": math.sqrt(max(float(dist2), 0.0)) / math.sqrt(float(base_dot[j, j])),
                "base_cosine": float(base_dot[i, j] / math.sqrt(float(base_dot[i, i] * base_dot[j, j]))),
                "delta_cosine": float(delta_dot[i, j] / math.sqrt(float(delta_dot[i, i] * delta_dot[j, j])))
                if delta_dot[i, i] > 0 and delta_dot[j, j] > 0 else None,
            }  # fmt: skip
    files.write_text(memo, json.dumps(out, indent=1, sort_keys=True))
    return out
