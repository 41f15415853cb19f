// Overview: spend, month-end forecast, budgets, per-model charts over a window.
import { lineChart } from "../chart.js";
import { fmt, h, replace, table } from "../dom.js";
import { budgetRow, overviewData, windowPicker } from "./shared.js";

export const autoRefresh = true;

const round = (v) => (v >= 10 || v === 0 ? v.toFixed(0) : v >= 1 ? v.toFixed(1) : v.toFixed(2));
const CHARTS = [
  { key: "requests_per_second", title: "Requests per second", format: round },
  { key: "error_percent", title: "Error rate (%)", format: (v) => `${v.toFixed(v >= 10 ? 0 : 1)}%` },
  { key: "p95_ms", title: "p95 latency", format: (v) => fmt.ms(v) },
  { key: "ttft_p95_ms", title: "p95 time to first token (streams)", format: (v) => fmt.ms(v) },
];

function card(label, value, sub, id) {
  return h("div", { class: "panel card", id },
    h("div", { class: "label", text: label }),
    h("div", { class: "value", text: value }),
    sub ? h("div", { class: "sub", text: sub }) : null);
}

export async function render(root, ctx) {
  const data = await overviewData();
  if (!ctx.isCurrent()) return;
  const { spend, totals, series } = data;
  const models = Object.keys(series.models);
  const cards = h("div", { class: "grid cards" },
    card("Spend today (UTC)", fmt.usd(spend.today_nano), null, "spend-today"),
    card(`Spend in ${spend.month}`, fmt.usd(spend.month_nano), null, "spend-month"),
    card("Month-end forecast", fmt.usd(spend.forecast_nano),
      `run rate ${fmt.usd(spend.daily_rate_nano)}/day (last ${fmt.span(spend.forecast_basis_days * 86400)})`, "forecast"),
    card(`Requests (${data.window})`, fmt.count(totals.requests), `${fmt.count(totals.refused)} refused`, "requests"),
    card(`Error rate (${data.window})`, fmt.pct(totals.error_rate), `${fmt.count(totals.errors)} errors`, "error-rate"),
    card(`p95 latency (${data.window})`, fmt.ms(totals.p95_ms), null, "p95"));

  const budgets = h("section", { class: "panel", id: "budgets" }, h("h2", { text: "Budgets" }),
    data.budgets.length
      ? data.budgets.map(budgetRow)
      : h("p", { class: "muted", text: "No budgets configured (budgets: in the gateway config)." }));

  const charts = h("div", { class: "grid charts", id: "charts" },
    CHARTS.map((c) => {
      let lines = models.map((name, i) => ({ name, color: i, values: series.models[name][c.key] }));
      let title = c.title;
      const peak = Math.max(0, ...lines.flatMap((l) => l.values.filter((v) => v !== null)));
      if (c.key === "requests_per_second" && peak < 1) { // light traffic reads better per minute
        title = "Requests per minute";
        lines = lines.map((l) => ({ ...l, values: l.values.map((v) => (v === null ? null : v * 60)) }));
      }
      return lineChart({
        id: `chart-${c.key}`, title, timestamps: series.timestamps, step: series.step, format: c.format, series: lines,
      });
    }));

  const perModel = h("section", { class: "panel" }, h("h2", { text: `Models (${data.window})` }),
    table([
      { label: "Model", cell: (m) => h("span", { class: "name", text: m.model }) },
      { label: "Requests", num: true, cell: (m) => fmt.count(m.requests) },
      { label: "Error rate", num: true, cell: (m) => fmt.pct(m.error_rate) },
      { label: "p95 latency", num: true, cell: (m) => fmt.ms(m.p95_ms) },
      { label: "Tokens in / out", num: true, cell: (m) => `${fmt.count(m.input_tokens)} / ${fmt.count(m.output_tokens)}` },
      { label: "Cost", num: true, cell: (m) => fmt.usd(m.cost_nano) },
    ], data.models, "No requests in this window."));

  replace(root, h("div", { class: "stack" },
    h("div", { class: "toolbar" }, h("h1", { text: "Overview" }), windowPicker(ctx.rerender)),
    cards, budgets, charts, perModel));
}
