"""The report of a fine-tuning transfer study (``kind: transfer``), from its results store alone.

The lecture's table (OLMo-2 checkpoints, Table 3 of the fine-tuning-transfer paper): one row per target
version t — t alone, t + Δ_s for every source version s, and on the diagonal t + Δ_t = FT(t), the model
fine-tuned from t directly (the ceiling) — on each held-in task, with the held-out mean beside.  Beside
each cell the geometry of (s, t): the relative distance of the bases ‖θ_s − θ_t‖ / ‖θ_t‖ and the cosine of
the fine-tuning differences cos(Δ_s, Δ_t) (``orchestrator/geometry.py``).  The reading "transfer works
when the target is capable and close to the source" is checked by two Spearman correlations over the
off-diagonal cells: the gain over t alone against the distance, and against t alone's score.

``write`` writes ``transfer.md``, ``transfer.html`` and ``transfer.{png,svg}`` (heat maps of the score and
of the distance).  Same store, same bytes.  Metric: the task's primary metric unless ``--metric``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pyarrow as pa
from scipy import stats

from mergescale.errors import MergescaleError
from mergescale.eval.scores import HELD_IN, HELD_OUT
from mergescale.orchestrator.editing_report import _fmt, _mean, finish, stored_spec
from mergescale.orchestrator.report import _Block, _new_figure
from mergescale.orchestrator.results import EDIT

log = logging.getLogger(__name__)

PAPER = ("Lecture / fine-tuning-transfer paper, Table 3 (OLMo-2 7B checkpoints M1…M5, GSM8K accuracy %): "
         "M_i alone 13.2 / 19.4 / 24.4 / 64.5 / 65.5; FT(M_i) 45.1 / 50.7 / 60.4 / 75.7 / 75.5; "
         "M5 + Δ4 = 77.1, M4 + Δ5 = 72.9, M1 + Δ2 = 19.0 — transfer works once the target is capable, best "
         "when source and target are close")  # fmt: skip


def _data(table: pa.Table, metric: str | None, where: str):
    rows = [r for r in table.to_pylist() if r["kind"] == "score"]
    if metric is None:
        metric = next((r["metric"] for r in rows if r["primary"]), None)
    rows = [r for r in rows if r["metric"] == metric and r["value"] is not None]
    if not any(r["job_kind"] == EDIT for r in rows):
        raise MergescaleError(f"{where}: no transferred models scored on metric {metric}; run the study first")
    cells: dict[tuple[str, str], dict] = {}  # (target, source or "") -> {task: value, "geo": {...}}
    versions: list[str] = []
    for r in rows:
        if r["job_kind"] != EDIT:
            continue
        versions += [r["edit_target"]] if r["edit_target"] not in versions else []
        key = (r["edit_target"], "" if r["edit_direction"] == "base" else r["edit_source"])
        cell = cells.setdefault(key, {"geo": {k: r[f"edit_{k}"] for k in ("distance", "base_cosine", "delta_cosine")}})
        cell[r["task"]] = r["value"]
    held_in = sorted({r["task"] for r in rows if r["role"] == HELD_IN})
    held_out = sorted({r["task"] for r in rows if r["role"] == HELD_OUT})
    listed = (stored_spec(where).get("transfer") or {}).get("versions") or []  # the study's order
    order = [v for v in listed if v in versions] or versions
    return metric, order, cells, held_in, held_out


def _matrix(order, cells, value) -> tuple[list[str], list[list[str]]]:
    header = ["target", "alone", *[f"+ Δ{s}" for s in order]]
    rows = []
    for t in order:
        row = [t, value(cells.get((t, "")), None)]
        row += [value(cells.get((t, s)), (s, t)) for s in order]
        rows.append(row)
    return header, rows


def headline(table: pa.Table, metric: str | None, where: str) -> tuple[str, list[str], list[list[str]]]:
    metric, order, cells, held_in, _ = _data(table, metric, where)
    task = held_in[0]
    header, rows = _matrix(order, cells, lambda c, _: _fmt(c and c.get(task)))
    return f"fine-tuning transfer: {task} {metric} (diagonal: the target's own fine-tune)", header, rows


def _reading(order, cells, task, held_out) -> list[list[str]]:
    gains, dist, alone, general = [], [], [], []
    for t in order:
        base = (cells.get((t, "")) or {}).get(task)
        for s in order:
            c = cells.get((t, s))
            if s == t or c is None or base is None or c.get(task) is None or c["geo"]["distance"] is None:
                continue
            gains.append(c[task] - base)
            dist.append(c["geo"]["distance"])
            alone.append(base)
            general.append(_mean((cells.get((t, "")) or {}).get(h) for h in held_out))
    out = []
    rows = [("distance of the bases", dist), ("the target alone's score", alone)]
    if held_out and None not in general:
        rows.append(("the target alone's held-out mean", general))
    for name, xs in rows:
        if len(gains) >= 3 and len(set(xs)) > 1 and len(set(gains)) > 1:
            rho, p = stats.spearmanr(xs, gains)
            out.append([name, str(len(gains)), f"{rho:.3f}", f"{p:.3g}"])
        else:
            out.append([name, str(len(gains)), "-", "-"])
    return out


def write(table: pa.Table, out: Path, metric: str | None, where: str) -> list[Path]:
    metric, order, cells, held_in, held_out = _data(table, metric, where)
    out.mkdir(parents=True, exist_ok=True)
    blocks = [_Block("p", f"Fine-tuning transfer: every target version t alone, and t + λ (θ_ft,s − θ_s) for every "
                          f"source version s (the diagonal s = t is t's own fine-tune, the ceiling). Metric: {metric} "
                          "(raw, test split). Geometry of (source s, target t): distance = ‖θ_s − θ_t‖ / ‖θ_t‖ of the "
                          "bases; Δ-cosine = cos(Δ_s, Δ_t) of the fine-tuning differences. Rows: targets; "
                          "columns: sources.")]  # fmt: skip
    for task in held_in:
        header, rows = _matrix(order, cells, lambda c, _, task=task: _fmt(c and c.get(task)))
        blocks += [_Block("h2", f"{task}: the transfer matrix"), _Block("table", header=header, rows=rows)]
    if held_out:
        header, rows = _matrix(order, cells, lambda c, _: _fmt(c and _mean(c.get(t) for t in held_out)))
        blocks += [_Block("h2", f"Held-out mean ({', '.join(held_out)})"), _Block("table", header=header, rows=rows)]
    geometry = (("Distance of the bases ‖θ_s − θ_t‖ / ‖θ_t‖", "distance"), ("Δ-cosine cos(Δ_s, Δ_t)", "delta_cosine"),
                ("Cosine of the bases cos(θ_s, θ_t)", "base_cosine"))
    for title, key in geometry:
        header, rows = _matrix(order, cells, lambda c, st, key=key: "" if st is None else
                               ("-" if c is None or c["geo"][key] is None else f"{c['geo'][key]:.4f}"))  # fmt: skip
        rows = [r[:1] + r[2:] for r in rows]  # no "alone" column: a geometry is of a pair
        blocks += [_Block("h2", title), _Block("table", header=header[:1] + header[2:], rows=rows)]
    task = held_in[0]
    blocks += [
        _Block("h2", "Reading"),
        _Block("p", f"Spearman correlation, over the off-diagonal cells, of the gain on {task} over the target alone "
                    "with: the distance of the bases (a negative ρ: closer sources transfer better) and the target "
                    "alone's score on the task and its held-out mean (its general skill; a positive ρ: capable targets "
                    "gain more)."),
        _Block("table", header=["gain against", "cells", "Spearman ρ", "p"],
               rows=_reading(order, cells, task, held_out)),
        _Block("p", f"Published: {PAPER}."),
        _Block("figure", "transfer", caption=f"{task} {metric} of every (target, source) cell, and the distance of "
                                             "the bases"),
    ]
    figure = lambda: _figure(order, cells, task, metric)  # noqa: E731
    return finish(table, out, "transfer", blocks, figure, "transferred models", metric)


def _figure(order, cells, task, metric):
    k = len(order)
    fig = _new_figure((4.2 + 1.1 * k, 0.6 + 0.5 * k))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [k + 1, k]})
    score = [[(cells.get((t, s)) or {}).get(task) for s in ["", *order]] for t in order]
    dist = [[(cells.get((t, s)) or {"geo": {}})["geo"].get("distance") for s in order] for t in order]
    panels = ((left, score, ["alone", *[f"+Δ{s}" for s in order]], f"{task} {metric}", "viridis"),
              (right, dist, order, "distance of the bases", "magma_r"))
    for ax, data, cols, title, cmap in panels:
        values = [[math.nan if v is None else v for v in row] for row in data]
        ax.imshow(values, cmap=cmap, aspect="auto")
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if cmap == "viridis"
                            and v < 0.6 else "k")  # fmt: skip
        ax.set_xticks(range(len(cols)), cols, fontsize=8, rotation=45, ha="right")
        ax.set_yticks(range(k), order, fontsize=8)
        ax.set_title(title, fontsize=9)
    left.set_ylabel("target")
    right.set_xlabel("source")
    return fig
