// Teams: groups of keys with budgets and rate limits of their own (create, edit, delete),
// their spend; and spend grouped by any request tag over a window.
import { api, query } from "../api.js";
import { confirmAction, fmt, h, modal, replace, table } from "../dom.js";
import { budgetBar, currentWindow, guard, parseTags, tagsInput, windowPicker } from "./shared.js";

export const autoRefresh = false; // forms live here

const state = { tag: "" };

function limit(input, name) {
  const raw = input.value.trim();
  if (!raw) return null;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < 1) throw new Error(`${name} must be a positive whole number.`);
  return value;
}

const PERIODS = ["day", "month"];
const RATES = { rpm: "Requests per minute", tpm: "Tokens per minute" };
const budgetOf = (budgets, period) => (budgets || []).find((b) => b.period === period);
const same = (a, b) => JSON.stringify(a ?? null) === JSON.stringify(b ?? null);

/** What the dialog does not edit of a budget (its time zone, its alerts), shown so. */
function budgetNote(budget) {
  if (!budget) return null;
  return h("div", { class: "muted", dataset: { kept: budget.period }, text: `${budget.timezone} ${budget.period}s, alerts at ${budget.alert_at_percent.join(", ")}%` });
}

/** The fields of a team, filled from `team` (editing) or empty (creating). `body()` is
 * every field; `changes()` only those that differ from `team`, so that saving never
 * rewrites what the operator left alone. */
function teamFields(prefix, team = null) {
  const monthly = budgetOf(team?.budgets, "month");
  const daily = budgetOf(team?.budgets, "day");
  const input = (name, props = {}) => h("input", { id: `${prefix}-${name}`, name, autocomplete: "off", ...props });
  const fields = {
    description: input("description", { placeholder: "optional", value: team?.description || "" }),
    month: input("month", { inputmode: "decimal", placeholder: "none", value: monthly?.limit_usd || "" }),
    monthHard: h("input", { type: "checkbox", id: `${prefix}-month-hard`, checked: monthly ? monthly.hard : true }),
    day: input("day", { inputmode: "decimal", placeholder: "none", value: daily?.limit_usd || "" }),
    dayHard: h("input", { type: "checkbox", id: `${prefix}-day-hard`, checked: daily ? daily.hard : true }),
    rpm: input("rpm", { inputmode: "numeric", placeholder: "none", value: team?.rpm ?? "" }),
    tpm: input("tpm", { inputmode: "numeric", placeholder: "none", value: team?.tpm ?? "" }),
    tags: tagsInput(`${prefix}-tags`, team?.tags, "cost_center=42\nenv=prod"),
  };
  const tagText = fields.tags.value;
  const field = (label, el, ...extra) => h("div", { class: "field" }, h("label", { for: el.id, text: label }), el, extra);
  const hard = (el) => h("label", { class: "inline" }, el, " hard (refuse over it)");
  const layout = h("div", { class: "stack" },
    h("div", { class: "row" },
      field("Monthly budget (USD)", fields.month, hard(fields.monthHard), budgetNote(monthly)),
      field("Daily budget (USD)", fields.day, hard(fields.dayHard), budgetNote(daily))),
    h("div", { class: "row" }, field(RATES.rpm, fields.rpm), field(RATES.tpm, fields.tpm)),
    h("div", { class: "row" }, field("Default tags of its keys' requests (one name=value a line)", fields.tags), field("Description", fields.description)));
  // A budget keeps what the dialog does not edit (time zone, alerts): PATCH replaces it whole.
  const budgets = () => PERIODS.flatMap((period) => {
    const [amount, hardBox] = period === "day" ? [fields.day, fields.dayHard] : [fields.month, fields.monthHard];
    const usd = amount.value.trim();
    return usd ? [{ ...budgetOf(team?.budgets, period), period, limit_usd: usd, hard: hardBox.checked }] : [];
  });
  const body = () => ({
    description: fields.description.value.trim(),
    budgets: budgets(),
    rpm: limit(fields.rpm, RATES.rpm),
    tpm: limit(fields.tpm, RATES.tpm),
    tags: parseTags(fields.tags.value),
  });
  const changes = () => {
    const change = {};
    if (fields.description.value !== team.description) change.description = fields.description.value.trim();
    const now = budgets();
    if (!PERIODS.every((p) => same(budgetOf(now, p), budgetOf(team.budgets, p)))) change.budgets = now;
    for (const [name, label] of Object.entries(RATES)) {
      const value = limit(fields[name], label);
      if (value !== team[name]) change[name] = value;
    }
    if (fields.tags.value !== tagText) change.tags = parseTags(fields.tags.value);
    return change;
  };
  return { layout, body, changes };
}

function createForm(rerender) {
  const name = h("input", { id: "team-name", name: "name", placeholder: "e.g. search", required: true, maxlength: 64, autocomplete: "off" });
  const fields = teamFields("create");
  const error = h("p", { class: "error", role: "alert", id: "team-create-error" });
  const button = h("button", { type: "submit", id: "create-team", text: "Create team" });
  const form = h("form", { class: "panel stack", id: "team-form", autocomplete: "off" },
    h("h2", { text: "Create a team" }),
    h("div", { class: "field" }, h("label", { for: "team-name", text: "Name" }), name),
    fields.layout, h("div", { class: "row" }, button), error);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    button.disabled = true;
    try {
      await api("/admin/api/teams", { method: "POST", body: { name: name.value.trim(), ...fields.body() } });
      await rerender();
    } catch (e) {
      error.textContent = e.message;
    } finally {
      button.disabled = false;
    }
  });
  return form;
}

async function edit(team, rerender) {
  const fields = teamFields("edit", team);
  const saved = await modal(`Edit team “${team.name}”`, fields.layout, [
    { label: "Cancel", value: "cancel", class: "quiet" },
    { label: "Save", value: "save", action: async () => {
      const change = fields.changes();
      if (!Object.keys(change).length) return;
      await api(`/admin/api/teams/${encodeURIComponent(team.name)}`, { method: "PATCH", body: change });
    } },
  ]);
  if (saved === "save") await rerender();
}

async function remove(team, rerender) {
  const ok = await confirmAction(`Delete team “${team.name}”?`,
    "Its budgets and rate limits stop applying. A team with active keys cannot be deleted: move them first.", "Delete");
  if (!ok) return;
  await api(`/admin/api/teams/${encodeURIComponent(team.name)}`, { method: "DELETE" });
  await rerender();
}

function budgetsCell(team) {
  if (!team.budget_state.length) return h("span", { class: "muted", text: "—" });
  return h("div", { class: "stack" }, team.budget_state.map((b) => h("div", {},
    // the team's own budgets go unnamed; the config's (naming it, or for each team) by name
    h("div", { class: "muted", text: `${b.name.startsWith("team:") ? "" : `${b.name}: `}${fmt.usd(b.spent_nano)} / ${fmt.usd(b.limit_nano)} per ${b.period}${b.hard ? "" : " (soft)"}` }),
    budgetBar(b, true))));
}

async function tagPanel(rerender) {
  const input = h("input", { id: "tag-name", name: "tag", placeholder: "tag name, e.g. feature", value: state.tag, autocomplete: "off" });
  const by = state.tag ? `tag:${state.tag}` : "team";
  // spend alone: the panel shows no latency, whose p95 ranks every request of the window
  const data = await api(`/admin/api/usage${query({ by, window: currentWindow(), p95: "false" })}`);
  const form = h("form", { class: "row", id: "tag-form" }, input,
    h("button", { type: "submit", class: "quiet", text: "Group" }));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    state.tag = input.value.trim();
    rerender();
  });
  return h("section", { class: "panel", id: "usage-by" },
    h("div", { class: "toolbar" }, h("h2", { text: state.tag ? `Spend by tag “${state.tag}”` : "Spend by team" }),
      h("div", { class: "row" }, form, windowPicker(rerender))),
    table([
      { label: state.tag ? state.tag : "Team", cell: (g) => g.name },
      { label: "Requests", num: true, cell: (g) => fmt.count(g.requests) },
      { label: "Errors", num: true, cell: (g) => fmt.pct(g.error_rate) },
      { label: "Tokens in / out", num: true, cell: (g) => `${fmt.count(g.input_tokens)} / ${fmt.count(g.output_tokens)}` },
      { label: "Cost", num: true, cell: (g) => fmt.usd(g.cost_nano) },
    ], data.groups.map((g) => ({ ...g, __data: { group: g.name } })), "No requests in this window."),
    otherGroups(data));
}

/** What the costliest groups leave out: how many more, and what they spent together. */
function otherGroups(data) {
  const more = data.group_count - data.groups.length;
  if (more <= 0) return null;
  const shown = data.groups.reduce((sum, g) => sum + g.cost_nano, 0);
  return h("p", { class: "muted", id: "more-groups",
    text: `and ${fmt.count(more)} more, ${fmt.usd(data.total.cost_nano - shown)} together; ${fmt.usd(data.total.cost_nano)} in all` });
}

/** The team's first key names; when it has more, a link to all of them on the Keys page. */
function keysCell(t) {
  if (!t.key_count) return h("span", { class: "muted", text: "none" });
  const more = t.key_count - t.keys.length;
  return h("div", {}, t.keys.join(", "), more > 0 ? [" ",
    h("a", { href: `#/keys?team=${encodeURIComponent(t.name)}`, class: "more-keys", text: `and ${fmt.count(more)} more` })] : null);
}

export async function render(root, ctx) {
  const data = await api("/admin/api/teams");
  const rerender = () => render(root, ctx);
  const usage = await tagPanel(rerender);
  if (!ctx.isCurrent()) return;
  const actionError = h("p", { class: "error", role: "alert", id: "teams-error" });
  const guarded = guard(actionError);
  const rows = data.teams.map((t) => ({ ...t, __data: { team: t.name } }));
  replace(root, h("div", { class: "stack" },
    h("div", { class: "toolbar" }, h("h1", { text: "Teams" })),
    h("section", { class: "panel", id: "teams" }, actionError, table([
      { label: "Team", cell: (t) => h("div", {}, h("strong", { text: t.name }), t.description ? h("div", { class: "muted", text: t.description }) : null) },
      { label: "Keys", cell: keysCell },
      { label: "Spend today", num: true, cell: (t) => fmt.usd(t.spend_today_nano) },
      { label: "Spend this month", num: true, cell: (t) => fmt.usd(t.spend_month_nano) },
      { label: "Budgets", cell: budgetsCell },
      { label: "Rate limits", cell: (t) => [t.rpm ? `${fmt.count(t.rpm)} rpm` : null, t.tpm ? `${fmt.count(t.tpm)} tpm` : null].filter(Boolean).join(", ") || "—" },
      { label: "Tags", cell: (t) => (Object.keys(t.tags).length
        ? h("div", {}, Object.entries(t.tags).map(([k, v]) => h("div", { text: `${k}=${v}` })))
        : "—") },
      { label: "", cell: (t) => h("div", { class: "row" },
        h("button", { type: "button", class: "quiet small", text: "Edit", dataset: { action: "edit" }, onclick: guarded(() => edit(t, rerender)) }),
        h("button", { type: "button", class: "danger small", text: "Delete", dataset: { action: "delete" }, onclick: guarded(() => remove(t, rerender)) })) },
    ], rows, "No teams yet: create one below, then put keys in it (Keys page or metergate keys update KEY --team NAME).")),
    usage,
    createForm(rerender)));
}
