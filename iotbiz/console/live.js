// The fleet's live updates: one EventSource on the admin stream while logged in; pages subscribe.
// Events come at most once a second (the server coalesces); on a reconnect the subscribers are
// told that anything may have changed (`more`).

const STREAM = "/api/v1/admin/stream";

let source = null;
let lost = false;
let retryTimer = null;
let retryMs = 2000;
const MAX_RETRY_MS = 30000;
let onClosed = () => {};
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

/** Called when the stream was refused (the page then checks whether it is still logged in). */
export function whenStreamRefused(callback) {
  onClosed = callback;
}

export function startLive() {
  clearTimeout(retryTimer);
  retryTimer = null;
  if (source) return;
  source = new EventSource(STREAM);
  setStatus("connecting");
  source.addEventListener("open", () => {
    retryMs = 2000;
    setStatus("live");
    if (lost) {
      lost = false;
      dispatch({ changed: [], more: true, online: counts.online, total: counts.total });
    }
  });
  source.addEventListener("error", () => {
    lost = true;
    if (source && source.readyState === EventSource.CLOSED) {
      // An answer that was not a stream (401 when the session ended, 503 when too many are
      // open or the platform is starting): EventSource gives up; try again, more slowly each
      // time, after letting the page check its session.
      source = null;
      setStatus("reconnecting");
      onClosed();
      retryTimer = setTimeout(startLive, retryMs);
      retryMs = Math.min(retryMs * 2, MAX_RETRY_MS);
    } else {
      setStatus("reconnecting");
    }
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
  clearTimeout(retryTimer);
  retryTimer = null;
  retryMs = 2000;
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
