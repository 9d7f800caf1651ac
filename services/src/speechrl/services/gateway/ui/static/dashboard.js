// The SpeechRL dashboard: polls the gateway's /v1/dashboard/* routes and draws plain SVG.
// No library and no build step; every element a test looks for carries a data-* attribute:
//   lease timeline  rect.segment[data-owner][data-role][data-fence][data-end], .expiry[data-kind="expire"][data-owner]
//   job charts      circle.point[data-series][data-step] (line charts), rect.bar[data-series][data-step]
//   job status      #job-status[data-status]
"use strict";

const POLL_MS = 1500;
const TOKEN_KEY = "speechrl-dashboard-token";
const SVG_NS = "http://www.w3.org/2000/svg";
const ROLE_COLOURS = {
  encoder: "#4e79a7", rollout: "#f28e2b", trainer: "#e15759", intelligibility: "#76b7b2", speaker: "#59a14f",
  token2wav: "#edc948", "token2wav-score": "#b07aa1", rules: "#9c755f",
};
const SPARE_COLOURS = ["#ff9da7", "#499894", "#d37295", "#8cd17d", "#86bcb6", "#fabfd2", "#b6992d", "#79706e"];
// A chart's series take these in order; the phases of a step keep the colour of who runs them.
const SERIES_COLOURS = ["#e15759", "#4e79a7", "#59a14f", "#f28e2b", "#b07aa1", "#76b7b2", "#edc948", "#9c755f"];
const PHASES = ["time/encode", "time/rollout", "time/score", "time/update", "time/sync"];
const PHASE_COLOURS = {
  "time/encode": ROLE_COLOURS.encoder, "time/rollout": ROLE_COLOURS.rollout, "time/score": ROLE_COLOURS.rules,
  "time/update": ROLE_COLOURS.trainer, "time/sync": "#b07aa1",
};

const state = {
  selectedJob: null,   // the job whose charts are shown
  rows: new Map(),     // job id -> metric rows, in step order
  windowS: 300,
  stopped: false,      // waiting for a token
};

class AuthNeeded extends Error {}

// ---------------------------------------------------------------------------------------- helpers

function colour(name) {
  if (ROLE_COLOURS[name]) return ROLE_COLOURS[name];
  let hash = 0;
  for (const ch of name) hash = (hash * 31 + ch.charCodeAt(0)) >>> 0;
  return SPARE_COLOURS[hash % SPARE_COLOURS.length];
}

function el(tag, attrs = {}, parent = null, text = null) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== null) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

function svg(tag, attrs = {}, parent = null, text = null) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== null) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

function fmt(value, digits = 2) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (Math.abs(value) >= 1000) return value.toFixed(0);
  return Number(value).toFixed(digits);
}

function mib(bytes) {
  return bytes < 0 ? "–" : (bytes / 2 ** 20).toFixed(1) + " MiB";
}

function ago(seconds) {
  const s = Math.max(0, Date.now() / 1000 - seconds);
  return s < 90 ? s.toFixed(0) + " s ago" : (s / 60).toFixed(0) + " min ago";
}

function fillRows(tbody, rows) {
  tbody.replaceChildren();
  for (const cells of rows) {
    const tr = el("tr", {}, tbody);
    for (const cell of cells) {
      const [text, cls] = Array.isArray(cell) ? cell : [cell, ""];
      el("td", cls ? { class: cls } : {}, tr, text);
    }
  }
}

// ---------------------------------------------------------------------------------------- the API

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  const reply = await fetch(path, Object.assign({}, options, { headers }));
  if (reply.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    askForToken(token ? "that token was refused" : "");
    throw new AuthNeeded();
  }
  const body = await reply.json().catch(() => ({}));
  if (!reply.ok) throw new Error(body.detail ? String(body.detail) : reply.status + " " + reply.statusText);
  return body;
}

function askForToken(message) {
  state.stopped = true;
  document.getElementById("token-form").hidden = false;
  document.getElementById("token-error").textContent = message;
  document.getElementById("token-input").focus();
  setConnection("error", "token needed");
}

function setConnection(kind, text) {
  const pill = document.getElementById("connection");
  pill.dataset.state = kind;
  pill.textContent = text;
}

// ---------------------------------------------------------------------------------------- services

function renderServices(data) {
  const rows = data.services.map((s) => {
    const states = Object.values(s.health);
    const ok = states.length > 0 && states.every((v) => v === "SERVING");
    const health = states.length ? states.join(", ") : "–";
    const lease = s.lease_device ? `${s.lease_device}${s.lease_held ? " (held)" : ""}` : "none";
    return [
      s.name, [s.error ? s.error : health, "health"], s.backend || "–", [s.model || "–", "wrap"], s.device || "–",
      s.residency || "–", lease, s.max_batch_size ? `${s.max_batch_size} / ${s.max_wait_ms} ms` : "–",
      [`${s.items_processed} (${s.items_failed})`, "num"], [fmt(s.throughput_items_s, 1), "num"],
      [s.latency_p50_ms === null ? "–" : `${fmt(s.latency_p50_ms, 0)} / ${fmt(s.latency_p95_ms, 0)} ms`, "num"],
      [fmt(s.mean_batch_size, 1), "num"], [fmt(s.queue_depth, 0), "num"], ok,
    ];
  });
  const tbody = document.querySelector("#services tbody");
  fillRows(tbody, rows.map((r) => r.slice(0, -1)));
  rows.forEach((r, i) => {
    const cell = tbody.children[i].children[1];
    cell.dataset.ok = String(r[r.length - 1]);
  });
}

// ---------------------------------------------------------------------------------------- lease

function renderGantt(box, device, sinceMs, nowMs) {
  const owners = [];
  for (const s of device.segments) if (!owners.includes(s.owner)) owners.push(s.owner);
  for (const e of device.expiries) if (!owners.includes(e.owner)) owners.push(e.owner);
  const label = 130, width = 900, lane = 18, top = 4, height = top + Math.max(owners.length, 1) * lane + 18;
  const plot = width - label - 8;
  const x = (ms) => label + ((ms - sinceMs) / (nowMs - sinceMs)) * plot;
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "gantt", "data-device": device.device }, box);
  owners.forEach((owner, i) => {
    svg("text", { x: 4, y: top + i * lane + 12 }, chart, owner.length > 20 ? owner.slice(0, 19) + "…" : owner);
    svg("line", { x1: label, x2: width - 8, y1: top + (i + 1) * lane, y2: top + (i + 1) * lane, class: "axis" }, chart);
  });
  for (const s of device.segments) {
    const i = owners.indexOf(s.owner);
    const x0 = x(s.start_ms), w = Math.max(1.5, x(s.end_ms) - x0);
    const rect = svg("rect", {
      class: "segment", x: x0, y: top + i * lane + 2, width: w, height: lane - 4, fill: colour(s.role), rx: 1,
      "data-owner": s.owner, "data-role": s.role, "data-fence": s.fence, "data-end": s.end,
      "data-start-ms": s.start_ms, "data-end-ms": s.end_ms,
    }, chart);
    svg("title", {}, rect, `${s.owner}, fence ${s.fence}: ${((s.end_ms - s.start_ms) / 1000).toFixed(3)} s, ${s.end}`);
  }
  for (const e of device.expiries) {
    const i = owners.indexOf(e.owner), cx = x(e.at_ms), cy = top + i * lane + lane / 2;
    const mark = svg("path", {
      class: "expiry", d: `M${cx - 4},${cy - 4}L${cx + 4},${cy + 4}M${cx - 4},${cy + 4}L${cx + 4},${cy - 4}`,
      "data-kind": "expire", "data-owner": e.owner, "data-fence": e.fence,
    }, chart);
    svg("title", {}, mark, `${e.owner} (fence ${e.fence}) expired: held ${(e.held_ms / 1000).toFixed(1)} s, found lapsed`);
  }
  const axisY = top + Math.max(owners.length, 1) * lane + 12;
  for (let k = 0; k <= 4; k++) {
    const ms = sinceMs + ((nowMs - sinceMs) * k) / 4;
    svg("text", { x: x(ms), y: axisY, "text-anchor": k === 0 ? "start" : k === 4 ? "end" : "middle" }, chart,
      k === 4 ? "now" : `-${((nowMs - ms) / 1000).toFixed(0)} s`);
  }
  const legend = el("div", { class: "legend" }, box);
  for (const role of [...new Set(device.segments.map((s) => s.role))]) {
    const item = el("span", { "data-role": role }, legend);
    el("i", {}, item).style.background = colour(role);
    item.appendChild(document.createTextNode(role));
  }
}

function renderDeviceSide(box, device) {
  const queue = device.queue.length ? device.queue.join(", ") : "empty";
  el("p", {}, box, `holder: ${device.holder || "free"}${device.holder ? " (fence " + device.fence + ")" : ""} · queue: ${queue}`);
  const stats = device.stats;
  el("p", { class: "muted" }, box, `since Redis start: ${stats.grants || 0} grants, ${stats.handoffs || 0} handoffs, ` +
    `${stats.expiries || 0} expiries, ${stats.skipped || 0} skipped waiters · in the window: ` +
    `${device.window_counts.grant} grants, ${device.window_counts.expire} expiries`);
  const table = el("table", { class: "percentiles" }, box);
  fillRows(el("tbody", {}, table), [
    ["", "p50", "p90", "p99", "max", "n"].map((t) => [t, "num"]),
    ...[["wait (ms)", device.wait_ms], ["hold (ms)", device.hold_ms]].map(([name, p]) =>
      [name, ...["p50", "p90", "p99", "max"].map((k) => [p[k] === null ? "–" : String(p[k]), "num"]), [String(p.count), "num"]]),
  ]);
  el("h4", {}, box, "device-memory ledger");
  const ledger = el("table", { class: "ledger" }, box);
  fillRows(el("tbody", {}, ledger), device.ledger.length ? device.ledger.map((e) => [
    e.owner, e.residency, [mib(e.weight_bytes), "num"], [e.allocated_bytes < 0 ? "–" : mib(e.allocated_bytes), "num"],
    ago(e.updated) + (e.stale ? " (stale)" : ""),
  ]) : [["no process has reported on this device"]]);
}

function renderLease(data) {
  document.getElementById("lease-error").textContent = data.error;
  const box = document.getElementById("devices");
  box.replaceChildren();
  if (!data.devices.length && !data.error) el("p", { class: "muted" }, box, "no device has been leased yet");
  for (const device of data.devices) {
    const row = el("div", { class: "device", "data-device": device.device }, box);
    el("h3", {}, row, device.device);
    renderGantt(el("div", {}, row), device, data.since_ms, data.now_ms);
    renderDeviceSide(el("div", {}, row), device);
  }
}

// ---------------------------------------------------------------------------------------- charts

function frame(box, rows, width, height) {
  box.replaceChildren();
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}` }, box);
  const steps = rows.map((r) => r.step);
  const [s0, s1] = [Math.min(...steps), Math.max(...steps)];
  const x = (step) => 44 + (s1 === s0 ? 0.5 : (step - s0) / (s1 - s0)) * (width - 54);
  svg("line", { x1: 44, x2: width - 10, y1: height - 18, y2: height - 18, class: "axis" }, chart);
  svg("text", { x: 44, y: height - 4 }, chart, `step ${s0}`);
  svg("text", { x: width - 10, y: height - 4, "text-anchor": "end" }, chart, `step ${s1}`);
  return { chart, x };
}

function lineChart(box, rows, series) {
  const width = 420, height = 160;
  const present = series.filter((name) => rows.some((r) => Number.isFinite(r[name])));
  if (!rows.length || !present.length) { box.replaceChildren(el("p", { class: "muted" }, null, "no steps yet")); return; }
  const { chart, x } = frame(box, rows, width, height);
  const values = present.flatMap((name) => rows.map((r) => r[name]).filter(Number.isFinite));
  let [lo, hi] = [Math.min(...values), Math.max(...values)];
  if (lo === hi) { lo -= 0.5; hi += 0.5; }
  const y = (v) => 8 + (1 - (v - lo) / (hi - lo)) * (height - 34);
  svg("text", { x: 40, y: 12, "text-anchor": "end" }, chart, fmt(hi));
  svg("text", { x: 40, y: height - 22, "text-anchor": "end" }, chart, fmt(lo));
  const legend = el("div", { class: "legend" }, box);
  for (const [index, name] of present.entries()) {
    const item = el("span", { "data-series": name }, legend);
    el("i", {}, item).style.background = SERIES_COLOURS[index % SERIES_COLOURS.length];
    item.appendChild(document.createTextNode(name));
  }
  // The first series (the mean) is drawn last, on top of its components.
  [...present.entries()].reverse().forEach(([index, name]) => {
    const points = rows.filter((r) => Number.isFinite(r[name]));
    const hue = SERIES_COLOURS[index % SERIES_COLOURS.length];
    svg("polyline", { points: points.map((r) => `${x(r.step)},${y(r[name])}`).join(" "), fill: "none",
      stroke: hue, "stroke-width": index === 0 ? 2 : 1.2, "data-series": name }, chart);
    for (const r of points) {
      const dot = svg("circle", { class: "point", cx: x(r.step), cy: y(r[name]), r: index === 0 ? 2.5 : 1.8, fill: hue,
        "data-series": name, "data-step": r.step }, chart);
      svg("title", {}, dot, `${name} at step ${r.step}: ${fmt(r[name], 4)}`);
    }
  });
}

function phaseColour(key, index) {
  return PHASE_COLOURS[key] || SERIES_COLOURS[(index + 4) % SERIES_COLOURS.length];
}

function stackedBars(box, rows, keys) {
  const width = 420, height = 160;
  const present = keys.filter((k) => rows.some((r) => Number.isFinite(r[k])));
  if (!rows.length || !present.length) { box.replaceChildren(el("p", { class: "muted" }, null, "no steps yet")); return; }
  const { chart, x } = frame(box, rows, width, height);
  const total = (r) => present.reduce((sum, k) => sum + (Number.isFinite(r[k]) ? r[k] : 0), 0);
  const hi = Math.max(...rows.map(total)) || 1;
  const barW = Math.max(2, Math.min(24, (width - 60) / rows.length - 2));
  svg("text", { x: 40, y: 12, "text-anchor": "end" }, chart, fmt(hi));
  for (const r of rows) {
    let base = height - 18;
    for (const [index, k] of present.entries()) {
      const h = ((Number.isFinite(r[k]) ? r[k] : 0) / hi) * (height - 34);
      const bar = svg("rect", { class: "bar", x: x(r.step) - barW / 2, y: base - h, width: barW, height: h,
        fill: phaseColour(k, index), "data-series": k, "data-step": r.step }, chart);
      svg("title", {}, bar, `${k} at step ${r.step}: ${fmt(r[k], 3)} s`);
      base -= h;
    }
  }
  const legend = el("div", { class: "legend" }, box);
  for (const [index, k] of present.entries()) {
    const item = el("span", { "data-series": k }, legend);
    el("i", {}, item).style.background = phaseColour(k, index);
    item.appendChild(document.createTextNode(k.slice(5)));
  }
}

// ---------------------------------------------------------------------------------------- jobs

function renderJobs(data) {
  document.getElementById("jobs-error").textContent = data.error;
  const tbody = document.querySelector("#jobs tbody");
  tbody.replaceChildren();
  if (state.selectedJob === null && data.jobs.length) {
    const live = data.jobs.find((j) => j.status === "running") || data.jobs[0];
    state.selectedJob = live.id;
  }
  for (const job of data.jobs) {
    const tr = el("tr", { "data-job": job.id, "data-selected": String(job.id === state.selectedJob) }, tbody);
    el("td", {}, tr, job.id);
    el("td", {}, tr, job.kind);
    el("td", { class: "status", "data-status": job.status }, tr, job.status + (job.cancel && job.status === "running" ? " (cancelling)" : ""));
    el("td", { class: "num" }, tr, `${job.step} / ${job.total_steps}`);
    el("td", {}, tr, ago(job.updated));
    el("td", {}, tr);
    tr.addEventListener("click", () => { state.selectedJob = job.id; poll(); });
  }
}

async function refreshJob(jobId) {
  const rows = state.rows.get(jobId) || [];
  const since = rows.length ? rows[rows.length - 1].step : 0;
  const [job, fresh] = await Promise.all([
    api(`v1/dashboard/jobs/${encodeURIComponent(jobId)}`),
    api(`v1/dashboard/jobs/${encodeURIComponent(jobId)}/metrics?since_step=${since}`),
  ]);
  // A resumed job drops its steps past the checkpoint it resumes from: start its curves again.
  const kept = job.step < since ? [] : rows;
  state.rows.set(jobId, kept.concat(fresh));
  renderJob(job, state.rows.get(jobId));
}

function renderJob(job, rows) {
  document.getElementById("job-detail").hidden = false;
  document.getElementById("job-id").textContent = job.id;
  const status = document.getElementById("job-status");
  status.textContent = job.status + (job.cancel && job.status === "running" ? " (cancel asked)" : "");
  status.dataset.status = job.status;
  document.getElementById("cancel-job").hidden = !["queued", "running"].includes(job.status) || job.cancel;
  document.getElementById("job-error").textContent = job.error;
  const components = [...new Set(rows.flatMap((r) => Object.keys(r)))].filter((k) => k.startsWith("reward/")).sort();
  lineChart(document.getElementById("chart-reward"), rows, ["reward_mean", ...components]);
  lineChart(document.getElementById("chart-wer"), rows, ["wer", "insertions"]);
  lineChart(document.getElementById("chart-update"), rows, ["kl", "clip_fraction"]);
  const phases = [...PHASES, ...[...new Set(rows.flatMap((r) => Object.keys(r)))]
    .filter((k) => k.startsWith("time/") && !PHASES.includes(k)).sort()];
  stackedBars(document.getElementById("chart-time"), rows, phases);
  fillRows(document.querySelector("#checkpoints tbody"), job.checkpoints.length
    ? job.checkpoints.map((c) => [[String(c.step), "num"], [String(c.fence), "num"], ago(c.written), [c.path, "wrap"]])
    : [["none yet"]]);
  fillRows(document.querySelector("#job-memory tbody"), job.device_memory.length
    ? job.device_memory.map((m) => [m.device, m.residency, [mib(m.weight_bytes), "num"], ago(m.updated)])
    : [["nothing held (not running, or no lease)"]]);
}

async function cancelSelected() {
  const button = document.getElementById("cancel-job");
  button.disabled = true;
  try {
    await api(`v1/dashboard/jobs/${encodeURIComponent(state.selectedJob)}/cancel`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ reason: "dashboard" }),
    });
    await poll();
  } catch (err) {
    if (!(err instanceof AuthNeeded)) document.getElementById("job-error").textContent = "cancel failed: " + err.message;
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------------------------------- the loop

let timer = null;
let polling = false;

async function poll() {
  if (state.stopped || polling) return;
  polling = true;
  clearTimeout(timer);
  try {
    const [services, lease, jobs] = await Promise.all([
      api("v1/dashboard/services"), api(`v1/dashboard/lease?window_s=${state.windowS}`), api("v1/dashboard/jobs"),
    ]);
    renderServices(services);
    renderLease(lease);
    renderJobs(jobs);
    if (state.selectedJob !== null) await refreshJob(state.selectedJob);
    setConnection("live", "live");
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (err) {
    if (!(err instanceof AuthNeeded)) setConnection("error", "error: " + err.message);
  } finally {
    polling = false;
    if (!state.stopped) timer = setTimeout(poll, POLL_MS);
  }
}

async function start() {
  document.getElementById("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = document.getElementById("token-input").value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    document.getElementById("token-input").value = "";
    document.getElementById("token-form").hidden = true;
    document.getElementById("forget-token").hidden = false;
    state.stopped = false;
    poll();
  });
  document.getElementById("forget-token").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    document.getElementById("forget-token").hidden = true;
    askForToken("");
  });
  document.getElementById("cancel-job").addEventListener("click", cancelSelected);
  document.getElementById("window").addEventListener("change", (event) => {
    state.windowS = Number(event.target.value);
    poll();
  });
  try {
    const auth = await api("v1/dashboard/auth");
    if (auth.token_required && !sessionStorage.getItem(TOKEN_KEY)) { askForToken(""); return; }
    document.getElementById("forget-token").hidden = !auth.token_required;
  } catch (err) {
    setConnection("error", "error: " + err.message);
  }
  poll();
}

document.addEventListener("DOMContentLoaded", start);
