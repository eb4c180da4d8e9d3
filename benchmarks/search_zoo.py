"""Issue 17's evidence: coefficient searches on the tiny zoo against data-free defaults and DivMerge.

For each subset of four experts (the first two of examples/data_driven.yaml's seeded sample), CMA-ES and
TPE each search examples/search.yaml's space (TIES: a weight per expert, density, lambda) with the
validation objective and with the label-free divergence objective; a study on the same subset runs the
baselines (task arithmetic lambda 0.3 and 1/n, TIES, DivMerge at task and layer level).  Every number in
the table is on the test split (the searches' best merges are scored on it once, after the search).

    python benchmarks/search_zoo.py --out /tmp/search_zoo     # then paste the printed table into RESULTS.md
    python benchmarks/search_zoo.py --out /tmp/overhead --overhead-runs 3   # examples/search.yaml 3 times, fresh

The overhead of a search is the share of wall time in which no merge and no evaluation runs
(docs/ALGORITHMS.md#searchers-trials-and-objectives): over the whole trial phase (the runner's start,
engine start and references included) and between the first trial's start and the last trial's end.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from mergescale.orchestrator import results as store
from mergescale.orchestrator.search import run_search
from mergescale.orchestrator.study import run_study
from mergescale.specs import SearchSpec, StudySpec

ROOT = Path(__file__).resolve().parents[1]
SUBSETS = [("atbash", "digit", "pairswap", "shift3"), ("atbash", "rot13", "shift1", "upper")]
SEARCHERS = ["cmaes", "optuna"]
OBJECTIVES = {"validation": {"held_in": 1.0}, "divergence": {"held_in": 0.0, "divergence": 1.0}}
BASELINES = [
    {"method": "task_arithmetic", "label": "task_arithmetic λ=0.3", "parameters": {"lambda": 0.3}},
    {"method": "task_arithmetic", "label": "task_arithmetic λ=1/n", "parameters": {"normalize": True}},
    {"method": "ties"},
    {"method": "divmerge", "label": "divmerge task"},
    {"method": "divmerge", "label": "divmerge layer", "parameters": {"level": "layer"}},
]


def summary(rows: list[dict], role: str) -> float | None:
    for r in rows:
        if r["kind"] == "summary" and r["role"] == role and r["primary"]:
            return r["normalized"]
    return None


def trials_to_95(table: list[dict]) -> int | None:
    """Trials (in draw order) until the best so far is within 5 % of the final best (|value| scale)."""
    done = sorted((r for r in table if r["state"] == "complete"), key=lambda r: r["trial"])
    final = max(r["objective"] for r in done)
    best = -math.inf
    for i, r in enumerate(done, 1):
        best = max(best, r["objective"])
        if best >= final - 0.05 * abs(final):
            return i
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--overhead-runs", type=int, default=0, help="only run examples/search.yaml this many times")
    args = ap.parse_args()
    base = yaml.safe_load((ROOT / "examples" / "search.yaml").read_text())
    if args.overhead_runs:
        overhead(args.out, args.overhead_runs)
        return
    rows = []
    for subset in SUBSETS:
        name = "+".join(subset)
        experts = {e: f"zoo:{e}" for e in subset}
        study = {"name": f"baselines-{len(rows)}", "zoo": base["zoo"], "base": "zoo:base", "experts": experts,
                 "subsets": {"sizes": [4]}, "methods": BASELINES, "eval": base["eval"], "resources": base["resources"]}
        path = args.out / f"baselines-{'-'.join(subset)}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(study, sort_keys=False))
        run_study(StudySpec.model_validate(study), path, args.out / path.stem, progress=False)
        got = store.read_results(args.out / path.stem).to_pylist()
        for label in dict.fromkeys(r["label"] for r in got if r["job_kind"] == store.MERGE):
            mine = [r for r in got if r["label"] == label]
            rows.append({"subset": name, "method": label, "held_in": summary(mine, "held_in"),
                         "held_out": summary(mine, "held_out")})
        for searcher in SEARCHERS:
            for objective, weights in OBJECTIVES.items():
                spec = {**base, "name": f"{searcher}-{objective}", "experts": experts,
                        "search": {**base["search"], "algorithm": searcher, "trials": args.trials},
                        "objective": weights}
                path = args.out / f"search-{'-'.join(subset)}-{searcher}-{objective}.yaml"
                path.write_text(yaml.safe_dump(spec, sort_keys=False))
                started = time.perf_counter()
                run = run_search(SearchSpec.model_validate(spec), path, args.out / path.stem, progress=False)
                wall = time.perf_counter() - started
                test = store.read_unit(run.results / "test", store.JOBS, run.test["job_key"])
                table = pq.read_table(run.results / "trials.parquet").to_pylist()
                rows.append({"subset": name, "method": f"search {searcher} {objective}",
                             "held_in": summary(test, "held_in"), "held_out": summary(test, "held_out"),
                             "validation": run.best["held_in"], "objective": run.best["objective"],
                             "to95": trials_to_95(table), "trials": len(table), "overhead": run.overhead,
                             "seconds": wall})
                print(json.dumps(rows[-1]), flush=True)
    (args.out / "rows.json").write_text(json.dumps(rows, indent=1))
    print("| subset | method | held-in ANP (test) | held-out (test) | held-in ANP (validation) | trials to 95 % | "
          "overhead | wall s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        pct = lambda v: "–" if v is None else f"{100 * v:.1f}"  # noqa: E731
        print(f"| {r['subset']} | {r['method']} | {pct(r['held_in'])} | {pct(r['held_out'])} | "
              f"{pct(r.get('validation'))} | {r.get('to95') or '–'} | {pct(r.get('overhead'))} | "
              f"{'–' if 'seconds' not in r else round(r['seconds'])} |")


def overhead(out: Path, runs: int) -> None:
    import statistics

    spec_path = ROOT / "examples" / "search.yaml"
    got = []
    for i in range(runs):
        started = time.perf_counter()
        run = run_search(SearchSpec.model_validate(yaml.safe_load(spec_path.read_text())), spec_path,
                         out / f"run-{i}", progress=False)  # fmt: skip
        got.append((run.overhead, run.steady_overhead, time.perf_counter() - started))
        print(f"run {i}: overhead {run.overhead:.3f} (trial phase), {run.steady_overhead:.3f} (first to last trial), "
              f"{got[-1][2]:.0f} s", flush=True)
    med = [statistics.median(x[k] for x in got) for k in range(3)]
    print(f"median of {runs}: {100 * med[0]:.1f} % (trial phase), {100 * med[1]:.1f} % (first to last trial), "
          f"{med[2]:.0f} s wall")


if __name__ == "__main__":
    main()
