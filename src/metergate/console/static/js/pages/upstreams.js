// Upstreams: each deployment's circuit, load, errors by outcome, retries and fallbacks.
import { api } from "../api.js";
import { badge, chips, fmt, h, replace, table } from "../dom.js";
import { ERROR_OUTCOMES, currentWindow, windowPicker } from "./shared.js";

export const autoRefresh = true;

const CIRCUIT = { closed: "ok", "half-open": "warn", open: "bad" };

function circuit(u) {
  const label = u.circuit === "open" && u.circuit_retry_in !== null
    ? `open · probe in ${Math.ceil(u.circuit_retry_in)}s` : u.circuit;
  return badge(label, CIRCUIT[u.circuit]);
}

export async function render(root, ctx) {
  const data = await api(`/admin/api/upstreams?window=${currentWindow()}`);
  if (!ctx.isCurrent()) return;
  const rows = data.upstreams.map((u) => ({ ...u, __data: { upstream: u.name, circuit: u.circuit } }));
  const isError = (outcome) => ERROR_OUTCOMES.has(outcome) || outcome === "rate_limited";
  const open = rows.filter((u) => u.circuit !== "closed").length;
  replace(root, h("div", { class: "stack" },
    h("div", { class: "toolbar" }, h("h1", { text: "Upstreams" }), windowPicker(ctx.rerender)),
    h("p", { class: "muted", text:
      `${rows.length} deployments, ${open} with an open or half-open circuit. Requests, outcomes, ` +
      `retries and fallbacks over ${data.window} come from the ledger (the whole fleet); attempts ` +
      "since start are this gateway process's counters." }),
    h("section", { class: "panel", id: "upstreams" }, table([
      { label: "Upstream", cell: (u) => h("div", {},
        h("strong", { text: u.name }),
        h("div", { class: "muted mono", text: `${u.provider} (${u.provider_type}) · ${u.model}` })) },
      { label: "Serves", cell: (u) => u.serves.join(", ") || "—" },
      { label: "Weight", num: true, cell: (u) => String(u.weight) },
      { label: "Circuit", cell: circuit },
      { label: "In flight", num: true, cell: (u) => String(u.in_flight) },
      { label: "Requests", num: true, cell: (u) => fmt.count(u.window.requests) },
      { label: "Error rate", num: true, cell: (u) => fmt.pct(u.window.error_rate) },
      { label: "Outcomes", cell: (u) => chips(u.window.outcomes, isError) },
      { label: "Retries", num: true, cell: (u) => fmt.count(u.window.retries) },
      { label: "Fallbacks served", num: true, cell: (u) => fmt.count(u.window.fallbacks_served) },
      { label: "p95", num: true, cell: (u) => fmt.ms(u.window.p95_ms) },
      { label: "Attempts since start", cell: (u) => chips(u.since_start.attempts, isError) },
    ], rows, "No upstreams configured.")),
  ));
}
