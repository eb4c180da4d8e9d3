"""The report of a learning-by-analogy study (``kind: analogy``), from its results store alone.

For each analogy A : B :: C : D, D's task scored for the base, for θ0 + λ τ_C (C alone), for the analogy
θ0 + λ (τ_C + τ_B − τ_A), and for D's expert when the study has one (the ceiling, never used by the edit).
The headline is λ = 1 — the analogy as written, nothing tuned on D (D is a held-out task: choosing λ on its
labels would make it a tuned one) — or the grid's λ closest to 1; every λ is listed below it.  Metric:
``char_acc`` when the tasks report it (the zoo's base solves few D inputs exactly), else the primary one.

``write`` writes ``analogy.md``, ``analogy.html`` and ``analogy.{png,svg}``.  Same store, same bytes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib
import pyarrow as pa

from mergescale.errors import MergescaleError
from mergescale.eval.scores import HELD_OUT
from mergescale.orchestrator.editing_report import _fmt, _mean, _metric, finish
from mergescale.orchestrator.report import _Block, _new_figure
from mergescale.orchestrator.results import BASE, EDIT, EXPERT

log = logging.getLogger(__name__)

PAPER = ("Ilharco et al. 2023, §5 (T5-large, sentiment, target Yelp): fine-tuned on the auxiliary domain 95.0, "
         "task analogy 95.1, fine-tuned on the target 95.5: the analogy recovers most of the target expert")


def _data(table: pa.Table, metric: str | None, where: str):
    rows = [r for r in table.to_pylist() if r["kind"] == "score"]
    metric = _metric(rows, metric, where)
    rows = [r for r in rows if r["metric"] == metric and r["value"] is not None]
    refs: dict[str, dict[str, float]] = {}  # "base" / expert name -> task -> value
    for r in rows:
        if r["job_kind"] == BASE:
            refs.setdefault("base", {})[r["task"]] = r["value"]
        elif r["job_kind"] == EXPERT:
            refs.setdefault(r["experts"][0], {})[r["task"]] = r["value"]
    cells: dict[tuple[str, str, float], dict[str, float]] = {}  # (analogy, direction, λ) -> task -> value
    quads: dict[str, tuple[str | None, str]] = {}  # analogy -> (D's expert, D's task)
    for r in rows:
        if r["job_kind"] == EDIT:
            quads.setdefault(r["edit_source"], (r["edit_target"], r["edit_task"]))
            cells.setdefault((r["edit_source"], r["edit_direction"], r["edit_lambda"]), {})[r["task"]] = r["value"]
    if not quads:
        raise MergescaleError(f"{where}: no analogy models scored on metric {metric}; run the study first")
    held_out = sorted({r["task"] for r in rows if r["role"] == HELD_OUT})
    lambdas = sorted({lam for _, _, lam in cells})
    return metric, refs, cells, quads, held_out, lambdas


def headline(table: pa.Table, metric: str | None, where: str) -> tuple[str, list[str], list[list[str]]]:
    return _headline(*_data(table, metric, where))


def _headline(metric, refs, cells, quads, held_out, lambdas) -> tuple[str, list[str], list[list[str]]]:
    lam = min(lambdas, key=lambda x: (abs(x - 1), x))
    header = ["analogy A:B::C:D", "D task", "base", f"C alone λ={lam:g}", f"analogy λ={lam:g}", "D expert (ceiling)"]
    rows, numbers = [], []
    for quad, (d, task) in quads.items():
        values = [refs.get("base", {}).get(task), (cells.get((quad, "c_alone", lam)) or {}).get(task),
                  (cells.get((quad, "analogy", lam)) or {}).get(task), refs.get(d, {}).get(task) if d else None]
        rows.append([quad, task, *map(_fmt, values)])
        numbers.append(values)
    if len(rows) > 1:
        rows.append(["mean", "", *(_fmt(_mean(v[i] for v in numbers)) for i in range(4))])
    return f"learning by analogy: D's {metric} (test split)", header, rows


def write(table: pa.Table, out: Path, metric: str | None, where: str) -> list[Path]:
    data = _data(table, metric, where)
    metric, refs, cells, quads, held_out, lambdas = data
    title_line, header, rows = _headline(*data)
    out.mkdir(parents=True, exist_ok=True)
    every = []
    for quad, (_, task) in quads.items():
        for lam in lambdas:
            c, a = cells.get((quad, "c_alone", lam)) or {}, cells.get((quad, "analogy", lam)) or {}
            controls = [_fmt(_mean(m.get(t) for t in held_out)) for m in (c, a)]
            every.append([quad, f"{lam:g}", _fmt(c.get(task)), _fmt(a.get(task)), *controls])
    blocks = [
        _Block("p", f"Learning by analogy: τ_D ≈ τ_C + (τ_B − τ_A). For each analogy A:B::C:D, D's task is scored for "
                    "the base, θ0 + λ τ_C (C alone), the analogy θ0 + λ (τ_C + τ_B − τ_A), and D's own expert (the "
                    f"ceiling; no edit uses it). Metric: {metric} (raw, test split). The headline λ is 1 (the analogy "
                    "as written): λ is not chosen on D, a held-out task."),
        _Block("h2", title_line),
        _Block("table", header=header, rows=rows),
        _Block("p", f"Published: {PAPER}."),
        _Block("figure", "analogy", caption=f"D's {metric}: base, C alone, the analogy and D's expert (headline λ)"),
        _Block("h2", "Every λ (test split)"),
        _Block("table", header=["analogy", "λ", "C alone: D", "analogy: D", "C alone: held-out mean",
                                "analogy: held-out mean"], rows=every),  # fmt: skip
    ]
    return finish(table, out, "analogy", blocks, lambda: _figure(header, rows, metric), "edited models", metric)


def _figure(header: list[str], rows: list[list[str]], metric: str):
    shown = [r for r in rows if r[0] != "mean"]
    fig = _new_figure((1.2 + 1.6 * len(shown), 3.2))
    ax = fig.subplots()
    series = header[2:]
    width = 0.8 / len(series)
    for k, name in enumerate(series):
        values = [float("nan") if r[2 + k] == "-" else float(r[2 + k]) for r in shown]
        ax.bar([i + (k - (len(series) - 1) / 2) * width for i in range(len(shown))], values, width,
               label=name, color=matplotlib.colormaps["tab10"](k))  # fmt: skip
    ax.set_xticks(range(len(shown)), [r[0].replace("::", "::\n") for r in shown], fontsize=7)
    ax.set_ylabel(f"D's {metric}")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncols=2, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return fig
