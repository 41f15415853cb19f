// Keys: spend per key, create (secret shown once), edit allowed models, cap and expiry, revoke.
import { api, query } from "../api.js";
import { badge, confirmAction, fmt, h, modal, replace, table } from "../dom.js";
import { budgetBar, guard, parseTags, tagsInput } from "./shared.js";

export const autoRefresh = false; // forms live here

let revealed = null; // {name, secret}: shown until dismissed or the page is left

/** A checkbox per model; those of `gone` (a key's models no longer configured) are
 * marked so, and stay ticked unless the operator unticks them. */
function modelChecks(models, chosen, prefix, gone = []) {
  return h("div", { class: "checks", id: `${prefix}-models` }, models.map((m) =>
    h("label", { dataset: gone.includes(m) ? { gone: "" } : {} },
      h("input", { type: "checkbox", value: m, name: `${prefix}-model`, checked: chosen.includes(m) }), m,
      gone.includes(m) ? h("span", { class: "muted", text: " (not configured now)" }) : null)));
}

const sameModels = (a, b) => JSON.stringify([...(a || [])].sort()) === JSON.stringify([...(b || [])].sort());

function checked(container) {
  return [...container.querySelectorAll("input[type=checkbox]:checked")].map((c) => c.value);
}

function capValue(input) {
  const raw = input.value.trim();
  if (!raw) return null;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < 1) throw new Error("The max_tokens cap must be a positive whole number.");
  return value;
}

/** A date input's day as epoch seconds of its 00:00 UTC (the key is refused from then
 * on), or null when empty; and back. */
function expiryValue(input) {
  return input.value ? Date.parse(`${input.value}T00:00:00Z`) / 1000 : null;
}
/** A new key's expiry: a day already begun would make a key that never works (a slip). */
function newExpiry(input) {
  const value = expiryValue(input);
  if (value !== null && value * 1000 <= Date.now()) {
    throw new Error(`${input.value} 00:00 UTC is already past: a new key needs a later day, or none`);
  }
  return value;
}
const expiryDay = (expiresAt) => (expiresAt == null ? "" : new Date(expiresAt * 1000).toISOString().slice(0, 10));
const EXPIRY_LABEL = "Expires on (00:00 UTC; empty: never)";

/** A per-minute limit typed in, or null when empty (the config's applies). */
function perMinute(input, field) {
  const raw = input.value.trim();
  if (!raw) return null;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < 1) throw new Error(`The ${field} must be a positive whole number.`);
  return value;
}

/** "budget=USD" lines as {budget: "USD"}; the server checks names and amounts. */
function parseLimits(text) {
  const limits = {};
  for (const line of text.split("\n").map((l) => l.trim()).filter(Boolean)) {
    const at = line.indexOf("=");
    if (at < 1) throw new Error(`A budget limit is budget=USD, one a line (got “${line}”).`);
    limits[line.slice(0, at).trim()] = line.slice(at + 1).trim();
  }
  return Object.keys(limits).length ? limits : null;
}

function secretPanel(rerender) {
  if (!revealed) return null;
  const code = h("code", { id: "new-secret", text: revealed.secret });
  const copied = h("span", { class: "muted", role: "status" });
  return h("section", { class: "panel secret", id: "secret-panel" },
    h("h2", { text: `Key “${revealed.name}” created` }),
    h("p", { text: "Copy the secret now: it is stored only as a hash and will not be shown again." }),
    code,
    h("div", { class: "row" },
      h("button", { type: "button", class: "quiet", text: "Copy", onclick: async () => {
        try {
          await navigator.clipboard.writeText(revealed.secret);
          copied.textContent = "Copied.";
        } catch {
          copied.textContent = "Copy failed: select the text and copy it by hand.";
        }
      } }),
      h("button", { type: "button", id: "secret-done", text: "I have stored it", onclick: () => {
        revealed = null;
        rerender();
      } }),
      copied));
}

function createForm(models, rerender) {
  const name = h("input", { id: "key-name", name: "name", placeholder: "e.g. search-mcp", required: true, maxlength: 64, autocomplete: "off" });
  const cap = h("input", { id: "key-cap", name: "cap", inputmode: "numeric", placeholder: "none", autocomplete: "off" });
  const expires = h("input", { id: "key-expires", name: "expires", type: "date" });
  const rpm = h("input", { id: "key-rpm", inputmode: "numeric", placeholder: "the config's", autocomplete: "off" });
  const tpm = h("input", { id: "key-tpm", inputmode: "numeric", placeholder: "the config's", autocomplete: "off" });
  const checks = modelChecks(models, [], "create");
  const error = h("p", { class: "error", role: "alert", id: "create-error" });
  const button = h("button", { type: "submit", id: "create-key", text: "Create key" });
  const form = h("form", { class: "panel stack", id: "create-form", autocomplete: "off" },
    h("h2", { text: "Create a key" }),
    h("div", { class: "row" },
      h("div", { class: "field" }, h("label", { for: "key-name", text: "Name (the calling service)" }), name),
      h("div", { class: "field" }, h("label", { for: "key-cap", text: "max_tokens cap" }), cap),
      h("div", { class: "field" }, h("label", { for: "key-expires", text: EXPIRY_LABEL }), expires),
      h("div", { class: "field" }, h("label", { for: "key-rpm", text: "Its own requests per minute" }), rpm),
      h("div", { class: "field" }, h("label", { for: "key-tpm", text: "Its own tokens per minute" }), tpm)),
    h("div", { class: "field" }, h("label", { text: "Allowed models (none ticked: all models)" }), checks),
    h("div", { class: "row" }, button), error);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    button.disabled = true;
    try {
      const chosen = checked(checks);
      const created = await api("/admin/api/keys", {
        method: "POST",
        body: {
          name: name.value.trim(),
          models: chosen.length ? chosen : null,
          max_tokens_cap: capValue(cap),
          expires_at: newExpiry(expires),
          rpm: perMinute(rpm, "rpm"),
          tpm: perMinute(tpm, "tpm"),
        },
      });
      revealed = { name: created.key.name, secret: created.secret };
      await rerender(true);
    } catch (e) {
      error.textContent = e.message;
    } finally {
      button.disabled = false;
    }
  });
  return form;
}

async function edit(key, models, rerender) {
  const had = key.models || [];
  const gone = had.filter((m) => !models.includes(m)); // left the config since: kept, shown
  const checks = modelChecks([...models, ...gone], had, "edit", gone);
  const cap = h("input", { id: "edit-cap", inputmode: "numeric", placeholder: "none", value: key.max_tokens_cap ?? "" });
  const team = h("input", { id: "edit-team", placeholder: "none", value: key.team ?? "", autocomplete: "off" });
  const expires = h("input", { id: "edit-expires", type: "date", value: expiryDay(key.expires_at) });
  const rpm = h("input", { id: "edit-rpm", inputmode: "numeric", placeholder: "the config's", value: key.rpm ?? "" });
  const tpm = h("input", { id: "edit-tpm", inputmode: "numeric", placeholder: "the config's", value: key.tpm ?? "" });
  const limitText = Object.entries(key.budget_limits || {}).map(([name, usd]) => `${name}=${usd}`).join("\n");
  const limits = h("textarea", { id: "edit-limits", rows: 2, spellcheck: "false", autocomplete: "off", placeholder: "per-user-daily=10", text: limitText });
  const tags = tagsInput("edit-tags", key.tags);
  const tagText = tags.value;
  const body = h("div", { class: "stack" },
    h("div", { class: "field" }, h("label", { text: "Allowed models (none ticked: all models)" }), checks),
    h("div", { class: "field" }, h("label", { for: "edit-cap", text: "max_tokens cap (empty: none)" }), cap),
    h("div", { class: "field" }, h("label", { for: "edit-team", text: "Team (empty: none)" }), team),
    h("div", { class: "field" }, h("label", { for: "edit-expires", text: EXPIRY_LABEL }), expires),
    h("div", { class: "row" },
      h("div", { class: "field" }, h("label", { for: "edit-rpm", text: "Its own requests per minute" }), rpm),
      h("div", { class: "field" }, h("label", { for: "edit-tpm", text: "Its own tokens per minute" }), tpm)),
    h("div", { class: "field" }, h("label", { for: "edit-limits", text: "Its own limits of budgets for each key (budget=USD a line; empty: the config's)" }), limits),
    h("div", { class: "field" }, h("label", { for: "edit-tags", text: "Default tags (one name=value a line)" }), tags),
    h("p", { class: "muted", text: "Budgets for a key are set in the config (budgets: with scope: key, and its name or \"*\" for each key apart) or by its team; a key's own limits replace the config's limit of a budget for each key." }));
  // Only the fields the operator changed are sent: one left alone is never rewritten.
  const changes = () => {
    const change = {};
    const chosen = checked(checks);
    if (!sameModels(chosen, had)) change.models = chosen.length ? chosen : null;
    const capNow = capValue(cap);
    if (capNow !== (key.max_tokens_cap ?? null)) change.max_tokens_cap = capNow;
    const teamNow = team.value.trim() || null;
    if (teamNow !== (key.team ?? null)) change.team = teamNow;
    if (tags.value !== tagText) change.tags = parseTags(tags.value);
    if (expires.value !== expiryDay(key.expires_at)) change.expires_at = expiryValue(expires);
    if (limits.value !== limitText) change.budget_limits = parseLimits(limits.value);
    for (const [field, input] of [["rpm", rpm], ["tpm", tpm]]) {
      const now = perMinute(input, field);
      if (now !== (key[field] ?? null)) change[field] = now;
    }
    return change;
  };
  const saved = await modal(`Edit key “${key.name}”`, body, [
    { label: "Cancel", value: "cancel", class: "quiet" },
    { label: "Save", value: "save", action: async () => {
      const change = changes();
      if (!Object.keys(change).length) return;
      await api(`/admin/api/keys/${encodeURIComponent(key.id)}`, { method: "PATCH", body: change });
    } },
  ]);
  if (saved === "save") await rerender();
}

async function revoke(key, rerender) {
  const ok = await confirmAction(`Revoke key “${key.name}”?`,
    `Requests with mgk_…${key.hint} are refused from now on (every gateway process within two seconds). This cannot be undone.`,
    "Revoke");
  if (!ok) return;
  await api(`/admin/api/keys/${encodeURIComponent(key.id)}/revoke`, { method: "POST" });
  await rerender();
}

function budgetsCell(k) {
  if (!k.budgets.length) return h("span", { class: "muted", text: "—" });
  return h("div", { class: "stack" }, k.budgets.map((b) => h("div", {},
    h("div", { class: "muted", text: `${b.name}: ${fmt.usd(b.spent_nano)} / ${fmt.usd(b.limit_nano)} per ${b.period}` }),
    budgetBar(b, true))));
}

function stateCell(k) {
  if (k.state === "revoked") return badge(`revoked ${fmt.ago(k.revoked_at)}`);
  if (k.state === "expired") return badge(`expired ${fmt.ago(k.expires_at)}`, "bad");
  if (k.expires_at == null) return badge("active", "ok");
  return h("div", { class: "stack" }, badge("active", "ok"),
    h("span", { class: "muted", text: `expires ${fmt.time(k.expires_at)}` }));
}

function columns(models, rerender, guarded) {
  return [
    { label: "Name", cell: (k) => h("strong", { text: k.name }) },
    { label: "Key", cell: (k) => h("span", { class: "mono", text: `mgk_…${k.hint}` }) },
    { label: "Models", cell: (k) => (k.models ? k.models.join(", ") : h("span", { class: "muted", text: "all" })) },
    { label: "max_tokens cap", num: true, cell: (k) => (k.max_tokens_cap ? fmt.count(k.max_tokens_cap) : "—") },
    { label: "Own rpm / tpm", num: true, cell: (k) => (k.rpm || k.tpm ? `${k.rpm ? fmt.count(k.rpm) : "—"} / ${k.tpm ? fmt.count(k.tpm) : "—"}` : "—") },
    { label: "Spend today", num: true, cell: (k) => fmt.usd(k.spend_today_nano) },
    { label: "Spend this month", num: true, cell: (k) => fmt.usd(k.spend_month_nano) },
    { label: "Requests (month)", num: true, cell: (k) => fmt.count(k.requests_month) },
    { label: "Budgets", cell: budgetsCell },
    { label: "Team", cell: (k) => k.team || "—" },
    { label: "Created", cell: (k) => fmt.time(k.created_at) },
    { label: "State", cell: stateCell },
    { label: "", cell: (k) => (k.state !== "revoked" ? h("div", { class: "row" },
      h("button", { type: "button", class: "quiet small", text: "Edit", dataset: { action: "edit" }, onclick: guarded(() => edit(k, models, rerender)) }),
      h("button", { type: "button", class: "danger small", text: "Revoke", dataset: { action: "revoke" }, onclick: guarded(() => revoke(k, rerender)) }))
      : null) },
  ];
}

const keyRows = (keys) => keys.map((k) => ({ ...k, __data: { key: k.name, keyId: k.id, state: k.state } }));

/** The list's filters: typed here, or a team from the address (#/keys?team=NAME). */
function listing() {
  const given = new URLSearchParams(location.hash.split("?")[1] || "");
  return { search: given.get("search") || "", state: given.get("state") || "all", team: given.get("team") || "" };
}

function filterBar(current) {
  const go = (change) => {
    const next = new URLSearchParams(Object.entries({ ...current, ...change }).filter(([, v]) => v && v !== "all"));
    const text = next.toString();
    location.hash = `#/keys${text ? `?${text}` : ""}`;
  };
  const search = h("input", { id: "key-search", type: "search", placeholder: "name, id or last 4", value: current.search, autocomplete: "off" });
  const form = h("form", { class: "row", id: "key-filters", onsubmit: (event) => {
    event.preventDefault();
    go({ search: search.value.trim() });
  } },
  h("div", { class: "field" }, h("label", { for: "key-search", text: "Find" }), search),
  h("div", { class: "field" }, h("label", { for: "key-state", text: "State" }),
    h("select", { id: "key-state", onchange: (event) => go({ search: search.value.trim(), state: event.target.value }) },
      [["all", "all"], ["active", "active"], ["expired", "expired"], ["revoked", "revoked"]].map(([value, text]) =>
        h("option", { value, text, selected: current.state === value })))),
  current.team ? h("button", { type: "button", class: "quiet", id: "key-team", text: `Team ${current.team} ✕`, title: "Show keys of every team", onclick: () => go({ team: "" }) }) : null);
  return form;
}

export async function render(root, ctx, keepSecret = false) {
  if (!keepSecret) revealed = null;
  const current = listing();
  const data = await api(`/admin/api/keys${query(current)}`);
  if (!ctx.isCurrent()) return;
  const rerender = (keep = false) => render(root, ctx, keep);
  const actionError = h("p", { class: "error", role: "alert", id: "keys-error" });
  const guarded = guard(actionError);
  const cols = columns(data.models, rerender, guarded);
  const shown = h("span", { class: "muted", id: "keys-shown", role: "status" });
  let count = data.keys.length;
  const showCount = () => { shown.textContent = `${fmt.count(count)} of ${fmt.count(data.matched)} keys`; };
  showCount();
  const list = table(cols, keyRows(data.keys), current.search || current.team || current.state !== "all" ? "No keys match." : "No keys yet.");
  let next = data.next_after;
  const more = h("button", { type: "button", class: "quiet", id: "more-keys", text: "More keys", hidden: !next,
    onclick: guarded(async () => {
      const page = await api(`/admin/api/keys${query({ ...current, after: next })}`);
      const tbody = list.querySelector("tbody");
      for (const tr of table(cols, keyRows(page.keys)).querySelectorAll("tbody tr")) tbody.append(tr);
      count += page.keys.length;
      showCount();
      next = page.next_after;
      more.hidden = !next;
    }) });
  replace(root, h("div", { class: "stack" },
    h("div", { class: "toolbar" }, h("h1", { text: "Keys" })),
    secretPanel(() => rerender(false)),
    createForm(data.models, rerender),
    h("section", { class: "panel stack", id: "keys" },
      h("div", { class: "toolbar" }, filterBar(current), shown),
      actionError, list, h("div", { class: "row" }, more))));
}
