// The pbt-server dashboard: polls api/status (relative, so it works wherever it is mounted)
// once a second and redraws. Plain ES2020, no dependencies; every value goes in through
// textContent, never as HTML.
"use strict";

(() => {
  const POLL_MS = 1000;
  const OUTCOMES = ["completed", "error", "cancelled"];
  const $ = (id) => document.getElementById(id);
  let lastOk = 0;

  function ms(seconds) {
    if (seconds === null || seconds === undefined) return "-";
    const value = seconds * 1000;
    if (value < 1) return `${value.toFixed(2)} ms`;
    if (value < 1000) return `${value.toPrecision(3)} ms`;
    return `${(value / 1000).toPrecision(3)} s`;
  }

  function mib(bytes) {
    return bytes ? `${(bytes / 1048576).toFixed(1)} MiB` : "-";
  }

  function duration(seconds) {
    const s = Math.floor(seconds);
    const d = Math.floor(s / 86400);
    const hms = [Math.floor(s / 3600) % 24, Math.floor(s / 60) % 60, s % 60]
      .map((n, i) => (i ? String(n).padStart(2, "0") : String(n)))
      .join(":");
    return d ? `${d}d ${hms}` : hms;
  }

  function cell(text, field, numeric) {
    const td = document.createElement("td");
    td.textContent = text;
    if (field) td.dataset.field = field;
    if (numeric) td.className = "num";
    return td;
  }

  function fill(tbody, rows) {
    tbody.replaceChildren(...rows);
  }

  function row(attributes, cells) {
    const tr = document.createElement("tr");
    for (const [key, value] of Object.entries(attributes)) tr.dataset[key] = value;
    tr.append(...cells);
    return tr;
  }

  function drawChart(series, window) {
    const svg = $("chart");
    const ns = "http://www.w3.org/2000/svg";
    let peak = 0;
    for (let i = 0; i < window; i++) {
      peak = Math.max(peak, OUTCOMES.reduce((sum, o) => sum + series[o][i], 0));
    }
    const width = 600 / window;
    const bars = [];
    for (let i = 0; i < window; i++) {
      let y = 140;
      for (const outcome of OUTCOMES) {
        const n = series[outcome][i];
        if (!n) continue;
        const h = (n / peak) * 136;
        y -= h;
        const rect = document.createElementNS(ns, "rect");
        rect.setAttribute("x", (i * width).toFixed(2));
        rect.setAttribute("y", y.toFixed(2));
        rect.setAttribute("width", Math.max(width - 0.3, 0.5).toFixed(2));
        rect.setAttribute("height", h.toFixed(2));
        rect.setAttribute("class", outcome);
        bars.push(rect);
      }
    }
    svg.replaceChildren(...bars);
    $("chart-max").textContent = peak ? `peak ${peak} / s` : "no tasks";
  }

  function render(s) {
    const t = s.totals;
    $("version").textContent = s.server.version;
    const health = $("health");
    health.dataset.state = s.healthy ? "ok" : "unhealthy";
    health.textContent = s.healthy ? "healthy" : `unhealthy: ${s.problem}`;
    $("server-line").textContent =
      `pid ${s.server.pid} · up ${duration(s.server.uptime)} · socket ${s.server.socket}` +
      (s.server.tcp ? ` · tcp ${s.server.tcp}` : "");

    $("t-sessions").textContent = t.sessions;
    $("t-sessions-max").textContent = `of ${s.server.max_sessions}`;
    $("t-pages").textContent = t.pages;
    $("t-waiting").textContent = t.waiting;
    $("t-running").textContent = t.running;
    $("t-rate").textContent = s.tasks_per_second.toFixed(1);
    const slots = Object.values(t.workers).reduce((a, b) => a + b, 0);
    $("t-workers").textContent = `${t.workers.busy + t.workers.starting} / ${slots}`;
    $("t-standby").textContent = `standby ${t.standby}`;
    $("t-rss").textContent = mib(s.broker_rss);

    drawChart(s.series, s.window);
    for (const outcome of OUTCOMES) {
      $(`l-${outcome}`).textContent = s.series[outcome].reduce((a, b) => a + b, 0);
    }
    $("ended-all").textContent = OUTCOMES.map((o) => `${s.ended[o]} ${o}`).join(", ");

    fill($("outcomes").tBodies[0], s.outcomes.map((o) => {
      const first = cell(o.outcome, "outcome");
      first.classList.add("outcome");
      first.dataset.outcome = o.outcome;
      return row({ outcome: o.outcome, code: o.code },
        [first, cell(o.code || "-", "code"), cell(o.count, "count", true)]);
    }));
    $("outcomes-empty").hidden = s.outcomes.length > 0;

    const times = s.times;
    $("times-caption").textContent =
      `tasks that ended in the last ${times.window} s (${times.samples})`;
    const timeRows = [];
    const addTimes = (label, key, tasks, spread, kind) => {
      timeRows.push(row({ codeunit: key, kind }, [
        cell(label, "codeunit"), cell(kind, "kind"), cell(tasks, "tasks", true),
        cell(ms(spread.p50), "p50", true), cell(ms(spread.p90), "p90", true),
        cell(ms(spread.p99), "p99", true), cell(ms(spread.max), "max", true),
      ]));
    };
    addTimes("all", "all", times.samples, times.wait, "wait");
    addTimes("", "all", "", times.run, "run");
    for (const c of times.codeunits) {
      addTimes(String(c.codeunit), String(c.codeunit), c.tasks, c.wait, "wait");
      addTimes("", String(c.codeunit), "", c.run, "run");
    }
    fill($("times").tBodies[0], timeRows);

    fill($("workers").tBodies[0], s.workers.map((w) => {
      const state = cell(w.state, "state");
      state.classList.add("state");
      state.dataset.state = w.state;
      return row({ slot: String(w.slot) }, [
        cell(w.slot, "slot"), cell(w.pid ?? "-", "pid", true), state,
        cell(mib(w.rss), "rss", true), cell(w.tasks_done, "tasks_done", true),
        cell(w.task ?? "-", "task"), cell(w.codeunit ?? "-", "codeunit", true),
        cell(w.task_seconds === null ? "-" : ms(w.task_seconds), "task_seconds", true),
      ]);
    }));
    const kills = Object.entries(s.kills).filter(([, n]) => n > 0);
    $("kills").textContent = kills.length
      ? `replaced: ${kills.map(([cause, n]) => `${cause} ${n}`).join(", ")}`
      : "none replaced";

    const peak = Math.max(1, ...s.sessions.map((x) => x.waiting + x.running));
    fill($("sessions").tBodies[0], s.sessions.map((x) => {
      const load = document.createElement("td");
      for (const [kind, n] of [["running", x.running], ["waiting", x.waiting]]) {
        const bar = document.createElement("span");
        bar.className = `bar ${kind}`;
        bar.style.width = `${(n / peak) * 12}rem`;
        load.append(bar);
      }
      return row({ session: String(x.id) }, [
        cell(x.id, "id", true), cell(x.pages, "pages", true),
        cell(x.waiting, "waiting", true), cell(x.running, "running", true), load,
      ]);
    }));
    const hidden = t.sessions - s.sessions.length;
    $("sessions-caption").textContent =
      hidden > 0 ? `the ${s.sessions.length} busiest of ${t.sessions}` : `${t.sessions} open`;
    $("sessions-empty").hidden = t.sessions > 0;
  }

  async function poll() {
    try {
      const response = await fetch("api/status", { cache: "no-store" });
      if (!response.ok) throw new Error(`${response.status} ${await response.text()}`);
      render(await response.json());
      lastOk = Date.now();
      $("updated").textContent = "live";
    } catch (err) {
      const health = $("health");
      health.dataset.state = "unreachable";
      health.textContent = "no answer";
      const since = lastOk ? `${Math.round((Date.now() - lastOk) / 1000)} s ago` : "never";
      $("updated").textContent = `last update ${since}: ${err.message}`;
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  poll();
})();
