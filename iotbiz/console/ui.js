// Shared pieces of the page: the error banner, toasts, the confirm dialog, page headers, cards.

import { clear, h } from "./dom.js";

let bannerEl = null;
let toastsEl = null;

export function mountChrome(banner, toasts) {
  bannerEl = banner;
  toastsEl = toasts;
}

/** Show an error (an ApiError's message is the `error` field of the failed call). */
export function showError(error, context = "") {
  if (!bannerEl || (error && error.name === "AbortError")) return;
  const message = error && error.message ? error.message : String(error);
  clear(bannerEl);
  bannerEl.append(
    h("span", { class: "banner-icon", "aria-hidden": "true" }, "!"),
    h(
      "span",
      { class: "banner-text", testid: "error-text" },
      context ? `${context}: ${message}` : message,
    ),
    h(
      "button",
      {
        class: "banner-close",
        type: "button",
        "aria-label": "Dismiss",
        onclick: hideError,
      },
      "×",
    ),
  );
  bannerEl.hidden = false;
}

export function hideError() {
  if (!bannerEl) return;
  bannerEl.hidden = true;
  clear(bannerEl);
}

export function toast(message, tone = "ok") {
  if (!toastsEl) return;
  const el = h("div", { class: `toast toast-${tone}`, testid: "toast", role: "status" }, message);
  toastsEl.append(el);
  setTimeout(() => el.classList.add("toast-leaving"), 3500);
  setTimeout(() => el.remove(), 4000);
}

/** A modal confirm; resolves true when the operator confirms. */
export function confirmDialog({ title, body, confirmLabel = "Confirm", danger = false }) {
  return new Promise((resolve) => {
    const close = (answer) => {
      document.removeEventListener("keydown", onKey);
      overlay.remove();
      resolve(answer);
    };
    const onKey = (event) => {
      if (event.key === "Escape") close(false);
    };
    const ok = h(
      "button",
      {
        class: `btn ${danger ? "btn-danger" : "btn-primary"}`,
        type: "button",
        testid: "confirm-ok",
        onclick: () => close(true),
      },
      confirmLabel,
    );
    const overlay = h(
      "div",
      {
        class: "overlay",
        testid: "confirm-dialog",
        onclick: (event) => {
          if (event.target === overlay) close(false);
        },
      },
      h(
        "div",
        { class: "dialog", role: "dialog", "aria-modal": "true" },
        h("h2", { class: "dialog-title" }, title),
        h("p", { class: "dialog-body" }, body),
        h(
          "div",
          { class: "dialog-actions" },
          h(
            "button",
            {
              class: "btn btn-ghost",
              type: "button",
              testid: "confirm-cancel",
              onclick: () => close(false),
            },
            "Cancel",
          ),
          ok,
        ),
      ),
    );
    document.addEventListener("keydown", onKey);
    document.body.append(overlay);
    ok.focus();
  });
}

export function pageHeader(title, subtitle, ...actions) {
  return h(
    "div",
    { class: "page-header" },
    h(
      "div",
      { class: "page-title-block" },
      h("h1", { class: "page-title" }, title),
      subtitle ? h("div", { class: "page-subtitle" }, subtitle) : null,
    ),
    actions.length ? h("div", { class: "page-actions" }, actions) : null,
  );
}

export function card(title, props, ...children) {
  return h(
    "section",
    { class: "card", ...props },
    title
      ? h(
          "div",
          { class: "card-header" },
          typeof title === "string" ? h("h2", { class: "card-title" }, title) : title,
        )
      : null,
    children,
  );
}

export function emptyRow(columns, message, testid = "empty") {
  return h("tr", { class: "empty-row" }, h("td", { colspan: columns, testid }, message));
}

export function loadingRow(columns) {
  return h(
    "tr",
    { class: "loading-row" },
    h("td", { colspan: columns }, h("span", { class: "spinner" }), " Loading…"),
  );
}

/** A button that shows a spinner and is disabled while its async action runs. */
export function actionButton(label, action, props = {}) {
  const button = h("button", { type: "button", class: "btn", ...props }, label);
  button.addEventListener("click", async () => {
    if (button.disabled) return;
    button.disabled = true;
    button.classList.add("busy");
    try {
      await action(button);
    } catch (error) {
      showError(error);
    } finally {
      button.disabled = false;
      button.classList.remove("busy");
    }
  });
  return button;
}
