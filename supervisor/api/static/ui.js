"use strict";
// haul's dashboard: a page's live updates. One EventSource per page (<prefix>/live, which sends
// what changed once each half second at most); frames are merged until the browser next paints, then
// applied at once. Received text goes in through textContent only: nothing becomes markup.
(() => {
  const main = document.querySelector("main[data-live]");
  if (!main || !("EventSource" in window)) return;
  const RETRYABLE = new Set(["failed", "dead", "canceled"]);
  const FINAL = new Set(["done", "failed", "dead", "canceled"]);
  const UNITS = ["B", "KiB", "MiB", "GiB"];
  const views = new Map();
  for (const el of document.querySelectorAll("[data-task]")) views.set(el.dataset.task, el);
  const pending = new Map();
  let counts = null;
  let tables = null;
  let painting = false;

  let pause = 5000;
  listen();

  // An EventSource reconnects by itself after a dropped connection, but not after an answer
  // other than 200 (a restarting API's 503, a signed-out session's 204). This asks the stream's
  // address whether the session lives (without renewing it): if not, it says updates stopped;
  // otherwise it opens the stream again, less often each time.
  function listen() {
    const source = new EventSource(main.dataset.live);
    source.addEventListener("open", () => (pause = 5000));
    source.addEventListener("tasks", (e) => {
      for (const [id, patch] of Object.entries(JSON.parse(e.data))) {
        const before = pending.get(id);
        pending.set(id, before ? combine(before, patch) : patch);
      }
      soon();
    });
    source.addEventListener("counts", (e) => {
      counts = JSON.parse(e.data);
      soon();
    });
    source.addEventListener("tables", (e) => {
      tables = JSON.parse(e.data);
      soon();
    });
    source.addEventListener("ended", () => {
      source.close();
      stopped();
    });
    source.addEventListener("error", () => {
      if (source.readyState !== EventSource.CLOSED || !pause) return;
      fetch(`${main.dataset.live}&probe=1`, { cache: "no-store" }).then(
        (answer) => (answer.status === 401 ? stopped() : later()),
        later,
      );
    });
  }

  function later() {
    setTimeout(listen, pause);
    pause = Math.min(pause * 2, 60000);
  }

  function stopped() {
    pause = 0;
    for (const el of document.querySelectorAll("[data-live-ended]")) el.hidden = false;
  }

  // Two patches of a task as one, the later `b` winning: its "*" (every file) replaces what
  // `a` said of the files, its "~" (those not whole) all but what `a` said was done.
  function combine(a, b) {
    const out = Object.assign({}, a, b);
    if (a.files && b.files && !("*" in b.files)) {
      const kept = "~" in b.files ? Object.entries(a.files).filter(([, f]) => f.state === "done") : Object.entries(a.files);
      out.files = Object.assign(Object.fromEntries(kept), b.files);
    }
    if (a.history && b.history) out.history = a.history.concat(b.history);
    if (a.stored && b.stored) out.stored = Object.assign({}, a.stored, b.stored);
    return out;
  }

  function soon() {
    if (!painting) {
      painting = true;
      requestAnimationFrame(paintAll);
    }
  }

  function paintAll() {
    painting = false;
    for (const [id, patch] of pending) {
      const view = views.get(id);
      if (view) paint(view, patch);
    }
    pending.clear();
    if (counts) {
      for (const el of document.querySelectorAll("[data-count]")) text(el, counts[el.dataset.count] ?? 0);
      counts = null;
    }
    if (tables) {
      for (const [name, rows] of Object.entries(tables)) {
        const body = document.querySelector(`table[data-table="${name}"] tbody`);
        if (body) body.replaceChildren(...rows.map(tableRow));
      }
      tables = null;
    }
  }

  // A row of a table the stream sends whole (the overview's, a task's webhooks): its first cell
  // heads it, as the server renders them.
  function tableRow(cells) {
    const row = document.createElement("tr");
    cells.forEach((value, at) => cell(row, value, at === 0));
    return row;
  }

  // A cell holding `value` as text, its direction isolated, as the server renders cells.
  function cell(row, value, heading = false) {
    const el = document.createElement(heading ? "th" : "td");
    if (heading) el.scope = "row";
    const bdi = document.createElement("bdi");
    bdi.textContent = value;
    el.append(bdi);
    row.append(el);
  }

  function paint(view, p) {
    if (p.state !== undefined) {
      put(view, "state", p.state);
      for (const form of view.querySelectorAll("[data-offer]")) {
        const offered = form.dataset.offer === "retry" ? RETRYABLE.has(p.state) : !FINAL.has(p.state);
        if (form.hidden === offered) form.hidden = !offered;
      }
    }
    if (p.attempts !== undefined) put(view, "attempts", p.attempts);
    if ("error" in p) {
      put(view, "error", p.error);
      for (const el of view.querySelectorAll("[data-when-error]")) el.hidden = !p.error;
    }
    if (p.bytes_total) view.dataset.total = p.bytes_total;
    if (p.bytes_done !== undefined) {
      for (const bar of own(view, "bar")) progress(bar, p.bytes_done, Number(view.dataset.total || 0));
    }
    if (p.files) files(view, p.files);
    if (p.stored) {
      for (const row of view.querySelectorAll("[data-file]")) {
        if (Object.hasOwn(p.stored, row.dataset.path)) put(row, "stored", p.stored[row.dataset.path]);
      }
    }
    if (p.history) history(view, p.history);
  }

  // The view's own fields: a task's, not those of its files' rows (which are views of their own).
  function own(view, field) {
    return [...view.querySelectorAll(`[data-field="${field}"]`)].filter(
      (el) => el.closest("[data-file], [data-task]") === view,
    );
  }

  function put(view, field, value) {
    for (const el of own(view, field)) text(el, value);
  }

  // Writes only what changed: a rewritten text lays its box out again even when it reads the same.
  function text(el, value) {
    const shown = String(value);
    if (el.textContent !== shown) el.textContent = shown;
  }

  // A <progress> and the label beside it (<bdi data-label>), as the server renders them.
  function progress(bar, done, total) {
    const label = bar.parentElement.querySelector("[data-label]");
    const [max, value] = total ? [total, Math.min(done, total)] : [1, 0];
    if (bar.max !== max) bar.max = max;
    if (bar.value !== value) bar.value = value;
    if (label) {
      text(label, total ? `${size(done)} of ${size(total)}` : size(done));
      if (bar.getAttribute("aria-label") !== label.textContent) bar.setAttribute("aria-label", label.textContent);
    }
  }

  function files(view, changed) {
    const rows = view.querySelectorAll("[data-file]");
    const all = changed["*"];
    const unfinished = changed["~"];
    for (const row of rows) {
      let change = changed[row.dataset.file] || all;
      if (!change && unfinished && own(row, "state").some((el) => el.textContent !== "done")) change = unfinished;
      if (!change) continue;
      put(row, "state", change.state);
      const cell = row.querySelector('[data-field="progress"]');
      if (change.state === "downloading") {
        let bar = cell.querySelector("progress");
        if (!bar) {
          cell.textContent = "";
          bar = document.createElement("progress");
          const label = document.createElement("bdi");
          label.dataset.label = "";
          cell.append(bar, " ", label);
        }
        progress(bar, change.bytes_done || 0, change.bytes_total || Number(row.dataset.size || 0));
      } else {
        text(cell, change.state === "done" ? "whole" : "");
      }
    }
  }

  // State changes after the last one shown (the stream may repeat one the page has).
  function history(view, entries) {
    const body = view.querySelector('[data-field="history"]');
    if (!body) return;
    for (const entry of entries) {
      if (!after(entry.tid, body.dataset.last)) continue;
      body.dataset.last = entry.tid;
      const row = body.insertRow();
      for (const value of [new Date(entry.at).toISOString().slice(0, 19).replace("T", " "), entry.type, entry.said]) {
        cell(row, value);
      }
    }
  }

  // Whether stream entry id `a` ("ms-seq") comes after `b` ("": before every entry).
  function after(a, b) {
    if (!b) return true;
    const [am, as] = a.split("-").map(Number);
    const [bm, bs] = b.split("-").map(Number);
    return am > bm || (am === bm && as > bs);
  }

  function size(n) {
    let value = n;
    for (const unit of UNITS) {
      if (value < 1024 || unit === "GiB") return unit === "B" ? `${Math.round(value)} B` : `${value.toFixed(1)} ${unit}`;
      value /= 1024;
    }
  }
})();
