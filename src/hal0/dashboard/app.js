// hal0 dashboard: one EventSource for slots, decisions and pulls; initial state from /api; no polling but the
// per-second activity charts (/api/stats) while they are shown.
// Plain DOM, no framework: every view keeps references to its elements and updates them in place.

const $ = (id) => document.getElementById(id);

// -- tiny helpers -----------------------------------------------------------------------------------------------
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "text") el.textContent = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

const LOADED = new Set(["ready", "serving", "idle"]);
const BUSY = new Set(["pulling", "starting", "warming", "unloading"]);

function fmtBytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i === 0 ? 0 : n < 10 ? 2 : 1)} ${units[i]}`;
}

function fmtCount(n) {
  if (n === null || n === undefined) return "—";
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)} B`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)} M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)} K`;
  return String(n);
}

function fmtMs(ms) {
  if (ms === null || ms === undefined) return "—";
  if (ms === 0) return "0 ms";
  if (ms < 1) return `${ms.toFixed(2)} ms`;
  if (ms < 1000) return `${ms.toFixed(ms < 10 ? 1 : 0)} ms`;
  return `${(ms / 1000).toFixed(2)} s`;
}

function fmtDuration(s) {
  if (s === null || s === undefined || s < 0) return "—";
  s = Math.floor(s);
  const d = Math.floor(s / 86400), hh = Math.floor((s % 86400) / 3600), mm = Math.floor((s % 3600) / 60);
  if (d) return `${d}d ${hh}h`;
  if (hh) return `${hh}h ${mm}m`;
  if (mm) return `${mm}m ${s % 60}s`;
  return `${s % 60}s`;
}

function fmtTime(epoch, withDate = false) {
  if (!epoch) return "—";
  const d = new Date(epoch * 1000);
  const t = d.toLocaleTimeString([], { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
  const day = `${d.getFullYear()}-${String(d.getMonth() + 1).padStart(2, "0")}-${String(d.getDate()).padStart(2, "0")}`;
  return withDate ? `${day} ${t}` : t;
}

function badge(state, attrs = {}) {
  return h("span", { class: "badge", "data-state": state, ...attrs }, state || "unknown");
}

function setBadge(el, state) {
  el.dataset.state = state;
  el.textContent = state;
}

function outcomeClass(outcome) {
  if (outcome === "ok") return "ok";
  if (!outcome) return "pending";
  if (outcome === "client_disconnected") return "warn";
  return "bad";
}

function toast(message, kind = "info") {
  const el = h("div", { class: `toast ${kind}`, role: kind === "error" ? "alert" : null }, message);
  $("toasts").append(el);
  setTimeout(() => el.remove(), kind === "error" ? 9000 : 4000);
}

function announce(message) {
  // Replacing the text (not appending) keeps screen readers from re-reading old transitions.
  $("announcer").textContent = message;
}

async function api(method, path, body) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(path, init);
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = { raw: text }; }
  if (!resp.ok) {
    const err = new Error(data?.error?.message || `${method} ${path}: HTTP ${resp.status}`);
    err.status = resp.status;
    err.code = data?.error?.code;
    err.detail = data?.error?.detail;
    throw err;
  }
  return data;
}

// -- state ---------------------------------------------------------------------------------------------------------
const store = {
  slots: new Map(),        // name -> { rec, receivedAt }
  order: [],
  decisions: [],           // newest first
  decisionKeys: new Set(),
  models: [],
  pulls: new Map(),        // ref -> last pull event
  history: new Map(),      // name -> history entries (detail view)
};
const MAX_DECISIONS = 1000;
let current = { view: "slots", slot: null };

// -- slots view ------------------------------------------------------------------------------------------------
const cards = new Map();   // name -> { root, refs }

function slotAction(name, action) {
  const paths = {
    load: [`/api/slots/${encodeURIComponent(name)}/load?wait=false`, "load requested"],
    unload: [`/api/slots/${encodeURIComponent(name)}/unload`, "unloaded"],
    restart: [`/api/slots/${encodeURIComponent(name)}/restart`, "restarted"],
  };
  const [path, done] = paths[action];
  return async (event) => {
    const button = event?.currentTarget;
    if (button) button.setAttribute("aria-busy", "true");
    try {
      const rec = await api("POST", path);
      applySlot(rec);
      toast(`${name}: ${done}`);
    } catch (err) {
      toast(`${name}: ${err.message}`, "error");
    } finally {
      if (button) button.removeAttribute("aria-busy");
    }
  };
}

function actionButtons(name, testPrefix) {
  const make = (action, label, cls = "") => h("button", {
    type: "button", class: `btn ${cls}`, "data-action": action, "data-testid": `${testPrefix}-${action}-${name}`,
    "aria-label": `${label} slot ${name}`, onclick: slotAction(name, action),
  }, label);
  return {
    load: make("load", "Load", "primary"),
    unload: make("unload", "Unload"),
    restart: make("restart", "Restart"),
  };
}

function syncButtons(buttons, rec) {
  const state = rec.state;
  const hasModel = Boolean(rec.config?.model);
  buttons.load.disabled = !hasModel || LOADED.has(state) || BUSY.has(state);
  buttons.unload.disabled = !(LOADED.has(state) || BUSY.has(state) || state === "error");
  buttons.unload.textContent = state === "error" ? "Dismiss" : "Unload";
  buttons.restart.disabled = !hasModel || !(LOADED.has(state) || state === "error");
}

// Rebuilt only when the error itself changes, so a reader's scroll position in the log tail survives updates.
function showError(container, error, testid) {
  const key = error ? JSON.stringify(error) : "";
  if (container.dataset.errorKey === key) return;
  container.dataset.errorKey = key;
  const box = errorBox(error, testid);
  container.replaceChildren(...(box ? [box] : []));
  // The end of the log is where a backend says why it died.
  requestAnimationFrame(() => {
    for (const pre of container.querySelectorAll("pre.log")) pre.scrollTop = pre.scrollHeight;
  });
}

function errorBox(error, testid) {
  if (!error) return null;
  const detail = error.detail || {};
  const tail = Array.isArray(detail.log_tail) ? [...detail.log_tail] : [];
  while (tail.length && !tail[0].trim()) tail.shift();
  return h("div", { class: "error-box", role: "alert", "data-testid": testid },
    h("div", { class: "error-head" },
      h("span", { class: "error-code", "data-testid": `${testid}-code` }, error.code),
      detail.exit_code !== undefined && detail.exit_code !== null
        ? h("span", { class: "error-exit", "data-testid": `${testid}-exit` }, `exit code ${detail.exit_code}`) : null),
    h("p", { class: "error-message", "data-testid": `${testid}-message` }, error.message),
    detail.probe ? h("p", { class: "muted small" },
      `last probe: ${detail.probe.stage ?? ""} ${detail.probe.status ?? ""} ${detail.probe.message ?? ""}`) : null,
    tail.length ? h("details", { class: "log-tail", open: true },
      h("summary", {}, `Backend log (last ${tail.length} lines)`),
      h("pre", { class: "log", tabindex: "0", "data-testid": `${testid}-log` }, tail.join("\n"))) : null);
}

function buildCard(name) {
  const refs = {};
  const field = (label, key) => {
    refs[key] = h("dd", { "data-field": key });
    return [h("dt", {}, label), refs[key]];
  };
  refs.badge = badge("offline", { "data-testid": `slot-state-${name}` });
  refs.type = h("span", { class: "slot-type" });
  refs.reason = h("p", { class: "slot-reason muted", "data-testid": `slot-reason-${name}` });
  refs.error = h("div", { class: "error-slot" });
  refs.buttons = actionButtons(name, "slot");
  const root = h("article", { class: "card slot-card", "data-testid": `slot-card-${name}`, "data-slot": name,
                              "aria-labelledby": `slot-title-${name}` },
    h("header", { class: "card-head" },
      h("h2", { id: `slot-title-${name}` },
        h("a", { href: `#/slots/${encodeURIComponent(name)}`, "data-testid": `slot-link-${name}` }, name)),
      refs.type, refs.badge),
    h("dl", { class: "kv compact" },
      field("Model", "model"), field("Provider", "provider"), field("Port", "port"),
      field("Process", "process"), field("Uptime", "uptime"), field("In flight", "in_flight"),
      field("Memory", "memory")),
    refs.reason, refs.error,
    h("div", { class: "card-actions" }, refs.buttons.load, refs.buttons.unload, refs.buttons.restart));
  return { root, refs };
}

function renderCard(name) {
  const entry = store.slots.get(name);
  if (!entry) return;
  let card = cards.get(name);
  if (!card) {
    card = buildCard(name);
    cards.set(name, card);
  }
  const { rec } = entry;
  const r = card.refs;
  setBadge(r.badge, rec.state);
  card.root.dataset.state = rec.state;
  r.type.textContent = rec.type || rec.config?.type || "";
  r.model.textContent = rec.config?.model || rec.model || "— none assigned —";
  r.model.classList.toggle("muted", !(rec.config?.model || rec.model));
  r.provider.textContent = rec.provider || rec.config?.provider || "—";
  r.port.textContent = rec.port ?? (rec.config?.port || "auto");
  r.process.textContent = rec.unit ? `unit ${rec.unit}` : rec.pid ? `pid ${rec.pid}` : "—";
  r.in_flight.textContent = `${rec.in_flight ?? 0}` + (rec.requests_total ? ` · ${rec.requests_total} total` : "");
  r.in_flight.dataset.testid = `slot-inflight-${name}`;
  r.memory.textContent = memoryText(rec);
  r.memory.dataset.testid = `slot-memory-${name}`;
  r.reason.textContent = rec.state === "error" ? "" : rec.reason || "";
  showError(r.error, rec.error, `slot-error-${name}`);
  syncButtons(r.buttons, rec);
  updateUptime(name);
}

function uptimeOf(name) {
  const entry = store.slots.get(name);
  if (!entry || entry.rec.uptime_s === null || entry.rec.uptime_s === undefined) return null;
  return entry.rec.uptime_s + (performance.now() - entry.receivedAt) / 1000;
}

function updateUptime(name) {
  const card = cards.get(name);
  if (card) card.refs.uptime.textContent = fmtDuration(uptimeOf(name));
}

function renderSlotGrid() {
  const grid = $("slot-grid");
  const names = [...store.slots.keys()];
  for (const name of names) if (!cards.has(name)) renderCard(name);
  const wanted = names.map((n) => cards.get(n).root);
  if (wanted.length !== grid.children.length || wanted.some((el, i) => grid.children[i] !== el)) {
    grid.replaceChildren(...wanted);
  }
  for (const name of [...cards.keys()]) if (!store.slots.has(name)) cards.delete(name);
  const counts = {};
  for (const { rec } of store.slots.values()) counts[rec.state] = (counts[rec.state] || 0) + 1;
  $("slots-summary").textContent = `${names.length} slots · ` +
    Object.entries(counts).map(([s, n]) => `${n} ${s}`).join(" · ");
}

function applySlot(rec, fromEvent = null) {
  const prev = store.slots.get(rec.name);
  // Sequence numbers only grow: an older snapshot (a fetch racing an event) never overwrites a newer one.
  if (prev && typeof rec.seq === "number" && rec.seq < prev.rec.seq) return;
  store.slots.set(rec.name, { rec, receivedAt: performance.now() });
  if (!prev) renderSlotGrid();
  renderCard(rec.name);
  renderSlotGrid();
  if (fromEvent && fromEvent.from !== fromEvent.to) {
    announce(`Slot ${rec.name}: ${fromEvent.from} to ${fromEvent.to}${rec.error ? `, ${rec.error.message}` : ""}`);
    const hist = store.history.get(rec.name);
    if (hist && !hist.some((e) => e.seq === fromEvent.seq)) hist.push(fromEvent);
  }
  if (current.view === "slot" && current.slot === rec.name) {
    renderDetail();
    if (fromEvent && (fromEvent.to === "ready" || fromEvent.to === "error" || fromEvent.to === "offline")) loadDetailLogs();
  }
  refreshSlotChoices();
}

setInterval(() => { for (const name of cards.keys()) updateUptime(name); }, 1000);

// -- slot detail ----------------------------------------------------------------------------------------------------
let detailButtons = null;

async function openDetail(name) {
  current = { view: "slot", slot: name };
  $("detail-name").textContent = name;
  detailButtons = actionButtons(name, "detail");
  $("detail-actions").replaceChildren(detailButtons.load, detailButtons.unload, detailButtons.restart);
  $("detail-history").replaceChildren();
  showError($("detail-error"), null, "detail-error");
  $("detail-logs").textContent = "Loading…";
  $("detail-decisions").replaceChildren();
  renderDetail();
  try {
    const view = await api("GET", `/api/slots/${encodeURIComponent(name)}`);
    const { history, ...rec } = view;
    const known = store.history.get(name) || [];
    const merged = [...(history || [])];
    for (const e of known) if (!merged.some((m) => m.seq === e.seq)) merged.push(e);
    merged.sort((a, b) => a.seq - b.seq);
    store.history.set(name, merged);
    applySlot(rec);
    renderDetail();
  } catch (err) {
    toast(err.message, "error");
  }
  loadDetailLogs();
  loadDetailDecisions();
}

function renderDetail() {
  const name = current.slot;
  const entry = store.slots.get(name);
  if (!entry) return;
  const { rec } = entry;
  setBadge($("detail-badge"), rec.state);
  $("detail-reason").textContent = rec.state === "error" ? "" : rec.reason || "";
  showError($("detail-error"), rec.error, "detail-error");
  if (detailButtons) syncButtons(detailButtons, rec);

  const cfg = rec.config || {};
  const rows = [
    ["Type", cfg.type], ["Provider", cfg.provider], ["Model", cfg.model || "—"],
    ["Port", cfg.port || "auto"], ["Live port", rec.port ?? "—"],
    ["Process", rec.unit ? `unit ${rec.unit}` : rec.pid ? `pid ${rec.pid}` : "—"],
    ["Supervisor", rec.supervisor || "—"], ["Aliases", (cfg.aliases || []).join(", ") || "—"],
    ["Context size", cfg.ctx_size ?? "default"], ["Extra args", (cfg.args || []).join(" ") || "—"],
    ["Env", Object.keys(cfg.env || {}).join(", ") || "—"],
    ["Idle timeout", cfg.idle_timeout_s ? `${cfg.idle_timeout_s} s` : "default"],
    ["TTL", cfg.ttl_s ? `${cfg.ttl_s} s` : "none"],
    ["Warm-up budget", cfg.warmup_budget_s ? `${cfg.warmup_budget_s} s` : "default"],
    ["Built in", cfg.builtin ? "yes" : "no"], ["Sequence", rec.seq],
    ["Since", fmtTime(rec.since, true)], ["Requests", `${rec.in_flight ?? 0} in flight · ${rec.requests_total ?? 0} total`],
  ];
  $("detail-config").replaceChildren(...rows.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v ?? "—"))]));

  const hist = (store.history.get(name) || []).slice().reverse();
  $("detail-history").replaceChildren(...hist.map((e) => h("li", { "data-testid": "history-entry" },
    h("time", { datetime: new Date(e.time * 1000).toISOString() }, fmtTime(e.time)),
    h("span", { class: "transition" }, badge(e.from), h("span", { class: "arrow", "aria-label": "to" }, "→"), badge(e.to)),
    h("span", { class: "muted why", title: e.reason || null }, e.reason || ""))));
  if (!hist.length) $("detail-history").append(h("li", { class: "muted" }, "No transitions since the API started."));
  refreshAssignChoices(cfg.model);
}

async function loadDetailLogs() {
  const name = current.slot;
  if (!name) return;
  try {
    const data = await api("GET", `/api/slots/${encodeURIComponent(name)}/logs?lines=200`);
    if (current.slot !== name) return;
    const pre = $("detail-logs");
    pre.textContent = data.lines.length ? data.lines.join("\n") : "(no log yet)";
    pre.scrollTop = pre.scrollHeight;
  } catch (err) {
    $("detail-logs").textContent = err.message;
  }
}

async function loadDetailDecisions() {
  const name = current.slot;
  try {
    const data = await api("GET", `/api/decisions?slot=${encodeURIComponent(name)}&limit=50`);
    if (current.slot !== name) return;
    $("detail-decisions").replaceChildren(...data.data.map((d) => decisionRow(d, false)));
    $("detail-decisions-empty").hidden = data.data.length > 0;
  } catch (err) {
    toast(err.message, "error");
  }
}

$("detail-logs-refresh").addEventListener("click", loadDetailLogs);

function refreshAssignChoices(selected) {
  const select = $("assign-model");
  const want = selected || "";
  const options = [h("option", { value: "" }, "— none —"),
    ...store.models.map((m) => h("option", { value: m.ref }, `${m.ref} (${fmtBytes(m.size)})`))];
  if (want && !store.models.some((m) => m.ref === want)) options.push(h("option", { value: want }, want));
  if (select.options.length !== options.length || select.dataset.for !== current.slot || document.activeElement !== select) {
    select.replaceChildren(...options);
    select.value = want;
    select.dataset.for = current.slot || "";
  }
}

$("assign-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const name = current.slot;
  const model = $("assign-model").value || null;
  try {
    applySlot(await api("PUT", `/api/slots/${encodeURIComponent(name)}/model`, { model }));
    toast(`${name}: ${model ? `assigned ${model}` : "unassigned"}`);
    loadModels();
  } catch (err) {
    toast(`${name}: ${err.message}`, "error");
  }
});

// -- decisions ------------------------------------------------------------------------------------------------------
function decisionKey(d) { return `${d.request_id}|${d.time}`; }

function decisionRow(d, withSlot = true) {
  const open = () => showRecord(d);
  // data-label names each cell for the stacked layout on narrow screens.
  const cells = [
    h("td", { class: "nowrap", "data-label": "Time" },
      h("time", { datetime: new Date(d.time * 1000).toISOString() }, fmtTime(d.time))),
    h("td", { class: "mono", "data-label": "Endpoint" }, d.endpoint),
    h("td", { class: "mono", "data-label": "Model asked" }, d.model ?? "—"),
    withSlot ? h("td", { "data-label": "Slot" }, d.slot ?? "—") : null,
    h("td", { class: "reason", "data-label": "Reason" }, d.reason || (d.error ? d.error.message : "") || "—"),
    h("td", { "data-label": "Outcome" }, h("span", {},
      h("span", { class: `pill ${outcomeClass(d.outcome)}` }, d.outcome || "—"),
      d.status ? h("span", { class: "muted small" }, ` ${d.status}`) : null)),
    h("td", { class: "num", "data-label": "Wait" }, fmtMs(d.wait_ms)),
    h("td", { class: "num", "data-label": "Duration" }, fmtMs(d.duration_ms)),
  ];
  return h("tr", {
    tabindex: "0", "data-testid": withSlot ? "decision-row" : "slot-decision-row", "data-slot": d.slot ?? "", "data-outcome": d.outcome ?? "",
    "data-endpoint": d.endpoint ?? "", "aria-label": `Decision ${d.request_id}: ${d.model ?? "no model"} to ${d.slot ?? "no slot"}, ${d.outcome}`,
    onclick: open, onkeydown: (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); open(); } },
  }, ...cells);
}

function showRecord(d) {
  $("record-title").textContent = `Decision ${d.request_id}`;
  $("record-body").textContent = JSON.stringify(d, null, 2);
  $("record-dialog").showModal();
}
$("record-close").addEventListener("click", () => $("record-dialog").close());
$("record-dialog").addEventListener("click", (e) => { if (e.target === $("record-dialog")) $("record-dialog").close(); });

function filters() {
  return { slot: $("filter-slot").value, endpoint: $("filter-endpoint").value, outcome: $("filter-outcome").value };
}

function matches(d, f) {
  return (!f.slot || d.slot === f.slot) && (!f.endpoint || d.endpoint === f.endpoint) && (!f.outcome || d.outcome === f.outcome);
}

function refreshFilterChoices() {
  const sets = { slot: new Set(store.slots.keys()), endpoint: new Set(), outcome: new Set() };
  for (const d of store.decisions) {
    if (d.slot) sets.slot.add(d.slot);
    if (d.endpoint) sets.endpoint.add(d.endpoint);
    if (d.outcome) sets.outcome.add(d.outcome);
  }
  for (const [key, values] of Object.entries(sets)) {
    const select = $(`filter-${key}`);
    const have = new Set([...select.options].map((o) => o.value));
    for (const v of [...values].sort()) if (!have.has(v)) select.append(h("option", { value: v }, v));
  }
}

function renderDecisions() {
  const f = filters();
  const rows = store.decisions.filter((d) => matches(d, f)).slice(0, 300).map((d) => decisionRow(d));
  $("decision-rows").replaceChildren(...rows);
  $("decision-empty").hidden = rows.length > 0;
  $("log-count").textContent = `${rows.length} shown of ${store.decisions.length}`;
}

function addDecision(d, live) {
  const key = decisionKey(d);
  if (store.decisionKeys.has(key)) return;
  store.decisionKeys.add(key);
  store.decisions.unshift(d);
  if (store.decisions.length > MAX_DECISIONS) {
    for (const old of store.decisions.splice(MAX_DECISIONS)) store.decisionKeys.delete(decisionKey(old));
  }
  if (!live) return;
  refreshFilterChoices();
  if (matches(d, filters())) {
    const tbody = $("decision-rows");
    tbody.prepend(decisionRow(d));
    while (tbody.children.length > 300) tbody.lastChild.remove();
    $("decision-empty").hidden = true;
  }
  $("log-count").textContent = `${$("decision-rows").children.length} shown of ${store.decisions.length}`;
  if (current.view === "slot" && current.slot === d.slot) {
    $("detail-decisions").prepend(decisionRow(d, false));
    $("detail-decisions-empty").hidden = true;
  }
}

$("log-filters").addEventListener("change", renderDecisions);
$("log-filters").addEventListener("submit", (e) => e.preventDefault());

// -- models ---------------------------------------------------------------------------------------------------------
async function loadModels() {
  try {
    const data = await api("GET", "/api/models");
    store.models = data.models;
    for (const ref of data.pulling || []) if (!store.pulls.has(ref)) store.pulls.set(ref, { ref, kind: "start" });
    renderModels();
    renderPulls();
    if (current.view === "slot") refreshAssignChoices(store.slots.get(current.slot)?.rec.config?.model);
  } catch (err) {
    toast(err.message, "error");
  }
}

function renderModels() {
  const rows = store.models.map((m) => {
    const meta = m.metadata || {};
    return h("tr", { "data-testid": "model-row", "data-ref": m.ref },
      h("th", { scope: "row", class: "mono" }, m.ref,
        h("div", { class: "muted small" }, meta.name ? `${meta.name}` : "", meta.file_type ? ` · ${meta.file_type}` : "")),
      h("td", {}, m.format),
      h("td", { class: "num" }, fmtBytes(m.size)),
      h("td", {}, meta.architecture || "—"),
      h("td", { class: "num" }, fmtCount(meta.parameter_count)),
      h("td", { class: "num" }, meta.context_length ? fmtCount(meta.context_length) : "—"),
      h("td", {}, m.slot_type || "—"),
      h("td", {}, (m.slots || []).length ? m.slots.join(", ") : h("span", { class: "muted" }, "—")));
  });
  $("model-rows").replaceChildren(...rows);
  $("model-empty").hidden = rows.length > 0;
  const total = store.models.reduce((n, m) => n + (m.size || 0), 0);
  $("models-summary").textContent = `${store.models.length} installed · ${fmtBytes(total)} on disk`;
}

function renderPulls() {
  const items = [...store.pulls.values()].map((p) => {
    const pct = p.total ? Math.min(100, (100 * p.bytes_done) / p.total) : null;
    const state = p.kind === "error" ? "error" : p.kind === "done" ? "done" : "active";
    const progress = h("progress", { max: "100", "aria-label": `Pull of ${p.ref}` });
    if (pct !== null) progress.value = pct; else if (state === "done") progress.value = 100;
    return h("li", { class: `pull ${state}`, "data-testid": "pull-item", "data-ref": p.ref, "data-kind": p.kind },
      h("div", { class: "pull-head" },
        h("span", { class: "mono" }, p.ref),
        h("span", { class: "muted small" },
          state === "error" ? (p.error?.message || "failed")
            : state === "done" ? "installed"
              : `${p.kind}${p.file ? ` · ${p.file}` : ""}${p.file_count > 1 ? ` (${p.file_index + 1}/${p.file_count})` : ""}`)),
      progress,
      h("div", { class: "muted small" },
        p.bytes_done !== undefined ? `${fmtBytes(p.bytes_done)}${p.total ? ` of ${fmtBytes(p.total)}` : ""}` : "",
        p.rate_bps ? ` · ${fmtBytes(p.rate_bps)}/s` : "",
        pct !== null && state === "active" ? ` · ${pct.toFixed(1)}%` : ""));
  });
  $("pull-list").replaceChildren(...items);
  if (!items.length) $("pull-list").append(h("li", { class: "muted" }, "No pulls in flight."));
}

function applyPull(p) {
  store.pulls.set(p.ref, p);
  renderPulls();
  if (p.kind === "done") { toast(`Pulled ${p.ref}`); loadModels(); }
  if (p.kind === "error") toast(`Pull of ${p.ref} failed: ${p.error?.message || "error"}`, "error");
}

$("pull-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const ref = $("pull-ref").value.trim();
  const source = $("pull-source").value.trim();
  try {
    const data = await api("POST", "/api/models/pull", { ref, ...(source ? { source } : {}) });
    if (data.status === "installed") toast(`${ref} is already installed`);
    else { store.pulls.set(ref, store.pulls.get(ref) || { ref, kind: "start" }); renderPulls(); }
  } catch (err) {
    toast(`Pull of ${ref}: ${err.message}`, "error");
  }
});

async function loadCatalog() {
  try {
    const data = await api("GET", "/api/catalog");
    $("catalog-refs").replaceChildren(...data.catalog.map((e) => h("option", { value: e.ref }, e.description || e.slot_type)));
  } catch { /* the catalog only feeds suggestions */ }
}

async function loadLoadouts() {
  try {
    const data = await api("GET", "/api/loadouts");
    $("loadout-list").replaceChildren(...data.loadouts.map(loadoutCard));
  } catch (err) {
    toast(err.message, "error");
  }
}

function loadoutCard(lo) {
  const result = h("div", { class: "loadout-result", "aria-live": "polite" });
  const apply = async (force) => {
    result.replaceChildren(h("span", { class: "muted" }, "Applying… (missing models are pulled first)"));
    try {
      const report = await api("POST", `/api/loadouts/${encodeURIComponent(lo.name)}/apply`, { force });
      result.replaceChildren(h("span", { class: "ok-text" },
        `Applied: assigned ${Object.keys(report.assigned || {}).length || (report.assigned || []).length} slots`,
        report.pulled?.length ? `, pulled ${report.pulled.join(", ")}` : ""));
      toast(`Loadout ${lo.name} applied`);
      loadModels();
    } catch (err) {
      const again = err.code === "insufficient_memory"
        ? h("button", { type: "button", class: "btn small", onclick: () => apply(true) }, "Apply anyway") : null;
      result.replaceChildren(h("span", { class: "bad-text" }, err.message), again);
    }
  };
  return h("div", { class: "loadout card", "data-testid": `loadout-${lo.name}` },
    h("div", { class: "card-head" },
      h("h3", {}, lo.name), h("span", { class: "muted small" }, lo.tier)),
    h("p", { class: "muted" }, lo.description),
    h("dl", { class: "kv compact" }, ...lo.slots.flatMap((s) => [h("dt", {}, s.slot), h("dd", { class: "mono" }, s.ref)])),
    h("div", { class: "card-actions" },
      h("button", { type: "button", class: "btn", "data-testid": `apply-${lo.name}`, "aria-label": `Apply loadout ${lo.name}`,
                    onclick: () => apply(false) }, "Apply")),
    result);
}

// -- playground -----------------------------------------------------------------------------------------------------
let playAbort = null;

function refreshSlotChoices() {
  const select = $("play-slot");
  const chat = [...store.slots.values()].map((e) => e.rec).filter((r) => (r.type || r.config?.type) === "chat");
  const labels = chat.map((r) => `${r.name}|${r.state}|${r.config?.model || ""}`).join(",");
  if (select.dataset.labels === labels) return;
  select.dataset.labels = labels;
  const keep = select.value;
  select.replaceChildren(...chat.map((r) => h("option", { value: r.name },
    `${r.name} — ${r.config?.model || "no model"} (${r.state})`)));
  if (chat.some((r) => r.name === keep)) select.value = keep;
}

$("play-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const slot = $("play-slot").value;
  const message = $("play-message").value;
  if (!slot || !message.trim()) return;
  const out = $("play-output");
  out.replaceChildren();
  out.dataset.state = "streaming";
  out.setAttribute("aria-busy", "true");
  const text = h("span", { class: "play-text", "data-testid": "play-text" });
  out.append(text);
  $("play-send").disabled = true;
  $("play-stop").disabled = false;
  playAbort = new AbortController();
  const started = performance.now();
  let first = null, chunks = 0;
  const stats = () => {
    const total = performance.now() - started;
    $("play-stats").textContent = `${chunks} chunks · first token ${first === null ? "—" : fmtMs(first)} · ${fmtMs(total)}`;
  };
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", signal: playAbort.signal, headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: slot, stream: true, max_tokens: Number($("play-max").value) || 128,
                             messages: [{ role: "user", content: message }] }),
    });
    if (!resp.ok || !resp.body) {
      let msg = `HTTP ${resp.status}`;
      try { msg = (await resp.json()).error?.message || msg; } catch { /* not JSON */ }
      throw new Error(msg);
    }
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 1);
        if (!line.startsWith("data:")) continue;
        const payload = line.slice(5).trim();
        if (payload === "[DONE]") continue;
        let chunk;
        try { chunk = JSON.parse(payload); } catch { continue; }
        if (chunk.error) throw new Error(chunk.error.message || "stream error");
        const delta = chunk.choices?.[0]?.delta?.content ?? chunk.choices?.[0]?.text ?? "";
        if (delta) {
          if (first === null) first = performance.now() - started;
          chunks += 1;
          text.textContent += delta;
          stats();
        }
      }
    }
    out.dataset.state = "done";
  } catch (err) {
    out.dataset.state = err.name === "AbortError" ? "stopped" : "error";
    out.append(h("div", { class: err.name === "AbortError" ? "muted" : "error-box", "data-testid": "play-error" },
      err.name === "AbortError" ? "Stopped." : err.message));
  } finally {
    stats();
    out.setAttribute("aria-busy", "false");
    $("play-send").disabled = false;
    $("play-stop").disabled = true;
    playAbort = null;
  }
});
$("play-stop").addEventListener("click", () => playAbort?.abort());
$("play-message").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("play-form").requestSubmit();
});

// -- activity: per slot, the last 15 minutes per second from /api/stats, drawn with uPlot ---------------------------
// The only polling on the page: per-second aggregates are not events. Every chart keeps the very arrays it was
// given in window.hal0Charts[slot] (with the `start`/`end` of the /api/stats answer), so they can be checked.
const STATS_POLL_MS = 2000;
const STATE_GROUP = { pulling: "loading", starting: "loading", warming: "loading", unloading: "offline",
                      ready: "ready", serving: "serving", idle: "idle", error: "error", offline: "offline" };
const GROUP_COLOR = { loading: "--busy", ready: "--ready", serving: "--serving", idle: "--ready-bg",
                      error: "--error", offline: "--offline-bg" };
const fmtRate = (v) => (v === null || v === undefined ? "—" : v < 10 ? v.toFixed(1) : v.toFixed(0));
const CHARTS = [
  // Of each second's requests, those that waited for a cold load: they line up with "loading" on the timeline.
  { key: "requests", title: "Requests/s", fmt: fmtRate,
    series: [["requests", "req/s", "--accent"], ["waited", "waited for a load", "--busy"]] },
  // A second has a first-token time only if a stream started in it: sparse, so each one is drawn as a dot too.
  { key: "ttft", title: "Time to first token", fmt: fmtMs, dots: true,
    series: [["ttft_p50_ms", "p50", "--serving"], ["ttft_p95_ms", "p95", "--busy"]] },
  { key: "tokens", title: "Tokens/s", series: [["completion_tokens", "tok/s", "--ready"]], fmt: fmtRate },
  { key: "memory", title: "Memory", fmt: fmtBytes, empty: 2 ** 30,
    series: [["memory_bytes", "measured", "--accent"], ["memory_estimate_bytes", "estimate", "--muted"]] },
];
window.hal0Charts = {};
const activity = { timer: null, panels: new Map() };  // element id -> { slot, root, charts, timeline }

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim() || "#888";
}

function chartOptions(spec, width) {
  const axis = { stroke: cssVar("--muted"), grid: { stroke: cssVar("--border"), width: 1 },
                 ticks: { stroke: cssVar("--border"), width: 1 } };
  return {
    width, height: 130, legend: { show: true, live: true },
    cursor: { drag: { x: false, y: false } },
    scales: { x: { time: true }, y: { range: (u, lo, hi) => [0, hi > 0 ? hi * 1.1 : spec.empty || 1] } },
    series: [{}, ...spec.series.map(([, label, color]) => ({
      label, stroke: cssVar(color), width: 1.5, value: (u, v) => spec.fmt(v),
      points: spec.dots ? { show: true, size: 4, fill: cssVar(color), stroke: cssVar(color) } : { show: false },
    }))],
    axes: [axis, { ...axis, size: 74, values: (u, values) => values.map((v) => spec.fmt(v)) }],
  };
}

function activityPanel(slot) {
  const timeline = h("canvas", { class: "timeline", "data-testid": `timeline-${slot}`, role: "img", height: "18",
                                  onmousemove: timelineTip });
  const charts = {};
  const grid = h("div", { class: "chart-grid" }, ...CHARTS.map((spec) => {
    const target = h("div", { class: "chart", "data-testid": `chart-${slot}-${spec.key}`, "data-chart": spec.key });
    charts[spec.key] = { spec, target, plot: null };
    return h("figure", { class: "chart-box" }, h("figcaption", {}, spec.title), target);
  }));
  const root = h("div", { class: "activity", "data-testid": `activity-${slot}`, "data-slot": slot },
    h("div", { class: "timeline-row" }, h("span", { class: "muted small" }, "states"), timeline), grid);
  return { slot, root, charts, timeline };
}

function timelineTip(event) {
  const canvas = event.currentTarget;
  const { t, states } = canvas.timeline || {};
  if (!t) return;
  const i = Math.min(t.length - 1, Math.max(0, Math.floor((event.offsetX / canvas.clientWidth) * t.length)));
  canvas.title = `${fmtTime(t[i])} ${states[i] || "no sample"}`;
}

function drawTimeline(canvas, t, states) {
  canvas.timeline = { t, states };
  const ratio = window.devicePixelRatio || 1;
  const width = Math.max(100, canvas.clientWidth);
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(18 * ratio);
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const colors = Object.fromEntries(Object.entries(GROUP_COLOR).map(([g, v]) => [g, cssVar(v)]));
  const step = canvas.width / t.length;
  const seen = {};
  // A second is about a pixel wide: loads and errors are drawn again on top, at least 3 px, so a one-second
  // load next to a request that waited for it never disappears under its neighbours.
  for (const pass of [false, true]) {
    states.forEach((state, i) => {
      if (!state) return;
      const group = STATE_GROUP[state] || "offline";
      const salient = group === "loading" || group === "error";
      if (pass && !salient) return;
      if (!pass) seen[group] = (seen[group] || 0) + 1;
      ctx.fillStyle = colors[group];
      const wide = pass ? Math.max(Math.ceil(step), Math.round(3 * ratio)) : Math.ceil(step);
      ctx.fillRect(Math.floor(i * step), 0, wide, canvas.height);
    });
  }
  canvas.setAttribute("aria-label", `States over the last ${Math.round(t.length / 60)} minutes: ` +
    (Object.entries(seen).map(([g, n]) => `${g} ${n} s`).join(", ") || "no samples yet"));
}

function drawPanel(panel, stats) {
  const series = stats.slots[panel.slot];
  if (!series) return;
  const exposed = { start: stats.start, end: stats.end, t: stats.t, state: series.state };
  for (const [key, chart] of Object.entries(panel.charts)) {
    const data = [stats.t, ...chart.spec.series.map(([name]) => series[name])];
    const width = Math.max(220, chart.target.clientWidth);
    if (!chart.plot) chart.plot = new uPlot(chartOptions(chart.spec, width), data, chart.target);
    else {
      if (Math.abs(chart.plot.width - width) > 2) chart.plot.setSize({ width, height: 130 });
      chart.plot.setData(data);
    }
    chart.target.dataset.drawnEnd = String(stats.end);
    exposed[key] = chart.plot.data;
  }
  drawTimeline(panel.timeline, stats.t, series.state);
  panel.root.dataset.end = String(stats.end);
  window.hal0Charts[panel.slot] = exposed;
}

function activityTargets() {
  if (current.view === "activity") return { container: $("activity-list"), slots: [...store.slots.keys()] };
  if (current.view === "slot" && current.slot) return { container: $("detail-activity"), slots: [current.slot] };
  return null;
}

async function refreshActivity() {
  const where = activityTargets();
  if (!where) return;
  const query = where.slots.length === 1 ? `?slot=${encodeURIComponent(where.slots[0])}` : "";
  let stats;
  try {
    stats = await api("GET", `/api/stats${query}`);
  } catch (err) {
    if (err.status) toast(`Activity: ${err.message}`, "error");
    return;
  }
  if (activityTargets()?.container !== where.container) return;  // the view changed meanwhile
  const wanted = where.slots.filter((s) => stats.slots[s]);
  for (const slot of wanted) {
    const id = `${where.container.id}:${slot}`;
    if (!activity.panels.has(id)) {
      const panel = activityPanel(slot);
      activity.panels.set(id, panel);
      if (where.container.id === "activity-list") {
        panel.root.prepend(h("h2", { class: "activity-title" },
          h("a", { href: `#/slots/${encodeURIComponent(slot)}` }, slot)));
      }
    }
  }
  const roots = wanted.map((slot) => activity.panels.get(`${where.container.id}:${slot}`).root);
  if (roots.length !== where.container.children.length || roots.some((el, i) => where.container.children[i] !== el)) {
    where.container.replaceChildren(...roots);
  }
  for (const slot of wanted) drawPanel(activity.panels.get(`${where.container.id}:${slot}`), stats);
  where.container.dataset.end = String(stats.end);
}

function watchActivity() {
  clearInterval(activity.timer);
  activity.timer = null;
  // A slot's detail starts with a fresh panel: its charts belong to one slot.
  for (const id of [...activity.panels.keys()]) {
    if (id.startsWith("detail-activity:") && id !== `detail-activity:${current.slot}`) activity.panels.delete(id);
  }
  if (current.slot === null) $("detail-activity").replaceChildren();
  if (!activityTargets()) return;
  refreshActivity();
  activity.timer = setInterval(refreshActivity, STATS_POLL_MS);
}

// -- memory ------------------------------------------------------------------------------------------------------
function memoryText(rec) {
  const est = rec.memory?.estimate?.total_bytes, got = rec.memory?.measured?.total_bytes;
  const where = rec.device && rec.state !== "offline" ? ` on ${rec.device}` : "";
  if (got != null) return `${fmtBytes(got)} measured${where}` + (est != null ? ` · ${fmtBytes(est)} estimated` : "");
  return est != null ? `${fmtBytes(est)} estimated${where}` : "—";
}

const MEMORY_POLL_MS = 2000;
let memoryTimer = null;

// Sizes go through the CSSOM: the page's CSP allows no inline style attributes.
function sized(el, props) {
  Object.assign(el.style, props);
  return el;
}

function deviceBar(budget, holdings) {
  const total = budget.total_bytes || 1;
  const pct = (n) => `${Math.max(0, Math.min(100, (100 * n) / total)).toFixed(3)}%`;
  const held = holdings.filter((one) => (one.bytes[budget.device] || 0) > 0);
  const used = held.reduce((sum, one) => sum + one.bytes[budget.device], 0);
  const segments = held.map((one, i) => {
    const n = one.bytes[budget.device];
    return sized(h("div", { class: `mem-seg${one.measured ? "" : " estimated"}`,
                      "data-testid": `mem-seg-${budget.device}-${one.slot}`, "data-slot": one.slot,
                      "data-bytes": String(n), "data-measured": String(one.measured),
                      title: `${one.slot}: ${fmtBytes(n)} ${one.measured ? "measured" : "estimated"}`,
                      "data-color": String(i % 6) }, n / total > 0.06 ? one.slot : ""), { width: pct(n) });
  });
  const reserve = sized(h("div", { class: "mem-reserve", title: `reserve ${fmtBytes(budget.reserve_bytes)}` }),
                        { left: pct(budget.budget_bytes), width: pct(total - budget.budget_bytes) });
  const mark = sized(h("div", { class: "mem-budget", title: `budget ${fmtBytes(budget.budget_bytes)}` }),
                     { left: pct(budget.budget_bytes) });
  return h("article", { class: "card mem-device", "data-testid": `mem-device-${budget.device}`, "data-device": budget.device,
                        "data-budget": String(budget.budget_bytes), "data-total": String(budget.total_bytes),
                        "data-held": String(used) },
    h("header", { class: "card-head" }, h("h2", {}, budget.device),
      h("span", { class: "muted small" },
        `${fmtBytes(used)} held by slots · budget ${fmtBytes(budget.budget_bytes)} of ${fmtBytes(total)} · ` +
        `${fmtBytes(budget.free_bytes)} free now`)),
    h("div", { class: "mem-bar", role: "img",
               "aria-label": `${budget.device}: ${fmtBytes(used)} of a ${fmtBytes(budget.budget_bytes)} budget held by ${held.length} slots` },
      ...segments, reserve, mark),
    h("ul", { class: "mem-legend" }, held.map((hh) =>
      h("li", {}, `${hh.slot}: ${fmtBytes(hh.bytes[budget.device])} ${hh.measured ? "measured" : "estimated"} (${hh.state})` +
        (hh.pinned ? " · pinned" : "")))));
}

async function loadMemory() {
  try {
    const hw = await api("GET", "/api/hardware");
    const devices = Object.values(hw.budgets || {});
    $("memory-devices").replaceChildren(...devices.map((b) => deviceBar(b, hw.holdings || [])));
  } catch (err) {
    toast(`Could not read memory: ${err.message}`, "error");
  }
}

function watchMemory(shown) {
  if (memoryTimer) { clearInterval(memoryTimer); memoryTimer = null; }
  if (shown !== "memory") return;
  loadMemory();
  memoryTimer = setInterval(loadMemory, MEMORY_POLL_MS);
}

// -- routing --------------------------------------------------------------------------------------------------------
function route() {
  const hash = location.hash.replace(/^#\/?/, "");
  const [view, arg] = hash.split("/");
  const name = view === "slots" && arg ? decodeURIComponent(arg) : null;
  const shown = name ? "slot" : ["activity", "logs", "memory", "models", "playground"].includes(view) ? view : "slots";
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== `view-${shown}`;
  for (const link of document.querySelectorAll(".tabs a")) {
    const active = link.dataset.view === (shown === "slot" ? "slots" : shown);
    if (active) link.setAttribute("aria-current", "page"); else link.removeAttribute("aria-current");
  }
  if (shown === "slot") openDetail(name);
  else current = { view: shown, slot: null };
  if (shown === "logs") renderDecisions();
  if (shown === "models") { loadModels(); loadLoadouts(); }
  watchMemory(shown);
  watchActivity();
}
window.addEventListener("hashchange", () => { route(); $("main").focus({ preventScroll: true }); });

// -- live stream ----------------------------------------------------------------------------------------------------
function setConn(state, text) {
  const el = $("conn");
  el.dataset.state = state;
  el.querySelector(".conn-text").textContent = text;
}

async function loadInitial() {
  const [slots, decisions, health] = await Promise.all([
    api("GET", "/api/slots"), api("GET", "/api/decisions?limit=500"), api("GET", "/api/health").catch(() => null),
  ]);
  for (const rec of slots.data) applySlot(rec);
  for (const d of decisions.data.slice().reverse()) addDecision(d, false);
  refreshFilterChoices();
  renderDecisions();
  if (health) $("version").textContent = `${health.supervisor} supervisor`;
  loadModels();
  loadCatalog();
}

function connect() {
  // One stream for everything; the browser resumes with Last-Event-ID after a drop.
  const source = new EventSource("/api/events?topics=slot,decision,pull");
  let loaded = false;
  source.addEventListener("open", async () => {
    setConn("live", "Live");
    // The first open (and any reopen after the API restarted) refetches, so nothing between is lost.
    try {
      await loadInitial();
      loaded = true;
      document.body.dataset.ready = "true";
    } catch (err) {
      toast(`Could not load state: ${err.message}`, "error");
    }
  });
  source.addEventListener("error", () => {
    setConn("down", loaded ? "Reconnecting…" : "Connecting…");
  });
  source.addEventListener("slot", (e) => {
    const event = JSON.parse(e.data);
    if (event.record) applySlot(event.record, event);
  });
  // Bus frames carry the event's id and topic next to the record; the record alone is kept.
  const record = (e) => { const { id: _id, topic: _topic, ...rest } = JSON.parse(e.data); return rest; };
  source.addEventListener("decision", (e) => addDecision(record(e), true));
  source.addEventListener("pull", (e) => applyPull(record(e)));
}

route();
connect();
