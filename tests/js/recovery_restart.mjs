// Recovery across a daemon restart, in two runs of this script around it (tests/js_client.rs):
//   before: a client joins, its transport is cut, another agent moves 50 times; the client's
//           last seq and epoch are written to RECOVERY_STATE;
//   after:  (a restarted daemon, nothing in memory) the client rejoins with that since and must
//           get every move, in order, once, with recovered: true: from the audit log.
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { Socket } from "phoenix";
import WebSocket from "ws";
import { adminApi } from "./admin.mjs";

const [phase] = process.argv.slice(2);
const base = process.env.THUNDERLINE_URL;
const admin = process.env.THUNDERLINE_ADMIN_TOKEN;
const stateFile = process.env.RECOVERY_STATE;
const wsUrl = base.replace(/^http/, "ws") + "/socket";
const EVENTS = ["agent_entered", "agent_left", "agent_moved", "agent_interaction", "resource_changed", "environment_tick"];

const api = adminApi(base, admin);

const token = async (agent, zone) =>
  (await api("POST", "/api/tokens", { agent_id: agent, zone_id: zone, permissions: ["spawn_agents"], ttl_seconds: 600 })).token;

function joined(channel) {
  return new Promise((resolve, reject) =>
    channel.join().receive("ok", resolve).receive("error", (e) => reject(new Error(JSON.stringify(e)))),
  );
}

function ok(push) {
  return new Promise((resolve, reject) =>
    push.receive("ok", resolve).receive("error", (e) => reject(new Error(JSON.stringify(e)))).receive("timeout", () => reject(new Error("timeout"))),
  );
}

async function eventually(check, what, ms = 8000) {
  const until = Date.now() + ms;
  for (;;) {
    try {
      return check();
    } catch (e) {
      if (Date.now() > until) throw new Error(`${what}: ${e.message}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}

if (phase === "before") {
  const zone = await api("POST", "/api/zones", { name: "restart", capacity: 10, permissions: 0x03 });
  const client = new Socket(wsUrl, { transport: WebSocket, reconnectAfterMs: () => 60_000 });
  client.connect();
  const reply = await joined(client.channel(`zone:${zone.id}`, { agent_id: "rita", token: await token("rita", zone.id) }));
  client.disconnect();
  const socket = new Socket(wsUrl, { transport: WebSocket });
  socket.connect();
  const mover = socket.channel(`zone:${zone.id}`, { agent_id: "milo", token: await token("milo", zone.id) });
  await joined(mover);
  for (let i = 0; i < 50; i++) await ok(mover.push("agent_move", { position: { x: i, y: 0, z: 0 } }));
  socket.disconnect();
  writeFileSync(stateFile, JSON.stringify({ zone: zone.id, since: { seq: reply.seq, epoch: reply.epoch } }));
  console.log("before: joined at seq", reply.seq, "then 50 moves by milo");
  process.exit(0);
}

const { zone, since } = JSON.parse(readFileSync(stateFile, "utf8"));
const socket = new Socket(wsUrl, { transport: WebSocket });
socket.connect();
const channel = socket.channel(`zone:${zone}`, { agent_id: "rita", token: await token("rita", zone), since });
const seen = [];
for (const event of EVENTS) channel.on(event, (p) => seen.push({ event, ...p }));
const reply = await joined(channel);
assert.equal(reply.recovered, true, JSON.stringify(reply));
assert.equal(reply.epoch, since.epoch);
const moves = () => seen.filter((e) => e.event === "agent_moved");
await eventually(() => assert.equal(moves().length, 50), "every move after the restart");
const missed = seen.filter((e) => e.seq < reply.seq);
for (let i = 0; i < missed.length; i++) assert.equal(missed[i].seq, since.seq + 1 + i, `missed: ${missed.map((e) => e.seq)}`);
assert.equal(missed.length, reply.seq - since.seq - 1, "everything between since and the rejoin");
assert.deepEqual(moves().map((e) => e.position.x), Array.from({ length: 50 }, (_, i) => i));
console.log("after: recovered", missed.length, "events, seq", since.seq + 1, "to", reply.seq - 1);
socket.disconnect();
process.exit(0);
