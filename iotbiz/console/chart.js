// Small SVG line charts of telemetry samples (percentages over time), drawn by hand.

import { svg } from "./dom.js";

const W = 640;
const H = 200;
const PAD = { left: 40, right: 14, top: 14, bottom: 26 };

function pad2(n) {
  return String(n).padStart(2, "0");
}

function timeLabel(seconds, withDay) {
  const d = new Date(seconds * 1000);
  const hm = `${pad2(d.getHours())}:${pad2(d.getMinutes())}`;
  return withDay && d.getHours() === 0 && d.getMinutes() === 0
    ? `${pad2(d.getDate())}.${pad2(d.getMonth() + 1)}.`
    : hm;
}

const MAX_POINTS = 720; // about one per pixel of the plot at its widest

/** At most MAX_POINTS points: the samples of each time bucket averaged (a day at one sample a
 * second would otherwise be a path of 86,400 points). */
function downsample(points, since, until) {
  if (points.length <= MAX_POINTS) return points;
  const width = (until - since) / MAX_POINTS;
  const buckets = new Map();
  for (const p of points) {
    const index = Math.floor((p.t - since) / width);
    const bucket = buckets.get(index) || { t: 0, v: 0, n: 0 };
    bucket.t += p.t;
    bucket.v += p.v;
    bucket.n += 1;
    buckets.set(index, bucket);
  }
  return [...buckets.values()].map((b) => ({ t: b.t / b.n, v: b.v / b.n }));
}

/**
 * A line chart of `samples[key]` (0 to 100) from `since` to `until` (epoch seconds).
 * Gaps longer than three sampling intervals break the line.
 */
export function lineChart({ samples, key, since, until, title, tone = "blue", testid }) {
  const x = (t) => PAD.left + ((t - since) / (until - since)) * (W - PAD.left - PAD.right);
  const y = (v) => PAD.top + (1 - Math.max(0, Math.min(100, v)) / 100) * (H - PAD.top - PAD.bottom);
  const points = downsample(
    samples
      .filter((s) => typeof s.ts === "number" && typeof s[key] === "number" && s.ts >= since)
      .map((s) => ({ t: s.ts, v: s[key] })),
    since,
    until,
  );

  const root = svg("svg", {
    class: `chart chart-${tone}`,
    viewBox: `0 0 ${W} ${H}`,
    role: "img",
    "aria-label": title,
    testid,
  });
  root.dataset.points = String(points.length);

  // grid and y labels
  for (const v of [0, 25, 50, 75, 100]) {
    root.append(
      svg("line", { class: "chart-grid", x1: PAD.left, x2: W - PAD.right, y1: y(v), y2: y(v) }),
      svg("text", { class: "chart-label", x: PAD.left - 6, y: y(v) + 4, "text-anchor": "end" }, `${v}%`),
    );
  }
  // x ticks
  const span = until - since;
  const step = span <= 2 * 3600 ? 600 : span <= 12 * 3600 ? 2 * 3600 : 4 * 3600;
  const offset = new Date().getTimezoneOffset() * 60;
  for (let t = Math.ceil((since - offset) / step) * step + offset; t <= until; t += step) {
    const px = x(t);
    if (px < PAD.left + 12 || px > W - PAD.right - 12) continue;
    root.append(
      svg("line", { class: "chart-tick", x1: px, x2: px, y1: H - PAD.bottom, y2: H - PAD.bottom + 4 }),
      svg(
        "text",
        { class: "chart-label", x: px, y: H - 8, "text-anchor": "middle" },
        timeLabel(t, span > 6 * 3600),
      ),
    );
  }
  root.append(
    svg("line", { class: "chart-axis", x1: PAD.left, x2: W - PAD.right, y1: H - PAD.bottom, y2: H - PAD.bottom }),
  );

  if (!points.length) {
    root.append(
      svg("text", { class: "chart-empty", x: W / 2, y: H / 2, "text-anchor": "middle" }, "No samples in this period"),
    );
    return root;
  }

  const intervals = points.slice(1).map((p, i) => p.t - points[i].t).sort((a, b) => a - b);
  const typical = intervals.length ? intervals[Math.floor(intervals.length / 2)] : 60;
  const gap = Math.max(typical * 3, 1);
  const segments = [];
  let current = [];
  points.forEach((p, i) => {
    if (i > 0 && p.t - points[i - 1].t > gap) {
      segments.push(current);
      current = [];
    }
    current.push(p);
  });
  segments.push(current);

  const fmt = (n) => n.toFixed(1);
  let line = "";
  let area = "";
  for (const segment of segments) {
    const coords = segment.map((p) => `${fmt(x(p.t))},${fmt(y(p.v))}`);
    line += `M${coords.join("L")}`;
    if (segment.length > 1) {
      area +=
        `M${fmt(x(segment[0].t))},${fmt(y(0))}L${coords.join("L")}` +
        `L${fmt(x(segment[segment.length - 1].t))},${fmt(y(0))}Z`;
    }
  }
  if (area) root.append(svg("path", { class: "chart-area", d: area }));
  root.append(svg("path", { class: "chart-line", d: line, testid: "chart-line" }));
  const last = points[points.length - 1];
  root.append(svg("circle", { class: "chart-dot", cx: x(last.t), cy: y(last.v), r: 3.5 }));

  // hover: the nearest sample's value and time
  const cursor = svg("line", { class: "chart-cursor", y1: PAD.top, y2: H - PAD.bottom, x1: 0, x2: 0 });
  const label = svg("text", { class: "chart-hover", y: PAD.top + 2 });
  const hover = svg("g", { class: "chart-hover-group" }, cursor, label);
  hover.style.display = "none";
  const capture = svg("rect", {
    class: "chart-capture",
    x: PAD.left,
    y: PAD.top,
    width: W - PAD.left - PAD.right,
    height: H - PAD.top - PAD.bottom,
  });
  capture.addEventListener("mousemove", (event) => {
    const box = root.getBoundingClientRect();
    const px = ((event.clientX - box.left) / box.width) * W;
    const t = since + ((px - PAD.left) / (W - PAD.left - PAD.right)) * (until - since);
    let best = points[0];
    for (const p of points) if (Math.abs(p.t - t) < Math.abs(best.t - t)) best = p;
    const bx = x(best.t);
    cursor.setAttribute("x1", bx);
    cursor.setAttribute("x2", bx);
    label.setAttribute("x", bx > W / 2 ? bx - 6 : bx + 6);
    label.setAttribute("text-anchor", bx > W / 2 ? "end" : "start");
    const d = new Date(best.t * 1000);
    label.textContent = `${best.v.toFixed(1)}%  ${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
    hover.style.display = "";
  });
  capture.addEventListener("mouseleave", () => {
    hover.style.display = "none";
  });
  root.append(hover, capture);
  return root;
}
