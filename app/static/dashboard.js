// The operator dashboard's live updates: polls snapshot.json and edits the page in place.
// Data only ever reaches the page as textContent or attributes, never as HTML.
"use strict";

(() => {
  const meta = (name) => document.querySelector(`meta[name="${name}"]`).content;
  const PREFIX = meta("dashboard-prefix");
  const CSRF = meta("csrf-token");
  const POLL_MS = Number(meta("poll-ms")) || 1500;
  // Same box and scale as the server's sparkline() in app/dashboard.py.
  const SPARK_WIDTH = 120;
  const SPARK_HEIGHT = 32;
  const RATE_POINTS = 120;

  const formatNumber = (value) => String(Math.round(Number(value) * 10) / 10);

  function formatDuration(seconds) {
    let total = Math.max(0, Math.floor(Number(seconds)));
    const days = Math.floor(total / 86400); total %= 86400;
    const hours = Math.floor(total / 3600); total %= 3600;
    const minutes = Math.floor(total / 60); const secs = total % 60;
    if (days) return `${days}d ${hours}h`;
    if (hours) return `${hours}h ${minutes}m`;
    if (minutes) return `${minutes}m ${secs}s`;
    return `${secs}s`;
  }

  function formatBytes(count) {
    let value = Number(count);
    for (const unit of ["B", "KiB", "MiB"]) {
      if (value < 1024) return `${formatNumber(value)} ${unit}`;
      value /= 1024;
    }
    return `${formatNumber(value)} GiB`;
  }

  // The page's formats, as app.dashboard.show renders them.
  function show(value, format = "text") {
    if (value === null || value === undefined) return "—";
    switch (format) {
      case "number": return formatNumber(value);
      case "duration": return formatDuration(value);
      case "ms": return `${formatNumber(value)} ms`;
      case "bytes": return formatBytes(value);
      case "share": return `${formatNumber(value * 100)}%`;
      case "yesno": return value ? "yes" : "no";
      case "list": return value.length ? value.map(String).join(", ") : "none";
      default: return String(value);
    }
  }

  const lookup = (data, path) =>
    path.split(".").reduce((node, key) => (node === null || node === undefined ? undefined : node[key]), data);

  function element(tag, attributes = {}, text = null) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
    if (text !== null) node.textContent = text;
    return node;
  }

  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  function actionForm(path, label) {
    const form = element("form", { method: "post", action: `${PREFIX}${path}`, class: "inline", "data-action": "" });
    form.append(element("input", { type: "hidden", name: "csrf", value: CSRF }), element("button", { type: "submit" }, label));
    return form;
  }

  function pill(column, state) {
    return element("span", { class: "pill", "data-col": column, "data-state": state }, state);
  }

  // -- sections ----------------------------------------------------------------------------

  function updateFields(data) {
    for (const node of document.querySelectorAll("[data-field]")) {
      const value = lookup(data, node.dataset.field);
      setText(node, show(value, node.dataset.format));
      if (node.hasAttribute("data-pill")) node.dataset.state = value === null || value === undefined ? "none" : String(value);
    }
  }

  function syncRows(body, items, key, attribute, build, update) {
    const rows = [...body.querySelectorAll(`tr[${attribute}]`)];
    const same = rows.length === items.length && rows.every((row, index) => row.getAttribute(attribute) === items[index][key]);
    if (!same) {
      body.replaceChildren(...items.map(build));
    }
    const byKey = new Map([...body.querySelectorAll(`tr[${attribute}]`)].map((row) => [row.getAttribute(attribute), row]));
    for (const item of items) update(byKey.get(item[key]), item);
  }

  function actorRow(actor) {
    const row = element("tr", { "data-actor": actor.name });
    row.append(
      element("th", { scope: "row", "data-col": "name" }, actor.name),
      element("td").appendChild(pill("state", actor.state)).parentNode,
      element("td", { "data-col": "restarts", class: "num" }),
      element("td", { "data-col": "mailbox", class: "num" }),
      element("td", { "data-col": "processed", class: "num" }),
      element("td", { "data-col": "uptime" }),
      element("td", { "data-col": "last_error", class: "text" }),
      element("td").appendChild(actionForm(`/actors/${encodeURIComponent(actor.name)}/restart`, "Restart")).parentNode,
    );
    return row;
  }

  function updateActor(row, actor) {
    const cell = (column) => row.querySelector(`[data-col="${column}"]`);
    setText(cell("state"), actor.state);
    cell("state").dataset.state = actor.state;
    setText(cell("restarts"), String(actor.restarts));
    setText(cell("mailbox"), `${actor.mailbox.depth} / ${actor.mailbox.capacity}`);
    setText(cell("processed"), String(actor.processed));
    setText(cell("uptime"), show(actor.uptime_seconds, "duration"));
    setText(cell("last_error"), show(actor.last_error));
  }

  function feedRow(feed) {
    const row = element("tr", { "data-feed": feed.name });
    const action = element("td");
    if (feed.breaker) action.append(actionForm(`/breakers/${encodeURIComponent(feed.name)}/reset`, "Reset"));
    row.append(
      element("th", { scope: "row", "data-col": "name" }, feed.name),
      element("td").appendChild(pill("breaker", feed.breaker || "none")).parentNode,
      element("td", { "data-col": "cache_age" }),
      element("td", { "data-col": "stale" }),
      element("td", { "data-col": "failures", class: "num" }),
      element("td", { "data-col": "open_remaining" }),
      element("td", { "data-col": "last_success", class: "text" }),
      action,
    );
    return row;
  }

  function updateFeed(row, feed) {
    const cell = (column) => row.querySelector(`[data-col="${column}"]`);
    const breaker = feed.breaker || "none";
    setText(cell("breaker"), breaker);
    cell("breaker").dataset.state = breaker;
    setText(cell("cache_age"), show(feed.cache_age_seconds, "duration"));
    setText(cell("stale"), show(feed.stale, "yesno"));
    setText(cell("failures"), String(feed.consecutive_failures));
    setText(cell("open_remaining"), show(feed.open_remaining_seconds, "duration"));
    setText(cell("last_success"), show(feed.last_success));
  }

  function emptyRow(columns, text) {
    const row = element("tr", { class: "empty" });
    row.append(element("td", { colspan: String(columns) }, text));
    return row;
  }

  function updateTables(data) {
    syncRows(document.getElementById("actors-body"), data.actors, "name", "data-actor", actorRow, updateActor);
    const feeds = document.getElementById("feeds-body");
    if (data.feeds.length) syncRows(feeds, data.feeds, "name", "data-feed", feedRow, updateFeed);
    else if (!feeds.querySelector("tr.empty")) feeds.replaceChildren(emptyRow(8, "No status feeds."));
  }

  function updateAlerts(data) {
    const list = document.getElementById("alerts-list");
    setText(document.getElementById("alert-count"), String(data.alerts.length));
    if (!data.alerts.length) {
      list.replaceChildren(element("li", { class: "empty" }, "No alert is firing."));
      return;
    }
    list.replaceChildren(...data.alerts.map((alert) => {
      const item = element("li");
      item.append(
        element("span", { class: "pill", "data-state": alert.severity }, alert.severity), " ",
        element("strong", {}, alert.name), " ",
        element("span", { class: "text" }, alert.summary), " ",
        element("span", { class: "muted" }, `for ${show(alert.for_seconds, "duration")}`),
      );
      return item;
    }));
  }

  function updateErrors(data) {
    const body = document.getElementById("errors-body");
    const recent = data.errors.recent;
    if (!recent.length) {
      body.replaceChildren(emptyRow(7, "No errors recorded."));
      return;
    }
    body.replaceChildren(...recent.map((error) => {
      const row = element("tr");
      const trace = element("td", { class: "text" });
      trace.append(element("code", {}, show(error.trace_id)));
      row.append(
        element("td", {}, error.at), element("td", {}, error.code),
        element("td", { class: "num" }, String(error.status)),
        element("td", { class: "text" }, `${error.method || error.transport} ${error.endpoint}`),
        element("td", { class: "text" }, error.message), element("td", {}, error.device_type), trace,
      );
      return row;
    }));
  }

  function sparkline(values) {
    if (!values.length) return "";
    const peak = Math.max(Math.max(...values), 1e-9);
    const step = SPARK_WIDTH / (RATE_POINTS - 1);
    const start = SPARK_WIDTH - (values.length - 1) * step;
    const usable = SPARK_HEIGHT - 2;
    return values
      .map((value, index) => `${(start + index * step).toFixed(1)},${(SPARK_HEIGHT - 1 - (value / peak) * usable).toFixed(1)}`)
      .join(" ");
  }

  function updateCharts(data) {
    for (const chart of document.querySelectorAll("[data-chart]")) {
      const values = data.rates.map((point) => Number(point[chart.dataset.chart]));
      chart.querySelector("polyline").setAttribute("points", sparkline(values));
      setText(chart.querySelector("[data-chart-latest]"), formatNumber(values.length ? values[values.length - 1] : 0));
      setText(chart.querySelector("[data-chart-peak]"), formatNumber(values.length ? Math.max(...values) : 0));
    }
  }

  function updateMaintenance(data) {
    const on = Boolean(data.maintenance);
    document.getElementById("maintenance-banner").hidden = !on;
    document.getElementById("maintenance-on").hidden = on;
    document.getElementById("maintenance-off").hidden = !on;
    setText(document.getElementById("maintenance-state"), on ? "on" : "off");
  }

  function render(data) {
    updateFields(data);
    updateTables(data);
    updateAlerts(data);
    updateErrors(data);
    updateCharts(data);
    updateMaintenance(data);
  }

  // -- polling -----------------------------------------------------------------------------

  const live = document.getElementById("live");
  const liveText = document.getElementById("live-text");
  let timer = null;
  let inFlight = false;
  let signedOut = false;

  function setLive(state, text) {
    live.dataset.state = state;
    setText(liveText, text);
  }

  async function poll() {
    if (inFlight) return;
    inFlight = true;
    clearTimeout(timer);
    try {
      const response = await fetch(`${PREFIX}/snapshot.json`, {
        credentials: "same-origin", headers: { Accept: "application/json" }, cache: "no-store",
      });
      if (response.status === 401) {
        signedOut = true;
        setLive("stale", "signed out: reload to log in");
        return;
      }
      if (!response.ok) throw new Error(`snapshot answered ${response.status}`);
      render(await response.json());
      setLive("live", "live");
    } catch (error) {
      setLive("stale", "stale");
    } finally {
      inFlight = false;
      if (!signedOut) timer = setTimeout(poll, POLL_MS);
    }
  }

  // -- buttons: fetch with the CSRF header, then refresh at once ---------------------------

  const flash = document.getElementById("flash");

  function note(ok, text) {
    flash.className = `notice ${ok ? "ok" : "bad"}`;
    setText(flash, text);
    flash.hidden = false;
  }

  document.addEventListener("submit", async (event) => {
    const form = event.target;
    if (!(form instanceof HTMLFormElement) || !form.hasAttribute("data-action")) return;
    event.preventDefault();
    const button = form.querySelector("button");
    button.disabled = true;
    try {
      const response = await fetch(form.action, {
        method: "POST",
        credentials: "same-origin",
        headers: { Accept: "application/json", "X-CSRF-Token": CSRF },
        body: new URLSearchParams(new FormData(form)),
      });
      const body = await response.json().catch(() => ({ ok: false, message: `failed (${response.status})` }));
      note(response.ok && body.ok, body.message || "done");
    } catch (error) {
      note(false, "The server did not answer; try again.");
    } finally {
      button.disabled = false;
      poll();
    }
  });

  poll();
})();
