"""The report of a task-vector editing experiment (``kind: negation``), from its results store alone.

Forgetting by negation (Ilharco et al. 2023, Table 1's form): for each target expert t, the edited
models θ0 − λ τ_t and θ0 − λ r (r: a random direction of τ_t's norm, averaged over seeds) are scored on
the target's task and on the control tasks — the study's held-out tasks, the base's own skills — and on
the other held-in tasks.  λ is selected on the **validation** split by the paper's rule (the lowest target
score among the λ whose control score keeps at least ``control_keep`` of the base's; ties: the smaller
λ); the selected model is reported on the **test** split, which selection never sees.  Scores are raw
values of one metric (default ``char_acc`` when the tasks report it: the zoo's base solves few held-in
test examples exactly, so forgetting shows per character).

``write`` writes ``negation.md``, ``negation.html`` (self-contained) and ``negation.{png,svg}`` (score
against λ, one panel per target).  Same store, same bytes.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import pyarrow as pa

from mergescale.errors import MergescaleError
from mergescale.eval.scores import HELD_IN, HELD_OUT
from mergescale.orchestrator.report import _RC, _Block, _new_figure, _num, _provenance, _save, write_pages
from mergescale.orchestrator.results import BASE, EDIT

log = logging.getLogger(__name__)

TEST, VALIDATION = None, "validation"
DIRECTIONS = {"task": "negative task vector", "random": "random direction"}
PAPER = ("Ilharco et al. 2023, Table 1 (CLIP ViT-L/14, mean over 8 tasks, target / control accuracy %): "
         "pre-trained 64.8 / 75.5, random vector 60.9 / 72.9, negative task vector 19.0 / 72.9")  # fmt: skip


@dataclass
class _Point:
    """One (target, direction, λ) on one split, averaged over seeds: target, control and other held-in scores."""

    target: float | None
    control: float | None
    others: float | None
    seeds: int


@dataclass
class _Target:
    name: str
    task: str
    # (split, direction) -> λ -> point
    curves: dict[tuple[str | None, str], dict[float, _Point]] = field(default_factory=dict)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _metric(rows: list[dict], metric: str | None, where: str) -> str:
    known = list(dict.fromkeys(r["metric"] for r in rows if r["kind"] == "score"))
    if metric is None:
        primary = next(r["metric"] for r in rows if r["kind"] == "score" and r["primary"])
        return "char_acc" if "char_acc" in known else primary
    if metric not in known:
        raise MergescaleError(f"{where}: no scores of metric {metric!r}; the store has: {', '.join(known)}")
    return metric


def _collect(table: pa.Table, metric: str | None, where: str) -> tuple:
    """(metric, base scores by split and task, the targets with their curves, the control tasks)."""
    rows = [r for r in table.to_pylist() if r["kind"] == "score"]
    metric = _metric(rows, metric, where)
    rows = [r for r in rows if r["metric"] == metric and r["value"] is not None]
    control_tasks = sorted({r["task"] for r in rows if r["role"] == HELD_OUT})
    held_in = sorted({r["task"] for r in rows if r["role"] == HELD_IN})
    base: dict[str | None, dict[str, float]] = {}
    for r in rows:
        if r["job_kind"] == BASE:
            base.setdefault(r["split"], {})[r["task"]] = r["value"]
    models: dict[tuple, dict[str, float]] = {}  # (target, task, direction, λ, seed, split) -> task -> value
    for r in rows:
        if r["job_kind"] == EDIT:
            k = (r["edit_target"], r["edit_task"], r["edit_direction"], r["edit_lambda"], r["seed"], r["split"])
            models.setdefault(k, {})[r["task"]] = r["value"]
    targets: dict[str, _Target] = {}
    grouped: dict[tuple, list[dict[str, float]]] = {}
    for (target, task, direction, lam, _seed, split), values in sorted(models.items(), key=str):
        targets.setdefault(target, _Target(target, task))
        grouped.setdefault((target, split, direction, lam), []).append(values)
    for (target, split, direction, lam), runs in grouped.items():
        t = targets[target]
        point = _Point(
            target=_mean(v.get(t.task) for v in runs),
            control=_mean(_mean(v.get(c) for c in control_tasks) for v in runs),
            others=_mean(_mean(v.get(h) for h in held_in if h != t.task) for v in runs),
            seeds=len(runs),
        )
        t.curves.setdefault((split, direction), {})[lam] = point
    for t in targets.values():
        t.curves = {k: dict(sorted(curve.items())) for k, curve in t.curves.items()}  # λ in numeric order
    return metric, base, sorted(targets.values(), key=lambda t: t.name), control_tasks


def select(curve: dict[float, _Point], base_control: float | None, keep: float) -> float | None:
    """The paper's rule on one split's curve: among the λ whose control score is ≥ ``keep`` × the base's,
    the one with the lowest target score (ties: the smaller λ); None when no λ keeps the control."""
    ok = [(p.target, lam) for lam, p in curve.items()
          if p.target is not None and p.control is not None and base_control is not None
          and p.control >= keep * base_control]  # fmt: skip
    return min(ok)[1] if ok else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else _num(value, 3)


def _ratio(value: float | None, ref: float | None) -> str:
    return "-" if value is None or not ref else f"{100 * value / ref:.1f}"


@dataclass
class _Analysis:
    metric: str
    keep: float
    targets: list[_Target]
    control_tasks: list[str]
    base: dict  # split -> task -> raw score
    control_base: float | None  # the base's mean control score on the test split
    chosen: dict  # (target, direction) -> the selected λ (None: no λ kept the control)
    header: list[str]
    summary: list[list[str]]  # the Table 1 form: one row per target (and their mean)
    curves: list[list[str]]  # every (target, direction, λ) on the test split


def _analyse(table: pa.Table, metric: str | None, where: str) -> _Analysis:
    keep = float((stored_spec(where).get("negation") or {}).get("control_keep", 0.95))
    metric, base, targets, control_tasks = _collect(table, metric, where)
    if not targets:
        raise MergescaleError(f"{where}: no edited models scored on metric {metric}; run the study first")
    base_test, base_val = base.get(TEST, {}), base.get(VALIDATION, {})
    control_test = _mean(base_test.get(c) for c in control_tasks)
    control_val = _mean(base_val.get(c) for c in control_tasks)
    summary, curves_rows, chosen, numbers = [], [], {}, []
    for t in targets:
        cells, values = [t.name, _fmt(base_test.get(t.task)), _fmt(control_test)], [base_test.get(t.task)]
        for direction in DIRECTIONS:
            lam = select(t.curves.get((VALIDATION, direction), {}), control_val, keep)
            chosen[(t.name, direction)] = lam
            p = t.curves.get((TEST, direction), {}).get(lam) if lam is not None else None
            cells += ["-" if lam is None else f"{lam:g}", _fmt(p and p.target), _fmt(p and p.control),
                      _ratio(p and p.control, control_test)]  # fmt: skip
            values += [p and p.target, p and p.control]
        summary.append(cells)
        numbers.append(values)
        for direction, label in DIRECTIONS.items():
            for lam, p in t.curves.get((TEST, direction), {}).items():
                mark = " (selected)" if chosen[(t.name, direction)] == lam else ""
                curves_rows.append([t.name, label, f"{lam:g}{mark}", _fmt(p.target), _fmt(p.control),
                                    _ratio(p.control, control_test), _fmt(p.others), str(p.seeds)])  # fmt: skip
    if len(targets) > 1:  # the mean over targets of what was selected (a target without a selection: left out)
        m = [_mean(v[i] for v in numbers) for i in range(5)]
        summary.append(["mean", _fmt(m[0]), _fmt(control_test), "", _fmt(m[1]), _fmt(m[2]), _ratio(m[2], control_test),
                        "", _fmt(m[3]), _fmt(m[4]), _ratio(m[4], control_test)])  # fmt: skip
    header = ["target", "base: target", "base: control"]
    for label in DIRECTIONS.values():
        header += [f"{label}: λ*", "target", "control", "control % of base"]
    return _Analysis(metric, keep, targets, control_tasks, base, control_test, chosen, header, summary, curves_rows)


def finish(table: pa.Table, out: Path, stem: str, blocks: list[_Block], figure, what: str, metric: str) -> list[Path]:
    """The end of an editing report: ``figure`` saved as ``stem.{png,svg}``, the provenance (its units counted as
    ``what``) appended to ``blocks``, and ``stem.md`` / ``stem.html`` written.  Returns the written files."""
    with matplotlib.rc_context(_RC):
        written = _save(figure(), out, stem)
    n_edits = len(set(table.filter(pa.compute.equal(table["job_kind"], EDIT))["job_key"].to_pylist()))
    blocks = blocks + _provenance(table, n_edits, what)
    study = table["study"].drop_null()[0].as_py()
    pages = write_pages(out, stem, f"{stem.capitalize()} report: {study}", blocks)
    log.info("wrote the %s report (%d %s, metric %s) to %s", stem, n_edits, what, metric, out)
    return [*pages, *written]


def _experiment(table: pa.Table, where: str) -> str:
    experiments = set(table["experiment"].drop_null().to_pylist())
    if len(experiments) != 1:
        raise MergescaleError(f"{where}: one editing experiment per report; the store has {sorted(experiments)}")
    return experiments.pop()


def print_summary(table: pa.Table, where: str, metric: str | None = None) -> None:
    """Print the experiment's headline table (negation: the selected edits; transfer: the matrix)."""
    from rich.table import Table

    from mergescale.orchestrator.report import print_table

    experiment = _experiment(table, where)
    if experiment in ("transfer", "analogy"):
        from mergescale.orchestrator import analogy_report, transfer_report

        report = transfer_report if experiment == "transfer" else analogy_report
        title, header, rows = report.headline(table, metric, where)
    else:
        a = _analyse(table, metric, where)
        title, header, rows = (f"forgetting by negation ({a.metric}, test split; λ* selected on validation)",
                               a.header, a.summary)  # fmt: skip
    print_table(Table(title=title), header, rows)


def write(table: pa.Table, out: Path, metric: str | None, where: str) -> list[Path]:
    """Write the report of the editing experiment in ``table`` into ``out``; returns the written files."""
    experiment = _experiment(table, where)
    if experiment in ("transfer", "analogy"):
        from mergescale.orchestrator import analogy_report, transfer_report

        report = transfer_report if experiment == "transfer" else analogy_report
        return report.write(table, out, metric, where)
    a = _analyse(table, metric, where)
    metric, keep, targets, control_tasks, chosen = a.metric, a.keep, a.targets, a.control_tasks, a.chosen
    base_test, base_val, control_test = a.base.get(TEST, {}), a.base.get(VALIDATION, {}), a.control_base
    out.mkdir(parents=True, exist_ok=True)
    split_note = ("λ* is selected on the validation split (the lowest target score among the λ whose control "
                  f"score is ≥ {100 * keep:g} % of the base's; ties: the smaller λ); every number shown is on the "
                  "test split, which the selection never saw.")  # fmt: skip
    blocks = [
        _Block("p", f"Forgetting by negation: θ0 − λ τ_t for each target expert t, beside θ0 − λ r for a random "
                    f"direction r with ‖r‖ = ‖τ_t‖ tensor by tensor. Metric: {metric} (raw). Control: the mean over "
                    f"the held-out tasks ({', '.join(control_tasks)}), the base's own skills. {split_note}"),
        _Block("h2", "Selected edits (the paper's Table 1 form)"),
        _Block("table", header=a.header, rows=a.summary),
        _Block("p", f"Published: {PAPER}. A random direction is the paper's control for 'any large step forgets'."),
        _Block("figure", "negation", caption=f"{metric} against λ (test split): the target's task and the control "
                                             "tasks, negative task vector (solid) and random direction (dashed)"),
        _Block("h2", "Every λ (test split)"),
        _Block("table", header=["target", "direction", "λ", "target", "control", "control % of base",
                                "other held-in", "seeds"], rows=a.curves),  # fmt: skip
        _Block("h2", "Base scores"),
        _Block("table", header=["task", "role", "test", "validation"],
               rows=[[task, "control" if task in control_tasks else "held-in", _fmt(base_test.get(task)),
                      _fmt(base_val.get(task))] for task in sorted(base_test)]),  # fmt: skip
    ]
    figure = lambda: _figure(targets, base_test, control_test, chosen, metric, keep)  # noqa: E731
    return finish(table, out, "negation", blocks, figure, "edited models", metric)


def stored_spec(where: str) -> dict:
    """The study YAML the (first) store was last run with, as a mapping ({} when it is not there)."""
    import yaml

    spec = Path(where.split(", ")[0]) / "study.yaml"
    return (yaml.safe_load(spec.read_text()) or {}) if spec.is_file() else {}


def _figure(targets: list[_Target], base: dict, control_base: float | None, chosen: dict, metric: str, keep: float):
    cols = min(4, len(targets))
    rows = (len(targets) + cols - 1) // cols
    fig = _new_figure((3.2 * cols, 2.6 * rows + 0.4))
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    colors = {"target": matplotlib.colormaps["tab10"](3), "control": matplotlib.colormaps["tab10"](0)}
    for ax, t in zip(axes.flat, targets, strict=False):
        for direction, style in (("task", "-"), ("random", "--")):
            curve = t.curves.get((TEST, direction), {})
            lams = [0.0, *[lam for lam in curve if lam != 0]]
            for what in ("target", "control"):
                start = base.get(t.task) if what == "target" else control_base
                ys = [start, *[getattr(curve[lam], what) for lam in lams[1:]]]
                ax.plot(lams, [float("nan") if y is None else y for y in ys], style, marker="o", markersize=3,
                        color=colors[what], label=f"{what} ({DIRECTIONS[direction]})")  # fmt: skip
            lam = chosen.get((t.name, direction))
            if lam is not None and direction == "task":
                ax.axvline(lam, color="0.6", linewidth=0.8, linestyle=":")
        if control_base:
            ax.axhline(keep * control_base, color="0.75", linewidth=0.8)
        ax.set_title(f"{t.name} ({t.task})", fontsize=9)
        ax.set_xlabel("λ")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(targets):]:
        ax.set_visible(False)
    axes[0][0].set_ylabel(metric)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=4, fontsize=8, frameon=False)
    fig.suptitle(f"Forgetting by negation: {metric} against λ (grey line: {100 * keep:g} % of the base's control; "
                 "dotted: selected λ)", fontsize=9)  # fmt: skip
    return fig
