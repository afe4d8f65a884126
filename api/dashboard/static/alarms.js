// The active alarms, live: one EventSource for the page; each change redraws the table. No framework, no build.
"use strict";
(function () {
  const table = document.getElementById("alarms");
  const body = table.tBodies[0];
  const state = document.getElementById("state");
  const canChange = table.dataset.canChange === "1";
  const csrf = document.querySelector(".signout input[name=csrf]").value;

  function cell(row, text) { const td = row.insertCell(); td.textContent = text; return td; }

  function button(action, label) {
    const form = document.createElement("form");
    form.method = "post"; form.action = action;
    const token = document.createElement("input");
    token.type = "hidden"; token.name = "csrf"; token.value = csrf;
    const b = document.createElement("button"); b.type = "submit"; b.textContent = label;
    form.append(token, b);
    return form;
  }

  function draw(alarms) {
    body.replaceChildren();
    for (const a of alarms) {
      const row = body.insertRow();
      row.dataset.alarm = a.id; row.dataset.severity = a.severity;
      const th = document.createElement("th"); th.scope = "row"; th.textContent = a.name;
      const small = document.createElement("small");
      small.textContent = [`#${a.id}`, a.rule, a.last_value === null ? null : `last ${a.last_value}`, a.detail]
        .filter((x) => x).join(" · ");
      th.append(document.createElement("br"), small);
      row.append(th);
      const link = document.createElement("a");
      link.href = `/dashboard/devices/${encodeURIComponent(a.device_id)}`; link.textContent = a.device_id;
      row.insertCell().append(link);
      cell(row, a.severity).className = `sev-${a.severity}`;
      cell(row, a.age);
      cell(row, a.state).dataset.state = "";
      const actions = row.insertCell();
      if (canChange) {
        if (!a.acknowledged_at) actions.append(button(`/dashboard/alarms/${a.id}/ack`, "Acknowledge"));
        if (!a.booked_at) actions.append(button(`/dashboard/alarms/${a.id}/book`, "Booked"));
        actions.append(button(`/dashboard/devices/${encodeURIComponent(a.device_id)}/service`, "Serviced"));
      }
    }
    if (!alarms.length) { const row = body.insertRow(); const td = cell(row, "No active alarms."); td.colSpan = 6; }
  }

  const source = new EventSource("/dashboard/devices/stream");
  source.addEventListener("open", () => { state.textContent = "live"; });
  source.addEventListener("alarms", (e) => { draw(JSON.parse(e.data)); state.textContent = "live"; });
  let leaving = false;
  document.addEventListener("submit", () => { leaving = true; source.close(); });
  source.addEventListener("signed-out", () => { source.close(); if (!leaving) window.location.reload(); });
  source.onerror = () => { state.textContent = "reconnecting…"; };
})();
