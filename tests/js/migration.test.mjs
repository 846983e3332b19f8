// Agents moving between zones, through the official phoenix client: `migrate` on zone:A with a
// token for B, a ticket back, a join of zone:B with the ticket. Run by tests/js_client.rs,
// which sets THUNDERLINE_URL, THUNDERLINE_ADMIN_TOKEN and TICKET_MS (the daemon's
// `[zones] migration_ticket_ms`).
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { Presence } from "phoenix";
import { adminClient } from "./admin.mjs";
import { closeAll, connect as connectTo, eventually, join, next, push, refusal } from "./channels.mjs";

const base = process.env.THUNDERLINE_URL;
const admin = process.env.THUNDERLINE_ADMIN_TOKEN;
const ticketMs = Number(process.env.TICKET_MS);
assert.ok(base && admin && ticketMs, "THUNDERLINE_URL, THUNDERLINE_ADMIN_TOKEN and TICKET_MS must be set");
// The tests that wait for a ticket to run out need a short one.
const short = { skip: ticketMs > 3000 ? "the daemon's tickets last too long to wait out" : false };

after(closeAll);

const { api, zone, token } = adminClient(base, admin);
const connect = () => connectTo(base);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const events = async (zoneId) => (await api("GET", `/api/zones/${zoneId}/events?limit=1000`)).body.events;
const count = async (zoneId) => (await api("GET", `/api/zones/${zoneId}`)).body.active_session_count;
const names = (presence) => presence.list((id) => id).sort();

/// `agent` joined to `zoneId` on a socket of its own: the channel.
async function joined(agent, zoneId, socket = connect()) {
  const channel = socket.channel(`zone:${zoneId}`, { agent_id: agent, token: await token(agent, zoneId) });
  await join(channel);
  return channel;
}

/// An observer of `zoneId` and its presence, followed from before its join.
async function observer(agent, zoneId) {
  const channel = connect().channel(`zone:${zoneId}`, { agent_id: agent, token: await token(agent, zoneId) });
  const presence = new Presence(channel);
  await join(channel);
  return [channel, presence];
}

/// Asks to move the agent of `channel` to `to`; the push's `{status, response}`.
async function migrate(channel, agent, to, extra = {}) {
  return push(channel, "migrate", { to, token: await token(agent, to), ...extra });
}

test("a migration with observers in both zones: agent_left with to, agent_entered with from and the position, presence in both", async () => {
  const a = await zone();
  const b = await zone();
  const socket = connect();
  const alice = await joined("alice", a.id, socket);
  assert.equal((await push(alice, "agent_move", { position: { x: 1, y: 2, z: 3 } })).status, "ok");
  const [watchA, presenceA] = await observer("watcher-a", a.id);
  const [watchB, presenceB] = await observer("watcher-b", b.id);
  await eventually(() => assert.deepEqual(names(presenceA), ["alice", "watcher-a"]), "A's presence before");

  const left = next(watchA, "agent_left", (p) => p.agent_id === "alice");
  const closed = new Promise((resolve) => alice.onClose(resolve));
  const moved = await migrate(alice, "alice", b.id);
  assert.equal(moved.status, "ok", JSON.stringify(moved));
  assert.equal(moved.response.zone, b.id);
  assert.equal(typeof moved.response.ticket, "string");
  assert.equal(moved.response.expires_in_ms, ticketMs);
  const leftPayload = await left;
  assert.equal(leftPayload.reason, "migrated");
  assert.equal(leftPayload.to, b.id);
  await closed; // the channel on A is closed: the session there ended
  await eventually(() => assert.deepEqual(names(presenceA), ["watcher-a"]), "A's presence after");
  assert.equal(await count(a.id), 1);
  assert.equal(await count(b.id), 1, "a reservation is not a session");
  // B's migration_reserved was broadcast before the reply (durable): no presence came with it.
  assert.deepEqual(names(presenceB), ["watcher-b"], "nor a presence");

  const entered = next(watchB, "agent_entered", (p) => p.agent_id === "alice");
  const onB = socket.channel(`zone:${b.id}`, { agent_id: "alice", ticket: moved.response.ticket });
  const reply = await join(onB);
  assert.deepEqual(reply.agents, ["alice", "watcher-b"]);
  const enteredPayload = await entered;
  assert.equal(enteredPayload.from, a.id);
  assert.deepEqual(enteredPayload.position, { x: 1, y: 2, z: 3 });
  await eventually(() => assert.deepEqual(names(presenceB), ["alice", "watcher-b"]), "B's presence after");
  assert.equal(await count(b.id), 2);
  // The agent acts in B with its token's bits.
  assert.equal((await push(onB, "agent_move", { position: { x: 4, y: 5, z: 6 } })).status, "ok");

  // Each log has its side, with its seq.
  const logA = await events(a.id);
  const leftLogged = logA.find((e) => e.type === "agent_left" && e.payload.agent_id === "alice");
  assert.equal(leftLogged.payload.to, b.id);
  const logB = await events(b.id);
  const reserved = logB.find((e) => e.type === "migration_reserved");
  const enteredLogged = logB.find((e) => e.type === "agent_entered" && e.payload.agent_id === "alice");
  assert.equal(reserved.payload.agent_id, "alice");
  assert.equal(reserved.payload.from, a.id);
  assert.ok(reserved.seq < enteredLogged.seq);
  assert.equal(enteredLogged.payload.from, a.id);
});

test("a full zone refuses with zone_full, and nothing changes in A", async () => {
  const a = await zone();
  const b = await zone({ capacity: 1 });
  await joined("bob", b.id);
  const alice = await joined("alice", a.id);
  // A join is answered before its event is logged: wait for it.
  const before = await eventually(async () => {
    const log = await events(a.id);
    assert.ok(log.some((e) => e.type === "agent_entered"));
    return log;
  }, "alice's join logged");
  const refused = await migrate(alice, "alice", b.id);
  assert.equal(refused.status, "error");
  assert.equal(refused.response.reason, "zone_full");
  assert.deepEqual(await events(a.id), before, "A's log is as it was");
  assert.equal(await count(a.id), 1);
  assert.equal((await push(alice, "agent_move", { position: { x: 0, y: 0, z: 0 } })).status, "ok", "alice is still in A");
});

test("each refusal leaves the agent in A: same_zone, unauthorized, zone_not_found, invalid_payload, not_joined, migration_pending", async () => {
  const a = await zone();
  const b = await zone();
  const socket = connect();
  const alice = await joined("alice", a.id, socket);
  const reason = async (payload) => {
    const r = await push(alice, "migrate", payload);
    assert.equal(r.status, "error", JSON.stringify(r));
    return r.response.reason;
  };
  assert.equal(await reason({ to: a.id, token: await token("alice", a.id) }), "same_zone");
  assert.equal(await reason({ to: b.id, token: "not.a-token" }), "unauthorized");
  assert.equal(await reason({ to: b.id, token: await token("alice", a.id) }), "unauthorized", "a token for another zone");
  assert.equal(await reason({ to: b.id, token: await token("mallory", b.id) }), "unauthorized", "a token for another agent");
  const gone = await zone();
  const goneToken = await token("alice", gone.id);
  assert.equal((await api("DELETE", `/api/zones/${gone.id}`)).status, 204);
  assert.equal(await reason({ to: gone.id, token: goneToken }), "zone_not_found");
  assert.equal(await reason({ to: b.id }), "invalid_payload");
  assert.equal(await reason({ to: b.id, token: await token("alice", b.id), extra: 1 }), "invalid_payload");
  assert.equal(await reason({ to: 42, token: await token("alice", b.id) }), "invalid_payload");

  // Two at once: the second is refused while the first is under way.
  const tokenB = await token("alice", b.id);
  const [first, second] = await Promise.all([
    push(alice, "migrate", { to: b.id, token: tokenB }),
    push(alice, "migrate", { to: b.id, token: tokenB }),
  ]);
  assert.equal(first.status, "ok", JSON.stringify(first));
  assert.equal(second.response.reason, "migration_pending");
  const logA = await events(a.id);
  assert.equal(logA.filter((e) => e.type === "agent_left").length, 1, "moved once");

  // A connection with no session in the zone: not_joined (a raw frame: the client would not
  // push on a channel it has not joined).
  const other = connect();
  const replied = new Promise((resolve) => {
    other.onMessage((m) => m.ref === "raw-1" && resolve(m.payload));
  });
  await eventually(() => assert.ok(other.isConnected()), "connected");
  other.push({ topic: `zone:${a.id}`, event: "migrate", payload: { to: b.id, token: tokenB }, ref: "raw-1", join_ref: null });
  const raw = await replied;
  assert.equal(raw.status, "error");
  assert.equal(raw.response.reason, "not_joined");
});

test("a ticket is single use, for its agent only", async () => {
  const a = await zone();
  const b = await zone();
  const alice = await joined("alice", a.id);
  const { response } = await migrate(alice, "alice", b.id);
  const ticket = response.ticket;
  // Another agent with alice's ticket, or a forged one.
  const bob = connect().channel(`zone:${b.id}`, { agent_id: "bob", ticket });
  assert.equal((await refusal(bob)).reason, "invalid_ticket");
  const forged = connect().channel(`zone:${b.id}`, { agent_id: "alice", ticket: ticket.slice(0, -2) + "xx" });
  assert.equal((await refusal(forged)).reason, "invalid_ticket");
  // For another zone.
  const c = await zone();
  const elsewhere = connect().channel(`zone:${c.id}`, { agent_id: "alice", ticket });
  assert.equal((await refusal(elsewhere)).reason, "invalid_ticket");
  // Its agent: once.
  await join(connect().channel(`zone:${b.id}`, { agent_id: "alice", ticket }));
  const again = connect().channel(`zone:${b.id}`, { agent_id: "alice", ticket });
  assert.equal((await refusal(again)).reason, "invalid_ticket");
  assert.equal(await count(b.id), 1);
});

test("a migrate retried under the same idempotency key moves the agent once and is told the same ticket", async () => {
  const a = await zone();
  const b = await zone();
  const socket = connect();
  const alice = await joined("alice", a.id, socket);
  const tokenB = await token("alice", b.id);
  const first = await push(alice, "migrate", { to: b.id, token: tokenB, idempotency_key: "move-1" });
  assert.equal(first.status, "ok");
  // Retried on the same connection with a raw frame (the channel on A is closed).
  const replied = new Promise((resolve) => socket.onMessage((m) => m.ref === "retry-1" && resolve(m.payload)));
  socket.push({
    topic: `zone:${a.id}`,
    event: "migrate",
    payload: { to: b.id, token: tokenB, idempotency_key: "move-1" },
    ref: "retry-1",
    join_ref: null,
  });
  const retried = await replied;
  assert.equal(retried.status, "ok", JSON.stringify(retried));
  assert.equal(retried.response.ticket, first.response.ticket);
  assert.equal(retried.response.duplicate, true);
  const logA = await events(a.id);
  assert.equal(logA.filter((e) => e.type === "agent_left").length, 1);
  const logB = await events(b.id);
  assert.equal(logB.filter((e) => e.type === "migration_reserved").length, 1);
  await join(socket.channel(`zone:${b.id}`, { agent_id: "alice", ticket: first.response.ticket }));
});

test("a ticket used after it expired is refused, and the place it held is free again with no event", short, async () => {
  const a = await zone();
  const b = await zone({ capacity: 1 });
  const alice = await joined("alice", a.id);
  const { response } = await migrate(alice, "alice", b.id);
  // The place is held: a plain join is refused.
  const early = connect().channel(`zone:${b.id}`, { agent_id: "bob", token: await token("bob", b.id) });
  assert.equal((await refusal(early)).reason, "zone_full");
  const logged = (await events(b.id)).length;
  await sleep(ticketMs + 200);
  const late = connect().channel(`zone:${b.id}`, { agent_id: "alice", ticket: response.ticket });
  assert.equal((await refusal(late)).reason, "invalid_ticket");
  assert.equal((await events(b.id)).length, logged, "expiry is no event");
  await joined("bob", b.id);
  assert.equal(await count(b.id), 1);
});

test("the admin API moves a service's agent at once: its channel on A is closed as migrated, its session begins in B", async () => {
  const a = await zone();
  const b = await zone();
  const alice = await joined("alice", a.id);
  assert.equal((await push(alice, "agent_move", { position: { x: 7, y: 8, z: 9 } })).status, "ok");
  const watchB = await joined("watcher-b", b.id);
  const entered = next(watchB, "agent_entered", (p) => p.agent_id === "alice");
  const closed = new Promise((resolve) => alice.on("phx_close", resolve));
  const { status, body } = await api("POST", `/api/zones/${a.id}/agents/alice/migrate`, { to: b.id });
  assert.equal(status, 200, JSON.stringify(body));
  assert.equal(body.zone, b.id);
  assert.equal(body.duplicate, false);
  const payload = await entered;
  assert.equal(payload.from, a.id);
  assert.deepEqual(payload.position, { x: 7, y: 8, z: 9 });
  const close = await closed;
  assert.equal(close.reason, "migrated");
  assert.equal(close.to, b.id);
  const agents = (await api("GET", `/api/zones/${b.id}/agents`)).body.agents.map((x) => x.agent_id);
  assert.deepEqual(agents, ["alice", "watcher-b"]);
  assert.equal(await count(a.id), 0);
  // Not in A any more: refused, and nothing changes.
  const again = await api("POST", `/api/zones/${a.id}/agents/alice/migrate`, { to: b.id });
  assert.equal(again.status, 409);
  assert.equal(again.body.error, "not_joined");
  const full = await zone({ capacity: 0 + 1 });
  await joined("carol", full.id);
  const refused = await api("POST", `/api/zones/${b.id}/agents/alice/migrate`, { to: full.id });
  assert.equal(refused.status, 409);
  assert.equal(refused.body.error, "zone_full");
  assert.equal(await count(b.id), 2);
});
