// DOM helpers: elements are built with createElement and textContent only, never from markup,
// because device names, app names and log lines come from devices and are not to be trusted.

const SVG_NS = "http://www.w3.org/2000/svg";

function setProps(el, props) {
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.setAttribute("class", value);
    else if (key === "testid") el.dataset.testid = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key === "text") el.textContent = String(value);
    else if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2), value);
    } else if (key === "value" || key === "checked") el[key] = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** h("div", {class: "x", testid: "y", onclick: fn}, child, "text", [more]) */
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  setProps(el, props);
  return append(el, children);
}

/** An SVG element (attributes set as given). */
export function svg(tag, props, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  setProps(el, props);
  return append(el, children);
}

export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
  return el;
}

// ---- formatting ---------------------------------------------------------------------------

export function epoch(iso) {
  if (!iso) return null;
  const t = Date.parse(iso);
  return Number.isNaN(t) ? null : t / 1000;
}

/** "12 s ago", "5 min ago", "3 h ago", "2 d ago"; "never" for no time. */
export function ago(seconds, now = Date.now() / 1000) {
  if (seconds === null || seconds === undefined) return "never";
  const d = Math.max(0, now - seconds);
  if (d < 2) return "just now";
  if (d < 60) return `${Math.floor(d)} s ago`;
  if (d < 3600) return `${Math.floor(d / 60)} min ago`;
  if (d < 86400) return `${Math.floor(d / 3600)} h ago`;
  return `${Math.floor(d / 86400)} d ago`;
}

/** A <time> element whose relative text the page ticker keeps fresh. */
export function relativeTime(iso) {
  const seconds = epoch(iso);
  const el = h("time", { class: "rel", title: iso || "" }, ago(seconds));
  if (seconds !== null) {
    el.dataset.epoch = String(seconds);
    el.setAttribute("datetime", iso);
  }
  return el;
}

export function refreshRelativeTimes(root = document) {
  const now = Date.now() / 1000;
  for (const el of root.querySelectorAll("time.rel[data-epoch]")) {
    el.textContent = ago(Number(el.dataset.epoch), now);
  }
}

export function dateTime(iso) {
  const seconds = epoch(iso);
  if (seconds === null) return "—";
  const d = new Date(seconds * 1000);
  const pad = (n) => String(n).padStart(2, "0");
  return (
    `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`
  );
}

export function percent(value) {
  return typeof value === "number" && Number.isFinite(value) ? `${Math.round(value)}%` : "—";
}

/** 10000 -> "10,000". (Not toLocaleString: its first call loads locale data, ~60 ms.) */
export function number(value) {
  if (typeof value !== "number" || !Number.isFinite(value)) return "—";
  const [whole, fraction] = String(value).split(".");
  const grouped = whole.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  return fraction ? `${grouped}.${fraction}` : grouped;
}

export function object(value) {
  return value && typeof value === "object" && !Array.isArray(value) ? value : {};
}

/** The telemetry's apps as a clean list of objects with a string name. */
export function appsOf(device) {
  const apps = object(device && device.telemetry).apps;
  return Array.isArray(apps) ? apps.filter((a) => a && typeof a.name === "string") : [];
}

export function systemOf(device) {
  const system = object(object(device && device.telemetry).system);
  return { cpu: system.cpu_percent, memory: object(system.memory).percent };
}

const STATE_CLASS = {
  RUNNING: "ok",
  STARTING: "info",
  BACKOFF: "warn",
  STOPPING: "info",
  STOPPED: "muted",
  EXITED: "muted",
  FATAL: "bad",
  UNKNOWN: "muted",
};

/** A small badge for an app state ("web RUNNING"). */
export function appBadge(app, withName = true) {
  const state = typeof app.state === "string" ? app.state : "UNKNOWN";
  const tone = STATE_CLASS[state] || "muted";
  return h(
    "span",
    { class: `badge badge-${tone}`, title: app.reason ? String(app.reason) : state },
    withName ? h("span", { class: "badge-name" }, app.name) : null,
    state,
  );
}

const COMMAND_TONE = { done: "ok", failed: "bad", expired: "warn", sent: "info", queued: "muted" };
export function commandBadge(state) {
  return h("span", { class: `badge badge-${COMMAND_TONE[state] || "muted"}` }, state);
}

const DEVICE_TONE = { active: "ok", pending: "info", revoked: "bad" };
export function deviceStateBadge(state) {
  return h("span", { class: `badge badge-${DEVICE_TONE[state] || "muted"}` }, state);
}

export function onlineDot(online) {
  return h(
    "span",
    {
      class: `dot ${online ? "dot-on" : "dot-off"}`,
      title: online ? "online" : "offline",
      testid: "online-dot",
      dataset: { online: online ? "true" : "false" },
    },
    h("span", { class: "sr-only" }, online ? "online" : "offline"),
  );
}

export function spinner() {
  return h("span", { class: "spinner", "aria-hidden": "true" });
}

export function compactJson(value) {
  if (value === undefined || value === null) return "";
  try {
    return JSON.stringify(value);
  } catch {
    return String(value);
  }
}
