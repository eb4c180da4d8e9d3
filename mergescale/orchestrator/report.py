"""The report of a study, derived from its results store(s) alone (``read_stores``).

``write_report`` writes into one folder:

* ``leaderboard.md`` and ``leaderboard.html`` — the method leaderboard (per number of merged experts:
  mean ANP and the label's rank; headline: the mean over sizes with equal weight and its 95 %
  expert-bootstrap interval; held-out, mean JS divergence, mean merge / eval seconds), one ranking
  table per number of experts with intervals, the best individual merged models, the reference models'
  raw scores, the Spearman correlation of divergence and score per held-in task, and the provenance
  (zoo key, weight hashes, versions, CPU).  The HTML page is self-contained:
  simple inline CSS and the plots embedded as inline SVG (the Markdown links the SVG files next to it).
* ``held_in.{png,svg}`` / ``held_out.{png,svg}`` — mean normalized score against the number of merged
  experts, one line per method label, shaded 95 % expert-bootstrap interval at each n.
* ``heatmap.{png,svg}`` — mean normalized score per method label and task.

The output is reproducible: the same store gives the same bytes (no dates, fixed SVG hash salt, rows
and labels in a fixed order).  Figures are ``matplotlib.figure.Figure`` objects drawn on an Agg canvas,
so no pyplot state and no global backend is touched.

Normalized scores are ratios (held-in: merged / the task's expert, held-out: merged / the base); the
tables show them in percent, the plots as ratios with the reference at 1.0.
"""

from __future__ import annotations

import html
import json
import logging
import math
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.table import Table
from scipy import stats

from mergescale import console as terminal
from mergescale import files
from mergescale.errors import MergescaleError
from mergescale.eval.scores import HELD_IN, HELD_OUT, SUMMARY_TASK
from mergescale.orchestrator.results import BASE, EDIT, EXPERT, FITS, MERGE, read_results

log = logging.getLogger(__name__)

TOP_MERGES = 20
POOLED = "all tasks (pooled)"
#: the expert bootstrap (``docs/ALGORITHMS.md#expert-bootstrap-intervals``)
RESAMPLES = 2000
BOOTSTRAP_SEED = 0
INTERVAL = "95 % expert-bootstrap interval"
OVER_SIZES = "mean over n (equal weight)"
#: fixed settings for byte-identical figures
_RC = {"svg.hashsalt": "mergescale-report", "svg.fonttype": "path", "path.simplify": True}
_PNG_METADATA = {"Software": None}
_SVG_METADATA = {"Date": None}
_MARKERS = "osD^vP*Xph"
_FLOAT = r"[-+]?\d+(\.\d+)?(e[-+]?\d+)?"
_NUMBER = re.compile(rf"^({_FLOAT}( \(#\d+\))?|\[{_FLOAT}, {_FLOAT}\])$")


# ---------------------------------------------------------------------------------------------- data


@dataclass
class _Job:
    """One merged model: its summaries and per-task values of the chosen metric."""

    key: str
    model: str
    label: str
    experts: tuple[str, ...]
    n: int
    seed: int | None
    weights_sha256: str | None = None
    merge_seconds: float | None = None
    eval_seconds: float | None = None
    anp: float | None = None
    held_out: float | None = None
    js: list[float] = field(default_factory=list)  # every js divergence row
    js_by_task: dict[str, float] = field(default_factory=dict)
    normalized: dict[tuple[str, str], float] = field(default_factory=dict)  # (role, task) -> normalized score


@dataclass
class _Study:
    name: str
    metric: str
    jobs: list[_Job]
    references: dict[str, dict[str, float]]  # reference model -> task -> raw value of the metric
    tasks: list[tuple[str, str]]  # (role, task) columns of merge jobs: held-in first, then held-out
    reference_tasks: list[str]  # the tasks of the reference models, held-in first
    split: str | None = None  # the split every unit scored (eval.split): None = lm-eval's test split


def _finite(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def _mean(values: Iterable[float | None]) -> float | None:
    v = _finite(values)
    return statistics.fmean(v) if v else None


class _Bootstrap:
    """The expert bootstrap of a study: :data:`RESAMPLES` Bayesian-bootstrap resamples of its expert pool.

    Each resample gives every expert of the pool a Dirichlet(1, …, 1) weight (drawn as standard
    exponentials: the scale cancels) and a merge job the product of its experts' weights, so the jobs
    that share an expert move together, as the subsets of one expert pool do.  Seeded: the same
    store gives the same intervals."""

    def __init__(self, experts: Iterable[str]):
        self.index = {e: i for i, e in enumerate(sorted(set(experts)))}
        rng = np.random.default_rng(BOOTSTRAP_SEED)
        self.log_weights = np.log(rng.standard_exponential((RESAMPLES, len(self.index))))

    def resampled_means(self, jobs: Sequence[_Job], values: Sequence[float]) -> np.ndarray:
        """The weighted mean of ``values`` (one per job) in every resample."""
        columns = [[self.index[e] for e in j.experts] for j in jobs]
        logw = np.stack([self.log_weights[:, c].sum(axis=1) for c in columns], axis=1)
        w = np.exp(logw - logw.max(axis=1, keepdims=True))
        return (w @ np.asarray(values, dtype=np.float64)) / w.sum(axis=1)


@dataclass
class _Estimate:
    """A mean over merge jobs, with its expert-bootstrap resamples (None: no interval)."""

    mean: float | None = None
    jobs: int = 0
    resamples: np.ndarray | None = None

    @property
    def interval(self) -> tuple[float, float] | None:
        if self.resamples is None:
            return None
        lo, hi = np.quantile(self.resamples, [0.025, 0.975])
        return float(lo), float(hi)


def _estimate(jobs: Iterable[_Job], attr: str, boot: _Bootstrap) -> _Estimate:
    """Mean of ``attr`` over the jobs that have a finite value; resamples only when the jobs hold at
    least two different subsets (one subset, e.g. all n of n experts, has no spread to resample)."""
    pairs = [(j, v) for j in jobs if (v := getattr(j, attr)) is not None and math.isfinite(v)]
    if not pairs:
        return _Estimate()
    values = [v for _, v in pairs]
    mean = statistics.fmean(values)
    if len({j.experts for j, _ in pairs}) < 2:
        return _Estimate(mean, len(pairs))
    return _Estimate(mean, len(pairs), boot.resampled_means([j for j, _ in pairs], values))


def _over_sizes(estimates: Sequence[_Estimate]) -> _Estimate:
    """The mean over numbers of experts, each weighing the same; None unless every size has a mean,
    and resamples only when every size has them."""
    if not estimates or any(e.mean is None for e in estimates):
        return _Estimate(jobs=sum(e.jobs for e in estimates))
    mean = statistics.fmean(e.mean for e in estimates)
    resamples = None if any(e.resamples is None for e in estimates) else np.mean([e.resamples for e in estimates], 0)
    return _Estimate(mean, sum(e.jobs for e in estimates), resamples)


def _spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float | None, float | None]:
    """Spearman's rho and its two-sided p-value; None when undefined (< 3 points or a constant side)."""
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None, None
    res = stats.spearmanr(x, y)
    rho, p = float(res.statistic), float(res.pvalue)
    return (rho if math.isfinite(rho) else None), (p if math.isfinite(p) else None)


def _metrics(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["metric"] for r in rows if r["kind"] == "score"))


def _choose_metric(rows: list[dict], metric: str | None, where: str) -> str:
    known = _metrics(rows)
    if metric is None:
        primary = [r["metric"] for r in rows if r["kind"] == "score" and r["primary"]]
        if primary or known:
            return (primary or known)[0]
        raise MergescaleError(f"{where}: no score rows in the results; run `mergescale study run` first")
    if metric not in known:
        raise MergescaleError(
            f"{where}: unknown metric {metric!r}; pass one of {', '.join(sorted(known)) or '(none)'} with --metric"
        )
    return metric


def _study(table: pa.Table, metric: str | None, where: str) -> _Study:
    rows = table.to_pylist()
    metric = _choose_metric(rows, metric, where)
    jobs: dict[str, _Job] = {}
    references: dict[str, dict[str, list[float]]] = {}
    roles_seen: dict[str, set[str]] = {}
    for r in rows:
        if r["kind"] == "score" and r["metric"] == metric:
            roles_seen.setdefault(r["task"], set()).add(r["role"])
        if r["job_kind"] in (BASE, EXPERT):
            if r["kind"] == "score" and r["metric"] == metric and r["value"] is not None:
                references.setdefault(r["model"], {}).setdefault(r["task"], []).append(r["value"])
            continue
        if r["job_kind"] != MERGE:
            continue
        job = jobs.get(r["job_key"])
        if job is None:
            experts = tuple(r["experts"] or ())
            job = jobs[r["job_key"]] = _Job(
                key=r["job_key"],
                model=r["model"],
                label=r["label"] or r["method"] or "(unlabelled)",
                experts=experts,
                n=r["n_experts"] if r["n_experts"] is not None else len(experts),
                seed=r["seed"],
            )
        job.weights_sha256 = job.weights_sha256 or r["weights_sha256"]
        if job.merge_seconds is None:
            job.merge_seconds = r["merge_seconds"]
        if job.eval_seconds is None:
            job.eval_seconds = r["eval_seconds"]
        if r["kind"] == "divergence" and r["metric"] == "js" and r["value"] is not None:
            job.js.append(r["value"])
            job.js_by_task[r["task"]] = r["value"]
        elif r["metric"] != metric:
            continue
        elif r["kind"] == "summary" and r["task"] == SUMMARY_TASK.get(r["role"]):
            if r["role"] == HELD_IN:
                job.anp = r["normalized"]
            elif r["role"] == HELD_OUT:
                job.held_out = r["normalized"]
        elif r["kind"] == "score" and r["normalized"] is not None:
            job.normalized[(r["role"], r["task"])] = r["normalized"]
    if not jobs:
        raise MergescaleError(f"{where}: no finished merge jobs in the results; run `mergescale study run` first")
    ordered = sorted(jobs.values(), key=lambda j: (j.label, j.n, j.experts, -1 if j.seed is None else j.seed, j.key))
    columns = {(role, task) for j in ordered for role, task in j.normalized}
    tasks = sorted(columns, key=lambda c: (c[0] != HELD_IN, c[1]))
    reference_tasks = sorted(roles_seen, key=lambda t: (HELD_IN not in roles_seen[t], t))
    name = " + ".join(dict.fromkeys(r["study"] for r in rows if r["study"])) or Path(where).name
    refs = {m: {t: statistics.fmean(v) for t, v in by_task.items()} for m, by_task in references.items()}
    splits = {r.get("split") for r in rows}
    if len(splits) > 1:
        raise MergescaleError(f"{where}: units scored on different splits ({', '.join(sorted(map(str, splits)))}); "
                              "report each split's stores apart")  # fmt: skip
    return _Study(name=name, metric=metric, jobs=ordered, references=refs, tasks=tasks,
                  reference_tasks=reference_tasks, split=splits.pop())  # fmt: skip


def read_stores(stores: Sequence[Path | str]) -> pa.Table:
    """The rows of one or several results stores, pooled.  Refused (one line naming both weight hashes)
    when a reference model (the base, an expert) has different weights in two stores, or twice in one
    store: their scores were normalized against different models (another zoo build, say).  A job key
    found in several stores is the same job: the first store's rows are kept."""
    tables, seen_keys, hashes = [], set(), {}  # hashes: reference model -> (sha256, store)
    for store in map(Path, stores):
        table = read_results(store)
        refs = table.filter(pc.is_in(table["job_kind"], pa.array([BASE, EXPERT])))
        pairs = sorted(set(zip(refs["model"].to_pylist(), refs["weights_sha256"].to_pylist(), strict=True)))
        for model, sha in pairs:
            if sha is None:
                continue
            known, where = hashes.setdefault(model, (sha, store))
            if known != sha:
                stores_named = f"{where} and {store}" if where != store else str(store)
                raise MergescaleError(
                    f"{stores_named}: reference model {model} has weights {known} and {sha}; the scores were "
                    "normalized against different models (another zoo build?): report the stores of one build"
                )
        if seen_keys:
            table = table.filter(pc.invert(pc.is_in(table["job_key"], pa.array(sorted(seen_keys)))))
        seen_keys.update(table["job_key"].to_pylist())
        tables.append(table)
    return pa.concat_tables(tables)


def _provenance(table: pa.Table, n_jobs: int, what: str = "merge jobs") -> list[_Block]:
    """Which models and which software made the numbers: the zoo key, every reference model's weights
    sha256, and the versions and CPU of the evaluating processes, each with the units it covers."""
    rows = table.to_pylist()
    units: dict[str, dict] = {}
    for r in rows:
        units.setdefault(r["job_key"], r)
    recorded = "not recorded (written before provenance was kept)"

    def count(values: Iterable) -> str:
        counted: dict = {}
        for v in values:
            counted[v] = counted.get(v, 0) + 1
        return "; ".join(f"{recorded if v is None else v} ({k} units)" for v, k in sorted(counted.items(), key=str))

    def zoo_of(u: dict) -> str | None:
        if not u["zoo_key"]:
            return "none (not a zoo's models)" if u["torch_version"] else None
        return u["zoo_key"] + (f" built on {u['zoo_host']}" if u["zoo_host"] else "")

    zoo = count(zoo_of(u) for u in units.values())
    refs = sorted({(r["model"], r["weights_sha256"]) for r in rows if r["job_kind"] in (BASE, EXPERT)},
                  key=lambda m: (m[0] != "base", m[0], m[1] or ""))  # fmt: skip
    columns = ("mergescale_version", "lm_eval_version", "vllm_version", "torch_version", "host_cpu", "backend")
    envs: dict[tuple, int] = {}
    for u in units.values():
        key = tuple(u[c] for c in columns)
        envs[key] = envs.get(key, 0) + 1
    env_rows = [[*("-" if v is None else str(v) for v in key), str(k)] for key, k in sorted(envs.items(), key=str)]
    return [
        _Block("h2", "Provenance"),
        _Block(
            "p",
            f"Zoo key: {zoo}. {len(units)} units ({n_jobs} {what} and {len(refs)} reference "
            "models). Below: the weights sha256 of every reference model, and the software and CPU of the "
            "evaluator process that scored each unit ('-': not recorded). Every merged model's weights "
            "sha256 is in the store's weights_sha256 column"
            + ("; the top merges table shows its first 12 digits." if what == "merge jobs" else "."),
        ),
        _Block("table", header=["model", "weights sha256"], rows=[[m, sha or "-"] for m, sha in refs]),
        _Block("table", header=["mergescale", "lm-eval", "vLLM", "torch", "CPU", "backend", "units"], rows=env_rows),
    ]


# ----------------------------------------------------------------------------------------- tables


def _bootstrap(study: _Study) -> _Bootstrap:
    return _Bootstrap(e for j in study.jobs for e in j.experts)


def _ns(study: _Study) -> list[int]:
    return sorted({j.n for j in study.jobs})


def _leaderboard(study: _Study, boot: _Bootstrap | None = None) -> list[dict]:
    boot = boot or _bootstrap(study)
    ns = _ns(study)
    labels: dict[str, list[_Job]] = {}
    for job in study.jobs:
        labels.setdefault(job.label, []).append(job)
    board = []
    for label, jobs in labels.items():
        anp = {n: _estimate((j for j in jobs if j.n == n), "anp", boot) for n in ns}
        held_out = {n: _estimate((j for j in jobs if j.n == n), "held_out", boot) for n in ns}
        overall, overall_out = _over_sizes(list(anp.values())), _over_sizes(list(held_out.values()))
        board.append(
            {
                "label": label,
                "metric": study.metric,
                "jobs": len(jobs),
                "anp": overall.mean,
                "anp_interval": overall.interval,
                "held_out": overall_out.mean,
                "by_n": {
                    n: {
                        "jobs": anp[n].jobs,
                        "anp": anp[n].mean,
                        "interval": anp[n].interval,
                        "rank": None,
                        "held_out": held_out[n].mean,
                        "held_out_interval": held_out[n].interval,
                    }
                    for n in ns
                },
                "js": _mean(v for j in jobs for v in j.js),
                "merge_seconds": _mean(j.merge_seconds for j in jobs),
                "eval_seconds": _mean(j.eval_seconds for j in jobs),
            }
        )
    for n in ns:
        means = [b["by_n"][n]["anp"] for b in board if b["by_n"][n]["anp"] is not None]
        for b in board:
            mine = b["by_n"][n]["anp"]
            if mine is not None:
                b["by_n"][n]["rank"] = 1 + sum(m > mine for m in means)
    return sorted(board, key=lambda b: (b["anp"] is None, -(b["anp"] or 0.0), b["label"]))


def leaderboard(table: pa.Table, metric: str | None = None) -> list[dict]:
    """The method leaderboard of a results table: one dict per method label, best first by ``anp``.

    ``anp`` is the mean over the numbers of merged experts, each size weighing the same, of the mean
    ANP of the label's merges of that size (None when the label lacks a size of the study);
    ``anp_interval`` its 95 % expert-bootstrap interval ``(lo, hi)`` (None when a size has a single
    subset); ``held_out`` the same equal-weight mean of the held-out normalized score.  ``by_n`` =
    ``{n: {jobs, anp, interval, rank, held_out, held_out_interval}}``: per number of experts the mean
    ANP, its interval, the label's rank among the labels at that size (1 = best; ties share a rank),
    and the held-out mean and interval.  ``js, merge_seconds, eval_seconds``: means over all jobs."""
    return _leaderboard(_study(table, metric, "results"))


def _divergence_vs_score(study: _Study) -> list[dict]:
    points: dict[str, list[tuple[float, float]]] = {}
    for job in study.jobs:
        for task, js in job.js_by_task.items():
            score = job.normalized.get((HELD_IN, task))
            if score is not None and math.isfinite(js) and math.isfinite(score):
                points.setdefault(task, []).append((js, score))
    out = []
    for task, pts in [*sorted(points.items()), (POOLED, [p for t in sorted(points) for p in points[t]])]:
        rho, p = _spearman([a for a, _ in pts], [b for _, b in pts])
        out.append({"task": task, "n": len(pts), "rho": rho, "p": p})
    return out


def divergence_vs_score(table: pa.Table, metric: str | None = None) -> list[dict]:
    """Per held-in task (and pooled over tasks): Spearman's rho between a merged model's JS divergence to
    the task's expert and its normalized score on the task, over the merge jobs holding that task.
    Dicts ``task, n, rho, p`` (rho / p None when undefined: fewer than 3 points or constant values)."""
    return _divergence_vs_score(_study(table, metric, "results"))


def _top_merges(study: _Study, k: int = TOP_MERGES) -> list[_Job]:
    scored = [j for j in study.jobs if j.anp is not None and math.isfinite(j.anp)]
    return sorted(scored, key=lambda j: (-j.anp, j.model, j.key))[:k]


# ------------------------------------------------------------------------------------ formatting


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _span(interval: tuple[float, float] | None) -> str:
    return "-" if interval is None else f"[{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _ranked(cell: dict) -> str:
    return "-" if cell["anp"] is None else f"{_pct(cell['anp'])} (#{cell['rank']})"


def _board_table(board: list[dict]) -> tuple[list[str], list[list[str]]]:
    ns = list(board[0]["by_n"]) if board else []
    header = ["label", "jobs", f"ANP %, {OVER_SIZES}", INTERVAL, *[f"n={n} (#rank)" for n in ns],
              f"held-out %, {OVER_SIZES}", "JS", "merge s", "eval s"]  # fmt: skip
    rows = [
        [
            b["label"],
            str(b["jobs"]),
            _pct(b["anp"]),
            _span(b["anp_interval"]),
            *[_ranked(b["by_n"][n]) for n in ns],
            _pct(b["held_out"]),
            _num(b["js"], 4),
            _num(b["merge_seconds"], 1),
            _num(b["eval_seconds"], 1),
        ]
        for b in board
    ]
    return header, rows


def _size_table(board: list[dict], n: int) -> tuple[list[str], list[list[str]]]:
    """The labels ranked by their mean ANP at ``n`` experts."""
    ranked = sorted((b for b in board if b["by_n"][n]["anp"] is not None),
                    key=lambda b: (b["by_n"][n]["rank"], b["label"]))  # fmt: skip
    header = ["#", "label", "jobs", "ANP %", INTERVAL, "held-out %", f"held-out {INTERVAL}"]
    rows = [
        [str(c["rank"]), b["label"], str(c["jobs"]), _pct(c["anp"]), _span(c["interval"]), _pct(c["held_out"]),
         _span(c["held_out_interval"])]
        for b in ranked
        for c in [b["by_n"][n]]
    ]  # fmt: skip
    return header, rows


def print_table(table: Table, header: list[str], rows: list[list[str]]):
    """Print ``rows`` under ``header`` in the rich ``table`` (first column left, the others right) on the results
    console (at least 160 columns wide when it is not a terminal); returns the console."""
    from rich.text import Text  # plain text: a name such as "a:b::c:d" or "[x]" is neither emoji code nor markup

    for i, column in enumerate(header):
        table.add_column(Text(column), justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in rows:
        table.add_row(*map(Text, row))
    console = terminal.results_console()
    if not console.is_terminal:
        console.width = max(console.width, 160)
    console.print(table)
    return console


def write_pages(out: Path, stem: str, title: str, blocks: list[_Block]) -> list[Path]:
    """Write ``blocks`` as ``out/stem.md`` and the self-contained ``out/stem.html``, atomically."""
    md, page = out / f"{stem}.md", out / f"{stem}.html"
    for path, text in ((md, _markdown(title, blocks)), (page, _html(title, blocks, out))):
        with files.atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return [md, page]


def print_leaderboard(rows_or_table: list[dict] | pa.Table, top: int | None = None, metric: str | None = None) -> None:
    """Print the method leaderboard (rows of :func:`leaderboard`, or a results table) as a rich table."""
    board = leaderboard(rows_or_table, metric) if isinstance(rows_or_table, pa.Table) else list(rows_or_table)
    shown = board[:top] if top is not None else board
    name = board[0]["metric"] if board else metric or ""
    table = Table(title=f"method leaderboard ({name}): ANP in %, ranked by the {OVER_SIZES}; "
                        f"n=k: mean ANP of the k-expert merges and the label's rank among them")  # fmt: skip
    console = print_table(table, *_board_table(shown))
    if top is not None and len(board) > top:
        console.print(f"[dim]{len(board) - top} more label(s) not shown[/dim]")


# ----------------------------------------------------------------------------------------- figures


def _new_figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out: Path, stem: str) -> list[Path]:
    png, svg = out / f"{stem}.png", out / f"{stem}.svg"
    fig.savefig(png, format="png", dpi=120, metadata=_PNG_METADATA)
    fig.savefig(svg, format="svg", metadata=_SVG_METADATA)
    return [png, svg]


def _style(i: int) -> dict:
    return {"color": matplotlib.colormaps["tab10"](i % 10), "marker": _MARKERS[i % len(_MARKERS)]}


def _line_figure(study: _Study, boot: _Bootstrap, labels: list[str], attr: str, stem: str, title: str,
                 ylabel: str) -> Figure:  # fmt: skip
    fig = _new_figure((8.0, 4.8))
    ax = fig.add_subplot()
    ns = _ns(study)
    drawn = 0
    for i, label in enumerate(labels):
        points = []
        for n in ns:
            est = _estimate((j for j in study.jobs if j.label == label and j.n == n), attr, boot)
            if est.mean is not None:
                points.append((n, est.mean, *(est.interval or (est.mean, est.mean))))
        if not points:
            continue
        x = [p[0] for p in points]
        y, lo, hi = (np.array([p[k] for p in points]) for k in (1, 2, 3))
        style = _style(i)
        (line,) = ax.plot(x, y, label=label, linewidth=1.6, markersize=5, **style)
        line.set_gid(f"{stem}-line-{i}")
        ax.fill_between(x, lo, hi, color=style["color"], alpha=0.15, linewidth=0)
        drawn += 1
    ax.axhline(1.0, linestyle="--", color="0.35", linewidth=1.0, label="reference (1.0)")
    ax.set_xticks(ns)
    ax.set_xlabel("number of merged experts")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if not drawn:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.4")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", frameon=False)
    return fig


def _fit_logs(stores: Sequence[Path], study: _Study, labels: list[str]) -> list[tuple[_Job, list[dict]]]:
    """For every label whose fits logged steps (DivMerge, AdaMerging): its job with the most experts
    (the first by key among ties) and that job's step log from ``RESULTS/fits`` (the first store holding it)."""
    out = []
    for label in labels:
        jobs = sorted((j for j in study.jobs if j.label == label), key=lambda j: (-j.n, j.key))
        for job in jobs:
            path = next((p for s in stores if (p := s / FITS / f"{job.key}.json").is_file()), None)
            if path is not None:
                steps = json.loads(path.read_text()).get("log") or []
                if steps:
                    out.append((job, steps))
                break
    return out


def _fit_figure(logs: list[tuple[_Job, list[dict]]]) -> Figure:
    """Per fitted label: the loss and each expert's coefficient (mean over its groups) at every step."""
    fig = _new_figure((10.0, 2.8 * len(logs)))
    for row, (job, steps) in enumerate(logs):
        loss_ax = fig.add_subplot(len(logs), 2, 2 * row + 1)
        coef_ax = fig.add_subplot(len(logs), 2, 2 * row + 2)
        x = [s["step"] for s in steps]
        loss_ax.plot(x, [s["loss"] for s in steps], color="tab:gray", linewidth=1)
        loss_ax.set_title(f"{job.label}: loss per step ({job.n} experts)", fontsize=9)
        loss_ax.set_xlabel("step")
        for k, expert in enumerate(job.experts):
            values = [sum(s["coefficients"][k]) / len(s["coefficients"][k]) for s in steps]
            coef_ax.plot(x, values, linewidth=1, label=expert, color=_style(k)["color"])
        coef_ax.set_title(f"{job.label}: coefficient per expert (mean over groups)", fontsize=9)
        coef_ax.set_xlabel("step")
        coef_ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def _heatmap_figure(study: _Study, labels: list[str]) -> Figure:
    columns = study.tasks
    data = np.full((len(labels), len(columns)), np.nan)
    for i, label in enumerate(labels):
        for c, column in enumerate(columns):
            mean = _mean(j.normalized.get(column) for j in study.jobs if j.label == label)
            if mean is not None:
                data[i, c] = mean
    fig = _new_figure((max(6.0, 1.0 + 0.75 * len(columns) + 0.06 * max(map(len, labels))), 1.6 + 0.45 * len(labels)))
    ax = fig.add_subplot()
    finite = data[np.isfinite(data)]
    vmax = max(1.0, float(finite.max())) if finite.size else 1.0
    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto")
    for i in range(len(labels)):
        for c in range(len(columns)):
            if np.isfinite(data[i, c]):
                ax.text(c, i, f"{data[i, c]:.2f}", ha="center", va="center", fontsize=8, color="black")
    ax.set_xticks(range(len(columns)), [task for _, task in columns], rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    held_in = sum(1 for role, _ in columns if role == HELD_IN)
    if 0 < held_in < len(columns):
        ax.axvline(held_in - 0.5, color="black", linewidth=1.5)
    axis = ax.get_xaxis_transform()
    if held_in:
        ax.text((held_in - 1) / 2, 1.02, "held-in (÷ expert)", transform=axis, ha="center", va="bottom", fontsize=9)
    if held_in < len(columns):
        middle = (held_in + len(columns) - 1) / 2
        ax.text(middle, 1.02, "held-out (÷ base)", transform=axis, ha="center", va="bottom", fontsize=9)
    ax.set_title(f"mean normalized {study.metric} per method and task", pad=22)
    fig.colorbar(image, ax=ax, label="normalized score")
    return fig


# ------------------------------------------------------------------------------------------- pages


@dataclass
class _Block:
    kind: str  # h2 | p | table | figure
    text: str = ""  # heading / paragraph text; a figure's file stem
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    caption: str = ""


def _blocks(study: _Study, board: list[dict]) -> list[_Block]:
    seeds = len({j.seed for j in study.jobs}) > 1
    board_header, board_rows = _board_table(board)
    blocks = [
        _Block(
            "p",
            f"Metric: {study.metric}. {len(study.jobs)} merge jobs, {len(board)} method labels. "
            "Normalized scores in %: held-in = merged model / the task's expert, held-out = merged model / "
            "the base. ANP = a merged model's mean held-in normalized score. Labels are ranked per number of "
            f"merged experts n (the n=k columns and the tables below); the headline '{OVER_SIZES}' is the mean "
            "over the study's numbers of experts of each size's mean ANP, every size weighing the same whatever "
            "its number of subsets ('-' when the label lacks a size). "
            f"{INTERVAL}: the percentile interval of {RESAMPLES} Bayesian-bootstrap resamples of the expert "
            "pool (each expert draws a Dirichlet(1, ..., 1) weight, a merge weighs the product of its experts' "
            f"weights; seed {BOOTSTRAP_SEED}), so merges that share experts are not counted as independent; "
            "'-' where a size has a single subset (e.g. all n of n experts), which has no interval. "
            "Seeds are not resampled. JS, merge s and eval s are means over all jobs."
            + (" Scored on the tasks' validation split (a coefficient search's trials), not their test split."
               if study.split == "validation" else ""),
        ),
        _Block("h2", "Method leaderboard"),
        _Block("table", header=board_header, rows=board_rows),
    ]
    for n in _ns(study):
        size_header, size_rows = _size_table(board, n)
        blocks += [_Block("h2", f"Ranking at n = {n} experts"), _Block("table", header=size_header, rows=size_rows)]
    blocks += [
        _Block("figure", "held_in", caption=f"Held-in: mean ANP against the number of merged experts ({INTERVAL})"),
        _Block("figure", "held_out",
               caption=f"Held-out: mean normalized score against the number of merged experts ({INTERVAL})"),
        _Block("h2", f"Top {TOP_MERGES} merges"),
    ]  # fmt: skip
    header = ["#", "model", "label", "experts", "n", *(["seed"] if seeds else []), "ANP %", "held-out %", "JS",
              "weights sha256"]  # fmt: skip
    top = [
        [
            str(i),
            j.model,
            j.label,
            "+".join(j.experts),
            str(j.n),
            *([str(j.seed)] if seeds else []),
            _pct(j.anp),
            _pct(j.held_out),
            _num(_mean(j.js), 4),
            (j.weights_sha256 or "-")[:12],
        ]
        for i, j in enumerate(_top_merges(study), 1)
    ]
    blocks.append(_Block("table", header=header, rows=top))

    blocks.append(_Block("h2", "References"))
    refs = sorted(study.references, key=lambda m: (m != "base", m))
    values = [v for m in refs for v in study.references[m].values()]
    as_pct = all(0.0 <= v <= 1.0 for v in values)
    blocks.append(_Block("p", f"Raw {study.metric}{' in %' if as_pct else ''} of the base and the experts per task."))
    fmt = _pct if as_pct else (lambda v: "-" if v is None else f"{v:.4g}")
    ref_rows = [[m, *[fmt(study.references[m].get(t)) for t in study.reference_tasks]] for m in refs]
    blocks.append(_Block("table", header=["model", *study.reference_tasks], rows=ref_rows))

    blocks.append(_Block("h2", "Divergence vs score"))
    blocks.append(
        _Block(
            "p",
            "Spearman rank correlation, per held-in task over the merge jobs holding it, between a "
            "merged model's JS divergence to the task's expert and its normalized score on the task. "
            "A negative rho means lower divergence goes with a higher score. p: two-sided; "
            "'-': undefined (fewer than 3 points or constant values).",
        )
    )
    corr = [[c["task"], str(c["n"]), _num(c["rho"], 3), _p(c["p"])] for c in _divergence_vs_score(study)]
    blocks.append(_Block("table", header=["task", "n", "rho", "p"], rows=corr))

    blocks.append(_Block("h2", "Per-task normalized scores"))
    blocks.append(_Block("figure", "heatmap", caption="Mean normalized score per method label and task"))
    return blocks


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown(title: str, blocks: list[_Block]) -> str:
    lines = [f"# {title}", ""]
    for b in blocks:
        if b.kind == "h2":
            lines += [f"## {b.text}", ""]
        elif b.kind == "p":
            lines += [b.text, ""]
        elif b.kind == "figure":
            lines += [f"![{b.caption}]({b.text}.svg)", ""]
        elif b.kind == "table":
            right = ["---" if i == 0 or not _numeric_column(b, i) else "---:" for i in range(len(b.header))]
            lines.append("| " + " | ".join(map(_md_cell, b.header)) + " |")
            lines.append("| " + " | ".join(right) + " |")
            lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in b.rows]
            lines.append("")
    return "\n".join(lines)


def _numeric_column(block: _Block, i: int) -> bool:
    """Whether column ``i`` holds numbers only (right-aligned); "-" cells do not count."""
    cells = [row[i] for row in block.rows if row[i] != "-"]
    return bool(cells) and all(_NUMBER.match(c) for c in cells)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1em 0; }
figure svg { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 0.9em; }
""".strip()


def _inline_svg(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    return text[text.index("<svg") :]


def _html(title: str, blocks: list[_Block], out: Path) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>\n{_CSS}\n</style>",
        "</head>",
        "<body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for b in blocks:
        if b.kind == "h2":
            parts.append(f"<h2>{html.escape(b.text)}</h2>")
        elif b.kind == "p":
            parts.append(f"<p>{html.escape(b.text)}</p>")
        elif b.kind == "figure":
            caption = html.escape(b.caption)
            parts.append(f"<figure>\n{_inline_svg(out / f'{b.text}.svg')}<figcaption>{caption}</figcaption>\n</figure>")
        elif b.kind == "table":
            numeric = [i > 0 and _numeric_column(b, i) for i in range(len(b.header))]
            parts.append("<table>")
            parts.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in b.header) + "</tr>")
            for row in b.rows:
                cells = "".join(
                    f'<td class="num">{html.escape(c)}</td>' if numeric[i] else f"<td>{html.escape(c)}</td>"
                    for i, c in enumerate(row)
                )
                parts.append(f"<tr>{cells}</tr>")
            parts.append("</table>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def write_report(results: Path | Sequence[Path], out: Path, metric: str | None = None) -> list[Path]:
    """Write the study report of the store ``results`` (or of several stores, pooled by
    :func:`read_stores`) into ``out`` (created): ``leaderboard.md``, ``leaderboard.html``
    (self-contained, the plots inline as SVG) and the plots ``held_in``, ``held_out`` and ``heatmap`` as
    PNG and SVG.  ``metric``: the score metric to report (default: the primary one).  Returns the
    written files."""
    from mergescale.orchestrator import factor_report  # it builds on this module's tables and figures

    stores = [Path(results)] if isinstance(results, (str, Path)) else [Path(r) for r in results]
    out = Path(out)
    table = read_stores(stores)
    where = ", ".join(map(str, stores))
    if pc.any(pc.equal(table["job_kind"], EDIT)).as_py():
        from mergescale.orchestrator import editing_report  # builds on this module's tables and figures

        return editing_report.write(table, out, metric, where)
    study = _study(table, metric, where)
    out.mkdir(parents=True, exist_ok=True)
    boot = _bootstrap(study)
    board = _leaderboard(study, boot)
    labels = [b["label"] for b in board]
    written: list[Path] = []
    with matplotlib.rc_context(_RC):
        figures = {
            "held_in": _line_figure(
                study,
                boot,
                labels,
                "anp",
                "held_in",
                f"Held-in: ANP ({study.metric})",
                "mean normalized score (1.0 = expert)",
            ),
            "held_out": _line_figure(
                study,
                boot,
                labels,
                "held_out",
                "held_out",
                f"Held-out ({study.metric})",
                "mean normalized score (1.0 = base)",
            ),
            "heatmap": _heatmap_figure(study, labels),
        }
        logs = _fit_logs(stores, study, labels)
        if logs:
            figures["fits"] = _fit_figure(logs)
        for stem, fig in figures.items():
            written += _save(fig, out, stem)
    title = f"Study report: {study.name}"
    blocks = _blocks(study, board)
    if logs:
        blocks += [
            _Block("h2", "Data-driven fits"),
            _Block("figure", "fits", caption="Loss and coefficients at every step of a fit (the largest merge)"),
        ]
    factor_rows = factor_report.members_of(table)
    if len(factor_rows) > 1:
        written += factor_report.write(table, out, study.metric, f"Factor report: {study.name}")
        blocks.insert(0, _Block("p", f"The merges come from {len(factor_rows)} zoo family members, pooled on this "
                                     "page (each normalized against its own member's references; a held-out mean "
                                     "is '-' when some member's base scores 0 on a held-out task). The report by "
                                     "size, base quality and zoo seed, with the paper's findings, is factors.md "
                                     "(factors.html)."))  # fmt: skip
    blocks += _provenance(table, len(study.jobs))
    written = [*write_pages(out, "leaderboard", title, blocks), *written]
    log.info("wrote the report of %s (%d merge jobs, metric %s) to %s", where, len(study.jobs), study.metric, out)
    return written
