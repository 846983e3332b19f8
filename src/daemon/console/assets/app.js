// The Thunderline console: the zone pipeline's stages, the broker sources and the zones, live.
// Figures come from the `admin:console` topic (the official phoenix client, served by the
// daemon itself), everything else from the admin API; both need the admin token, and without
// it the page shows nothing but the prompt for it. It draws at most twice a second, whatever
// the traffic, and pages its lists.
import { Socket } from "/console/phoenix.mjs";

const $ = (id) => document.getElementById(id);
const PIPELINE = "zones";
const DRAW_EVERY_MS = 500;
const PAGE = 20;
const EVENTS_KEPT = 200;
const POINTS_KEPT = 120;

const state = {
  token: null,
  socket: null,
  stats: null, // the newest `stats` push
  previous: null, // the one before it, for rates
  topology: null,
  zones: { q: "", offset: 0, total: 0, rows: [] },
  cluster: null, // GET /api/cluster, on a node of a cluster
  zone: null, // the chosen zone: {id, view, agents, positions, events, series, afterSeq}
  dirty: true,
};

// ---- the token ------------------------------------------------------------------------------

function takeToken() {
  const url = new URL(window.location.href);
  const given = url.searchParams.get("token");
  if (given) {
    // Once in the URL, then kept for this tab only and taken out of the address bar.
    sessionStorage.setItem("thunderline-admin-token", given);
    url.searchParams.delete("token");
    history.replaceState(null, "", url.pathname + url.search + url.hash);
  }
  return sessionStorage.getItem("thunderline-admin-token");
}

function showLogin(message) {
  $("app").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message ?? "";
  $("status").textContent = "not connected";
}

async function api(method, path, body) {
  const res = await fetch(path, {
    method,
    headers: { authorization: `Bearer ${state.token}`, "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  const json = text ? JSON.parse(text) : null;
  if (res.status === 401) {
    sessionStorage.removeItem("thunderline-admin-token");
    stop();
    showLogin("the admin token was refused");
    throw new Error("unauthorized");
  }
  if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${json?.details ?? ""}`);
  return json;
}

function stop() {
  if (state.socket) state.socket.disconnect();
  state.socket = null;
  state.token = null;
}

function open(token) {
  stop();
  state.token = token;
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/socket`;
  const socket = new Socket(url, { reconnectAfterMs: (tries) => Math.min(5000, 250 * tries) });
  state.socket = socket;
  socket.onOpen(() => ($("status").textContent = "connected"));
  socket.onClose(() => ($("status").textContent = "reconnecting…"));
  socket.connect();
  const channel = socket.channel("admin:console", () => ({ token: state.token }));
  channel.on("stats", (stats) => {
    state.previous = state.stats;
    state.stats = stats;
    state.dirty = true;
  });
  channel
    .join()
    .receive("ok", () => {
      sessionStorage.setItem("thunderline-admin-token", token);
      $("login").hidden = true;
      $("app").hidden = false;
      refreshTopology();
      refreshZones();
      refreshCluster();
    })
    .receive("error", () => {
      channel.leave();
      sessionStorage.removeItem("thunderline-admin-token");
      stop();
      showLogin("the admin token was refused");
    });
}

// ---- figures --------------------------------------------------------------------------------

function sample(stats, name, labels) {
  if (!stats) return 0;
  let total = 0;
  for (const [n, l, v] of stats.samples) {
    if (n !== name) continue;
    if (Object.entries(labels).every(([k, want]) => l[k] === want)) total += v;
  }
  return total;
}

function rate(name, labels) {
  const { stats, previous } = state;
  if (!stats || !previous) return 0;
  const seconds = (stats.at - previous.at) / 1000;
  if (seconds <= 0) return 0;
  return Math.max(0, (sample(stats, name, labels) - sample(previous, name, labels)) / seconds);
}

// Rates: short, one decimal below 10/s. Counts: whole numbers, as exported.
const fmt = (n) => (n >= 1000 ? `${(n / 1000).toFixed(1)}k` : n >= 10 || n === 0 ? Math.round(n).toString() : n.toFixed(1));
const whole = (n) => Math.round(n).toString();

// Dead letters kept by the sources: refused by their zone (dead_lettered) or by the decoder
// (undecodable); each is one row of /api/dead_letters.
function sourceDeadLetters() {
  const m = "thunderline_source_messages_total";
  return sample(state.stats, m, { outcome: "dead_lettered" }) + sample(state.stats, m, { outcome: "undecodable" });
}

function stageFigures(stage) {
  const l = { pipeline: PIPELINE, stage };
  const m = "thunderline_pipeline_messages_total";
  return {
    inRate: rate(m, { ...l, outcome: "in" }),
    outRate: rate(m, { ...l, outcome: "out" }),
    inFlight: sample(state.stats, "thunderline_pipeline_in_flight", l),
    workers: sample(state.stats, "thunderline_pipeline_concurrency", l),
    failed: sample(state.stats, m, { ...l, outcome: "failed" }),
    retried: sample(state.stats, m, { ...l, outcome: "retried" }),
    dead: sample(state.stats, m, { ...l, outcome: "dead_lettered" }),
  };
}

function batchSizes(batcher) {
  const parts = [];
  for (const trigger of ["size", "timeout", "flush", "idle"]) {
    const l = { pipeline: PIPELINE, batcher, trigger };
    const count = sample(state.stats, "thunderline_pipeline_batch_size_count", l);
    if (count > 0) {
      const mean = sample(state.stats, "thunderline_pipeline_batch_size_sum", l) / count;
      parts.push(`${trigger}: ${whole(count)} × ${mean.toFixed(1)}`);
    }
  }
  return parts.join(", ") || "—";
}

// ---- the pipeline ---------------------------------------------------------------------------

async function refreshTopology() {
  if (!state.token) return;
  try {
    state.topology = await api("GET", "/api/pipeline");
    state.dirty = true;
  } catch (e) {
    console.warn(e);
  }
}

function svg(tag, attrs, text) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

function drawGraph() {
  const graph = $("graph");
  graph.replaceChildren();
  const defs = svg("defs", {});
  const marker = svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 6, markerHeight: 6, orient: "auto" });
  marker.append(svg("path", { d: "M0,0 L10,5 L0,10 z", fill: "#8894a5" }));
  defs.append(marker);
  graph.append(defs);
  const stages = state.topology?.topology?.stages ?? [];
  const batchers = stages.filter((s) => s.kind === "batcher").map((s) => s.name.replace(/^batcher:/, ""));
  const sources = (state.stats?.samples ?? [])
    .filter(([n, l]) => n === "thunderline_source_messages_total" && l.outcome === "received")
    .map(([, l]) => l.source);
  const box = (x, y, title, lines, cls = "") => {
    graph.append(svg("rect", { x, y, width: 170, height: 22 + 15 * lines.length, class: cls }));
    graph.append(svg("text", { x: x + 8, y: y + 16 }, title));
    lines.forEach((line, i) => graph.append(svg("text", { x: x + 8, y: y + 33 + 15 * i, class: "figure" }, line)));
  };
  const arrow = (x1, y1, x2, y2) => graph.append(svg("line", { x1, y1, x2, y2 }));
  const figures = (stage) => {
    const f = stageFigures(stage);
    // A producer only hands messages out.
    const through = stage === "producer" ? `${fmt(f.outRate)}/s out` : `${fmt(f.inRate)}/s in`;
    return [`${through} · ${whole(f.inFlight)} in flight`, `failed ${whole(f.failed)} · retried ${whole(f.retried)}`];
  };
  const producers = ["sockets · timers · API", ...sources.map((s) => `source: ${s}`)];
  producers.forEach((p, i) => box(0, 10 + i * 58, p, i === 0 ? figures("producer") : [`${fmt(rate("thunderline_source_messages_total", { source: sources[i - 1], outcome: "received" }))}/s`]));
  producers.forEach((_, i) => arrow(170, 30 + i * 58, 200, 40));
  box(200, 10, "processor (zone writers)", [...figures("processor"), `${Math.round(sample(state.stats, "thunderline_pipeline_concurrency", { pipeline: PIPELINE, stage: "processor" }))} workers`]);
  batchers.forEach((b, i) => {
    const y = 10 + i * 110;
    arrow(370, 40, 420, y + 30);
    box(420, y, `batcher: ${b}`, [...figures(`batcher:${b}`), batchSizes(b)]);
    arrow(590, y + 30, 640, y + 30);
    box(640, y, `sink: ${b}`, figures(`sink:${b}`));
  });
  // The pipeline's own dead letters and the sources', so that the box agrees with the sources'
  // table below it.
  const pipelineDead = stages.reduce((n, s) => n + stageFigures(s.name).dead, 0);
  const sourcesDead = sourceDeadLetters();
  const lines = [`${whole(pipelineDead + sourcesDead)} in all`];
  if (sources.length > 0) lines.push(`sources ${whole(sourcesDead)} · stages ${whole(pipelineDead)}`);
  box(840, 10, "dead letters", lines, "dead");
}

function drawStages() {
  const rows = (state.topology?.topology?.stages ?? []).map((s) => {
    const f = stageFigures(s.name);
    const batcher = s.name.startsWith("batcher:") ? batchSizes(s.name.slice(8)) : "";
    const tr = document.createElement("tr");
    tr.dataset.stage = s.name;
    for (const cell of [s.name, s.concurrency, fmt(f.inRate), fmt(f.outRate), whole(f.inFlight), whole(f.failed), whole(f.retried), whole(f.dead), batcher]) {
      const td = document.createElement("td");
      td.textContent = cell;
      tr.append(td);
    }
    return tr;
  });
  $("stages").tBodies[0].replaceChildren(...rows);
  const processor = state.topology?.topology?.stages?.find((s) => s.name === "processor");
  if (processor && document.activeElement !== $("processors")) $("processors").value = processor.concurrency;
  const limit = state.topology?.rate_limit;
  if (limit && document.activeElement !== $("rate-allowed")) {
    $("rate-allowed").value = limit.allowed;
    $("rate-interval").value = limit.interval_ms;
  }
}

function drawSources() {
  const sources = [...new Set((state.stats?.samples ?? []).filter(([n]) => n.startsWith("thunderline_source_")).map(([, l]) => l.source))];
  const m = "thunderline_source_messages_total";
  const rows = sources.map((source) => {
    const tr = document.createElement("tr");
    const count = (outcome) => whole(sample(state.stats, m, { source, outcome }));
    for (const cell of [source, whole(sample(state.stats, "thunderline_source_lag", { source })), fmt(rate(m, { source, outcome: "received" })), count("acked"), count("redelivered"), count("given_back"), count("retried"), count("dead_lettered"), count("undecodable")]) {
      const td = document.createElement("td");
      td.textContent = cell;
      tr.append(td);
    }
    return tr;
  });
  if (rows.length === 0) {
    const tr = document.createElement("tr");
    const td = document.createElement("td");
    td.colSpan = 8;
    td.textContent = "no broker source is configured ([sources.nats] or [sources.rabbitmq] in the pipeline file)";
    tr.append(td);
    rows.push(tr);
  }
  $("sources").tBodies[0].replaceChildren(...rows);
}

// ---- zones ----------------------------------------------------------------------------------

async function refreshZones() {
  if (!state.token) return;
  const { q, offset } = state.zones;
  try {
    const page = await api("GET", `/api/zones?limit=${PAGE}&offset=${offset}${q ? `&q=${encodeURIComponent(q)}` : ""}`);
    state.zones.rows = page.zones;
    state.zones.total = page.total;
    state.dirty = true;
  } catch (e) {
    console.warn(e);
  }
}

// ---- the cluster's nodes --------------------------------------------------------------------

async function refreshCluster() {
  if (!state.token || state.cluster === false) return;
  const res = await fetch("/api/cluster", { headers: { authorization: `Bearer ${state.token}` } });
  if (res.status === 404) {
    // Not a node of a cluster: the section stays hidden, and it is not asked again.
    state.cluster = false;
    return;
  }
  if (!res.ok) return;
  state.cluster = await res.json();
  state.dirty = true;
}

function drawCluster() {
  if (!state.cluster) return;
  $("cluster-section").hidden = false;
  const rows = state.cluster.nodes.map((n) => {
    const tr = document.createElement("tr");
    tr.className = "node-row" + (n.alive ? "" : " dead") + (n.draining ? " draining" : "");
    tr.dataset.node = n.name;
    const alive = n.alive ? (n.draining ? "draining" : "yes") : "no";
    const cells = [n.name, alive, n.incarnation.slice(0, 12), n.zones_owned, n.connections, n.forwarded_per_sec.toFixed(1), `${(n.last_heard_ms / 1000).toFixed(1)} s ago`];
    for (const cell of cells) {
      const td = document.createElement("td");
      td.textContent = cell;
      tr.append(td);
    }
    return tr;
  });
  $("nodes").tBodies[0].replaceChildren(...rows);
}

const amounts = (resources) => Object.entries(resources ?? {}).map(([k, r]) => `${k} ${r.amount}/${r.max}`).join(", ");

function drawZones() {
  const rows = state.zones.rows.map((z) => {
    const tr = document.createElement("tr");
    tr.className = "zone-row" + (state.zone?.id === z.id ? " chosen" : "");
    tr.dataset.zone = z.id;
    for (const cell of [z.name, z.assigned_server ?? "—", z.active_session_count, z.interest_radius ?? "—", amounts(z.resources) || "—", z.seq]) {
      const td = document.createElement("td");
      td.textContent = cell;
      tr.append(td);
    }
    tr.addEventListener("click", () => choose(z.id));
    return tr;
  });
  $("zones").tBodies[0].replaceChildren(...rows);
  const { offset, total } = state.zones;
  $("page-info").textContent = total === 0 ? " no zones " : ` ${offset + 1}–${Math.min(offset + PAGE, total)} of ${total} `;
  $("prev").disabled = offset === 0;
  $("next").disabled = offset + PAGE >= total;
}

function choose(id) {
  state.zone = { id, view: null, agents: [], positions: new Map(), events: [], series: new Map(), afterSeq: null };
  $("zone-section").hidden = false;
  refreshZone();
}

async function refreshZone() {
  const zone = state.zone;
  if (!zone || !state.token) return;
  try {
    const [view, agents] = await Promise.all([api("GET", `/api/zones/${zone.id}`), api("GET", `/api/zones/${zone.id}/agents`)]);
    if (state.zone !== zone) return;
    zone.view = view;
    zone.agents = agents.agents.map((a) => a.agent_id);
    // Recent events: the last ones on first sight, then what came after.
    const after = zone.afterSeq ?? Math.max(0, view.seq - 50);
    const { events } = await api("GET", `/api/zones/${zone.id}/events?after_seq=${after}&limit=1000`);
    if (state.zone !== zone) return;
    for (const e of events) {
      zone.events.push(e);
      if (e.type === "agent_moved") zone.positions.set(e.payload.agent_id, e.payload.position);
    }
    zone.events = zone.events.slice(-EVENTS_KEPT);
    zone.afterSeq = events.length ? events[events.length - 1].seq : Math.max(after, view.seq);
    const now = Date.now();
    for (const [name, r] of Object.entries(view.resources ?? {})) {
      const points = zone.series.get(name) ?? [];
      points.push([now, r.amount, r.max]);
      zone.series.set(name, points.slice(-POINTS_KEPT));
    }
    state.dirty = true;
  } catch (e) {
    console.warn(e);
  }
}

function drawZone() {
  const zone = state.zone;
  if (!zone?.view) return;
  const interest = zone.view.interest_radius == null ? "every move to everyone" : `interest radius ${zone.view.interest_radius}`;
  $("zone-title").textContent = `Zone ${zone.view.name} (seq ${zone.view.seq}, ${zone.view.active_session_count} sessions, ${interest})`;
  // The plan: present agents at their last known position (from the events seen).
  const plan = $("plan");
  const ctx = plan.getContext("2d");
  ctx.clearRect(0, 0, plan.width, plan.height);
  const known = zone.agents.map((a) => [a, zone.positions.get(a)]);
  const xs = known.filter(([, p]) => p).map(([, p]) => p.x);
  const ys = known.filter(([, p]) => p).map(([, p]) => p.y);
  const [minX, maxX] = [Math.min(0, ...xs), Math.max(1, ...xs)];
  const [minY, maxY] = [Math.min(0, ...ys), Math.max(1, ...ys)];
  // Room on the right for the names.
  const px = (x) => 20 + ((x - minX) / (maxX - minX || 1)) * (plan.width - 90);
  const py = (y) => plan.height - 20 - ((y - minY) / (maxY - minY || 1)) * (plan.height - 40);
  ctx.font = "11px system-ui";
  known.forEach(([agent, p], i) => {
    const [x, y] = p ? [px(p.x), py(p.y)] : [20 + (i % 8) * 40, 14];
    ctx.fillStyle = p ? "#4a6fa5" : "#b0b8c4";
    ctx.beginPath();
    ctx.arc(x, y, 5, 0, Math.PI * 2);
    ctx.fill();
    ctx.fillStyle = "#1d2430";
    ctx.fillText(agent, x + 7, y + 4);
  });
  const list = zone.agents.slice(0, 100).map((a) => {
    const li = document.createElement("li");
    const p = zone.positions.get(a);
    li.textContent = p ? `${a} (${p.x}, ${p.y}, ${p.z})` : `${a} (position not seen yet)`;
    return li;
  });
  if (zone.agents.length > 100) list.push(Object.assign(document.createElement("li"), { textContent: `… and ${zone.agents.length - 100} more` }));
  $("agents").replaceChildren(...list);
  // Resources over time.
  const chart = $("chart");
  const c = chart.getContext("2d");
  c.clearRect(0, 0, chart.width, chart.height);
  const colours = ["#4a6fa5", "#b5834a", "#4aa57a", "#a54a8f", "#6a6a6a"];
  let i = 0;
  for (const [name, points] of zone.series) {
    const max = Math.max(1, ...points.map((p) => p[2]));
    c.strokeStyle = colours[i % colours.length];
    c.beginPath();
    points.forEach(([, amount], j) => {
      const x = 10 + (j / Math.max(1, POINTS_KEPT - 1)) * (chart.width - 20);
      const y = chart.height - 10 - (amount / max) * (chart.height - 20);
      if (j === 0) c.moveTo(x, y);
      else c.lineTo(x, y);
    });
    c.stroke();
    c.fillStyle = c.strokeStyle;
    c.fillText(name, 12, 14 + 12 * i);
    i++;
  }
  $("resource-list").replaceChildren(
    ...Object.entries(zone.view.resources ?? {}).map(([k, r]) => Object.assign(document.createElement("li"), { textContent: `${k}: ${r.amount} / ${r.max} (+${r.regen} a tick)` })),
  );
  // Recent events, newest first, each with its seq.
  const events = zone.events.slice(-50).reverse().map((e) => {
    const li = document.createElement("li");
    li.value = e.seq;
    li.textContent = `${e.type} ${JSON.stringify(e.payload)}`;
    return li;
  });
  $("events").replaceChildren(...events);
}

// ---- the loop -------------------------------------------------------------------------------

let drawn = 0;
function frame(now) {
  if (state.dirty && state.token && now - drawn >= DRAW_EVERY_MS) {
    drawn = now;
    state.dirty = false;
    // How many times it has drawn: the browser test holds it to its pace.
    document.body.dataset.draws = String(Number(document.body.dataset.draws ?? 0) + 1);
    drawGraph();
    drawStages();
    drawSources();
    drawCluster();
    drawZones();
    drawZone();
  }
  requestAnimationFrame(frame);
}

$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  const token = $("token").value.trim();
  if (token) open(token);
});
$("zone-search").addEventListener("submit", (e) => {
  e.preventDefault();
  state.zones.q = $("zone-q").value.trim();
  state.zones.offset = 0;
  refreshZones();
});
$("prev").addEventListener("click", () => {
  state.zones.offset = Math.max(0, state.zones.offset - PAGE);
  refreshZones();
});
$("next").addEventListener("click", () => {
  state.zones.offset += PAGE;
  refreshZones();
});
$("controls").addEventListener("submit", async (e) => {
  e.preventDefault();
  const which = e.submitter?.dataset.control;
  try {
    if (which === "processors") {
      state.topology = await api("POST", "/api/pipeline/processors", { concurrency: Number($("processors").value) });
    } else if (which === "rate") {
      state.topology = await api("POST", "/api/pipeline/rate_limit", { allowed: Number($("rate-allowed").value), interval_ms: Number($("rate-interval").value) });
    }
    $("control-result").textContent = "applied";
    state.dirty = true;
  } catch (err) {
    $("control-result").textContent = err.message;
  }
});

setInterval(refreshTopology, 2000);
setInterval(refreshZones, 2000);
setInterval(refreshCluster, 1000);
setInterval(refreshZone, 1000);
requestAnimationFrame(frame);

const token = takeToken();
if (token) open(token);
else showLogin();
