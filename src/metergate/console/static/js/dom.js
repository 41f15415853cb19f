// Tiny DOM helpers. Data only ever enters the page as text (textContent), never as
// markup, so nothing from the ledger (request ids are caller-chosen) can run.

export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") el.className = value;
    else if (name === "text") el.textContent = value;
    else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (value === true) el.setAttribute(name, "");
    else el.setAttribute(name, String(value));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

export function table(columns, rows, empty = "Nothing here yet.") {
  const head = h("tr", {}, columns.map((c) => h("th", { class: c.num ? "num" : null, text: c.label })));
  const body = rows.map((row) =>
    h("tr", { dataset: row.__data || {} }, columns.map((c) => h("td", { class: c.num ? "num" : null }, c.cell(row)))));
  if (!rows.length) {
    body.push(h("tr", {}, h("td", { class: "empty", colspan: columns.length, text: empty })));
  }
  return h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, head), h("tbody", {}, body)));
}

export function badge(text, kind = "") {
  return h("span", { class: `badge ${kind}`, text });
}

export function chips(counts, bad = () => false) {
  const entries = Object.entries(counts || {}).filter(([, n]) => n);
  if (!entries.length) return h("span", { class: "muted", text: "—" });
  return h("div", { class: "chips" },
    entries.map(([name, n]) => h("span", { class: `chip ${bad(name) ? "bad" : ""}`, text: `${name} ${fmt.count(n)}` })));
}

export function segmented(options, current, onPick, label) {
  return h("div", { class: "segmented", role: "group", "aria-label": label },
    options.map((option) => h("button", {
      type: "button",
      "aria-pressed": option === current ? "true" : "false",
      dataset: { value: option },
      text: option,
      onclick: () => onPick(option),
    })));
}

/** A modal dialog; resolves with the value of the button pressed (null on Escape). */
export function modal(title, body, buttons) {
  return new Promise((resolve) => {
    const error = h("p", { class: "error", role: "alert" });
    const dialog = h("dialog", { "aria-label": title },
      h("h2", { text: title }), body, error,
      h("div", { class: "actions" }, buttons.map((b) => h("button", {
        type: "button", class: b.class || "", text: b.label, dataset: { value: b.value },
        onclick: async () => {
          if (b.action) {
            try {
              await b.action();
            } catch (e) {
              error.textContent = e.message;
              return;
            }
          }
          dialog.close(b.value);
        },
      }))));
    dialog.addEventListener("close", () => {
      dialog.remove();
      resolve(dialog.returnValue || null);
    });
    document.body.append(dialog);
    dialog.showModal();
  });
}

export function confirmAction(title, text, label, danger = true) {
  return modal(title, h("p", { text }), [
    { label: "Cancel", value: "cancel", class: "quiet" },
    { label, value: "ok", class: danger ? "danger" : "" },
  ]).then((value) => value === "ok");
}

export const fmt = {
  usd(nano) {
    const v = (nano || 0) / 1e9;
    if (v === 0) return "$0.00";
    const digits = v >= 1 ? 2 : v >= 0.01 ? 4 : 6;
    return "$" + v.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
  },
  count(n) {
    if (n === null || n === undefined) return "—";
    return Number(n).toLocaleString("en-US", { maximumFractionDigits: 2 });
  },
  pct(ratio, digits = 1) {
    return ratio === null || ratio === undefined ? "—" : `${(ratio * 100).toFixed(digits)}%`;
  },
  ms(value) {
    if (value === null || value === undefined) return "—";
    if (value >= 10_000) return `${(value / 1000).toFixed(1)} s`;
    return value < 10 && !Number.isInteger(value) ? `${value.toFixed(1)} ms` : `${Math.round(value)} ms`;
  },
  seconds(value) {
    if (value === null || value === undefined) return "—";
    return value >= 1 ? `${value.toFixed(2)} s` : `${Math.round(value * 1000)} ms`;
  },
  rate(perSecond) {
    if (!perSecond) return "0/s";
    return perSecond >= 1 ? `${perSecond.toFixed(1)}/s` : `${(perSecond * 60).toFixed(1)}/min`;
  },
  time(ts) {
    return new Date(ts * 1000).toLocaleString([], { dateStyle: "short", timeStyle: "medium" });
  },
  clock(ts, step) {
    const d = new Date(ts * 1000);
    if (step >= 3600) return d.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
    return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  },
  span(seconds) {
    if (seconds < 120) return `${Math.round(seconds)} s`;
    if (seconds < 7200) return `${Math.round(seconds / 60)} min`;
    if (seconds < 172800) return `${(seconds / 3600).toFixed(1)} h`;
    return `${(seconds / 86400).toFixed(1)} d`;
  },
  ago(ts) {
    const s = Math.max(0, Date.now() / 1000 - ts);
    if (s < 60) return `${Math.round(s)}s ago`;
    if (s < 3600) return `${Math.round(s / 60)} min ago`;
    if (s < 86400) return `${Math.round(s / 3600)} h ago`;
    return `${Math.round(s / 86400)} d ago`;
  },
};
