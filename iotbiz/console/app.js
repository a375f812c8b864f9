// The IoTBiz console: a one-page app over the admin API, with hash routes
//   #/ or #/fleet, #/devices/{customer_id}/{device_id}, #/customers, #/rollouts,
//   #/rollouts/{rollout_id}, #/audit
// and the login screen while there is no session.

import * as api from "./api.js";
import { auditPage } from "./audit.js";
import { customersPage } from "./customers.js";
import { devicePage } from "./device.js";
import { clear, h, refreshRelativeTimes } from "./dom.js";
import { fleetPage } from "./fleet.js";
import { rolloutPage, rolloutsPage } from "./rollouts.js";
import { onStatus, startLive, stopLive, whenStreamRefused } from "./live.js";
import { hideError, mountChrome, showError } from "./ui.js";

const root = document.getElementById("app");
let leavePage = null; // the shown page's cleanup
let pageSerial = 0;

const ROUTES = [
  { pattern: /^\/?(fleet)?$/, nav: "fleet", title: () => "Fleet", page: () => fleetPage },
  {
    pattern: /^\/devices\/([^/]+)\/([^/]+)$/,
    nav: "fleet",
    title: (params) => params.join("/"),
    page: () => devicePage,
  },
  { pattern: /^\/customers$/, nav: "customers", title: () => "Customers", page: () => customersPage },
  { pattern: /^\/rollouts$/, nav: "rollouts", title: () => "Rollouts", page: () => rolloutsPage },
  {
    pattern: /^\/rollouts\/(r-[0-9a-f]+)$/,
    nav: "rollouts",
    title: (params) => params[0],
    page: () => rolloutPage,
  },
  { pattern: /^\/audit$/, nav: "audit", title: () => "Audit log", page: () => auditPage },
];

function route() {
  const path = decodeURIComponent(location.hash.replace(/^#/, "")) || "/";
  for (const entry of ROUTES) {
    const match = path.match(entry.pattern);
    if (match) return { ...entry, params: match.slice(1) };
  }
  return null;
}

// ---- login --------------------------------------------------------------------------------

function showLogin(message) {
  leave();
  document.title = "Sign in · IoTBiz";
  stopLive();
  document.body.classList.add("at-login");
  const error = h("div", { class: "login-error", testid: "login-error", role: "alert" });
  error.hidden = true;
  const token = h("input", {
    class: "input",
    id: "token",
    type: "password",
    name: "token",
    autocomplete: "current-password",
    placeholder: "Admin token",
    required: true,
    testid: "login-token",
  });
  const submit = h(
    "button",
    { class: "btn btn-primary btn-block", type: "submit", testid: "login-submit" },
    "Sign in",
  );
  const form = h(
    "form",
    { class: "login-form", testid: "login-form", novalidate: true },
    h("label", { class: "field-label", for: "token" }, "Admin token"),
    token,
    h(
      "p",
      { class: "hint" },
      "The admin.token setting, or the admin.token file beside the store after the first start.",
    ),
    error,
    submit,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.hidden = true;
    if (!token.value) {
      error.textContent = "Enter the admin token.";
      error.hidden = false;
      return;
    }
    submit.disabled = true;
    submit.textContent = "Signing in…";
    try {
      await api.login(token.value);
      token.value = "";
      showShell();
    } catch (failure) {
      error.textContent = failure.message;
      error.hidden = false;
      submit.disabled = false;
      submit.textContent = "Sign in";
      token.select();
    }
  });
  clear(root).append(
    h(
      "div",
      { class: "login-page", testid: "login-page" },
      h(
        "div",
        { class: "login-card" },
        h(
          "div",
          { class: "login-brand" },
          h("img", { src: "/console/logo.svg", alt: "", class: "logo-lg" }),
          h("div", {}, h("div", { class: "brand-name" }, "IoTBiz"), h("div", { class: "brand-sub" }, "Fleet console")),
        ),
        message ? h("div", { class: "login-note", testid: "login-note" }, message) : null,
        form,
      ),
    ),
  );
  token.focus();
}

// ---- the shell (nav, banner, page) --------------------------------------------------------

let main = null;
let navLinks = {};

function showShell() {
  document.body.classList.remove("at-login");
  const banner = h("div", { class: "banner", testid: "error-banner", role: "alert" });
  banner.hidden = true;
  const toasts = h("div", { class: "toasts" });
  mountChrome(banner, toasts);
  const link = (name, label) =>
    (navLinks[name] = h("a", { class: "nav-link", href: `#/${name}`, testid: `nav-${name}` }, label));
  navLinks = {};
  const liveBadge = h("span", { class: "live", testid: "live-status" });
  const logoutButton = h(
    "button",
    { class: "btn btn-ghost btn-nav", type: "button", testid: "logout" },
    "Log out",
  );
  logoutButton.addEventListener("click", async () => {
    logoutButton.disabled = true;
    try {
      await api.logout();
      location.hash = "#/";
      showLogin("You are logged out.");
    } catch (error) {
      logoutButton.disabled = false;
      showError(error, "Log out failed");
    }
  });
  main = h("main", { class: "main", testid: "main" });
  clear(root).append(
    h(
      "header",
      { class: "topbar" },
      h(
        "div",
        { class: "topbar-inner" },
        h(
          "a",
          { class: "brand", href: "#/fleet" },
          h("img", { src: "/console/logo.svg", alt: "", class: "logo" }),
          h("span", { class: "brand-name" }, "IoTBiz"),
        ),
        h("nav", { class: "nav" }, link("fleet", "Fleet"), link("customers", "Customers"), link("rollouts", "Rollouts"), link("audit", "Audit")),
        h("div", { class: "topbar-right" }, liveBadge, logoutButton),
      ),
    ),
    h("div", { class: "content" }, banner, main),
    toasts,
  );
  onStatus((status) => {
    liveBadge.className = `live live-${status}`;
    liveBadge.dataset.status = status;
    liveBadge.textContent = { live: "Live", connecting: "Connecting", reconnecting: "Reconnecting", off: "Offline" }[status] || status;
    liveBadge.title = status === "live" ? "Receiving live updates" : "Live updates are not flowing";
  });
  startLive();
  render();
}

function leave() {
  if (leavePage) {
    try {
      leavePage();
    } catch (error) {
      console.error(error);
    }
  }
  leavePage = null;
}

function render() {
  if (!api.loggedIn() || !main) return;
  leave();
  hideError();
  const target = route();
  for (const [name, el] of Object.entries(navLinks)) {
    el.classList.toggle("active", Boolean(target) && target.nav === name);
  }
  clear(main);
  window.scrollTo(0, 0);
  if (!target) {
    main.append(
      h("div", { class: "empty-state", testid: "not-found" }, h("h1", {}, "Not found"), h("a", { href: "#/fleet" }, "Back to the fleet")),
    );
    return;
  }
  document.title = `${target.title(target.params)} · IoTBiz`;
  const serial = ++pageSerial;
  const page = target.page();
  const cleanup = page(main, ...target.params);
  if (serial === pageSerial) leavePage = typeof cleanup === "function" ? cleanup : null;
}

api.whenLoggedOut(() => showLogin("Your session has ended. Sign in again."));
// a refused stream may mean an ended session: any admin call then brings the login back
whenStreamRefused(() => {
  if (api.loggedIn()) api.get("/api/v1/console/session").catch(() => {});
});
window.addEventListener("hashchange", render);
setInterval(() => refreshRelativeTimes(root), 5000);

async function boot() {
  try {
    if (await api.resumeSession()) showShell();
    else showLogin();
  } catch (error) {
    clear(root).append(
      h(
        "div",
        { class: "login-page" },
        h("div", { class: "login-card" }, h("div", { class: "login-error", testid: "boot-error" }, `The platform did not answer: ${error.message}`)),
      ),
    );
  }
}

boot();
