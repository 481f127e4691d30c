// forage cloudlet manager. One live feed (server-sent events, /v1/events) keeps every view
// current; changes go to the same HTTP API as the CLI's, with the session's CSRF token.
// Everything shown is set as text (never parsed as HTML).
"use strict";

const $ = (sel) => document.querySelector(sel);
const VIEWS = ["overview", "instances", "sessions", "devices", "handoffs", "network"];
const S = {
  csrf: null, canChange: false, signedIn: false, live: false,
  status: null, host: null, bases: [], services: [], instances: [], sessions: [], cache: [],
  handoffs: [], credentials: [], cloudlets: { browsing: false, cloudlets: [] },
  instancesAt: Date.now(), selected: null, follow: null, handoffTarget: null,
};

// ---- small helpers ----------------------------------------------------------------
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "class") e.className = v;
    // Through the CSSOM: the policy (style-src 'self') drops style attributes.
    else if (k === "style") Object.assign(e.style, v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const k of kids.flat()) if (k !== null && k !== undefined) e.append(k instanceof Node ? k : String(k));
  return e;
}
const bytes = (n) => {
  if (n == null) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i && n < 10 ? 1 : 0)} ${u[i]}`;
};
const dur = (ms) => {
  if (ms == null) return "–";
  const s = ms / 1000;
  if (s < 10) return `${s.toFixed(2)} s`;
  if (s < 120) return `${s.toFixed(0)} s`;
  if (s < 7200) return `${Math.floor(s / 60)} min`;
  if (s < 172800) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d`;
};
const when = (unixMs) => (unixMs ? new Date(unixMs).toLocaleString() : "–");
const short = (d) => (d || "").slice(0, 12);
const words = (s) => (s || "").replace(/_/g, " ");
function fill(tbody, rows) { tbody.replaceChildren(...rows); }
function kv(dl, pairs) { dl.replaceChildren(...pairs.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])); }
function notice(text, ok) {
  const n = $("#notice");
  n.textContent = text;
  n.className = ok ? "notice ok" : "notice";
  n.hidden = !text;
  clearTimeout(notice.timer);
  if (text) notice.timer = setTimeout(() => { n.hidden = true; }, ok ? 6000 : 15000);
}

// ---- the API ----------------------------------------------------------------------
async function api(method, path, body) {
  const headers = { accept: "application/json" };
  if (body !== undefined) headers["content-type"] = "application/json";
  if (S.csrf && method !== "GET") headers["x-csrf-token"] = S.csrf;
  const r = await fetch(path, { method, headers, credentials: "same-origin", body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await r.json().catch(() => ({ error: `${r.status} ${r.statusText}` }));
  if (!r.ok) throw new Error(data.error || `${r.status}`);
  return data;
}

// A button that acts on the second press (a stop or a revocation cannot be undone).
function twoStep(label, confirm, action, attrs) {
  const b = el("button", Object.assign({ type: "button", class: "danger" }, attrs), label);
  b.disabled = !S.canChange;
  if (!S.canChange) b.title = "sign in to change";
  let armed = null;
  b.addEventListener("click", async () => {
    if (!armed) {
      b.textContent = confirm; b.className = "confirm";
      armed = setTimeout(() => { armed = null; b.textContent = label; b.className = "danger"; }, 5000);
      return;
    }
    clearTimeout(armed);
    b.disabled = true;
    try { await action(); } catch (e) { notice(e.message); b.disabled = false; }
  });
  return b;
}

// ---- the live feed ----------------------------------------------------------------
let feed = null;
function connect() {
  if (feed) feed.close();
  feed = new EventSource("/v1/events");
  // Live once the feed's hello arrived (who this is, what they may change), not when the
  // stream opened: controls read S.canChange, which only the hello sets.
  feed.onerror = () => {
    setLive(false);
    if (feed.readyState === EventSource.CLOSED) {
      // Refused (not allowed to read, too many tabs): ask why, then try again later.
      api("GET", "/v1/signin").then((who) => {
        applyWho(who);
        if (!who.can_read) { $("#live-text").textContent = "sign in to see this cloudlet"; openSignIn(); }
      }).catch(() => {});
      setTimeout(connect, 5000);
    }
  };
  feed.onmessage = (e) => {
    let m;
    try { m = JSON.parse(e.data); } catch { return; }
    receive(m.kind, m.data);
  };
}
function setLive(on) {
  S.live = on;
  $("#live-dot").className = on ? "dot live" : "dot down";
  $("#live-text").textContent = on ? "live" : "reconnecting";
}

function receive(kind, d) {
  switch (kind) {
    case "hello":
      S.csrf = d.csrf_token; S.canChange = d.can_change; S.signedIn = !!d.csrf_token;
      renderWho(); renderAll(); setLive(true); break;
    case "status": S.status = d; $("#cloudlet-name").textContent = d.name; document.title = `${d.name} · forage`; renderOverview(); break;
    case "host": S.host = d; renderOverview(); break;
    case "bases": S.bases = d.bases; renderOverview(); break;
    case "services": S.services = d.services; renderOverview(); break;
    case "cache": S.cache = d.entries; renderOverview(); break;
    case "instances": S.instances = d.instances; S.instancesAt = Date.now(); renderInstances(); break;
    case "sessions": S.sessions = d.sessions; renderSessions(); break;
    case "credentials": S.credentials = d.credentials; renderCredentials(); break;
    case "cloudlets": S.cloudlets = d; renderNetwork(); break;
    case "handoffs":
      S.handoffs = d.handoffs;
      if (S.follow) {
        const h = S.handoffs.find((x) => x.instance === S.follow);
        if (h) { S.selected = h.id; S.follow = null; }
      }
      renderHandoffs();
      break;
    case "handoff_tick": {
      const h = S.handoffs.find((x) => x.id === d.id);
      if (h) { h.trace.push(d.row); if (S.selected === d.id) renderChart(); }
      break;
    }
  }
}

// ---- sign-in ----------------------------------------------------------------------
function applyWho(who) { S.csrf = who.csrf_token; S.canChange = who.can_change; S.signedIn = who.signed_in; renderWho(); renderAll(); }
function renderWho() {
  $("#who-text").textContent = S.signedIn ? "signed in" : S.canChange ? "full access" : "read-only";
  $("#signin-open").hidden = S.signedIn;
  $("#signout").hidden = !S.signedIn;
}
function openSignIn() {
  const d = $("#signin");
  if (d.open) return;
  $("#signin-error").textContent = "";
  d.showModal();
  $("#signin-token").focus();
}
$("#signin-open").addEventListener("click", openSignIn);
$("#signin-cancel").addEventListener("click", () => $("#signin").close());
$("#signin-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  try {
    const who = await api("POST", "/v1/signin", { token: $("#signin-token").value });
    $("#signin-token").value = "";
    $("#signin").close();
    applyWho(who);
    notice("Signed in: changes are allowed from this browser.", true);
    connect();
  } catch (err) { $("#signin-error").textContent = err.message; }
});
$("#signout").addEventListener("click", async () => {
  try { applyWho(await api("POST", "/v1/signout")); connect(); } catch (e) { notice(e.message); }
});

// ---- views ------------------------------------------------------------------------
function show(view, focus) {
  if (!VIEWS.includes(view)) view = "overview";
  for (const v of VIEWS) $(`#view-${v}`).hidden = v !== view;
  for (const a of document.querySelectorAll(".tabs a")) {
    if (a.dataset.view === view) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  if (focus) $("#main").focus();
}
window.addEventListener("hashchange", () => show(location.hash.slice(1), true));
document.addEventListener("keydown", (e) => {
  const t = e.target;
  if (e.altKey || e.ctrlKey || e.metaKey || $("#signin").open) return;
  if (t && (t.tagName === "INPUT" || t.tagName === "SELECT" || t.tagName === "TEXTAREA")) {
    if (e.key === "Escape" && t.form === $("#handoff-form")) hideHandoffForm();
    return;
  }
  const i = "123456".indexOf(e.key);
  if (i >= 0) { location.hash = VIEWS[i]; e.preventDefault(); }
});

function renderAll() { renderOverview(); renderInstances(); renderSessions(); renderCredentials(); renderHandoffs(); renderNetwork(); }

function renderOverview() {
  const s = S.status, h = S.host;
  if (s) kv($("#ov-cloudlet"), [["Name", s.name], ["Version", s.version], ["Accelerator", s.accel],
    ["Up for", dur(s.uptime_s * 1000)], ["Instances", s.instances_running], ["Sessions running", s.sessions_running]]);
  if (h) {
    kv($("#ov-host"), [["Host", h.hostname], ["Kernel", h.kernel], ["Cores", h.cores], ["Up for", dur(h.host_uptime_s * 1000)]]);
    const used = h.memory_total_bytes - h.memory_available_bytes;
    const meter = (label, frac, text) => el("div", { class: "meter" }, el("span", {}, label),
      el("div", { class: "bar", role: "meter", "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": Math.round(frac * 100), "aria-label": label },
        el("span", { style: { width: `${Math.min(100, frac * 100).toFixed(0)}%` } })), el("span", {}, text));
    $("#ov-load").replaceChildren(
      ...h.load.map((l, i) => meter(`load ${[1, 5, 15][i]} min`, l / h.cores, l.toFixed(2))),
      meter("memory", used / Math.max(1, h.memory_total_bytes), `${bytes(used)} of ${bytes(h.memory_total_bytes)}`));
  }
  const list = (items, empty, row) => (items.length ? el("ul", { class: "plain" }, items.map((x) => el("li", {}, ...row(x)))) : el("p", { class: "empty" }, empty));
  $("#ov-bases").replaceChildren(list(S.bases, "No base VM.", (b) => [el("strong", {}, b.name), " ", el("span", { class: "mono" }, short(b.digest)),
    ` · memory ${bytes(b.memory_bytes)} · disk ${bytes(b.disk_bytes)}`]));
  $("#ov-cache").replaceChildren(list(S.cache, "Empty.", (c) => [el("span", { class: "mono" }, short(c.overlay_digest)),
    ` · ${bytes(c.bytes)} · ${c.hits} hit${c.hits === 1 ? "" : "s"} · used ${when(c.last_used_unix_ms)}`]));
  $("#ov-services").replaceChildren(list(S.services, "No service VM.", (v) => [el("strong", {}, v.id), ` (${v.os}${v.port ? `, port ${v.port}` : ", baseline"})`,
    v.description ? ` · ${v.description}` : "", v.client_apps.length ? ` · apps: ${v.client_apps.join(", ")}` : ""]));
}

// Rows are kept by instance id and only their cells rewritten: a button being pressed
// (or holding the focus) survives the feed's updates.
const rowsById = new Map();
function instanceRow(i) {
  let r = rowsById.get(i.id);
  if (!r) {
    const cells = {};
    for (const k of ["name", "mechanism", "device", "endpoint", "age", "idle", "traffic"]) cells[k] = el("td", {});
    for (const k of ["age", "idle", "traffic"]) cells[k].className = "num";
    cells.endpoint.className = "mono";
    const stop = twoStep("Stop", "Confirm stop", () => stopInstance(i.id), { "data-action": "stop", "aria-label": `Stop ${i.id}` });
    const move = el("button", { type: "button", "data-action": "handoff", "aria-label": `Hand off ${i.id}`, onclick: () => showHandoffForm(i.id) }, "Hand off");
    const tr = el("tr", { "data-instance-id": i.id }, Object.values(cells), el("td", {}, el("div", { class: "actions" }, stop, move)));
    r = { tr, cells, stop, move };
    rowsById.set(i.id, r);
  }
  return r;
}
function renderInstances() {
  const now = Date.now();
  const live = new Set(S.instances.map((i) => i.id));
  for (const id of rowsById.keys()) if (!live.has(id)) rowsById.delete(id);
  const rows = S.instances.map((i) => {
    const r = instanceRow(i), c = r.cells, u = i.usage;
    c.name.replaceChildren(el("strong", {}, i.name), el("br"), el("span", { class: "mono" }, i.id));
    c.mechanism.textContent = words(i.mechanism) || "–";
    c.device.textContent = i.device || "–";
    c.endpoint.textContent = i.endpoint || "–";
    c.age.textContent = dur(now - i.started_unix_ms);
    c.idle.textContent = u ? dur(u.idle_ms + (now - S.instancesAt)) : "–";
    c.traffic.textContent = u ? `${bytes(u.bytes_to_guest)} / ${bytes(u.bytes_from_guest)}` : "–";
    if (!r.stop.classList.contains("confirm")) r.stop.disabled = !S.canChange;
    r.stop.title = S.canChange ? "" : "sign in to change";
    r.move.disabled = !S.canChange;
    r.move.title = S.canChange ? "move it, running, to another cloudlet" : "sign in to change";
    return r.tr;
  });
  const body = $("#instances tbody");
  if (rows.length !== body.children.length || rows.some((tr, k) => body.children[k] !== tr)) fill(body, rows);
  $("#instances-empty").hidden = rows.length > 0;
}
async function stopInstance(id) {
  const v = await api("DELETE", `/v1/instances/${encodeURIComponent(id)}`);
  notice(`Instance ${v.id} stopped.`, true);
}
function showHandoffForm(id) {
  S.handoffTarget = id;
  $("#handoff-what").textContent = id;
  $("#handoff-form").hidden = false;
  $("#handoff-to").focus();
}
function hideHandoffForm() { $("#handoff-form").hidden = true; S.handoffTarget = null; }
$("#handoff-cancel").addEventListener("click", hideHandoffForm);
$("#handoff-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const id = S.handoffTarget, to = $("#handoff-to").value.trim(), mode = $("#handoff-mode").value || undefined;
  hideHandoffForm();
  S.follow = id;
  location.hash = "handoffs";
  try {
    const r = await api("POST", `/v1/instances/${encodeURIComponent(id)}/handoff`, { to, mode });
    notice(`${id} moved to ${r.to} in ${r.total_s.toFixed(1)} s (down ${r.downtime_s.toFixed(2)} s); it answers at ${r.endpoint}.`, true);
  } catch (err) { notice(`Handoff of ${id}: ${err.message}`); }
});

function renderSessions() {
  const scale = Math.max(1, ...S.sessions.map((s) => Math.max(s.timings?.first_response_ms || 0, s.first_ready_ms || 0,
    s.timings?.applied_ms || 0, s.timings?.received_ms || 0)));
  const rows = S.sessions.map((s) => {
    const t = s.timings || {};
    const label = [s.first_ready_ms != null ? `ready ${dur(s.first_ready_ms)}` : null,
      t.first_response_ms != null ? `first answer ${dur(t.first_response_ms)}` : null].filter(Boolean).join(" · ");
    return el("tr", { "data-session-id": s.id },
      el("td", {}, el("span", { class: "mono" }, s.id), el("br"), el("small", {}, when(s.started_unix_ms))),
      el("td", {}, words(s.mode)),
      el("td", {}, s.device),
      el("td", {}, el("span", { class: `pill ${s.status}`, title: s.error || "" }, s.status)),
      el("td", { class: "num" }, bytes(s.bytes_received)),
      el("td", { class: "bars" }, window.forageCharts.breakdownBar(s, scale), el("small", {}, label || (s.error ? s.error : "–"))));
  });
  fill($("#sessions tbody"), rows);
  $("#sessions-empty").hidden = rows.length > 0;
}

function renderCredentials() {
  const now = Date.now();
  const rows = S.credentials.map((c) => {
    const state = c.revoked_unix_ms ? "revoked" : c.not_after_unix_ms <= now ? "expired" : "valid";
    return el("tr", { "data-credential": c.name },
      el("td", {}, el("strong", {}, c.name)), el("td", {}, c.kind), el("td", { class: "num" }, c.serial), el("td", {}, c.via),
      el("td", {}, when(c.issued_unix_ms)),
      el("td", {}, el("span", { class: `pill ${state}` }, state === "valid" ? `valid until ${new Date(c.not_after_unix_ms).toLocaleDateString()}` : state)),
      el("td", {}, state === "valid" ? twoStep("Revoke", "Confirm revoke", async () => {
        await api("DELETE", `/v1/pairing/credentials/${c.serial}`);
        notice(`${c.name} revoked: refused from its next connection.`, true);
      }, { "data-action": "revoke", "aria-label": `Revoke ${c.name}` }) : ""));
  });
  fill($("#credentials tbody"), rows);
  $("#credentials-empty").hidden = rows.length > 0;
  $("#pair-make").disabled = !S.canChange;
  $("#pair-make").title = S.canChange ? "" : "sign in to change";
}
let expiryTimer = null;
$("#pair-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  try {
    const c = await api("POST", "/v1/pairing/codes", { kind: $("#pair-kind").value, valid_days: Number($("#pair-days").value) });
    $("#pair-code").textContent = c.code;
    $("#pair-qr").src = "data:image/svg+xml;base64," + btoa(c.qr_svg);
    $("#pair-qr").dataset.uri = c.uri;
    $("#pair-cmd").textContent = `forage pair --uri '${c.uri}'`;
    $("#pair-result").hidden = false;
    clearInterval(expiryTimer);
    const tick = () => {
      const left = c.expires_unix_ms - Date.now();
      $("#pair-expiry").textContent = left > 0 ? `Usable once, for ${Math.ceil(left / 1000)} s more; gives ${c.kind} credentials for ${c.valid_days} days.` : "Expired: make another.";
    };
    tick();
    expiryTimer = setInterval(tick, 1000);
  } catch (err) { notice(`Pairing code: ${err.message}`); }
});

function renderHandoffs() {
  if (!S.selected && S.handoffs.length) S.selected = S.handoffs[0].id;
  const items = S.handoffs.map((h) => el("li", {}, el("button", { type: "button", "aria-pressed": String(h.id === S.selected), "data-handoff": h.id,
    onclick: () => { S.selected = h.id; renderHandoffs(); } },
    el("strong", {}, `${h.instance} → ${h.to}`), el("small", {}, `${h.status} · ${when(h.started_unix_ms)} · ${h.mode || "adaptive"}`))));
  $("#handoff-list").replaceChildren(...items);
  renderChart();
}
function renderChart() {
  const h = S.handoffs.find((x) => x.id === S.selected);
  const box = $("#handoff-chart");
  if (!h) { box.replaceChildren(); return; }
  $("#handoff-caption").textContent = `${h.instance} to ${h.to}: ${h.status}${h.error ? ` (${h.error})` : ""}`;
  box.replaceChildren(window.forageCharts.handoffChart(h.trace, { status: h.status, title: `handoff ${h.id}` }));
  const switches = h.trace.filter((r) => r.switched).map((r) => `${r.t_s.toFixed(1)} s ${r.mode}`);
  kv($("#handoff-summary"), [["Status", h.status], ["Mode", h.trace.length ? h.trace[h.trace.length - 1].mode : h.mode || "adaptive"],
    ["Switches", switches.join(", ") || "none"], ["Points", h.trace.length],
    ["Total", h.total_s != null ? `${h.total_s.toFixed(1)} s (down ${h.downtime_s.toFixed(2)} s)` : "running"],
    ["Sent", h.bytes != null ? `${bytes(h.bytes)} of ${bytes(h.modified_bytes)} modified` : "–"]]);
}

function renderNetwork() {
  const c = S.cloudlets;
  $("#network-hint").textContent = c.browsing ? "Cloudlets announcing _cloudlet._tcp over multicast DNS, kept current."
    : "This cloudlet does not browse the network (serve --no-advertise).";
  const rows = c.cloudlets.map((x) => {
    const host = x.addr.replace(/:\d+$/, "");
    return el("tr", { "data-cloudlet": x.name },
      el("td", {}, el("strong", {}, x.name), x.this ? " (this one)" : ""),
      el("td", { class: "mono" }, x.addr, x.http_port ? [" ", el("a", { href: `http://${host}:${x.http_port}/`, title: "its manager: reachable when its API listens on the network (serve --api ADDR)" }, "manager")] : ""),
      el("td", { class: "mono" }, x.bases.join(", ") || "–"), el("td", {}, x.services.join(", ") || "–"),
      el("td", { class: "num" }, `${x.load} on ${x.cores} cores`), el("td", { class: "num" }, bytes(x.free_mem_mib * 1048576)),
      el("td", { class: "num" }, x.rtt_ms != null ? `${x.rtt_ms.toFixed(1)} ms` : "no answer"), el("td", {}, when(x.last_seen_unix_ms)));
  });
  fill($("#cloudlets tbody"), rows);
  $("#cloudlets-empty").hidden = rows.length > 0;
}

// Ages and idle times move on between two messages.
setInterval(() => { if (!$("#view-instances").hidden) renderInstances(); }, 1000);

show(location.hash.slice(1) || "overview", false);
connect();
