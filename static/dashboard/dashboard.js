// The dashboard's page is a shell: this script asks each JSON endpoint for its series and
// draws them (Chart.js), fills the table beside each chart from the same numbers, and
// refreshes everything without reloading the page. No inline script: it runs under a
// Content-Security-Policy of script-src 'self'.
"use strict";

(function () {
  const root = document.getElementById("dashboard");
  if (!root) return;

  // Okabe & Ito's palette, safe for the common colour-vision deficiencies; every series
  // also has its own dash pattern or point style, so colour is never the only cue.
  const OKABE_ITO = {
    black: "#000000", orange: "#E69F00", sky: "#56B4E9", green: "#009E73",
    yellow: "#F0E442", blue: "#0072B2", vermillion: "#D55E00", purple: "#CC79A7", grey: "#8C8C8C",
  };
  const STYLE = {
    accepted: { color: OKABE_ITO.blue, dash: [6, 3], point: "rect" },
    success: { color: OKABE_ITO.green, dash: [], point: "circle" },
    retry: { color: OKABE_ITO.orange, dash: [2, 2], point: "triangle" },
    failed: { color: OKABE_ITO.vermillion, dash: [8, 3, 2, 3], point: "crossRot" },
    deferred: { color: OKABE_ITO.purple, dash: [1, 3], point: "star" },
    attempts: { color: OKABE_ITO.green, dash: [], point: "circle" },
    postbacks: { color: OKABE_ITO.blue, dash: [6, 3], point: "rect" },
    p50: { color: OKABE_ITO.sky, dash: [], point: "circle" },
    p95: { color: OKABE_ITO.orange, dash: [6, 3], point: "triangle" },
    p99: { color: OKABE_ITO.vermillion, dash: [2, 2], point: "crossRot" },
    "2xx": { color: OKABE_ITO.green }, "3xx": { color: OKABE_ITO.sky }, "4xx": { color: OKABE_ITO.orange },
    "5xx": { color: OKABE_ITO.vermillion }, none: { color: OKABE_ITO.grey },
  };
  const CHARTS = {
    volume: { type: "line", unit: "" },
    success: { type: "line", unit: "%", max: 100, fromZero: false },
    latency: { type: "line", unit: " ms", min: 0 },
    codes: { type: "bar", unit: "", stacked: true },
  };
  const REFRESH_MS = 30000;
  const LIVE_MS = 5000;
  const charts = {};
  const number = new Intl.NumberFormat();
  // Times in the server's TIME_ZONE, written as every page writes them (the server's format
  // module, postbackproject/formats): 14:30:05 and 2026-12-04 14:30:05, whatever the
  // browser's language. The chart labels come from the server, written the same way.
  const zone = root.dataset.timeZone || "UTC";
  const clockParts = new Intl.DateTimeFormat("en-US", {
    timeZone: zone, numberingSystem: "latn", hourCycle: "h23",
    year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit", second: "2-digit",
  });

  function partsOf(date) {
    const parts = {};
    for (const part of clockParts.formatToParts(date)) parts[part.type] = part.value;
    return parts;
  }

  function formatTime(date) {
    const p = partsOf(date);
    return p.hour + ":" + p.minute + ":" + p.second;
  }

  function formatDateTime(date) {
    const p = partsOf(date);
    return p.year + "-" + p.month + "-" + p.day + " " + formatTime(date);
  }

  // --- state: the range and host, kept in the address so that a view can be shared ------

  function currentQuery() {
    const params = new URLSearchParams(window.location.search);
    const query = new URLSearchParams();
    query.set("range", params.get("range") || "24h");
    if (query.get("range") === "custom") {
      query.set("start", params.get("start") || "");
      query.set("end", params.get("end") || "");
    }
    if (params.get("host")) query.set("host", params.get("host"));
    return query;
  }

  function setQuery(changes) {
    const query = currentQuery();
    for (const [name, value] of Object.entries(changes)) {
      if (value === null || value === "") query.delete(name); else query.set(name, value);
    }
    if (query.get("range") !== "custom") { query.delete("start"); query.delete("end"); }
    window.history.pushState(null, "", "?" + query.toString());
    refreshAll();
  }

  // --- fetching ----------------------------------------------------------------------

  async function getJSON(url) {
    const response = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
    if (response.redirected) {
      window.location.reload(); // the session ended: the login page takes over
      throw new Error("signed out");
    }
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || response.statusText);
    return body;
  }

  function showError(message) {
    const box = document.getElementById("error");
    box.hidden = !message;
    box.textContent = message || "";
  }

  // --- charts and the tables beside them -------------------------------------------------

  function dataset(series, kind) {
    const style = STYLE[series.key] || { color: OKABE_ITO.black };
    return {
      label: series.label,
      data: series.data,
      borderColor: style.color,
      backgroundColor: style.color,
      borderDash: style.dash || [],
      pointStyle: style.point || "circle",
      pointRadius: kind.type === "line" ? 2 : 0,
      borderWidth: 2,
      spanGaps: false,
    };
  }

  function drawChart(key, body) {
    const kind = CHARTS[key];
    const data = { labels: body.labels, datasets: body.series.map((s) => dataset(s, kind)) };
    if (charts[key]) {
      charts[key].data = data;
      charts[key].update("none");
      return;
    }
    charts[key] = new window.Chart(document.getElementById("chart-" + key), {
      type: kind.type,
      data: data,
      options: {
        animation: false,
        maintainAspectRatio: false,
        interaction: { mode: "index", intersect: false },
        plugins: { legend: { labels: { usePointStyle: true } } },
        scales: {
          x: { stacked: !!kind.stacked, ticks: { maxRotation: 0, autoSkip: true, maxTicksLimit: 8 } },
          y: { stacked: !!kind.stacked, min: kind.min, max: kind.max, beginAtZero: kind.fromZero !== false },
        },
      },
    });
  }

  function cell(tag, text, className) {
    const element = document.createElement(tag);
    element.textContent = text;
    if (className) element.className = className;
    return element;
  }

  function timeElement(date) {
    const element = cell("time", formatDateTime(date));
    element.dateTime = date.toISOString();
    return element;
  }

  function formatValue(value, unit) {
    if (value === null || value === undefined) return "–";
    return number.format(value) + unit;
  }

  function fillTable(key, body) {
    const unit = CHARTS[key].unit;
    const table = document.getElementById("table-" + key);
    const head = document.createElement("tr");
    head.append(cell("th", "From"));
    body.series.forEach((s) => head.append(cell("th", s.label)));
    table.tHead.replaceChildren(head);
    const rows = body.labels.map((label, index) => {
      const row = document.createElement("tr");
      const start = cell("th", label);
      start.scope = "row";
      start.title = body.starts[index];
      row.append(start);
      body.series.forEach((s) => row.append(cell("td", formatValue(s.data[index], unit))));
      return row;
    });
    table.tBodies[0].replaceChildren(...rows.reverse()); // newest first
    const foot = document.createElement("tr");
    foot.append(cell("th", "Whole range"));
    body.series.forEach((s) => foot.append(cell("td", formatValue(body.totals[s.key], unit))));
    table.tFoot.replaceChildren(foot);
  }

  async function loadChart(key, query) {
    const panel = document.getElementById("panel-" + key);
    const body = await getJSON(root.dataset[key] + "?" + query);
    drawChart(key, body);
    fillTable(key, body);
    panel.dataset.loaded = String(Number(panel.dataset.loaded || 0) + 1);
    return body;
  }

  // --- hosts and failures -----------------------------------------------------------------

  function hostLink(host) {
    const link = cell("a", host);
    const query = currentQuery();
    query.set("host", host);
    link.href = "?" + query.toString();
    link.addEventListener("click", (event) => { event.preventDefault(); setQuery({ host: host }); });
    return link;
  }

  function circuitText(circuit) {
    if (circuit.state === "closed") return "closed";
    const until = formatTime(new Date(circuit.until));
    const failures = " (" + circuit.failures + " failures in a row)";
    // Its open time has passed: the host's next postback goes out as the probe.
    if (circuit.state === "probe_due") return "probe due since " + until + failures;
    return "open until " + until + failures;
  }

  function destinationState(d) {
    const states = [];
    if (d.paused) states.push("paused");
    if (d.throttled) states.push("throttled");
    return states.join(", ");
  }

  // A destination's name, linked to its admin page, and its state (paused, throttled).
  function destinationLink(d) {
    const link = cell("a", d.name + (d.url_prefix ? " " + d.url_prefix : ""));
    link.href = d.admin_url;
    link.title = d.rules.join("; ") || "the global delivery settings";
    return link;
  }

  function destinationsCell(destinations) {
    const td = cell("td", "", "text");
    destinations.forEach((d, index) => {
      if (index) td.append(document.createTextNode(", "));
      td.append(destinationLink(d));
      const state = destinationState(d);
      if (state) td.append(cell("span", " (" + state + ")", "destination-state"));
    });
    if (!destinations.length) td.textContent = "–";
    return td;
  }

  function showHostView(view) {
    const panel = document.getElementById("panel-destination");
    panel.hidden = !view;
    if (!view) return;
    document.getElementById("destination-circuit").textContent = circuitText(view.circuit);
    const rows = view.destinations.map((d) => {
      const row = document.createElement("tr");
      const name = document.createElement("th");
      name.scope = "row";
      name.className = "text";
      name.append(destinationLink(d));
      row.append(name, cell("td", d.url_prefix || "(any)", "text"));
      row.append(cell("td", destinationState(d) || "sending", "text destination-state"));
      row.append(cell("td", d.rules.join("; ") || "the global delivery settings", "text rules"));
      return row;
    });
    document.querySelector("#table-destination tbody").replaceChildren(...rows);
    document.getElementById("destination-none").hidden = rows.length > 0;
  }

  async function loadHosts(query) {
    const body = await getJSON(root.dataset.hosts + "?" + query);
    showHostView(body.host_view);
    const rows = body.hosts.map((h) => {
      const row = document.createElement("tr");
      const name = document.createElement("th");
      name.scope = "row";
      name.append(hostLink(h.host));
      row.append(name);
      for (const field of ["attempts", "delivered", "retried", "failed", "deferred"]) {
        row.append(cell("td", number.format(h[field])));
      }
      row.append(cell("td", formatValue(h.success_rate, "%")));
      row.append(cell("td", formatValue(h.mean_ms, " ms")));
      row.append(cell("td", formatValue(h.p95_ms, " ms")));
      row.append(cell("td", circuitText(h.circuit), "circuit-" + h.circuit.state));
      row.append(destinationsCell(h.destinations));
      return row;
    });
    document.querySelector("#table-hosts tbody").replaceChildren(...rows);
    const more = body.total_hosts - body.hosts.length;
    document.getElementById("hosts-more").textContent = more > 0 ? more + " quieter hosts not shown." : "";
    document.getElementById("panel-hosts").dataset.loaded = "1";
  }

  function postbackLink(id) {
    const link = cell("a", id);
    link.href = root.dataset.postback.replace("POSTBACK_ID", encodeURIComponent(id));
    return link;
  }

  async function loadFailures(query) {
    const body = await getJSON(root.dataset.failures + "?" + query);
    document.getElementById("failures-note").textContent = body.reasons_from
      ? "Reasons among the newest " + number.format(body.reasons_from) + " failing attempts" +
        (body.host ? " to " + body.host : "") + " in the range; exact counts per status class are in the charts."
      : "No attempt failed in this range" + (body.host ? " to " + body.host : "") + ".";
    document.getElementById("replay-link").href = body.replay_url;
    const reasons = body.reasons.map((r) => {
      const row = document.createElement("tr");
      row.append(cell("td", r.host), cell("td", r.reason, "text"), cell("td", number.format(r.attempts)));
      return row;
    });
    document.querySelector("#table-reasons tbody").replaceChildren(...reasons);
    const latest = body.latest.map((a) => {
      const row = document.createElement("tr");
      const when = document.createElement("td");
      when.append(timeElement(new Date(a.delivered_at)));
      const id = document.createElement("td");
      id.append(postbackLink(a.postback_id));
      row.append(when, id, cell("td", String(a.attempt)), cell("td", a.outcome), cell("td", a.reason, "text"));
      return row;
    });
    document.querySelector("#table-latest tbody").replaceChildren(...latest);
    document.getElementById("panel-failures").dataset.loaded = "1";
  }

  // --- live figures -----------------------------------------------------------------------

  async function loadLive() {
    const box = document.getElementById("live");
    try {
      const body = await getJSON(root.dataset.live);
      for (const element of box.querySelectorAll("[data-live]")) {
        element.textContent = number.format(body[element.dataset.live]);
      }
      box.classList.remove("stale");
    } catch (error) {
      box.classList.add("stale");
      showError(error.message);
    }
  }

  // --- the whole page -----------------------------------------------------------------------

  function describeRange(range) {
    const start = new Date(range.start);
    const end = new Date(range.end);
    return formatDateTime(start) + " – " + formatDateTime(end);
  }

  function markRange(query) {
    for (const button of root.querySelectorAll("[data-range]")) {
      button.setAttribute("aria-pressed", String(button.dataset.range === query.get("range")));
    }
    const form = document.getElementById("custom-range");
    if (query.get("range") === "custom") {
      form.hidden = false;
      form.elements.start.value = (query.get("start") || "").slice(0, 16);
      form.elements.end.value = (query.get("end") || "").slice(0, 16);
    }
    const host = query.get("host");
    document.getElementById("host-filter").hidden = !host;
    document.getElementById("host-name").textContent = host || "";
  }

  async function refreshAll() {
    const query = currentQuery();
    markRange(query);
    if (query.get("range") === "custom" && !(query.get("start") && query.get("end"))) return;
    const jobs = Object.keys(CHARTS).map((key) => loadChart(key, query));
    jobs.push(loadHosts(query), loadFailures(query));
    const results = await Promise.allSettled(jobs);
    const failed = results.find((r) => r.status === "rejected");
    showError(failed ? failed.reason.message : "");
    const first = results[0];
    if (first.status === "fulfilled") {
      document.getElementById("range-text").textContent = describeRange(first.value.window);
    }
    document.getElementById("updated").textContent = "updated " + formatTime(new Date());
    root.dataset.refreshes = String(Number(root.dataset.refreshes || 0) + 1);
  }

  function wireControls() {
    for (const button of root.querySelectorAll("[data-range]")) {
      button.addEventListener("click", () => {
        if (button.dataset.range === "custom") {
          document.getElementById("custom-range").hidden = false;
          return;
        }
        setQuery({ range: button.dataset.range });
      });
    }
    document.getElementById("custom-range").addEventListener("submit", (event) => {
      event.preventDefault();
      const form = event.target;
      setQuery({ range: "custom", start: form.elements.start.value, end: form.elements.end.value });
    });
    document.getElementById("host-clear").addEventListener("click", () => setQuery({ host: null }));
    window.addEventListener("popstate", refreshAll);
  }

  function startTimers() {
    const refresh = document.getElementById("auto-refresh");
    window.setInterval(() => {
      if (refresh.checked && !document.hidden) refreshAll();
    }, REFRESH_MS);
    window.setInterval(() => {
      if (refresh.checked && !document.hidden) loadLive();
    }, LIVE_MS);
  }

  wireControls();
  refreshAll();
  loadLive();
  startTimers();
})();
