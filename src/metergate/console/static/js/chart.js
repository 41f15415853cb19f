// Line charts drawn as SVG, one line per model. Hand-written instead of a library: four
// time-series charts need ~120 lines, theme through CSS variables, and run under a CSP
// that allows no inline script or style. Each bucket has a hover target whose <title>
// lists the values, so the numbers are readable without a tooltip library.
import { fmt, h } from "./dom.js";

const NS = "http://www.w3.org/2000/svg";
const W = 640, H = 230, LEFT = 64, RIGHT = 16, TOP = 14, BOTTOM = 30;
export const PALETTE_SIZE = 10; // distinct colours; the server sends at most this many lines

function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(NS, tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "text") el.textContent = value;
    else el.setAttribute(name, String(value));
  }
  for (const child of children) if (child) el.append(child);
  return el;
}

function niceMax(value) {
  if (!(value > 0)) return 1;
  const magnitude = 10 ** Math.floor(Math.log10(value));
  for (const m of [1, 2, 4, 6, 8, 10]) { // quarters of these are round numbers
    if (m * magnitude >= value) return m * magnitude;
  }
  return 10 * magnitude;
}

function segments(values, x, y) {
  // Consecutive non-null runs become one path each; a lone point becomes a dot.
  const runs = [];
  let run = [];
  values.forEach((v, i) => {
    if (v === null || v === undefined) {
      if (run.length) runs.push(run);
      run = [];
    } else run.push([x(i), y(v)]);
  });
  if (run.length) runs.push(run);
  return runs;
}

/**
 * series: [{name, values, color}] (color: palette index), timestamps: bucket starts.
 * Returns a <figure> with the chart and its legend.
 */
export function lineChart({ title, timestamps, step, series, format, id }) {
  const n = timestamps.length;
  const values = series.flatMap((s) => s.values).filter((v) => v !== null && v !== undefined);
  const top = niceMax(Math.max(0, ...values));
  const x = (i) => LEFT + (n <= 1 ? 0 : (i * (W - LEFT - RIGHT)) / (n - 1));
  const y = (v) => TOP + (H - TOP - BOTTOM) * (1 - v / top);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });

  for (let k = 0; k <= 4; k++) {
    const v = (top * k) / 4;
    root.append(
      svg("line", { class: "gridline", x1: LEFT, x2: W - RIGHT, y1: y(v), y2: y(v) }),
      svg("text", { class: "axis", x: LEFT - 8, y: y(v) + 4, "text-anchor": "end", text: format(v) }),
    );
  }
  if (n > 1) {
    for (const i of [0, Math.round((n - 1) / 2), n - 1]) {
      const anchor = i === 0 ? "start" : i === n - 1 ? "end" : "middle";
      root.append(svg("text", {
        class: "axis", x: x(i), y: H - 9, "text-anchor": anchor, text: fmt.clock(timestamps[i], step),
      }));
    }
  }
  if (!values.length) {
    root.append(svg("text", {
      class: "nodata", x: (LEFT + W - RIGHT) / 2, y: H / 2, "text-anchor": "middle",
      text: "no data in this window",
    }));
  }
  series.forEach((s) => {
    const cls = `s${s.color % PALETTE_SIZE}`;
    for (const run of segments(s.values, x, y)) {
      if (run.length === 1) {
        root.append(svg("circle", { class: `dot ${cls}`, cx: run[0][0], cy: run[0][1], r: 2.5 }));
      } else {
        const d = run.map(([px, py], i) => `${i ? "L" : "M"}${px.toFixed(1)},${py.toFixed(1)}`).join("");
        root.append(svg("path", { class: `line series ${cls}`, d, "data-series": s.name }));
      }
    }
  });
  // hover targets, one per bucket
  const width = n > 1 ? (W - LEFT - RIGHT) / (n - 1) : W - LEFT - RIGHT;
  for (let i = 0; i < n; i++) {
    const lines = series
      .filter((s) => s.values[i] !== null && s.values[i] !== undefined)
      .map((s) => `${s.name}: ${format(s.values[i])}`);
    if (!lines.length) continue;
    const rect = svg("rect", {
      class: "hover", x: Math.max(LEFT, x(i) - width / 2), y: TOP, width, height: H - TOP - BOTTOM,
    });
    rect.append(svg("title", { text: [fmt.time(timestamps[i]), ...lines].join("\n") }));
    root.append(rect);
  }
  const drawn = series.filter((s) => s.values.some((v) => v !== null && v !== undefined));
  const legend = h("div", { class: "legend" },
    drawn.map((s) => h("span", { class: `s${s.color % PALETTE_SIZE}`, text: s.name })));
  return h("figure", { class: "panel chart", id, "data-points": String(values.length) },
    h("h2", { text: title }), root, legend);
}
