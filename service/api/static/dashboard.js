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
      el("td", {}, link), el("td", {}, stateBadge(job.state)), patient, study, el("td", {}, job.calling_ae || ""),
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
  if (!allowed("admin")) {
    clear(body);
    $("#refusals-note").textContent = "The list of refusals needs the admin role.";
    return;
  }
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
  if (!allowed("admin")) {
    clear(body);
    $("#destinations-note").textContent = "Destination checks need the admin role.";
    return;
  }
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
  $("#job-id").textContent = job.id;
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
  field(fields, "Series UID", job.series_instance_uid);
  field(fields, "Images", job.n_instances);
  field(fields, "Model", job.model_name ? job.model_name + " " + (job.model_version || "") : null);
  field(fields, "Created", when(job.created_at));
  field(fields, "Finished", when(job.finished_at));
  field(fields, "Failure reason", job.failure_reason);
  field(fields, "Runs", job.attempts ? String(job.attempts) + (job.workers_lost
    ? ` (${job.workers_lost} lost with their worker, not counted as attempts)` : "") : null);
  field(fields, "Kind", job.kind === "dose" ? "dose prediction" : "contouring");
  field(fields, "Notes", job.notes && job.notes.length ? job.notes.join(" ") : null);
  field(fields, "CT from job", job.source_job_id);
  field(fields, "Route", job.route_name);
  field(fields, "Not contoured because", job.ignored_reason);
  field(fields, "Destinations", job.destinations ? job.destinations.join(", ") : null);
  field(fields, "RTSTRUCT UID", job.rtstruct_sop_instance_uid);
  const outputs = $("#outputs-table tbody");
  clear(outputs);
  for (const output of job.outputs) {
    const button = el("button", { type: "button", className: "download-output" }, "Download");
    button.disabled = !output.available || !allowed("clinician");
    button.onclick = () => downloadOutput(output.kind);
    outputs.append(el("tr", { "data-kind": output.kind }, el("td", {}, output.kind),
      el("td", { className: "uid" }, output.sop_instance_uid), el("td", {}, button)));
  }
  if (!job.outputs.length) outputs.append(el("tr", {}, el("td", { colSpan: 3 }, job.state === "ignored" ? "None: the series was not contoured." : "None yet.")));
  renderDose(job);
  renderQa(job);
  const structures = $("#structures-table tbody");
  clear(structures);
  for (const s of job.structures) {
    const colour = s.colour ? "rgb(" + s.colour.map(Number).join(",") + ")" : "transparent";
    structures.append(el("tr", {}, el("td", {}, el("span", { className: "swatch", style: { background: colour } })),
      el("td", {}, s.roi_name), el("td", {}, s.volume_cc === null ? "–" : Number(s.volume_cc).toFixed(2))));
  }
  const timings = $("#timings-table tbody");
  clear(timings);
  for (const [name, value] of Object.entries(job.timings)) {
    timings.append(el("tr", {}, el("th", {}, name.replace(/_s$/, "").replace("_", " ")), el("td", {}, value === null ? "–" : Number(value).toFixed(2))));
  }
  const canClinic = allowed("clinician");
  $("#download").hidden = !canClinic;
  $("#download").disabled = !job.has_rtstruct;
  $("#retry").hidden = !(canClinic && (job.state === "failed" || job.state === "send_failed"));
  renderReview(job, canClinic);
  if (canClinic && job.has_rtstruct && viewer.jobId !== job.id && !job.purged_at) loadViewer(job.id);
  if (!canClinic) $("#viewer-note").textContent = "The images need the clinician role.";
  else if (job.purged_at) $("#viewer-note").textContent = "The images were deleted by the retention policy.";
  else if (!job.has_rtstruct) $("#viewer-note").textContent = "No RTSTRUCT yet: nothing to show.";
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

function renderDose(job) {
  const panel = $("#dose-panel");
  const metrics = job.dose_metrics || [];
  panel.hidden = metrics.length === 0;
  if (panel.hidden) return;
  const body = $("#dose-table tbody");
  clear(body);
  const gy = (v) => (v === undefined || v === null ? "–" : Number(v).toFixed(1));
  metrics.forEach((m, i) => {
    const colour = DVH_COLOURS[i % DVH_COLOURS.length];
    body.append(el("tr", { "data-roi": m.roi_name },
      el("td", {}, el("span", { className: "swatch", style: { background: colour } })),
      el("td", {}, m.roi_name), el("td", {}, m.type), el("td", {}, gy(m.prescription_gy)),
      el("td", {}, gy(m.mean_gy)), el("td", {}, gy(m.max_gy)), el("td", {}, gy(m.d_99_gy)),
      el("td", {}, gy(m.d_95_gy)), el("td", {}, gy(m.d_1_gy)), el("td", {}, gy(m["d_0.1cc_gy"])),
      el("td", {}, m.from_rtcontour ? "rtcontour's contour" : "approved")));
  });
  drawDvh($("#dvh-chart"), metrics);
}

function drawDvh(container, metrics) {
  const width = 760, height = 260, left = 44, right = 12, top = 10, bottom = 30;
  const plotW = width - left - right, plotH = height - top - bottom;
  const maxDose = Math.max(1, ...metrics.map((m) => (m.dvh.length - 1) * m.dvh_step_gy));
  const chart = svg("svg", { viewBox: "0 0 " + width + " " + height, role: "img", "aria-label": "dose-volume histograms" });
  chart.append(svg("line", { x1: left, y1: top + plotH, x2: left + plotW, y2: top + plotH, class: "axis" }));
  chart.append(svg("line", { x1: left, y1: top, x2: left, y2: top + plotH, class: "axis" }));
  for (const [label, x, y, anchor] of [["100 %", left - 4, top + 4, "end"], ["0", left - 4, top + plotH + 4, "end"],
    [maxDose.toFixed(0) + " Gy", left + plotW, top + plotH + 18, "end"], ["dose", left + plotW / 2, top + plotH + 18, "middle"]]) {
    const t = svg("text", { x, y, class: "tick", "text-anchor": anchor }); t.textContent = label; chart.append(t);
  }
  metrics.forEach((m, i) => {
    const points = m.dvh.map((v, k) => (left + (k * m.dvh_step_gy / maxDose) * plotW).toFixed(1) + "," + (top + plotH - (v / 100) * plotH).toFixed(1));
    const line = svg("polyline", { points: points.join(" "), fill: "none", stroke: DVH_COLOURS[i % DVH_COLOURS.length], "stroke-width": 2, "data-roi": m.roi_name });
    const title = svg("title", {}); title.textContent = m.roi_name; line.append(title);
    chart.append(line);
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
};

function resetViewer() {
  Object.assign(viewer, { jobId: null, meta: null, hu: null, structures: [], index: {}, zoom: 1, panX: 0, panY: 0, image: null, mouse: null, renderMs: [] });
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
    const [ctResponse, contours] = await Promise.all([api(base + "ct"), apiJson(base + "contours")]);
    const buffer = await ctResponse.arrayBuffer();
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
    const [S, R, C] = meta.shape;
    viewer.index = { axial: Math.floor(S / 2), coronal: Math.floor(R / 2), sagittal: Math.floor(C / 2) };
    const soft = meta.windows[0];
    setWindow(soft.width, soft.level, soft.name);
    buildWindowControls(meta.windows);
    buildStructureList();
    $("#viewer-approved-toggle").hidden = !meta.has_approved;
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
    const line = el("span", { className: "line " + s.source, style: { borderColor: s.css } });
    const label = el("label", {}, box, line, s.roi_name, s.source === "approved" ? el("span", { className: "note" }, " approved") : null, flag ? " " : null, flag);
    list.append(el("li", { className: s.source === "approved" ? "approved" : "", "data-key": s.key }, label));
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
  viewer.zoom = 1; viewer.panX = 0; viewer.panY = 0;
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
  for (const s of viewer.structures) {
    if (!s.visible || (s.source === "approved" && !viewer.showApproved)) continue;
    structurePath(ctx, s, plane, index, t, g);
    const dashed = s.source === "approved";
    // A dark halo under the colour keeps every contour visible on bone and on soft tissue.
    ctx.setLineDash(dashed ? [5, 4] : []);
    ctx.strokeStyle = "rgba(0,0,0,0.85)"; ctx.lineWidth = s.flag === "review" ? 4.5 : 3.5; ctx.stroke();
    ctx.strokeStyle = s.css; ctx.lineWidth = s.flag === "review" ? 2.5 : 1.5; ctx.stroke();
  }
  ctx.setLineDash([]);
  const elapsed = performance.now() - started;
  viewer.renderMs.push(elapsed);
  if (viewer.renderMs.length > 200) viewer.renderMs.shift();
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
  $("#viewer-reset").addEventListener("click", () => { viewer.zoom = 1; viewer.panX = 0; viewer.panY = 0; scheduleRender(); });
  $("#viewer-approved").addEventListener("change", () => { viewer.showApproved = $("#viewer-approved").checked; scheduleRender(); });
  $("#viewer-all").addEventListener("click", () => { const on = !viewer.structures.every((s) => s.visible); for (const s of viewer.structures) s.visible = on; buildStructureList(); scheduleRender(); });
}

const FILE_PREFIXES = { RTSTRUCT: "RS", RTDOSE: "RD", SEG: "SEG" };

async function downloadOutput(kind) {
  $("#job-message").textContent = "";
  try {
    const response = await api("/api/jobs/" + encodeURIComponent(state.jobId) + "/outputs/" + encodeURIComponent(kind));
    const url = URL.createObjectURL(await response.blob());
    const link = el("a", { href: url, download: (FILE_PREFIXES[kind] || kind) + "_" + state.jobId + ".dcm" });
    document.body.append(link); link.click(); link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
    $("#job-message").textContent = kind + " downloaded.";
  } catch (error) { $("#job-message").textContent = "Download failed: " + error.message; }
}

function download() { return downloadOutput("RTSTRUCT"); }

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
