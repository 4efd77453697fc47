// rtcontour dashboard: plain JS, no build step, no third-party code.
// Every value that comes from the API (hence from DICOM: series descriptions, AE titles, ROI
// names) is put into the page with textContent or attributes, never innerHTML.
"use strict";

const TOKEN_KEY = "rtcontour.token";
const POLL_MS = 3000;
const PAGE_SIZE = 25;
const ROLE_RANK = { viewer: 0, clinician: 1, admin: 2 };

const DESTINATION_EVERY = 10;  // C-ECHO the destinations every 10th poll (30 s)

const state = { token: null, me: null, offset: 0, timer: null, jobId: null, previewInfo: null, tick: 0 };

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
  if (state.tick++ % DESTINATION_EVERY === 0) refreshDestinations();
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
  $("#queue-depth").textContent = stats.queue_depth === null ? "unknown" : String(stats.queue_depth);
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
  if (canClinic && job.has_rtstruct && !state.previewInfo) loadPreviews(job.id);
  if (!canClinic) $("#preview-note").textContent = "Previews need the clinician role.";
  else if (!job.has_rtstruct) $("#preview-note").textContent = "No RTSTRUCT yet: nothing to preview.";
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

async function loadPreviews(id) {
  state.previewInfo = { loading: true };
  try {
    const info = await apiJson("/api/jobs/" + encodeURIComponent(id) + "/preview");
    if (id !== state.jobId) return;
    state.previewInfo = info;
    $("#preview-note").textContent = "ROIs: " + info.rois.map((r) => r.roi_name).join(", ");
    for (const figure of document.querySelectorAll(".previews figure")) {
      const plane = figure.dataset.plane;
      const slider = figure.querySelector("input");
      slider.max = String(info.planes[plane] - 1);
      slider.value = String(Math.floor(info.planes[plane] / 2));
      slider.oninput = () => showPlane(figure);
      showPlane(figure);
    }
  } catch (error) {
    state.previewInfo = null;
    $("#preview-note").textContent = "No preview: " + error.message;
  }
}

async function showPlane(figure) {
  const plane = figure.dataset.plane;
  const index = figure.querySelector("input").value;
  figure.querySelector("output").textContent = index;
  const wanted = plane + ":" + index;
  figure.dataset.wanted = wanted;
  try {
    const response = await api("/api/jobs/" + encodeURIComponent(state.jobId) + "/preview.png?plane=" + plane + "&index=" + index);
    const blob = await response.blob();
    if (figure.dataset.wanted !== wanted) return;  // the slider moved on
    const img = figure.querySelector("img");
    if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
    img.src = URL.createObjectURL(blob);
    img.dataset.loaded = wanted;
  } catch (error) {
    $("#preview-note").textContent = "Preview failed: " + error.message;
  }
}

const FILE_PREFIXES = { RTSTRUCT: "RS", RTDOSE: "RD" };

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
    state.jobId = match[1];
    state.previewInfo = null;
    for (const img of document.querySelectorAll(".previews img")) img.removeAttribute("src");
    $("#preview-note").textContent = "";
    $("#job-message").textContent = "";
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
  window.addEventListener("hashchange", route);
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) {
    state.token = saved;
    try { state.me = await apiJson("/api/me"); } catch (error) { state.token = null; }
  }
  route();
});
