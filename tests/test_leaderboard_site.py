"""The leaderboard's static site (mergescale.leaderboard.site), driven in the system Chromium.

No mocks: a board built by hand is written to disk, served with http.server (and opened from file://),
and a headless Chromium sorts, filters and reads it. Never skipped: without /usr/bin/chromium it fails
and says how to install it.
"""

from __future__ import annotations

import copy
import csv
import io
import json
from pathlib import Path

import pytest
from browser import launch, missing_chromium, serve

from mergescale.errors import MergescaleError
from mergescale.leaderboard.site import MARKER, write_site

XSS = '<img src=x onerror="window.__xss=1"></script><script>window.__xss=2</script>'
TASKS = [
    {"name": "zoo_upper", "role": "held_in"},
    {"name": "zoo_copy", "role": "held_out"},
    {"name": "zoo_lower", "role": "held_in"},
    {"name": "zoo_reverse", "role": "held_out"},
]


def _model(mid, name, *, merge, held_in, held_out, scores, state="FINISHED", method=None, new=False,
           n_parameters=None, tags=(), history=None, reason=None, card=None, parents=(), parameters=None):
    evaluated = "2026-12-07T06:20:00Z" if held_in is not None or held_out is not None else None
    if history is None:
        history = [{"evaluation": 1, "run": "run-0002", "evaluated_at": evaluated, "held_in": held_in,
                    "held_out": held_out, "scores": dict(scores)}] if evaluated else []
    return {
        "id": mid, "name": name, "source": f"/models/{mid}", "weights_sha256": mid * 5 + "abcd",
        "base_model": "zoo:base", "tags": list(tags), "merge": merge,
        "provenance": {"card": card, "method": method, "parents": list(parents), "parameters": parameters or {}},
        "n_parameters": n_parameters, "submitted_at": f"2026-12-0{len(history) + 1}T10:00:00Z",
        "evaluated_at": evaluated, "state": state, "reason": reason, "new": new, "scores": dict(scores),
        "held_in": held_in, "held_out": held_out, "history": history,
    }


def make_board() -> dict:
    """Six models: merges and not, one FAILED, one PENDING, one named with markup, one with 3 evaluations."""
    history = [
        {"evaluation": i + 1, "run": f"run-000{i}", "evaluated_at": f"2026-12-0{5 + i}T06:20:00Z",
         "held_in": hi, "held_out": ho,
         "scores": {"zoo_upper": hi, "zoo_lower": hi, "zoo_copy": ho, "zoo_reverse": ho}}
        for i, (hi, ho) in enumerate([(0.70, 0.30), (0.85, None), (0.91, 0.42)])
    ]
    models = [
        _model("a1b2c3d4e5f6", "ties-upper-copy", merge=True, method="ties", new=True, n_parameters=1_234_567,
               held_in=0.91, held_out=0.42, tags=["merge", "mergescale"], card="mergescale",
               parents=["zoo:expert_upper", "zoo:expert_copy"], parameters={"density": 0.2, "weights": [0.5, 0.5]},
               scores={"zoo_upper": 0.93, "zoo_lower": 0.89, "zoo_copy": 0.42, "zoo_reverse": None},
               history=history),
        _model("0123456789ab", "zoo:expert_upper", merge=False, n_parameters=350_000, tags=["expert"],
               held_in=0.88, held_out=0.30,
               scores={"zoo_upper": 0.99, "zoo_lower": 0.77, "zoo_copy": 0.35, "zoo_reverse": 0.25}),
        _model("deadbeef0001", XSS, merge=True, method="dare_ties", new=True, n_parameters=7_000_000_000,
               held_in=0.75, held_out=0.55, tags=["merge", "<b>bold</b>"], card="mergekit",
               parents=["org/a", "org/b"], parameters={"density": 0.5},
               scores={"zoo_upper": 0.8, "zoo_lower": 0.7, "zoo_copy": 0.6, "zoo_reverse": 0.5}),
        _model("cafef00d0002", "task-arith", merge=True, method="task_arithmetic", n_parameters=90_000_000,
               held_in=0.80, held_out=None, tags=["merge"], card="mergescale", parents=["x", "y", "z"],
               scores={"zoo_upper": 0.8, "zoo_lower": 0.8, "zoo_copy": None, "zoo_reverse": None}),
        _model("badc0ffee003", "broken-merge", merge=True, method="slerp", state="FAILED", n_parameters=None,
               reason="weights of layer 3 have shape (4, 8), expected (8, 8)", held_in=None, held_out=None,
               tags=["merge"], card="mergekit", scores={}),
        _model("feedface0004", "queued-expert", merge=False, state="PENDING", n_parameters=2_000_000,
               held_in=None, held_out=None, tags=["expert"], scores={}),
    ]
    return {
        "name": "zoo-nightly", "generated_at": "2026-12-07T06:30:00Z",
        "last_run": {"id": "run-0002", "started_at": "2026-12-07T06:00:00Z",
                     "finished_at": "2026-12-07T06:29:00Z", "evaluated": 2},
        "base_model": "zoo:base (/cache/zoo/base)", "tasks": TASKS, "models": models,
    }


BOARD = make_board()
BY_ID = {m["id"]: m for m in BOARD["models"]}


def _default_order() -> list[str]:
    """held-in descending; models without one last, by name (the board has no ties)."""
    scored = sorted((m for m in BOARD["models"] if m["held_in"] is not None), key=lambda m: -m["held_in"])
    rest = sorted((m for m in BOARD["models"] if m["held_in"] is None), key=lambda m: m["name"])
    return [m["id"] for m in scored + rest]


DEFAULT = _default_order()


def _sorted_by(field: str, descending: bool) -> list[str]:
    """The order a click gives: by ``field`` (empty values last, in the default order)."""
    have = [i for i in DEFAULT if BY_ID[i][field] is not None]
    empty = [i for i in DEFAULT if BY_ID[i][field] is None]
    return sorted(have, key=lambda i: BY_ID[i][field], reverse=descending) + empty


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return write_site(copy.deepcopy(BOARD), tmp_path_factory.mktemp("board") / "site")


@pytest.fixture(scope="module")
def url(site):
    with serve(site) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    problem = missing_chromium()
    if problem:
        pytest.fail(f"the leaderboard site's browser test needs Chromium: {problem}", pytrace=False)
    with launch() as b:
        yield b


class Tab:
    """A page that records console errors and uncaught exceptions."""

    def __init__(self, browser, address: str):
        self.page = browser.new_page(viewport={"width": 1280, "height": 800})
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.goto(address)
        self.page.wait_for_load_state("load")

    def ids(self, visible_only: bool = True) -> list[str]:
        selector = "#leaderboard tbody tr[data-id]" + (":not([hidden])" if visible_only else "")
        return self.page.eval_on_selector_all(selector, "rows => rows.map(r => r.dataset.id)")

    def close(self):
        self.page.close()


@pytest.fixture
def index(browser, url):
    tab = Tab(browser, f"{url}/index.html")
    yield tab
    tab.close()


# ------------------------------------------------------------------------------------------ the index


def test_index_loads_without_errors_over_http_and_from_file(browser, url, site, index):
    for tab in (index, Tab(browser, (site / "index.html").as_uri())):
        assert tab.page.title() == "zoo-nightly · leaderboard"
        assert tab.page.locator("#leaderboard.ready").count() == 1, "site.js did not run (CSP or an error?)"
        assert tab.ids() == DEFAULT
        assert tab.page.locator("#count").text_content() == "6 models"
        assert tab.errors == []
    # the header says each task's role; held-in tasks come first
    keys = index.page.eval_on_selector_all("th[data-key^='task:']", "ths => ths.map(t => t.dataset.key)")
    assert keys == ["task:zoo_upper", "task:zoo_lower", "task:zoo_copy", "task:zoo_reverse"]
    assert "held-out" in index.page.locator('th[data-key="task:zoo_copy"]').text_content()
    assert index.page.locator("th[data-key=held_in]").get_attribute("aria-sort") == "descending"
    # offline: nothing the pages load comes from elsewhere
    html = (site / "index.html").read_text()
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in html and "fetch(" not in (site / "static" / "site.js").read_text()


def test_sorting_by_a_header_and_reversing(index):
    page = index.page
    page.click("th[data-key=held_out]")
    assert index.ids() == _sorted_by("held_out", descending=True)
    assert page.locator("th[data-key=held_out]").get_attribute("aria-sort") == "descending"
    page.click("th[data-key=held_out]")
    assert index.ids() == _sorted_by("held_out", descending=False)
    assert page.locator("th[data-key=held_out]").get_attribute("aria-sort") == "ascending"
    assert page.locator("th[data-key=held_in]").get_attribute("aria-sort") is None
    # size shows "1.2M", "7.0B", ... but sorts by the number of parameters
    page.click("th[data-key=size]")
    assert index.ids() == _sorted_by("n_parameters", descending=True)
    assert page.locator('tr[data-id="deadbeef0001"] td.size').text_content() == "7.0B"
    # text sorts ascending first
    page.click("th[data-key=name]")
    assert index.ids() == sorted(DEFAULT, key=lambda i: BY_ID[i]["name"].lower())
    # a task's column; then back to held-in
    page.click('th[data-key="task:zoo_upper"]')
    expected = sorted((i for i in DEFAULT if BY_ID[i]["scores"].get("zoo_upper") is not None),
                      key=lambda i: -BY_ID[i]["scores"]["zoo_upper"])
    assert index.ids() == expected + [i for i in DEFAULT if BY_ID[i]["scores"].get("zoo_upper") is None]
    page.click("th[data-key=held_in]")
    assert index.ids() == DEFAULT
    assert index.errors == []


def test_filters(index):
    page = index.page
    merges = [i for i in DEFAULT if BY_ID[i]["merge"]]
    page.select_option("#kind", "merges")
    assert index.ids() == merges
    assert page.locator("#count").text_content() == f"Showing {len(merges)} of 6 models"
    page.select_option("#kind", "others")
    assert index.ids() == [i for i in DEFAULT if not BY_ID[i]["merge"]]
    page.select_option("#kind", "all")
    assert index.ids() == DEFAULT

    def matching(word):
        def text(m):
            return [m["name"], m["provenance"]["method"] or "", *m["tags"]]

        return [i for i in DEFAULT if any(word in t.lower() for t in text(BY_ID[i]))]

    page.fill("#filter", "ties")  # by method: ties, dare_ties
    assert index.ids() == matching("ties") == ["a1b2c3d4e5f6", "deadbeef0001"]
    page.fill("#filter", "EXPERT")  # by name or tag, case-insensitive
    assert index.ids() == matching("expert")
    page.select_option("#kind", "merges")  # both at once: no merge is an expert
    assert index.ids() == []
    assert page.locator("#no-match").is_visible()
    page.fill("#filter", "")
    assert index.ids() == merges
    assert not page.locator("#no-match").is_visible()
    assert index.errors == []


def test_markup_in_a_name_is_text(index, site):
    page = index.page
    cell = page.locator('tr[data-id="deadbeef0001"] td.name')
    assert cell.text_content() == XSS
    assert page.evaluate("typeof window.__xss") == "undefined"
    assert page.locator("#leaderboard img, #leaderboard script, #leaderboard b").count() == 0
    assert page.locator("script").count() == 2  # site.js and the JSON block: nothing broke out of it
    # the embedded rows parse back to the same name
    rows = json.loads(page.locator("#board-data").text_content())["models"]
    assert {r["id"]: r["name"] for r in rows}["deadbeef0001"] == XSS
    assert "</script><script>" not in (site / "index.html").read_text().split('id="board-data">', 1)[1][:-30]
    # the second defence: the Content-Security-Policy refuses inline scripts
    inline = "() => { const s = document.createElement('script'); s.textContent = 'window.__csp = 1';" \
             " document.body.appendChild(s); return typeof window.__csp; }"
    assert page.evaluate(inline) == "undefined"
    assert any("Content Security Policy" in e for e in index.errors)


def test_new_rows_and_failed_reason(index):
    page = index.page
    assert sorted(page.eval_on_selector_all("#leaderboard tbody tr.new", "rs => rs.map(r => r.dataset.id)")) == \
        sorted(i for i in DEFAULT if BY_ID[i]["new"]) == ["a1b2c3d4e5f6", "deadbeef0001"]
    for mid in ("a1b2c3d4e5f6", "deadbeef0001"):
        assert page.locator(f'tr[data-id="{mid}"] .badge-new').is_visible()
    assert page.locator('tr[data-id="0123456789ab"] .badge-new').count() == 0
    reason = page.locator('tr[data-id="badc0ffee003"] td.state .reason')
    assert reason.is_visible() and reason.text_content() == BY_ID["badc0ffee003"]["reason"]
    assert reason.get_attribute("title") == BY_ID["badc0ffee003"]["reason"]
    assert page.locator('tr[data-id="a1b2c3d4e5f6"] td.held-in').text_content() == "0.910"
    assert page.locator('tr[data-id="a1b2c3d4e5f6"] td.kind .badge-merge').is_visible()
    assert page.locator('tr[data-id="0123456789ab"] td.kind .badge-merge').count() == 0


def test_an_empty_board(browser, tmp_path):
    board = {"name": "</title><b>empty</b>", "generated_at": "2026-12-07T06:30:00Z", "last_run": None,
             "base_model": None, "tasks": [], "models": []}
    tab = Tab(browser, (write_site(board, tmp_path / "site") / "index.html").as_uri())
    assert tab.page.title() == "</title><b>empty</b> · leaderboard"
    assert tab.page.locator("#no-match").is_visible()
    assert tab.page.locator("#last-run").text_content() == "no run yet"
    assert tab.errors == []
    tab.close()


# ------------------------------------------------------------------------------------------ model pages


def test_model_pages(browser, url, index):
    index.page.click('tr[data-id="a1b2c3d4e5f6"] a.model-link')
    index.page.wait_for_url("**/models/a1b2c3d4e5f6.html")
    tab = Tab(browser, f"{url}/models/a1b2c3d4e5f6.html")
    page = tab.page
    model = BY_ID["a1b2c3d4e5f6"]
    assert page.locator("#model-name").text_content() == model["name"]
    assert page.locator("#provenance .method").text_content() == "ties"
    assert page.locator("#provenance ul.parents li").all_text_contents() == model["provenance"]["parents"]
    assert page.locator("#parameters tbody tr").count() == 2
    assert page.locator("#history-table tbody tr").count() == 3
    assert page.locator("svg#history-chart").count() == 1
    assert model["weights_sha256"] in page.locator("#overview").text_content()
    page.click("#back")
    page.wait_for_url("**/index.html")
    assert tab.errors == [] and index.errors == []
    tab.close()

    xss = Tab(browser, f"{url}/models/deadbeef0001.html")
    assert xss.page.locator("#model-name").text_content() == XSS
    assert xss.page.evaluate("typeof window.__xss") == "undefined"
    assert xss.page.locator("main img").count() == 0
    assert xss.page.locator("#history-table tbody tr").count() == 1
    assert xss.page.locator("svg#history-chart").count() == 0  # one evaluation: no chart
    assert xss.errors == []
    xss.close()

    failed = Tab(browser, f"{url}/models/badc0ffee003.html")
    assert BY_ID["badc0ffee003"]["reason"] in failed.page.locator("#overview").text_content()
    assert failed.page.locator("#history-table").count() == 0
    assert failed.errors == []
    failed.close()


# ------------------------------------------------------------------------------------------ downloads


def test_downloads(site):
    data = json.loads((site / "data.json").read_text())
    assert data["name"] == "zoo-nightly" and data["last_run"] == BOARD["last_run"]
    assert [r["id"] for r in data["models"]] == DEFAULT
    for row in data["models"]:
        model = BY_ID[row["id"]]
        for field in ("name", "merge", "new", "held_in", "held_out", "state", "reason", "n_parameters", "tags",
                      "source", "weights_sha256", "submitted_at", "evaluated_at"):
            assert row[field] == model[field], (row["id"], field)
        assert row["method"] == model["provenance"]["method"]
        assert row["scores"] == {t["name"]: model["scores"].get(t["name"]) for t in TASKS}
        assert row["page"] == f"models/{row['id']}.html" and (site / row["page"]).is_file()
    assert [r["rank"] for r in data["models"]] == [1, 2, 3, 4, None, None]

    rows = list(csv.DictReader(io.StringIO((site / "data.csv").read_text(), newline="")))
    assert [r["name"] for r in rows] == [BY_ID[i]["name"] for i in DEFAULT]
    for r in rows:
        model = BY_ID[r["id"]]
        for t in TASKS:
            score = model["scores"].get(t["name"])
            assert r[t["name"]] == ("" if score is None else repr(score))
            if score is not None:
                assert float(r[t["name"]]) == score
        assert r["held_in"] == ("" if model["held_in"] is None else repr(model["held_in"]))
        assert r["merge"] == ("true" if model["merge"] else "false")

    history = list(csv.DictReader(io.StringIO((site / "history.csv").read_text(), newline="")))
    assert sorted((h["id"], int(h["evaluation"])) for h in history) == \
        sorted((m["id"], e["evaluation"]) for m in BOARD["models"] for e in m["history"])
    three = [h for h in history if h["id"] == "a1b2c3d4e5f6"]
    assert [h["held_out"] for h in three] == ["0.3", "", "0.42"]


# ------------------------------------------------------------------------------------------ publishing


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_and_replaced_atomically(tmp_path):
    first = _tree(write_site(copy.deepcopy(BOARD), tmp_path / "a"))
    assert MARKER in first and "models/a1b2c3d4e5f6.html" in first and "static/site.js" in first
    assert _tree(write_site(copy.deepcopy(BOARD), tmp_path / "b")) == first
    write_site(copy.deepcopy(BOARD), tmp_path / "a")  # over its own site: replaced
    assert _tree(tmp_path / "a") == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temporary directory left

    smaller = copy.deepcopy(BOARD)
    smaller["models"] = smaller["models"][:2]
    write_site(smaller, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a" / "models").iterdir()) == ["0123456789ab.html",
                                                                              "a1b2c3d4e5f6.html"]


def test_refuses_a_directory_it_did_not_write(tmp_path):
    mine = tmp_path / "docs"
    mine.mkdir()
    (mine / "keep.txt").write_text("precious")
    with pytest.raises(MergescaleError, match=str(mine)):
        write_site(copy.deepcopy(BOARD), mine)
    assert _tree(mine) == {"keep.txt": b"precious"}
    (tmp_path / "file").write_text("x")
    with pytest.raises(MergescaleError, match="not a directory"):
        write_site(copy.deepcopy(BOARD), tmp_path / "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs", "file"]
    bad = copy.deepcopy(BOARD)
    bad["models"][0]["id"] = "../../etc"
    with pytest.raises(MergescaleError, match="12 lowercase hex"):
        write_site(bad, tmp_path / "site")
    assert not (tmp_path / "site").exists()
