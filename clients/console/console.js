// flowport console: the REST API and the /events stream, as a user's browser calls them.
// The API key lives in sessionStorage only (gone with the tab); every value from the
// server is written with textContent, never as HTML.
"use strict";

const KEY = "flowport.apiKey";
const STATES = {
  "execution.started": "running",
  "execution.completed": "succeeded",
  "execution.failed": "failed",
  "execution.cancelled": "cancelled",
};
// google.rpc.Code names by number (the REST API sends a Status's code as a number).
const CODES = [
  "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
  "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
  "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
  "UNAUTHENTICATED",
];
const rows = new Map(); // execution_id -> <tr>
let stream = null;

const $ = (selector) => document.querySelector(selector);

function status(text, isError) {
  const el = $("#status");
  el.textContent = text;
  el.classList.toggle("error", Boolean(isError));
}

async function api(path) {
  const reply = await fetch(path, { headers: { "x-api-key": sessionStorage.getItem(KEY) || "" } });
  if (!reply.ok) {
    let message = reply.statusText;
    try { message = (await reply.json()).message || message; } catch (_) { /* not JSON */ }
    const error = new Error(`${reply.status}: ${message}`);
    error.status = reply.status;
    throw error;
  }
  return reply.json();
}

function shortState(state) {
  return (state || "").replace(/^STATE_/, "").toLowerCase();
}

function when(timestamp) {
  return timestamp ? timestamp.slice(0, 19).replace("T", " ") : "";
}

// Why an execution or a node failed, as the CLI prints it: `CODE [REASON]: message`
// (the reason from the status's ErrorInfo); "" when it did not fail.
function describeError(error) {
  if (!error) return "";
  const code = CODES[error.code || 0] || String(error.code);
  const info = (error.details || []).find((detail) => /[./]google\.rpc\.ErrorInfo$/.test(detail["@type"] || ""));
  const reason = info && info.reason ? ` [${info.reason}]` : "";
  return `${code}${reason}: ${error.message || ""}`;
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function setState(row, state) {
  const td = row.querySelector("td.state");
  td.textContent = state;
  td.className = `state state-${state}`;
  row.dataset.state = state;
}

function showExecution(execution, prepend) {
  let row = rows.get(execution.execution_id);
  if (!row) {
    row = document.createElement("tr");
    row.dataset.id = execution.execution_id;
    cell(row, execution.execution_id);
    cell(row, `${execution.workflow_id} v${execution.workflow_version || ""}`);
    cell(row, "", "state");
    cell(row, when(execution.create_time));
    cell(row, "", "duration");
    cell(row, "", "reason");
    row.addEventListener("click", () => timeline(execution.execution_id));
    const body = $("#executions tbody");
    if (prepend) body.prepend(row); else body.appendChild(row);
    rows.set(execution.execution_id, row);
  }
  setState(row, shortState(execution.state));
  row.querySelector("td.duration").textContent = execution.duration || "";
  const reason = row.querySelector("td.reason");
  reason.textContent = describeError(execution.error);
  reason.title = reason.textContent; // the whole text, where the cell cuts it
}

function showWorkflow(workflow) {
  const row = document.createElement("tr");
  cell(row, workflow.workflow_id);
  cell(row, String(workflow.version || ""));
  cell(row, String((workflow.nodes || []).length));
  cell(row, when(workflow.create_time));
  $("#workflows tbody").appendChild(row);
}

async function refreshExecution(id) {
  try {
    showExecution(await api(`/api/executions/${encodeURIComponent(id)}`), true);
  } catch (error) {
    status(`could not read ${id}: ${error.message}`, true);
  }
}

function onEvent(message) {
  const event = JSON.parse(message.data);
  if (!event.execution_id || !event.type.startsWith("execution.")) return;
  const row = rows.get(event.execution_id);
  const state = STATES[event.type];
  if (!row || state !== "running") {
    // New to this page, or ended: read it whole (workflow, duration).
    refreshExecution(event.execution_id);
  } else if (state) {
    setState(row, state);
  }
}

function follow() {
  if (stream) stream.close();
  // EventSource cannot send headers: the key rides as access_token, which
  // Envoy moves into x-api-key and strips from the path before logging.
  const key = encodeURIComponent(sessionStorage.getItem(KEY) || "");
  stream = new EventSource(`/events?types=execution.*&access_token=${key}`);
  stream.onmessage = (message) => {
    status("connected: live");
    onEvent(message);
  };
  stream.onopen = () => status("connected: live");
  stream.onerror = () => status("event stream interrupted; reconnecting…", true);
  // The stream starts with new events only: read the list once more when it
  // is surely subscribed, so nothing created in between is missing.
  setTimeout(loadExecutions, 1500);
}

async function loadExecutions() {
  try {
    const executions = await api("/api/executions?page_size=50");
    (executions.executions || []).reverse().forEach((e) => showExecution(e, !rows.has(e.execution_id)));
  } catch (error) {
    status(`cannot load executions: ${error.message}`, true);
  }
}

async function timeline(id) {
  const execution = await api(`/api/executions/${encodeURIComponent(id)}`);
  $("#timeline-section").hidden = false;
  $("#timeline-title").textContent = `${id} (${shortState(execution.state)})`;
  const failure = $("#timeline-error");
  failure.textContent = describeError(execution.error);
  failure.hidden = !failure.textContent;
  const box = $("#timeline");
  box.replaceChildren();
  const runs = execution.node_runs || [];
  const start = Date.parse(execution.start_time || execution.create_time);
  const end = Math.max(start + 1, ...runs.map((r) => Date.parse(r.end_time || r.start_time) || start));
  for (const run of runs) {
    const lane = document.createElement("div");
    lane.className = "lane";
    lane.title = describeError(run.error); // a failed node says why on hover
    const name = document.createElement("span");
    name.textContent = `${run.node_id} (${run.node_type})`;
    const track = document.createElement("div");
    track.className = "track";
    const bar = document.createElement("div");
    const from = Date.parse(run.start_time) || start;
    const to = Date.parse(run.end_time) || end;
    bar.className = `bar state-${shortState(run.state)}`;
    bar.style.left = `${(100 * (from - start)) / (end - start)}%`;
    bar.style.width = `${(100 * (to - from)) / (end - start)}%`;
    track.appendChild(bar);
    const took = document.createElement("span");
    took.textContent = run.duration || shortState(run.state);
    lane.append(name, track, took);
    box.appendChild(lane);
  }
  if (!runs.length) box.textContent = "no node has run yet";
}

async function connect() {
  status("connecting…");
  try {
    const [executions, workflows] = await Promise.all([
      api("/api/executions?page_size=50"),
      api("/api/workflows?page_size=50"),
    ]);
    rows.clear();
    $("#executions tbody").replaceChildren();
    $("#workflows tbody").replaceChildren();
    (executions.executions || []).forEach((e) => showExecution(e, false));
    (workflows.workflows || []).forEach(showWorkflow);
    $("#app").hidden = false;
    status("connected");
    follow();
  } catch (error) {
    $("#app").hidden = true;
    status(error.status === 401 ? "the API key was not accepted" : `cannot load: ${error.message}`, true);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#key-form").addEventListener("submit", (submitted) => {
    submitted.preventDefault();
    sessionStorage.setItem(KEY, $("#api-key").value.trim());
    $("#api-key").value = "";
    connect();
  });
  $("#forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    if (stream) stream.close();
    $("#app").hidden = true;
    status("not connected");
  });
  if (sessionStorage.getItem(KEY)) connect();
});
