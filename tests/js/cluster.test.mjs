// The official `phoenix` client, unmodified, against two nodes of one cluster: a zone created
// on node A, clients on both nodes, broadcasts and presence across them. Run by `cargo test`
// (tests/js_client.rs), which starts the nodes and sets THUNDERLINE_URL (node A),
// THUNDERLINE_URL_B and THUNDERLINE_ADMIN_TOKEN.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { Presence } from "phoenix";
import { adminApi } from "./admin.mjs";
import { closeAll, connect, eventually, join, next, push } from "./channels.mjs";

const [urlA, urlB] = [process.env.THUNDERLINE_URL, process.env.THUNDERLINE_URL_B];
const admin = process.env.THUNDERLINE_ADMIN_TOKEN;
assert.ok(urlA && urlB && admin, "THUNDERLINE_URL, THUNDERLINE_URL_B and THUNDERLINE_ADMIN_TOKEN must be set");
const apiA = adminApi(urlA, admin);
const apiB = adminApi(urlB, admin);

after(closeAll);

test("clients on two nodes share one zone: broadcasts, presence and the session count", async () => {
  const zone = await apiA("POST", "/api/zones", { name: "cluster", capacity: 10, permissions: 3 });
  assert.ok(zone.id, JSON.stringify(zone));
  // A token minted on node A joins on node B.
  const tokenFor = async (agent) =>
    (await apiA("POST", "/api/tokens", { agent_id: agent, zone_id: zone.id, permissions: ["spawn_agents", "modify_zone"], ttl_seconds: 600 })).token;

  const onA = connect(urlA).channel(`zone:${zone.id}`, { agent_id: "alice", token: await tokenFor("alice") });
  const presenceA = new Presence(onA);
  await join(onA);
  const onB = connect(urlB).channel(`zone:${zone.id}`, { agent_id: "bob", token: await tokenFor("bob") });
  const presenceB = new Presence(onB);
  const joined = await join(onB);
  assert.deepEqual([...joined.agents].sort(), ["alice", "bob"]);

  // Each side's Presence lists both agents, whichever node they joined on.
  await eventually(() => assert.deepEqual(presenceA.list((id) => id).sort(), ["alice", "bob"]), "presence on A");
  await eventually(() => assert.deepEqual(presenceB.list((id) => id).sort(), ["alice", "bob"]), "presence on B");

  // The cluster counts its sessions as one, asked on either node.
  for (const api of [apiA, apiB]) {
    assert.equal((await api("GET", `/api/zones/${zone.id}`)).active_session_count, 2);
  }

  // A move pushed on B reaches the client on A, and the reverse.
  const seenOnA = next(onA, "agent_moved", (p) => p.agent_id === "bob");
  assert.equal((await push(onB, "agent_move", { position: { x: 1, y: 2, z: 3 } })).status, "ok");
  assert.deepEqual((await seenOnA).position, { x: 1, y: 2, z: 3 });
  const seenOnB = next(onB, "agent_moved", (p) => p.agent_id === "alice");
  assert.equal((await push(onA, "agent_move", { position: { x: 4, y: 5, z: 6 } })).status, "ok");
  assert.deepEqual((await seenOnB).position, { x: 4, y: 5, z: 6 });

  // Bob leaves on B: alice's Presence on A drops him.
  await new Promise((resolve) => onB.leave().receive("ok", resolve));
  await eventually(() => assert.deepEqual(presenceA.list((id) => id), ["alice"]), "bob left A's presence");
  assert.equal((await apiB("GET", `/api/zones/${zone.id}`)).active_session_count, 1);
});

test("interest across nodes: a zone with a radius filters moves for clients on either node", async () => {
  const zone = await apiA("POST", "/api/zones", { name: "crowd", capacity: 10, permissions: 7, interest_radius: 10 });
  assert.equal(zone.interest_radius, 10, JSON.stringify(zone));
  const tokenFor = async (agent) =>
    (await apiA("POST", "/api/tokens", { agent_id: agent, zone_id: zone.id, permissions: ["spawn_agents"], ttl_seconds: 600 })).token;
  // a on node A, b and c on node B; each records what it hears of movement.
  const member = async (agent, url) => {
    const channel = connect(url).channel(`zone:${zone.id}`, { agent_id: agent, token: await tokenFor(agent) });
    const heard = [];
    for (const event of ["agent_moved", "agent_entered_view", "agent_left_view"]) {
      channel.on(event, (p) => heard.push(`${event} ${p.agent_id}`));
    }
    const marks = [];
    channel.on("mark", (p) => marks.push(p.payload.n));
    await join(channel);
    return { channel, heard, marks };
  };
  const [a, b, c] = [await member("a", urlA), await member("b", urlB), await member("c", urlB)];
  const moveTo = async (m, x) => assert.equal((await push(m.channel, "agent_move", { position: { x, y: 0, z: 0 } })).status, "ok");
  await moveTo(a, 0);
  await moveTo(b, 5);
  await moveTo(c, 50);
  await moveTo(b, 45); // out of a's view, into c's
  // A mark to the whole zone: once everyone has it, everything before it has arrived.
  await apiB("POST", `/api/zones/${zone.id}/broadcast`, { event_type: "mark", payload: { n: 1 } });
  await eventually(() => [a, b, c].forEach((m) => assert.ok(m.marks.includes(1))), "the mark on both nodes");
  assert.deepEqual(a.heard, ["agent_moved a", "agent_entered_view b", "agent_moved b", "agent_left_view b"]);
  assert.deepEqual(b.heard, ["agent_entered_view a", "agent_moved b", "agent_left_view a", "agent_entered_view c", "agent_moved b"]);
  assert.deepEqual(c.heard, ["agent_moved c", "agent_entered_view b", "agent_moved b"]);
});
