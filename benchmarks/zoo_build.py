"""Wall time and peak memory of building the synthetic zoo from scratch.

    python benchmarks/zoo_build.py --preset tiny --repeat 3

Each repeat builds into a fresh temporary directory in a fresh process (no cache reuse)
and reports the median wall time and the peak RSS, plus whether every repeat gave the
same weight hashes (determinism).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, resource, sys
from mergescale.zoo.build import build_zoo, preset_spec
zoo = build_zoo(preset_spec(sys.argv[1], seed=int(sys.argv[2])), out=sys.argv[3], progress=False)
scores = zoo.meta["scores"]["test"]
held_in = zoo.meta["tasks"]["held_in"]
print(json.dumps({"hashes": zoo.meta["weights_sha256"],
                  "min_expert_own": min(scores[t][t]["exact_match"] for t in held_in),
                  "max_base_held_in": max(scores["base"][t]["exact_match"] for t in held_in),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=("tiny", "small"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    times, rss, hashes = [], [], []
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            res = subprocess.run(
                [sys.executable, "-c", CHILD, args.preset, str(args.seed), str(Path(tmp) / "zoo")],
                capture_output=True,
                text=True,
                check=True,
            )
            times.append(time.perf_counter() - start)
            out = json.loads(res.stdout.strip().splitlines()[-1])
            rss.append(out["peak_rss_mb"])
            hashes.append(out["hashes"])
            print(
                f"run {i + 1}: {times[-1]:.1f} s, peak RSS {rss[-1]:.0f} MB; experts on their own task >= "
                f"{out['min_expert_own']:.0%}, base on held-in <= {out['max_base_held_in']:.0%}",
                flush=True,
            )
    print(
        f"preset {args.preset}, seed {args.seed}, {os.cpu_count()} CPUs: median {statistics.median(times):.1f} s "
        f"(min {min(times):.1f}, max {max(times):.1f}) over {args.repeat} runs; peak RSS {max(rss):.0f} MB; "
        f"identical weights across runs: {all(h == hashes[0] for h in hashes)}"
    )


if __name__ == "__main__":
    main()
