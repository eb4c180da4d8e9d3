"""Printing a zoo's score table."""

from __future__ import annotations

from rich.table import Table

from mergescale import console as terminal
from mergescale.zoo.build import Zoo


def score_table(zoo: Zoo, metric: str = "exact_match") -> Table:
    held_in = [t.name for t in zoo.held_in]
    held_out = [t.name for t in zoo.held_out]
    n = zoo.meta["scores"]["n_examples"]
    f = zoo.factors
    quality = f" {f['base_quality']}" if zoo.meta["spec"].get("tasks") else ""
    table = Table(
        title=f"zoo {f['size']}{quality} (seed {f['zoo_seed']}, {f['n_parameters'] / 1e6:.2f} M parameters): "
        f"test {metric.replace('_', ' ')} %, {n} examples per task; held-in | held-out"
    )
    table.add_column("model")
    for name in held_in:
        table.add_column(name, justify="right")
    for name in held_out:
        table.add_column(f"[dim]{name}[/dim]", justify="right")
    for model in ["base"] + held_in + (["multitask"] if zoo.multitask else []):
        row = zoo.scores(model)
        cells = []
        for task in held_in + held_out:
            value = f"{100 * row[task][metric]:.0f}"
            cells.append(f"[bold]{value}[/bold]" if task == model else value)
        table.add_row(model, *cells)
    return table


def print_scores(zoo: Zoo, metric: str = "exact_match") -> None:
    console = terminal.results_console()
    if not console.is_terminal:
        console.width = max(console.width, 140)  # 13 columns: do not squeeze them in a log file
    console.print(score_table(zoo, metric))
