// Staged rollouts: the list (newest first) with a form to start one, and a rollout's page with
// its figures and devices, refreshed every 2 s while it runs, and its Abort button.

import { ADMIN, get, post, query } from "./api.js";
import { append, clear, dateTime, h, number, relativeTime } from "./dom.js";
import { actionButton, card, confirmDialog, emptyRow, hideError, loadingRow, pageHeader, showError, toast } from "./ui.js";

const POLL_MS = 2000;
const LIST_SIZE = 100;
const DEVICE_ROWS = 1000; // a rollout may have 100,000 devices: the page shows the first 1000
const STATE_TONE = { running: "info", completed: "ok", stopped: "bad", aborted: "warn" };
const RESULT_TONE = { waiting: "muted", updating: "info", committed: "ok", failed: "bad", skipped: "muted" };

export function rolloutPath(id) {
  return `${ADMIN}/rollouts/${encodeURIComponent(id)}`;
}

function badge(text, tone, testid) {
  return h("span", { class: `badge badge-${tone || "muted"}`, testid }, text);
}

const count = (value) => (typeof value === "number" && Number.isFinite(value) ? value : 0);

/** committed (green) and failed (red) as shares of total, and "3/10 committed, 1 failed". */
function progressBar(rollout) {
  const total = count(rollout.total);
  const committed = count(rollout.committed);
  const failed = count(rollout.failed);
  const share = (n) => `${total > 0 ? Math.min(100, (n / total) * 100) : 0}%`;
  const ok = h("span", { class: "progress-fill progress-ok" });
  ok.style.width = share(committed);
  const bad = h("span", { class: "progress-fill progress-bad" });
  bad.style.width = share(failed);
  return h(
    "div",
    {
      class: "progress",
      testid: "rollout-progress",
      dataset: { committed: String(committed), failed: String(failed), total: String(total) },
    },
    h("span", { class: "progress-bar", title: `${committed} committed, ${failed} failed of ${total}` }, ok, bad),
    h(
      "span",
      { class: "usage-text", testid: "rollout-progress-text" },
      `${number(committed)}/${number(total)} committed`,
      failed ? h("span", { class: "progress-failed" }, `, ${number(failed)} failed`) : null,
    ),
  );
}

// ---- the list -----------------------------------------------------------------------------

export function rolloutsPage(main) {
  const controller = new AbortController();
  const signal = controller.signal;
  const tbody = h("tbody", { testid: "rollout-rows" }, loadingRow(6));
  const table = h(
    "table",
    { class: "table", testid: "rollouts-table" },
    h("thead", {}, h("tr", {}, ["Rollout", "App", "Version", "State", "Progress", "Created"].map((t) => h("th", {}, t)))),
    tbody,
  );
  let timer = null;
  let serial = 0;

  function row(rollout) {
    return h(
      "tr",
      { testid: "rollout-row", dataset: { id: rollout.id, state: rollout.state } },
      h("td", { class: "mono small" }, h("a", { href: `#/rollouts/${rollout.id}`, testid: "rollout-link" }, rollout.id)),
      h("td", { testid: "rollout-app" }, rollout.app),
      h("td", { class: "mono", testid: "rollout-version" }, rollout.version),
      h("td", {}, badge(rollout.state, STATE_TONE[rollout.state], "rollout-state")),
      h("td", {}, progressBar(rollout)),
      h("td", { class: "nowrap small", title: dateTime(rollout.created_at) }, relativeTime(rollout.created_at)),
    );
  }

  async function load() {
    clearTimeout(timer);
    const mine = ++serial;
    try {
      const answer = await get(`${ADMIN}/rollouts${query({ limit: LIST_SIZE })}`, { signal });
      if (mine !== serial) return;
      const rollouts = Array.isArray(answer.rollouts) ? answer.rollouts : [];
      clear(tbody).append(...(rollouts.length ? rollouts.map(row) : [emptyRow(6, "No rollouts yet.")]));
      table.dataset.loaded = "true";
      if (rollouts.some((r) => r.state === "running")) timer = setTimeout(load, POLL_MS);
    } catch (error) {
      if (mine === serial && error.name !== "AbortError") showError(error, "Loading the rollouts failed");
    }
  }

  main.append(
    pageHeader("Rollouts", "A release sent to a list of devices batch after batch, newest first."),
    startForm(signal),
    h("section", { class: "card card-flush" }, h("div", { class: "table-wrap" }, table)),
  );
  load();
  return () => {
    controller.abort();
    clearTimeout(timer);
  };
}

/** Names split on commas, spaces and new lines. */
function namesOf(text) {
  return text.split(/[\s,]+/).filter(Boolean);
}

function startForm(signal) {
  const field = (label, input) => h("label", { class: "form-field" }, h("span", { class: "field-label" }, label), input);
  const input = (testid, props) => h("input", { class: "input", type: "text", testid, ...props });
  const app = input("rollout-new-app", { placeholder: "web", required: true });
  const version = input("rollout-new-version", { placeholder: "1.2.0", required: true });
  const devices = input("rollout-new-devices", { placeholder: "acme/gw-1, acme/gw-2" });
  const customer = input("rollout-new-customer", { placeholder: "or a customer id: acme" });
  const batch = input("rollout-new-batch", { type: "number", min: "1", max: "10000", placeholder: "10" });
  const failures = input("rollout-new-max-failures", { type: "number", min: "0", placeholder: "0" });
  const submit = h("button", { class: "btn btn-primary", type: "submit", testid: "rollout-start" }, "Start rollout");
  const form = h(
    "form",
    { class: "rollout-form", testid: "rollout-form", novalidate: true },
    field("App", app),
    field("Version", version),
    field("Devices", devices),
    field("Customer", customer),
    field("Batch size", batch),
    field("Max failures", failures),
    h("div", { class: "form-actions" }, submit),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = { app: app.value.trim(), version: version.value.trim() };
    const names = namesOf(devices.value);
    const customerId = customer.value.trim();
    if (names.length) body.devices = names;
    if (customerId) body.customer_id = customerId;
    for (const [key, el] of [["batch_size", batch], ["max_failures", failures]]) {
      if (el.value.trim() === "") continue;
      const value = Number(el.value);
      if (!Number.isInteger(value)) {
        showError(new Error(`${key} is a whole number`));
        return;
      }
      body[key] = value;
    }
    submit.disabled = true;
    try {
      const rollout = await post(`${ADMIN}/rollouts`, body, { signal });
      hideError();
      toast(`Rollout ${rollout.id} started`);
      location.hash = `#/rollouts/${rollout.id}`;
    } catch (error) {
      showError(error, "Starting the rollout failed");
    } finally {
      submit.disabled = false;
    }
  });
  return card("Start a rollout", { testid: "rollout-start-card" }, form);
}

// ---- one rollout --------------------------------------------------------------------------

export function rolloutPage(main, rolloutId) {
  const controller = new AbortController();
  const signal = controller.signal;
  const figures = h("div", { class: "card", testid: "rollout-figures" }, h("div", { class: "loading-block" }, "Loading…"));
  const tbody = h("tbody", { testid: "rollout-device-rows" }, loadingRow(4));
  const actions = h("div", { class: "page-actions" });
  let timer = null;
  let serial = 0;

  const abort = actionButton(
    "Abort",
    async () => {
      const sure = await confirmDialog({
        title: `Abort ${rolloutId}?`,
        body: "No batch starts again; updates not yet delivered are cancelled. Updates already delivered still report their results.",
        confirmLabel: "Abort rollout",
        danger: true,
      });
      if (!sure) return;
      const rollout = await post(`${rolloutPath(rolloutId)}/abort`, undefined, { signal });
      hideError();
      toast(`Rollout ${rollout.id} aborted`, "warn");
      await load();
    },
    { class: "btn btn-danger-outline", testid: "rollout-abort" },
  );

  const fact = (label, value, testid) =>
    h("div", { class: "fact" }, h("div", { class: "fact-label" }, label), h("div", { class: "fact-value", testid }, value));

  function showFigures(r) {
    const batches = count(r.batches);
    const batchText = r.state === "running" ? `${Math.min(count(r.batch) + 1, batches)}/${batches}` : `${batches} batches`;
    append(clear(figures), [
      h(
        "div",
        { class: "rollout-head" },
        badge(r.state, STATE_TONE[r.state], "rollout-state"),
        h("span", { class: "rollout-release", testid: "rollout-release" }, `${r.app} ${r.version}`),
        progressBar(r),
      ),
      r.reason ? h("p", { class: "rollout-reason", testid: "rollout-reason" }, r.reason) : null,
      h(
        "div",
        { class: "facts" },
        fact("Batch", batchText, "rollout-batch"),
        fact("Batch size", number(r.batch_size)),
        fact("Max failures", number(r.max_failures)),
        fact("Committed", number(count(r.committed)), "rollout-committed"),
        fact("Failed", number(count(r.failed)), "rollout-failed"),
        fact("Updating", number(count(r.updating)), "rollout-updating"),
        fact("Waiting", number(count(r.waiting)), "rollout-waiting"),
        fact("Skipped", number(count(r.skipped)), "rollout-skipped"),
        fact("Total", number(count(r.total)), "rollout-total"),
        fact("Created", dateTime(r.created_at)),
        fact("Finished", dateTime(r.finished_at), "rollout-finished"),
        fact("By", r.actor || "—"),
      ),
    ]);
    figures.dataset.state = r.state;
  }

  function deviceRow(d) {
    const [customerId, deviceId] = String(d.name).split("/");
    return h(
      "tr",
      { testid: "rollout-device", dataset: { name: d.name, result: d.result } },
      h("td", { class: "mono small" }, deviceId ? h("a", { href: `#/devices/${customerId}/${deviceId}` }, d.name) : d.name),
      h("td", { class: "cell-num" }, number(count(d.batch) + 1)),
      h("td", {}, badge(d.result, RESULT_TONE[d.result], "rollout-device-result")),
      h("td", { class: "small", testid: "rollout-device-reason" }, d.reason || "—"),
    );
  }

  async function load() {
    clearTimeout(timer);
    const mine = ++serial;
    try {
      const rollout = await get(rolloutPath(rolloutId), { signal });
      if (mine !== serial) return;
      showFigures(rollout);
      const devices = Array.isArray(rollout.devices) ? rollout.devices : [];
      append(clear(tbody), [
        devices.length ? devices.slice(0, DEVICE_ROWS).map(deviceRow) : emptyRow(4, "No devices."),
        devices.length > DEVICE_ROWS
          ? emptyRow(4, `The first ${number(DEVICE_ROWS)} of ${number(devices.length)} devices.`, "rollout-devices-more")
          : null,
      ]);
      append(clear(actions), [rollout.state === "running" ? abort : null]);
      if (rollout.state === "running") timer = setTimeout(load, POLL_MS);
    } catch (error) {
      if (mine !== serial || error.name === "AbortError") return;
      showError(error, `Loading rollout ${rolloutId} failed`);
      if (error.status === 404) clear(figures).append(h("div", { class: "empty-state", testid: "not-found" }, "No such rollout."));
      else timer = setTimeout(load, POLL_MS); // a network blip: try again
    }
  }

  main.append(
    h("a", { class: "back", href: "#/rollouts" }, "← Rollouts"),
    h(
      "div",
      { class: "page-header" },
      h("div", { class: "page-title-block" }, h("h1", { class: "page-title mono", testid: "rollout-id" }, rolloutId)),
      actions,
    ),
    figures,
    h(
      "section",
      { class: "card card-flush" },
      h(
        "div",
        { class: "table-wrap" },
        h(
          "table",
          { class: "table", testid: "rollout-devices" },
          h("thead", {}, h("tr", {}, ["Device", "Batch", "Result", "Reason"].map((t) => h("th", {}, t)))),
          tbody,
        ),
      ),
    ),
  );
  load();
  return () => {
    controller.abort();
    clearTimeout(timer);
  };
}
