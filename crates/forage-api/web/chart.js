// Charts drawn as SVG by hand (no library): a handoff's throughput over time with its
// mode switches (the VM handoff paper's Figure 17), and a session's first-response bar.
"use strict";

const SVG = "http://www.w3.org/2000/svg";

function svgEl(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

// A round top for an axis above `v`: 1, 2, 4, 6 or 8 times a power of ten (each splits
// into four or five round steps), so a chart is not mostly empty.
function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 4, 6, 8, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

// rows: [{t_s, input_bps, output_bps, potential_output_bps, mode, switched}] (bytes/s).
// Draws Mbit/s over seconds; returns the <svg>, whose data-points counts the rows drawn.
function handoffChart(rows, opts) {
  const W = 760, H = 320, L = 56, R = 16, T = 14, B = 40;
  const mbit = (bps) => (bps * 8) / 1e6;
  const tMax = niceMax(Math.max(1, ...rows.map((r) => r.t_s)));
  // Potential output can be far above the link (idle CPUs): the scale follows input and
  // output, and potential output is clipped at the top with its value in a tooltip.
  const seen = rows.flatMap((r) => [mbit(r.input_bps), mbit(r.output_bps)]);
  const yMax = niceMax(Math.max(1, ...seen) * 1.15);
  const x = (t) => L + ((W - L - R) * t) / tMax;
  const y = (v) => T + (H - T - B) * (1 - Math.min(v, yMax) / yMax);
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, "data-points": rows.length, "data-status": opts.status || "" });
  svg.appendChild(svgEl("title", {}, opts.title || "handoff throughput"));
  const axis = svgEl("g", { stroke: "#c9cfd8", "stroke-width": 1 });
  const labels = svgEl("g", { fill: "#5b6576", "font-size": 12 });
  for (let i = 0; i <= 4; i++) {
    const v = (yMax * i) / 4, yy = y(v);
    axis.appendChild(svgEl("line", { x1: L, x2: W - R, y1: yy, y2: yy }));
    labels.appendChild(svgEl("text", { x: L - 6, y: yy + 4, "text-anchor": "end" }, v >= 10 ? v.toFixed(0) : v.toFixed(1)));
  }
  for (let i = 0; i <= 5; i++) {
    const t = (tMax * i) / 5;
    labels.appendChild(svgEl("text", { x: x(t), y: H - B + 16, "text-anchor": "middle" }, t.toFixed(t < 10 ? 1 : 0)));
  }
  labels.appendChild(svgEl("text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle" }, "time (s)"));
  labels.appendChild(svgEl("text", { x: 14, y: (T + H - B) / 2, transform: `rotate(-90 14 ${(T + H - B) / 2})`, "text-anchor": "middle" }, "Mbit/s"));
  svg.append(axis, labels);
  // Mode switches: dashed verticals, labelled with the mode switched to.
  rows.filter((r) => r.switched).forEach((r, i) => {
    const g = svgEl("g", { class: "switch" });
    g.appendChild(svgEl("line", { x1: x(r.t_s), x2: x(r.t_s), y1: T, y2: H - B, stroke: "#6a6a6a", "stroke-dasharray": "5 4" }));
    g.appendChild(svgEl("text", { x: x(r.t_s) + 4, y: T + 12 + 14 * (i % 3), "font-size": 11, fill: "#444" }, r.mode));
    g.appendChild(svgEl("title", {}, `${r.t_s.toFixed(1)} s: switched to ${r.mode}`));
    svg.appendChild(g);
  });
  const line = (key, attrs) => {
    if (!rows.length) return;
    const pts = rows.map((r) => `${x(r.t_s).toFixed(1)},${y(mbit(r[key])).toFixed(1)}`).join(" ");
    svg.appendChild(svgEl("polyline", Object.assign({ points: pts, fill: "none", "stroke-linejoin": "round" }, attrs)));
  };
  line("potential_output_bps", { stroke: "#1565c0", "stroke-width": 1.5, "stroke-dasharray": "6 4", class: "potential" });
  line("output_bps", { stroke: "#1565c0", "stroke-width": 2, class: "output" });
  line("input_bps", { stroke: "#c62828", "stroke-width": 3.5, class: "input" });
  // The last point, with its numbers (what a keyboard or screen-reader user can read).
  const last = rows[rows.length - 1];
  if (last) {
    svg.appendChild(svgEl("circle", { cx: x(last.t_s), cy: y(mbit(last.input_bps)), r: 3.5, fill: "#c62828" }));
    svg.appendChild(svgEl("title", {}, `at ${last.t_s.toFixed(1)} s: input ${mbit(last.input_bps).toFixed(1)}, output ${mbit(last.output_bps).toFixed(1)}, potential ${mbit(last.potential_output_bps).toFixed(1)} Mbit/s, ${last.mode}`));
  }
  if (!rows.length) {
    svg.appendChild(svgEl("text", { x: (L + W - R) / 2, y: (T + H - B) / 2, "text-anchor": "middle", fill: "#5b6576" }, "waiting for the first point (every 100 ms)"));
  }
  return svg;
}

// A session's first response as the cloudlet saw it, on a scale of `scaleMs`: until the
// resume started, the resume, until the device's first answer; marks where the overlay
// had arrived and was all applied.
function breakdownBar(s, scaleMs) {
  const t = s.timings || {};
  const W = 300, H = 22;
  const x = (ms) => Math.min(W, (W * ms) / Math.max(scaleMs, 1));
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, class: "breakdown", preserveAspectRatio: "none" });
  const ready = s.first_ready_ms;
  const parts = [];
  if (ready != null) {
    const resume = Math.min(t.resume_ms || 0, ready);
    parts.push(["before", 0, ready - resume, "#9db4d6", "until the resume started"]);
    parts.push(["resume", ready - resume, ready, "#f0a030", "resuming the VM"]);
    if (t.first_response_ms != null && t.first_response_ms >= ready) {
      parts.push(["answer", ready, t.first_response_ms, "#3c9a5f", "until the first answer"]);
    }
  }
  for (const [cls, a, b, color, what] of parts) {
    const r = svgEl("rect", { class: cls, x: x(a), y: 4, width: Math.max(0.5, x(b) - x(a)), height: H - 8, fill: color });
    r.appendChild(svgEl("title", {}, `${what}: ${((b - a) / 1000).toFixed(2)} s`));
    svg.appendChild(r);
  }
  const mark = (ms, dash, what) => {
    if (ms == null) return;
    const m = svgEl("line", { x1: x(ms), x2: x(ms), y1: 0, y2: H, stroke: "#333", "stroke-width": 1.5, "stroke-dasharray": dash });
    m.appendChild(svgEl("title", {}, `${what} at ${(ms / 1000).toFixed(2)} s`));
    svg.appendChild(m);
  };
  mark(t.received_ms, "", "overlay received");
  mark(t.applied_ms, "2 2", "all applied" + (t.decompress_ms != null ? ` (decompressing ${(t.decompress_ms / 1000).toFixed(2)} s)` : ""));
  return svg;
}

window.forageCharts = { handoffChart, breakdownBar };
