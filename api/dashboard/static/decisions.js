// The decision feed: one EventSource for the page; each new decision goes on top. No framework, no build.
"use strict";
(function () {
  const table = document.getElementById("feed");
  const body = table.tBodies[0];
  const state = document.getElementById("state");
  const MAX_ROWS = 200; // the page stays as small as the server's feed
  const seen = new Set(Array.from(body.rows, (r) => r.dataset.key));

  function cell(row, text) { const td = row.insertCell(); td.textContent = text; return td; }

  function add(d) {
    if (seen.has(d.key)) return; // already drawn from the table
    seen.add(d.key);
    const row = body.insertRow(0);
    row.dataset.key = d.key;
    row.className = d.fired ? "fired new" : "not new";
    cell(row, d.time); cell(row, d.customer); cell(row, d.campaign);
    cell(row, d.zone ? `${d.event} in ${d.zone}` : d.event);
    const out = cell(row, "");
    out.className = "outcome";
    const strong = document.createElement("strong"); strong.textContent = d.fired ? "fired" : d.reason_text;
    const code = document.createElement("code"); code.dataset.reason = ""; code.textContent = d.reason; code.hidden = d.fired;
    out.append(strong, " ", code);
    if (d.detail) { const small = document.createElement("small"); small.textContent = d.detail; out.append(document.createElement("br"), small); }
    const a = document.createElement("a"); a.href = d.explain; a.textContent = "Explain";
    row.insertCell().append(a);
    while (body.rows.length > MAX_ROWS) body.deleteRow(-1);
    document.getElementById("empty").hidden = true;
  }

  const source = new EventSource(`/dashboard/stream?after=${encodeURIComponent(table.dataset.after)}`);
  source.addEventListener("open", () => { state.textContent = "live"; });
  source.addEventListener("decisions", (e) => { for (const d of JSON.parse(e.data)) add(d); state.textContent = "live"; });
  let leaving = false;
  document.addEventListener("submit", () => { leaving = true; source.close(); });
  source.addEventListener("signed-out", () => { source.close(); if (!leaving) window.location.reload(); });
  source.onerror = () => { state.textContent = "reconnecting…"; };
})();
