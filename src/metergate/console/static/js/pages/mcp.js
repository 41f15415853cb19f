// MCP servers behind the gateway: up or down, tool call rate, errors, slowest tools.
import { api } from "../api.js";
import { badge, chips, fmt, h, replace, table } from "../dom.js";

export const autoRefresh = true;

function slowTools(tools) {
  if (!tools.length) return h("span", { class: "muted", text: "no tool calls yet" });
  return h("div", { class: "chips" }, tools.map((t) => h("span", {
    class: "chip",
    text: `${t.tool}: p95 ${fmt.seconds(t.p95_seconds)}, mean ${fmt.seconds(t.mean_seconds)}, ${fmt.count(t.calls)} call${t.calls === 1 ? "" : "s"}`,
  })));
}

export async function render(root, ctx) {
  const data = await api("/admin/api/mcp");
  if (!ctx.isCurrent()) return;
  const head = h("div", { class: "toolbar" }, h("h1", { text: "MCP servers" }));
  if (!data.servers.length) {
    replace(root, h("div", { class: "stack" }, head,
      h("section", { class: "panel empty", id: "mcp-empty" },
        h("h2", { text: "No MCP servers configured" }),
        h("p", { class: "muted", text:
          "When the gateway fronts MCP servers, each appears here with its state, tool call " +
          "rate, error rate and slowest tools (from mcp_client_operation_duration_seconds)." }))));
    return;
  }
  const rows = data.servers.map((s) => ({ ...s, __data: { server: s.name } }));
  replace(root, h("div", { class: "stack" }, head,
    h("p", { class: "muted", id: "mcp-rate-window", text:
      `Rates over the last ${fmt.span(data.rate_window_seconds)}; totals since this gateway process started.` }),
    h("section", { class: "panel", id: "mcp-servers" }, table([
      { label: "Server", cell: (s) => h("strong", { text: s.name }) },
      { label: "State", cell: (s) => (s.up ? badge("up", "ok") : badge("down", "bad")) },
      { label: "Tool calls", num: true, cell: (s) => fmt.count(s.tool_calls) },
      { label: "Rate", num: true, cell: (s) => fmt.rate(s.tool_calls_per_second) },
      { label: "Error rate", num: true, cell: (s) => fmt.pct(s.tool_error_rate) },
      { label: "Errors by type", cell: (s) => chips(s.errors_by_type, () => true) },
      { label: "Slowest tools", cell: (s) => slowTools(s.slow_tools) },
    ], rows))));
}
