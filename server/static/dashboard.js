/* The fleet dashboard: fetches the stats document (GET v1/stats) with the admin token, if
 * any, and draws it. The page holds no data of its own; the token lives in sessionStorage
 * for this tab and travels only in the Authorization header of this script's own requests.
 */
(function () {
  "use strict";

  const TOKEN_KEY = "opa-telemetry-admin-token";
  const WINDOWS = [7, 30, 90, 180, 365];
  const DEFAULT_DAYS = 30;
  const PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
    "#e377c2", "#17becf", "#bcbd22", "#393b79", "#ad494a", "#637939",
  ];
  const OTHER_COLOR = "#9aa5b1";
  const ADVISORY_ROWS = 6;  // advisories listed above the charts (all of them are in the table)
  const HEAP_BARS = 8;  // versions drawn in the heap chart (all of them are in the table)

  const access = metaContent("opa-telemetry-access") || "token";
  const count = new Intl.NumberFormat("en-US", { maximumFractionDigits: 1 });
  const percent = new Intl.NumberFormat("en-US", { style: "percent", maximumFractionDigits: 1 });
  const state = { product: "", days: DEFAULT_DAYS, view: "charts", doc: null, plots: [] };

  const el = (id) => document.getElementById(id);

  class AccessError extends Error {
    constructor(status, message, details) {
      super(message);
      this.status = status;
      this.details = details;
    }
  }

  class ApiError extends Error {
    constructor(status, message, details) {
      super(message);
      this.status = status;
      this.details = details;
    }
  }

  function metaContent(name) {
    const meta = document.querySelector('meta[name="' + name + '"]');
    return meta ? meta.getAttribute("content") : "";
  }

  // -- the token ---------------------------------------------------------------------------

  function storedToken() {
    try {
      return sessionStorage.getItem(TOKEN_KEY) || "";
    } catch (e) {
      return "";
    }
  }

  function storeToken(token) {
    try {
      if (token) sessionStorage.setItem(TOKEN_KEY, token);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch (e) {
      /* storage disabled: the token lasts until the page is reloaded */
    }
    memoryToken = token;
  }

  let memoryToken = storedToken();

  // -- the API -----------------------------------------------------------------------------

  async function api(path, params) {
    const query = new URLSearchParams(params || {}).toString();
    const headers = { Accept: "application/json" };
    if (memoryToken) headers.Authorization = "Bearer " + memoryToken;
    let response;
    try {
      response = await fetch(path + (query ? "?" + query : ""), {
        headers: headers,
        cache: "no-store",
        credentials: "omit",
        referrerPolicy: "no-referrer",
      });
    } catch (e) {
      throw new ApiError(0, "The server could not be reached.", [String(e.message || e)]);
    }
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null;
    }
    const message = (body && body.error) || response.statusText || "HTTP " + response.status;
    const details = (body && Array.isArray(body.details)) ? body.details : [];
    if (response.status === 401 || response.status === 403) {
      throw new AccessError(response.status, message, details);
    }
    if (!response.ok || body === null) throw new ApiError(response.status, message, details);
    return body;
  }

  // -- the page's states -------------------------------------------------------------------

  function show(section) {
    for (const id of ["status", "auth", "empty", "content"]) el(id).hidden = id !== section;
  }

  function showStatus(text, isError, details) {
    const status = el("status");
    status.textContent = text;
    status.classList.toggle("error", Boolean(isError));
    if (details && details.length) {
      const list = document.createElement("ul");
      for (const d of details) list.appendChild(textElement("li", d));
      status.appendChild(list);
    }
    show("status");
  }

  function showAuth(error) {
    const closed = access === "closed";
    el("auth-title").textContent = closed
      ? "The fleet statistics are not open on this server"
      : "This dashboard needs the admin token";
    el("auth-message").textContent = error ? error.message : "";
    el("auth-message").hidden = !error;
    const details = el("auth-details");
    details.replaceChildren(...(error ? error.details : []).map((d) => textElement("li", d)));
    el("token-form").hidden = closed;
    el("forget-token").hidden = true;
    el("controls").hidden = true;
    show("auth");
    if (!closed) el("token").focus();
  }

  function showEmpty(doc) {
    const base = location.href.replace(/\/dashboard(?:[?#].*)?$/, "");
    el("empty-message").textContent =
      "No instance of " + doc.product + " has reported to this server in the last " +
      doc.days + " day" + (doc.days === 1 ? "" : "s") + ". Reports appear here as they arrive.";
    el("empty-howto").textContent =
      "# point an OPA at this server (OPA up to v1.12):\n" +
      "OPA_TELEMETRY_SERVICE_URL=" + base + " opa run --server\n" +
      "# OPA v1.13 and later:\n" +
      "OPA_VERSION_CHECK_SERVICE_URL=" + base + " opa run --server";
    show("empty");
  }

  // -- loading -----------------------------------------------------------------------------

  async function start() {
    readLocation();
    wireControls();
    if (access === "token" && !memoryToken) {
      showAuth(null);
      return;
    }
    await load();
  }

  let loads = 0;

  async function load() {
    const ticket = ++loads;  // a newer selection wins over a slower, older answer
    if (el("content").hidden) showStatus("Loading…", false);
    document.body.classList.add("loading");
    el("forget-token").hidden = !memoryToken;
    try {
      const products = await api("v1/products");
      if (ticket !== loads) return;
      fillProducts(products.products || []);
      const doc = await api("v1/stats", { product: state.product, days: String(state.days) });
      if (ticket !== loads) return;
      el("controls").hidden = false;
      el("forget-token").hidden = !memoryToken;
      render(doc);
    } catch (error) {
      if (ticket !== loads) return;
      if (error instanceof AccessError) {
        storeToken("");  // refused: ask again rather than resend it
        showAuth(error);
      } else {
        showStatus("Could not load the statistics: " + error.message, true, error.details);
        el("controls").hidden = false;
      }
    } finally {
      if (ticket === loads) document.body.classList.remove("loading");
    }
  }

  function readLocation() {
    const params = new URLSearchParams(location.search);
    state.product = params.get("product") || "";
    const days = parseInt(params.get("days") || "", 10);
    state.days = WINDOWS.includes(days) ? days : DEFAULT_DAYS;
    state.view = params.get("view") === "table" ? "table" : "charts";
  }

  function writeLocation() {
    const params = new URLSearchParams();
    if (state.product) params.set("product", state.product);
    params.set("days", String(state.days));
    if (state.view === "table") params.set("view", "table");
    history.replaceState(null, "", location.pathname + "?" + params.toString());
  }

  function fillProducts(products) {
    const names = products.map((p) => p.product);
    if (!state.product) {
      const busiest = products.slice().sort((a, b) => (b.reports || 0) - (a.reports || 0))[0];
      state.product = names.includes("opa") ? "opa" : (busiest ? busiest.product : "opa");
    }
    if (!names.includes(state.product)) names.push(state.product);
    const select = el("product");
    select.replaceChildren(...names.map((name) => {
      const option = textElement("option", name);
      option.value = name;
      return option;
    }));
    select.value = state.product;
    el("days").value = String(state.days);
  }

  function wireControls() {
    el("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = el("token").value.trim();
      el("token").value = "";
      if (!token) return;
      storeToken(token);
      load();
    });
    el("forget-token").addEventListener("click", () => {
      storeToken("");
      destroyPlots();
      el("controls").hidden = true;
      showAuth(null);
    });
    el("controls").addEventListener("submit", (event) => event.preventDefault());
    el("product").addEventListener("change", () => {
      state.product = el("product").value;
      writeLocation();
      load();
    });
    el("days").addEventListener("change", () => {
      state.days = parseInt(el("days").value, 10);
      writeLocation();
      load();
    });
    el("view-charts").addEventListener("click", () => setView("charts"));
    el("view-table").addEventListener("click", () => setView("table"));
    window.addEventListener("resize", resizePlots);
    wireTooltip();
  }

  function setView(view) {
    state.view = view;
    writeLocation();
    applyView();
  }

  function applyView() {
    const table = state.view === "table";
    el("charts").hidden = table;
    el("tables").hidden = !table;
    el("view-charts").setAttribute("aria-pressed", String(!table));
    el("view-table").setAttribute("aria-pressed", String(table));
    if (!table) resizePlots();
  }

  // -- rendering ---------------------------------------------------------------------------

  function isEmpty(doc) {
    const daily = doc.daily || [];
    return !doc.reports && !doc.version_checks && daily.every((d) => !d.instances && !d.version_checks);
  }

  function render(doc) {
    state.doc = doc;
    destroyPlots();
    document.body.dataset.product = doc.product;
    document.body.dataset.days = String(doc.days);
    const parts = [doc.product, doc.since + " – " + doc.until + " UTC"];
    if (doc.aggregated_at) parts.push("updated " + doc.aggregated_at.slice(11, 16) + " UTC");
    if (doc.public) parts.push("public view");
    el("subtitle").textContent = parts.join(" · ");
    if (isEmpty(doc)) {
      document.body.dataset.state = "empty";
      showEmpty(doc);
      return;
    }
    document.body.dataset.state = "ready";
    show("content");
    renderTiles(doc);
    renderTables(doc);
    applyView();
    const model = adoptionModel(doc);
    renderAdoption(doc, model);
    renderOutdated(doc);
    renderChecks(doc);
    renderPlatforms(doc);
    renderHeap(doc);
    renderAdvisories(doc);
  }

  function renderTiles(doc) {
    const daily = doc.daily || [];
    const last = lastDayWithData(daily);
    const share = last ? shareOf(last) : null;
    const instances = doc.instances || {};
    const tiles = [
      ["Latest release", doc.latest_release || "unknown", "in the release catalog", ""],
      ["Instances, latest day", fmt(instances.latest_day), doc.until, ""],
      ["Average per day", fmt(instances.average_daily), "peak " + fmt(instances.peak_daily), ""],
      ["Out of date", share === null ? "–" : percent.format(share),
        last ? fmt(last.out_of_date) + " of " + fmt(last.instances) + " instances" : "no data",
        share !== null && share > 0.5 ? "warn" : ""],
      ["Reports", fmt(doc.reports), "in " + doc.days + " days", ""],
      ["Release checks", fmt(doc.version_checks), "in " + doc.days + " days", ""],
    ];
    el("tiles").replaceChildren(...tiles.map(([label, value, note, tone]) => {
      const tile = document.createElement("div");
      tile.className = "tile" + (tone ? " " + tone : "");
      tile.dataset.tile = label;
      tile.append(textElement("div", label, "label"), textElement("div", value, "value"),
        textElement("div", note, "note"));
      return tile;
    }));
  }

  /** Versions (series) of the stacked chart, newest first and "other" last: the document's
   * ``daily_versions`` (or, from an older server, its ``by_version`` order), keeping only the
   * versions with instances in the window. */
  function adoptionModel(doc) {
    const daily = doc.daily || [];
    const seen = new Set();
    for (const day of daily) {
      for (const [v, n] of Object.entries(day.by_version || {})) if (n) seen.add(v);
    }
    const named = Array.isArray(doc.daily_versions)
      ? doc.daily_versions
      : (doc.by_version || []).map((row) => row.version);
    const ordered = named.filter((v) => v !== "other" && seen.has(v));
    const rest = [...seen].filter((v) => v !== "other" && !ordered.includes(v));
    ordered.push(...rest.sort(compareVersions).reverse());
    if (seen.has("other")) ordered.push("other");
    const values = ordered.map((v) => daily.map((d) => (d.by_version || {})[v] || 0));
    return { versions: ordered, values: values };
  }

  function renderAdoption(doc, model) {
    const figure = el("chart-adoption");
    const daily = doc.daily || [];
    const total = daily.reduce((sum, d) => sum + (d.instances || 0), 0);
    figure.dataset.series = JSON.stringify(model.versions);
    figure.dataset.total = String(total);
    if (!model.versions.length) return noData(figure, "No versions reported in this window.");
    // Stack: series i is drawn at the sum of itself and every series below it (later in the
    // list). Drawn top first, each fill covers the ones above it below its own line.
    const n = model.versions.length;
    const stacked = model.values.map((_, i) => daily.map((__, d) => {
      let sum = 0;
      for (let j = i; j < n; j++) sum += model.values[j][d];
      return sum;
    }));
    const series = [{ label: "Day", value: dayLabel }];
    model.versions.forEach((version, i) => {
      const color = colorFor(version, i);
      series.push({
        label: versionLabel(version),
        stroke: color,
        fill: color,
        width: 1,
        points: { show: false },
        value: (u, v, si, idx) => (idx === null || idx === undefined ? "–" : fmt(model.values[i][idx])),
      });
    });
    makePlot(figure, {
      series: series,
      axes: [timeAxis(), countAxis({ values: (u, ticks) => ticks.map(fmtAxis), size: 56 })],
      scales: { y: { range: (u, min, max) => [0, niceMax(max)] } },
    }, [xs(daily), ...stacked]);
  }

  function renderOutdated(doc) {
    const figure = el("chart-outdated");
    const daily = doc.daily || [];
    const shares = daily.map((d) => shareOf(d));
    const known = shares.filter((s) => s !== null);
    figure.dataset.series = JSON.stringify(["out of date"]);
    figure.dataset.total = String(daily.reduce((sum, d) => sum + (d.out_of_date || 0), 0));
    if (!known.length) return noData(figure, "No instances in this window.");
    makePlot(figure, {
      series: [
        { label: "Day", value: dayLabel },
        {
          label: "out of date",
          stroke: "#b4441c",
          fill: "rgba(180, 68, 28, 0.12)",
          width: 2,
          spanGaps: false,
          points: { show: daily.length <= 31, size: 5 },
          value: (u, v, si, idx) => {
            if (idx === null || idx === undefined || v === null) return "–";
            const d = daily[idx];
            const behind = d.latest_release ? ", latest " + d.latest_release : "";
            return percent.format(v / 100) + " (" + fmt(d.out_of_date) + " of " +
              fmt(d.instances) + behind + ")";
          },
        },
      ],
      axes: [timeAxis(), valueAxis({ values: (u, ticks) => ticks.map((t) => t + "%"), size: 48 })],
      scales: { y: { range: [0, 100] } },
    }, [xs(daily), shares.map((s) => (s === null ? null : s * 100))]);
  }

  function renderChecks(doc) {
    const figure = el("chart-checks");
    const daily = doc.daily || [];
    const checks = daily.map((d) => d.version_checks || 0);
    const total = checks.reduce((a, b) => a + b, 0);
    figure.dataset.series = JSON.stringify(["release checks"]);
    figure.dataset.total = String(total);
    if (!total) return noData(figure, "No release checks in this window.");
    const bars = uPlot.paths.bars({ size: [0.7, 40], align: 0 });
    const halfDay = 43200;
    makePlot(figure, {
      series: [
        { label: "Day", value: dayLabel },
        {
          label: "release checks",
          stroke: "#2e7d4f",
          fill: "rgba(46, 125, 79, 0.7)",
          width: daily.length > 60 ? 0 : 1,  // outlines would merge narrow bars into a block
          paths: bars,
          points: { show: false },
          value: (u, v) => (v === null || v === undefined ? "–" : fmt(v)),
        },
      ],
      axes: [timeAxis(), countAxis({ values: (u, ticks) => ticks.map(fmtAxis), size: 48 })],
      scales: {
        x: { time: true, range: (u, min, max) => [min - halfDay, max + halfDay] },
        y: { range: (u, min, max) => [0, niceMax(max)] },
      },
    }, [xs(daily), checks]);
  }

  function renderPlatforms(doc) {
    const figure = el("chart-platforms");
    const rows = (doc.by_platform || []).slice().sort((a, b) => b.instances - a.instances);
    const total = rows.reduce((sum, r) => sum + (r.instances || 0), 0);
    figure.dataset.series = JSON.stringify(rows.map(platformName));
    figure.dataset.total = String(total);
    const box = figure.querySelector(".bars");
    if (!total) return noData(figure, "No platforms reported in this window.");
    const grid = document.createElement("div");
    grid.className = "hbars";
    for (const row of rows) {
      const share = row.instances / total;
      const tip = platformName(row) + "\n" + fmt(row.instances) + " instances/day (" +
        percent.format(share) + ")";
      const name = textElement("span", platformName(row), "name");
      const track = document.createElement("span");
      track.className = "track";
      const fill = document.createElement("span");
      fill.className = "fill";
      fill.style.width = (share * 100).toFixed(2) + "%";
      track.appendChild(fill);
      const num = textElement("span", percent.format(share), "num");
      for (const cell of [name, track, num]) cell.dataset.tip = tip;
      track.dataset.platform = platformName(row);
      track.dataset.instances = String(row.instances);
      grid.append(name, track, num);
    }
    box.replaceChildren(grid);
  }

  function renderHeap(doc) {
    const figure = el("chart-heap");
    const all = (doc.heap_by_version || []).filter((r) => r.p50 !== null && r.p50 !== undefined);
    // The most-run versions, newest first as the document lists them; the rest in the table.
    const busiest = all.slice().sort((a, b) => b.instances - a.instances).slice(0, HEAP_BARS);
    const rows = all.filter((r) => busiest.includes(r));
    figure.dataset.series = JSON.stringify(rows.map((r) => r.version));
    figure.dataset.total = String(rows.reduce((sum, r) => sum + (r.instances || 0), 0));
    const box = figure.querySelector(".bars");
    if (!rows.length) return noData(figure, "No heap usage reported in this window.");
    const top = Math.max(1, ...rows.map((r) => r.p99 || r.p90 || r.p50));
    const grid = document.createElement("div");
    grid.className = "hbars";
    for (const row of rows) {
      const tip = versionLabel(row.version) + " (" + fmt(row.instances) + " instances/day)\n" +
        "p50 " + bytes(row.p50) + "\np90 " + bytes(row.p90) + "\np99 " + bytes(row.p99);
      const name = textElement("span", versionLabel(row.version), "name");
      const track = document.createElement("span");
      track.className = "track";
      for (const key of ["p99", "p90", "p50"]) {
        if (row[key] === null || row[key] === undefined) continue;
        const fill = document.createElement("span");
        fill.className = "fill " + key;
        fill.style.width = ((row[key] / top) * 100).toFixed(2) + "%";
        track.appendChild(fill);
      }
      const num = textElement("span", "p50 " + bytes(row.p50), "num");
      for (const cell of [name, track, num]) cell.dataset.tip = tip;
      track.dataset.version = row.version;
      grid.append(name, track, num);
    }
    const keys = document.createElement("div");
    keys.className = "legend-keys";
    keys.append(textElement("span", "p50", "k50"), textElement("span", "p90", "k90"),
      textElement("span", "p99", "k99"));
    const hidden = all.length - rows.length;
    if (hidden) keys.append(textElement("em", hidden + " more in the table view", "more"));
    box.replaceChildren(grid, keys);
  }

  function renderAdvisories(doc) {
    const figure = el("chart-advisories");
    const all = doc.advisories || [];
    const rows = all.slice(0, ADVISORY_ROWS);
    figure.hidden = !all.length;
    figure.dataset.series = JSON.stringify(rows.map((a) => a.id));
    figure.dataset.total = String(all.length);
    const list = document.createElement("div");
    list.className = "advisories";
    for (const advisory of rows) {
      const severity = advisory.severity || "unrated";
      const badge = textElement("span", severity, "severity " + severityClass(severity));
      const id = textElement("code", advisory.id, "id");
      const summary = textElement("span", advisory.summary || "", "summary");
      const versions = textElement("span", (advisory.versions || []).map(versionLabel).join(", "),
        "versions");
      const num = textElement("span", fmt(advisory.instances) + "/day", "num");
      const tip = advisory.id + " (" + severity + ")\n" + fmt(advisory.instances) +
        " instances/day on " + (advisory.versions || []).map(versionLabel).join(", ");
      for (const cell of [badge, id, summary, versions, num]) cell.dataset.tip = tip;
      list.append(badge, id, summary, versions, num);
    }
    const box = figure.querySelector(".bars");
    box.replaceChildren(list);
    if (all.length > rows.length) {
      box.appendChild(textElement("p", (all.length - rows.length) + " more in the table view",
        "more"));
    }
  }

  function severityClass(severity) {
    const s = String(severity).toUpperCase();
    if (s === "CRITICAL" || s === "HIGH") return "high";
    if (s === "MODERATE" || s === "MEDIUM") return "moderate";
    if (s === "LOW") return "low";
    return "unrated";
  }

  function renderTables(doc) {
    const daily = doc.daily || [];
    const model = adoptionModel(doc);
    const cards = [];
    cards.push(tableCard("table-daily", "Per day", [
      "Day", "Instances", ...model.versions.map(versionLabel),
      "Out of date", "Share out of date", "Reports", "Release checks",
    ], daily.slice().reverse().map((d) => [
      d.day, fmt(d.instances), ...model.versions.map((v) => fmt((d.by_version || {})[v] || 0)),
      fmt(d.out_of_date), shareOf(d) === null ? "–" : percent.format(shareOf(d)),
      fmt(d.reports), fmt(d.version_checks),
    ])));
    cards.push(tableCard("table-versions", "By version", ["Version", "Instances/day", "Reports"],
      (doc.by_version || []).map((r) => [r.version, fmt(r.instances), fmt(r.reports)])));
    cards.push(tableCard("table-platforms", "By platform", ["Platform", "Instances/day"],
      (doc.by_platform || []).map((r) => [platformName(r), fmt(r.instances)])));
    cards.push(tableCard("table-heap", "Heap usage by version",
      ["Version", "Instances", "p50", "p90", "p99"],
      (doc.heap_by_version || []).map((r) => [r.version, fmt(r.instances), bytes(r.p50),
        bytes(r.p90), bytes(r.p99)])));
    cards.push(tableCard("table-min-compatible", "Minimum compatible version (from policies)",
      ["min_compatible_version", "Instances"],
      (doc.min_compatible_versions || []).map((r) => [r.min_compatible_version || "(none sent)",
        fmt(r.instances)])));
    cards.push(tableCard("table-advisories", "Advisories affecting the fleet",
      ["Advisory", "Severity", "Summary", "Versions", "Instances/day"],
      (doc.advisories || []).map((a) => [a.id, a.severity || "unrated", a.summary || "",
        (a.versions || []).map(versionLabel).join(", "), fmt(a.instances)])));
    el("tables").replaceChildren(...cards);
  }

  function tableCard(id, title, headers, rows) {
    const card = document.createElement("section");
    card.className = "card";
    const table = document.createElement("table");
    table.id = id;
    table.appendChild(textElement("caption", title));
    const head = document.createElement("thead");
    const headRow = document.createElement("tr");
    for (const h of headers) {
      const th = textElement("th", h);
      th.scope = "col";
      headRow.appendChild(th);
    }
    head.appendChild(headRow);
    const body = document.createElement("tbody");
    for (const row of rows) {
      const tr = document.createElement("tr");
      row.forEach((cell, i) => tr.appendChild(textElement(i === 0 ? "th" : "td", cell)));
      body.appendChild(tr);
    }
    if (!rows.length) {
      const tr = document.createElement("tr");
      const td = textElement("td", "no data");
      td.colSpan = headers.length;
      tr.appendChild(td);
      body.appendChild(tr);
    }
    table.append(head, body);
    card.appendChild(table);
    return card;
  }

  // -- uPlot helpers -----------------------------------------------------------------------

  function makePlot(figure, options, data) {
    const box = figure.querySelector(".plot");
    box.replaceChildren();
    // With the cursor away, the legend reads out the last day rather than dashes.
    const last = data[0].length - 1;
    const showLast = (u) => {
      if (u.cursor.idx === null || u.cursor.idx === undefined) u.setLegend({ idx: last });
    };
    const plot = new uPlot(Object.assign({
      hooks: { ready: [showLast], setCursor: [showLast] },
      width: plotWidth(box),
      height: figure.classList.contains("wide") ? 320 : 240,
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"),
      cursor: { drag: { x: false, y: false }, points: { size: 6 } },
      legend: { live: true },
    }, options), data, box);
    state.plots.push({ plot: plot, box: box, figure: figure });
  }

  function plotWidth(box) {
    return Math.max(260, Math.floor(box.getBoundingClientRect().width || box.parentElement.clientWidth - 32));
  }

  function resizePlots() {
    for (const p of state.plots) {
      if (p.box.offsetParent === null) continue;
      p.plot.setSize({ width: plotWidth(p.box), height: p.plot.height });
    }
  }

  function destroyPlots() {
    for (const p of state.plots) p.plot.destroy();
    state.plots = [];
  }

  function noData(figure, text) {
    const box = figure.querySelector(".plot, .bars");
    box.replaceChildren(textElement("div", text, "nodata"));
  }

  /** Axis colours from the style sheet, so that the charts follow a dark colour scheme. */
  function axisColors() {
    const style = getComputedStyle(document.documentElement);
    const color = (name, fallback) => style.getPropertyValue(name).trim() || fallback;
    const grid = color("--grid", "#e6eaef");
    return {
      stroke: color("--muted", "#5f6b7a"),
      grid: { stroke: grid, width: 1 },
      ticks: { stroke: grid, width: 1 },
    };
  }

  // Whole numbers of instances or checks: no tick at 2.5 instances.
  const COUNT_INCRS = [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1e3, 2e3, 2.5e3, 5e3, 1e4,
    2e4, 2.5e4, 5e4, 1e5, 2e5, 2.5e5, 5e5, 1e6, 2e6, 2.5e6, 5e6, 1e7];

  function valueAxis(options) {
    return Object.assign(axisColors(), options);
  }

  function countAxis(options) {
    return Object.assign(axisColors(), { incrs: COUNT_INCRS }, options);
  }

  const DAY = 86400;
  const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

  /** The x axis: ticks on whole UTC days (every 1, 2, 7 or 14 days) or, for long windows, on
   * the first of every 1, 2, 3, 6 or 12 months, as many as fit at about 56 px each. */
  function timeAxis() {
    return Object.assign(axisColors(), {
      space: 60,
      splits: (u, axisIdx, min, max) => daySplits(u, min, max),
      values: (u, splits) => splits.map((ts, i) => tickLabel(u, ts, i)),
    });
  }

  function daySplits(u, min, max) {
    const width = u.bbox.width / uPlot.pxRatio || 600;
    const fit = Math.max(2, Math.floor(width / 56));  // "Nov 25" is about 45 px wide
    const first = Math.ceil(min / DAY) * DAY;
    const days = Math.floor((max - first) / DAY) + 1;
    for (const step of [1, 2, 7, 14]) {
      if (days / step <= fit) {
        const splits = [];
        for (let t = first; t <= max; t += step * DAY) splits.push(t);
        u.tickMonths = false;
        return splits;
      }
    }
    const span = days / 30.4;
    const every = [1, 2, 3, 6, 12].find((m) => span / m <= fit) || 12;
    const splits = [];
    const start = new Date(first * 1000);
    let year = start.getUTCFullYear();
    let month = start.getUTCMonth() + (start.getUTCDate() === 1 ? 0 : 1);
    for (;;) {
      year += Math.floor(month / 12);
      month %= 12;
      const t = Date.UTC(year, month, 1) / 1000;
      if (t > max) break;
      if (month % every === 0) splits.push(t);
      month += 1;
    }
    u.tickMonths = true;
    return splits;
  }

  function tickLabel(u, ts, i) {
    const date = new Date(ts * 1000);
    const month = MONTHS[date.getUTCMonth()];
    if (!u.tickMonths) return month + " " + date.getUTCDate();
    return i === 0 || date.getUTCMonth() === 0 ? month + " " + date.getUTCFullYear() : month;
  }

  function xs(daily) {
    return daily.map((d) => Date.parse(d.day + "T00:00:00Z") / 1000);
  }

  function dayLabel(u, ts) {
    return ts === null || ts === undefined ? "–" : new Date(ts * 1000).toISOString().slice(0, 10);
  }

  function niceMax(max) {
    if (!max || max <= 0) return 1;
    const magnitude = Math.pow(10, Math.floor(Math.log10(max)));
    return Math.ceil((max * 1.05) / magnitude) * magnitude;
  }

  // -- hover read-out for the HTML bars ----------------------------------------------------

  function wireTooltip() {
    const tip = el("tooltip");
    document.addEventListener("mousemove", (event) => {
      const target = event.target instanceof Element ? event.target.closest("[data-tip]") : null;
      if (!target) {
        tip.hidden = true;
        return;
      }
      tip.textContent = target.dataset.tip;
      tip.hidden = false;
      const x = Math.min(event.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
      tip.style.left = x + "px";
      tip.style.top = event.clientY + 14 + "px";
    });
  }

  // -- formatting --------------------------------------------------------------------------

  function textElement(tag, text, className) {
    const node = document.createElement(tag);
    node.textContent = text;
    if (className) node.className = className;
    return node;
  }

  function fmt(value) {
    return value === null || value === undefined ? "–" : count.format(value);
  }

  function fmtAxis(value) {
    if (value >= 1e6) return count.format(value / 1e6) + "M";
    if (value >= 1e4) return count.format(value / 1e3) + "k";
    return count.format(value);
  }

  function bytes(value) {
    if (value === null || value === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let v = value;
    let unit = 0;
    while (v >= 1024 && unit < units.length - 1) {
      v /= 1024;
      unit++;
    }
    return (v >= 100 || unit === 0 ? v.toFixed(0) : v.toFixed(1)) + " " + units[unit];
  }

  function shareOf(day) {
    if (!day || !day.instances) return null;
    if (typeof day.out_of_date_share === "number") return day.out_of_date_share;
    return (day.out_of_date || 0) / day.instances;
  }

  function lastDayWithData(daily) {
    for (let i = daily.length - 1; i >= 0; i--) if (daily[i].instances) return daily[i];
    return null;
  }

  function platformName(row) {
    if (row.os === "other") return "other";
    return (row.os || "unknown") + "/" + (row.arch || "unknown");
  }

  function versionLabel(version) {
    return version === "other" ? "other" : "v" + version.replace(/^v/, "");
  }

  function colorFor(version, i) {
    return version === "other" ? OTHER_COLOR : PALETTE[i % PALETTE.length];
  }

  function compareVersions(a, b) {
    const pa = a.replace(/^v/, "").split(/[.-]/);
    const pb = b.replace(/^v/, "").split(/[.-]/);
    for (let i = 0; i < Math.max(pa.length, pb.length); i++) {
      const x = pa[i] === undefined ? "" : pa[i];
      const y = pb[i] === undefined ? "" : pb[i];
      const nx = /^\d+$/.test(x) ? parseInt(x, 10) : NaN;
      const ny = /^\d+$/.test(y) ? parseInt(y, 10) : NaN;
      if (!isNaN(nx) && !isNaN(ny)) {
        if (nx !== ny) return nx - ny;
      } else if (x !== y) {
        return x < y ? -1 : 1;
      }
    }
    return 0;
  }

  start();
})();
