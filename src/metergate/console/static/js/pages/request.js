// One request, opened from the Requests page (#/request?id=ROW): timings, cost, tokens,
// team and tags from the ledger; headers, bodies and attempts from the request log when
// it kept them. Everything shown is text (redacted on the server before it was stored).
import { api } from "../api.js";
import { badge, fmt, h, replace, table } from "../dom.js";
import { ERROR_OUTCOMES } from "./shared.js";

export const autoRefresh = false;

function rowId() {
  const query = location.hash.split("?")[1] || "";
  return new URLSearchParams(query).get("id");
}

function outcomeBadge(outcome) {
  if (outcome === "success") return badge(outcome, "ok");
  return badge(outcome, ERROR_OUTCOMES.has(outcome) ? "bad" : "warn");
}

function facts(pairs) {
  return h("dl", { class: "detail-facts" }, pairs.filter(([, v]) => v !== undefined).map(([label, value]) => [
    h("dt", { text: label }), h("dd", {}, value ?? "—"),
  ]));
}

const BLANK = " \n\r\t";

// A JSON body indented as JSON.stringify(value, null, 2) would, from its own text: the
// value itself would show something else than was sent (an integer past 2^53, 1.0 as
// 1, a key given twice once). A stream (SSE), a cut body or not JSON is shown as it is.
function pretty(text) {
  if (text === null || text === undefined) return null;
  try {
    JSON.parse(text);
  } catch {
    return text;
  }
  let out = "";
  let depth = 0;
  const newline = () => "\n" + "  ".repeat(depth);
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (c === '"') {
      let end = i + 1;
      while (text[end] !== '"') end += text[end] === "\\" ? 2 : 1;
      out += text.slice(i, end + 1);
      i = end;
    } else if (c === "{" || c === "[") {
      let next = i + 1;
      while (BLANK.includes(text[next])) next++;
      if (text[next] === (c === "{" ? "}" : "]")) {
        out += c + text[next]; // empty: {} or []
        i = next;
      } else {
        depth++;
        out += c + newline();
      }
    } else if (c === "}" || c === "]") {
      depth--;
      out += newline() + c;
    } else if (c === ",") {
      out += "," + newline();
    } else if (c === ":") {
      out += ": ";
    } else if (!BLANK.includes(c)) {
      out += c;
    }
  }
  return out;
}

function bodyPanel(title, id, part) {
  if (!part || part.body === null || part.body === undefined) {
    return h("section", { class: "panel", id }, h("h2", { text: title }),
      h("p", { class: "muted", text: "Not kept." }));
  }
  const note = part.truncated ? `cut at the size cap: ${fmt.count(part.bytes)} bytes in all` : `${fmt.count(part.bytes)} bytes`;
  return h("section", { class: "panel", id }, h("h2", { text: title }),
    h("p", { class: "muted", text: note }),
    h("pre", { class: "body", text: pretty(part.body) }));
}

function headersPanel(headers) {
  const rows = Object.entries(headers || {}).map(([name, value]) => ({ name, value }));
  return h("section", { class: "panel", id: "request-headers" }, h("h2", { text: "Request headers" }),
    table([
      { label: "Header", cell: (r) => h("span", { class: "mono", text: r.name }) },
      { label: "Value", cell: (r) => h("span", { class: "mono wrap", text: r.value }) },
    ], rows, "No headers kept."));
}

function waterfall(record) {
  const total = Math.max(record.duration_ms, 0.001);
  return h("div", { class: "waterfall", "aria-label": "Attempts over the request's time" },
    record.attempts.map((a) => {
      const bar = h("div", { class: `span-bar ${a.outcome === "success" ? "ok" : "bad"}`, title: `${a.upstream}: ${fmt.ms(a.duration_ms)}` });
      bar.style.left = `${(100 * a.started_ms) / total}%`;
      bar.style.width = `${Math.max(0.5, (100 * a.duration_ms) / total)}%`;
      return h("div", { class: "lane" }, h("span", { class: "lane-label mono", text: `#${a.number} ${a.upstream}` }),
        h("div", { class: "track" }, bar));
    }));
}

function attemptsPanel(record) {
  return h("section", { class: "panel", id: "attempts" }, h("h2", { text: "Attempts" }),
    record.attempts.length ? waterfall(record) : null,
    table([
      { label: "#", num: true, cell: (a) => String(a.number) },
      { label: "Upstream", cell: (a) => a.upstream },
      { label: "Provider model", cell: (a) => `${a.provider} · ${a.model}` },
      { label: "Started", num: true, cell: (a) => `+${fmt.ms(a.started_ms)}` },
      { label: "Took", num: true, cell: (a) => fmt.ms(a.duration_ms) },
      { label: "Outcome", cell: (a) => outcomeBadge(a.outcome) },
      { label: "Upstream status", num: true, cell: (a) => (a.upstream_status ? String(a.upstream_status) : "—") },
      { label: "Error", cell: (a) => a.error || "" },
      { label: "Span", cell: (a) => (a.span_id ? h("span", { class: "mono muted", text: a.span_id }) : "") },
    ], record.attempts.map((a) => ({ ...a, __data: { attempt: String(a.number) } })), "No upstream attempt (refused or answered from the cache)."));
}

function download(data, row) {
  const blob = new Blob([JSON.stringify(data, null, 2)], { type: "application/json" });
  const url = URL.createObjectURL(blob);
  const link = h("a", { href: url, download: `metergate-request-${row.id}.json` });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

export async function render(root, ctx) {
  const id = rowId();
  if (!id) throw new Error("no request id in the address (#/request?id=...)");
  const data = await api(`/admin/api/requests/${encodeURIComponent(id)}`);
  if (!ctx.isCurrent()) return;
  const row = data.request;
  const record = data.log;
  const tags = Object.entries(row.tags || {}).map(([k, v]) => `${k}=${v}`).join(", ");
  const summary = h("section", { class: "panel", id: "summary" }, facts([
    ["Time", fmt.time(row.ts)],
    ["Request id", h("span", { class: "mono", text: row.request_id })],
    ["Key", row.key_name],
    ["Team", row.team || "—"],
    ["Tags", tags || "—"],
    ["Model", row.model],
    ["Upstream", row.upstream],
    ["Outcome", h("span", {}, outcomeBadge(row.outcome), ` HTTP ${row.status}`)],
    ["Duration", fmt.ms(row.duration_ms)],
    ["Time to first token", fmt.ms(row.ttft_ms)],
    ["Upstream time", record ? fmt.ms(record.upstream_ms) : undefined],
    ["Attempts", String(row.attempts)],
    ["Tokens in / cached / out", `${fmt.count(row.input_tokens)} / ${fmt.count(row.cached_input_tokens)} / ${fmt.count(row.output_tokens)}`],
    ["Cost", fmt.usd(row.cost_nano)],
    ["Saved by the cache", row.cache_hit ? fmt.usd(row.saved_nano) : undefined],
    ["Trace id", record && record.trace_id ? h("span", { class: "mono", text: record.trace_id }) : undefined],
  ]));
  const settings = data.request_log;
  const missing = settings.enabled
    ? `The request log (capture: ${settings.capture}) did not keep this request.`
    : "The request log is off (request_log.enabled in the config): headers, bodies and attempts are not kept.";
  const parts = record
    ? [
      attemptsPanel(record),
      record.error ? h("section", { class: "panel error-panel", id: "error" }, h("h2", { text: "Error" }),
        h("p", { text: `${record.error.type}${record.error.code ? ` (${record.error.code})` : ""}: ${record.error.message}` })) : null,
      headersPanel(record.request.headers),
      bodyPanel("Request body", "request-body", record.request),
      bodyPanel("Response body", "response-body", record.response),
    ]
    : [h("section", { class: "panel", id: "not-kept" }, h("p", { class: "muted", text: missing }))];
  replace(root, h("div", { class: "stack", id: "request-detail" },
    h("div", { class: "toolbar" }, h("h1", { text: "Request" }),
      h("div", { class: "row" },
        h("a", { href: "#/requests", class: "button quiet", text: "← Requests" }),
        h("button", { type: "button", id: "download-json", text: "Download JSON", onclick: () => download(data, row) }))),
    summary, ...parts));
}
