// The admin status page: reads /status (JSON) and /metrics (Prometheus text) every 2 s
// and renders them. No framework, no build step; every value is put in the page as text.
"use strict";

const REFRESH_MS = 2000;
let previous = null; // { at, counters } of the last scrape, for rates

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

// Prometheus text format: `name{a="x",b="y"} value`; comments skipped.
function parseMetrics(text) {
  const samples = [];
  const line = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
  const label = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
  for (const raw of text.split("\n")) {
    if (raw.startsWith("#")) continue;
    const m = line.exec(raw);
    if (!m) continue;
    const labels = {};
    for (const l of (m[2] || "").matchAll(label)) {
      labels[l[1]] = l[2].replace(/\\n/g, "\n").replace(/\\"/g, '"').replace(/\\\\/g, "\\");
    }
    samples.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return samples;
}

// Sums of the counters the page shows rates of, by key.
function counters(samples) {
  const sums = new Map();
  const add = (key, value) => sums.set(key, (sums.get(key) || 0) + value);
  for (const s of samples) {
    if (s.name === "gateway_http_requests_total") {
      add("all", s.value);
      add("route:" + s.labels.route, s.value);
      if (s.labels.status_class === "5xx") {
        add("5xx", s.value);
        add("route5xx:" + s.labels.route, s.value);
      }
    } else if (s.name === "gateway_circuit_breaker_refused_total") {
      add("refused:" + s.labels.breaker, s.value);
    } else if (s.name === "gateway_upstream_attempts_total") {
      add("endpoint:" + s.labels.upstream + " " + s.labels.endpoint, s.value);
    }
  }
  return sums;
}

function gauge(samples, name) {
  const found = samples.filter((s) => s.name === name);
  return found.length ? found.reduce((sum, s) => sum + s.value, 0) : null;
}

function rate(now, key) {
  if (!previous) return null;
  const seconds = (now.at - previous.at) / 1000;
  if (seconds <= 0) return null;
  const delta = (now.counters.get(key) || 0) - (previous.counters.get(key) || 0);
  return Math.max(0, delta) / seconds;
}

function fmtRate(value) {
  if (value === null) return "–";
  return value >= 100 ? value.toFixed(0) : value.toFixed(1);
}

function fmtMs(value) {
  return value === null || value === undefined ? "–" : value.toFixed(1) + " ms";
}

function badge(state) {
  return el("span", { class: "badge " + state }, state);
}

function renderHeader(status) {
  const readiness = document.getElementById("readiness");
  const state = status.draining ? "draining" : status.ready ? "ready" : "starting";
  readiness.className = "badge " + state;
  readiness.textContent = state;
  const config = document.getElementById("config");
  if (status.config) {
    const c = status.config;
    let text = `${c.source} · version ${c.version} · reloads ${c.reloads.applied} applied, ${c.reloads.refused} refused`;
    if (c.last_applied) text += ` · applied ${new Date(c.last_applied * 1000).toLocaleTimeString()}`;
    config.textContent = text;
  } else {
    config.textContent = "configured in code";
  }
  const problem = document.getElementById("problem");
  if (status.config && status.config.last_error) {
    problem.hidden = false;
    problem.textContent = "Last reload refused: " + status.config.last_error;
  } else {
    problem.hidden = true;
  }
}

function renderTiles(now, samples) {
  document.getElementById("total-rate").textContent = fmtRate(rate(now, "all"));
  document.getElementById("error-rate").textContent = fmtRate(rate(now, "5xx"));
  const inFlight = gauge(samples, "gateway_http_requests_in_flight");
  document.getElementById("in-flight").textContent = inFlight === null ? "–" : inFlight;
  const open = gauge(samples, "gateway_connections_open");
  document.getElementById("connections").textContent = open === null ? "–" : open;
}

function renderRoutes(now, routes) {
  const body = document.querySelector("#routes tbody");
  const rows = routes.map((r) => {
    const match = [r.host, r.path, r.methods && r.methods.length ? r.methods.join(" ") : null]
      .filter(Boolean)
      .join(" ");
    const to = r.upstream ? el("span", {}, "→ ", el("code", {}, r.upstream)) : r.action;
    const plugins = el("td", {}, ...(r.plugins || []).map((p) => el("span", { class: "chip" }, p)));
    return el(
      "tr",
      { "data-route": r.id },
      el("td", {}, el("strong", {}, r.id)),
      el("td", {}, el("code", {}, match || "*")),
      el("td", {}, to),
      el("td", { class: "num" }, fmtRate(rate(now, "route:" + r.id))),
      el("td", { class: "num" }, fmtRate(rate(now, "route5xx:" + r.id))),
      plugins,
    );
  });
  body.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { class: "empty", colspan: 6 }, "no routes"))]));
}

function renderUpstreams(now, upstreams) {
  const box = document.getElementById("upstreams");
  const cards = upstreams.map((u) => {
    const counts = { healthy: 0, ejected: 0, unhealthy: 0 };
    for (const e of u.endpoints) counts[e.state] = (counts[e.state] || 0) + 1;
    const rows = u.endpoints.map((e) => {
      const r = e.requests;
      return el(
        "tr",
        { "data-endpoint": e.url, "data-state": e.state },
        el("td", {}, el("code", {}, e.url)),
        el("td", {}, badge(e.state)),
        el("td", { class: "num" }, e.weight),
        el("td", { class: "num" }, fmtRate(rate(now, "endpoint:" + u.name + " " + e.url))),
        el("td", { class: "num" }, e.in_flight),
        el("td", { class: "num" }, fmtMs(e.latency_ewma_ms)),
        el("td", { class: "num" }, `${r.success} / ${r.failure + r.retryable}`),
        el("td", { class: "num" }, e.ejections),
      );
    });
    const summary = Object.entries(counts)
      .filter(([, n]) => n > 0)
      .map(([state, n]) => `${n} ${state}`)
      .join(" · ");
    return el(
      "div",
      { class: "upstream", "data-upstream": u.name },
      el("div", { class: "title" }, el("h3", {}, u.name), el("span", { class: "muted" }, summary || "no endpoints")),
      el(
        "table",
        {},
        el(
          "thead",
          {},
          el(
            "tr",
            {},
            el("th", {}, "endpoint"),
            el("th", {}, "state"),
            el("th", { class: "num" }, "weight"),
            el("th", { class: "num" }, "req/s"),
            el("th", { class: "num" }, "in flight"),
            el("th", { class: "num" }, "latency (EWMA)"),
            el("th", { class: "num" }, "ok / failed"),
            el("th", { class: "num" }, "ejections"),
          ),
        ),
        el("tbody", {}, ...rows),
      ),
    );
  });
  box.replaceChildren(...(cards.length ? cards : [el("div", { class: "empty" }, "no upstreams")]));
}

// Circuit breakers, from their metrics: the section shows only when there are some.
function renderBreakers(now, samples) {
  const PHASES = ["closed", "open", "half-open"];
  const openings = new Map();
  for (const s of samples) {
    if (s.name === "gateway_circuit_breaker_transitions_total" && s.labels.to === "open") {
      openings.set(s.labels.breaker, s.value);
    }
  }
  const rows = samples
    .filter((s) => s.name === "gateway_circuit_breaker_state")
    .sort((a, b) => a.labels.breaker.localeCompare(b.labels.breaker))
    .map((s) => {
      const phase = PHASES[s.value] || "closed";
      return el(
        "tr",
        { "data-breaker": s.labels.breaker, "data-state": phase },
        el("td", {}, el("strong", {}, s.labels.breaker)),
        el("td", {}, badge(phase)),
        el("td", { class: "num" }, fmtRate(rate(now, "refused:" + s.labels.breaker))),
        el("td", { class: "num" }, openings.get(s.labels.breaker) || 0),
      );
    });
  document.getElementById("breakers-section").hidden = rows.length === 0;
  document.querySelector("#breakers tbody").replaceChildren(...rows);
}

async function fetchText(path) {
  const res = await fetch(path, { cache: "no-store", credentials: "same-origin" });
  if (!res.ok) throw new Error(`${path}: ${res.status}`);
  return res.text();
}

async function refresh() {
  const problem = document.getElementById("problem");
  try {
    const [statusText, metricsText] = await Promise.all([fetchText("/status"), fetchText("/metrics")]);
    const status = JSON.parse(statusText);
    const samples = parseMetrics(metricsText);
    const now = { at: Date.now(), counters: counters(samples) };
    renderHeader(status);
    renderTiles(now, samples);
    renderRoutes(now, status.routes);
    renderBreakers(now, samples);
    renderUpstreams(now, status.upstreams);
    previous = now;
    document.getElementById("updated").textContent = "updated " + new Date(now.at).toLocaleTimeString();
    document.body.dataset.loaded = "true";
  } catch (err) {
    const readiness = document.getElementById("readiness");
    readiness.className = "badge down";
    readiness.textContent = "unreachable";
    problem.hidden = false;
    problem.textContent = "Cannot read the gateway's status: " + err.message;
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
