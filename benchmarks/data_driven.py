"""The data-driven evidence table: mean held-in ANP per method and number of experts, side by side,
with fit seconds, from the results store of ``examples/data_driven.yaml``.

    mergescale study run examples/data_driven.yaml
    python benchmarks/data_driven.py results/data_driven [--metric exact_match]

Prints a Markdown table (the one in benchmarks/RESULTS.md): per label, ANP % at each size with the
report's 95 % expert-bootstrap interval (the subsets share experts, so they are not independent samples
and a t-interval over them would be too narrow; ``docs/ALGORITHMS.md#expert-bootstrap-intervals``), the
held-out score, and the mean fit seconds of data-driven methods — the numbers of ``mergescale study
report``, so the two never disagree.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from mergescale.orchestrator.report import leaderboard
from mergescale.orchestrator.results import read_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--metric", default=None)
    ap.add_argument("--baselines", nargs="+", help="data-free labels for the paired comparison",
                    default=["task_arithmetic λ=0.3", "task_arithmetic λ=1/n", "ties global", "metagpt"])  # fmt: skip
    args = ap.parse_args()
    table = read_results(args.results)
    rows = table.to_pylist()
    metric = args.metric or next(r["metric"] for r in rows if r["kind"] == "score" and r["role"] == "held_in")
    anp: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    by_subset: dict[tuple[str, ...], dict[str, float]] = defaultdict(dict)  # experts -> label -> ANP
    fit_seconds: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    seen = set()
    for r in rows:
        if r["job_kind"] != "merge" or r["kind"] != "summary" or r["metric"] != metric or r["role"] != "held_in":
            continue
        if r["job_key"] in seen:
            continue
        seen.add(r["job_key"])
        anp[r["label"]][r["n_experts"]].append(r["normalized"])
        by_subset[tuple(r["experts"])][r["label"]] = r["normalized"]
        if r["fit"]:
            fit_seconds[r["label"]][r["n_experts"]].append(json.loads(r["fit"])["seconds"])
    sizes = sorted({n for by_n in anp.values() for n in by_n})
    board = leaderboard(table, metric)  # best first by the equal-weight mean over sizes
    print(f"Held-in ANP ({metric}, % of each expert's own score; mean [95 % expert-bootstrap interval])\n")
    head = ["method", *[f"n={n} ({len(anp[board[0]['label']][n])} subsets)" for n in sizes], "held-out %",
            "fit s (n=2 / max n)"]  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" + "---:|" * (len(head) - 1))
    for b in board:
        label, cells = b["label"], []
        for n in sizes:
            cell = b["by_n"].get(n) or {}
            if cell.get("anp") is None:
                cells.append("–")
                continue
            span = cell.get("interval")
            cells.append(f"{100 * cell['anp']:.1f}" + (f" [{100 * span[0]:.1f}, {100 * span[1]:.1f}]" if span else ""))
        held_out = b.get("held_out")
        fits = fit_seconds.get(label)
        fit = (f"{statistics.fmean(fits[min(sizes)]):.1f} / {statistics.fmean(fits[max(sizes)]):.1f}"
               if fits and fits.get(min(sizes)) and fits.get(max(sizes)) else "–")  # fmt: skip
        kept = "–" if held_out is None else f"{100 * held_out:.1f}"
        print(f"| {label} | " + " | ".join(cells) + f" | {kept} | {fit} |")

    _paired(by_subset, sizes, args.baselines)


def _paired(by_subset: dict, sizes: list[int], baselines: list[str]) -> None:
    """Paired comparisons on the same subsets: DivMerge layer vs task, task vs the best data-free method
    of that subset (the strongest baseline chosen after the fact, a harder bar than any fixed one)."""
    pairs = [("divmerge layer", "divmerge task"), ("divmerge task", "best data-free"),
             ("divmerge layer", "best data-free")]  # fmt: skip
    print("\nPaired on the same subsets: mean ANP difference in points, and subsets where the first is ≥ the second\n")
    print("| comparison | " + " | ".join(f"n={n}" for n in sizes) + " |")
    print("|---|" + "---:|" * len(sizes))
    for a, b in pairs:
        cells = []
        for n in sizes:
            diffs = []
            for subset, got in by_subset.items():
                free = [got[x] for x in baselines if x in got]
                values = {**got, "best data-free": max(free) if len(free) == len(baselines) else None}
                if len(subset) == n and values.get(a) is not None and values.get(b) is not None:
                    diffs.append(values[a] - values[b])
            cells.append(f"{100 * statistics.fmean(diffs):+.1f} ({sum(d >= 0 for d in diffs)}/{len(diffs)})"
                         if diffs else "–")  # fmt: skip
        print(f"| {a} − {b} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
