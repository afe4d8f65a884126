// The campaign editor: the YAML is checked as you type (the server's validator, nothing saved), its
// problems shown by line before Save. Without this script, Save checks it the same way.
"use strict";
(function () {
  const form = document.getElementById("editor");
  const text = document.getElementById("yaml");
  const box = document.getElementById("problems");
  const state = document.getElementById("check-state");
  const csrf = form.querySelector("input[name=csrf]").value;
  let timer = null, asked = 0;

  function show(problems) {
    box.replaceChildren();
    if (!problems.length) { state.textContent = "no problems found"; return; }
    state.textContent = "";
    const ul = document.createElement("ul"); ul.className = "problems";
    for (const p of problems) {
      const li = document.createElement("li"); li.className = "error";
      li.textContent = p.line ? `line ${p.line}: ${p.message}` : p.message;
      ul.append(li);
    }
    box.append(ul);
  }

  async function check() {
    const mine = ++asked;
    state.textContent = "checking…";
    const r = await fetch(form.dataset.check, { method: "POST", headers: {
      "Content-Type": "application/x-www-form-urlencoded", "X-CSRF-Token": csrf, Accept: "application/json" },
      body: new URLSearchParams({ yaml: text.value }) });
    if (mine !== asked) return; // a later keystroke asked again
    if (!r.ok) { state.textContent = `could not check (${r.status})`; return; }
    show((await r.json()).problems);
  }

  text.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(check, 400); });
  form.addEventListener("submit", () => clearTimeout(timer));
})();
