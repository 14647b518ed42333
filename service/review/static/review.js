// Worklist: select a cell (click or arrow keys), give it a class with a click or a number key, confirm
// with Enter, sign off the specimen. Talks to /v1/review/* with the session's CSRF token.
"use strict";

(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]')?.content || "";
  const grid = document.getElementById("grid");
  const message = document.getElementById("message");
  const signoff = document.getElementById("signoff");
  const filters = document.getElementById("filters");
  const cells = () => Array.from(grid ? grid.querySelectorAll("article.cell") : []);
  let selected = null;

  function say(text, isError) {
    message.textContent = text;
    message.classList.toggle("error", Boolean(isError));
  }

  async function call(method, url, body) {
    const response = await fetch(url, {
      method,
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    let data = null;
    try { data = await response.json(); } catch (_) { /* not JSON */ }
    if (response.status === 401) { window.location.assign("/review/login?next=" + encodeURIComponent(location.pathname + location.search)); }
    if (!response.ok) { throw new Error((data && data.detail) || ("HTTP " + response.status)); }
    return data;
  }

  function select(card, scroll) {
    if (!card) return;
    if (selected) selected.classList.remove("selected");
    selected = card;
    card.classList.add("selected");
    card.focus({ preventScroll: !scroll });
    if (scroll) card.scrollIntoView({ block: "nearest", behavior: "smooth" });
  }

  function move(step) {
    const all = cells();
    if (!all.length) return;
    const i = selected ? all.indexOf(selected) : -1;
    select(all[Math.min(all.length - 1, Math.max(0, i + step))], true);
  }

  function nextUnreviewed(after) {
    const all = cells();
    const start = all.indexOf(after);
    const rest = all.slice(start + 1).concat(all.slice(0, start));
    return rest.find((c) => c.classList.contains("status-unreviewed")) || all[start + 1] || after;
  }

  function render(card, cell) {
    card.dataset.label = cell.label;
    card.classList.remove("status-unreviewed", "status-confirmed", "status-corrected");
    card.classList.add("status-" + cell.status);
    card.querySelector('[data-field="status"]').textContent = cell.status;
    card.querySelector('[data-field="label"]').textContent = cell.label;
    card.querySelector('[data-field="reviewer"]').textContent = cell.reviewed_by ? "by " + cell.reviewed_by : "";
    card.querySelectorAll("button.choice").forEach((b) => {
      b.classList.toggle("chosen", b.dataset.label === cell.label);
      b.classList.remove("suggested");
    });
  }

  async function refreshSpecimen(id) {
    const row = document.getElementById("specimen-" + id);
    if (!row && !signoff) return;
    const s = await call("GET", "/v1/review/specimens/" + id);
    if (row) {
      row.querySelector(".open").textContent = s.unreviewed;
      row.querySelector(".corr").textContent = s.corrected;
    }
    if (signoff && signoff.dataset.specimen === String(id)) {
      for (const key of ["cells", "unreviewed", "unidentified", "corrected"]) {
        const field = signoff.querySelector('[data-field="' + key + '"]');
        if (field) field.textContent = s[key];
      }
      const button = document.getElementById("signoff-button");
      if (button) button.disabled = !s.can_sign_off;
    }
  }

  async function decide(card, label) {
    if (!card || card.dataset.locked) return;
    try {
      const cell = await call("POST", "/v1/review/cells/" + card.dataset.id, { label });
      render(card, cell);
      say("Cell #" + cell.id + ": " + (cell.status === "corrected" ? "reclassified as " : "confirmed as ") + cell.label);
      select(nextUnreviewed(card), true);
      await refreshSpecimen(card.dataset.specimen);
    } catch (err) {
      say("Cell #" + card.dataset.id + ": " + err.message, true);
    }
  }

  if (grid) {
    grid.addEventListener("click", (event) => {
      const card = event.target.closest("article.cell");
      if (!card) return;
      select(card, false);
      const button = event.target.closest("button.choice");
      if (button) decide(card, button.dataset.label);
    });
  }

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.target.closest && event.target.closest("select, input, textarea")) return;
    if (event.key === "ArrowRight" || event.key === "j") { move(1); event.preventDefault(); return; }
    if (event.key === "ArrowLeft" || event.key === "k") { move(-1); event.preventDefault(); return; }
    if (!selected) return;
    if (/^[1-9]$/.test(event.key)) {
      const button = selected.querySelectorAll("button.choice")[Number(event.key) - 1];
      if (button) { decide(selected, button.dataset.label); event.preventDefault(); }
    } else if (event.key === "Enter") {
      const label = selected.dataset.label;
      if (label === "unidentified") { say("Cell #" + selected.dataset.id + " is unidentified: give it a class (1-9)", true); }
      else { decide(selected, label); }
      event.preventDefault();
    }
  });

  const signoffButton = document.getElementById("signoff-button");
  if (signoffButton) {
    signoffButton.addEventListener("click", async () => {
      try {
        await call("POST", "/v1/review/specimens/" + signoff.dataset.specimen + "/sign-off");
        window.location.assign("/review?specimen=" + signoff.dataset.specimen);
      } catch (err) {
        say(err.message, true);
      }
    });
  }

  if (filters) {
    filters.addEventListener("change", () => filters.requestSubmit());
  }

  const first = cells().find((c) => c.classList.contains("status-unreviewed")) || cells()[0];
  if (first) select(first, false);
})();
