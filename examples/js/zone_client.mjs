// A zone client with the official `phoenix` package: joins a zone and prints what happens.
//
//   (cd examples/js && npm ci)                   # installs phoenix and ws (pinned here)
//   thunderline serve                            # keeps its admin token in data/admin_token
//   THUNDERLINE_ADMIN_TOKEN=$(cat data/admin_token) [THUNDERLINE_ZONE=<id>] node examples/js/zone_client.mjs [http://127.0.0.1:4000]
//
// It creates a zone over the admin API (or uses THUNDERLINE_ZONE's), mints a token for agent "example-agent", joins
// `zone:<id>`, moves, consumes some food, drops its connection while the zone announces three
// notices, rejoins with what it last saw and gets them (`recovered: true`), and prints every
// event, presence change and reply.
import { Socket, Presence } from "phoenix";
import WebSocket from "ws";

const base = process.argv[2] ?? process.env.THUNDERLINE_URL ?? "http://127.0.0.1:4000";
const admin = process.env.THUNDERLINE_ADMIN_TOKEN;
if (!admin) {
  console.error("set THUNDERLINE_ADMIN_TOKEN (serve says where it is kept: data/admin_token by default)");
  process.exit(2);
}

async function api(method, path, body) {
  const res = await fetch(base + path, {
    method,
    headers: { authorization: `Bearer ${admin}`, "content-type": "application/json" },
    body: body && JSON.stringify(body),
  });
  const json = await res.json();
  if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${JSON.stringify(json)}`);
  return json;
}

// The zone THUNDERLINE_ZONE names, or a new one. It needs spawn_agents, modify_zone and
// broadcast_events for everything below.
const zone = process.env.THUNDERLINE_ZONE
  ? await api("GET", `/api/zones/${process.env.THUNDERLINE_ZONE}`)
  : await api("POST", "/api/zones", {
      name: "Example glade",
      permissions: ["spawn_agents", "modify_zone", "broadcast_events"],
      resources: { food: { amount: 100, max: 100, regen: 2 } },
      properties: { biome: "forest" },
    });
console.log(process.env.THUNDERLINE_ZONE ? "zone" : "created zone", zone.id, JSON.stringify(zone.name));
const { token } = await api("POST", "/api/tokens", {
  agent_id: "example-agent",
  zone_id: zone.id,
  permissions: ["spawn_agents", "modify_zone"],
  ttl_seconds: 3600,
});

// Reconnects a second after a drop (the default is sooner), so the demo below has time to miss
// something.
const socket = new Socket(base.replace(/^http/, "ws") + "/socket", { transport: WebSocket, reconnectAfterMs: () => 1000 });
socket.connect();
// The params are a function: every rejoin after a drop passes the last seq seen, and the server
// sends what was missed (`recovered: true`) or a fresh snapshot (`recovered: false`).
let last = null;
let epoch = null;
const channel = socket.channel(`zone:${zone.id}`, () => ({
  agent_id: "example-agent",
  token,
  ...(last === null ? {} : { since: { seq: last, epoch } }),
}));
const presence = new Presence(channel);
presence.onSync(() => console.log("present:", presence.list((id) => id).join(", ")));
for (const event of ["agent_entered", "agent_left", "agent_moved", "agent_interaction", "resource_changed", "environment_tick", "notice"]) {
  channel.on(event, (payload) => {
    console.log(event, JSON.stringify(payload));
    if (last === null || payload.seq > last) last = payload.seq;
  });
}

const reply = (push, what) =>
  new Promise((resolve) =>
    push
      .receive("ok", (r) => (console.log(what, "ok", JSON.stringify(r)), resolve()))
      .receive("error", (r) => (console.log(what, "error", JSON.stringify(r)), resolve())),
  );

let joins = 0;
channel
  .join()
  // Called on the first join and on every rejoin.
  .receive("ok", async ({ agents, seq, epoch: e, recovered }) => {
    joins += 1;
    epoch = e;
    if (!recovered) last = seq;
    console.log(`joined (#${joins}) at seq ${seq}, recovered: ${recovered}; agents here:`, agents);
    if (joins === 1) {
      await reply(channel.push("agent_move", { position: { x: 10, y: 5, z: 0 } }), "agent_move");
      await reply(channel.push("consume_resource", { resource_type: "food", amount: 5 }), "consume_resource");
      await reply(channel.push("consume_resource", { resource_type: "food", amount: 500 }), "consume_resource (too much)");
      // Drop the connection; while the client is away, the zone announces three notices.
      console.log("dropping the connection");
      socket.conn.close(4000, "demo drop");
      for (let i = 1; i <= 3; i++) {
        await api("POST", `/api/zones/${zone.id}/broadcast`, { event_type: "notice", payload: { n: i } });
      }
      return;
    }
    setTimeout(() => {
      channel.leave().receive("ok", () => {
        socket.disconnect();
        console.log("left");
      });
    }, 500);
  })
  .receive("error", (e) => {
    console.error("join refused:", e);
    socket.disconnect();
    process.exitCode = 1;
  });
