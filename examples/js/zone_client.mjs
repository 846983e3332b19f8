// A zone client with the official `phoenix` package: joins a zone and prints what happens.
//
//   cd tests/js && npm ci && cd ../..            # installs phoenix and ws (pinned)
//   cargo run --release -- serve                 # prints the admin token on first start
//   THUNDERLINE_ADMIN_TOKEN=... node examples/js/zone_client.mjs [http://127.0.0.1:4000]
//
// It creates a zone over the admin API, mints a token for agent "example-agent", joins
// `zone:<id>`, moves, consumes some food, and prints every event, presence change and reply.
import { createRequire } from "node:module";

const require = createRequire(new URL("../../tests/js/package.json", import.meta.url));
const { Socket, Presence } = require("phoenix");
const WebSocket = require("ws");

const base = process.argv[2] ?? process.env.THUNDERLINE_URL ?? "http://127.0.0.1:4000";
const admin = process.env.THUNDERLINE_ADMIN_TOKEN;
if (!admin) {
  console.error("set THUNDERLINE_ADMIN_TOKEN (serve prints it on first start; it is kept in data/admin_token)");
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

const zone = await api("POST", "/api/zones", {
  name: "Example glade",
  permissions: 0x03,
  resources: { food: { amount: 100, max: 100, regen: 2 } },
  properties: { biome: "forest" },
});
console.log("created zone", zone.id);
const { token } = await api("POST", "/api/tokens", {
  agent_id: "example-agent",
  zone_id: zone.id,
  permissions: ["spawn_agents", "modify_zone"],
  ttl_seconds: 3600,
});

const socket = new Socket(base.replace(/^http/, "ws") + "/socket", { transport: WebSocket });
socket.connect();
const channel = socket.channel(`zone:${zone.id}`, { agent_id: "example-agent", token });
const presence = new Presence(channel);
presence.onSync(() => console.log("present:", presence.list((id) => id).join(", ")));
for (const event of ["agent_entered", "agent_left", "agent_moved", "agent_interaction", "resource_changed", "environment_tick"]) {
  channel.on(event, (payload) => console.log(event, JSON.stringify(payload)));
}

const reply = (push, what) =>
  new Promise((resolve) =>
    push
      .receive("ok", (r) => (console.log(what, "ok", JSON.stringify(r)), resolve()))
      .receive("error", (r) => (console.log(what, "error", JSON.stringify(r)), resolve())),
  );

channel
  .join()
  .receive("ok", async ({ agents }) => {
    console.log("joined; agents here:", agents);
    await reply(channel.push("agent_move", { position: { x: 10, y: 5, z: 0 } }), "agent_move");
    await reply(channel.push("consume_resource", { resource_type: "food", amount: 5 }), "consume_resource");
    await reply(channel.push("consume_resource", { resource_type: "food", amount: 500 }), "consume_resource (too much)");
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
