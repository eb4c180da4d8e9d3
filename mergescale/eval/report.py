"""Printing evaluation rows as a table: one line per model, the primary metric per task, ANP,
mean normalized held-out score and mean JS divergence to the experts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.table import Table

from mergescale import console as terminal
from mergescale.eval.scores import HELD_IN, HELD_OUT, SUMMARY_TASK


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def results_table(rows: Sequence[dict], first: Sequence[str] = ()) -> Table:
    scores = [r for r in rows if r["kind"] == "score" and r["primary"]]
    tasks = list(dict.fromkeys(r["task"] for r in sorted(scores, key=lambda r: (r["role"] != HELD_IN, r["task"]))))
    models = list(
        dict.fromkeys([*[m for m in first if any(r["model"] == m for r in rows)], *(r["model"] for r in rows)])
    )
    metric = next((r["metric"] for r in scores), "")
    table = Table(title=f"{metric} % per task (held-in, then [dim]held-out[/dim]); normalized means in %")
    table.add_column("model")
    for task in tasks:
        held_out = next(r["role"] for r in scores if r["task"] == task) == HELD_OUT
        table.add_column(f"[dim]{task}[/dim]" if held_out else task, justify="right")
    for label in ("ANP", "held-out norm.", "JS"):
        table.add_column(label, justify="right")
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        by_task = {r["task"]: r["value"] for r in mine if r in scores}
        summary = {r["role"]: r["normalized"] for r in mine if r["kind"] == "summary" and r["primary"]
                   and r["task"] == SUMMARY_TASK[r["role"]]}  # fmt: skip
        js = [r["value"] for r in mine if r["kind"] == "divergence" and r["metric"] == "js"]
        table.add_row(
            Path(model).name if model not in first else f"[bold]{Path(model).name}[/bold]",
            *[_pct(by_task.get(t)) for t in tasks],
            _pct(summary.get(HELD_IN)),
            _pct(summary.get(HELD_OUT)),
            f"{sum(js) / len(js):.4f}" if js else "-",
        )
    return table


def print_results(rows: Sequence[dict], first: Sequence[str] = ()) -> None:
    console = terminal.results_console()
    if not console.is_terminal:
        console.width = max(console.width, 160)
    console.print(results_table(rows, first))
