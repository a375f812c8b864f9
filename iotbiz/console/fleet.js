// The fleet page: every device, filtered and paged by keyset cursor, updated live.

import { ADMIN, get, query } from "./api.js";
import {
  appBadge,
  appsOf,
  clear,
  h,
  number,
  onlineDot,
  relativeTime,
  systemOf,
  deviceStateBadge,
} from "./dom.js";
import { counts, subscribe, throttled } from "./live.js";
import { emptyRow, loadingRow, pageHeader, showError, hideError } from "./ui.js";

const PAGE_SIZE = 100;
const COLUMNS = 7;

// Kept while the console is open, so that coming back from a device finds the same view.
const view = {
  filters: { q: "", online: "", state: "", customer: "", tag: "" },
  cursor: null, // the cursor of the page shown (null: the first)
  previous: [], // cursors of the pages before it
};

function meter(value) {
  if (typeof value !== "number" || !Number.isFinite(value)) return h("span", { class: "muted" }, "—");
  const clamped = Math.max(0, Math.min(100, value));
  const tone = clamped >= 90 ? "bad" : clamped >= 75 ? "warn" : "ok";
  const fill = h("span", { class: `meter-fill meter-${tone}` });
  fill.style.width = `${clamped}%`;
  return h(
    "span",
    { class: "meter-cell" },
    h("span", { class: "meter-value" }, `${Math.round(value)}%`),
    h("span", { class: "meter" }, fill),
  );
}

function deviceHref(device) {
  return `#/devices/${encodeURIComponent(device.customer_id)}/${encodeURIComponent(device.device_id)}`;
}

function deviceRow(device) {
  const { cpu, memory } = systemOf(device);
  const apps = appsOf(device);
  return h(
    "tr",
    {
      testid: "device-row",
      class: [
        device.online ? "row-online" : "row-offline",
        apps.some((app) => app.state === "FATAL") ? "row-bad" : "",
        apps.some((app) => app.state === "BACKOFF") ? "row-warn" : "",
      ].join(" "),
      dataset: { name: device.name, online: device.online ? "true" : "false" },
    },
    h(
      "td",
      { class: "cell-name" },
      h("a", { href: deviceHref(device), class: "device-link", testid: "device-link" }, device.device_id),
      device.state !== "active" ? deviceStateBadge(device.state) : null,
    ),
    h("td", { class: "cell-customer" }, device.customer_id),
    h(
      "td",
      { class: "cell-online" },
      onlineDot(device.online),
      h("span", { class: "online-text" }, device.online ? "Online" : "Offline"),
    ),
    h("td", { class: "cell-seen" }, relativeTime(device.last_seen_at)),
    h("td", { class: "cell-num" }, meter(cpu)),
    h("td", { class: "cell-num" }, meter(memory)),
    h(
      "td",
      {},
      h(
        "div",
        { class: "cell-apps", testid: "device-apps" },
        apps.length ? apps.map((app) => appBadge(app)) : h("span", { class: "muted" }, "—"),
      ),
    ),
  );
}

function statTile(label, testid, tone) {
  const value = h("div", { class: "stat-value", testid }, "—");
  return {
    el: h("div", { class: `stat stat-${tone}` }, h("div", { class: "stat-label" }, label), value),
    set(n) {
      value.textContent = typeof n === "number" ? number(n) : "—";
    },
  };
}

/** Open the fleet filtered to one customer (from the customers page). */
export function filterByCustomer(customerId) {
  view.filters = { q: "", online: "", state: "", customer: customerId, tag: "" };
  view.cursor = null;
  view.previous = [];
}

export function fleetPage(main) {
  const controller = new AbortController();
  let shown = new Set();
  let shownCount = 0;
  let lastTotal = null;
  let serial = 0;
  let firstRender = true;

  const total = statTile("Devices", "fleet-total", "plain");
  const online = statTile("Online", "fleet-online", "ok");
  const offline = statTile("Offline", "fleet-offline", "muted");
  const matching = statTile("Matching filters", "fleet-matching", "plain");
  const setCounts = () => {
    total.set(counts.total);
    online.set(counts.online);
    offline.set(
      typeof counts.total === "number" && typeof counts.online === "number"
        ? counts.total - counts.online
        : null,
    );
  };
  setCounts();

  // ---- filters ----
  const search = h("input", {
    class: "input input-search",
    type: "search",
    placeholder: "Search devices by name…",
    title: "Search (press / to jump here)",
    value: view.filters.q,
    testid: "fleet-search",
    "aria-label": "Search",
  });
  const select = (key, label, options, testid) => {
    const el = h(
      "select",
      { class: "select", testid, "aria-label": label },
      options.map(([value, text]) => h("option", { value }, text)),
    );
    el.value = view.filters[key];
    el.addEventListener("change", () => setFilter(key, el.value));
    return el;
  };
  const onlineSelect = select(
    "online",
    "Connection",
    [["", "Any connection"], ["true", "Online"], ["false", "Offline"]],
    "fleet-filter-online",
  );
  const stateSelect = select(
    "state",
    "State",
    [["", "Any state"], ["active", "Active"], ["pending", "Pending"], ["revoked", "Revoked"]],
    "fleet-filter-state",
  );
  const customerSelect = select("customer", "Customer", [["", "All customers"]], "fleet-filter-customer");
  const tagInput = h("input", {
    class: "input input-tag",
    type: "text",
    placeholder: "Tag key=value",
    value: view.filters.tag,
    testid: "fleet-filter-tag",
    "aria-label": "Tag",
  });
  const clearButton = h("button", { class: "btn btn-ghost", type: "button", testid: "fleet-clear" }, "Clear");

  let searchTimer = null;
  search.addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => setFilter("q", search.value.trim()), 250);
  });
  tagInput.addEventListener("keydown", (event) => {
    if (event.key === "Enter") setFilter("tag", tagInput.value.trim());
  });
  tagInput.addEventListener("change", () => setFilter("tag", tagInput.value.trim()));
  clearButton.addEventListener("click", () => {
    view.filters = { q: "", online: "", state: "", customer: "", tag: "" };
    search.value = tagInput.value = "";
    onlineSelect.value = stateSelect.value = customerSelect.value = "";
    firstPage();
  });

  function setFilter(key, value) {
    if (view.filters[key] === value) return;
    view.filters[key] = value;
    firstPage();
  }

  function firstPage() {
    view.cursor = null;
    view.previous = [];
    load(true);
  }

  // ---- table and paging ----
  const tbody = h("tbody", { testid: "fleet-rows" }, loadingRow(COLUMNS));
  tbody.addEventListener("click", (event) => {
    const row = event.target.closest("tr[data-name]");
    if (!row || event.target.closest("a, button") || window.getSelection().toString()) return;
    const link = row.querySelector("a.device-link");
    if (link) location.hash = link.getAttribute("href");
  });
  const table = h(
    "table",
    { class: "table table-fleet", testid: "fleet-table" },
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        ["Device", "Customer", "Status", "Last seen", "CPU", "Memory", "Apps"].map((title) =>
          h("th", {}, title),
        ),
      ),
    ),
    tbody,
  );
  const prev = h("button", { class: "btn", type: "button", testid: "fleet-prev", disabled: true }, "← Previous");
  const next = h("button", { class: "btn", type: "button", testid: "fleet-next", disabled: true }, "Next →");
  const pageInfo = h("span", { class: "page-info", testid: "fleet-page-info" }, "");
  let nextCursor = null;
  next.addEventListener("click", () => {
    if (!nextCursor) return;
    view.previous.push(view.cursor);
    view.cursor = nextCursor;
    load(true);
  });
  prev.addEventListener("click", () => {
    if (!view.previous.length) return;
    view.cursor = view.previous.pop();
    load(true);
  });

  async function load(userAction = false) {
    const mine = ++serial;
    refetch.touch();
    const f = view.filters;
    const params = {
      q: f.q,
      online: f.online,
      state: f.state,
      customer: f.customer,
      tag: f.tag,
      limit: PAGE_SIZE,
      cursor: view.cursor,
    };
    if (userAction) table.classList.add("is-loading");
    try {
      const page = await get(`${ADMIN}/devices${query(params)}`, { signal: controller.signal });
      if (mine !== serial) return;
      hideError();
      render(page);
    } catch (error) {
      if (mine !== serial || error.name === "AbortError") return;
      showError(error, "Loading the fleet failed");
      if (firstRender) {
        clear(tbody).append(emptyRow(COLUMNS, "The fleet could not be loaded.", "fleet-error"));
      }
    } finally {
      if (mine === serial) table.classList.remove("is-loading");
    }
  }

  function render(page) {
    const devices = Array.isArray(page.devices) ? page.devices : [];
    shown = new Set(devices.map((d) => d.name));
    shownCount = devices.length;
    lastTotal = counts.total;
    nextCursor = page.next_cursor || null;
    const rows = devices.map(deviceRow);
    const filtered = Object.values(view.filters).some(Boolean);
    const empty = filtered
      ? "No devices match these filters."
      : "No devices yet. A device appears here once its agent registers (see docs/agent.md).";
    clear(tbody).append(...(rows.length ? rows : [emptyRow(COLUMNS, empty, "fleet-empty")]));
    matching.set(page.total);
    const first = view.previous.length * PAGE_SIZE;
    pageInfo.textContent = devices.length
      ? `${number(first + 1)}–${number(first + devices.length)} of ${number(page.total)}`
      : `0 of ${number(page.total)}`;
    prev.disabled = view.previous.length === 0;
    next.disabled = !nextCursor || devices.length < PAGE_SIZE;
    table.dataset.loaded = "true";
    if (firstRender) {
      firstRender = false;
      performance.mark("iotbiz-fleet-rows");
      setTimeout(loadCustomers, 0);
    }
  }

  // ---- live ----
  const refetch = throttled(() => load(false), 1000);
  const unsubscribe = subscribe((update) => {
    setCounts();
    const touchesPage =
      update.more ||
      update.changed.some((name) => shown.has(name)) ||
      (shownCount < PAGE_SIZE && update.changed.length > 0) ||
      (lastTotal !== null && update.total !== lastTotal);
    if (touchesPage) refetch();
  });

  // customers for the filter: asked for after the first page (at 10,000 devices the list with
  // its counts takes longer than a page of devices, and the store answers one query at a time)
  let customersAsked = false;
  const loadCustomers = () => {
    if (customersAsked) return;
    customersAsked = true;
    get(`${ADMIN}/customers`, { signal: controller.signal })
    .then((answer) => {
      for (const customer of answer.customers || []) {
        customerSelect.append(h("option", { value: customer.customer_id }, customer.customer_id));
      }
      customerSelect.value = view.filters.customer;
    })
    .catch((error) => {
      if (error.name !== "AbortError") showError(error, "Loading the customers failed");
    });
  };
  customerSelect.addEventListener("focus", loadCustomers);

  const onKey = (event) => {
    if (event.key === "/" && document.activeElement === document.body) {
      event.preventDefault();
      search.focus();
    }
  };
  document.addEventListener("keydown", onKey);

  main.append(
    pageHeader("Fleet", "Every device, its connection and its apps, updated live."),
    h("div", { class: "stats", testid: "fleet-stats" }, total.el, online.el, offline.el, matching.el),
    h(
      "section",
      { class: "card card-flush" },
      h(
        "div",
        { class: "toolbar" },
        search,
        onlineSelect,
        stateSelect,
        customerSelect,
        tagInput,
        clearButton,
      ),
      h("div", { class: "table-wrap" }, table),
      h("div", { class: "pager" }, pageInfo, h("div", { class: "pager-buttons" }, prev, next)),
    ),
  );
  load(true);

  return () => {
    controller.abort();
    refetch.cancel();
    unsubscribe();
    clearTimeout(searchTimer);
    document.removeEventListener("keydown", onKey);
  };
}
