// Pieces more than one page uses: the window picker and budget bars.
import { api } from "../api.js";
import { fmt, h, segmented } from "../dom.js";

export const WINDOWS = ["1h", "24h", "7d", "30d"];
// The window until the operator picks one: chosen from the data's age (windowFor).
const state = { window: null };

export const currentWindow = () => state.window || "24h";

/** The window to open on: 1 h when every request of the last 24 h is less than an hour
 * old (or there is none: a new gateway), so fresh data is not squeezed into the right
 * edge of a day; 24 h otherwise. `overview`: an overview answer for 24 h. */
export function windowFor(overview) {
  const { timestamps, models } = overview.series;
  const lines = Object.values(models).map((m) => m.requests_per_second);
  const first = timestamps.findIndex((_, i) => lines.some((values) => values[i] > 0));
  return first < 0 || timestamps[first] >= overview.now - 3600 ? "1h" : "24h";
}

/** The overview for the current window; the first time, the window is picked from the
 * data's age (one more request only when that is not 24 h). */
export async function overviewData() {
  if (state.window) return api(`/admin/api/overview?window=${state.window}`);
  const day = await api("/admin/api/overview?window=24h");
  state.window = state.window || windowFor(day);
  return state.window === "24h" ? day : api(`/admin/api/overview?window=${state.window}`);
}

/** The current window, picked from the data's age if nobody has picked one yet. */
export async function resolvedWindow() {
  if (!state.window) await overviewData();
  return state.window;
}

export function windowPicker(rerender) {
  return segmented(WINDOWS, currentWindow(), (value) => {
    state.window = value;
    rerender();
  }, "Time window");
}

export function budgetBar(budget, mini = false) {
  const percent = Math.min(100, budget.percent);
  const fill = h("div", { class: "fill" });
  fill.style.width = `${percent}%`;
  const mark = h("div", { class: "mark", title: `soft threshold ${budget.soft_percent}%` });
  mark.style.left = `${Math.min(100, budget.soft_percent)}%`;
  return h("div", {
    class: `bar ${budget.state}${mini ? " mini" : ""}`,
    role: "meter",
    "aria-valuemin": 0,
    "aria-valuemax": 100,
    "aria-valuenow": Math.round(budget.percent),
    "aria-label": `${budget.name}: ${budget.percent.toFixed(1)}% of the limit`,
    title: `${budget.name}: ${fmt.usd(budget.spent_nano)} of ${fmt.usd(budget.limit_nano)}`,
    dataset: { state: budget.state, budget: budget.name },
  }, fill, mini ? null : mark);
}

export function budgetRow(budget) {
  const scope = budget.scope === "global" ? "everything"
    : budget.each ? `each ${budget.scope} apart` : `${budget.scope} ${budget.target}`;
  const kind = budget.hard ? "hard limit" : "soft (alerts only)";
  // A budget for each key (team, model): the bar is the one that spent most.
  const spent = budget.each
    ? (budget.top_target === null ? "nobody spent yet" : `most: ${budget.top_target}, ${fmt.usd(budget.spent_nano)}`)
    : fmt.usd(budget.spent_nano);
  const meta = `${budget.percent.toFixed(1)}% · amber at ${budget.soft_percent}%`
    + (budget.each ? ` · ${budget.past_soft} ${budget.scope}${budget.past_soft === 1 ? "" : "s"} past it` : "");
  return h("div", { class: "budget", dataset: { budget: budget.name } },
    h("div", {},
      h("div", { class: "name", text: budget.name }),
      h("div", { class: "meta", text: `${scope} · per ${budget.period} (${budget.timezone}) · ${kind}` })),
    budgetBar(budget),
    h("div", { class: "amount" },
      h("div", { text: `${spent} of ${fmt.usd(budget.limit_nano)}${budget.each ? " each" : ""}` }),
      h("div", { class: "meta", text: meta })));
}

export const ERROR_OUTCOMES = new Set(["upstream_error", "upstream_rejected", "timeout", "connection_error", "gateway_error"]);

/** Tags as text, one name=value a line. A value may hold any printable character (a
 * comma, "=", spaces at either end) but no line break, so nothing is lost on the way back. */
export const tagText = (tags) => Object.entries(tags || {}).map(([k, v]) => `${k}=${v}`).join("\n");

/** A text area for tags in tagText's form. */
export function tagsInput(id, tags, placeholder = "none") {
  return h("textarea", { id, name: id, rows: 3, spellcheck: "false", autocomplete: "off", placeholder, text: tagText(tags) });
}

/** tagText's form back to an object: the name is what precedes the first "=" (spaces
 * around it dropped), the value all that follows, as written; blank lines are skipped.
 * Throws on a line without a name, or a name given twice. The API checks the rest. */
export function parseTags(text) {
  const tags = {};
  for (const line of text.split("\n")) {
    if (!line.trim()) continue;
    const at = line.indexOf("=");
    const name = line.slice(0, Math.max(at, 0)).trim();
    if (!name) throw new Error(`Tags are one name=value a line (not “${line}”).`);
    if (name in tags) throw new Error(`Tag “${name}” is given twice.`);
    tags[name] = line.slice(at + 1);
  }
  return tags;
}

/** Wraps a button's action: its error shows in `errorEl` instead of escaping. */
export function guard(errorEl) {
  return (fn) => async () => {
    errorEl.textContent = "";
    try {
      await fn();
    } catch (e) {
      errorEl.textContent = e.message;
    }
  };
}
