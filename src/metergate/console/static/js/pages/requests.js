// Requests: the latest ledger rows, filtered by key, model and outcome; CSV export.
import { api, query } from "../api.js";
import { badge, fmt, h, replace, table } from "../dom.js";
import { ERROR_OUTCOMES } from "./shared.js";

export const autoRefresh = false; // rows would jump under the reader

const filters = { key: "", model: "", outcome: "", limit: "100" };

function outcomeBadge(outcome) {
  if (outcome === "success") return badge(outcome, "ok");
  return badge(outcome, ERROR_OUTCOMES.has(outcome) ? "bad" : "warn");
}

function select(name, label, options, rerender) {
  const el = h("select", { id: `filter-${name}`, name, onchange: () => {
    filters[name] = el.value;
    rerender();
  } }, options.map(([value, text]) => h("option", { value, text, selected: filters[name] === value })));
  return h("div", { class: "field" }, h("label", { for: `filter-${name}`, text: label }), el);
}

/** Too many keys for a menu: the name is typed (Enter or leaving the field applies it). */
function nameInput(name, label, rerender) {
  const el = h("input", { id: `filter-${name}`, name, type: "search", value: filters[name], autocomplete: "off", spellcheck: "false",
    onchange: () => {
      filters[name] = el.value.trim();
      rerender();
    } });
  return h("div", { class: "field" }, h("label", { for: `filter-${name}`, text: label }), el);
}

async function exportCsv(status, path = null) {
  status.textContent = "Preparing the download…";
  try {
    const response = await api(path || `/admin/api/requests.csv${query({ ...filters, limit: 100000 })}`, { raw: true });
    const blob = await response.blob();
    const disposition = response.headers.get("content-disposition") || "";
    const name = /filename="([^"]+)"/.exec(disposition)?.[1] || "metergate-requests.csv";
    const url = URL.createObjectURL(blob);
    const link = h("a", { href: url, download: name });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
    status.textContent = `Downloaded ${name}.`;
  } catch (e) {
    status.textContent = `Export failed: ${e.message}`;
  }
}

const COLUMNS = [
  { label: "Time", cell: (r) => fmt.time(r.ts) },
  { label: "Key", cell: (r) => r.key_name },
  { label: "Team", cell: (r) => r.team || "" },
  { label: "Model", cell: (r) => r.model },
  { label: "Upstream", cell: (r) => r.upstream },
  { label: "Outcome", cell: (r) => outcomeBadge(r.outcome) },
  { label: "Status", num: true, cell: (r) => String(r.status) },
  { label: "Attempts", num: true, cell: (r) => String(r.attempts) },
  { label: "Tokens in / out", num: true, cell: (r) => `${fmt.count(r.input_tokens)} / ${fmt.count(r.output_tokens)}` },
  { label: "Cost", num: true, cell: (r) => fmt.usd(r.cost_nano) },
  { label: "Duration", num: true, cell: (r) => fmt.ms(r.duration_ms) },
  { label: "TTFT", num: true, cell: (r) => fmt.ms(r.ttft_ms) },
  { label: "", cell: (r) => [r.stream ? badge("stream") : null, r.cache_hit ? badge("cache", "info") : null] },
  { label: "Request id", cell: (r) => h("a", { class: "mono", href: `#/request?id=${r.id}`, text: r.request_id, title: "Open this request" }) },
];

export async function render(root, ctx) {
  const data = await api(`/admin/api/requests${query(filters)}`);
  if (!ctx.isCurrent()) return;
  const rows = data.requests.map((r) => ({ ...r, __data: { outcome: r.outcome, id: r.id } }));
  const rerender = ctx.rerender;
  const status = h("span", { class: "muted", role: "status", id: "export-status" });
  const body = h("section", { class: "panel", id: "requests" },
    table(COLUMNS, rows, "No requests match."));
  let next = data.next_before;
  const more = h("button", { type: "button", class: "quiet", id: "load-more", text: "Older requests", hidden: !next,
    onclick: async () => {
      const page = await api(`/admin/api/requests${query({ ...filters, before: next })}`);
      const older = page.requests.map((r) => ({ ...r, __data: { outcome: r.outcome, id: r.id } }));
      const tbody = body.querySelector("tbody");
      for (const tr of table(COLUMNS, older).querySelectorAll("tbody tr")) tbody.append(tr);
      next = page.next_before;
      more.hidden = !next;
    } });
  const choices = data.filters;
  replace(root, h("div", { class: "stack" },
    h("div", { class: "toolbar" }, h("h1", { text: "Requests" }),
      h("div", { class: "row" },
        h("button", { type: "button", class: "quiet", id: "refresh", text: "Refresh", onclick: rerender }),
        h("button", { type: "button", id: "export-csv", text: "Export CSV", onclick: () => exportCsv(status) }),
        h("button", { type: "button", class: "quiet", id: "export-log", text: "Export request log", onclick: () => exportCsv(status, "/admin/api/request-log.jsonl?since=7d") }))),
    h("div", { class: "panel row", id: "filters" },
      choices.keys_complete
        ? select("key", "Key", [["", "all keys"], ...choices.keys.map((k) => [k, k])], rerender)
        : nameInput("key", "Key name (empty: all keys)", rerender),
      select("model", "Model", [["", "all models"], ...choices.models.map((m) => [m, m])], rerender),
      select("outcome", "Outcome", [["", "all outcomes"], ...choices.outcomes.map((o) => [o, o])], rerender),
      select("limit", "Rows", [["50", "50"], ["100", "100"], ["500", "500"], ["1000", "1000"]], rerender),
      status),
    body, h("div", { class: "row" }, more)));
}
