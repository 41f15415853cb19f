// Upstreams: each deployment's circuit, load, errors by outcome, retries and fallbacks.
import { api } from "../api.js";
import { badge, chips, fmt, h, replace, table } from "../dom.js";
import { ERROR_OUTCOMES, resolvedWindow, windowPicker } from "./shared.js";

export const autoRefresh = true;

const CIRCUIT = { closed: "ok", "half-open": "warn", open: "bad" };

function circuit(u) {
  const probe = u.circuit === "open" && u.circuit_retry_in !== null
    ? h("div", { class: "muted small", text: `probe in ${Math.ceil(u.circuit_retry_in)}s` }) : null;
  return h("div", {}, badge(u.circuit, CIRCUIT[u.circuit]), probe);
}

export async function render(root, ctx) {
  const data = await api(`/admin/api/upstreams?window=${await resolvedWindow()}`);
  if (!ctx.isCurrent()) return;
  const rows = data.upstreams.map((u) => ({ ...u, __data: { upstream: u.name, circuit: u.circuit } }));
  const isError = (outcome) => ERROR_OUTCOMES.has(outcome) || outcome === "rate_limited";
  const open = rows.filter((u) => u.circuit !== "closed").length;
  replace(root, h("div", { class: "stack" },
    h("div", { class: "toolbar" }, h("h1", { text: "Upstreams" }), windowPicker(ctx.rerender)),
    h("p", { class: "muted", text:
      `${rows.length} deployments, ${open} with an open or half-open circuit. Requests, outcomes, ` +
      `retries and fallbacks (requests served for another model) over ${data.window} come from the ` +
      "ledger (the whole fleet); attempts since start are this gateway process's counters." }),
    h("section", { class: "panel", id: "upstreams" }, table([
      // Names never break inside: each is one unbreakable line, and a long list wraps
      // between names. Provider and model id get a line each, so the column stays narrow.
      { label: "Upstream", cell: (u) => h("div", { class: "names" },
        h("strong", { class: "name", text: u.name }),
        h("div", { class: "muted mono name", text: `${u.provider} (${u.provider_type})` }),
        h("div", { class: "muted mono name", text: u.model })) },
      { label: "Serves", cell: (u) => (u.serves.length
        ? h("div", { class: "chips" }, u.serves.map((m) => h("span", { class: "chip name", text: m })))
        : "—") },
      { label: "Weight", num: true, cell: (u) => String(u.weight) },
      { label: "Circuit", cell: circuit },
      { label: "In flight", num: true, cell: (u) => String(u.in_flight) },
      { label: "Requests", num: true, cell: (u) => fmt.count(u.window.requests) },
      { label: "Errors", num: true, cell: (u) => fmt.pct(u.window.error_rate) },
      { label: "Outcomes", cell: (u) => chips(u.window.outcomes, isError) },
      { label: "Retries / fallbacks", num: true, cell: (u) =>
        `${fmt.count(u.window.retries)} / ${fmt.count(u.window.fallbacks_served)}` },
      { label: "p95", num: true, cell: (u) => fmt.ms(u.window.p95_ms) },
      { label: "Attempts since start", cell: (u) => chips(u.since_start.attempts, isError) },
    ], rows, "No upstreams configured.")),
  ));
}
