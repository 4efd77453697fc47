// rtcontour dashboard: plain JS, no build step, no third-party code.
// Every value that comes from the API (hence from DICOM: series descriptions, AE titles, ROI
// names) is put into the page with textContent or attributes, never innerHTML.
"use strict";

const TOKEN_KEY = "rtcontour.token";
const POLL_MS = 3000;
const PAGE_SIZE = 25;
const ROLE_RANK = { viewer: 0, clinician: 1, admin: 2 };

const DESTINATION_EVERY = 10;  // C-ECHO the destinations every 10th poll (30 s)

const state = { token: null, me: null, offset: 0, timer: null, jobId: null, tick: 0 };

function $(selector) { return document.querySelector(selector); }

// Build an element; string children become text nodes (never parsed as HTML).
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "className") node.className = value;
    else if (key === "style") Object.assign(node.style, value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  return node;
}

class ApiError extends Error {
  constructor(status, detail) { super(detail); this.status = status; }
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.token) headers.Authorization = "Bearer " + state.token;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401 && path !== "/api/login") { logout(); throw new ApiError(401, "signed out"); }
  if (!response.ok) {
    let detail = response.statusText;
    try { const body = await response.json(); detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail); } catch (e) { /* not JSON */ }
    throw new ApiError(response.status, detail);
  }
  return response;
}

async function apiJson(path, options) { return (await api(path, options)).json(); }

function allowed(role) { return state.me && ROLE_RANK[state.me.role] >= ROLE_RANK[role]; }

function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return d.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

// DICOM PN "DOE^JANE^^DR" -> "DOE, JANE"; DA "20260302" -> "2026-03-02".
function personName(pn) {
  if (!pn) return "";
  const [family, given] = String(pn).split("=")[0].split("^");
  return given ? family + ", " + given : family;
}

function dicomDate(da) {
  const text = String(da || "");
  return /^\d{8}$/.test(text) ? text.slice(0, 4) + "-" + text.slice(4, 6) + "-" + text.slice(6) : text;
}

function stateBadge(value) { return el("span", { className: "badge state-" + value }, value); }

// How a series came when not by C-STORE: pulled from the PACS by a user, or sent by STOW-RS.
function originText(job) {
  if (job.received_via === "pull") return "pulled by " + (job.requested_by || "?");
  if (job.received_via === "dicomweb") return "DICOMweb from " + (job.requested_by || "?");
  return null;
}

function originMark(job) {
  const text = originText(job);
  return text ? el("span", { className: "badge origin origin-" + job.received_via }, text) : null;
}

function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

// ---- login ---------------------------------------------------------------------------
async function login(token) {
  state.token = token;
  try {
    state.me = await apiJson("/api/login", { method: "POST" });
  } catch (error) {
    state.token = null;
    throw error;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
}

function logout() {
  sessionStorage.removeItem(TOKEN_KEY);
  state.token = null; state.me = null;
  stopPolling();
  show("login");
}

function show(view) {
  for (const name of ["login", "overview", "job"]) $("#" + name + "-view").hidden = name !== view;
  $("#logout").hidden = view === "login";
  $("#whoami").textContent = state.me ? state.me.name + " (" + state.me.role + ")" : "";
}

function stopPolling() { if (state.timer) { clearInterval(state.timer); state.timer = null; } }

function poll(fn) {
  stopPolling();
  fn();
  state.timer = setInterval(fn, POLL_MS);
}

// ---- overview ------------------------------------------------------------------------
async function refreshOverview() {
  if (state.tick++ % DESTINATION_EVERY === 0) { refreshDestinations(); refreshQaTrends(); }
  refreshRefusals();
  refreshNotifications();
  try {
    const filters = new URLSearchParams({ limit: PAGE_SIZE, offset: state.offset });
    const wanted = $("#filter-state").value;
    if (wanted) filters.append("state", wanted);
    const ae = $("#filter-ae").value.trim();
    if (ae) filters.append("calling_ae", ae);
    const patient = $("#filter-patient").value.trim();
    if (patient && allowed("clinician")) filters.append("patient", patient);
    const [page, stats, failures] = await Promise.all([
      apiJson("/api/jobs?" + filters),
      apiJson("/api/stats?hours=24&bucket_minutes=60"),
      apiJson("/api/jobs?limit=10&state=failed&state=send_failed"),
    ]);
    renderJobs(page);
    renderStats(stats);
    renderFailures(failures.items);
    $("#updated").textContent = new Date().toLocaleTimeString();
  } catch (error) {
    if (error.status !== 401) $("#updated").textContent = "error: " + error.message;
  }
}

function renderJobs(page) {
  const body = $("#jobs-table tbody");
  clear(body);
  const withPatient = allowed("clinician");
  for (const th of document.querySelectorAll("#jobs-table .patient-col")) th.hidden = !withPatient;
  for (const job of page.items) {
    const link = el("a", { href: "#/jobs/" + encodeURIComponent(job.id) }, when(job.created_at));
    const patient = withPatient ? el("td", { className: "patient" },
      el("span", { className: "patient-name" }, personName(job.patient_name)), el("br"),
      el("span", { className: "patient-id" }, job.patient_id || "")) : null;
    const study = withPatient ? el("td", { className: "study" },
      dicomDate(job.study_date), job.accession_number ? " · " + job.accession_number : "", el("br"),
      el("span", { className: "note" }, job.study_description || "")) : null;
    body.append(el("tr", { "data-job-id": job.id },
      el("td", {}, link), el("td", {}, stateBadge(job.state)), patient, study,
      el("td", {}, job.calling_ae || "", job.received_via === "pull" ? el("br") : null,
        job.received_via === "pull" ? originMark(job) : null),
      el("td", { className: "description" }, job.series_description || ""),
      el("td", {}, job.model_name ? job.model_name + " " + (job.model_version || "") : ""),
      el("td", {}, job.n_instances ?? ""),
      el("td", { className: "reason" }, job.failure_reason || job.ignored_reason || ""),
      el("td", { className: "route" }, job.route_name || "")));
  }
  const last = Math.min(page.offset + page.items.length, page.total);
  $("#jobs-total").textContent = page.total ? (page.offset + 1) + "–" + last + " of " + page.total : "no jobs";
  $("#prev-page").disabled = page.offset === 0;
  $("#next-page").disabled = last >= page.total;
}

function renderStats(stats) {
  const counts = stats.jobs_by_state;
  $("#queue-depth").textContent = stats.queue_depth === null ? "unknown" : String(stats.queue_depth)
    + (stats.queued_not_on_broker ? " (+" + stats.queued_not_on_broker + " queued but not on the broker)" : "");
  $("#count-running").textContent = String(counts.running || 0);
  $("#count-done").textContent = String(counts.done || 0);
  $("#count-failed").textContent = String((counts.failed || 0) + (counts.send_failed || 0));
  $("#count-ignored").textContent = String(counts.ignored || 0);
  const awaiting = counts.awaiting_review || 0;
  $("#count-awaiting").textContent = String(awaiting);
  $("#awaiting-tile").classList.toggle("waiting", awaiting > 0);
  drawChart($("#chart"), stats.buckets);
}

function drawChart(container, buckets) {
  const width = 760, height = 180, left = 36, right = 44, top = 10, bottom = 22;
  const plotW = width - left - right, plotH = height - top - bottom;
  const maxCount = Math.max(1, ...buckets.map((b) => b.done + b.failed));
  const latencies = buckets.map((b) => b.median_latency_s).filter((v) => v !== null);
  const maxLatency = Math.max(1, ...latencies);
  const chart = svg("svg", { viewBox: "0 0 " + width + " " + height, role: "img", "aria-label": "throughput and latency chart" });
  const step = plotW / buckets.length;
  chart.append(svg("line", { x1: left, y1: top + plotH, x2: left + plotW, y2: top + plotH, class: "axis" }));
  for (const [value, y] of [[maxCount, top], [0, top + plotH]]) {
    const t = svg("text", { x: left - 4, y: y + 4, class: "tick", "text-anchor": "end" }); t.textContent = String(value); chart.append(t);
  }
  const t = svg("text", { x: left + plotW + 4, y: top + 4, class: "tick" }); t.textContent = maxLatency.toFixed(0) + " s"; chart.append(t);
  let path = "";
  buckets.forEach((bucket, i) => {
    const x = left + i * step;
    const doneH = (bucket.done / maxCount) * plotH, failedH = (bucket.failed / maxCount) * plotH;
    if (bucket.done) chart.append(svg("rect", { x: x + 1, y: top + plotH - doneH, width: Math.max(1, step - 2), height: doneH, class: "bar-done" }));
    if (bucket.failed) chart.append(svg("rect", { x: x + 1, y: top + plotH - doneH - failedH, width: Math.max(1, step - 2), height: failedH, class: "bar-failed" }));
    if (bucket.median_latency_s !== null) {
      const y = top + plotH - (bucket.median_latency_s / maxLatency) * plotH;
      path += (path ? " L " : "M ") + (x + step / 2).toFixed(1) + " " + y.toFixed(1);
      chart.append(svg("circle", { cx: x + step / 2, cy: y, r: 2.5, class: "latency-dot" }));
    }
    if (i % 6 === 0) {
      const label = svg("text", { x: x, y: height - 6, class: "tick" });
      label.textContent = new Date(bucket.start).toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" });
      chart.append(label);
    }
  });
  if (path) chart.append(svg("path", { d: path, class: "latency-line" }));
  clear(container);
  container.append(chart);
}

function renderFailures(items) {
  const list = $("#failures");
  clear(list);
  if (!items.length) { list.append(el("li", { className: "note" }, "No failures.")); return; }
  for (const job of items) {
    list.append(el("li", {}, stateBadge(job.state), " ",
      el("a", { href: "#/jobs/" + encodeURIComponent(job.id) }, when(job.finished_at || job.created_at)), " ",
      el("span", { className: "description" }, job.series_description || ""), " — ",
      el("span", { className: "reason" }, job.failure_reason || "no reason recorded")));
  }
}

async function refreshQaTrends() {
  try {
    renderQaTrends(await apiJson("/api/qa/trends"));
  } catch (error) {
    $("#qa-trends-note").textContent = "QA trends unavailable: " + error.message;
  }
}

function renderQaTrends(qa) {
  const banner = $("#qa-alerts");
  clear(banner);
  banner.hidden = qa.alerts.length === 0;
  for (const a of qa.alerts) {
    banner.append(el("div", { className: "qa-alert", "data-structure": a.structure },
      "⚠ " + a.structure + ": median Dice " + Number(a.median_dice).toFixed(2) + " over its last " + a.n_sets +
      " approved sets (below " + a.threshold + "; model " + a.model_versions.join(", ") + "). Clinicians are editing it more: check the model and the scanner protocol."));
  }
  const body = $("#qa-trends-table tbody");
  clear(body);
  $("#qa-trends-note").textContent = qa.trends.length
    ? "Approved structure sets compared with rtcontour's contours; alert below Dice " + qa.alert_dice + " over the last " + qa.alert_window + " sets."
    : "No approved structure sets received yet.";
  const alerted = new Set(qa.alerts.map((a) => a.structure));
  const num = (v, digits) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));
  for (const t of qa.trends) {
    body.append(el("tr", { "data-structure": t.structure, "data-model-version": t.model_version, className: alerted.has(t.structure) ? "qa-alerted" : "" },
      el("td", {}, t.structure), el("td", {}, t.model_name + " " + t.model_version), el("td", {}, t.n_sets),
      el("td", {}, num(t.median_dice, 3)), el("td", {}, Math.round(t.edited_share * 100) + " %"),
      el("td", {}, num(t.median_added_path_length_mm, 0)), el("td", {}, sparkline(t.weeks, qa.alert_dice))));
  }
}

// Weekly median Dice (0..1) as a small line with the alert threshold dashed.
function sparkline(weeks, threshold) {
  const width = 160, height = 32, pad = 3;
  const chart = svg("svg", { viewBox: "0 0 " + width + " " + height, width, height, class: "sparkline", role: "img", "aria-label": "median Dice by week" });
  const y = (v) => pad + (1 - v) * (height - 2 * pad);
  chart.append(svg("line", { x1: 0, x2: width, y1: y(threshold), y2: y(threshold), class: "threshold" }));
  const points = weeks.filter((w) => w.median_dice !== null);
  const x = (i) => (points.length === 1 ? width / 2 : pad + (i / (points.length - 1)) * (width - 2 * pad));
  if (points.length > 1) chart.append(svg("path", { d: points.map((w, i) => (i ? "L" : "M") + x(i).toFixed(1) + " " + y(w.median_dice).toFixed(1)).join(" "), class: "trend" }));
  points.forEach((w, i) => {
    const dot = svg("circle", { cx: x(i), cy: y(w.median_dice), r: 2.5, class: w.median_dice < threshold ? "low" : "dot" });
    const title = svg("title", {}); title.textContent = w.week + ": " + Number(w.median_dice).toFixed(3) + " (" + w.n_sets + " sets)"; dot.append(title);
    chart.append(dot);
  });
  return chart;
}

async function refreshRefusals() {
  const body = $("#refusals-table tbody");
  $("#refusals-panel").hidden = !allowed("admin");  // an admin's panel: not shown to others
  if (!allowed("admin")) { clear(body); return; }
  try {
    const page = await apiJson("/api/refusals?limit=20");
    clear(body);
    for (const row of page.items) {
      body.append(el("tr", { "data-kind": row.kind }, el("td", {}, when(row.at)), el("td", {}, row.calling_ae || "–"),
        el("td", {}, row.address || "–"), el("td", { className: "description" }, row.what), el("td", { className: "reason" }, row.why)));
    }
    const counts = Object.entries(page.counts).map(([kind, n]) => n + " " + kind + (n === 1 ? "" : "s")).join(", ");
    $("#refusals-note").textContent = page.items.length ? "In all: " + counts + "." : "Nothing refused.";
  } catch (error) {
    $("#refusals-note").textContent = "Refusals unavailable: " + error.message;
  }
}

// Webhook deliveries that gave up (admin): shown only when there are some.
async function refreshNotifications() {
  const body = $("#notifications-table tbody");
  if (!allowed("admin")) { $("#notifications-panel").hidden = true; clear(body); return; }
  try {
    const page = await apiJson("/api/notifications?state=failed&limit=20");
    clear(body);
    for (const row of page.items) {
      const job = row.job_id ? el("a", { href: "#/jobs/" + row.job_id }, row.job_id.slice(0, 8)) : "–";
      body.append(el("tr", { "data-event": row.event }, el("td", {}, when(row.created_at)), el("td", {}, row.event),
        el("td", {}, job), el("td", { className: "uid" }, row.url), el("td", {}, String(row.attempts)),
        el("td", { className: "reason" }, row.last_error || "–")));
    }
    $("#notifications-panel").hidden = !page.items.length;
  } catch (error) { $("#notifications-panel").hidden = true; }
}

async function refreshDestinations() {
  const body = $("#destinations-table tbody");
  $("#destinations-panel").hidden = !allowed("admin");
  if (!allowed("admin")) { clear(body); return; }
  try {
    const rows = await apiJson("/api/destinations");
    clear(body);
    for (const row of rows) {
      body.append(el("tr", {}, el("td", {}, row.destination),
        el("td", {}, el("span", { className: row.reachable ? "ok" : "bad" }, row.reachable ? "yes" : "no")),
        el("td", {}, row.status), el("td", {}, row.elapsed_ms)));
    }
    $("#destinations-note").textContent = rows.length ? "Checked " + new Date().toLocaleTimeString() + " (C-ECHO)." : "No destinations configured.";
  } catch (error) {
    $("#destinations-note").textContent = "Check failed: " + error.message;
  }
}

// ---- job page ------------------------------------------------------------------------
// What a job's failure_kind means to the person who must act on it.
const FAILURE_KINDS = {
  input: "its input: the series itself is wrong; send it again (a retry would fail again)",
  incomplete: "missing slices: send them, or the whole series, again (merged with this job's)",
  processing: "a problem on rtcontour's side: Retry may help",
  send: "the destinations: Retry sends the outputs again",
};

function field(list, name, value) {
  list.append(el("dt", {}, name), el("dd", {}, value === null || value === undefined || value === "" ? "–" : value));
}

async function refreshJob() {
  const id = state.jobId;
  let job;
  try { job = await apiJson("/api/jobs/" + encodeURIComponent(id)); } catch (error) {
    $("#job-message").textContent = error.message; return;
  }
  if (id !== state.jobId) return;
  state.job = job;
  $("#job-id").textContent = job.id;
  renderHeading(job);
  const fields = $("#job-fields");
  clear(fields);
  field(fields, "State", stateBadge(job.state));
  if (allowed("clinician")) {
    field(fields, "Patient", personName(job.patient_name));
    field(fields, "Patient ID", job.patient_id);
    field(fields, "Accession", job.accession_number);
    field(fields, "Study date", dicomDate(job.study_date));
    field(fields, "Study description", job.study_description);
  }
  field(fields, "Series description", job.series_description);
  field(fields, "Calling AE", job.calling_ae);
  field(fields, "Received", originMark(job));
  field(fields, "Series UID", job.series_instance_uid);
  field(fields, "Images", job.n_instances);
  field(fields, "Model", job.model_name ? job.model_name + " " + (job.model_version || "") : null);
  field(fields, "Created", when(job.created_at));
  field(fields, "Finished", when(job.finished_at));
  field(fields, "Failure reason", job.failure_reason);
  field(fields, "Failed for", FAILURE_KINDS[job.failure_kind] || job.failure_kind);
  field(fields, "Runs", job.attempts ? String(job.attempts) + (job.workers_lost
    ? ` (${job.workers_lost} lost with their worker, not counted as attempts)` : "") : null);
  field(fields, "Kind", job.kind === "dose" ? "dose prediction" : "contouring");
  field(fields, "Notes", job.notes && job.notes.length ? job.notes.join(" ") : null);
  field(fields, "CT from job", job.source_job_id);
  field(fields, "Route", job.route_name);
  field(fields, "Not contoured because", job.ignored_reason);
  field(fields, "Destinations", destinationsText(job));
  field(fields, "Sent to", job.sent_to && job.sent_to.length ? job.sent_to.join(", ") : null);
  field(fields, "RTSTRUCT UID", job.rtstruct_sop_instance_uid);
  const outputs = $("#outputs-table tbody");
  clear(outputs);
  const unreviewed = reviewMark(job);
  for (const output of job.outputs) {
    const button = el("button", { type: "button", className: "download-output" }, "Download");
    button.disabled = !output.available || !allowed("clinician");
    button.onclick = () => downloadOutput(output.kind);
    const mark = unreviewed ? el("span", { className: "badge " + unreviewed }, unreviewed) : null;
    outputs.append(el("tr", { "data-kind": output.kind }, el("td", {}, output.kind, mark ? " " : null, mark),
      el("td", { className: "uid" }, output.sop_instance_uid), el("td", {}, button)));
  }
  if (!job.outputs.length) outputs.append(el("tr", {}, el("td", { colSpan: 3 }, job.state === "ignored" ? "None: the series was not contoured." : "None yet.")));
  renderDose(job);
  renderQa(job);
  const isDose = job.kind === "dose";
  $("#structures-heading").hidden = isDose;  // a dose job's structures are in its dose panel
  $("#structures-table").hidden = isDose;
  const structures = $("#structures-table tbody");
  clear(structures);
  for (const s of job.structures) {
    const shown = s.display_colour || s.colour;  // as the viewer draws it
    const colour = shown ? "rgb(" + shown.map(Number).join(",") + ")" : "transparent";
    structures.append(el("tr", { "data-roi": s.roi_name }, el("td", {}, el("span", { className: "swatch", style: { background: colour } })),
      el("td", {}, s.roi_name), el("td", {}, s.volume_cc === null ? "–" : Number(s.volume_cc).toFixed(2))));
  }
  const timings = $("#timings-table tbody");
  clear(timings);
  for (const [name, value] of Object.entries(job.timings)) {
    timings.append(el("tr", {}, el("th", {}, name.replace(/_s$/, "").replace("_", " ")), el("td", {}, value === null ? "–" : Number(value).toFixed(2))));
  }
  const canClinic = allowed("clinician");
  const mainKind = isDose ? "RTDOSE" : "RTSTRUCT";
  const main = job.outputs.find((output) => output.kind === mainKind);
  state.downloadKind = mainKind;
  $("#download").textContent = "Download " + mainKind + (unreviewed ? " (" + unreviewed + ")" : "");
  $("#download").classList.remove("unreviewed", "rejected");
  if (unreviewed) $("#download").classList.add(unreviewed);
  $("#download").hidden = !canClinic;
  $("#download").disabled = !(main && main.available);
  // A job failed for its input (missing slice, ...) fails again: the series must be sent again.
  $("#retry").hidden = !(canClinic && job.retryable);
  renderReview(job, canClinic);
  const showable = isDose ? Boolean(main && main.available && job.source_job_id) : job.has_rtstruct;
  if (canClinic && showable && viewer.jobId !== job.id && !job.purged_at) loadViewer(job.id);
  if (!canClinic) $("#viewer-note").textContent = "The images need the clinician role.";
  else if (job.purged_at) $("#viewer-note").textContent = "The images were deleted by the retention policy.";
  else if (!showable) $("#viewer-note").textContent = isDose ? "No predicted dose yet: nothing to show." : "No RTSTRUCT yet: nothing to show.";
}

// What marks a job's outputs as not approved: awaiting review, or rejected ("" otherwise).
function reviewMark(job) {
  if (job.state === "awaiting_review") return "unreviewed";
  if (job.state === "rejected" || job.review_decision === "rejected") return "rejected";
  return "";
}

// Patient first (clinicians and admins), then study date and series; the job id below.
function renderHeading(job) {
  const withPatient = allowed("clinician");
  const title = $("#job-title");
  clear(title);
  const name = withPatient ? personName(job.patient_name) : "";
  if (withPatient && (name || job.patient_id)) {
    title.append(el("span", { className: "patient-name" }, name || "Name not given"),
      job.patient_id ? el("span", { className: "patient-id" }, "ID " + job.patient_id) : null);
  } else {
    title.append(job.series_description || "Series without description");
  }
  const parts = [];
  if (withPatient && job.study_date) parts.push("Study " + dicomDate(job.study_date));
  if (withPatient && job.study_description) parts.push(job.study_description);
  if (withPatient && job.series_description) parts.push("Series " + job.series_description);
  parts.push(job.kind === "dose" ? "Dose prediction" : "Contouring");
  $("#job-subtitle").textContent = parts.join(" · ");
  const banner = $("#job-banner");
  const mark = reviewMark(job);
  banner.hidden = !mark;
  banner.className = "job-banner " + (mark ? "banner-" + mark : "");
  banner.textContent = mark === "unreviewed"
    ? "Awaiting review: these contours are not approved and have not been sent."
    : mark === "rejected" ? "Rejected: these contours were not approved and are never sent." : "";
}

// Where the job's outputs go (send_to: the route's destinations, else RTCONTOUR_DESTINATIONS).
function destinationsText(job) {
  const targets = job.send_to && job.send_to.length ? job.send_to : job.destinations;
  if (!targets || !targets.length) return "none configured";
  return targets.join(", ") + (job.send_to_from === "RTCONTOUR_DESTINATIONS" ? " (RTCONTOUR_DESTINATIONS: its route names none)" : "");
}

// The approval gate: a job its route holds for review is sent only when a clinician approves.
function renderReview(job, canClinic) {
  const panel = $("#review-panel");
  const waiting = job.state === "awaiting_review";
  panel.hidden = !(waiting || job.review_decision || job.review_required);
  $("#review-actions").hidden = !(waiting && canClinic);
  const status = $("#review-status");
  if (waiting) status.textContent = "Held for review: nothing has been sent. Check the contours, then approve (sent to the destinations) or reject (never sent).";
  else if (job.review_decision) status.textContent = (job.review_decision === "approved" ? "Approved" : "Rejected") + " by " + (job.reviewed_by || "?") + " on " + when(job.reviewed_at) + (job.review_reason ? ": " + job.review_reason : ".");
  else status.textContent = "Its route requires a clinician's approval before sending.";
  const where = $("#review-destinations");
  if (waiting) where.textContent = "Approve will send to: " + destinationsText(job) + ".";
  else if (job.review_decision === "approved") where.textContent = job.sent_to && job.sent_to.length ? "Sent to: " + job.sent_to.join(", ") + "." : "Approve sends to: " + destinationsText(job) + ".";
  else where.textContent = "";
}

async function review(decision) {
  const message = $("#review-message");
  message.textContent = "";
  const body = decision === "reject" ? { reason: $("#review-reason").value.trim() } : undefined;
  if (body && body.reason.length < 3) { message.textContent = "Give a reason for rejecting (at least 3 characters)."; return; }
  try {
    const options = { method: "POST" };
    if (body) { options.body = JSON.stringify(body); options.headers = { "Content-Type": "application/json" }; }
    const result = await apiJson("/api/jobs/" + encodeURIComponent(state.jobId) + "/" + decision, options);
    message.textContent = decision === "approve" ? "Approved: the job is " + result.state + " and will be sent." : "Rejected: nothing will be sent.";
    $("#review-reason").value = "";
    refreshJob();
  } catch (error) { message.textContent = (decision === "approve" ? "Approve" : "Reject") + " failed: " + error.message; }
}

const DVH_COLOURS = ["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"];

function renderQa(job) {
  const panel = $("#qa-panel");
  panel.hidden = !job.qa;
  if (!job.qa) return;
  $("#qa-note").textContent = "Approved structure set " + job.qa.reference_sop_instance_uid + " received " + when(job.qa.received_at) + ".";
  const body = $("#qa-table tbody");
  clear(body);
  const num = (v, digits) => (v === undefined || v === null ? "–" : Number(v).toFixed(digits));
  for (const s of job.qa.structures) {
    body.append(el("tr", { "data-roi": s.roi_name || s.reference_name, className: "qa-" + s.status },
      el("td", {}, s.roi_name || "–"), el("td", {}, s.reference_name || "–"), el("td", {}, s.status),
      el("td", {}, num(s.dice, 3)), el("td", {}, num(s.hd95_mm, 1)), el("td", {}, num(s.mean_surface_distance_mm, 1)),
      el("td", {}, num(s.surface_dice_2mm, 3)), el("td", {}, num(s.added_path_length_mm, 0))));
  }
}

// A structure's colour: as the viewer draws it, else one of the DVH palette by position.
function structureColour(name, i) {
  return (viewer.colourByRoi && viewer.colourByRoi[name]) || DVH_COLOURS[i % DVH_COLOURS.length];
}

function renderDose(job) {
  const panel = $("#dose-panel");
  const metrics = job.dose_metrics || [];
  panel.hidden = metrics.length === 0;
  if (panel.hidden) return;
  const body = $("#dose-table tbody");
  clear(body);
  const gy = (v) => (v === undefined || v === null ? "–" : Number(v).toFixed(1));
  metrics.forEach((m, i) => {
    const colour = structureColour(m.roi_name, i);
    const ratio = m.prescription_gy && m.d_95_gy != null ? Math.round((m.d_95_gy / m.prescription_gy) * 100) + " %" : "–";
    const source = m.from_rtcontour
      ? el("span", { className: "borrowed" }, "borrowed from rtcontour (not approved)")
      : "approved";
    body.append(el("tr", { "data-roi": m.roi_name, className: m.from_rtcontour ? "borrowed" : "" },
      el("td", {}, el("span", { className: "swatch", style: { background: colour } })),
      el("td", {}, m.roi_name), el("td", {}, source), el("td", {}, m.type), el("td", {}, gy(m.prescription_gy)),
      el("td", {}, gy(m.d_95_gy)), el("td", { className: "ratio" }, ratio), el("td", {}, gy(m.d_99_gy)),
      el("td", {}, gy(m.mean_gy)), el("td", {}, gy(m.max_gy)), el("td", {}, gy(m["d_0.1cc_gy"]))));
  });
  $("#dose-normalisation").textContent = normalisationText(job, metrics);
  const borrowed = metrics.filter((m) => m.from_rtcontour).map((m) => m.roi_name);
  $("#dose-structures-note").textContent = borrowed.length
    ? "The prediction used the approved structure set; " + borrowed.join(", ") + (borrowed.length === 1 ? " was" : " were") +
      " not in it and came from rtcontour's own contours (not approved by a clinician)."
    : "The prediction used the approved structure set only.";
  drawDvh($("#dvh-chart"), $("#dvh-legend"), metrics);
}

// Whether and how the dose was normalised, as the job reports it; without a report the
// prediction is the network's dose as it came, and each PTV's D95 says how far that is.
function normalisationText(job, metrics) {
  const reported = job.dose_normalisation ?? job.normalisation ?? null;
  const ptvs = metrics.filter((m) => m.type === "PTV" && m.prescription_gy && m.d_95_gy != null);
  const coverage = ptvs.map((m) => m.roi_name + " D95 " + Number(m.d_95_gy).toFixed(1) + " Gy = " +
    Math.round((m.d_95_gy / m.prescription_gy) * 100) + " % of its " + Number(m.prescription_gy).toFixed(1) + " Gy prescription");
  let head;
  if (reported && typeof reported === "object") head = "Normalisation: " + (reported.description || reported.method || JSON.stringify(reported)) + ".";
  else if (reported) head = "Normalisation: " + reported + ".";
  else head = "Not normalised: the dose as the model predicted it, not scaled to the prescription.";
  return head + (coverage.length ? " " + coverage.join("; ") + "." : "");
}

function svgText(parent, text, attrs) {
  const node = svg("text", attrs);
  node.textContent = text;
  parent.append(node);
  return node;
}

// Cumulative DVHs: dose (Gy) across, volume (%) up, gridlines, the prescriptions dashed.
function drawDvh(container, legend, metrics) {
  const width = 760, height = 300, left = 58, right = 16, top = 14, bottom = 48;
  const plotW = width - left - right, plotH = height - top - bottom;
  const prescriptions = [...new Set(metrics.filter((m) => m.prescription_gy).map((m) => Number(m.prescription_gy)))];
  const top_ = Math.max(1, ...metrics.map((m) => (m.dvh.length - 1) * m.dvh_step_gy), ...prescriptions.map((p) => p * 1.1));
  const doseStep = top_ > 40 ? 10 : top_ > 15 ? 5 : 2;
  const maxDose = Math.ceil(top_ / doseStep) * doseStep;
  const x = (gy) => left + (gy / maxDose) * plotW, y = (pct) => top + plotH - (pct / 100) * plotH;
  const chart = svg("svg", { viewBox: "0 0 " + width + " " + height, role: "img", "aria-label": "dose-volume histograms", class: "dvh-svg" });
  for (let gy = 0; gy <= maxDose + 1e-9; gy += doseStep) {
    chart.append(svg("line", { x1: x(gy), x2: x(gy), y1: top, y2: top + plotH, class: gy === 0 ? "axis" : "grid" }));
    svgText(chart, String(gy), { x: x(gy), y: top + plotH + 14, class: "tick", "text-anchor": "middle" });
  }
  for (let pct = 0; pct <= 100; pct += 10) {
    chart.append(svg("line", { x1: left, x2: left + plotW, y1: y(pct), y2: y(pct), class: pct === 0 ? "axis" : "grid" }));
    svgText(chart, String(pct), { x: left - 6, y: y(pct) + 4, class: "tick", "text-anchor": "end" });
  }
  svgText(chart, "Dose (Gy)", { x: left + plotW / 2, y: height - 8, class: "axis-label", "text-anchor": "middle", "data-axis": "x" });
  svgText(chart, "Volume (%)", { x: 14, y: top + plotH / 2, class: "axis-label", "text-anchor": "middle", "data-axis": "y",
    transform: "rotate(-90 14 " + (top + plotH / 2) + ")" });
  for (const rx of prescriptions) {
    chart.append(svg("line", { x1: x(rx), x2: x(rx), y1: top, y2: top + plotH, class: "rx-line" }));
    svgText(chart, "Rx " + rx + " Gy", { x: x(rx) - 4, y: top + 10, class: "tick rx-label", "text-anchor": "end" });
  }
  clear(legend);
  metrics.forEach((m, i) => {
    const colour = structureColour(m.roi_name, i);
    const points = m.dvh.map((v, k) => x(k * m.dvh_step_gy).toFixed(1) + "," + y(v).toFixed(1));
    const line = svg("polyline", { points: points.join(" "), fill: "none", stroke: colour, "stroke-width": 2,
      "stroke-dasharray": m.from_rtcontour ? "6 3" : "none", "data-roi": m.roi_name });
    const title = svg("title", {}); title.textContent = m.roi_name; line.append(title);
    chart.append(line);
    const sample = el("span", { className: "legend-line" + (m.from_rtcontour ? " borrowed" : ""), style: { borderColor: colour } });
    legend.append(el("li", { "data-roi": m.roi_name }, sample, m.roi_name, m.type === "PTV" ? " (PTV, Rx " + m.prescription_gy + " Gy)" : "",
      m.from_rtcontour ? el("span", { className: "note" }, " borrowed") : null));
  });
  clear(container);
  container.append(chart);
}

// ---- slice viewer ----------------------------------------------------------------------
// The CT (int16 HU, canonical order (slices, rows, columns): axis 0 superior->inferior, 1
// anterior->posterior, 2 patient right->left) and the contours (polygons per axial slice in
// voxel coordinates (row, column)) are fetched once; every slice is drawn here, in the browser.
// Axial: anterior up, patient left on the right; coronal: superior up, patient left on the
// right; sagittal: superior up, anterior on the left.
const PLANE_AXES = {  // which canonical axis the plane cuts, and its image's (across, down) axes
  axial: { cut: 0, across: 2, down: 1 },
  coronal: { cut: 1, across: 2, down: 0 },
  sagittal: { cut: 2, across: 1, down: 0 },
};
const WHEEL_STEP = 50;  // pixels of wheel delta per slice (a mouse notch is 100)

const viewer = {
  jobId: null, meta: null, hu: null, structures: [], plane: "axial", index: {}, width: 400, level: 40,
  zoom: 1, panX: 0, panY: 0, showApproved: true, lut: null, lutKey: "", pending: false, wheel: 0,
  drag: null, renderMs: [], image: null, pixels: null, offscreen: null, mouse: null,
  dose: null, isDose: false, showDose: true, showIsodose: true, colourByRoi: {}, body: null,
  doseCanvas: null,
};

function resetViewer() {
  Object.assign(viewer, { jobId: null, meta: null, hu: null, structures: [], index: {}, zoom: 1, panX: 0, panY: 0, image: null, mouse: null, renderMs: [],
    dose: null, isDose: false, colourByRoi: {}, body: null });
  $("#viewer-dose-legend").hidden = true;
  $("#viewer").hidden = true;
  $("#viewer-note").textContent = "";
  clear($("#viewer-structures"));
}

async function loadViewer(id) {
  viewer.jobId = id;
  const note = $("#viewer-note");
  note.textContent = "Loading the CT…";
  try {
    const base = "/api/jobs/" + encodeURIComponent(id) + "/viewer/";
    const meta = await apiJson(base + "meta");
    const sizeMb = (meta.shape[0] * meta.shape[1] * meta.shape[2] * 2 / 1e6).toFixed(1);
    note.textContent = "Loading the CT (" + sizeMb + " MB) and contours…";
    const [ctResponse, contours, doseResponse] = await Promise.all([api(base + "ct"), apiJson(base + "contours"),
      meta.dose ? api(base + "dose") : Promise.resolve(null)]);
    const buffer = await ctResponse.arrayBuffer();
    const doseBuffer = doseResponse ? await doseResponse.arrayBuffer() : null;
    if (id !== viewer.jobId) return;
    // Int16Array reads the platform's byte order: little-endian on every browser platform.
    viewer.hu = new Int16Array(buffer);
    if (viewer.hu.length !== meta.shape[0] * meta.shape[1] * meta.shape[2]) throw new Error("CT size does not match its shape");
    viewer.meta = meta;
    viewer.structures = contours.structures.map((s, i) => ({
      key: s.source + ":" + s.roi_name + ":" + i, roi_name: s.roi_name, source: s.source, flag: s.flag, confidence: s.confidence,
      matches: s.matches, css: "rgb(" + s.display_colour.map(Number).join(",") + ")", visible: true,
      slices: Object.fromEntries(Object.entries(s.slices).map(([k, polys]) => [k, polys.map((p) => Float32Array.from(p))])),
      crossings: null,
    }));
    viewer.isDose = meta.kind === "dose";
    viewer.colourByRoi = Object.fromEntries(viewer.structures.map((s) => [s.roi_name, s.css]));
    viewer.dose = doseBuffer ? makeDose(meta.dose, doseBuffer) : null;
    viewer.body = bodyBox();
    const [S, R, C] = meta.shape;
    viewer.index = { axial: Math.floor(S / 2), coronal: Math.floor(R / 2), sagittal: Math.floor(C / 2) };
    const soft = meta.windows[0];
    setWindow(soft.width, soft.level, soft.name);
    buildWindowControls(meta.windows);
    buildStructureList();
    $("#viewer-approved-toggle").hidden = !meta.has_approved || viewer.isDose;
    $("#viewer-dose-toggle").hidden = !viewer.dose;
    $("#viewer-isodose-toggle").hidden = !viewer.dose;
    buildDoseLegend();
    if (state.job && state.job.id === id) renderDose(state.job);  // the table in the viewer's colours
    $("#viewer").hidden = false;
    note.textContent = "Wheel or ↑/↓, PgUp/PgDn: slices · right-drag: window/level · drag: pan · +/−: zoom.";
    setPlane("axial");
  } catch (error) {
    if (id === viewer.jobId) note.textContent = "No images: " + error.message;
    viewer.jobId = null;
  }
}

function buildWindowControls(windows) {
  const select = $("#viewer-window");
  clear(select);
  for (const w of windows) select.append(el("option", { value: w.name }, w.name + " (W" + w.width + "/L" + w.level + ")"));
  select.append(el("option", { value: "custom" }, "custom"));
  select.onchange = () => {
    const w = windows.find((item) => item.name === select.value);
    if (w) setWindow(w.width, w.level, w.name);
  };
}

function buildStructureList() {
  const list = $("#viewer-structures");
  clear(list);
  for (const s of viewer.structures) {
    const box = el("input", { type: "checkbox", "data-roi": s.roi_name, "data-source": s.source });
    box.checked = s.visible;
    box.onchange = () => { s.visible = box.checked; scheduleRender(); };
    const flag = s.flag === "review" ? el("span", { className: "flag", title: "the model is unsure" + (s.confidence != null ? " (confidence " + Number(s.confidence).toFixed(2) + ")" : "") + ": review it" }, "⚑ review") : null;
    const line = el("span", { className: "line " + (dashed(s) ? "dashed" : "solid"), style: { borderColor: s.css } });
    const origin = s.source === "borrowed" ? el("span", { className: "note borrowed" }, " borrowed from rtcontour, not approved")
      : s.source === "approved" ? el("span", { className: "note" }, " approved") : null;
    const label = el("label", {}, box, line, s.roi_name, origin, flag ? " " : null, flag);
    list.append(el("li", { className: s.source === "approved" && !viewer.isDose ? "approved" : "", "data-key": s.key, "data-source": s.source }, label));
  }
}

function setWindow(width, level, preset) {
  viewer.width = Math.max(1, Math.round(width)); viewer.level = Math.round(level);
  $("#viewer-width").value = String(viewer.width); $("#viewer-level").value = String(viewer.level);
  $("#viewer-wl").textContent = "W" + viewer.width + " L" + viewer.level;
  $("#viewer-window").value = preset || "custom";
  scheduleRender();
}

function setPlane(plane) {
  viewer.plane = plane;
  for (const button of document.querySelectorAll("#viewer-planes button")) button.classList.toggle("active", button.dataset.plane === plane);
  const slider = $("#viewer-slider");
  slider.max = String(viewer.meta.shape[PLANE_AXES[plane].cut] - 1);
  slider.value = String(viewer.index[plane]);
  fitToBody(plane);
  scheduleRender();
}

function step(delta) {
  const n = viewer.meta.shape[PLANE_AXES[viewer.plane].cut];
  const next = Math.min(n - 1, Math.max(0, viewer.index[viewer.plane] + delta));
  if (next === viewer.index[viewer.plane]) return;
  viewer.index[viewer.plane] = next;
  $("#viewer-slider").value = String(next);
  scheduleRender();
}

function scheduleRender() {
  if (!viewer.meta || viewer.pending) return;
  viewer.pending = true;
  requestAnimationFrame(() => { viewer.pending = false; renderViewer(); });
}

// A lookup table from HU (+32768) to an opaque grey RGBA pixel for the current window.
function windowLut() {
  const key = viewer.width + "/" + viewer.level;
  if (viewer.lutKey === key) return viewer.lut;
  const lut = viewer.lut || new Uint32Array(65536);
  const low = viewer.level - viewer.width / 2;
  for (let i = 0; i < 65536; i++) {
    const g = Math.max(0, Math.min(255, Math.round(((i - 32768 - low) / viewer.width) * 255)));
    lut[i] = 0xff000000 | (g << 16) | (g << 8) | g;
  }
  viewer.lut = lut; viewer.lutKey = key;
  return lut;
}

// The plane's geometry: image size in pixels and the millimetres of one pixel.
function planeGeometry(plane) {
  const axes = PLANE_AXES[plane];
  const shape = viewer.meta.shape, spacing = viewer.meta.spacing_mm;
  return { width: shape[axes.across], height: shape[axes.down], acrossMm: spacing[axes.across], downMm: spacing[axes.down] };
}

function fillPlaneImage(plane, index, pixels) {
  const [, R, C] = viewer.meta.shape;
  const hu = viewer.hu, lut = windowLut();
  const g = planeGeometry(plane);
  let out = 0;
  if (plane === "axial") {
    const base = index * R * C;
    for (let i = 0; i < R * C; i++) pixels[i] = lut[hu[base + i] + 32768];
  } else if (plane === "coronal") {
    for (let s = 0; s < g.height; s++) {
      const base = s * R * C + index * C;
      for (let c = 0; c < C; c++) pixels[out++] = lut[hu[base + c] + 32768];
    }
  } else {
    for (let s = 0; s < g.height; s++) {
      const base = s * R * C + index;
      for (let r = 0; r < R; r++) pixels[out++] = lut[hu[base + r * C] + 32768];
    }
  }
}

// Where image coordinates (u across, v down; pixel i spans [i, i+1)) land on the canvas.
function viewTransform(canvas, g) {
  const fit = Math.min(canvas.width / (g.width * g.acrossMm), canvas.height / (g.height * g.downMm));
  const scale = fit * viewer.zoom;
  const sx = scale * g.acrossMm, sy = scale * g.downMm;
  const ox = (canvas.width - g.width * sx) / 2 + viewer.panX, oy = (canvas.height - g.height * sy) / 2 + viewer.panY;
  return { sx, sy, ox, oy };
}

// Each structure's crossings with pixel-centre rows, per slice (row -> sorted columns), for
// the coronal and sagittal outlines (even-odd rule, as the RTSTRUCT is filled).
function crossings(structure) {
  if (structure.crossings) return structure.crossings;
  const R = viewer.meta.shape[1];
  const bySlice = {};
  for (const [k, polys] of Object.entries(structure.slices)) {
    const rows = new Map();
    for (const p of polys) {
      const n = p.length / 2;
      for (let i = 0; i < n; i++) {
        const y0 = p[2 * i], x0 = p[2 * i + 1], j = (i + 1) % n, y1 = p[2 * j], x1 = p[2 * j + 1];
        const low = Math.min(y0, y1), high = Math.max(y0, y1);
        for (let y = Math.max(0, Math.ceil(low)); y < Math.min(R, Math.ceil(high)); y++) {
          const x = x0 + ((y - y0) / (y1 - y0)) * (x1 - x0);
          if (!rows.has(y)) rows.set(y, []);
          rows.get(y).push(x);
        }
      }
    }
    for (const xs of rows.values()) xs.sort((a, b) => a - b);
    bySlice[k] = { rows: [...rows.keys()].sort((a, b) => a - b), xs: rows };
  }
  structure.crossings = bySlice;
  return bySlice;
}

// Toggle positions (image "across" coordinates) of a structure on each slice of a coronal
// (row index) or sagittal (column index) image.
function planeToggles(structure, plane, index, n) {
  const bySlice = crossings(structure), toggles = new Array(n);
  for (let s = 0; s < n; s++) {
    const slice = bySlice[s];
    const list = [];
    if (slice) {
      if (plane === "coronal") {
        for (const x of slice.xs.get(index) || []) list.push(x + 0.5);
      } else {
        let inside = false, start = 0, last = -2;
        for (const y of slice.rows) {
          const xs = slice.xs.get(y);
          let count = 0;
          for (const x of xs) { if (x < index) count++; else break; }
          const now = count % 2 === 1;
          if (inside && (y !== last + 1 || !now)) { list.push(start, last + 1); inside = false; }
          if (now && !inside) { inside = true; start = y; }
          last = y;
        }
        if (inside) list.push(start, last + 1);
      }
    }
    toggles[s] = list;
  }
  return toggles;
}

// Outline of even-odd toggles per image row band: vertical edges at each toggle, horizontal
// edges where two adjacent bands differ (the toggles of both, merged, in pairs).
function outlinePath(ctx, toggles, t) {
  const n = toggles.length;
  for (let v = 0; v < n; v++) {
    for (const u of toggles[v]) { ctx.moveTo(t.ox + u * t.sx, t.oy + v * t.sy); ctx.lineTo(t.ox + u * t.sx, t.oy + (v + 1) * t.sy); }
  }
  for (let v = 0; v <= n; v++) {
    const merged = [...(v > 0 ? toggles[v - 1] : []), ...(v < n ? toggles[v] : [])].sort((a, b) => a - b);
    for (let i = 0; i + 1 < merged.length; i += 2) {
      if (merged[i + 1] > merged[i]) { ctx.moveTo(t.ox + merged[i] * t.sx, t.oy + v * t.sy); ctx.lineTo(t.ox + merged[i + 1] * t.sx, t.oy + v * t.sy); }
    }
  }
}

function structurePath(ctx, structure, plane, index, t, g) {
  ctx.beginPath();
  if (plane === "axial") {
    for (const p of structure.slices[index] || []) {
      ctx.moveTo(t.ox + (p[1] + 0.5) * t.sx, t.oy + (p[0] + 0.5) * t.sy);
      for (let i = 2; i < p.length; i += 2) ctx.lineTo(t.ox + (p[i + 1] + 0.5) * t.sx, t.oy + (p[i] + 0.5) * t.sy);
      ctx.closePath();
    }
  } else {
    outlinePath(ctx, planeToggles(structure, plane, index, g.height), t);
  }
}

function renderViewer() {
  if (!viewer.meta) return;
  const started = performance.now();
  const canvas = $("#viewer-canvas");
  const plane = viewer.plane, index = viewer.index[plane];
  const g = planeGeometry(plane);
  if (!viewer.offscreen) viewer.offscreen = document.createElement("canvas");
  const off = viewer.offscreen;
  if (off.width !== g.width || off.height !== g.height || !viewer.image) {
    off.width = g.width; off.height = g.height;
    viewer.image = off.getContext("2d").createImageData(g.width, g.height);
    viewer.pixels = new Uint32Array(viewer.image.data.buffer);
  }
  fillPlaneImage(plane, index, viewer.pixels);
  off.getContext("2d").putImageData(viewer.image, 0, 0);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.fillStyle = "#000"; ctx.fillRect(0, 0, canvas.width, canvas.height);
  const t = viewTransform(canvas, g);
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(off, t.ox, t.oy, g.width * t.sx, g.height * t.sy);
  ctx.lineJoin = "round";
  drawDose(ctx, plane, index, t, g, canvas);
  for (const s of viewer.structures) {
    if (!s.visible || (s.source === "approved" && !viewer.isDose && !viewer.showApproved)) continue;
    structurePath(ctx, s, plane, index, t, g);
    // A dark halo under the colour keeps every contour visible on bone and on soft tissue.
    ctx.setLineDash(dashed(s) ? [5, 4] : []);
    ctx.strokeStyle = "rgba(0,0,0,0.85)"; ctx.lineWidth = s.flag === "review" ? 4.5 : 3.5; ctx.stroke();
    ctx.strokeStyle = s.css; ctx.lineWidth = s.flag === "review" ? 2.5 : 1.5; ctx.stroke();
  }
  ctx.setLineDash([]);
  const elapsed = performance.now() - started;
  viewer.renderMs.push(elapsed);
  if (viewer.renderMs.length > 200) viewer.renderMs.shift();
  showOrientation(plane);
  canvas.dataset.rendered = plane + ":" + index;
  canvas.dataset.renderMs = elapsed.toFixed(2);
  $("#viewer-slice").textContent = plane + " " + (index + 1) + "/" + viewer.meta.shape[PLANE_AXES[plane].cut] + " · " + slicePosition(plane, index);
  showPosition();
}

// Patient LPS mm of a voxel (slice, row, column; fractional allowed).
function lps(voxel) {
  const a = viewer.meta.affine;
  return [0, 1, 2].map((i) => a[i][0] * voxel[0] + a[i][1] * voxel[1] + a[i][2] * voxel[2] + a[i][3]);
}

function slicePosition(plane, index) {
  const centre = viewer.meta.shape.map((n) => (n - 1) / 2);
  centre[PLANE_AXES[plane].cut] = index;
  const p = lps(centre);
  const axis = { axial: ["z", 2], coronal: ["y", 1], sagittal: ["x", 0] }[plane];
  return axis[0] + " = " + p[axis[1]].toFixed(1) + " mm";
}

function showPosition() {
  const out = $("#viewer-position");
  if (!viewer.mouse || !viewer.meta) { out.textContent = ""; return; }
  const canvas = $("#viewer-canvas"), g = planeGeometry(viewer.plane), t = viewTransform(canvas, g);
  const u = (viewer.mouse.x - t.ox) / t.sx - 0.5, v = (viewer.mouse.y - t.oy) / t.sy - 0.5;
  if (u < -0.5 || v < -0.5 || u > g.width - 0.5 || v > g.height - 0.5) { out.textContent = ""; return; }
  const axes = PLANE_AXES[viewer.plane], voxel = [0, 0, 0];
  voxel[axes.cut] = viewer.index[viewer.plane]; voxel[axes.across] = u; voxel[axes.down] = v;
  const [x, y, z] = lps(voxel);
  const [, R, C] = viewer.meta.shape, at = voxel.map(Math.round);
  const value = viewer.hu[at[0] * R * C + at[1] * C + at[2]];
  out.textContent = "LPS " + x.toFixed(1) + ", " + y.toFixed(1) + ", " + z.toFixed(1) + " mm · " + value + " HU";
}

function canvasPoint(event) {
  const canvas = $("#viewer-canvas"), box = canvas.getBoundingClientRect();
  return { x: (event.clientX - box.left) * (canvas.width / box.width), y: (event.clientY - box.top) * (canvas.height / box.height) };
}

function zoomBy(factor) { viewer.zoom = Math.min(16, Math.max(0.5, viewer.zoom * factor)); scheduleRender(); }

// Solid or dashed: rtcontour's own solid and the approved set dashed on a contour job; on a
// dose job the approved set it used is solid and what it borrowed from rtcontour dashed.
function dashed(s) { return viewer.isDose ? s.source === "borrowed" : s.source === "approved"; }

// Orientation letters on the four edges (the canonical grid: see PLANE_AXES).
const ORIENTATION = {
  axial: { top: "A", bottom: "P", left: "R", right: "L" },
  coronal: { top: "S", bottom: "I", left: "R", right: "L" },
  sagittal: { top: "S", bottom: "I", left: "A", right: "P" },
};
const DIRECTION_NAMES = { A: "anterior", P: "posterior", R: "patient right", L: "patient left", S: "superior", I: "inferior" };

function showOrientation(plane) {
  for (const node of document.querySelectorAll("#viewer-stage .orient")) {
    const letter = ORIENTATION[plane][node.dataset.edge];
    if (node.textContent !== letter) { node.textContent = letter; node.title = DIRECTION_NAMES[letter]; }
  }
}

// The body's box in voxels (canonical (slice, row, column), [low, high) per axis): voxels
// above -400 HU, so the view opens on the patient, not the whole reconstructed field.
function bodyBox() {
  const [S, R, C] = viewer.meta.shape, hu = viewer.hu;
  const low = [S, R, C], high = [0, 0, 0];
  for (let s = 0; s < S; s++) {
    for (let r = 0; r < R; r++) {
      const base = (s * R + r) * C;
      let first = -1, last = -1;
      for (let c = 0; c < C; c++) if (hu[base + c] > -400) { if (first < 0) first = c; last = c; }
      if (first < 0) continue;
      if (s < low[0]) low[0] = s; if (s + 1 > high[0]) high[0] = s + 1;
      if (r < low[1]) low[1] = r; if (r + 1 > high[1]) high[1] = r + 1;
      if (first < low[2]) low[2] = first; if (last + 1 > high[2]) high[2] = last + 1;
    }
  }
  return high[0] > low[0] ? { low, high } : null;
}

// Zoom and pan so the body (plus a margin) fills the canvas; never beyond the whole image.
function fitToBody(plane) {
  viewer.zoom = 1; viewer.panX = 0; viewer.panY = 0;
  if (!viewer.body || !viewer.meta) return;
  const canvas = $("#viewer-canvas"), g = planeGeometry(plane), axes = PLANE_AXES[plane];
  const margin = 0.08;
  const u0 = viewer.body.low[axes.across], u1 = viewer.body.high[axes.across];
  const v0 = viewer.body.low[axes.down], v1 = viewer.body.high[axes.down];
  const bw = (u1 - u0) * (1 + 2 * margin), bh = (v1 - v0) * (1 + 2 * margin);
  const fit = Math.min(canvas.width / (g.width * g.acrossMm), canvas.height / (g.height * g.downMm));
  const zoom = Math.min(canvas.width / (bw * g.acrossMm * fit), canvas.height / (bh * g.downMm * fit));
  viewer.zoom = Math.min(16, Math.max(1, zoom));
  const sx = fit * viewer.zoom * g.acrossMm, sy = fit * viewer.zoom * g.downMm;
  viewer.panX = (g.width / 2 - (u0 + u1) / 2) * sx;
  viewer.panY = (g.height / 2 - (v0 + v1) / 2) * sy;
}

// ---- dose overlay --------------------------------------------------------------------
// The dose grid (uint16 cGy, canonical order) lies on the CT: dose voxel (i, j, k) is at CT
// voxel origin_index + step * (i, j, k). Drawn as a colour wash from 20 % of the highest
// prescription, with isodose lines at each prescription.
// White first: unlike a structure's colour, and seen on the wash (with a dark halo).
const ISODOSE_COLOURS = ["#ffffff", "#ffe600", "#00ffd0", "#ff66ff"];

function makeDose(meta, buffer) {
  const cgy = new Uint16Array(buffer);
  if (cgy.length !== meta.shape[0] * meta.shape[1] * meta.shape[2]) throw new Error("dose size does not match its shape");
  const levels = [...new Set(Object.values(meta.prescriptions_gy || {}).map(Number))].sort((a, b) => b - a);
  const reference = levels.length ? levels[0] : Math.max(meta.max_gy, 1);
  return { meta, cgy, levels, low: 0.2 * reference, high: Math.max(1.05 * reference, 0.2 * reference + 1), lut: doseLut(), planeKey: "", plane: null };
}

// 256 RGBA (little-endian Uint32) colours, blue -> cyan -> green -> yellow -> red, half opaque.
function doseLut() {
  const lut = new Uint32Array(256);
  const stops = [[0, [0, 60, 255]], [0.35, [0, 220, 255]], [0.55, [40, 230, 40]], [0.75, [255, 230, 0]], [1, [255, 20, 0]]];
  for (let i = 0; i < 256; i++) {
    const t = i / 255;
    let k = 0;
    while (k < stops.length - 2 && t > stops[k + 1][0]) k++;
    const [t0, c0] = stops[k], [t1, c1] = stops[k + 1];
    const w = Math.min(1, Math.max(0, (t - t0) / (t1 - t0)));
    const [r, g, b] = c0.map((v, j) => Math.round(v + (c1[j] - v) * w));
    lut[i] = (115 << 24) | (b << 16) | (g << 8) | r;
  }
  return lut;
}

// For CT voxel indices 0..n-1 along canonical axis ``axis``: the two dose voxels each lies
// between and the weight of the second (-1: outside the dose grid, no dose).
function doseAxis(axis, n) {
  const m = viewer.dose.meta, size = m.shape[axis];
  const first = new Int32Array(n), weight = new Float32Array(n);
  for (let t = 0; t < n; t++) {
    const f = (t - m.origin_index[axis]) / m.step[axis];
    if (f < -0.5 || f > size - 0.5) { first[t] = -1; continue; }
    const clamped = Math.min(size - 1, Math.max(0, f));
    const i0 = Math.min(size - 2, Math.floor(clamped));
    first[t] = Math.max(0, i0);
    weight[t] = size > 1 ? clamped - first[t] : 0;
  }
  return { first, weight };
}

// Dose in Gy at each pixel of a plane image (trilinear between dose voxels), cached per image.
function planeDose(plane, index, g) {
  const d = viewer.dose, key = plane + ":" + index;
  if (d.planeKey === key) return d.plane;
  const axes = PLANE_AXES[plane], shape = viewer.meta.shape, [, DR, DC] = d.meta.shape;
  const strides = [DR * DC, DC, 1];
  const cut = doseAxis(axes.cut, shape[axes.cut]), across = doseAxis(axes.across, g.width), down = doseAxis(axes.down, g.height);
  const out = new Float32Array(g.width * g.height);
  const k = cut.first[index];
  if (k >= 0) {
    const kw = cut.weight[index], ks = strides[axes.cut], as = strides[axes.across], ds = strides[axes.down];
    const cgy = d.cgy, n0 = d.meta.shape[axes.across] > 1 ? as : 0, m0 = d.meta.shape[axes.down] > 1 ? ds : 0, k0 = d.meta.shape[axes.cut] > 1 ? ks : 0;
    for (let v = 0; v < g.height; v++) {
      const j = down.first[v];
      if (j < 0) continue;
      const jw = down.weight[v];
      for (let u = 0; u < g.width; u++) {
        const i = across.first[u];
        if (i < 0) continue;
        const iw = across.weight[u];
        const base = k * ks + j * ds + i * as;
        const a = cgy[base] * (1 - iw) + cgy[base + n0] * iw, b = cgy[base + m0] * (1 - iw) + cgy[base + m0 + n0] * iw;
        const c = cgy[base + k0] * (1 - iw) + cgy[base + k0 + n0] * iw, e = cgy[base + k0 + m0] * (1 - iw) + cgy[base + k0 + m0 + n0] * iw;
        out[v * g.width + u] = ((a * (1 - jw) + b * jw) * (1 - kw) + (c * (1 - jw) + e * jw) * kw) / 100;
      }
    }
  }
  d.planeKey = key; d.plane = out;
  return out;
}

function drawDose(ctx, plane, index, t, g, canvas) {
  const d = viewer.dose;
  canvas.dataset.dosePixels = "0";
  if (!d || (!viewer.showDose && !viewer.showIsodose)) return;
  const values = planeDose(plane, index, g);
  if (viewer.showDose) {
    if (!viewer.doseCanvas) viewer.doseCanvas = document.createElement("canvas");
    const off = viewer.doseCanvas;
    if (off.width !== g.width || off.height !== g.height) { off.width = g.width; off.height = g.height; }
    const offCtx = off.getContext("2d"), image = offCtx.createImageData(g.width, g.height);
    const pixels = new Uint32Array(image.data.buffer), scale = 255 / (d.high - d.low);
    let shown = 0;
    for (let i = 0; i < values.length; i++) {
      const v = values[i];
      if (v < d.low) continue;
      pixels[i] = d.lut[Math.min(255, Math.round((v - d.low) * scale))];
      shown++;
    }
    offCtx.putImageData(image, 0, 0);
    ctx.drawImage(off, t.ox, t.oy, g.width * t.sx, g.height * t.sy);
    canvas.dataset.dosePixels = String(shown);
  }
  if (viewer.showIsodose) {
    d.levels.forEach((level, n) => {
      isodosePath(ctx, values, g.width, g.height, level, t);
      ctx.setLineDash([]);
      ctx.strokeStyle = "rgba(0,0,0,0.8)"; ctx.lineWidth = 3.5; ctx.stroke();
      ctx.strokeStyle = ISODOSE_COLOURS[n % ISODOSE_COLOURS.length]; ctx.lineWidth = 1.8; ctx.stroke();
    });
  }
}

// Marching squares over pixel centres: the line where the dose crosses ``level`` Gy.
function isodosePath(ctx, values, w, h, level, t) {
  ctx.beginPath();
  const px = (u) => t.ox + (u + 0.5) * t.sx, py = (v) => t.oy + (v + 0.5) * t.sy;
  for (let v = 0; v < h - 1; v++) {
    for (let u = 0; u < w - 1; u++) {
      const a = values[v * w + u], b = values[v * w + u + 1], c = values[(v + 1) * w + u + 1], e = values[(v + 1) * w + u];
      const ia = a >= level, ib = b >= level, ic = c >= level, ie = e >= level;
      if (ia === ib && ib === ic && ic === ie) continue;
      const points = [];
      if (ia !== ib) points.push(u + (level - a) / (b - a), v);
      if (ib !== ic) points.push(u + 1, v + (level - b) / (c - b));
      if (ie !== ic) points.push(u + (level - e) / (c - e), v + 1);
      if (ia !== ie) points.push(u, v + (level - a) / (e - a));
      for (let i = 0; i + 3 < points.length; i += 4) {
        ctx.moveTo(px(points[i]), py(points[i + 1]));
        ctx.lineTo(px(points[i + 2]), py(points[i + 3]));
      }
    }
  }
}

function buildDoseLegend() {
  const box = $("#viewer-dose-legend");
  clear(box);
  const d = viewer.dose;
  box.hidden = !d;
  if (!d) return;
  const bar = el("div", { className: "dose-bar", role: "img", "aria-label": "dose colour scale" });
  const stops = [];
  for (let i = 0; i <= 8; i++) {
    const value = d.lut[Math.round((i / 8) * 255)];
    stops.push("rgb(" + (value & 255) + "," + ((value >> 8) & 255) + "," + ((value >> 16) & 255) + ")");
  }
  bar.style.background = "linear-gradient(to right, " + stops.join(", ") + ")";
  box.append(el("div", { className: "dose-legend-title" }, "Predicted dose (Gy)"), bar,
    el("div", { className: "dose-bar-ticks" }, el("span", {}, d.low.toFixed(0)), el("span", {}, ((d.low + d.high) / 2).toFixed(0)), el("span", {}, d.high.toFixed(0))));
  const list = el("ul", { className: "isodose-list" });
  const names = Object.entries(d.meta.prescriptions_gy || {});
  d.levels.forEach((level, n) => {
    const ptvs = names.filter(([, gy]) => Number(gy) === level).map(([name]) => name).join(", ");
    list.append(el("li", { "data-level": level }, el("span", { className: "line", style: { borderColor: ISODOSE_COLOURS[n % ISODOSE_COLOURS.length] } }),
      level + " Gy isodose" + (ptvs ? " (" + ptvs + " prescription)" : "")));
  });
  box.append(list, el("p", { className: "note" }, "Wash from " + d.low.toFixed(0) + " Gy (20 % of the prescription); max " + Number(d.meta.max_gy).toFixed(1) + " Gy."));
}

function setupViewer() {
  const canvas = $("#viewer-canvas"), stage = $("#viewer-stage");
  canvas.addEventListener("wheel", (event) => {
    event.preventDefault();
    if (!viewer.meta) return;
    if (event.ctrlKey) { zoomBy(event.deltaY < 0 ? 1.25 : 0.8); return; }
    if (event.deltaMode !== 0 || Math.abs(event.deltaY) >= WHEEL_STEP) { step(Math.sign(event.deltaY)); viewer.wheel = 0; return; }
    viewer.wheel += event.deltaY;
    if (Math.abs(viewer.wheel) >= WHEEL_STEP) { step(Math.sign(viewer.wheel)); viewer.wheel = 0; }
  }, { passive: false });
  stage.addEventListener("keydown", (event) => {
    if (!viewer.meta) return;
    const moves = { ArrowUp: -1, ArrowLeft: -1, ArrowDown: 1, ArrowRight: 1, PageUp: -10, PageDown: 10 };
    if (event.key in moves) { step(moves[event.key]); event.preventDefault(); }
    else if (event.key === "+" || event.key === "=") zoomBy(1.25);
    else if (event.key === "-") zoomBy(0.8);
  });
  canvas.addEventListener("contextmenu", (event) => event.preventDefault());
  canvas.addEventListener("mousedown", (event) => {
    stage.focus();
    viewer.drag = { button: event.button, x: event.clientX, y: event.clientY, width: viewer.width, level: viewer.level, panX: viewer.panX, panY: viewer.panY };
  });
  window.addEventListener("mouseup", () => { viewer.drag = null; });
  canvas.addEventListener("mousemove", (event) => {
    viewer.mouse = canvasPoint(event);
    const d = viewer.drag;
    if (d && d.button === 2) setWindow(d.width + (event.clientX - d.x) * 4, d.level - (event.clientY - d.y) * 2, null);
    else if (d && d.button === 0) { viewer.panX = d.panX + event.clientX - d.x; viewer.panY = d.panY + event.clientY - d.y; scheduleRender(); }
    else showPosition();
  });
  canvas.addEventListener("mouseleave", () => { viewer.mouse = null; showPosition(); });
  $("#viewer-slider").addEventListener("input", () => { viewer.index[viewer.plane] = Number($("#viewer-slider").value); scheduleRender(); });
  $("#viewer-width").addEventListener("input", () => setWindow(Number($("#viewer-width").value), viewer.level, null));
  $("#viewer-level").addEventListener("input", () => setWindow(viewer.width, Number($("#viewer-level").value), null));
  for (const button of document.querySelectorAll("#viewer-planes button")) button.addEventListener("click", () => setPlane(button.dataset.plane));
  $("#viewer-zoom-in").addEventListener("click", () => zoomBy(1.25));
  $("#viewer-zoom-out").addEventListener("click", () => zoomBy(0.8));
  $("#viewer-reset").addEventListener("click", () => { fitToBody(viewer.plane); scheduleRender(); });
  $("#viewer-dose").addEventListener("change", () => { viewer.showDose = $("#viewer-dose").checked; scheduleRender(); });
  $("#viewer-isodose").addEventListener("change", () => { viewer.showIsodose = $("#viewer-isodose").checked; scheduleRender(); });
  $("#viewer-approved").addEventListener("change", () => { viewer.showApproved = $("#viewer-approved").checked; scheduleRender(); });
  $("#viewer-all").addEventListener("click", () => { const on = !viewer.structures.every((s) => s.visible); for (const s of viewer.structures) s.visible = on; buildStructureList(); scheduleRender(); });
}

const FILE_PREFIXES = { RTSTRUCT: "RS", RTDOSE: "RD", SEG: "SEG" };

async function downloadOutput(kind) {
  $("#job-message").textContent = "";
  try {
    const response = await api("/api/jobs/" + encodeURIComponent(state.jobId) + "/outputs/" + encodeURIComponent(kind));
    const url = URL.createObjectURL(await response.blob());
    const named = /filename\*?=(?:UTF-8'')?"?([^";]+)"?/i.exec(response.headers.get("Content-Disposition") || "");
    const name = named ? decodeURIComponent(named[1]) : (FILE_PREFIXES[kind] || kind) + "_" + state.jobId + ".dcm";
    const link = el("a", { href: url, download: name });
    document.body.append(link); link.click(); link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
    $("#job-message").textContent = kind + " downloaded.";
  } catch (error) { $("#job-message").textContent = "Download failed: " + error.message; }
}

function download() { return downloadOutput(state.downloadKind || "RTSTRUCT"); }

async function retry() {
  try {
    await api("/api/jobs/" + encodeURIComponent(state.jobId) + "/retry", { method: "POST" });
    $("#job-message").textContent = "Job queued again.";
    refreshJob();
  } catch (error) { $("#job-message").textContent = "Retry failed: " + error.message; }
}

// ---- routing -------------------------------------------------------------------------
function route() {
  if (!state.token) { show("login"); return; }
  const match = location.hash.match(/^#\/jobs\/([0-9a-zA-Z]+)$/);
  if (match) {
    if (state.jobId !== match[1]) resetViewer();
    state.jobId = match[1];
    $("#job-message").textContent = "";
    $("#review-message").textContent = "";
    show("job");
    poll(refreshJob);
  } else {
    state.jobId = null;
    show("overview");
    $("#patient-filter").hidden = !allowed("clinician");
    state.tick = 0;
    poll(refreshOverview);
  }
}

document.addEventListener("DOMContentLoaded", async () => {
  $("#login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    $("#login-error").textContent = "";
    try {
      await login($("#token").value.trim());
      $("#token").value = "";
      route();
    } catch (error) {
      $("#login-error").textContent = error.status === 401 ? "That token is not valid." : "Sign-in failed: " + error.message;
    }
  });
  $("#logout").addEventListener("click", logout);
  $("#prev-page").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE_SIZE); refreshOverview(); });
  $("#next-page").addEventListener("click", () => { state.offset += PAGE_SIZE; refreshOverview(); });
  $("#filter-state").addEventListener("change", () => { state.offset = 0; refreshOverview(); });
  $("#awaiting-tile").addEventListener("click", () => {
    $("#filter-state").value = "awaiting_review";
    state.offset = 0;
    refreshOverview();
    $("#jobs-table").scrollIntoView({ block: "nearest" });
  });
  $("#filter-ae").addEventListener("change", () => { state.offset = 0; refreshOverview(); });
  $("#filter-patient").addEventListener("change", () => { state.offset = 0; refreshOverview(); });
  $("#download").addEventListener("click", download);
  $("#retry").addEventListener("click", retry);
  $("#approve").addEventListener("click", () => review("approve"));
  $("#reject").addEventListener("click", () => review("reject"));
  setupViewer();
  window.addEventListener("hashchange", route);
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) {
    state.token = saved;
    try { state.me = await apiJson("/api/me"); } catch (error) { state.token = null; }
  }
  route();
});
