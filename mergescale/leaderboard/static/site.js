/* mergescale leaderboard: sorts and filters the table that mergescale/leaderboard/site.py rendered.
 *
 * The rows' values come from the JSON block <script type="application/json" id="board-data">; this
 * script only moves, hides and shows the rows already in the page, and writes text with textContent.
 * It never builds HTML from data.
 */
(function () {
  "use strict";

  function init() {
    const dataEl = document.getElementById("board-data");
    const table = document.getElementById("leaderboard");
    if (!dataEl || !table) return;
    const board = JSON.parse(dataEl.textContent);
    const models = new Map();
    board.models.forEach(function (model, index) { models.set(model.id, { model: model, index: index }); });

    const tbody = table.tBodies[0];
    const rows = Array.from(tbody.querySelectorAll("tr[data-id]")).filter(function (tr) {
      return models.has(tr.dataset.id);
    });
    const noMatch = document.getElementById("no-match");
    const headers = Array.from(table.querySelectorAll("th[data-key]"));
    const filter = document.getElementById("filter");
    const kind = document.getElementById("kind");
    const count = document.getElementById("count");
    const sort = { key: "held_in", ascending: false };

    function value(model, th) {
      const key = th.dataset.key;
      let v = key.indexOf("task:") === 0 ? (model.scores || {})[key.slice(5)] : model[th.dataset.field];
      if (v === null || v === undefined || v === "") return null;
      if (th.dataset.type === "num") {
        if (typeof v === "boolean") return v ? 1 : 0;
        if (typeof v === "number") return v;
        return String(v); // dates: ISO-8601 strings sort as text
      }
      return String(v).toLowerCase();
    }

    function compare(a, b) {
      if (a < b) return -1;
      if (a > b) return 1;
      return 0;
    }

    function applySort() {
      const th = headers.find(function (h) { return h.dataset.key === sort.key; });
      if (!th) return;
      const keyed = rows.map(function (tr) {
        const entry = models.get(tr.dataset.id);
        return { tr: tr, v: value(entry.model, th), index: entry.index };
      });
      keyed.sort(function (a, b) {
        if (a.v === null || b.v === null) {
          if (a.v === null && b.v === null) return a.index - b.index;
          return a.v === null ? 1 : -1; // empty values last, whichever the direction
        }
        const c = compare(a.v, b.v);
        if (c !== 0) return sort.ascending ? c : -c;
        return a.index - b.index;
      });
      keyed.forEach(function (k) { tbody.appendChild(k.tr); });
      if (noMatch) tbody.appendChild(noMatch);
      headers.forEach(function (h) {
        if (h === th) h.setAttribute("aria-sort", sort.ascending ? "ascending" : "descending");
        else h.removeAttribute("aria-sort");
      });
    }

    function applyFilter() {
      const words = (filter ? filter.value : "").toLowerCase().split(/\s+/).filter(Boolean);
      const which = kind ? kind.value : "all";
      let shown = 0;
      rows.forEach(function (tr) {
        const model = models.get(tr.dataset.id).model;
        const text = [model.name, model.method || "", (model.tags || []).join(" "), model.id].join("\n").toLowerCase();
        let visible = words.every(function (w) { return text.indexOf(w) !== -1; });
        if (which === "merges") visible = visible && model.merge;
        else if (which === "others") visible = visible && !model.merge;
        tr.hidden = !visible;
        if (visible) shown += 1;
      });
      if (noMatch) noMatch.hidden = shown !== 0; // with no model at all it says so
      if (count) {
        const total = rows.length;
        const noun = total === 1 ? "model" : "models";
        count.textContent = shown === total ? total + " " + noun : "Showing " + shown + " of " + total + " " + noun;
      }
    }

    headers.forEach(function (th) {
      th.addEventListener("click", function () {
        if (sort.key === th.dataset.key) sort.ascending = !sort.ascending;
        else {
          sort.key = th.dataset.key;
          sort.ascending = th.dataset.type !== "num"; // numbers and dates: highest first
        }
        applySort();
      });
    });
    if (filter) filter.addEventListener("input", applyFilter);
    if (kind) kind.addEventListener("change", applyFilter);
    document.addEventListener("keydown", function (event) {
      if (event.key === "/" && filter && document.activeElement !== filter &&
          !(document.activeElement && /^(INPUT|SELECT|TEXTAREA)$/.test(document.activeElement.tagName))) {
        event.preventDefault();
        filter.focus();
      }
    });

    applySort();
    applyFilter();
    table.classList.add("ready");
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
