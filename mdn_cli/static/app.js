// The mdn page: send each photo to POST predict (one photo per request, a few at a time, so one
// bad photo fails only its own card and the server batches them), then draw the answer.
// No framework and no build step. Records may carry fields this page does not know: they are
// kept in the card's JSON view; fields it knows but that are missing are simply not shown.
"use strict";

const IN_FLIGHT = 6; // requests at once (a browser opens at most 6 connections to a host)
const SVG_NS = "http://www.w3.org/2000/svg";

// ---------------------------------------------------------------------------------------------
// The mixture's density, CDF and quantiles, in target units

const SQRT_2PI = Math.sqrt(2 * Math.PI);

function erf(x) {
  // Abramowitz & Stegun 7.1.26, |error| < 1.5e-7: plenty for a plot
  const s = x < 0 ? -1 : 1;
  const a = Math.abs(x);
  const t = 1 / (1 + 0.3275911 * a);
  const y = 1 - ((((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * Math.exp(-a * a);
  return s * y;
}

function components(record) {
  const list = Array.isArray(record.components) ? record.components : [];
  return list
    .map((c) => ({ w: Number(c.weight), mu: Number(c.mean), s: Number(c.std) }))
    .filter((c) => Number.isFinite(c.w) && Number.isFinite(c.mu) && Number.isFinite(c.s) && c.s > 0 && c.w > 0);
}

const isLog = (record) => record.target_transform === "log";

// Density of one weighted component at y (target units). Under "log" the component is a Gaussian
// of log(y), so the density of y carries the Jacobian 1/y.
function componentDensity(c, y, log) {
  if (log) {
    if (!(y > 0)) return 0;
    const z = (Math.log(y) - c.mu) / c.s;
    return (c.w * Math.exp(-0.5 * z * z)) / (c.s * SQRT_2PI * y);
  }
  const z = (y - c.mu) / c.s;
  return (c.w * Math.exp(-0.5 * z * z)) / (c.s * SQRT_2PI);
}

function density(record, y) {
  const log = isLog(record);
  return components(record).reduce((sum, c) => sum + componentDensity(c, y, log), 0);
}

function cdf(record, y) {
  const log = isLog(record);
  if (log && !(y > 0)) return 0;
  const t = log ? Math.log(y) : y;
  const comps = components(record);
  const total = comps.reduce((sum, c) => sum + c.w, 0);
  return comps.reduce((sum, c) => sum + c.w * 0.5 * (1 + erf((t - c.mu) / (c.s * Math.SQRT2))), 0) / total;
}

function quantile(record, p) {
  const comps = components(record);
  let lo = Math.min(...comps.map((c) => c.mu - 12 * c.s));
  let hi = Math.max(...comps.map((c) => c.mu + 12 * c.s));
  const log = isLog(record);
  for (let i = 0; i < 100; i++) { // bisection in the model's space, where the CDF is smooth
    const mid = 0.5 * (lo + hi);
    if (cdf(record, log ? Math.exp(mid) : mid) < p) lo = mid; else hi = mid;
  }
  const t = 0.5 * (lo + hi);
  return log ? Math.exp(t) : t;
}

// ---------------------------------------------------------------------------------------------
// Small helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) node.append(child);
  }
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  return node;
}

const isNum = (x) => typeof x === "number" && Number.isFinite(x);

// Four significant digits, like `mdn predict`'s table.
function fmt(x, unboundedText = "∞") {
  if (x === null) return unboundedText;
  if (!isNum(x)) return x === undefined ? "–" : String(x);
  if (x === 0) return "0";
  const a = Math.abs(x);
  if (a >= 1e5 || a < 1e-3) return x.toExponential(2).replace("e+", "e");
  return String(Number(x.toPrecision(4)));
}

function fmtInterval(pair) {
  if (!Array.isArray(pair) || pair.length !== 2) return fmt(pair);
  return `[${fmt(pair[0], "−∞")}, ${fmt(pair[1], "∞")}]`;
}

// HDR pieces in any of the shapes a record may use: [[lo, hi], ...], [{low, high}, ...],
// {"pieces"/"intervals": [...]} or one [lo, hi].
function hdrPieces(value) {
  if (value && !Array.isArray(value) && typeof value === "object") value = value.pieces || value.intervals || [];
  if (!Array.isArray(value)) return [];
  if (value.length === 2 && value.every((v) => v === null || isNum(v))) value = [value];
  return value
    .map((p) => (Array.isArray(p) ? p : [p.low ?? p.lo ?? p.start ?? null, p.high ?? p.hi ?? p.end ?? null]))
    .filter((p) => p.length === 2 && p.every((v) => v === null || isNum(v)));
}

// Modes as [{location, mass}], from [{location, mass}] or [[location, mass]].
// Modes worth naming: at least 5% of the probability (as `mdn predict`'s table).
const LIKELY_MASS = 0.05;

function modesOf(record) {
  if (!Array.isArray(record.modes)) return [];
  return record.modes
    .map((m) => (Array.isArray(m) ? { location: m[0], mass: m[1] } : { location: m?.location, mass: m?.mass }))
    .filter((m) => isNum(m.location) && (!isNum(m.mass) || m.mass >= LIKELY_MASS));
}

const COUNT_WORDS = ["no", "one", "two", "three", "four", "five", "six"];

function modesSentence(record) {
  const modes = modesOf(record);
  if (modes.length < 2) return null;
  modes.sort((a, b) => (b.mass ?? 0) - (a.mass ?? 0));
  const parts = modes.map((m) => `~${fmt(m.location)}${isNum(m.mass) ? ` (${Math.round(m.mass * 100)}%)` : ""}`);
  const list = parts.length === 2 ? parts.join(" and ") : `${parts.slice(0, -1).join(", ")} and ${parts.at(-1)}`;
  return `${COUNT_WORDS[modes.length] ?? modes.length} likely answers: ${list}`;
}

function intervalKeys(record) {
  return Object.keys(record)
    .filter((k) => /^interval_\d+$/.test(k))
    .sort((a, b) => Number(a.slice(9)) - Number(b.slice(9)));
}

// Highest-density regions, shown when they say more than the central intervals: for a multimodal answer.
function hdrKeys(record) {
  if (modesOf(record).length < 2) return [];
  return Object.keys(record).filter((k) => /^hdr_\d+$/.test(k));
}

function warningsOf(record) {
  const out = [];
  if (record.in_distribution === false) {
    const score = isNum(record.ood_score) ? ` (out-of-distribution score ${fmt(record.ood_score)})` : "";
    out.push(`This photo looks unlike the training images${score}: treat the prediction with caution.`);
  }
  const calibration = record.calibration;
  if (calibration && typeof calibration.warning === "string") out.push(`Intervals: ${calibration.warning}.`);
  const extra = record.warnings ?? record.warning;
  for (const w of Array.isArray(extra) ? extra : extra ? [extra] : []) out.push(String(w));
  return out;
}

// ---------------------------------------------------------------------------------------------
// The plot: density as inline SVG

function niceTicks(lo, hi, count) {
  const span = hi - lo;
  const raw = span / count;
  const step10 = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * step10).find((s) => span / s <= count) ?? 10 * step10;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + 1e-9 * span; t += step) ticks.push(Math.abs(t) < 1e-12 * span ? 0 : t);
  return ticks;
}

function plotRange(record) {
  let lo = quantile(record, 0.002);
  let hi = quantile(record, 0.998);
  const marks = [record.mean, record.median, ...intervalKeys(record).flatMap((k) => record[k] || [])];
  for (const v of marks) if (isNum(v) && Math.abs(v - 0.5 * (lo + hi)) < 10 * (hi - lo + 1e-12)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  if (!(hi > lo)) { const d = Math.abs(lo) * 0.1 || 1; lo -= d; hi += d; }
  const pad = 0.05 * (hi - lo);
  lo -= pad;
  hi += pad;
  if (isLog(record)) lo = Math.max(lo, 0);
  return [lo, hi];
}

function densityPlot(record) {
  const comps = components(record);
  if (!comps.length) return el("p", { class: "muted", text: "No mixture components in the answer: nothing to plot." });
  const log = isLog(record);
  const W = 400, H = 170, left = 10, right = 10, top = 30, bottom = 24;
  const [x0, x1] = plotRange(record);
  const n = 320;
  const xs = Array.from({ length: n + 1 }, (_, i) => x0 + ((x1 - x0) * i) / n);
  const ys = xs.map((x) => density(record, x));
  const yMax = Math.max(...ys.filter(Number.isFinite)) * 1.05 || 1;
  const px = (x) => left + ((x - x0) / (x1 - x0)) * (W - left - right);
  const py = (y) => H - bottom - (Math.min(y, yMax) / yMax) * (H - top - bottom);
  const base = H - bottom;
  const line = (pts) => pts.map(([x, y], i) => `${i ? "L" : "M"}${px(x).toFixed(2)},${py(y).toFixed(2)}`).join("");

  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "plot", role: "img",
    "aria-label": `Predicted density${log ? " (log-normal mixture)" : ""}` });

  // shaded intervals: the widest first, so the narrower one sits on top
  const intervals = intervalKeys(record).map((k) => [k, record[k]]).filter(([, v]) => Array.isArray(v)).reverse();
  intervals.forEach(([key, [a, b]], i) => {
    const lo = Math.max(a === null ? x0 : a, x0), hi = Math.min(b === null ? x1 : b, x1);
    if (!(hi > lo)) return;
    const pts = [[lo, 0]];
    for (let j = 0; j <= 80; j++) { const x = lo + ((hi - lo) * j) / 80; pts.push([x, density(record, x)]); }
    pts.push([hi, 0]);
    root.append(svg("path", { d: line(pts) + "Z", class: `band band-${intervals.length - 1 - i}`, "data-key": key }));
  });

  // axis and ticks
  root.append(svg("line", { x1: left, x2: W - right, y1: base, y2: base, class: "axis" }));
  for (const t of niceTicks(x0, x1, 6)) {
    root.append(svg("line", { x1: px(t), x2: px(t), y1: base, y2: base + 4, class: "axis" }));
    const label = svg("text", { x: px(t), y: base + 16, class: "tick" });
    label.textContent = fmt(t);
    root.append(label);
  }

  // weighted components, dashed
  for (const c of comps) {
    if (c.w < 0.005) continue;
    const pts = xs.map((x) => [x, componentDensity(c, x, log)]);
    root.append(svg("path", { d: line(pts), class: "component" }));
  }
  root.append(svg("path", { d: line(xs.map((x, i) => [x, ys[i]])), class: "curve" }));

  // highest-density region pieces: bars along the baseline
  for (const key of hdrKeys(record)) {
    for (const [a, b] of hdrPieces(record[key])) {
      const lo = Math.max(a === null ? x0 : a, x0), hi = Math.min(b === null ? x1 : b, x1);
      if (hi > lo) root.append(svg("line", { x1: px(lo), x2: px(hi), y1: base - 2, y2: base - 2, class: "hdr" }));
    }
  }

  // mean and median
  const marks = [["mean", record.mean, "mark-mean", 11], ["median", record.median, "mark-median", 24]];
  for (const [name, value, cls, ty] of marks) {
    if (!isNum(value) || value < x0 || value > x1) continue;
    root.append(svg("line", { x1: px(value), x2: px(value), y1: top - 4, y2: base, class: cls }));
    const near = px(value) > W - 80;
    const label = svg("text", { x: px(value) + (near ? -4 : 4), y: ty, class: `mark-label ${cls}`, "text-anchor": near ? "end" : "start" });
    label.textContent = `${name} ${fmt(value)}`;
    root.append(label);
  }
  return root;
}

function legend(record) {
  const items = [];
  const keys = intervalKeys(record);
  keys.forEach((k, i) => items.push([`swatch band-${i}`, `${k.slice(9)}% interval`]));
  items.push(["swatch line-mean", "mean"], ["swatch line-median", "median"], ["swatch line-component", "components"]);
  if (hdrKeys(record).length) items.push(["swatch line-hdr", hdrKeys(record).map((k) => `${k.slice(4)}% HDR`).join(", ")]);
  return el("ul", { class: "legend" }, items.map(([cls, text]) => el("li", {}, el("span", { class: cls }), text)));
}

// ---------------------------------------------------------------------------------------------
// The numbers

function numbersTable(record) {
  const rows = [];
  const add = (label, key, value, text) => rows.push(
    el("tr", {}, el("th", { scope: "row", text: label }),
      el("td", { "data-key": key, "data-value": JSON.stringify(value), text })));
  for (const [key, label] of [["mean", "mean"], ["std", "std"], ["median", "median"], ["mode", "mode"]]) {
    if (key in record) add(label, key, record[key], fmt(record[key]));
  }
  for (const key of intervalKeys(record)) add(`${key.slice(9)}% interval`, key, record[key], fmtInterval(record[key]));
  for (const key of hdrKeys(record)) {
    const pieces = hdrPieces(record[key]);
    add(`${key.slice(4)}% HDR`, key, record[key], pieces.length ? pieces.map(fmtInterval).join(" ∪ ") : fmt(record[key]));
  }
  // The split of the std matters for an ensemble only: a single model's epistemic part is zero.
  const split = record.std_epistemic > 0 ? [["std_aleatoric", "std (noise)"], ["std_epistemic", "std (model)"]] : [];
  for (const [key, label] of [...split, ["ood_score", "OOD score"]]) {
    if (key in record) add(label, key, record[key], fmt(record[key]));
  }
  return el("table", { class: "numbers" }, el("tbody", {}, rows));
}

// ---------------------------------------------------------------------------------------------
// Cards

const cards = document.getElementById("cards");
const queue = [];
let running = 0;
const urls = new Set();

function newCard(name, file) {
  let thumb;
  if (file) {
    const url = URL.createObjectURL(file);
    urls.add(url);
    thumb = el("img", { class: "thumb", src: url, alt: "" });
    thumb.addEventListener("error", () => thumb.replaceWith(el("div", { class: "thumb no-preview", text: "no preview" })));
  } else {
    thumb = el("div", { class: "thumb no-preview", text: "no preview" });
  }
  const body = el("div", { class: "card-body" }, el("div", { class: "status" }, el("span", { class: "spinner" }), "predicting…"));
  const card = el("article", { class: "card", "data-state": "loading", "aria-busy": "true" },
    el("div", { class: "card-head" }, thumb,
      el("div", { class: "head-text" }, el("h2", { class: "name", title: name, text: name }), el("div", { class: "headline" }))),
    body);
  return card;
}

function showRecord(card, record) {
  card.dataset.state = "done";
  card.removeAttribute("aria-busy");
  const headline = card.querySelector(".headline");
  headline.replaceChildren(...[
    el("span", { class: "big", "data-key": "mean", text: fmt(record.mean) }),
    isNum(record.std) ? el("span", { class: "pm", text: ` ± ${fmt(record.std)}` }) : null,
  ].filter(Boolean));
  const sentence = modesSentence(record);
  const body = card.querySelector(".card-body");
  body.replaceChildren(...[
    ...warningsOf(record).map((w) => el("p", { class: "banner warn", role: "alert", text: w })),
    sentence ? el("p", { class: "modes", text: sentence.charAt(0).toUpperCase() + sentence.slice(1) }) : null,
    densityPlot(record),
    legend(record),
    numbersTable(record),
    record.calibration?.guarantee ? el("p", { class: "guarantee", text: `Guarantee: ${record.calibration.guarantee}.` }) : null,
    el("details", { class: "raw" }, el("summary", { text: "Full answer (JSON)" }),
      el("pre", { text: JSON.stringify(record, null, 2) })),
  ].filter(Boolean)); // replaceChildren would print a null as "null"
}

function showError(card, message) {
  card.dataset.state = "error";
  card.removeAttribute("aria-busy");
  card.querySelector(".card-body").replaceChildren(el("p", { class: "banner error", role: "alert", text: message }));
}

async function predictOne(card, file) {
  const form = new FormData();
  form.append("file", file, file.name);
  let response;
  try {
    response = await fetch("predict", { method: "POST", body: form });
  } catch (e) {
    return showError(card, "Cannot reach the mdn server: is `mdn serve` still running?");
  }
  let payload = null;
  try {
    payload = await response.json();
  } catch (e) { /* a proxy's HTML error page */ }
  if (response.ok && Array.isArray(payload) && payload.length === 1) {
    const { image, ...record } = payload[0];
    return showRecord(card, record);
  }
  const message = payload?.files?.[0]?.error ?? payload?.error ?? `The server answered ${response.status} ${response.statusText}.`;
  showError(card, message);
}

function pump() {
  while (running < IN_FLIGHT && queue.length) {
    const [card, file] = queue.shift();
    running++;
    predictOne(card, file).finally(() => { running--; updateSummary(); pump(); });
  }
  updateSummary();
}

function addFiles(fileList) {
  const files = Array.from(fileList);
  if (!files.length) return;
  const batch = document.createDocumentFragment();
  for (const file of files) {
    const card = newCard(file.name || "pasted image", file);
    batch.append(card);
    queue.push([card, file]);
  }
  cards.prepend(batch);
  pump();
}

function updateSummary() {
  const all = cards.querySelectorAll(".card");
  const count = (state) => cards.querySelectorAll(`.card[data-state="${state}"]`).length;
  const parts = [`${all.length} photo${all.length === 1 ? "" : "s"}`];
  if (count("loading")) parts.push(`${count("loading")} in progress`);
  if (count("error")) parts.push(`${count("error")} could not be read`);
  document.getElementById("summary").textContent = parts.join(" · ");
  document.getElementById("toolbar").hidden = all.length === 0;
}

// For scripted use and tests: render a record as if the server had sent it.
function addRecord(name, record) {
  const card = newCard(name, null);
  cards.prepend(card);
  showRecord(card, record);
  updateSummary();
  return card;
}

// ---------------------------------------------------------------------------------------------
// Wiring

async function showModel() {
  const target = document.getElementById("model");
  try {
    const response = await fetch("health");
    const { model } = await response.json();
    const members = Array.isArray(model.members) ? model.members : [];
    const first = members[0] || {};
    const parts = members.length > 1
      ? [`ensemble of ${members.length}`, [...new Set(members.map((m) => m.backbone))].join(" + "), `${model.image_size} px`]
      : [first.backbone, `${first.components} components`, `${model.image_size} px`];
    if (model.target_transform && model.target_transform !== "none") parts.push(`${model.target_transform} target`);
    if (model.calibration?.method) parts.push(`calibration: ${model.calibration.method}`);
    target.replaceChildren(el("span", { class: "dot ok" }), parts.join(" · "));
    target.title = model.checkpoint;
  } catch (e) {
    target.replaceChildren(el("span", { class: "dot bad" }), "cannot reach the mdn server");
  }
}

function wire() {
  const input = document.getElementById("files");
  const drop = document.getElementById("drop");
  input.addEventListener("change", () => { addFiles(input.files); input.value = ""; });
  let depth = 0; // dragenter/leave fire for every child: count them
  window.addEventListener("dragenter", (e) => { e.preventDefault(); depth++; drop.classList.add("over"); });
  window.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; drop.classList.remove("over"); } });
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    drop.classList.remove("over");
    if (e.dataTransfer?.files?.length) addFiles(e.dataTransfer.files);
  });
  window.addEventListener("paste", (e) => { if (e.clipboardData?.files?.length) addFiles(e.clipboardData.files); });
  document.getElementById("clear").addEventListener("click", () => {
    queue.length = 0;
    cards.replaceChildren();
    for (const url of urls) URL.revokeObjectURL(url);
    urls.clear();
    updateSummary();
  });
  showModel();
}

window.mdn = { density, cdf, quantile, fmt, modesSentence, addRecord };
wire();
