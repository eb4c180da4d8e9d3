"""Wall time of a whole study from an empty results store, and of re-running it once finished.

    python benchmarks/study_speed.py examples/many_experts.yaml [--reruns 3] [--cold-cache] [--keep DIR]

Runs ``mergescale study run`` as a user does (a subprocess with its own embedded Ray) into a fresh
results directory, then re-runs it ``--reruns`` times (nothing left to do: every job's key is in the
store).  ``--cold-cache`` points ``MERGESCALE_CACHE`` at an empty directory first, so the zoo is
built too; ``--keep DIR`` keeps the results store for a report.  Prints one JSON line of figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MERGESCALE = Path(sys.executable).parent / "mergescale"


def timed_run(spec: Path, out: Path, env: dict) -> tuple[float, str]:
    started = time.perf_counter()
    res = subprocess.run([str(MERGESCALE), "study", "run", str(spec), "--out", str(out), "--quiet", "--top", "10"],
                         env=env, capture_output=True, text=True)  # fmt: skip
    seconds = time.perf_counter() - started
    if res.returncode != 0:
        sys.exit(res.stderr[-3000:])
    return seconds, res.stdout + res.stderr


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("spec", type=Path)
    p.add_argument("--reruns", type=int, default=3)
    p.add_argument("--cold-cache", action="store_true", help="build the zoo too (empty MERGESCALE_CACHE)")
    p.add_argument("--keep", type=Path, help="move the finished results store here (default: deleted)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="study-bench-"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.setdefault("RAY_AUTH_MODE", "disabled")
    if args.cold_cache:
        env["MERGESCALE_CACHE"] = str(work / "cache")
    try:
        first, log = timed_run(args.spec, work / "results", env)
        print(log, file=sys.stderr)
        jobs = int(re.search(r"(\d+) jobs", log).group(1))
        reruns = [timed_run(args.spec, work / "results", env)[0] for _ in range(args.reruns)]
        figures = {
            "spec": str(args.spec), "cold_cache": args.cold_cache, "jobs": jobs, "first_run_s": round(first, 1),
            "s_per_job": round(first / jobs, 2), "rerun_s_median": round(statistics.median(reruns), 2),
            "reruns_s": [round(r, 2) for r in reruns], "cpus": os.cpu_count(),
        }  # fmt: skip
        print(json.dumps(figures))
        if args.keep:
            shutil.move(work / "results", args.keep)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
