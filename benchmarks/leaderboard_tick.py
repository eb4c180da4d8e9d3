"""Issue 18's evidence: what one tick of a scheduled leaderboard costs (`mergescale leaderboard run`, the CLI as
a cron job runs it, embedded Ray), with nothing new and per new model, on examples/leaderboard/leaderboard.yaml
(three tiny-zoo experts as references, one held-out task, 20 documents per task, vLLM on CPU).

    python benchmarks/leaderboard_tick.py --out /tmp/leaderboard_tick --repeats 3

1. a first tick with one model: Ray, the engine, the reference models (evaluated once per leaderboard) and the
   model;
2. `--repeats` times, interleaved: a tick with nothing waiting; a tick with 1 new evaluation; a tick with 4 new
   evaluations (`submit --reevaluate` of models already on the board, so the same models are scored again).
   Per new model = (4-model tick - 1-model tick) / 3; the fixed cost of a tick that has work = the 1-model
   tick - one model.  Medians; the table goes to benchmarks/RESULTS.md.
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
    models = [zoo.experts[e] for e in ("upper", "rot13", "digit", "shift1")]

    cli("leaderboard", "submit", board, models[0])
    first = cli("leaderboard", "run", board, "--quiet")
    cli("leaderboard", "submit", board, *models[1:])
    cli("leaderboard", "run", board, "--quiet")  # every model on the board once
    empty, one, four = [], [], []
    for _ in range(args.repeats):
        empty.append(cli("leaderboard", "run", board, "--quiet"))
        cli("leaderboard", "submit", board, models[0], "--reevaluate")
        one.append(cli("leaderboard", "run", board, "--quiet"))
        cli("leaderboard", "submit", board, *models, "--reevaluate")
        four.append(cli("leaderboard", "run", board, "--quiet"))
    publish = [cli("leaderboard", "publish", board, "--out", args.out / "site") for _ in range(args.repeats)]
    per_model = statistics.median(f - o for f, o in zip(four, one, strict=True)) / 3
    rows = [
        ("first tick (Ray, engine, 4 reference models, 1 model)", [first]),
        ("tick with nothing new", empty),
        ("tick with 1 new model", one),
        ("tick with 4 new models", four),
        ("publish (the site, 4 models with their history)", publish),
    ]
    print("| what | median s | runs (s) |\n|---|---:|---|")
    for what, times in rows:
        print(f"| {what} | {statistics.median(times):.2f} | {', '.join(f'{t:.2f}' for t in times)} |")
    print(f"| per new model ((4-model tick - 1-model tick) / 3) | {per_model:.2f} | |")
    print(f"| fixed cost of a tick with work (1-model tick - 1 model) | {statistics.median(one) - per_model:.2f} | |")


if __name__ == "__main__":
    main()
