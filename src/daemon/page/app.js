// The status page: reads /status every 2 s and draws it. No dependency, nothing from
// the network but this daemon; the API token is asked for on each trigger and sent only
// in that request's Authorization header.
"use strict";

const $ = (id) => document.getElementById(id);
const fmt = (v) => (v === null || v === undefined ? "–" : Number(v).toFixed(2));
const when = (ms) => (ms ? new Date(ms).toLocaleString() : "–");

function text(id, value) {
  $(id).textContent = value;
}

function state(st) {
  const last = st.migrations.length ? st.migrations[st.migrations.length - 1] : null;
  if (last && last.outcome === "failed" && !last.resolved_on) {
    return ["waiting", "waiting for an operator",
      "migration " + last.id + " failed after cutover: run `stateshift resolve -c FILE --on source|target`"];
  }
  if (st.state === "migrating") {
    return ["migrating", "migrating", st.phase ? "phase: " + st.phase : ""];
  }
  if (st.state === "recovering") {
    return ["migrating", "settling an interrupted migration", st.phase ? "phase: " + st.phase : ""];
  }
  if (/^cooling down/.test(st.last_decision || "")) {
    return ["cooldown", "cooldown", st.last_decision];
  }
  return ["idle", st.mode === "observe" ? "observing" : "idle", ""];
}

function chart(st) {
  const svg = $("chart");
  const W = 800, H = 240, L = 56, R = 8, T = 8, B = 22;
  const pts = st.history || [];
  const ys = pts.flatMap((p) => [p.load, p.prediction]).filter((v) => v !== null && v !== undefined);
  ys.push(st.threshold);
  // Up to a round number (1, 2 or 5 times a power of ten) above everything drawn.
  const top = Math.max(...ys) * 1.05 || 1;
  const pow = Math.pow(10, Math.floor(Math.log10(top)));
  const ymax = [1, 2, 5, 10].map((m) => m * pow).find((v) => v >= top);
  const t0 = pts.length ? pts[0].at_unix_ms : Date.now() - 60000;
  const t1 = pts.length > 1 ? pts[pts.length - 1].at_unix_ms : t0 + 60000;
  const x = (t) => L + ((t - t0) / Math.max(t1 - t0, 1)) * (W - L - R);
  const y = (v) => T + (1 - v / ymax) * (H - T - B);
  const line = (key) => pts.filter((p) => p[key] !== null && p[key] !== undefined)
    .map((p) => x(p.at_unix_ms).toFixed(1) + "," + y(p[key]).toFixed(1)).join(" ");
  const ticks = [0, 0.5, 1].map((f) => {
    const v = ymax * f;
    return '<line x1="' + L + '" x2="' + (W - R) + '" y1="' + y(v) + '" y2="' + y(v) + '" stroke="#eef0f3"/>' +
      '<text x="' + (L - 4) + '" y="' + (y(v) + 4) + '" font-size="11" text-anchor="end" fill="#66707f">' + (Number.isInteger(v) ? String(v) : v.toFixed(1)) + "</text>";
  }).join("");
  svg.innerHTML = ticks +
    '<line x1="' + L + '" x2="' + (W - R) + '" y1="' + y(st.threshold) + '" y2="' + y(st.threshold) + '" stroke="#b3261e" stroke-dasharray="6 4"/>' +
    '<polyline id="load-line" fill="none" stroke="#2d5bd0" stroke-width="2" points="' + line("load") + '"/>' +
    '<polyline id="prediction-line" fill="none" stroke="#b26a00" stroke-width="2" stroke-dasharray="4 3" points="' + line("prediction") + '"/>' +
    '<text x="' + L + '" y="' + (H - 6) + '" font-size="11" fill="#66707f">' + when(t0) + "</text>" +
    '<text x="' + (W - R) + '" y="' + (H - 6) + '" font-size="11" text-anchor="end" fill="#66707f">' + when(t1) + "</text>";
  text("points", pts.length + " readings");
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) {
    const td = document.createElement("td");
    if (c instanceof Node) td.appendChild(c); else td.textContent = c;
    tr.appendChild(td);
  }
  return tr;
}

function phases(m) {
  const total = m.phases.reduce((s, p) => s + p[1], 0) || 1;
  const div = document.createElement("div");
  for (const [name, secs] of m.phases) {
    const line = document.createElement("div");
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = Math.max(2, Math.round((secs / total) * 120)) + "px";
    line.appendChild(bar);
    line.appendChild(document.createTextNode(name + " " + secs.toFixed(2)));
    div.appendChild(line);
  }
  return div;
}

function timelineUrl(id) {
  return "migrations/" + encodeURIComponent(id) + "/timeline.svg";
}

function timelineLink(id, label) {
  const a = document.createElement("a");
  a.href = timelineUrl(id);
  a.textContent = label;
  return a;
}

function render(st) {
  text("service", "stateshift: " + st.service);
  const [cls, label, detail] = state(st);
  $("state").className = "badge " + cls;
  text("state", label);
  text("phase", detail);
  text("source_url", st.source_url);
  text("load_source", st.load_source || "–");
  text("mode", st.mode === "observe" ? "observe: decisions are recorded, never acted on" : "act");
  text("api", st.api);
  text("window", (st.window || []).map(fmt).join(", ") || "–");
  text("last_reading", fmt(st.last_reading) + (st.last_fresh_unix_ms ? "  at " + when(st.last_fresh_unix_ms) : ""));
  text("last_prediction", fmt(st.last_prediction));
  text("threshold", fmt(st.threshold));
  text("last_decision", st.last_decision || "–");
  chart(st);
  $("observe").hidden = !(st.would_migrate && st.would_migrate.length);
  $("would").replaceChildren(...(st.would_migrate || []).slice().reverse()
    .map((w) => row([when(w.at_unix_ms), w.decision])));
  const avail = st.availability || {};
  $("migrations").replaceChildren(...st.migrations.slice().reverse().map((m) => row([
    m.id, when(m.started_ms), m.trigger,
    m.outcome ? m.outcome + (m.error ? ": " + m.error : "") : doing(m, st),
    phases(m),
    m.id in avail ? timelineLink(m.id, "chart") : "–",
  ])));
  // The newest migration with a timeline, as a chart.
  const newest = st.migrations.slice().reverse().find((m) => m.id in avail);
  $("timeline").hidden = !newest;
  if (newest && $("timeline-id").textContent !== newest.id) {
    text("timeline-id", newest.id);
    text("timeline-summary", avail[newest.id]);
    $("timeline-chart").src = timelineUrl(newest.id);
    $("timeline-link").href = timelineUrl(newest.id);
  }
  $("trigger").disabled = st.state === "migrating" || st.state === "recovering";
  // Past the repoint the daemon refuses an abort: say so instead of offering it.
  const running = st.migrations.length && !st.migrations[st.migrations.length - 1].outcome
    ? st.migrations[st.migrations.length - 1] : null;
  const past = running && running.cutover_started;
  $("abort").disabled = st.state !== "migrating" || !!past;
  $("abort").title = st.state === "recovering"
    ? "an interrupted migration is being settled: it cannot be aborted"
    : past ? "past cutover: writers may use the target, so it cannot be rolled back" : "";
  text("updated", "updated " + new Date().toLocaleTimeString());
}

// What a migration without an outcome is doing: its phase, or before the engine's first
// phase, the target stack it is creating (minutes on a cloud). One this daemon is not
// running is a CLI's, or was interrupted and is settled when the service is next located.
function doing(m, st) {
  const last = st.migrations[st.migrations.length - 1];
  const at = m.current_phase ? " (at " + m.current_phase + ")" : "";
  if (st.state === "recovering" && m === last) return "interrupted, being settled by this daemon" + at;
  if (st.state !== "migrating" || m !== last) return "not run by this daemon: a CLI's, or interrupted" + at;
  if (m.aborted_by) return "aborted by " + m.aborted_by + ": rolling back";
  if (m.current_phase) return "running (" + m.current_phase + ")";
  if (m.creating && !m.target) return "running (creating the target stack " + m.creating + ")";
  return "running";
}

async function refresh() {
  try {
    const r = await fetch("status", { cache: "no-store" });
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json());
  } catch (e) {
    text("updated", "cannot read /status: " + e.message);
  }
}

$("trigger").addEventListener("click", async () => {
  const token = window.prompt("API token (api.token_file) to start a migration:");
  if (!token) return;
  if (!window.confirm("Migrate " + $("source_url").textContent + " to a new stack now?")) return;
  text("note", "asking…");
  try {
    const r = await fetch("migrate", { method: "POST", headers: { Authorization: "Bearer " + token } });
    text("note", r.status === 202 ? "migration requested" : "refused (HTTP " + r.status + "): " + (await r.text()).trim());
  } catch (e) {
    text("note", "could not reach the daemon: " + e.message);
  }
  refresh();
});

$("abort").addEventListener("click", async () => {
  const token = window.prompt("API token (api.token_file) to abort the running migration:");
  if (!token) return;
  if (!window.confirm("Abort the running migration? Before its cutover it rolls back; the service stays on " + $("source_url").textContent + ".")) return;
  text("note", "asking…");
  try {
    const r = await fetch("migrate/abort", { method: "POST", headers: { Authorization: "Bearer " + token } });
    text("note", r.status === 202 ? "abort accepted: rolling back" : "refused (HTTP " + r.status + "): " + (await r.text()).trim());
  } catch (e) {
    text("note", "could not reach the daemon: " + e.message);
  }
  refresh();
});

refresh();
setInterval(refresh, 2000);
