// The audit log: who changed what, newest first, filtered by subject, paged with `before`.

import { ADMIN, get, query } from "./api.js";
import { clear, compactJson, dateTime, h } from "./dom.js";
import { emptyRow, hideError, loadingRow, pageHeader, showError } from "./ui.js";

const PAGE_SIZE = 50;

/** `key=value  key=value` of an entry's detail ("—" for none). */
function detailText(detail) {
  if (!detail || typeof detail !== "object") return detail ? String(detail) : "—";
  const parts = Object.entries(detail).map(
    ([key, value]) => `${key}=${typeof value === "string" ? value : compactJson(value)}`,
  );
  return parts.length ? parts.join("  ") : "—";
}

export function auditPage(main) {
  const controller = new AbortController();
  const signal = controller.signal;
  const tbody = h("tbody", { testid: "audit-rows" }, loadingRow(5));
  const subject = h("input", { class: "input input-search", type: "search", placeholder: "Subject: a customer id or a device name (customer/device)", testid: "audit-subject", "aria-label": "Subject" });
  const older = h("button", { class: "btn", type: "button", testid: "audit-older", disabled: true }, "Older →");
  const newest = h("button", { class: "btn btn-ghost", type: "button", testid: "audit-newest", disabled: true }, "Newest");
  const info = h("span", { class: "page-info", testid: "audit-info" });
  let before = null;
  let shown = 0;
  let serial = 0;

  function row(entry) {
    return h(
      "tr",
      { testid: "audit-row", dataset: { id: String(entry.id) } },
      h("td", { class: "nowrap small" }, dateTime(entry.at)),
      h("td", { class: "small" }, entry.actor),
      h("td", {}, h("span", { class: "badge badge-plain" }, entry.action)),
      h(
        "td",
        { class: "mono small" },
        h(
          "button",
          {
            class: "link-button",
            type: "button",
            title: "Only this subject",
            testid: "audit-subject-link",
            onclick: () => {
              subject.value = entry.subject;
              load(true);
            },
          },
          entry.subject,
        ),
      ),
      h("td", { class: "mono small detail", title: compactJson(entry.detail) }, detailText(entry.detail)),
    );
  }

  let listed = ""; // the subject of the entries shown
  async function load(reset) {
    clearTimeout(timer);
    const wanted = subject.value.trim();
    if (wanted !== listed) reset = true; // "older" of another subject's list is no page at all
    const mine = ++serial;
    if (reset) {
      before = null;
      shown = 0;
      listed = wanted;
    }
    try {
      const answer = await get(`${ADMIN}/audit${query({ subject: wanted, limit: PAGE_SIZE, before })}`, { signal });
      if (mine !== serial) return;
      hideError();
      const entries = Array.isArray(answer.entries) ? answer.entries : [];
      const first = shown;
      shown += entries.length;
      clear(tbody).append(...(entries.length ? entries.map(row) : [emptyRow(5, before ? "No older entries." : "No entries.")]));
      info.textContent = entries.length ? `Entries ${first + 1}–${shown}` : "";
      older.disabled = entries.length < PAGE_SIZE;
      newest.disabled = before === null;
      if (entries.length) before = entries[entries.length - 1].id;
    } catch (error) {
      if (mine === serial && error.name !== "AbortError") showError(error, "Loading the audit log failed");
    }
  }

  let timer = null;
  subject.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => load(true), 300);
  });
  older.addEventListener("click", () => load(false));
  newest.addEventListener("click", () => load(true));

  main.append(
    pageHeader("Audit log", "Every change made to customers, devices and commands, newest first."),
    h(
      "section",
      { class: "card card-flush" },
      h("div", { class: "toolbar" }, subject),
      h(
        "div",
        { class: "table-wrap" },
        h(
          "table",
          { class: "table", testid: "audit-table" },
          h("thead", {}, h("tr", {}, ["Time", "Actor", "Action", "Subject", "Detail"].map((t) => h("th", {}, t)))),
          tbody,
        ),
      ),
      h("div", { class: "pager" }, info, h("div", { class: "pager-buttons" }, newest, older)),
    ),
  );
  load(true);
  return () => {
    controller.abort();
    clearTimeout(timer);
  };
}
