// The live store: one EventSource for the page; a zone's figures on demand. No framework, no build.
"use strict";
(function () {
  const $ = (sel) => document.querySelector(sel);
  const all = (sel) => document.querySelectorAll(sel);
  const esc = (s) => (window.CSS && CSS.escape ? CSS.escape(s) : s.replace(/["\\]/g, "\\$&"));
  const set = (sel, text) => { const el = $(sel); if (el) el.textContent = text; };

  function show(live) {
    set('[data-total="enrolled"]', live.enrolled);
    set('[data-total="anonymous"]', live.anonymous);
    for (const z of live.zones) {
      const k = esc(z.zone);
      set(`[data-enrolled="${k}"]`, z.enrolled);
      set(`[data-anonymous="${k}"]`, z.anonymous);
      set(`[data-count="${k}"]`, z.total ? `${z.enrolled} + ${z.anonymous}` : "·");
      if (live.people) set(`[data-people="${k}"]`, (live.people[z.zone] || []).join(", "));
      const g = $(`g.zone[data-zone="${k}"]`);
      if (g) {
        g.classList.toggle("busy", z.total > 0);
        g.setAttribute("aria-label", `Zone ${z.zone}: ${z.enrolled} enrolled, ${z.anonymous} anonymous`);
      }
    }
    for (const r of live.receivers) {
      const k = esc(r.id);
      set(`[data-ago="${k}"]`, r.ago_s === null ? "never" : `${r.ago_s} s ago`);
      set(`[data-tags="${k}"]`, r.tags);
      set(`[data-rate="${k}"]`, r.adverts_per_s);
      const row = $(`tr[data-rx="${k}"]`); if (row) row.classList.toggle("quiet", r.quiet);
      const mark = $(`g.receiver[data-receiver="${k}"]`); if (mark) mark.classList.toggle("quiet", r.quiet);
    }
  }

  async function detail(zone) {
    all("g.zone.selected").forEach((g) => g.classList.remove("selected"));
    const g = $(`g.zone[data-zone="${esc(zone)}"]`); if (g) g.classList.add("selected");
    const box = $("#detail"); box.hidden = false;
    set("#detail-title", `Zone ${zone} today`);
    const r = await fetch(`/dashboard/zones/${encodeURIComponent(zone)}`, { headers: { Accept: "application/json" } });
    if (!r.ok) { set("#detail-footfall", `unavailable (${r.status})`); return; }
    const f = await r.json();
    set("#detail-footfall", f.footfall);
    set("#detail-dwell", f.avg_dwell_s === null ? "–" : `${Math.round(f.avg_dwell_s)} s`);
    set("#detail-unique", f.unique_enrolled_visitors);
  }

  all("[data-zone]").forEach((el) => {
    el.addEventListener("click", () => detail(el.dataset.zone));
    if (el.tagName.toLowerCase() === "g") {
      el.addEventListener("keydown", (e) => {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); detail(el.dataset.zone); }
      });
    }
  });

  const state = $("#state");
  const source = new EventSource("/dashboard/stream");
  source.addEventListener("live", (e) => { show(JSON.parse(e.data)); state.textContent = "live"; });
  let leaving = false; // a form (sign-out) is taking the page elsewhere: do not race it with a reload
  document.addEventListener("submit", () => { leaving = true; source.close(); });
  source.addEventListener("signed-out", () => { source.close(); if (!leaving) window.location.reload(); });
  source.onerror = () => { state.textContent = "reconnecting…"; };
})();
