// The health page, live: one EventSource; each change redraws the tables from the server's facts. No build.
"use strict";
(function () {
  const $ = (sel) => document.querySelector(sel);
  const names = { db: "database", mqtt: "broker" };
  const pad = (n) => String(n).padStart(2, "0");
  const clock = (t) => { const d = new Date(t * 1000); return `${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}:${pad(d.getUTCSeconds())}`; };

  // One table's body from the facts: cells(item) gives [text, attribute or null] per cell, the first a header.
  function rows(sel, items, cells, mark, empty, span) {
    const table = $(sel);
    if (!table) return;
    const body = table.tBodies[0];
    body.replaceChildren();
    if (!items.length) { const td = body.insertRow().insertCell(); td.colSpan = span; td.textContent = empty; return; }
    for (const item of items) {
      const row = body.insertRow();
      mark(row, item);
      cells(item).forEach(([text, attr], i) => {
        const cell = document.createElement(i === 0 ? "th" : "td");
        if (i === 0) cell.scope = "row";
        if (attr) cell.setAttribute(attr, "");
        cell.textContent = text; row.append(cell);
      });
    }
  }

  function show(h) {
    $("#status").textContent = h.status;
    $("#ready").textContent = h.ready ? `, ${h.ready.replace(/_/g, " ")}` : "";
    rows("#components", Object.entries(h.components), ([k, v]) => [[names[k] || k], [String(v), "data-state"]],
      (row, [k]) => { row.dataset.component = k; }, "", 2);
    rows("#receivers", h.receivers, (r) => [[r.id], [r.ago_s === null ? "not yet" : `${r.ago_s} s ago`], [r.tags],
      [r.adverts_per_s]], (row, r) => { row.dataset.rx = r.id; }, "No receivers configured.", 4);
    rows("#queues", h.queues, ([q, n]) => [[q], [n]], (row, [q]) => { row.dataset.queue = q; },
      "No queue figures (no runtime metrics).", 2);
    for (const [k, v] of Object.entries(h.counters)) { const el = $(`[data-counter="${k}"]`); if (el) el.textContent = v; }
    rows("#dead-letters", h.dead, (d) => [[clock(d.received_at)], [`${d.device_id || "?"} ${d.topic}`],
      [d.reason, "data-reason"], [d.detail || ""]], () => {}, "None.", 4);
  }

  const state = $("#state");
  const source = new EventSource("/dashboard/health/stream");
  source.addEventListener("health", (e) => { show(JSON.parse(e.data)); state.textContent = "live"; });
  let leaving = false;
  document.addEventListener("submit", () => { leaving = true; source.close(); });
  source.addEventListener("signed-out", () => { source.close(); if (!leaving) window.location.reload(); });
  source.onerror = () => { state.textContent = "reconnecting…"; };
})();
