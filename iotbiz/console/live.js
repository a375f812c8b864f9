// The fleet's live updates: one EventSource on the admin stream while logged in; pages subscribe.
// Events come at most once a second (the server coalesces); on a reconnect the subscribers are
// told that anything may have changed (`more`).

const STREAM = "/api/v1/admin/stream";

let source = null;
let lost = false;
const listeners = new Set();
const statusListeners = new Set();
export const counts = { online: null, total: null };
let status = "off";

function setStatus(next) {
  status = next;
  for (const listener of statusListeners) listener(next);
}

function dispatch(update) {
  for (const listener of listeners) {
    try {
      listener(update);
    } catch (error) {
      console.error("live update listener failed", error);
    }
  }
}

export function startLive() {
  if (source) return;
  source = new EventSource(STREAM);
  setStatus("connecting");
  source.addEventListener("open", () => {
    setStatus("live");
    if (lost) {
      lost = false;
      dispatch({ changed: [], more: true, online: counts.online, total: counts.total });
    }
  });
  source.addEventListener("error", () => {
    lost = true;
    setStatus(source && source.readyState === EventSource.CLOSED ? "off" : "reconnecting");
  });
  source.addEventListener("devices", (event) => {
    let data;
    try {
      data = JSON.parse(event.data);
    } catch {
      return;
    }
    if (typeof data.online === "number") counts.online = data.online;
    if (typeof data.total === "number") counts.total = data.total;
    setStatus("live");
    dispatch({
      changed: Array.isArray(data.changed) ? data.changed : [],
      more: Boolean(data.more),
      online: counts.online,
      total: counts.total,
    });
  });
}

export function stopLive() {
  if (source) source.close();
  source = null;
  lost = false;
  setStatus("off");
}

export function subscribe(listener) {
  listeners.add(listener);
  return () => listeners.delete(listener);
}

export function onStatus(listener) {
  statusListeners.add(listener);
  listener(status);
  return () => statusListeners.delete(listener);
}

/**
 * A refetch that runs at most once per `intervalMs`: `schedule()` asks for one; asks made while
 * one is running or within the interval are folded into a single later run.
 */
export function throttled(run, intervalMs = 1000) {
  let last = 0;
  let timer = null;
  let running = false;
  let again = false;
  const fire = async () => {
    timer = null;
    if (running) {
      again = true;
      return;
    }
    running = true;
    last = Date.now();
    try {
      await run();
    } finally {
      running = false;
      if (again) {
        again = false;
        schedule();
      }
    }
  };
  const schedule = () => {
    if (timer !== null) return;
    if (running) {
      again = true;
      return;
    }
    timer = setTimeout(fire, Math.max(0, last + intervalMs - Date.now()));
  };
  // A load made by other means (the page's first, a new filter) is a run: what was asked for
  // before it started is in its answer, and the next run waits its interval.
  schedule.touch = () => {
    if (timer !== null) clearTimeout(timer);
    timer = null;
    last = Date.now();
  };
  schedule.cancel = () => {
    if (timer !== null) clearTimeout(timer);
    timer = null;
    again = false;
  };
  return schedule;
}
