// The admin API through the console session: the cookie goes by itself, the CSRF token (kept in
// this module only, never in storage) goes as a header on every request that changes something.

export const ADMIN = "/api/v1/admin";
const CONSOLE = "/api/v1/console";

let csrfToken = null;
let onLoggedOut = () => {};

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function whenLoggedOut(callback) {
  onLoggedOut = callback;
}

export function loggedIn() {
  return csrfToken !== null;
}

/** ?a=1&tag=k=v&tag=... from an object; empty and null values are left out. */
export function query(params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params || {})) {
    if (value === undefined || value === null || value === "") continue;
    for (const item of Array.isArray(value) ? value : [value]) search.append(key, String(item));
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

export async function request(method, path, body, { signal, quiet401 = false } = {}) {
  const headers = { Accept: "application/json" };
  const init = { method, headers, credentials: "same-origin", signal };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  if (method !== "GET" && method !== "HEAD" && csrfToken) headers["X-CSRF-Token"] = csrfToken;
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "the platform cannot be reached (network error)");
  }
  const text = await response.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!response.ok) {
    const message =
      data && typeof data.error === "string" ? data.error : `HTTP ${response.status}`;
    if (response.status === 401 && !quiet401 && csrfToken !== null) {
      csrfToken = null;
      onLoggedOut(message);
    }
    throw new ApiError(response.status, message);
  }
  return data;
}

export const get = (path, options) => request("GET", path, undefined, options);
export const post = (path, body, options) => request("POST", path, body, options);
export const patch = (path, body, options) => request("PATCH", path, body, options);

export function devicePath(customerId, deviceId) {
  return `${ADMIN}/devices/${encodeURIComponent(customerId)}/${encodeURIComponent(deviceId)}`;
}

// ---- session ------------------------------------------------------------------------------

/** True when the cookie holds a valid session (its CSRF token is then kept). */
export async function resumeSession() {
  try {
    const answer = await request("GET", `${CONSOLE}/session`, undefined, { quiet401: true });
    csrfToken = answer.csrf_token;
    return true;
  } catch (error) {
    if (error.status === 401) return false;
    throw error;
  }
}

export async function login(token) {
  const answer = await request("POST", `${CONSOLE}/login`, { token }, { quiet401: true });
  csrfToken = answer.csrf_token;
  return answer;
}

export async function logout() {
  try {
    await request("POST", `${CONSOLE}/logout`, undefined, { quiet401: true });
  } finally {
    csrfToken = null;
  }
}

// ---- commands -----------------------------------------------------------------------------

/** Send one command to one device and wait (up to ~30 s, in steps) for its final state. */
export async function runCommand(device, action, args, { waitS = 30 } = {}) {
  const answer = await post(`${ADMIN}/commands`, { device, action, args });
  let command = answer.commands[0];
  const deadline = Date.now() + waitS * 1000;
  while (!isFinal(command.state) && Date.now() < deadline) {
    const wait = Math.max(1, Math.min(30, Math.ceil((deadline - Date.now()) / 1000)));
    command = await get(`${ADMIN}/commands/${encodeURIComponent(command.id)}${query({ wait })}`);
  }
  return command;
}

export function isFinal(state) {
  return state === "done" || state === "failed" || state === "expired";
}
