"""The leaderboard's static site: ``write_site(board, out)`` (``mergescale leaderboard publish``).

The site works offline and from ``file://``: no external URL, no ``fetch()``. Every page is rendered here
with all of the board's text passed through ``html.escape``; the index's script (``static/site.js``) only
sorts and filters the rows already there, reading their values from the JSON block embedded in the page
(``<`` escaped as ``\\u003c``), and never writes HTML from data. A Content-Security-Policy meta tag allows
scripts, styles and images from the site itself only (``'self'``): no inline script, no other source.

Files written into ``out/``::

    index.html            the leaderboard table, sortable and filterable
    models/<id>.html      one page per model: facts, provenance, latest scores, score history (+ SVG chart)
    data.json             {"name", "generated_at", "base_model", "last_run", "tasks", "models": [row, ...]}
    data.csv              the same rows, one column per task (named by the task), booleans as true/false
    history.csv           one row per (model, evaluation), one column per task
    static/site.css, static/site.js, static/favicon.svg
    .mergescale-site      the marker that lets the next publish replace this directory

Rows (``data.json``'s ``models``, the embedded ``#board-data`` block) are in the default order: held-in
mean descending (then held-out descending, name, id), models without a held-in mean last. ``rank`` is
the competition rank by held-in mean (1, 2, 2, 4); None without one.

Selectors of the index, for tests and scripts:

* ``table#leaderboard``; its rows ``tbody tr[data-id="<model id>"]`` (quote the id: it may start with a
  digit), class ``new`` on rows evaluated in the last run (with a visible ``.badge-new`` in the rank cell),
  class ``merge`` on merges, ``state-<state>`` (lower case); rows filtered out carry the ``hidden``
  attribute (``tbody tr:not([hidden])`` = the visible rows).
* cells: ``td.rank``, ``td.name`` (whose text is exactly the model's name, inside ``a.model-link``),
  ``td.kind`` (``.badge-merge``), ``td.method``, ``td.score[data-task=<task>]``, ``td.held-in``,
  ``td.held-out``, ``td.size``, ``td.submitted``, ``td.evaluated``, ``td.state`` (``.reason`` when FAILED).
* sortable headers ``th[data-key=KEY]`` (click to sort; click again to reverse; ``aria-sort`` says the
  current order), KEY one of ``rank name merge method held_in held_out size submitted evaluated state``
  or ``task:<task name>`` (quote it in a selector: ``th[data-key="task:zoo_upper"]``). A first click sorts
  numbers and dates descending and text ascending; empty values are always last.
* ``#filter`` (text: every word must occur in the name, method, tags or id), ``#kind`` (a select:
  ``all``, ``merges``, ``others``), ``#count`` (how many rows are shown), ``#no-match`` (the row shown when
  none matches), ``#download-json``, ``#download-csv``, ``#download-history``.

A model page (``models/<id>.html``): ``#model-name``, ``#back`` (to the index), ``#overview``,
``#provenance`` (``.card``, ``.method``, ``ul.parents li``, ``table#parameters``), ``table#scores-table``,
``#history`` (``table#history-table``, one ``tbody tr`` per evaluation; ``svg#history-chart`` when there
is more than one evaluation).

Publishing is atomic: the site is built in a hidden sibling directory, then the old ``out`` is renamed
aside, the new one renamed in, and the old one deleted. ``out`` must not exist or be a directory that
``write_site`` wrote (it holds ``.mergescale-site``); anything else is refused, never deleted.
Concurrent publishes into one ``out`` are not supported (the caller serialises them).
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from mergescale.errors import MergescaleError

MARKER = ".mergescale-site"
MARKER_TEXT = (
    "This directory is a leaderboard site written by mergescale (mergescale.leaderboard.site.write_site).\n"
    "Every publish replaces the whole directory: do not keep other files here.\n"
)
STATIC_FILES = ("site.css", "site.js", "favicon.svg")
DECIMALS = 3
ROLES = {"held_in": "held-in", "held_out": "held-out"}
STATES = ("PENDING", "RUNNING", "FINISHED", "FAILED")
_ID = re.compile(r"^[0-9a-f]{12}$")
_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2})")

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'"
)
#: the fixed columns of data.csv; a task's column is its name, so no task may be called like one of these
CSV_FIELDS = (
    "rank", "id", "name", "merge", "new", "method", "card", "tags", "held_in", "held_out", "n_parameters",
    "submitted_at", "evaluated_at", "state", "reason", "source", "base_model", "weights_sha256", "evaluations",
)
HISTORY_FIELDS = ("id", "name", "evaluation", "run", "evaluated_at", "held_in", "held_out")


# ------------------------------------------------------------------------------------------ the rows


@dataclass(frozen=True)
class Column:
    """A column of the index's table: ``key`` (``th[data-key]``), the row's ``field`` it sorts by, its type."""

    key: str
    label: str
    field: str
    type: str  # "num" or "text": how it sorts and aligns
    cls: str
    note: str = ""  # a second line under the label
    title: str = ""


def _number(value: Any) -> float | None:
    """A finite float, or None (a NaN or an infinity would not survive JSON)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _tasks(board: dict) -> list[dict]:
    """The board's tasks, held-in ones first then held-out ones (each in the board's order); checked."""
    tasks = [{"name": str(t["name"]), "role": str(t["role"])} for t in board.get("tasks") or []]
    seen: set[str] = set()
    for t in tasks:
        if t["role"] not in ROLES:
            raise MergescaleError(
                f"leaderboard task {t['name']!r} has role {t['role']!r}: expected held_in or held_out"
            )
        if t["name"] in seen:
            raise MergescaleError(f"leaderboard task {t['name']!r} is listed twice")
        if t["name"] in CSV_FIELDS or t["name"] in HISTORY_FIELDS:
            raise MergescaleError(f"leaderboard task {t['name']!r} has the name of a fixed column of data.csv")
        seen.add(t["name"])
    return [t for t in tasks if t["role"] == "held_in"] + [t for t in tasks if t["role"] == "held_out"]


def human_size(n: int | None) -> str:
    """``1234567`` -> ``1.2M``; ``7_000_000_000`` -> ``7.0B``; None -> ``""``."""
    if n is None:
        return ""
    for unit, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            value = n / scale
            return f"{value:.1f}{unit}" if value < 100 else f"{value:.0f}{unit}"
    return str(n)


def _row(model: dict, tasks: list[dict]) -> dict:
    """One model's row: the fields of the table, plus its per-task scores and facts for the downloads."""
    model_id = str(model["id"])
    if not _ID.match(model_id):
        raise MergescaleError(f"leaderboard model id {model_id!r} is not 12 lowercase hex characters")
    provenance = model.get("provenance") or {}
    scores = model.get("scores") or {}
    n_parameters = model.get("n_parameters")
    state = str(model.get("state") or "PENDING")
    return {
        "id": model_id,
        "name": str(model.get("name") or ""),
        "page": f"models/{model_id}.html",
        "rank": None,
        "new": bool(model.get("new")),
        "merge": bool(model.get("merge")),
        "method": provenance.get("method"),
        "card": provenance.get("card"),
        "tags": [str(t) for t in model.get("tags") or []],
        "source": model.get("source"),
        "base_model": model.get("base_model"),
        "weights_sha256": model.get("weights_sha256"),
        "n_parameters": int(n_parameters) if n_parameters is not None else None,
        "size": human_size(int(n_parameters)) if n_parameters is not None else "",
        "scores": {t["name"]: _number(scores.get(t["name"])) for t in tasks},
        "held_in": _number(model.get("held_in")),
        "held_out": _number(model.get("held_out")),
        "submitted_at": model.get("submitted_at"),
        "evaluated_at": model.get("evaluated_at"),
        "state": state,
        "reason": model.get("reason"),
        "evaluations": len(model.get("history") or []),
    }


def _rows(board: dict, tasks: list[dict]) -> list[dict]:
    """The rows in the default order, ranked by held-in mean (competition ranking)."""
    rows = [_row(m, tasks) for m in board.get("models") or []]
    ids = [r["id"] for r in rows]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise MergescaleError(f"leaderboard model id {duplicates[0]!r} is listed twice")

    def order(r: dict) -> tuple:
        held_in, held_out = r["held_in"], r["held_out"]
        return (
            held_in is None, -(held_in or 0.0), held_out is None, -(held_out or 0.0), r["name"], r["id"]
        )

    rows.sort(key=order)
    previous, rank = None, 0
    for position, r in enumerate(rows, 1):
        if r["held_in"] is None:
            break
        if r["held_in"] != previous:
            rank, previous = position, r["held_in"]
        r["rank"] = rank
    return rows


def _columns(tasks: list[dict]) -> list[Column]:
    columns = [
        Column("rank", "#", "rank", "num", "rank", title="rank by held-in mean"),
        Column("name", "Model", "name", "text", "name"),
        Column("merge", "Type", "merge", "num", "kind", title="merge (read from its model card) or not"),
        Column("method", "Method", "method", "text", "method"),
    ]
    for t in tasks:
        role = ROLES[t["role"]]
        columns.append(Column(f"task:{t['name']}", t["name"], "", "num", f"score {role}-task", role,
                              f"{role} task {t['name']}"))
    columns += [
        Column("held_in", "Held-in", "held_in", "num", "mean held-in", "mean", "mean over the held-in tasks"),
        Column("held_out", "Held-out", "held_out", "num", "mean held-out", "mean", "mean over the held-out tasks"),
        Column("size", "Size", "n_parameters", "num", "size", "params", "number of parameters"),
        Column("submitted", "Submitted", "submitted_at", "num", "date submitted", "UTC", "submitted at (UTC)"),
        Column("evaluated", "Evaluated", "evaluated_at", "num", "date evaluated", "UTC", "last evaluated at (UTC)"),
        Column("state", "State", "state", "text", "state"),
    ]
    return columns


# ------------------------------------------------------------------------------------------ HTML parts


def _e(value: Any) -> str:
    """Escaped text (quotes too: safe in attributes); None -> empty."""
    return html.escape("" if value is None else str(value), quote=True)


def _score(value: float | None) -> str:
    return f"{value:.{DECIMALS}f}" if value is not None else '<span class="na" title="not scored">–</span>'


def _time(value: Any, *, date_only: bool = False) -> str:
    """``2026-12-07T06:30:00Z`` -> ``<time datetime=...>2026-12-07 06:30</time>`` (or the date only, the
    whole timestamp in its tooltip); None -> a dash."""
    if not value:
        return '<span class="na">–</span>'
    text = str(value)
    match = _TIME.match(text)
    shown = (match[1] if date_only else f"{match[1]} {match[2]}") if match else text
    return f'<time datetime="{_e(text)}" title="{_e(text)}">{_e(shown)}</time>'


def _state(state: str, reason: Any = None) -> str:
    cls = state.lower() if state in STATES else "unknown"
    out = f'<span class="badge badge-state state-{cls}">{_e(state)}</span>'
    if reason:
        out += f'<span class="reason" title="{_e(reason)}">{_e(reason)}</span>'
    return out


def _page(title: str, body: str, *, root: str, body_class: str, script: bool) -> str:
    """A whole page; ``root`` is the relative path to the site's root (``""`` or ``"../"``)."""
    js = f'\n<script src="{root}static/site.js" defer></script>' if script else ""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="referrer" content="no-referrer">
<meta name="generator" content="mergescale">
<title>{_e(title)}</title>
<link rel="icon" href="{root}static/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="{root}static/site.css">{js}
</head>
<body class="{body_class}">
{body}
</body>
</html>
"""


def _json(value: Any) -> str:
    """Deterministic JSON (sorted keys, UTF-8 text)."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, allow_nan=False, indent=1) + "\n"


def _embedded_json(value: Any) -> str:
    """JSON for a ``<script type="application/json">`` block: ``<``, ``>`` and ``&`` as ``\\u00XX``, so no
    text (``</script>``, ``<!--``) can end the block."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _last_run(run: dict | None) -> str:
    if not run:
        return "no run yet"
    parts = [f"<strong>{_e(run.get('id'))}</strong>"]
    if run.get("started_at"):
        parts.append(f"started {_time(run['started_at'])}")
    if run.get("finished_at"):
        parts.append(f"finished {_time(run['finished_at'])}")
    else:
        parts.append("running")
    if run.get("evaluated") is not None:
        n = int(run["evaluated"])
        parts.append(f"{n} model{'s' if n != 1 else ''} evaluated")
    return " · ".join(parts)


# ------------------------------------------------------------------------------------------ the index


def _index(board: dict, tasks: list[dict], rows: list[dict], data: dict) -> str:
    name = str(board.get("name") or "leaderboard")
    columns = _columns(tasks)
    head = []
    for c in columns:
        attrs = f' data-key="{_e(c.key)}" data-type="{c.type}"'
        if c.field:
            attrs += f' data-field="{_e(c.field)}"'
        if c.key == "held_in":
            attrs += ' aria-sort="descending"'
        if c.title:
            attrs += f' title="{_e(c.title)}"'
        note = f'<span class="note">{_e(c.note)}</span>' if c.note else ""
        head.append(f'<th scope="col" class="{c.cls}"{attrs}><button type="button">'
                    f'<span class="label">{_e(c.label)}</span>{note}</button></th>')
    last_run_id = (board.get("last_run") or {}).get("id")
    new_title = f"evaluated in the last run ({last_run_id})" if last_run_id else "evaluated in the last run"
    body_rows = []
    for r in rows:
        classes = ["new"] if r["new"] else []
        classes += ["merge"] if r["merge"] else []
        classes.append(f"state-{r['state'].lower() if r['state'] in STATES else 'unknown'}")
        rank = str(r["rank"]) if r["rank"] is not None else '<span class="na">–</span>'
        badge = f' <span class="badge badge-new" title="{_e(new_title)}">new</span>' if r["new"] else ""
        cells = [
            f'<td class="rank">{rank}{badge}</td>',
            f'<td class="name"><a class="model-link" href="{_e(r["page"])}">{_e(r["name"])}</a></td>',
            '<td class="kind">' + ('<span class="badge badge-merge">merge</span>' if r["merge"] else "") + "</td>",
            f'<td class="method">{_e(r["method"])}</td>',
        ]
        for t in tasks:
            cls = f"num score {ROLES[t['role']]}-task"
            cells.append(f'<td class="{cls}" data-task="{_e(t["name"])}">{_score(r["scores"][t["name"]])}</td>')
        size_title = f' title="{r["n_parameters"]:,} parameters"' if r["n_parameters"] is not None else ""
        cells += [
            f'<td class="num mean held-in">{_score(r["held_in"])}</td>',
            f'<td class="num mean held-out">{_score(r["held_out"])}</td>',
            f'<td class="num size"{size_title}>{_e(r["size"]) or "<span class=na>–</span>"}</td>',
            f'<td class="date submitted">{_time(r["submitted_at"], date_only=True)}</td>',
            f'<td class="date evaluated">{_time(r["evaluated_at"], date_only=True)}</td>',
            f'<td class="state">{_state(r["state"], r["reason"] if r["state"] == "FAILED" else None)}</td>',
        ]
        body_rows.append(f'<tr data-id="{_e(r["id"])}" class="{" ".join(classes)}">' + "".join(cells) + "</tr>")
    body_rows.append(f'<tr id="no-match" class="no-match" hidden><td colspan="{len(columns)}">'
                     + ("No model matches the filter." if rows else "No model has been submitted yet.") + "</td></tr>")
    if not rows:
        body_rows[-1] = body_rows[-1].replace(" hidden>", ">", 1)

    n_merges = sum(r["merge"] for r in rows)
    n_new = sum(r["new"] for r in rows)
    held_in = [t["name"] for t in tasks if t["role"] == "held_in"]
    held_out = [t["name"] for t in tasks if t["role"] == "held_out"]
    body = f"""<header class="page-header">
<div class="wrap">
<p class="brand">mergescale leaderboard</p>
<h1>{_e(name)}</h1>
<dl class="meta">
<div><dt>Base model</dt><dd>{_e(board.get("base_model")) or "–"}</dd></div>
<div><dt>Last run</dt><dd id="last-run">{_last_run(board.get("last_run"))}</dd></div>
<div><dt>Generated</dt><dd>{_time(board.get("generated_at"))}</dd></div>
<div><dt>Models</dt><dd>{len(rows)} ({n_merges} merge{"s" if n_merges != 1 else ""}, {n_new} new)</dd></div>
<div><dt>Tasks</dt><dd>{len(held_in)} held-in · {len(held_out)} held-out</dd></div>
</dl>
</div>
</header>
<main class="wrap">
<div class="toolbar">
<input id="filter" type="search" placeholder="Filter by name, method or tag" aria-label="Filter by name, method or tag"
 autocomplete="off" spellcheck="false">
<select id="kind" aria-label="Which models">
<option value="all" selected>All models</option>
<option value="merges">Merges only</option>
<option value="others">Non-merges only</option>
</select>
<span id="count" class="count" aria-live="polite">{len(rows)} model{"s" if len(rows) != 1 else ""}</span>
<span class="downloads">Download
<a id="download-json" href="data.json" download>JSON</a>
<a id="download-csv" href="data.csv" download>CSV</a>
<a id="download-history" href="history.csv" download>history CSV</a></span>
</div>
<div class="table-wrap">
<table id="leaderboard">
<thead><tr>{"".join(head)}</tr></thead>
<tbody>
{chr(10).join(body_rows)}
</tbody>
</table>
</div>
<p class="legend">Scores are normalized per task, shown with {DECIMALS} decimals, from each model's latest evaluation.
Held-in and held-out are the means over the tasks of each role. Click a column header to sort; click again to
reverse. <span class="badge badge-new">new</span> marks the models evaluated in the last run.</p>
</main>
<footer class="wrap">Generated by mergescale from the leaderboard {_e(name)} at {_time(board.get("generated_at"))}.
</footer>
<script type="application/json" id="board-data">{_embedded_json(data)}</script>"""
    return _page(f"{name} · leaderboard", body, root="", body_class="index", script=True)


# ------------------------------------------------------------------------------------------ model pages


def _value(value: Any) -> str:
    """A merge parameter's value as text: strings as they are, anything else as JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def _chart(history: list[dict]) -> str:
    """An inline SVG line chart of held-in / held-out means over the evaluations (oldest first)."""
    series = [("held_in", "held-in"), ("held_out", "held-out")]
    values = [v for h in history for key, _ in series if (v := _number(h.get(key))) is not None]
    if not values:
        return ""
    width, height, left, right, top, bottom = 640, 220, 48, 16, 28, 36
    lo, hi = math.floor(min(values) * 10) / 10, math.ceil(max(values) * 10) / 10
    if hi - lo < 0.1:
        lo, hi = lo - 0.05, hi + 0.05
    n = len(history)

    def x(i: int) -> float:
        return left + (width - left - right) * (i / (n - 1) if n > 1 else 0.5)

    def y(v: float) -> float:
        return top + (height - top - bottom) * (1 - (v - lo) / (hi - lo))

    parts = [f'<svg id="history-chart" class="chart" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" role="img" aria-label="held-in and held-out means over evaluations" '
             'xmlns="http://www.w3.org/2000/svg">']
    step = next((s for s in (0.02, 0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 5.0) if (hi - lo) / s <= 6),
                10 ** math.ceil(math.log10(hi - lo)))
    first = math.ceil(lo / step - 1e-9)
    ticks = [k * step for k in range(first, math.floor(hi / step + 1e-9) + 1)]
    for v in ticks:
        parts.append(f'<line class="gridline" x1="{left}" x2="{width - right}" y1="{y(v):.1f}" y2="{y(v):.1f}"/>')
        parts.append(f'<text class="tick" x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>')
    for i, h in enumerate(history):
        label = _e(h.get("evaluation", i + 1))
        parts.append(f'<text class="tick" x="{x(i):.1f}" y="{height - bottom + 18}" text-anchor="middle">'
                     f"#{label}</text>")
    for key, name in series:
        points = [(i, _number(h.get(key))) for i, h in enumerate(history)]
        line = [f"{x(i):.1f},{y(v):.1f}" for i, v in points if v is not None]  # over a missing score
        if len(line) > 1:
            parts.append(f'<polyline class="line {name}" points="{" ".join(line)}"/>')
        for i, v in points:
            if v is not None:
                parts.append(f'<circle class="dot {name}" cx="{x(i):.1f}" cy="{y(v):.1f}" r="3.5">'
                             f"<title>{name} {v:.{DECIMALS}f} (evaluation {_e(history[i].get('evaluation'))})"
                             "</title></circle>")
    lx = width - right - 170
    for j, (_, name) in enumerate(series):
        parts.append(f'<line class="line {name}" x1="{lx + j * 88}" x2="{lx + j * 88 + 18}" y1="12" y2="12"/>')
        parts.append(f'<text class="legend-text" x="{lx + j * 88 + 24}" y="16">{name}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _model_page(board: dict, model: dict, row: dict, tasks: list[dict]) -> str:
    provenance = model.get("provenance") or {}
    history = list(model.get("history") or [])
    board_name = str(board.get("name") or "leaderboard")
    badges = []
    if row["merge"]:
        badges.append('<span class="badge badge-merge">merge</span>')
    if row["new"]:
        badges.append('<span class="badge badge-new">new</span>')
    badges.append(_state(row["state"]))
    if row["rank"] is not None:
        badges.append(f'<span class="rank-label">rank {row["rank"]} of {len(board.get("models") or [])}</span>')

    def fact(label: str, value: str) -> str:
        return f"<div><dt>{label}</dt><dd>{value}</dd></div>"

    tags = " ".join(f'<span class="tag">{_e(t)}</span>' for t in row["tags"]) or "–"
    size = f'{row["n_parameters"]:,} ({_e(row["size"])})' if row["n_parameters"] is not None else "–"
    facts = [
        fact("Id", f"<code>{_e(row['id'])}</code>"),
        fact("Source", f'<code class="source">{_e(row["source"])}</code>' if row["source"] else "–"),
        fact("Weights sha256", f'<code class="sha">{_e(row["weights_sha256"])}</code>'
             if row["weights_sha256"] else "–"),
        fact("Base model", _e(row["base_model"]) or "–"),
        fact("Tags", tags),
        fact("Parameters", size),
        fact("State", _state(row["state"])),
    ]
    if row["reason"]:
        facts.append(fact("Reason", f'<span class="reason">{_e(row["reason"])}</span>'))
    facts += [fact("Submitted", _time(row["submitted_at"])), fact("Evaluated", _time(row["evaluated_at"]))]

    card = provenance.get("card")
    card_text = {"mergescale": "mergescale model card", "mergekit": "mergekit model card"}.get(card, card)
    parents = provenance.get("parents") or []
    parents_html = ('<ul class="parents">' + "".join(f"<li><code>{_e(p)}</code></li>" for p in parents) + "</ul>"
                    if parents else "–")
    parameters = provenance.get("parameters") or {}
    if parameters:
        params_html = ('<table id="parameters" class="small"><thead><tr><th scope="col">Parameter</th>'
                       '<th scope="col">Value</th></tr></thead><tbody>'
                       + "".join(f"<tr><td><code>{_e(k)}</code></td><td><code>{_e(_value(parameters[k]))}</code>"
                                 "</td></tr>" for k in sorted(parameters, key=str))
                       + "</tbody></table>")
    else:
        params_html = '<p class="muted">No merge parameters recorded.</p>'
    prov = [
        fact("Merge", "yes" if row["merge"] else "no"),
        fact("Card", f'<span class="card">{_e(card_text)}</span>' if card else '<span class="card">none</span>'),
        fact("Method", f'<span class="method">{_e(provenance.get("method"))}</span>'
             if provenance.get("method") else '<span class="method">–</span>'),
        fact("Parents", parents_html),
    ]

    score_rows = "".join(
        f'<tr data-task="{_e(t["name"])}"><td>{_e(t["name"])}</td><td>{ROLES[t["role"]]}</td>'
        f'<td class="num">{_score(row["scores"][t["name"]])}</td></tr>'
        for t in tasks
    )
    scores_html = (f'<table id="scores-table" class="small"><thead><tr><th scope="col">Task</th>'
                   '<th scope="col">Role</th><th scope="col" class="num">Score</th></tr></thead>'
                   f"<tbody>{score_rows}</tbody><tfoot>"
                   f'<tr><th scope="row" colspan="2">Held-in mean</th><td class="num">{_score(row["held_in"])}'
                   '</td></tr><tr><th scope="row" colspan="2">Held-out mean</th>'
                   f'<td class="num">{_score(row["held_out"])}</td></tr></tfoot></table>')

    task_names = [t["name"] for t in tasks]
    extra = sorted({str(k) for h in history for k in (h.get("scores") or {})} - set(task_names))
    history_tasks = task_names + extra
    if history:
        head = "".join(f'<th scope="col" class="num">{_e(t)}</th>' for t in history_tasks)
        body = []
        for h in history:
            scores = h.get("scores") or {}
            cells = "".join(f'<td class="num">{_score(_number(scores.get(t)))}</td>' for t in history_tasks)
            body.append(f'<tr><td class="num">{_e(h.get("evaluation"))}</td><td>{_e(h.get("run"))}</td>'
                        f'<td class="date">{_time(h.get("evaluated_at"))}</td>'
                        f'<td class="num">{_score(_number(h.get("held_in")))}</td>'
                        f'<td class="num">{_score(_number(h.get("held_out")))}</td>{cells}</tr>')
        history_html = ((_chart(history) if len(history) > 1 else "")
                        + '<div class="table-scroll"><table id="history-table" class="small"><thead><tr>'
                        '<th scope="col" class="num">#</th><th scope="col">Run</th><th scope="col">Evaluated</th>'
                        '<th scope="col" class="num">Held-in</th><th scope="col" class="num">Held-out</th>'
                        f'{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>')
    else:
        history_html = '<p class="muted">Not evaluated yet.</p>'

    body = f"""<header class="page-header">
<div class="wrap">
<p class="brand"><a id="back" href="../index.html">← {_e(board_name)} leaderboard</a></p>
<h1 id="model-name">{_e(row["name"])}</h1>
<p class="badges">{" ".join(badges)}</p>
</div>
</header>
<main class="wrap model">
<div class="grid">
<section id="overview" class="panel"><h2>Model</h2><dl class="facts">{"".join(facts)}</dl></section>
<section id="provenance" class="panel"><h2>Provenance</h2><dl class="facts">{"".join(prov)}</dl>
{params_html}</section>
</div>
<section id="scores" class="panel"><h2>Latest scores</h2>{scores_html}</section>
<section id="history" class="panel"><h2>Score history</h2>{history_html}</section>
</main>
<footer class="wrap">Generated by mergescale from the leaderboard {_e(board_name)}
at {_time(board.get("generated_at"))}.</footer>"""
    return _page(f"{row['name']} · {board_name}", body, root="../", body_class="model-page", script=False)


# ------------------------------------------------------------------------------------------ CSV


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ";".join(str(v) for v in value)
    return str(value)


def _csv(header: list[str], rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([[_csv_value(v) for v in row] for row in rows])
    return buffer.getvalue()


def _data_csv(rows: list[dict], tasks: list[dict]) -> str:
    names = [t["name"] for t in tasks]
    fields = list(CSV_FIELDS)
    at = fields.index("held_in")
    header = fields[:at] + names + fields[at:]
    return _csv(header, [[r[f] for f in fields[:at]] + [r["scores"][t] for t in names] + [r[f] for f in fields[at:]]
                         for r in rows])


def _history_csv(board: dict, rows: list[dict], tasks: list[dict]) -> str:
    models = {str(m["id"]): m for m in board.get("models") or []}
    names = [t["name"] for t in tasks]
    extra = sorted({str(k) for m in models.values() for h in m.get("history") or [] for k in h.get("scores") or {}}
                   - set(names))
    lines = []
    for r in rows:
        for h in models[r["id"]].get("history") or []:
            scores = h.get("scores") or {}
            lines.append([r["id"], r["name"], h.get("evaluation"), h.get("run"), h.get("evaluated_at"),
                          _number(h.get("held_in")), _number(h.get("held_out"))]
                         + [_number(scores.get(t)) for t in names + extra])
    return _csv(list(HISTORY_FIELDS) + names + extra, lines)


# ------------------------------------------------------------------------------------------ writing


def render(board: dict) -> dict[str, bytes]:
    """Every file of the site, by its path relative to the site's root (``/`` separated)."""
    tasks = _tasks(board)
    rows = _rows(board, tasks)
    data = {
        "name": board.get("name"),
        "generated_at": board.get("generated_at"),
        "base_model": board.get("base_model"),
        "last_run": board.get("last_run"),
        "tasks": tasks,
        "models": rows,
    }
    files: dict[str, str | bytes] = {
        MARKER: MARKER_TEXT,
        "index.html": _index(board, tasks, rows, data),
        "data.json": _json(data),
        "data.csv": _data_csv(rows, tasks),
        "history.csv": _history_csv(board, rows, tasks),
    }
    models = {str(m["id"]): m for m in board.get("models") or []}
    for r in rows:
        files[r["page"]] = _model_page(board, models[r["id"]], r, tasks)
    static = resources.files("mergescale.leaderboard") / "static"
    for name in STATIC_FILES:
        files[f"static/{name}"] = (static / name).read_bytes()
    return {path: data if isinstance(data, bytes) else data.encode("utf-8") for path, data in files.items()}


def _check_target(out: Path) -> None:
    if out.parent == out:
        raise MergescaleError(f"cannot publish a leaderboard site at {out}: choose a directory below it")
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise MergescaleError(f"{out} exists and is not a directory: choose another output path for the site")
    if not (out / MARKER).is_file():
        raise MergescaleError(f"{out} exists and was not written by `leaderboard publish` (it has no {MARKER} file): "
                              "choose another output directory, or empty it yourself")


def write_site(board: dict, out: Path | str) -> Path:
    """Write the static site of ``board`` into the directory ``out`` and return it.

    Built in a hidden sibling directory, then swapped in (the old site renamed aside, the new one renamed
    in, the old one deleted). ``out`` must be absent or a site that ``write_site`` wrote; a symbolic link
    to one is followed (the directory it points to is replaced). Raises MergescaleError otherwise.
    """
    out = Path(out).absolute()
    if out.is_symlink():
        out = out.resolve()
    _check_target(out)
    files = render(board)
    out.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
    try:
        for relative, content in sorted(files.items()):
            path = new.joinpath(*relative.split("/"))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        for path in sorted(new.rglob("*")):  # mkdtemp makes 0700: a web server must be able to read the site
            path.chmod(0o755 if path.is_dir() else 0o644)
        new.chmod(0o755)
        _check_target(out)  # again: it may have appeared while the site was rendered
        old = None
        if os.path.lexists(out):
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:12]}")
            os.rename(out, old)
        try:
            os.rename(new, out)
        except BaseException:
            if old is not None:
                os.rename(old, out)
            raise
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out
