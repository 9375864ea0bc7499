// Mailyard Queue Viewer: plain JavaScript over the JSON API of hub/queue_viewer.py.
// Everything shown comes from the API; text from messages is only ever set with textContent.
// A viewer with a token answers 401/403 without it: the page then shows its logon form (and no
// data), keeps the token the person enters in sessionStorage (this tab only) and sends it as
// "Authorization: Bearer <token>" with every request.
"use strict";

const REFRESH_MS = 2000;
const TOKEN_KEY = "mailyard-viewer-token";
const MESSAGE_LIMIT = 1000;  // the API's default limit

const state = {
  queueFilter: "",
  queueSort: "",
  openQueue: null,       // identity of the queue whose messages are shown
  messageFilter: "",
  timer: null,
  running: null,         // the refresh in progress (a Promise)
  locked: false,         // the viewer refused us (401/403): the logon form is shown, nothing else
};

const $ = (sel, root = document) => root.querySelector(sel);

// region: helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function badge(status) {
  const s = status || "";
  return el("span", {class: "badge s-" + s.toLowerCase(), text: s});
}

function pad(n) { return String(n).padStart(2, "0"); }

function clock(date) { return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`; }

function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  if (isNaN(d)) return iso;
  const now = new Date();
  const sameDay = d.toDateString() === now.toDateString();
  return sameDay ? clock(d) : `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${clock(d)}`;
}

function untilText(iso) {
  if (!iso) return "";
  const seconds = Math.round((new Date(iso) - new Date()) / 1000);
  if (isNaN(seconds)) return "";
  if (seconds <= 0) return " (due)";
  if (seconds < 120) return ` (in ${seconds}s)`;
  if (seconds < 7200) return ` (in ${Math.round(seconds / 60)}m)`;
  return ` (in ${Math.round(seconds / 3600)}h)`;
}

function size(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

let noticeTimer = null;
function notice(text, bad = false) {
  const box = $("#notice");
  box.textContent = text;
  box.classList.toggle("bad", bad);
  box.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => { box.hidden = true; }, bad ? 10000 : 5000);
}

function authHeaders(headers = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers["Authorization"] = "Bearer " + token;
  return headers;
}

function isDenied(status) { return status === 401 || status === 403; }

// fetch() with the token; {resp} or {error} when the viewer cannot be reached.
async function send(method, path, init = {}) {
  try {
    return {resp: await fetch(path, {method, cache: "no-store", ...init, headers: authHeaders(init.headers)})};
  } catch (err) {
    return {error: `cannot reach the Queue Viewer: ${err.message}`};
  }
}

// A JSON request: {ok, status, data, denied}. A 401/403 shows the logon form (see lock).
async function api(method, path, body) {
  const init = {headers: {"Accept": "application/json"}};
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const sent = await send(method, path, init);
  if (sent.error) return {ok: false, status: 0, data: {error: sent.error}};
  const resp = sent.resp;
  let data;
  try { data = await resp.json(); } catch { data = {error: `${resp.status} ${resp.statusText}`}; }
  if (isDenied(resp.status)) {
    lock(resp.status, data.error);
    return {ok: false, status: resp.status, data, denied: true};
  }
  return {ok: resp.ok, status: resp.status, data};
}

function showFilterError(id, text) {
  const pre = $(id);
  pre.textContent = text || "";
  pre.hidden = !text;
}

function reportOutcome(result) {
  if (result.denied) return;  // the logon form says why
  const data = result.data || {};
  if (!result.ok && !data.done) {
    notice(data.error || `failed (${result.status})`, true);
    return;
  }
  const lines = (data.done || []).slice(0, 8).map(d => `${d.identity}: ${d.result}`);
  if ((data.done || []).length > 8) lines.push(`… and ${data.done.length - 8} more`);
  lines.push(`${data.count} affected`);
  for (const f of (data.failed || []).slice(0, 8)) lines.push(`error: ${f.identity}: ${f.error}`);
  notice(lines.join("\n"), (data.failed || []).length > 0);
}

// endregion

// region: queues

function queueButtons(q) {
  // What the queue is for comes with it (its kind): never read off the end of its name.
  const poison = q.kind === "poison";
  const unreachable = q.kind === "unreachable";
  const buttons = [];
  const add = (action, label, extra = {}) => buttons.push(el("button", {
    type: "button", "data-action": action, title: `${label} ${q.identity}`, text: label,
    onclick: (ev) => { ev.stopPropagation(); queueAction(action, q.identity, ev.currentTarget); },
    ...extra,
  }));
  if (!poison) {
    if (q.status === "Suspended") add("resume", "Resume");
    else add("suspend", "Suspend");
  }
  if (unreachable || (q.status === "Retry" && !poison)) add("resubmit", "Resubmit");
  if (!poison && !unreachable && q.status !== "Suspended") add("retry", "Retry");
  return buttons;
}

function queueCells(q) {
  return [
    el("td", {class: "identity"}, el("a", {href: "#", class: "open", text: q.identity,
      onclick: (ev) => { ev.preventDefault(); ev.stopPropagation(); openQueue(q.identity); }})),
    el("td", {class: "delivery-type", text: q.delivery_type}),
    el("td", {class: "status", "data-status": q.status, text: ""}, badge(q.status)),
    el("td", {class: "count num", text: q.message_count}),
    el("td", {class: "next-hop", text: q.next_hop_domain}),
    el("td", {class: "last-error", text: q.last_error}),
    el("td", {class: "next-retry", title: q.next_retry_time || "",
              text: q.next_retry_time ? when(q.next_retry_time) + untilText(q.next_retry_time) : ""}),
    el("td", {class: "actions"}, queueButtons(q)),
  ];
}

function renderQueues(rows) {
  const body = $("#queues tbody");
  const existing = new Map([...body.rows].map(tr => [tr.dataset.queue, tr]));
  const seen = new Set();
  for (const q of rows) {
    seen.add(q.identity);
    // next_retry_time changes what is shown ("in 40s") every second: part of the signature
    const signature = JSON.stringify(q) + untilText(q.next_retry_time);
    let tr = existing.get(q.identity);
    if (!tr) {
      tr = el("tr", {dataset: {queue: q.identity}, onclick: () => openQueue(q.identity)});
    }
    if (tr.dataset.signature !== signature) {
      tr.replaceChildren(...queueCells(q));
      tr.dataset.signature = signature;
      tr.dataset.status = q.status;
    }
    tr.classList.toggle("selected", q.identity === state.openQueue);
    body.appendChild(tr);  // keeps the server's order
  }
  for (const [identity, tr] of existing) if (!seen.has(identity)) tr.remove();
  $("#queues-empty").hidden = rows.length > 0;
  const total = rows.reduce((n, q) => n + q.message_count, 0);
  $("#queues-summary").textContent = `${rows.length} queue${rows.length === 1 ? "" : "s"}, ` +
    `${total} message${total === 1 ? "" : "s"}`;
}

async function loadQueues() {
  const params = new URLSearchParams();
  if (state.queueFilter) params.set("filter", state.queueFilter);
  if (state.queueSort) params.set("sort", state.queueSort);
  const result = await api("GET", "/api/queues?" + params);
  if (result.denied) return false;
  if (!result.ok) {
    showFilterError("#queue-filter-error", result.data.error);
    if (result.status === 400) {
      renderQueues([]);
      $("#queue-bulk").hidden = true;
    }
    return result.status !== 0;  // the viewer answered: the page is up to date with it
  }
  showFilterError("#queue-filter-error", "");
  $("#queue-bulk").hidden = !state.queueFilter;
  renderQueues(result.data);
  return true;
}

async function queueAction(action, identity, button) {
  const body = action === "resubmit"
    ? {action: "retry", queues: [identity], resubmit: true}
    : {action, queues: [identity]};
  if (button) button.disabled = true;
  reportOutcome(await api("POST", "/api/queues/actions", body));
  refreshNow();
}

async function bulkQueueAction(action) {
  if (!state.queueFilter) return;
  if (!window.confirm(`${action} every queue matching\n  ${state.queueFilter}\n?`)) return;
  reportOutcome(await api("POST", "/api/queues/actions", {action, filter: state.queueFilter}));
  refreshNow();
}

// endregion

// region: messages

function messageButtons(m) {
  const kind = m.queue_kind;  // its queue's kind, as for queueButtons
  const buttons = [];
  const add = (action, label, extra = {}) => buttons.push(el("button", {
    type: "button", "data-action": action, title: `${label}: ${m.identity}`, text: label,
    onclick: (ev) => messageAction(action, m.identity, ev.currentTarget), ...extra,
  }));
  const held = m.status === "Suspended" || m.status.startsWith("Pending") || kind === "poison";
  if (held) add("resume", "Resume");
  if (!held && kind !== "submission") add("suspend", "Suspend");
  add("remove", "Remove (NDR)", {class: "danger"});
  add("remove-silent", "Remove without NDR", {class: "danger"});
  if (m.status === "Suspended") {
    buttons.push(el("button", {type: "button", class: "export", "data-action": "export", text: "Export",
      title: `Export ${m.identity} (an .eml file)`, onclick: () => exportMessage(m.identity)}));
  }
  if (m.message_id) {
    buttons.push(el("button", {type: "button", class: "plain", "data-action": "track", text: "Track",
      onclick: () => track({message_id: m.message_id})}));
  }
  return buttons;
}

// Export-Message: fetched with the token (a plain link could not send it), saved as a file.
async function exportMessage(identity) {
  const sent = await send("GET", "/api/messages/export?identity=" + encodeURIComponent(identity));
  if (sent.error) { notice(sent.error, true); return; }
  const resp = sent.resp;
  if (!resp.ok) {
    let data;
    try { data = await resp.json(); } catch { data = {error: `${resp.status} ${resp.statusText}`}; }
    if (isDenied(resp.status)) lock(resp.status, data.error);
    else notice(data.error || `export failed (${resp.status})`, true);
    return;
  }
  const disposition = resp.headers.get("Content-Disposition") || "";
  const named = /filename="([^"]+)"/.exec(disposition);
  const url = URL.createObjectURL(await resp.blob());
  const link = el("a", {href: url, download: named ? named[1] : "message.eml", hidden: true});
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

function recipientList(m) {
  return el("ul", {class: "rcpts"}, m.recipients.map(r => el("li", {"data-recipient": r.address},
    el("span", {class: "address", text: r.address}), " ", badge(r.status),
    r.last_error ? el("span", {class: "rcpt-error", text: r.last_error}) : null)));
}

function renderMessages(rows) {
  const body = $("#messages tbody");
  const existing = new Map([...body.rows].map(tr => [tr.dataset.message, tr]));
  const seen = new Set();
  for (const m of rows) {
    seen.add(m.identity);
    const signature = JSON.stringify(m);
    let tr = existing.get(m.identity) || el("tr", {dataset: {message: m.identity}});
    if (tr.dataset.signature !== signature) {
      tr.replaceChildren(
        el("td", {class: "identity", text: m.identity}),
        el("td", {class: "from", text: m.from_address || "<>"}),
        el("td", {class: "status", "data-status": m.status}, badge(m.status)),
        el("td", {class: "size num", text: size(m.size)}),
        el("td", {class: "received", title: m.date_received || "", text: when(m.date_received)}),
        el("td", {class: "retries num", text: m.retry_count}),
        el("td", {class: "subject", text: m.subject}),
        el("td", {class: "recipients"}, recipientList(m),
           m.last_error ? el("span", {class: "rcpt-error", text: m.last_error}) : null),
        el("td", {class: "actions"}, messageButtons(m)),
      );
      tr.dataset.signature = signature;
      tr.dataset.status = m.status;
    }
    body.appendChild(tr);
  }
  for (const [identity, tr] of existing) if (!seen.has(identity)) tr.remove();
  $("#messages-empty").hidden = rows.length > 0;
  $("#messages-summary").textContent = rows.length >= MESSAGE_LIMIT
    ? `the first ${rows.length} messages (use a filter to see others)`
    : `${rows.length} message${rows.length === 1 ? "" : "s"}`;
}

async function loadMessages() {
  if (!state.openQueue) return true;
  const params = new URLSearchParams({queue: state.openQueue});
  if (state.messageFilter) params.set("filter", state.messageFilter);
  const result = await api("GET", "/api/messages?" + params);
  if (result.denied) return false;
  if (!result.ok) {
    showFilterError("#message-filter-error", result.data.error);
    if (result.status === 400 || result.status === 404) {  // a bad filter, or the queue is gone
      renderMessages([]);
      $("#message-bulk").hidden = true;
    }
    return false;
  }
  showFilterError("#message-filter-error", "");
  $("#message-bulk").hidden = !state.messageFilter;
  renderMessages(result.data);
  return true;
}

function openQueue(identity) {
  if (state.openQueue !== identity) {
    state.openQueue = identity;
    state.messageFilter = "";
    $("#message-filter").value = "";
    $("#messages tbody").replaceChildren();
  }
  $("#messages-queue").textContent = identity;
  $("#messages-section").hidden = false;
  for (const tr of $("#queues tbody").rows) tr.classList.toggle("selected", tr.dataset.queue === identity);
  refreshNow();
}

function closeMessages() {
  state.openQueue = null;
  $("#messages-section").hidden = true;
  for (const tr of $("#queues tbody").rows) tr.classList.remove("selected");
}

function messageBody(action, extra) {
  if (action === "remove-silent") return {action: "remove", ndr: false, ...extra};
  return {action, ...extra};
}

async function messageAction(action, identity, button) {
  if (action.startsWith("remove")) {
    const how = action === "remove" ? "and send an NDR to the sender" : "WITHOUT telling the sender";
    if (!window.confirm(`Remove ${identity} ${how}?`)) return;
  }
  if (button) button.disabled = true;
  reportOutcome(await api("POST", "/api/messages/actions", messageBody(action, {identities: [identity]})));
  refreshNow();
}

async function bulkMessageAction(action) {
  if (!state.messageFilter || !state.openQueue) return;
  const verb = {suspend: "Suspend", resume: "Resume", remove: "Remove (with NDR)",
                "remove-silent": "Remove WITHOUT NDR"}[action];
  if (!window.confirm(`${verb} every message of ${state.openQueue} matching\n  ${state.messageFilter}\n?`)) return;
  const body = messageBody(action, {filter: state.messageFilter, queue: state.openQueue});
  reportOutcome(await api("POST", "/api/messages/actions", body));
  refreshNow();
}

// endregion

// region: hubs and tracking

async function loadHubs() {
  const result = await api("GET", "/api/hubs");
  if (!result.ok) return false;
  const hubs = result.data.slice().sort((a, b) => a.site.localeCompare(b.site) || a.name.localeCompare(b.name));
  $("#hubs").replaceChildren(...hubs.map(h => el("a", {
    class: "hub" + (h.alive ? "" : " dead"), "data-hub": h.name, href: "#hub/" + encodeURIComponent(h.name),
    title: `${h.name} (${h.site}) on ${h.host}, pid ${h.pid}; heartbeat ${h.heartbeat_age_seconds}s ago` +
      (h.alive ? "" : " (dead)"),
    text: `${h.name} · ${h.site}`,
  })));
  return true;
}

async function track(query) {
  const form = $("#track-form");
  if (query) {
    for (const input of form.elements) if (input.name) input.value = query[input.name] || "";
  }
  const params = new URLSearchParams();
  for (const input of form.elements) if (input.name && input.value.trim()) params.set(input.name, input.value.trim());
  const result = await api("GET", "/api/track?" + params);
  const table = $("#track");
  if (result.denied) return;
  if (!result.ok) {
    showFilterError("#track-error", result.data.error);
    table.hidden = true;
    return;
  }
  showFilterError("#track-error", "");
  $("#track tbody").replaceChildren(...result.data.map(rec => el("tr", {"data-event": rec.event},
    el("td", {class: "time", title: rec.time, text: when(rec.time)}),
    el("td", {class: "event"}, el("span", {class: "badge", text: rec.event})),
    el("td", {text: rec.source}),
    el("td", {text: rec.server}),
    el("td", {text: rec.sender || "<>"}),
    el("td", {text: (rec.recipients || []).join(", ")}),
    el("td", {class: "error", text: (rec.recipient_status || []).join("; ")}),
    el("td", {text: rec.queue}),
    el("td", {text: rec.subject}),
  )));
  table.hidden = false;
  if (query) $("#track-section").scrollIntoView({behavior: "smooth"});
}

// endregion

// region: mail flow and queue shape

const FLOW_REFRESH_MS = 5000;
const SHAPE_SLOW_MS = 30000;  // by domain or sender reads every queued item: not every refresh
const RATE_SERIES = [
  ["received", "received (messages)", "#667085"],
  ["delivered", "delivered", "#12b76a"],
  ["deferred", "deferred", "#f79009"],
  ["failed", "failed", "#d92d20"],
];
const charts = {rates: null, depth: null, window: 0};

function sumSeries(tables, metric, length) {
  const out = new Array(length).fill(0);
  for (const table of tables) (table[metric] || []).forEach((n, i) => { out[i] += n; });
  return out;
}

function chartSize(id) {
  const box = $(id);
  return {width: Math.max(280, box.clientWidth || 600), height: 200};
}

function makeChart(id, series, data) {
  const opts = {
    ...chartSize(id),
    scales: {x: {time: true}},
    series: [{}, ...series.map(([, label, color]) => ({label, stroke: color, width: 2,
                                                        fill: series.length === 1 ? color + "22" : undefined}))],
    axes: [{stroke: "#667085"}, {stroke: "#667085", size: 50}],
    legend: {live: true},
  };
  $(id).replaceChildren();
  return new uPlot(opts, data, $(id));
}

function drawFlow(body) {
  const site = $("#flow-site").value;
  const siteSelect = $("#flow-site");
  const known = new Set([...siteSelect.options].map(o => o.value));
  for (const name of Object.keys(body.sites)) {
    if (!known.has(name)) siteSelect.append(el("option", {value: name, text: name}));
  }
  const tables = site ? (body.sites[site] ? [body.sites[site]] : []) : Object.values(body.sites);
  const xs = body.minutes;
  const rates = [xs, ...RATE_SERIES.map(([metric]) => sumSeries(tables, metric, xs.length))];
  const depth = [xs, sumSeries(tables, "depth", xs.length)];
  if (typeof uPlot === "undefined") {
    $("#flow-rates").textContent = "the chart library did not load";
  } else if (!charts.rates || charts.window !== xs.length) {
    charts.rates = makeChart("#flow-rates", RATE_SERIES, rates);
    charts.depth = makeChart("#flow-depth", [["depth", "queued", "#2459c7"]], depth);
    charts.window = xs.length;
  } else {
    charts.rates.setData(rates);
    charts.depth.setData(depth);
  }
  const total = (i) => rates[i].reduce((a, b) => a + b, 0);
  const summary = $("#flow-summary");
  summary.textContent = `${total(1)} received, ${total(2)} delivered, ${total(3)} deferred, ${total(4)} failed` +
    ` in the last ${describeWindow(xs.length)}`;
  Object.assign(summary.dataset, {received: total(1), delivered: total(2), deferred: total(3), failed: total(4),
                                  queued: depth[1][depth[1].length - 1] || 0});
  const hops = Object.entries(body.hops)
    .filter(([name]) => !site || name.startsWith(site + "\\"))
    .map(([name, t]) => ({name, delivered: sum(t.delivered), deferred: sum(t.deferred), failed: sum(t.failed),
                          queued: t.depth[t.depth.length - 1] || 0}))
    .filter(h => h.delivered + h.deferred + h.failed + h.queued > 0)
    .sort((a, b) => (b.delivered + b.deferred + b.failed) - (a.delivered + a.deferred + a.failed) ||
                    a.name.localeCompare(b.name));
  $("#flow-hops tbody").replaceChildren(...hops.map(h => el("tr", {"data-hop": h.name},
    el("td", {text: h.name}), el("td", {class: "num", text: h.delivered}),
    el("td", {class: "num" + (h.deferred ? " warn" : ""), text: h.deferred}),
    el("td", {class: "num" + (h.failed ? " bad" : ""), text: h.failed}),
    el("td", {class: "num", text: h.queued}))));
  $("#flow-hops").hidden = hops.length === 0;
}

function sum(values) { return (values || []).reduce((a, b) => a + b, 0); }

function describeWindow(minutes) {
  return minutes === 60 ? "hour" : minutes % 60 === 0 ? `${minutes / 60} hours` : `${minutes} minutes`;
}

async function loadFlow(force = false) {
  if (!force && Date.now() - (state.flowAt || 0) < FLOW_REFRESH_MS) return true;
  state.flowAt = Date.now();
  const result = await api("GET", "/api/flow?minutes=" + encodeURIComponent($("#flow-window").value));
  if (!result.ok) {
    if (!result.denied) $("#flow-summary").textContent = result.data.error || "the flow could not be read";
    return false;
  }
  drawFlow(result.data);
  return true;
}

async function loadShape(force = false) {
  const by = $("#shape-by").value;
  const every = by === "queue" ? FLOW_REFRESH_MS : SHAPE_SLOW_MS;
  if (!force && Date.now() - (state.shapeAt || 0) < every) return true;
  state.shapeAt = Date.now();
  const result = await api("GET", "/api/shape?by=" + encodeURIComponent(by));
  if (!result.ok) return false;
  const {columns, rows} = result.data;
  $("#shape thead tr").replaceChildren(el("th", {text: by === "queue" ? "Queue" : "Domain"}),
    ...columns.map(c => el("th", {class: "num", text: c})));
  $("#shape tbody").replaceChildren(...rows.map(row => el("tr", {"data-destination": row.destination,
      class: row.destination === "TOTAL" ? "total" : ""},
    el("td", {text: row.destination}),
    ...columns.map(c => el("td", {class: "num" + (row[c] && c !== "T" && columns.indexOf(c) > 3 ? " warn" : ""),
                                  text: row[c] || (c === "T" || row.destination === "TOTAL" ? "0" : "")})))));
  return true;
}

// endregion

// region: a hub's page and the connectors

function fact(name, value, attrs = {}) {
  return [el("dt", {text: name}), el("dd", {...attrs, text: value === undefined || value === null ? "" : value})];
}

async function loadHubPage(name) {
  const result = await api("GET", "/api/hubs/" + encodeURIComponent(name));
  $("#hub-name").textContent = name;
  if (!result.ok) {
    if (result.denied) return false;
    $("#hub-missing").textContent = result.data.error;
    $("#hub-missing").hidden = false;
    $("#hub-facts").replaceChildren();
    $("#hub-connectors tbody").replaceChildren();
    $("#hub-state").textContent = "";
    return result.status !== 0;
  }
  const h = result.data;
  $("#hub-missing").hidden = true;
  const stateText = h.alive ? `alive (heartbeat ${h.heartbeat_age_seconds}s ago)`
                            : `dead: silent for ${h.heartbeat_age_seconds}s`;
  const badgeEl = $("#hub-state");
  badgeEl.textContent = stateText;
  badgeEl.dataset.alive = h.alive ? "yes" : "no";
  badgeEl.className = "summary hub-state " + (h.alive ? "alive" : "dead");
  $("#hub-facts").replaceChildren(
    ...fact("Site", h.site), ...fact("Version", h.version), ...fact("Concurrency", h.concurrency),
    ...fact("In flight", h.in_flight, {"data-fact": "in-flight"}),
    ...fact("Back pressure", h.back_pressure + (h.under_pressure.length ? ` (${h.under_pressure.join(", ")})` : ""),
            {"data-fact": "back-pressure"}),
    ...fact("Host", `${h.host}, pid ${h.pid}`), ...fact("Started", when(h.started)),
    ...fact("Last heartbeat", when(h.heartbeat)));
  $("#hub-connectors tbody").replaceChildren(...h.receive_connectors.map(c => el("tr", {"data-connector": c.name},
    el("td", {text: c.name + (c.enabled ? "" : " (disabled)")}),
    el("td", {text: c.listening || (h.alive ? "not listening" : "")}),
    el("td", {text: c.bindings.join(", ")}),
    el("td", {text: c.permission_groups.join(", ")}),
    el("td", {class: "num sessions", text: c.open_sessions}),
    el("td", {class: "num", text: c.max_inbound_connection}))));
  return true;
}

function tlsText(c) {
  if (!c.require_tls) return "opportunistic";
  return "required" + (c.tls_auth_level ? ` (${c.tls_auth_level}${c.tls_domain ? ": " + c.tls_domain : ""})` : "");
}

async function loadConnectors() {
  const result = await api("GET", "/api/connectors");
  if (!result.ok) return false;
  const {send: sendRows, receive} = result.data;
  $("#send-connectors tbody").replaceChildren(...sendRows.map(c => el("tr", {"data-connector": c.name},
    el("td", {text: c.name}), el("td", {text: c.address_spaces.join(", ")}),
    el("td", {text: c.dns_routing ? "DNS (MX)" : "smart hosts: " + c.smart_hosts.join(", ")}),
    el("td", {text: c.source_sites.join(", ") + (c.source_edges.length ? ` (Edge: ${c.source_edges.join(", ")})` : "")}),
    el("td", {text: c.port}), el("td", {text: tlsText(c)}),
    el("td", {class: "num", text: size(c.max_message_size)}), el("td", {text: c.enabled ? "yes" : "no"}))));
  $("#receive-connectors tbody").replaceChildren(...receive.map(c => el("tr", {"data-connector": c.name},
    el("td", {text: c.name}), el("td", {text: c.sites.join(", ") || "every site"}),
    el("td", {text: c.bindings.join(", ")}), el("td", {text: c.remote_ip_ranges.join(", ")}),
    el("td", {text: c.permission_groups.join(", ")}), el("td", {text: c.auth_mechanisms.join(", ")}),
    el("td", {class: "num", text: size(c.max_message_size)}),
    el("td", {class: "num sessions", title: Object.entries(c.open_sessions.by_hub).map(([h, n]) => `${h}: ${n}`).join(", "),
              text: c.open_sessions.total}),
    el("td", {text: c.enabled ? "yes" : "no"}))));
  return true;
}

// endregion

// region: views

function currentView() {
  const hash = decodeURIComponent(location.hash.replace(/^#/, ""));
  if (hash === "connectors") return {view: "connectors"};
  if (hash.startsWith("hub/")) return {view: "hub", hub: hash.slice(4)};
  return {view: "overview"};
}

function showView() {
  const {view} = currentView();
  for (const section of document.querySelectorAll("main > section")) {
    const mine = section.classList.contains("view-" + view);
    section.hidden = !mine || (section.id === "messages-section" && !state.openQueue);
  }
  for (const link of document.querySelectorAll("nav.views a")) {
    link.classList.toggle("current", link.dataset.view === view);
  }
  state.flowAt = 0;
  state.shapeAt = 0;
}

// endregion

// region: logon

const DENIED_TEXT = {
  401: "This Queue Viewer needs its token.",
  403: "The Queue Viewer refused this token.",
};

// The viewer said 401 or 403 (or the person logged off): forget what was shown, stop refreshing,
// show the logon form with why.
function lock(status, detail) {
  const wasLocked = state.locked;
  state.locked = true;
  clearTimeout(state.timer);
  if (status === 403 || status === 0) sessionStorage.removeItem(TOKEN_KEY);  // wrong, or logged off
  $("#queues tbody").replaceChildren();
  $("#messages tbody").replaceChildren();
  $("#track tbody").replaceChildren();
  $("#track").hidden = true;
  $("#hubs").replaceChildren();
  for (const id of ["#flow-hops tbody", "#shape tbody", "#hub-facts", "#hub-connectors tbody",
                    "#send-connectors tbody", "#receive-connectors tbody"]) $(id).replaceChildren();
  for (const id of ["#queues-summary", "#messages-summary", "#flow-summary", "#hub-state"]) $(id).textContent = "";
  for (const chart of [charts.rates, charts.depth]) if (chart) chart.destroy();
  charts.rates = charts.depth = null;
  $("#queues-empty").hidden = true;
  closeMessages();
  $("#main").hidden = true;
  $("#logoff").hidden = true;
  $("#updated").textContent = "not logged on";
  const message = $("#logon-message");
  if (status === 0) {
    message.textContent = detail || "Logged off.";
    message.classList.remove("bad");
  } else {
    message.textContent = (DENIED_TEXT[status] || `Refused (${status}).`) + (detail ? ` (${detail})` : "") +
      (status === 403 ? " Enter the right one." : "");
    message.classList.add("bad");
  }
  $("#logon").hidden = false;
  if (!wasLocked) {
    $("#logon-token").value = "";
    $("#logon-token").focus();
  }
}

function unlock() {
  state.locked = false;
  $("#logon").hidden = true;
  $("#main").hidden = false;
  $("#logoff").hidden = !sessionStorage.getItem(TOKEN_KEY);
}

async function logon(ev) {
  ev.preventDefault();
  const given = $("#logon-token").value.trim();
  if (!given) return;
  sessionStorage.setItem(TOKEN_KEY, given);
  $("#logon-submit").disabled = true;
  try {
    const check = await api("GET", "/api/hubs");  // a small read: does the viewer take the token?
    if (check.denied) return;                      // lock() said why; the form stays
    if (!check.ok && check.status === 0) {
      const message = $("#logon-message");
      message.textContent = check.data.error;
      message.classList.add("bad");
      return;
    }
    $("#logon-token").value = "";
    unlock();
    refreshNow();
  } finally {
    $("#logon-submit").disabled = false;
  }
}

function logoff() {
  sessionStorage.removeItem(TOKEN_KEY);
  lock(0, "Logged off.");
}

// endregion

// region: refresh

async function refresh() {
  if (state.locked) return;
  const {view, hub} = currentView();
  const loads = [loadHubs()];
  if (view === "overview") loads.push(loadQueues(), loadMessages(), loadFlow(), loadShape());
  else if (view === "hub") loads.push(loadHubPage(hub));
  else loads.push(loadConnectors());
  const results = await Promise.all(loads);
  if (state.locked) return;
  if (results[1]) $("#updated").textContent = "updated " + clock(new Date());
  $("#logoff").hidden = !sessionStorage.getItem(TOKEN_KEY);
}

function schedule() {
  clearTimeout(state.timer);
  if ($("#live").checked && !state.locked) state.timer = setTimeout(refreshNow, REFRESH_MS);
}

async function refreshNow() {
  clearTimeout(state.timer);
  if (state.running) {  // one at a time; run again right after the current one
    state.again = true;
    return state.running;
  }
  state.running = refresh().catch(err => notice(String(err), true));
  await state.running;
  state.running = null;
  if (state.again) {
    state.again = false;
    return refreshNow();
  }
  schedule();
}

// endregion

function setSort(th) {
  const name = th.dataset.sort;
  const current = state.queueSort;
  state.queueSort = current === name ? "-" + name : current === "-" + name ? "" : name;
  for (const other of document.querySelectorAll("#queues th[data-sort]")) other.classList.remove("sorted-asc", "sorted-desc");
  if (state.queueSort) th.classList.add(state.queueSort.startsWith("-") ? "sorted-desc" : "sorted-asc");
  refreshNow();
}

function init() {
  $("#queue-filter-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.queueFilter = $("#queue-filter").value.trim();
    $("#queue-bulk").hidden = !state.queueFilter;
    refreshNow();
  });
  $("#queue-filter-clear").addEventListener("click", () => {
    $("#queue-filter").value = "";
    state.queueFilter = "";
    $("#queue-bulk").hidden = true;
    refreshNow();
  });
  for (const button of document.querySelectorAll("#queue-bulk button")) {
    button.addEventListener("click", () => bulkQueueAction(button.dataset.bulk));
  }
  $("#message-filter-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.messageFilter = $("#message-filter").value.trim();
    $("#message-bulk").hidden = !state.messageFilter;
    refreshNow();
  });
  $("#message-filter-clear").addEventListener("click", () => {
    $("#message-filter").value = "";
    state.messageFilter = "";
    $("#message-bulk").hidden = true;
    refreshNow();
  });
  for (const button of document.querySelectorAll("#message-bulk button")) {
    button.addEventListener("click", () => bulkMessageAction(button.dataset.bulk));
  }
  $("#messages-close").addEventListener("click", closeMessages);
  for (const th of document.querySelectorAll("#queues th[data-sort]")) th.addEventListener("click", () => setSort(th));
  $("#track-form").addEventListener("submit", (ev) => { ev.preventDefault(); track(); });
  $("#live").addEventListener("change", () => { if ($("#live").checked) refreshNow(); else clearTimeout(state.timer); });
  $("#logon-form").addEventListener("submit", logon);
  $("#logoff").addEventListener("click", logoff);
  $("#flow-site").addEventListener("change", () => { state.flowAt = 0; refreshNow(); });
  $("#flow-window").addEventListener("change", () => { state.flowAt = 0; refreshNow(); });
  $("#shape-by").addEventListener("change", () => { state.shapeAt = 0; refreshNow(); });
  window.addEventListener("hashchange", () => { showView(); refreshNow(); });
  window.addEventListener("resize", () => {
    for (const [chart, id] of [[charts.rates, "#flow-rates"], [charts.depth, "#flow-depth"]]) {
      if (chart) chart.setSize(chartSize(id));
    }
  });
  showView();
  refreshNow();  // a viewer with a token answers 401 until one is given: that shows the form
}

init();
