// Rollouts: stage, weights, gates against the last judgment, history; manual transitions.
import { api } from "../api.js";
import { badge, confirmAction, fmt, h, replace, table } from "../dom.js";

export const autoRefresh = true;

const STATE = { pending: "", running: "info", paused: "warn", completed: "ok", rolled_back: "bad" };
const ACTIONS = {
  start: { label: "Start", danger: false, text: (r) => `Send ${r.stages[0]}% of ${r.model}'s traffic to ${r.weights.candidate.upstreams.join(", ")}.` },
  pause: { label: "Pause", danger: false, text: () => "Hold the current weights; no automatic decisions until resumed." },
  resume: { label: "Resume", danger: false, text: () => "Continue automatic decisions, judging only numbers from now on." },
  promote: { label: "Promote", danger: false, text: (r) => (r.stage + 1 >= r.stages.length
    ? "Complete the rollout: all traffic on the candidate."
    : `Move to the next stage now: ${r.stages[r.stage + 1]}% on the candidate.`) },
  rollback: { label: "Roll back", danger: true, text: (r) => `Send all of ${r.model}'s traffic back to ${r.weights.baseline.upstreams.join(", ")}.` },
};
const GATES = [
  { name: "error_rate", limit: "max_error_rate", label: "Error rate", format: (v) => fmt.pct(v, 2) },
  { name: "p99_seconds", limit: "max_p99_seconds", label: "p99 latency", format: (v) => fmt.seconds(v) },
  { name: "server_errors", limit: "max_5xx", label: "5xx answers", format: (v) => fmt.count(v) },
];
// Judged from Prometheus, which cannot see the requests an open circuit turns away.
const CIRCUIT_GATE = { name: "circuit_open", label: "Every circuit open", format: (v) => (v ? "yes" : "no") };

function stages(r) {
  return h("div", { class: "stages", "aria-label": "Stages" }, r.stages.map((pct, i) => {
    const moving = r.state === "running" || r.state === "paused";
    let cls = "stage";
    if (r.state === "completed" || (moving && i < r.stage)) cls += " done";
    if (moving && i === r.stage) cls += " current";
    return h("span", { class: cls, text: `${pct}%` });
  }));
}

function split(r) {
  const cand = r.weights.candidate.share * 100;
  const candidate = h("div", { class: "cand", text: cand ? `${r.weights.candidate.upstreams.join(", ")} ${cand.toFixed(0)}%` : "" });
  const baseline = h("div", { class: "base", text: cand < 100 ? `${r.weights.baseline.upstreams.join(", ")} ${(100 - cand).toFixed(0)}%` : "" });
  candidate.style.flexBasis = `${cand}%`;
  baseline.style.flexBasis = `${100 - cand}%`;
  return h("div", { class: "split", dataset: { candidateShare: cand.toFixed(0) } }, candidate, baseline);
}

function gates(r) {
  const judged = r.last_judgment;
  const shown = judged?.gates?.[CIRCUIT_GATE.name] ? [...GATES, CIRCUIT_GATE] : GATES;
  const rows = shown.map((g) => {
    const value = judged?.gates?.[g.name]?.value;
    const failed = judged?.failed_gates?.includes(g.name);
    return {
      ...g,
      limit: g.limit ? r.gates[g.limit] : 0,
      value,
      baseline: judged?.baseline?.[g.name],
      live: r.live.candidate[g.name],
      status: judged ? (failed ? badge("fail", "bad") : badge("pass", "ok")) : badge("not judged"),
    };
  });
  return table([
    { label: "Gate", cell: (g) => g.label },
    { label: "Limit", num: true, cell: (g) => g.format(g.limit) },
    { label: "Candidate (last judgment)", num: true, cell: (g) => (g.value === undefined ? "—" : g.format(g.value)) },
    { label: "Baseline", num: true, cell: (g) => (g.baseline === undefined ? "—" : g.format(g.baseline)) },
    { label: "Live now", num: true, cell: (g) => (g.live === undefined ? "—" : g.format(g.live)) },
    { label: "", cell: (g) => g.status },
  ], rows);
}

function history(r) {
  const rows = [...r.history].reverse();
  return table([
    { label: "When", cell: (e) => fmt.time(e.ts) },
    { label: "Event", cell: (e) => badge(e.event.replace("_", " "), e.event === "rolled_back" || e.event === "gate_failed" ? "bad" : "") },
    { label: "Stage", num: true, cell: (e) => `${e.stage + 1} (${e.stage_percent}%)` },
    { label: "By", cell: (e) => e.by || "—" },
    { label: "Verdict", cell: (e) => (e.verdict ? `${e.verdict}${e.failed_gates.length ? `: ${e.failed_gates.join(", ")}` : ""}` : "—") },
  ], rows, "No transitions yet.");
}

function facts(r) {
  const judged = r.last_judgment;
  const next = r.next_decision_at ? `in ${Math.max(0, Math.round(r.next_decision_at - Date.now() / 1000))}s` : "—";
  return h("div", { class: "facts" },
    h("div", {}, h("span", { text: "Stage" }), `${r.stage + 1} of ${r.stages.length} (${r.stage_percent}%)`),
    h("div", {}, h("span", { text: "Last verdict" }), judged ? judged.verdict : "—"),
    h("div", {}, h("span", { text: "Candidate attempts" }),
      `${fmt.count(judged ? judged.candidate.attempts : r.live.candidate.attempts)} (need ${r.min_requests})`),
    h("div", {}, h("span", { text: "Failed judgments" }), `${r.failures} of ${r.failure_threshold}`),
    h("div", {}, h("span", { text: "Next decision" }), next),
    h("div", {}, h("span", { text: "Judged every" }), `${r.interval_seconds}s (${r.source})`));
}

function card(r, rerender, error) {
  const buttons = Object.entries(ACTIONS).map(([action, spec]) => h("button", {
    type: "button",
    class: spec.danger ? "danger small" : "quiet small",
    text: spec.label,
    disabled: !r.actions.includes(action),
    dataset: { action },
    onclick: async () => {
      error.textContent = "";
      const ok = await confirmAction(`${spec.label} rollout “${r.name}”?`, spec.text(r), spec.label, spec.danger);
      if (!ok) return;
      try {
        await api(`/admin/api/rollouts/${encodeURIComponent(r.name)}/${action}`, { method: "POST" });
        await rerender();
      } catch (e) {
        error.textContent = e.message;
      }
    },
  }));
  return h("section", { class: "panel stack", dataset: { rollout: r.name, state: r.state } },
    h("div", { class: "rollout-head" },
      h("div", {},
        h("h2", {}, `${r.name} `, badge(r.state.replace("_", " "), STATE[r.state])),
        h("div", { class: "muted", text: `model ${r.model}: ${r.weights.baseline.upstreams.join(", ")} → ${r.weights.candidate.upstreams.join(", ")}` })),
      h("div", { class: "row" }, buttons)),
    stages(r), split(r), facts(r),
    h("div", { class: "two" },
      h("div", {}, h("h3", { text: "Gates" }), gates(r)),
      h("div", {}, h("h3", { text: "History" }), history(r))));
}

export async function render(root, ctx) {
  const data = await api("/admin/api/rollouts");
  if (!ctx.isCurrent()) return;
  const error = h("p", { class: "error", role: "alert", id: "rollout-error" });
  replace(root, h("div", { class: "stack" },
    h("div", { class: "toolbar" }, h("h1", { text: "Rollouts" })), error,
    data.rollouts.length
      ? data.rollouts.map((r) => card(r, ctx.rerender, error))
      : h("section", { class: "panel empty", text: "No rollouts configured (rollouts: in the gateway config)." })));
}
