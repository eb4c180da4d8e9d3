"""Issue 18's evidence: what one tick of a scheduled leaderboard costs (`mergescale leaderboard run`, the CLI as
a cron job runs it, embedded Ray), with nothing new and per new model, on examples/leaderboard/leaderboard.yaml
(three tiny-zoo experts as references, one held-out task, 20 documents per task, vLLM on CPU).

    python benchmarks/leaderboard_tick.py --out /tmp/leaderboard_tick --repeats 3

1. a first tick with one model: Ray, the engine, the reference models (evaluated once per leaderboard) and the
   model;
2. `--repeats` times, interleaved: a tick with nothing waiting; a tick with 1 new evaluation; a tick with 8 new
   evaluations (`submit --reevaluate` of the zoo's eight experts, already on the board, so the same models are
   scored again).  Per new model = (8-model tick - 1-model tick) / 7, and, measured inside the ticks, the
   median `eval_seconds` of the stored evaluations (one model's whole evaluation on the warm engine).
   Medians; the table goes to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MERGESCALE = str(Path(sys.executable).parent / "mergescale")


def cli(*args) -> float:
    started = time.perf_counter()
    res = subprocess.run([MERGESCALE, *map(str, args)], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})  # fmt: skip
    if res.returncode:
        sys.exit(f"mergescale {' '.join(map(str, args))}:\n{res.stderr}")
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from mergescale.zoo.build import build_zoo, preset_spec

    zoo = build_zoo(preset_spec("tiny"), progress=False)
    board = args.out / "board"
    shutil.rmtree(args.out, ignore_errors=True)
    board.mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "leaderboard" / "leaderboard.yaml", board / "leaderboard.yaml")
    models = list(zoo.experts.values())

    cli("leaderboard", "submit", board, models[0])
    first = cli("leaderboard", "run", board, "--quiet")
    cli("leaderboard", "submit", board, *models[1:])
    cli("leaderboard", "run", board, "--quiet")  # every model on the board once
    empty, one, many = [], [], []
    for _ in range(args.repeats):
        empty.append(cli("leaderboard", "run", board, "--quiet"))
        cli("leaderboard", "submit", board, models[0], "--reevaluate")
        one.append(cli("leaderboard", "run", board, "--quiet"))
        cli("leaderboard", "submit", board, *models, "--reevaluate")
        many.append(cli("leaderboard", "run", board, "--quiet"))
    publish = [cli("leaderboard", "publish", board, "--out", args.out / "site") for _ in range(args.repeats)]
    n = len(models)
    per_model = statistics.median(m - o for m, o in zip(many, one, strict=True)) / (n - 1)
    from mergescale.orchestrator import results as store

    table = store.read_results(board / "results").to_pylist()
    inside = statistics.median({r["job_key"]: r["eval_seconds"] for r in table
                                if r["job_kind"] == store.SUBMISSION and r["kind"] == "summary"}.values())  # fmt: skip
    rows = [
        ("first tick (Ray, engine, 4 reference models, 1 model)", [first]),
        ("tick with nothing new", empty),
        ("tick with 1 new model", one),
        (f"tick with {n} new models", many),
        (f"publish (the site, {n} models with their history)", publish),
    ]
    print("| what | median s | runs (s) |\n|---|---:|---|")
    for what, times in rows:
        print(f"| {what} | {statistics.median(times):.2f} | {', '.join(f'{t:.2f}' for t in times)} |")
    print(f"| per new model (({n}-model tick - 1-model tick) / {n - 1}) | {per_model:.2f} | |")
    print(f"| one model's evaluation inside a tick (median eval_seconds of the stored units) | {inside:.2f} | |")


if __name__ == "__main__":
    main()
