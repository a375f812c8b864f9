// One device: its connection and tags, its apps (start/stop/restart), its log tail, its
// telemetry charts, its command history and its events. Refetched live when it changes.

import { ADMIN, devicePath, get, patch, post, query, runCommand } from "./api.js";
import { lineChart } from "./chart.js";
import {
  append,
  appBadge,
  appsOf,
  clear,
  commandBadge,
  compactJson,
  dateTime,
  deviceStateBadge,
  epoch,
  h,
  object,
  onlineDot,
  percent,
  relativeTime,
  systemOf,
} from "./dom.js";
import { subscribe, throttled } from "./live.js";
import {
  actionButton,
  card,
  confirmDialog,
  emptyRow,
  hideError,
  loadingRow,
  showError,
  toast,
} from "./ui.js";

const RANGES = { hour: 3600, day: 86400 };
let chartRange = "hour";
const TAG_KEY = /^[A-Za-z0-9_.-]{1,64}$/;
const ACTION_WORDS = { "app.start": "start", "app.stop": "stop", "app.restart": "restart" };

function eventSummary(body) {
  const b = object(body);
  if (b.event === "app.state" && typeof b.app === "string") {
    const reason = b.reason ? ` (${b.reason})` : "";
    return `${b.app}: ${b.from} → ${b.to}${reason}`;
  }
  if (typeof b.event === "string") return `${b.event} ${compactJson({ ...b, event: undefined, ts: undefined })}`;
  return compactJson(body);
}

function uptime(seconds) {
  if (typeof seconds !== "number") return "—";
  const d = Math.floor(seconds / 86400);
  const hours = Math.floor((seconds % 86400) / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  return d ? `${d} d ${hours} h` : hours ? `${hours} h ${m} min` : `${m} min`;
}

export function devicePage(main, customerId, deviceId) {
  const controller = new AbortController();
  const signal = controller.signal;
  const path = devicePath(customerId, deviceId);
  const name = `${customerId}/${deviceId}`;
  let device = null;
  let gone = false;
  const overrides = new Map(); // app name -> {status, at}: a command's answer newer than telemetry
  const busyApps = new Map(); // app name -> action word while its command runs

  // ---- layout ----
  const header = h(
    "section",
    { class: "card device-header", testid: "device-header" },
    h("div", { class: "loading-block" }, h("span", { class: "spinner" }), " Loading the device…"),
  );
  const appsNote = h("span", { class: "muted small", testid: "apps-note" });
  const tagsBody = h("div", { class: "tags", testid: "device-tags" });
  const appsBody = h("tbody", { testid: "apps-rows" }, loadingRow(6));
  const chartsBody = h("div", { class: "charts", testid: "charts" });
  const logsOutput = h("pre", { class: "logbox", testid: "logs-output" }, "Pick an app and fetch its last lines.");
  const logsInfo = h("span", { class: "muted small", testid: "logs-info" });
  const appSelect = h("select", { class: "select", testid: "logs-app", "aria-label": "App" });
  const linesSelect = h(
    "select",
    { class: "select", testid: "logs-lines", "aria-label": "Lines" },
    [50, 100, 200, 500].map((n) => h("option", { value: String(n) }, `${n} lines`)),
  );
  linesSelect.value = "100";
  const commandsBody = h("tbody", { testid: "commands-rows" }, loadingRow(5));
  const eventsBody = h("ol", { class: "events", testid: "events-list" });

  const rangeButtons = Object.keys(RANGES).map((range) => {
    const button = h(
      "button",
      { class: "seg-btn", type: "button", testid: `range-${range}`, dataset: { range } },
      range === "hour" ? "Last hour" : "Last day",
    );
    button.addEventListener("click", () => {
      chartRange = range;
      loadTelemetry();
    });
    return button;
  });

  main.append(
    h("a", { class: "back", href: "#/fleet", testid: "back-to-fleet" }, "← Fleet"),
    header,
    h(
      "div",
      { class: "grid-2" },
      card(
        h("div", { class: "card-header-row" }, h("h2", { class: "card-title" }, "Apps"), appsNote),
        { testid: "apps-card", class: "card span-2" },
        h(
        "div",
        { class: "table-wrap" },
        h(
          "table",
          { class: "table", testid: "apps-table" },
          h("thead", {}, h("tr", {}, ["App", "State", "PID", "Restarts", "Version", ""].map((t) =>
            h("th", { class: t === "Restarts" ? "num" : "" }, t),
          ))),
          appsBody,
        ),
      ),
      ),
      card(
        h("div", { class: "card-header-row" }, h("h2", { class: "card-title" }, "Telemetry"), h("div", { class: "seg" }, rangeButtons)),
        { testid: "telemetry-card", class: "card span-2" },
        chartsBody,
      ),
      card(
        h(
          "div",
          { class: "card-header-row" },
          h("h2", { class: "card-title" }, "Log tail"),
          h(
            "div",
            { class: "inline-form" },
            appSelect,
            linesSelect,
            actionButton("Fetch logs", fetchLogs, { class: "btn btn-primary", testid: "logs-fetch" }),
          ),
        ),
        { testid: "logs-card", class: "card span-2" },
        logsOutput,
        h("div", { class: "card-footer" }, logsInfo),
      ),
      card(
        h("div", { class: "card-header-row" }, h("h2", { class: "card-title" }, "Commands"), actionButton("Refresh", loadCommands, { class: "btn btn-ghost btn-sm", testid: "commands-refresh" })),
        { testid: "commands-card" },
        h(
          "div",
          { class: "table-wrap" },
          h(
            "table",
            { class: "table table-compact", testid: "commands-table" },
            h("thead", {}, h("tr", {}, ["Sent", "Action", "State", "Actor", "Outcome"].map((t) => h("th", {}, t)))),
            commandsBody,
          ),
        ),
      ),
      card("Events", { testid: "events-card" }, eventsBody),
    ),
  );

  // ---- header, tags ----
  function renderHeader() {
    const { cpu, memory } = systemOf(device);
    const telemetry = object(device.telemetry);
    const system = object(telemetry.system);
    const fact = (label, value, testid) =>
      h("div", { class: "fact" }, h("div", { class: "fact-label" }, label), h("div", { class: "fact-value", testid }, value));
    const revoke = actionButton("Revoke", revokeDevice, {
      class: "btn btn-danger-outline",
      testid: "device-revoke",
      disabled: device.state === "revoked",
    });
    const reset = actionButton("Reset", resetDevice, { class: "btn btn-danger-outline", testid: "device-reset" });
    const ping = actionButton("Ping", pingDevice, {
      class: "btn",
      testid: "device-ping",
      disabled: device.state !== "active",
      title: "Send a ping and time the answer",
    });
    clear(header).append(
      h(
        "div",
        { class: "device-title-row" },
        h(
          "div",
          {},
          h("div", { class: "device-customer" }, h("a", { href: "#/fleet" }, device.customer_id), " / "),
          h(
            "h1",
            { class: "device-title", testid: "device-name" },
            device.device_id,
          ),
          h(
            "div",
            { class: "device-pills" },
            h(
              "span",
              { class: `pill ${device.online ? "pill-on" : "pill-off"}`, testid: "device-online", dataset: { online: String(device.online) } },
              onlineDot(device.online),
              device.online ? "Online" : "Offline",
            ),
            deviceStateBadge(device.state),
          ),
        ),
        h("div", { class: "device-actions" }, ping, revoke, reset),
      ),
      h(
        "div",
        { class: "facts" },
        fact("Last seen", relativeTime(device.last_seen_at), "device-last-seen"),
        fact("CPU", percent(cpu), "device-cpu"),
        fact("Memory", percent(memory), "device-memory"),
        fact("Uptime", uptime(system.uptime_s)),
        fact("Agent", typeof telemetry.agent_version === "string" ? telemetry.agent_version : "—"),
        fact("Activated", dateTime(device.activated_at)),
      ),
      h("div", { class: "tags-row" }, h("div", { class: "fact-label" }, "Tags"), tagsBody),
    );
    renderTags();
  }

  function renderTags() {
    const tags = object(device.tags);
    const chips = Object.keys(tags)
      .sort()
      .map((key) =>
        h(
          "span",
          { class: "chip", testid: "tag", dataset: { key } },
          h("span", { class: "chip-key" }, key),
          h("span", { class: "chip-value" }, tags[key]),
          actionButton("×", () => setTags({ [key]: null }, `Tag ${key} removed`), {
            class: "chip-remove",
            title: `Remove ${key}`,
            "aria-label": `Remove tag ${key}`,
            testid: "tag-remove",
          }),
        ),
      );
    const input = h("input", {
      class: "input input-sm",
      type: "text",
      placeholder: "key=value",
      testid: "tag-input",
      "aria-label": "New tag",
    });
    const add = async () => {
      const text = input.value.trim();
      const at = text.indexOf("=");
      const key = at > 0 ? text.slice(0, at).trim() : "";
      if (!TAG_KEY.test(key)) {
        showError(new Error("a tag is key=value; the key is 1 to 64 of A-Z a-z 0-9 _ . -"));
        return;
      }
      await setTags({ [key]: text.slice(at + 1).trim() }, `Tag ${key} set`);
    };
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter") add().catch((error) => showError(error));
    });
    append(clear(tagsBody), [
      chips,
      chips.length ? null : h("span", { class: "muted small" }, "No tags"),
      h("span", { class: "tag-add" }, input, actionButton("Add", add, { class: "btn btn-sm", testid: "tag-add" })),
    ]);
  }

  async function setTags(tags, message) {
    const answer = await patch(`${path}/tags`, { tags }, { signal });
    device = { ...device, tags: answer.tags };
    renderTags();
    toast(message);
  }

  async function pingDevice() {
    const started = performance.now();
    const command = await runCommand(device.name, "ping", {});
    if (command.state === "done") {
      toast(`${device.device_id} answered in ${Math.round(performance.now() - started)} ms`);
    } else if (command.state === "failed" || command.state === "expired") {
      showError(new Error(command.error || command.state), "Ping");
    } else {
      toast(`No answer yet: the ping is ${command.state}`, "warn");
    }
    loadCommands();
  }

  async function revokeDevice() {
    const yes = await confirmDialog({
      title: `Revoke ${deviceId}?`,
      body: "Its credentials stop working at once, its connections are closed and it may never register again.",
      confirmLabel: "Revoke",
      danger: true,
    });
    if (!yes) return;
    device = await post(`${path}/revoke`, undefined, { signal });
    toast(`${deviceId} revoked`);
    renderAll();
  }

  async function resetDevice() {
    const yes = await confirmDialog({
      title: `Reset ${deviceId}?`,
      body: "The device is forgotten, with its tags and history, so that its id may register again (e.g. after a hardware swap).",
      confirmLabel: "Reset",
      danger: true,
    });
    if (!yes) return;
    await post(`${path}/reset`, undefined, { signal });
    gone = true;
    toast(`${deviceId} reset`);
    location.hash = "#/fleet";
  }

  // ---- apps ----
  function currentApps() {
    const ts = object(device.telemetry).ts;
    return appsOf(device).map((app) => {
      const override = overrides.get(app.name);
      if (!override) return app;
      if (typeof ts === "number" && ts > override.at) {
        overrides.delete(app.name);
        return app;
      }
      return { ...app, ...override.status, name: app.name };
    });
  }

  function renderApps() {
    const apps = currentApps();
    const active = device.state === "active";
    appsNote.textContent = !active
      ? `The device is ${device.state}: it takes no commands.`
      : device.online
        ? ""
        : "The device is offline: a command waits until it connects (or expires).";
    clear(appsBody);
    if (!apps.length) {
      appsBody.append(emptyRow(6, device.telemetry ? "The device reports no apps." : "No telemetry from this device yet."));
    }
    for (const app of apps) {
      const busy = busyApps.get(app.name);
      const state = typeof app.state === "string" ? app.state : "UNKNOWN";
      const running = state === "RUNNING" || state === "STARTING" || state === "BACKOFF";
      const button = (action, label, disabled) =>
        h(
          "button",
          {
            class: `btn btn-sm ${action === "app.restart" ? "btn-primary-outline" : ""}`,
            type: "button",
            testid: `app-${ACTION_WORDS[action]}`,
            disabled: Boolean(busy) || disabled || !active,
            onclick: () => appCommand(app.name, action),
          },
          label,
        );
      appsBody.append(
        h(
          "tr",
          { testid: "app-row", dataset: { app: app.name } },
          h("td", { class: "cell-name" }, app.name),
          h(
            "td",
            { testid: "app-state" },
            appBadge(app, false),
            busy ? h("span", { class: "busy-note" }, h("span", { class: "spinner" }), ` ${busy}ing…`) : null,
          ),
          h("td", { class: "mono", testid: "app-pid" }, app.pid === null || app.pid === undefined ? "—" : String(app.pid)),
          h("td", { class: "cell-num-plain" }, typeof app.restarts === "number" ? String(app.restarts) : "—"),
          h("td", { class: "mono" }, app.version ? String(app.version) : "—"),
          h(
            "td",
            { class: "cell-actions" },
            button("app.start", "Start", running),
            button("app.stop", "Stop", !running),
            button("app.restart", "Restart", false),
          ),
        ),
      );
    }
    // the log tail's app list follows the apps
    const chosen = appSelect.value;
    clear(appSelect).append(...apps.map((app) => h("option", { value: app.name }, app.name)));
    if (apps.some((app) => app.name === chosen)) appSelect.value = chosen;
  }

  async function appCommand(app, action) {
    const word = ACTION_WORDS[action];
    busyApps.set(app, word);
    renderApps();
    try {
      const command = await runCommand(device.name, action, { name: app });
      if (command.state === "done") {
        const status = object(command.result);
        overrides.set(app, { status, at: epoch(command.done_at) || Date.now() / 1000 });
        const pid = status.pid ? `, pid ${status.pid}` : "";
        toast(`${app}: ${word} done${pid}`);
      } else if (command.state === "failed" || command.state === "expired") {
        showError(new Error(command.error || command.state), `${app}: ${word} ${command.state}`);
      } else {
        toast(`${app}: ${word} is ${command.state}; it runs when the device answers`, "warn");
      }
    } catch (error) {
      if (error.name !== "AbortError") showError(error, `${app}: ${word} failed`);
    } finally {
      busyApps.delete(app);
    }
    if (signal.aborted) return;
    await Promise.all([loadDevice(), loadCommands()]);
  }

  // ---- logs ----
  async function fetchLogs() {
    const app = appSelect.value;
    if (!app) {
      showError(new Error("this device reports no apps"));
      return;
    }
    logsInfo.textContent = `Asking ${deviceId} for the last lines of ${app}…`;
    const command = await runCommand(device.name, "app.logs", {
      name: app,
      lines: Number(linesSelect.value),
    });
    if (signal.aborted) return;
    loadCommands();
    if (command.state !== "done") {
      logsInfo.textContent = "";
      const reason = command.error || (command.state === "failed" ? "failed" : `no answer (${command.state})`);
      showError(new Error(reason), `Logs of ${app}`);
      return;
    }
    const result = object(command.result);
    const lines = Array.isArray(result.lines) ? result.lines.map((line) => String(line)) : [];
    logsOutput.textContent = lines.length ? lines.join("\n") : "(no output yet)";
    logsOutput.dataset.app = app;
    logsOutput.scrollTop = logsOutput.scrollHeight;
    logsInfo.textContent =
      `${lines.length} lines of ${app} at ${dateTime(command.done_at)}` +
      (result.truncated ? " (cut to fit one message: the oldest lines left out)" : "");
  }

  // ---- telemetry ----
  async function loadTelemetry() {
    for (const button of rangeButtons) button.classList.toggle("active", button.dataset.range === chartRange);
    const until = Date.now() / 1000;
    const since = Math.floor(until - RANGES[chartRange]);
    try {
      const samples = await fetchSamples(since);
      clear(chartsBody).append(
        h(
          "div",
          { class: "chart-box" },
          h("div", { class: "chart-title" }, "CPU", h("span", { class: "chart-now" }, latest(samples, "cpu_percent"))),
          lineChart({ samples, key: "cpu_percent", since, until, title: "CPU %", tone: "blue", testid: "chart-cpu" }),
        ),
        h(
          "div",
          { class: "chart-box" },
          h("div", { class: "chart-title" }, "Memory", h("span", { class: "chart-now" }, latest(samples, "memory_percent"))),
          lineChart({ samples, key: "memory_percent", since, until, title: "Memory %", tone: "violet", testid: "chart-memory" }),
        ),
      );
      chartsBody.dataset.samples = String(samples.length);
    } catch (error) {
      if (error.name !== "AbortError") showError(error, "Loading the telemetry failed");
    }
  }

  /** Every sample since `since`, oldest first: pages of 10,000 (a day at a 1 s sampling
   * interval is 86,400), at most ten of them. */
  async function fetchSamples(since) {
    const limit = 10000;
    let samples = [];
    let from = since;
    for (let page = 0; page < 10; page++) {
      const answer = await get(`${path}/telemetry${query({ since: from, limit })}`, { signal });
      const got = Array.isArray(answer.samples) ? answer.samples : [];
      samples = samples.concat(got);
      if (got.length < limit || typeof got[got.length - 1].ts !== "number") break;
      from = got[got.length - 1].ts + 0.001;
    }
    return samples;
  }

  function latest(samples, key) {
    for (let i = samples.length - 1; i >= 0; i--) {
      if (typeof samples[i][key] === "number") return percent(samples[i][key]);
    }
    return "";
  }

  // ---- commands, events ----
  async function loadCommands() {
    try {
      const deviceName = device ? device.name : name;
      const answer = await get(`${ADMIN}/commands${query({ device: deviceName, limit: 20 })}`, { signal });
      const commands = Array.isArray(answer.commands) ? answer.commands : [];
      clear(commandsBody).append(
        ...(commands.length
          ? commands.map((c) =>
              h(
                "tr",
                { testid: "command-row", dataset: { id: c.id, state: c.state } },
                h("td", { class: "rel-cell" }, relativeTime(c.created_at)),
                h("td", {}, h("span", { class: "mono" }, c.action), c.args && Object.keys(c.args).length ? h("span", { class: "muted small" }, ` ${compactJson(c.args)}`) : null),
                h("td", {}, commandBadge(c.state)),
                h("td", { class: "muted small" }, c.actor || ""),
                h("td", { class: "small outcome" }, c.error ? c.error : c.state === "done" ? summarize(c) : ""),
              ),
            )
          : [emptyRow(5, "No commands yet.")]),
      );
    } catch (error) {
      if (error.name !== "AbortError") showError(error, "Loading the commands failed");
    }
  }

  function summarize(command) {
    const result = object(command.result);
    if (command.action === "app.logs") return `${Array.isArray(result.lines) ? result.lines.length : 0} lines`;
    if (typeof result.state === "string") return `${result.state}${result.pid ? `, pid ${result.pid}` : ""}`;
    if (result.pong) return "pong";
    return "ok";
  }

  async function loadEvents() {
    try {
      const answer = await get(`${path}/events${query({ limit: 30 })}`, { signal });
      const events = Array.isArray(answer.events) ? answer.events : [];
      clear(eventsBody).append(
        ...(events.length
          ? events.map((event) =>
              h(
                "li",
                { class: "event", testid: "event" },
                h("span", { class: "event-time" }, relativeTime(event.at)),
                h("span", { class: "event-body" }, eventSummary(event.body)),
              ),
            )
          : [h("li", { class: "muted small" }, "No events recorded.")]),
      );
    } catch (error) {
      if (error.name !== "AbortError") showError(error, "Loading the events failed");
    }
  }

  async function loadDevice() {
    try {
      device = await get(path, { signal });
      hideError();
      renderAll();
    } catch (error) {
      if (error.name === "AbortError") return;
      if (error.status === 404 && !gone) {
        clear(main).append(
          h(
            "div",
            { class: "empty-state", testid: "device-missing" },
            h("h1", {}, "No such device"),
            h("p", { class: "muted" }, `${name} is not in the fleet (it may have been reset).`),
            h("a", { href: "#/fleet", class: "btn" }, "Back to the fleet"),
          ),
        );
        gone = true;
        return;
      }
      showError(error, "Loading the device failed");
    }
  }

  function renderAll() {
    if (!device || gone) return;
    renderHeader();
    renderApps();
  }

  // ---- live ----
  const refetch = throttled(() => Promise.all([loadDevice(), loadEvents()]), 1000);
  const refetchTelemetry = throttled(loadTelemetry, 15000);
  const unsubscribe = subscribe((update) => {
    if (gone) return;
    // the stream names devices as the platform writes them (a MAC as aa:bb:..., whatever the
    // notation of this page's address)
    if (update.more || update.changed.includes(device ? device.name : name)) {
      refetch();
      refetchTelemetry();
    }
  });

  refetch.touch();
  refetchTelemetry.touch();
  loadDevice();
  loadTelemetry();
  loadCommands();
  loadEvents();

  return () => {
    controller.abort();
    refetch.cancel();
    refetchTelemetry.cancel();
    unsubscribe();
  };
}
