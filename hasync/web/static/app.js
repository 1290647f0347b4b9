// The High Availability page: vanilla JS over the JSON API (/api/openapi.json).
// All data is written with textContent, never as HTML, so nothing the daemon or
// a peer reports can inject markup.
"use strict";

const ui = {
  csrf: null,
  groups: [],
  interfaces: [],
  editingGroup: null, // null: the form adds a group; a group object: it edits that one
  polling: false,
  timer: null,
};

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
const ROLE_TEXT = { master: "Master", backup: "Backup" };

// ---- talking to the API -----------------------------------------------------

async function api(method, path, body) {
  const options = { method, headers: {}, credentials: "same-origin" };
  if (method !== "GET") {
    options.headers["Content-Type"] = "application/json";
    options.headers["X-CSRF-Token"] = ui.csrf || "";
    options.body = JSON.stringify(body || {});
  }
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    return { status: 0, body: { ok: false, error: "the web server is not answering" } };
  }
  let data;
  try {
    data = await response.json();
  } catch (err) {
    data = { ok: false, error: `HTTP ${response.status}` };
  }
  if (response.status === 401 && path !== "/api/login") showLogin();
  return { status: response.status, body: data };
}

// ---- messages ---------------------------------------------------------------

function showInfo(text) {
  $("#error-message").hidden = true;
  $("#info-text").textContent = text;
  $("#info-message").hidden = false;
}

function showError(text) {
  $("#info-message").hidden = true;
  $("#error-message").textContent = text;
  $("#error-message").hidden = false;
}

function clearMessages() {
  $("#info-message").hidden = true;
  $("#error-message").hidden = true;
}

// The daemon names the culprit as a dotted config path: group[0].monitor[1].floating_ip.
// The form's error slots use the part after the group: monitor[1].floating_ip.
function errorKey(field) {
  return (field || "").replace(/^group(\[\d+\])?\.?/, "");
}

function reasonOnly(error, field) {
  const prefix = `${field}: `;
  return field && error.startsWith(prefix) ? error.slice(prefix.length) : error;
}

function clearFieldErrors(form) {
  $$(".field-error", form).forEach((slot) => { slot.textContent = ""; });
  $$(".invalid", form).forEach((input) => input.classList.remove("invalid"));
}

function showFieldError(form, field, error) {
  const key = errorKey(field);
  const slot = $$("[data-error-for]", form).find((s) => s.dataset.errorFor === key)
    || $$("[data-error-for]", form).find((s) => s.dataset.errorFor === key.replace(/\[\d+\].*$/, ""))
    || $('[data-error-for=""]', form);
  slot.textContent = reasonOnly(error, field);
  const input = $$("[data-field]", form).find((i) => i.dataset.field === key);
  if (input) {
    input.classList.add("invalid");
    if (input.closest("details")) input.closest("details").open = true;
    input.focus();
  }
}

function confirmAction(text) {
  const dialog = $("#confirm-dialog");
  $("#confirm-text").textContent = text;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.returnValue = "";
    dialog.showModal();
  });
}

// ---- login ------------------------------------------------------------------

function showLogin(message) {
  stopPolling();
  ui.csrf = null;
  $("#ha-view").hidden = true;
  $("#logout").hidden = true;
  $("#login-view").hidden = false;
  $("#login-error").textContent = message || "";
  $("#login-password").focus();
}

async function login(event) {
  event.preventDefault();
  const { status, body } = await api("POST", "/api/login", { password: $("#login-password").value });
  if (status !== 200) {
    $("#login-error").textContent = body.error || "login failed";
    return;
  }
  $("#login-password").value = "";
  ui.csrf = body.csrf_token;
  await enterPage();
}

async function logout() {
  await api("POST", "/api/logout");
  showLogin("Logged out.");
}

async function enterPage() {
  $("#login-view").hidden = true;
  $("#ha-view").hidden = false;
  $("#logout").hidden = false;
  await Promise.all([loadInterfaces(), loadGroups()]);
  await pollStatus();
  startPolling();
}

// ---- the HA icon and the status card ---------------------------------------

function startPolling() {
  stopPolling();
  ui.timer = setInterval(pollStatus, 1000);
}

function stopPolling() {
  if (ui.timer) clearInterval(ui.timer);
  ui.timer = null;
}

async function pollStatus() {
  if (ui.polling) return; // a slow answer must not pile requests up
  ui.polling = true;
  try {
    const { status, body } = await api("GET", "/api/status");
    if (status === 401) return;
    renderStatus(status === 200 ? body : null, body.error);
    // a group added, edited or deleted elsewhere (CLI, another browser): refresh the details
    const shownId = ui.groups.length ? ui.groups[0].id : null;
    if (status === 200 && (body.group ?? null) !== shownId) await loadGroups();
  } finally {
    ui.polling = false;
  }
}

function setIcon(colour, role, title) {
  const icon = $("#ha-icon");
  icon.className = `ha-icon ${colour}`;
  icon.dataset.icon = colour;
  icon.setAttribute("aria-label", `High Availability: ${colour}`);
  $("#ha-indicator").title = title;
  $("#ha-role").textContent = role || "";
}

function fact(dl, name, value) {
  const dt = document.createElement("dt");
  dt.textContent = name;
  const dd = document.createElement("dd");
  if (value instanceof Node) dd.appendChild(value); else dd.textContent = value;
  dl.append(dt, dd);
}

function linksNode(links) {
  const span = document.createElement("span");
  Object.keys(links || {}).sort().forEach((name) => {
    const dot = document.createElement("span");
    dot.className = `dot ${links[name] ? "up" : "down"}`;
    span.append(dot, `${name} ${links[name] ? "up" : "DOWN"}   `);
  });
  return span;
}

function when(epochSeconds) {
  return epochSeconds ? new Date(epochSeconds * 1000).toLocaleString() : "";
}

function renderStatus(s, error) {
  const dl = $("#status-facts");
  dl.replaceChildren();
  const reasons = $("#reasons");
  reasons.replaceChildren();
  if (!s) {
    setIcon("red", "", "the hasync daemon is not answering");
    fact(dl, "Daemon", error || "not answering");
    $("#reasons-box").hidden = true;
    return;
  }
  const stateText = { grey: "HA disabled", green: "working", red: "failover would not work" }[s.icon] || s.icon;
  setIcon(s.icon, s.role, `High Availability: ${stateText}`);
  $("#nav-host").textContent = s.hostname || "";
  $("#global-status-text").textContent = s.enabled ? "Enabled" : "Disabled";
  fact(dl, "This node", `${s.hostname || ""} — ${s.role || "no role"} (state ${s.state})`);
  fact(dl, "HA icon", stateText);
  const peer = s.peer;
  if (peer) {
    const seen = peer.alive ? `seen ${peer.last_seen_ms_ago} ms ago on ${(peer.paths_alive || []).join(", ") || "no path"}`
      : "lost";
    fact(dl, "Peer", `${peer.hostname} — ${peer.state}, priority ${peer.priority}, release ${peer.version}; ${seen}`);
  } else {
    fact(dl, "Peer", s.group ? "not seen yet" : "—");
  }
  const sync = s.sync;
  if (sync) {
    const parts = [sync.connected ? "connected" : "not connected",
      `${sync.entries_applied || 0} entries applied`, `${sync.entries_sent || 0} sent`,
      `lag ${sync.lag_ms ?? "?"} ms`];
    const generation = sync.config_generation ?? (sync.config || {}).generation;
    if (generation !== undefined && generation !== null) parts.push(`config generation ${generation}`);
    if (sync.last_resync) parts.push(`last resync ${typeof sync.last_resync === "number" ? when(sync.last_resync) : sync.last_resync}`);
    fact(dl, "State sync", parts.join(", "));
  } else {
    fact(dl, "State sync", "off");
  }
  const last = s.last_transition;
  fact(dl, "Last role change", last ? `${last.old} → ${last.new}: ${last.cause} (${when(last.time)})` : "none since start");
  if ((s.floating_ips || []).length) fact(dl, "Floating IPs", s.floating_ips.join(", "));
  if (s.links && Object.keys(s.links).length) fact(dl, "Links", linksNode(s.links));
  (s.reasons || []).forEach((reason) => {
    const li = document.createElement("li");
    li.textContent = reason;
    reasons.appendChild(li);
  });
  $("#reasons-box").hidden = !(s.icon === "red" && (s.reasons || []).length);
  $("#switchover").disabled = !s.group || !s.enabled;
  $("#resync").disabled = !s.sync;
}

// ---- Global Settings --------------------------------------------------------

function editGlobal() {
  clearMessages();
  $("#config-status").value = $("#global-status-text").textContent === "Enabled" ? "enable" : "disable";
  $("#global-view").hidden = true;
  $("#global-form").hidden = false;
}

function closeGlobal() {
  clearFieldErrors($("#global-form"));
  $("#global-form").hidden = true;
  $("#global-view").hidden = false;
}

async function updateGlobal(event) {
  event.preventDefault();
  const form = $("#global-form");
  clearFieldErrors(form);
  const { body } = await api("POST", "/api/global", { status: $("#config-status").value });
  if (!body.ok) {
    if (body.field) showFieldError(form, body.field, body.error); else showError(body.error);
    return;
  }
  closeGlobal();
  showInfo(body.message || "Global Settings Updated");
  await pollStatus();
}

// ---- groups -----------------------------------------------------------------

async function loadInterfaces() {
  const { body } = await api("GET", "/api/interfaces");
  ui.interfaces = body.ok ? body.interfaces : [];
}

async function loadGroups() {
  for (let attempt = 0; attempt < 3; attempt += 1) { // a keep-alive connection may close under us
    const { status, body } = await api("GET", "/api/groups");
    if (body.ok) {
      ui.groups = body.groups || [];
      renderGroups();
      return;
    }
    if (status === 401) return;
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}

const DETAIL_ROWS = [
  ["Group ID", (g) => g.id],
  ["HA State", (g) => ROLE_TEXT[g.state] || g.state],
  ["HA Link Interface", (g) => g.ha_link],
  ["Peer HA Link Address", (g) => g.peer_address],
  ["Peer HA Link Mask", (g) => `/${g.peer_mask}`],
  ["Priority", (g) => g.priority],
  ["Heartbeat interval", (g) => `${g.heartbeat_interval_ms} ms × ${g.dead_count} (dead after ${g.heartbeat_interval_ms * g.dead_count} ms)`],
  ["Preemption", (g) => (g.preempt === "delay" ? `delay ${g.preempt_delay_ms} ms` : g.preempt)],
];

function renderGroups() {
  const group = ui.groups[0];
  $("#no-group").hidden = Boolean(group);
  $("#add-group").hidden = Boolean(group); // one group per node: edit it instead
  $("#group-details").hidden = !group;
  const rows = $("#group-details-rows");
  rows.replaceChildren();
  if (!group) return;
  const addRow = (name, value) => {
    const tr = document.createElement("tr");
    const a = document.createElement("td");
    a.textContent = name;
    const b = document.createElement("td");
    b.textContent = String(value);
    tr.append(a, b);
    rows.appendChild(tr);
  };
  DETAIL_ROWS.forEach(([name, get]) => addRow(name, get(group)));
  (group.monitor || []).forEach((m, i) => addRow(`Monitoring Interface ${i + 1}`, `${m.interface} — Floating IP ${m.floating_ip}`));
}

function fillInterfaceSelect(select, chosen) {
  select.replaceChildren();
  const placeholder = new Option("— select —", "");
  select.appendChild(placeholder);
  ui.interfaces.forEach((iface) => {
    const label = iface.addresses.length ? `${iface.name} (${iface.addresses.join(", ")})` : iface.name;
    select.appendChild(new Option(label, iface.name));
  });
  if (chosen && !ui.interfaces.some((i) => i.name === chosen)) select.appendChild(new Option(`${chosen} (missing)`, chosen));
  select.value = chosen || "";
}

function renumberMonitors() {
  $$(".monitor-row", $("#monitor-rows")).forEach((row, i) => {
    const select = $(".monitor-interface", row);
    const input = $(".monitor-floating-ip", row);
    select.dataset.field = `monitor[${i}].interface`;
    input.dataset.field = `monitor[${i}].floating_ip`;
    select.id = `f-monitor-${i}-interface`;
    input.id = `f-monitor-${i}-floating-ip`;
    const labels = $$("label", row);
    labels[0].htmlFor = select.id;
    labels[1].htmlFor = input.id;
    $(".monitor-interface-error", row).dataset.errorFor = `monitor[${i}].interface`;
    $(".monitor-floating-ip-error", row).dataset.errorFor = `monitor[${i}].floating_ip`;
    $(".remove-monitor", row).hidden = i === 0;
  });
}

function addMonitorRow(monitor) {
  const row = $("#monitor-row-template").content.firstElementChild.cloneNode(true);
  fillInterfaceSelect($(".monitor-interface", row), monitor ? monitor.interface : "");
  $(".monitor-floating-ip", row).value = monitor ? monitor.floating_ip : "";
  $(".remove-monitor", row).addEventListener("click", () => { row.remove(); renumberMonitors(); });
  $("#monitor-rows").appendChild(row);
  renumberMonitors();
  return row;
}

function openGroupForm(group) {
  clearMessages();
  ui.editingGroup = group || null;
  const form = $("#group-form");
  form.reset();
  clearFieldErrors(form);
  $("#group-form-title").textContent = group ? "Edit HA Group" : "Add HA Group";
  $("#group-submit").textContent = group ? "Update" : "Submit";
  fillInterfaceSelect($("#f-ha-link"), group ? group.ha_link : "");
  $("#monitor-rows").replaceChildren();
  if (group) {
    $("#f-state").value = group.state;
    $("#f-peer-address").value = group.peer_address;
    $("#f-peer-mask").value = group.peer_mask;
    $("#f-id").value = group.id;
    $("#f-id").disabled = true; // the group is named by its id
    $("#f-priority").value = group.priority;
    $("#f-interval").value = group.heartbeat_interval_ms;
    $("#f-dead").value = group.dead_count;
    $("#f-preempt").value = group.preempt;
    $("#f-preempt-delay").value = group.preempt_delay_ms;
    (group.monitor || []).forEach((m) => addMonitorRow(m));
  } else {
    $("#f-id").disabled = false;
    addMonitorRow();
  }
  $("#group-form-card").hidden = false;
  $("#group-form-card").scrollIntoView({ block: "start" });
}

function closeGroupForm() {
  $("#group-form-card").hidden = true;
  ui.editingGroup = null;
}

function formFields() {
  const fields = {};
  ["state", "ha_link", "peer_address", "peer_mask", "id", "priority", "heartbeat_interval_ms",
    "dead_count", "preempt", "preempt_delay_ms"].forEach((name) => {
    const input = $(`#group-form [name="${name}"]`);
    if (!input.disabled) fields[name] = input.value.trim();
  });
  fields.monitors = $$(".monitor-row", $("#monitor-rows")).map((row) => ({
    interface: $(".monitor-interface", row).value,
    floating_ip: $(".monitor-floating-ip", row).value.trim(),
  }));
  return fields;
}

async function submitGroup(event) {
  event.preventDefault();
  const form = $("#group-form");
  clearFieldErrors(form);
  clearMessages();
  const editing = ui.editingGroup;
  const { body } = editing
    ? await api("PUT", `/api/groups/${editing.id}`, formFields())
    : await api("POST", "/api/groups", formFields());
  if (!body.ok) {
    showFieldError(form, body.field || "", body.error || "refused");
    return;
  }
  closeGroupForm();
  showInfo(body.message || (editing ? "HA Group Updated Successfully" : "HA Group Added Successfully"));
  await loadGroups();
  await pollStatus();
}

async function deleteGroup() {
  const group = ui.groups[0];
  if (!group || !(await confirmAction(`Delete HA group ${group.id}? This node stops taking part in failover.`))) return;
  const { body } = await api("DELETE", `/api/groups/${group.id}`);
  if (body.ok) showInfo(body.message || "HA Group Deleted"); else showError(body.error);
  closeGroupForm();
  await loadGroups();
  await pollStatus();
}

// ---- operations -------------------------------------------------------------

async function switchover() {
  const ok = await confirmAction("Hand the Master role over to the peer now? Traffic moves to the other node.");
  if (!ok) return;
  const { body } = await api("POST", "/api/switchover");
  if (body.ok) showInfo(body.message || "Switchover started"); else showError(body.error);
  await pollStatus();
}

async function resync() {
  const configOnly = $("#resync-config-only").checked;
  const what = configOnly ? "the replicated configuration" : "the whole connection table and configuration";
  if (!(await confirmAction(`Resync ${what} from the Master now?`))) return;
  const { body } = await api("POST", "/api/resync", { config: configOnly });
  if (body.ok) showInfo(body.message || "Resync started"); else showError(body.error);
}

// ---- start ------------------------------------------------------------------

async function start() {
  $("#login-form").addEventListener("submit", login);
  $("#logout").addEventListener("click", logout);
  $("#global-edit").addEventListener("click", editGlobal);
  $("#global-cancel").addEventListener("click", closeGlobal);
  $("#global-form").addEventListener("submit", updateGlobal);
  $("#add-group").addEventListener("click", async () => { await loadInterfaces(); openGroupForm(null); });
  $("#group-edit").addEventListener("click", async () => { await loadInterfaces(); openGroupForm(ui.groups[0]); });
  $("#group-delete").addEventListener("click", deleteGroup);
  $("#group-cancel").addEventListener("click", closeGroupForm);
  $("#group-form").addEventListener("submit", submitGroup);
  $("#add-monitor").addEventListener("click", () => $(".monitor-floating-ip", addMonitorRow()).focus());
  $("#switchover").addEventListener("click", switchover);
  $("#resync").addEventListener("click", resync);

  const { body } = await api("GET", "/api/session");
  $("#nav-host").textContent = body.hostname || "";
  if (body.authenticated) {
    ui.csrf = body.csrf_token;
    await enterPage();
  } else {
    showLogin(body.password_set === false ? "No admin password is set: run `hasync web passwd` on the node." : "");
  }
}

document.addEventListener("DOMContentLoaded", start);
