// callbridge dashboard: fetches dashboard/data (same origin, session cookie) and draws every chart as inline
// SVG by hand. No library, no build step, no request to another site (the page's CSP forbids it). Values
// reach the page only through textContent and attributes, never as HTML.
"use strict";

const METRICS = {
  calls_to_leads: { ru: "Звонки к лидам", en: "calls to leads", kind: "pct" },
  avg_talk_seconds: { ru: "Средний разговор", en: "average talk", kind: "sec" },
  approval_rate: { ru: "Конверсия в подтверждённые", en: "approved conversion", kind: "pct" },
  roas: { ru: "ROAS", en: "return on ad spend", kind: "x" },
  cpa_rub: { ru: "Цена подтверждённого заказа", en: "cost per approved order (CPA)", kind: "rub" },
};
const OUTCOMES = {
  answered: ["отвечен", "answered"], busy: ["занято", "busy"], no_answer: ["нет ответа", "no answer"],
  operator_missed: ["оператор не ответил", "operator missed"], failed: ["ошибка", "failed"],
  not_dialled: ["не звонили", "not dialled"],
};
const SVG = "http://www.w3.org/2000/svg";  // a namespace name, never fetched

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) node.setAttribute(k, v);
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}
function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}
function bi(ru, en) { return [el("span", { class: "ru" }, ru), " ", el("span", { class: "en" }, en)]; }
function num(v) { return typeof v === "number" && isFinite(v) ? v : null; }

function fmt(kind, v) {
  v = num(v);
  if (v === null) return "—";
  if (kind === "pct") return (v * 100).toFixed(1) + "%";
  if (kind === "sec") return Math.round(v) + " s";
  if (kind === "x") return v.toFixed(2) + "×";
  if (kind === "rub") return Math.round(v).toLocaleString("ru-RU") + " ₽";
  return String(Math.round(v * 100) / 100);
}
function signedPct(v) { v = num(v); return v === null ? "—" : (v > 0 ? "+" : "") + (v * 100).toFixed(0) + "%"; }

// Grouped bars, one group a day; an optional dashed target line.
function barChart(days, series, opts) {
  const W = 440, H = 214, L = 48, R = 8, T = 24, B = 30, pw = W - L - R, ph = H - T - B;
  const all = series.flatMap((s) => s.values.map(num)).filter((v) => v !== null);
  const target = num(opts.target);
  let top = Math.max(0, ...all, target === null ? 0 : target) * 1.15;
  if (!(top > 0)) top = 1;
  const y = (v) => T + ph - (v / top) * ph;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "data-chart": opts.name,
                            "aria-label": opts.label });
  root.append(svg("line", { class: "axis", x1: L, y1: T + ph, x2: W - R, y2: T + ph }));
  for (const v of [0, top / 2, top]) {
    root.append(svg("line", { class: "axis", x1: L, y1: y(v), x2: W - R, y2: y(v) }));
    root.append(svg("text", { x: L - 4, y: y(v) + 3, "text-anchor": "end" }, fmt(opts.kind, v)));
  }
  const slot = pw / Math.max(1, days.length), every = Math.ceil(days.length / 10);
  const bw = (slot * 0.8) / series.length;
  days.forEach((day, i) => {
    const x0 = L + i * slot + slot * 0.1;
    series.forEach((s, k) => {
      const v = num(s.values[i]);
      const met = s.met ? s.met[i] : null;
      const cls = ["bar", s.cls, met === true ? "met" : met === false ? "unmet" : ""].filter(Boolean).join(" ");
      const h = v === null ? 0 : Math.max(v > 0 ? 1 : 0, (v / top) * ph);
      const bar = svg("rect", { class: cls, x: (x0 + k * bw).toFixed(1), y: (T + ph - h).toFixed(1),
                                width: Math.max(1, bw - 1).toFixed(1), height: h.toFixed(1), "data-day": day,
                                "data-series": s.key, "data-value": v === null ? "" : String(v) });
      bar.append(svg("title", {}, `${day} ${s.title}: ${fmt(opts.kind, v)}`));
      root.append(bar);
      if (opts.labels) {
        root.append(svg("text", { class: "value-label", x: (x0 + k * bw + bw / 2).toFixed(1),
                                  y: (T + ph - h - 3).toFixed(1), "text-anchor": "middle", "data-day": day },
                        fmt(opts.kind, v)));
      }
    });
    if (i % every === 0) {
      root.append(svg("text", { x: (L + i * slot + slot / 2).toFixed(1), y: H - B + 14, "text-anchor": "middle" },
                      day.slice(8, 10) + "." + day.slice(5, 7)));
    }
  });
  if (target !== null) {
    root.append(svg("line", { class: "target", x1: L, x2: W - R, y1: y(target).toFixed(1), y2: y(target).toFixed(1),
                              "data-target": String(target) }));
    // Above the plot, where no bar reaches: the line itself marks the height.
    root.append(svg("line", { class: "target", x1: W - R - 150, x2: W - R - 130, y1: T - 9, y2: T - 9 }));
    root.append(svg("text", { class: "target-label", x: W - R - 126, y: T - 6 },
                    `цель · target ${opts.op || ""} ${fmt(opts.kind, target)}`));
  }
  return root;
}

// A horizontal meter (spend against budget, channels against the limit) with threshold ticks.
function meter(name, value, limit, ticks) {
  const W = 320, H = 26, share = limit > 0 ? value / limit : 0;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "data-meter": name, "data-value": String(value),
                            "data-limit": String(limit) });
  root.append(svg("rect", { class: "meter-bg", x: 0, y: 4, width: W, height: H - 8, rx: 3 }));
  const cls = share >= 1 ? "meter over" : ticks.length && share >= ticks[0] ? "meter warn" : "meter";
  root.append(svg("rect", { class: cls, x: 0, y: 4, width: (Math.min(1, share) * W).toFixed(1), height: H - 8, rx: 3 }));
  for (const t of ticks) {
    const x = Math.min(W - 1, t * W).toFixed(1);
    root.append(svg("line", { class: "tick", x1: x, x2: x, y1: 0, y2: H, "data-threshold": String(t) }));
  }
  return root;
}

function chartCard(name, title, chart, legend) {
  const card = el("div", { class: "card chart", "data-metric": name }, el("h2", {}, ...title), chart);
  if (legend) card.append(el("p", { class: "legend" }, ...legend));
  return card;
}

function renderTotals(total) {
  const box = document.getElementById("totals");
  box.replaceChildren();
  for (const [name, meta] of Object.entries(METRICS)) {
    const m = (total.metrics || {})[name] || {};
    const badge = m.met === true ? el("span", { class: "met" }, "✓ выполнено · met")
      : m.met === false ? el("span", { class: "unmet" }, "✗ не выполнено · not met")
      : el("span", { class: "nodata" }, "нет данных · no data");
    const target = num(m.target) === null ? el("div", { class: "target" }, "цель не задана · no target")
      : el("div", { class: "target" }, `цель · target ${m.op || ""} ${fmt(meta.kind, m.target)} `, badge);
    const tile = el("div", { class: "card tile", "data-metric": name, "data-value": num(m.value) === null ? "" : m.value },
      el("h2", {}, ...bi(meta.ru, meta.en)), el("div", { class: "value" }, fmt(meta.kind, m.value)), target);
    if (num(m.baseline) !== null) {
      const change = el("div", { class: "change", "data-change": num(m.change) === null ? "" : m.change },
        `база · baseline ${fmt(meta.kind, m.baseline)}: ${signedPct(m.change)}`);
      if (num(m.goal) !== null) {
        change.append(` · цель · goal ${fmt(meta.kind, m.goal)} `, m.goal_met === true ? el("span", { class: "met" }, "✓")
          : m.goal_met === false ? el("span", { class: "unmet" }, "✗") : "");
      }
      tile.append(change);
    }
    box.append(tile);
  }
  const counts = [["Лиды", "leads", total.leads], ["Звонки", "calls", total.calls], ["Отвечено", "answered", total.answered],
    ["Подтверждено", "approved", total.approved], ["Выручка", "revenue", fmt("rub", total.revenue_rub)],
    ["Расход на связь", "telephony cost", fmt("rub", total.cost_rub)], ["Реклама", "ad spend", fmt("rub", total.adspend_rub)],
    ["Скорость (медиана / p95)", "speed to lead (median / p95)",
     `${fmt("sec", total.speed_to_lead_median_s)} / ${fmt("sec", total.speed_to_lead_p95_s)}`]];
  const tile = el("div", { class: "card tile counts-tile" }, el("h2", {}, ...bi("Итого", "totals")));
  for (const [ru, en, v] of counts) {
    tile.append(el("div", { class: "counts", "data-count": en }, `${ru} · ${en}: `, el("b", {}, v ?? "—")));
  }
  box.append(tile);
}

function renderCharts(summary) {
  const rows = summary.days || [], days = rows.map((r) => r.day), box = document.getElementById("charts");
  box.replaceChildren();
  const volume = [["leads", "лиды · leads", "k0"], ["calls", "звонки · calls", "s1"], ["answered", "отвечено · answered", "s2"]]
    .map(([key, title, cls]) => ({ key, title, cls, values: rows.map((r) => r[key]) }));
  box.append(chartCard("volume", bi("Лиды и звонки по дням", "leads and calls by day"),
    barChart(days, volume, { name: "volume", kind: "n", label: "leads, calls, answered" }),
    [el("span", { class: "k0" }, "■ лиды · leads "), el("span", { class: "k1" }, "■ звонки · calls "),
     el("span", { class: "k2" }, "■ отвечено · answered")]));
  for (const [name, meta] of Object.entries(METRICS)) {
    const metric = (r) => (r.metrics || {})[name] || {};
    const target = (summary.total.metrics || {})[name] || {};
    const series = [{ key: "value", title: meta.en, values: rows.map((r) => metric(r).value), met: rows.map((r) => metric(r).met) }];
    box.append(chartCard(name, bi(meta.ru, meta.en),
      barChart(days, series, { name, kind: meta.kind, target: target.target, op: target.op, labels: days.length <= 31, label: meta.en })));
  }
  const speed = [{ key: "median", title: "median", cls: "", values: rows.map((r) => r.speed_to_lead_median_s) },
                 { key: "p95", title: "p95", cls: "s1", values: rows.map((r) => r.speed_to_lead_p95_s) }];
  box.append(chartCard("speed_to_lead", bi("Скорость до первого звонка", "speed to lead"),
    barChart(days, speed, { name: "speed_to_lead", kind: "sec", label: "speed to lead" }),
    [el("span", { class: "k0" }, "■ медиана · median "), el("span", { class: "k1" }, "■ p95")]));
}

function renderGauges(data) {
  const b = data.budget, c = data.channels;
  const budget = document.getElementById("budget");
  budget.replaceChildren(el("h2", {}, ...bi("Бюджет месяца", "month's budget")),
    meter("budget", b.spent_rub, b.monthly_rub, b.thresholds || []),
    el("p", { id: "budget-text" }, `${fmt("rub", b.spent_rub)} из · of ${fmt("rub", b.monthly_rub)} ` +
      `(${(b.share * 100).toFixed(1)}%), ${b.month}`));
  const channels = document.getElementById("channels");
  channels.replaceChildren(el("h2", {}, ...bi("Каналы заняты", "channels in use")),
    meter("channels", c.busy, c.limit, [c.alert_ratio ?? 0.8]),
    el("p", { id: "channels-text" }, `${c.busy} из · of ${c.limit} (${c.provider})`));
}

function renderCalls(calls, offers) {
  const names = Object.fromEntries(offers.map((o) => [String(o.id), o.name]));
  const body = document.querySelector("#calls tbody");
  body.replaceChildren();
  for (const call of calls) {
    const started = call.started_at ? new Date(call.started_at) : null;
    const [ru, en] = OUTCOMES[call.outcome] || [call.outcome || "идёт", call.outcome || "in progress"];
    const url = call.recording_url;
    const link = url && (/^https?:\/\//.test(url) || url.startsWith("/"))
      ? el("a", { href: url, rel: "noopener noreferrer", target: "_blank" }, "▶ слушать · listen") : "—";
    body.append(el("tr", { "data-call": call.call_id, "data-outcome": call.outcome || "" },
      el("td", {}, started && !isNaN(started) ? started.toLocaleString("ru-RU") : "—"),
      el("td", {}, names[String(call.offer_id)] || String(call.offer_id ?? "—")),
      el("td", {}, call.phone || "—"), el("td", {}, `${ru} · ${en}`),
      el("td", { class: "num" }, call.talk_seconds ?? "—"), el("td", {}, link)));
  }
  if (!calls.length) body.append(el("tr", {}, el("td", { colspan: 6 }, "звонков нет · no calls yet")));
}

function fillForm(data) {
  document.getElementById("from").value = data.from;
  document.getElementById("to").value = data.to;
  const select = document.getElementById("offer_id");
  for (const o of data.offers) select.append(el("option", { value: o.id }, `${o.id} ${o.name}`));
  select.value = data.offer_id === null ? "" : String(data.offer_id);
}

async function main() {
  const status = document.getElementById("status");
  const query = new URLSearchParams(location.search);
  const params = new URLSearchParams();
  for (const k of ["from", "to", "offer_id"]) if (query.get(k)) params.set(k, query.get(k));
  try {
    const reply = await fetch("dashboard/data?" + params, { credentials: "same-origin", cache: "no-store" });
    const data = await reply.json();
    if (!reply.ok) throw new Error(`${data.error || reply.status} (${data.field || ""})`);
    fillForm(data);
    renderTotals(data.summary.total);
    renderGauges(data);
    renderCharts(data.summary);
    renderCalls(data.calls || [], data.offers);
    status.replaceChildren(...bi(`Данные на ${new Date(data.generated_at).toLocaleString("ru-RU")}`,
      `data as of ${data.generated_at}; ${data.from} – ${data.to}`));
    document.body.dataset.ready = "1";
  } catch (err) {
    status.className = "error";
    status.replaceChildren(...bi("Ошибка:", "error:"), " " + err.message);
    document.body.dataset.ready = "error";
  }
}
document.addEventListener("DOMContentLoaded", main);
