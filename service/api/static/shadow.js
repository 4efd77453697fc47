// Shadow before switch (issue 23): per route, the active and the shadow package against what
// the clinicians approved, structure by structure, and the admin's switch (audited; the same
// button switches back). Uses dashboard.js's helpers ($, el, clear, apiJson, api, allowed).
"use strict";

const SHADOW_POLL_MS = 15000;

function shadowNumber(value, digits) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

function renderShadowRoute(route) {
  const rows = route.structures.map((s) => {
    const diff = s.dice_difference;
    const verdict = diff === null ? "" : diff > 0.005 ? "shadow-better" : diff < -0.005 ? "shadow-worse" : "";
    return el("tr", { "data-structure": s.roi_name, className: verdict },
      el("td", {}, s.roi_name),
      el("td", { className: "active-dice" }, shadowNumber(s.active.dice.mean, 3)),
      el("td", { className: "shadow-dice" }, shadowNumber(s.shadow.dice.mean, 3)),
      el("td", { className: "difference" }, diff === null ? "–" : (diff > 0 ? "+" : "") + diff.toFixed(3)),
      el("td", {}, shadowNumber(s.active.hd95_mm.mean, 1)),
      el("td", {}, shadowNumber(s.shadow.hd95_mm.mean, 1)),
      el("td", {}, String(s.active.n)));
  });
  const table = el("table", { className: "shadow-table" },
    el("thead", {}, el("tr", {}, el("th", {}, "Structure"),
      el("th", {}, "Active " + (route.active_package || "?") + ": Dice"),
      el("th", {}, "Shadow " + (route.shadow_package || "?") + ": Dice"),
      el("th", {}, "Shadow − active"), el("th", {}, "Active HD95 (mm)"), el("th", {}, "Shadow HD95 (mm)"),
      el("th", {}, "Approved sets"))),
    el("tbody", {}, ...rows));
  const switched = route.switched ? " Switched by " + route.switched_by + " at " + when(route.switched_at) + "." : "";
  const note = el("p", { className: "note" }, "Route " + route.route + ": active " + (route.active_package || "default") +
    " (sent), shadow " + (route.shadow_package || "?") + " (never sent), compared on " + route.approved_sets +
    " approved structure set" + (route.approved_sets === 1 ? "" : "s") + "." + switched);
  const box = el("div", { className: "shadow-route", "data-route": route.route }, el("h3", {}, route.route), note, table);
  if (allowed("admin")) {
    const button = el("button", { className: "shadow-switch", type: "button" }, "Make " + (route.shadow_package || route.shadow) + " the active model");
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        await api("/api/routes/" + encodeURIComponent(route.route) + "/switch", { method: "POST" });
      } catch (error) {
        note.textContent = "Switch failed: " + error.message;
      }
      refreshShadow();
    });
    box.append(button);
  }
  return box;
}

async function refreshShadow() {
  const panel = $("#shadow-panel");
  if (!panel || !state.me) return;
  try {
    const routes = await apiJson("/api/shadow");
    const body = $("#shadow-routes");
    clear(body);
    panel.hidden = routes.length === 0;
    for (const route of routes) body.append(renderShadowRoute(route));
  } catch (error) {
    $("#shadow-note").textContent = "Shadow comparison unavailable: " + error.message;
  }
}

setInterval(refreshShadow, SHADOW_POLL_MS);
window.addEventListener("hashchange", refreshShadow);
document.addEventListener("rtcontour:login", refreshShadow);
(function waitForLogin() {
  if (typeof state !== "undefined" && state.me) refreshShadow();
  else setTimeout(waitForLogin, 300);
})();
