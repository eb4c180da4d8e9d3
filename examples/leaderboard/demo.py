"""The example leaderboard: zoo experts and merges of them (mergescale's, and mergekit's when it is installed)
submitted in two nights, each night one tick of the schedule (`leaderboard run && leaderboard publish`).

    python examples/leaderboard/demo.py --out results/leaderboard-demo
    # then open results/leaderboard-demo/site/index.html

It writes OUT/board (the leaderboard directory: leaderboard.yaml, queue/, results/, runs/), OUT/models (the
merged models) and OUT/site (the published site).  Rerunning it submits nothing new and evaluates nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).parent
MERGESCALE = str(Path(sys.executable).parent / "mergescale")


def mergescale(*args: str) -> str:
    res = subprocess.run([MERGESCALE, *map(str, args)], capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"mergescale {' '.join(map(str, args))} failed:\n{res.stderr}")
    return res.stdout + res.stderr


def merge(zoo, out: Path, method: str, experts: list[str], parameters: dict | None = None) -> Path:
    if not (out / "config.json").is_file():
        spec = {"method": method, "base": str(zoo.base), "experts": [{"model": str(zoo.experts[e])} for e in experts],
                "parameters": parameters or {}}  # fmt: skip
        out.with_suffix(".yaml").write_text(yaml.safe_dump(spec))
        mergescale("merge", out.with_suffix(".yaml"), "--out", out)
    return out


def mergekit_merge(zoo, out: Path, experts: list[str]) -> Path | None:
    """A task-arithmetic merge by mergekit itself (its own card and mergekit_config.yml), if installed."""
    try:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge
    except ImportError:
        return None
    if not (out / "config.json").is_file():
        models = [{"model": str(zoo.experts[e]), "parameters": {"weight": 0.5}} for e in experts]
        config = {"merge_method": "task_arithmetic", "base_model": str(zoo.base), "dtype": "float32", "models": models}
        run_merge(MergeConfiguration.model_validate(config), str(out), options=MergeOptions(quiet=True))
    return out


def tick(board: Path, site: Path) -> None:
    print(mergescale("leaderboard", "run", board, "--quiet").strip().splitlines()[0])
    mergescale("leaderboard", "publish", board, "--out", site)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results/leaderboard-demo"))
    args = p.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # mergekit runs in this process: no deprecation notes
    from mergescale.zoo.build import build_zoo, preset_spec

    zoo = build_zoo(preset_spec("tiny"), progress=False)
    board, models, site = args.out / "board", args.out / "models", args.out / "site"
    board.mkdir(parents=True, exist_ok=True)
    models.mkdir(exist_ok=True)
    shutil.copy(HERE / "leaderboard.yaml", board / "leaderboard.yaml")

    # night 1: three experts and two merges of two of them
    mergescale("leaderboard", "submit", board, *(zoo.experts[e] for e in ("upper", "rot13", "digit")))
    mergescale("leaderboard", "submit", board, merge(zoo, models / "ties-upper-rot13", "ties", ["upper", "rot13"]),
               merge(zoo, models / "ta-upper-digit", "task_arithmetic", ["upper", "digit"], {"lambda": 0.5}))
    tick(board, site)
    # night 2: a three-expert merge, mergekit's merge, and an expert the suite has no task for
    later = [merge(zoo, models / "dare-ties-3", "dare_ties", ["upper", "rot13", "digit"]), zoo.experts["shift1"]]
    mk = mergekit_merge(zoo, models / "mergekit-ta-rot13-digit", ["rot13", "digit"])
    mergescale("leaderboard", "submit", board, *later, *([mk] if mk else []), "--tag", "night-2")
    # and a second evaluation of night 1's TIES merge (its page shows the score history)
    from mergescale.leaderboard.queue import Board

    if sum(r["name"] == "ties-upper-rot13" for r in Board(board).requests()) == 1:  # once, not on every rerun
        mergescale("leaderboard", "submit", board, models / "ties-upper-rot13", "--reevaluate")
    tick(board, site)
    print(site / "index.html")


if __name__ == "__main__":
    main()
