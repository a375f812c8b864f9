// Customers: their device limits and how much of them is used; add one, change a limit.

import { ADMIN, get, patch, post } from "./api.js";
import { clear, dateTime, h, number } from "./dom.js";
import { filterByCustomer } from "./fleet.js";
import { actionButton, card, emptyRow, hideError, loadingRow, pageHeader, showError, toast } from "./ui.js";

const CUSTOMER_ID = /^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/;

function usageBar(customer) {
  const used = customer.active_devices + customer.pending_devices;
  const limit = customer.device_limit;
  const share = limit > 0 ? used / limit : used > 0 ? 1 : 0;
  const tone = share >= 1 ? "bad" : share >= 0.8 ? "warn" : "ok";
  const fill = h("span", { class: `meter-fill meter-${tone}` });
  fill.style.width = `${Math.min(100, share * 100)}%`;
  return h(
    "div",
    { class: "usage", testid: "customer-usage" },
    h("span", { class: "meter meter-wide" }, fill),
    h(
      "span",
      { class: "usage-text" },
      `${number(used)} of ${number(limit)}`,
      customer.pending_devices ? h("span", { class: "muted" }, ` (${number(customer.pending_devices)} pending)`) : null,
    ),
  );
}

export function customersPage(main) {
  const controller = new AbortController();
  const signal = controller.signal;
  const tbody = h("tbody", { testid: "customers-rows" }, loadingRow(5));

  const idInput = h("input", { class: "input", type: "text", placeholder: "customer id, e.g. acme", testid: "customer-new-id", "aria-label": "Customer id" });
  const limitInput = h("input", { class: "input input-num", type: "number", min: "0", max: "1000000", value: "50", testid: "customer-new-limit", "aria-label": "Device limit" });
  const addForm = h(
    "form",
    { class: "inline-form", testid: "customer-add-form" },
    idInput,
    limitInput,
    h("button", { class: "btn btn-primary", type: "submit", testid: "customer-add" }, "Add customer"),
  );
  addForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const id = idInput.value.trim();
    const limit = Number(limitInput.value);
    if (!CUSTOMER_ID.test(id)) {
      showError(new Error("a customer id is 1 to 64 of A-Z a-z 0-9 _ -, the first a letter or digit"));
      return;
    }
    if (!Number.isInteger(limit) || limit < 0 || limit > 1000000) {
      showError(new Error("the device limit is a whole number from 0 to 1,000,000"));
      return;
    }
    const button = addForm.querySelector("button");
    button.disabled = true;
    try {
      await post(`${ADMIN}/customers`, { customer_id: id, device_limit: limit }, { signal });
      idInput.value = "";
      toast(`Customer ${id} added`);
      await load();
    } catch (error) {
      showError(error, `Adding ${id} failed`);
    } finally {
      button.disabled = false;
    }
  });

  function row(customer) {
    const limitCell = h("td", { class: "cell-limit" });
    const showLimit = () => {
      clear(limitCell).append(
        h("span", { class: "limit-value", testid: "customer-limit" }, number(customer.device_limit)),
        h("button", { class: "btn btn-sm", type: "button", testid: "customer-edit-limit", onclick: editLimit }, "Change"),
      );
    };
    const editLimit = () => {
      const input = h("input", { class: "input input-num input-sm", type: "number", min: "0", max: "1000000", value: String(customer.device_limit), testid: "customer-limit-input", "aria-label": "New limit" });
      const save = actionButton(
        "Save",
        async () => {
          const limit = Number(input.value);
          if (!Number.isInteger(limit) || limit < 0 || limit > 1000000) {
            showError(new Error("the device limit is a whole number from 0 to 1,000,000"));
            return;
          }
          const updated = await patch(`${ADMIN}/customers/${encodeURIComponent(customer.customer_id)}`, { device_limit: limit }, { signal });
          toast(`${customer.customer_id}: limit ${number(updated.device_limit)}`);
          await load();
        },
        { class: "btn btn-primary btn-sm", testid: "customer-limit-save" },
      );
      input.addEventListener("keydown", (event) => {
        if (event.key === "Enter") save.click();
        if (event.key === "Escape") showLimit();
      });
      clear(limitCell).append(input, save, h("button", { class: "btn btn-ghost btn-sm", type: "button", onclick: showLimit }, "Cancel"));
      input.focus();
      input.select();
    };
    showLimit();
    const fleetLink = h(
      "a",
      { href: "#/fleet", title: "Show its devices", onclick: () => filterByCustomer(customer.customer_id) },
      customer.customer_id,
    );
    return h(
      "tr",
      { testid: "customer-row", dataset: { customer: customer.customer_id } },
      h("td", { class: "cell-name" }, fleetLink),
      limitCell,
      h("td", {}, usageBar(customer)),
      h("td", { class: "cell-num-plain" }, number(customer.active_devices)),
      h("td", { class: "muted small" }, dateTime(customer.created_at)),
    );
  }

  async function load() {
    try {
      const answer = await get(`${ADMIN}/customers`, { signal });
      hideError();
      const customers = Array.isArray(answer.customers) ? answer.customers : [];
      clear(tbody).append(...(customers.length ? customers.map(row) : [emptyRow(5, "No customers yet: add the first one above.")]));
    } catch (error) {
      if (error.name !== "AbortError") showError(error, "Loading the customers failed");
    }
  }

  main.append(
    pageHeader("Customers", "Each customer's device limit: active devices plus unexpired registrations."),
    card("Add a customer", { class: "card" }, addForm),
    h(
      "section",
      { class: "card card-flush" },
      h(
        "div",
        { class: "table-wrap" },
        h(
          "table",
          { class: "table", testid: "customers-table" },
          h("thead", {}, h("tr", {}, ["Customer", "Device limit", "Usage", "Active", "Created"].map((t) =>
            h("th", { class: t === "Active" ? "num" : "" }, t),
          ))),
          tbody,
        ),
      ),
    ),
  );
  load();
  return () => controller.abort();
}
