// The official `phoenix` client, unmodified, against a running thunderline daemon.
// Run by `cargo test` (tests/js_client.rs), which starts the daemon and sets
// THUNDERLINE_URL and THUNDERLINE_ADMIN_TOKEN.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { Presence } from "phoenix";
import { adminClient } from "./admin.mjs";
import { closeAll, connect as connectTo, eventually, join, next, push, refusal } from "./channels.mjs";

const base = process.env.THUNDERLINE_URL;
const admin = process.env.THUNDERLINE_ADMIN_TOKEN;
assert.ok(base && admin, "THUNDERLINE_URL and THUNDERLINE_ADMIN_TOKEN must be set");

after(closeAll);

const { api, zone, token } = adminClient(base, admin);
const connect = (opts) => connectTo(base, opts);

test("join ok, and each join error", async () => {
  const z = await zone({ capacity: 1 });
  const socket = connect();
  const alice = socket.channel(`zone:${z.id}`, { agent_id: "alice", token: await token("alice", z.id) });
  const reply = await join(alice);
  assert.equal(reply.zone.id, z.id);
  assert.equal(reply.zone.active_session_count, 1);
  assert.deepEqual(reply.agents, ["alice"]);

  const other = connect();
  const forged = other.channel(`zone:${z.id}`, { agent_id: "bob", token: "not.valid" });
  assert.equal((await refusal(forged)).reason, "unauthorized");
  const full = other.channel(`zone:${z.id}`, { agent_id: "bob", token: await token("bob", z.id) });
  assert.equal((await refusal(full)).reason, "zone_full");
  const elsewhere = other.channel(`zone:${(await zone()).id}`, { agent_id: "bob", token: await token("bob", z.id) });
  assert.equal((await refusal(elsewhere)).reason, "unauthorized", "a token for another zone");
  const doomed = await zone();
  const doomedToken = await token("bob", doomed.id);
  assert.equal((await api("DELETE", `/api/zones/${doomed.id}`)).status, 204);
  const gone = other.channel(`zone:${doomed.id}`, { agent_id: "bob", token: doomedToken });
  assert.equal((await refusal(gone)).reason, "zone_not_found");
});

test("push and reply, broadcasts reach the zone and not other zones", async () => {
  const z = await zone();
  const elsewhere = await zone();
  const s1 = connect();
  const s2 = connect();
  const s3 = connect();
  const alice = s1.channel(`zone:${z.id}`, { agent_id: "alice", token: await token("alice", z.id) });
  const bob = s2.channel(`zone:${z.id}`, { agent_id: "bob", token: await token("bob", z.id) });
  const carol = s3.channel(`zone:${elsewhere.id}`, { agent_id: "carol", token: await token("carol", elsewhere.id) });
  await join(alice);
  await join(bob);
  await join(carol);
  const leaked = [];
  carol.on("agent_moved", (p) => leaked.push(p));
  carol.on("resource_changed", (p) => leaked.push(p));

  const moved = next(bob, "agent_moved", (p) => p.agent_id === "alice");
  assert.deepEqual(await push(alice, "agent_move", { position: { x: 10, y: 5, z: 0 } }), { status: "ok", response: {} });
  // The zone's creation was seq 1, Alice's join 2, Bob's 3: every broadcast carries its place in
  // the zone's history.
  assert.deepEqual(await moved, { agent_id: "alice", position: { x: 10, y: 5, z: 0 }, seq: 4 });

  const changed = next(bob, "resource_changed");
  const r = await push(alice, "consume_resource", { resource_type: "food", amount: 5 });
  assert.deepEqual(r, { status: "ok", response: { new_resources: { food: 95 } } });
  assert.deepEqual(await changed, { agent_id: "alice", changes: { food: -5 }, new_resources: { food: 95 }, seq: 5 });

  const refused = await push(alice, "consume_resource", { resource_type: "food", amount: 1000 });
  assert.equal(refused.status, "error");
  assert.equal(refused.response.reason, "insufficient_resources");
  const state = await push(bob, "get_zone_state", {});
  assert.equal(state.response.zone.resources.food.amount, 95);
  assert.deepEqual(state.response.agents, ["alice", "bob"]);
  await new Promise((r) => setTimeout(r, 200));
  assert.deepEqual(leaked, [], "nothing from another zone");
});

test("Presence.onSync and list follow joins and leaves", async () => {
  const z = await zone();
  const s1 = connect();
  const s2 = connect();
  const alice = s1.channel(`zone:${z.id}`, { agent_id: "alice", token: await token("alice", z.id) });
  const presence = new Presence(alice);
  const seen = () => presence.list((id, { metas }) => `${id}:${metas.length}`).sort();
  await join(alice);
  await eventually(() => assert.deepEqual(seen(), ["alice:1"]), "alice alone");

  const bob = s2.channel(`zone:${z.id}`, { agent_id: "bob", token: await token("bob", z.id) });
  await join(bob);
  await eventually(() => assert.deepEqual(seen(), ["alice:1", "bob:1"]), "bob joined");

  // The same agent on a second connection is a second meta.
  const s3 = connect();
  const bob2 = s3.channel(`zone:${z.id}`, { agent_id: "bob", token: await token("bob", z.id) });
  await join(bob2);
  await eventually(() => assert.deepEqual(seen(), ["alice:1", "bob:2"]), "bob twice");

  await new Promise((resolve) => bob.leave().receive("ok", resolve));
  await eventually(() => assert.deepEqual(seen(), ["alice:1", "bob:1"]), "one bob left");
  s3.disconnect();
  await eventually(() => assert.deepEqual(seen(), ["alice:1"]), "bob disconnected");
  const { body } = await api("GET", `/api/zones/${z.id}`);
  assert.equal(body.active_session_count, 1, "session count follows presence");
});

test("heartbeats keep an idle socket open", async () => {
  const socket = connect({ heartbeatIntervalMs: 100 });
  const replies = [];
  socket.onMessage((m) => {
    if (m.topic === "phoenix") replies.push(m.payload.status);
  });
  let errors = 0;
  socket.onError(() => errors++);
  await new Promise((r) => setTimeout(r, 1000));
  assert.ok(socket.isConnected());
  assert.ok(replies.length >= 5, `heartbeat replies: ${replies.length}`);
  assert.ok(replies.every((s) => s === "ok"));
  assert.equal(errors, 0);
});

test("leave, duplicate join, reconnect and rejoin", async () => {
  const z = await zone();
  const socket = connect();
  const params = { agent_id: "dana", token: await token("dana", z.id) };
  const first = socket.channel(`zone:${z.id}`, params);
  await join(first);
  let firstClosed = false;
  first.onClose(() => (firstClosed = true));
  // A second channel object on the same topic: the old one is closed, the new one joins.
  const second = socket.channel(`zone:${z.id}`, params);
  await join(second);
  await eventually(() => assert.ok(firstClosed), "the first channel closed");
  let { body } = await api("GET", `/api/zones/${z.id}`);
  assert.equal(body.active_session_count, 1);

  // Reconnect: drop the transport; the client reconnects and rejoins, and gets presence again.
  const presence = new Presence(second);
  let syncs = 0;
  presence.onSync(() => syncs++);
  await eventually(() => assert.ok(syncs >= 1), "first sync", 1000).catch(() => {});
  const before = syncs;
  socket.conn.close(4000, "test drop");
  await eventually(() => assert.ok(syncs > before && second.state === "joined"), "rejoined with a fresh presence_state", 5000);
  assert.deepEqual(presence.list((id) => id), ["dana"]);
  await eventually(async () => {
    ({ body } = await api("GET", `/api/zones/${z.id}`));
    assert.equal(body.active_session_count, 1, "the old session left, the new one counts");
  }, "session count after the rejoin");

  await new Promise((resolve) => second.leave().receive("ok", resolve));
  assert.equal(second.state, "closed");
  await eventually(async () => {
    ({ body } = await api("GET", `/api/zones/${z.id}`));
    assert.equal(body.active_session_count, 0);
  }, "no sessions after the leave");
});

test("metrics move as clients work", async () => {
  const scrape = async () => {
    const text = await (await fetch(base + "/metrics")).text();
    const value = (name) => {
      const line = text.split("\n").find((l) => l.startsWith(name + " ") || l.startsWith(name + "{"));
      return line ? Number(line.split(" ").pop()) : 0;
    };
    return {
      pushes: value("thunderline_channel_pushes_total"),
      broadcasts: value("thunderline_channel_broadcasts_total"),
      connections: value("thunderline_socket_connections"),
    };
  };
  const before = await scrape();
  const z = await zone();
  const socket = connect();
  const ch = socket.channel(`zone:${z.id}`, { agent_id: "meter", token: await token("meter", z.id) });
  await join(ch);
  for (let i = 0; i < 5; i++) {
    assert.equal((await push(ch, "agent_move", { position: { x: i, y: 0, z: 0 } })).status, "ok");
  }
  await eventually(async () => {
    const now = await scrape();
    assert.equal(now.pushes - before.pushes, 5);
    assert.ok(now.broadcasts - before.broadcasts >= 6, "agent_entered and five agent_moved");
    assert.ok(now.connections >= 1);
  }, "metrics after five pushes");
});

// `promise`, or a failure naming `what` after `ms`.
function within(promise, what, ms = 3000) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

test("broadcast_event reaches every member with its seq; forbidden without the bit on token or zone; rate_limited past the limit", async () => {
  // spawn_agents, modify_zone, broadcast_events; the default limit: 20 broadcasts a second per zone.
  const z = await zone({ permissions: 0x07 });
  const topic = `zone:${z.id}`;
  const withBit = ["spawn_agents", "broadcast_events"];
  const conns = [connect(), connect(), connect()];
  // Every zone event the first member sees, in order of arrival.
  const annSeqs = [];
  conns[0].onMessage((m) => {
    if (m.topic === topic && m.event !== "phx_reply" && typeof m.payload?.seq === "number") {
      annSeqs.push(m.payload.seq);
    }
  });
  const ann = conns[0].channel(topic, { agent_id: "ann", token: await token("ann", z.id, withBit) });
  const ben = conns[1].channel(topic, { agent_id: "ben", token: await token("ben", z.id, withBit) });
  const cy = conns[2].channel(topic, { agent_id: "cy", token: await token("cy", z.id, ["spawn_agents"]) });
  const members = [ann, ben, cy];
  for (const ch of members) await join(ch);
  // Every storm each member receives.
  const storms = members.map((ch) => {
    const got = [];
    ch.on("storm", (p) => got.push(p));
    return got;
  });

  // A broadcast reaches every member, the sender included, with one seq.
  const payload = { level: 3, tags: ["hail"], nested: { wind: 12.5 } };
  const arrivals = members.map((ch) => within(next(ch, "storm"), "the storm at every member"));
  assert.deepEqual(await push(ann, "broadcast_event", { event_type: "storm", payload }), { status: "ok", response: {} });
  const frames = await Promise.all(arrivals);
  const seq = frames[0].seq;
  assert.equal(typeof seq, "number");
  assert.ok(seq > 4, `after its creation and three joins, seq ${seq}`);
  for (const f of frames) assert.deepEqual(f, { agent_id: "ann", payload, seq });
  await eventually(async () => {
    const { status, body } = await api("GET", `/api/zones/${z.id}/events?limit=1000`);
    assert.equal(status, 200);
    const logged = body.events.find((e) => e.type === "storm");
    assert.ok(logged, "the storm is in the audit log");
    assert.equal(logged.seq, seq);
    assert.deepEqual(logged.payload, { agent_id: "ann", payload });
  }, "the storm audited", 5000);

  // Without the bit on the token.
  let r = await push(cy, "broadcast_event", { event_type: "storm", payload: {} });
  assert.equal(r.status, "error");
  assert.equal(r.response.reason, "forbidden");
  assert.match(r.response.details, /token/);

  // Without the bit on the zone, for an agent whose token holds it, and for the admin API.
  let changed = await api("POST", `/api/zones/${z.id}/permissions`, { revoke: ["broadcast_events"] });
  assert.equal(changed.status, 200, JSON.stringify(changed.body));
  assert.equal(changed.body.permissions, 0x03);
  r = await push(ann, "broadcast_event", { event_type: "storm", payload: {} });
  assert.equal(r.status, "error");
  assert.equal(r.response.reason, "forbidden");
  assert.match(r.response.details, /the zone/);
  const refused = await api("POST", `/api/zones/${z.id}/broadcast`, { event_type: "storm", payload: {} });
  assert.equal(refused.status, 403, JSON.stringify(refused.body));
  assert.equal(refused.body.error, "forbidden");
  changed = await api("POST", `/api/zones/${z.id}/permissions`, { grant: ["broadcast_events"] });
  assert.equal(changed.status, 200, JSON.stringify(changed.body));
  assert.equal(changed.body.permissions, 0x07);

  // 25 at once, from two members: the limit is the zone's. Wait out the window of the first storm.
  await sleep(1100);
  let t0 = Date.now();
  const burst = await Promise.all(
    Array.from({ length: 25 }, (_, i) =>
      push(i % 2 ? ben : ann, "broadcast_event", { event_type: "storm", payload: { burst: i } }),
    ),
  );
  let elapsed = Date.now() - t0;
  const ok = burst.filter((b) => b.status === "ok").length;
  const limited = burst.filter((b) => b.status === "error" && b.response.reason === "rate_limited").length;
  assert.equal(ok + limited, 25, JSON.stringify(burst));
  assert.ok(ok <= 20 * Math.ceil((elapsed + 1) / 1000), `${ok} ok in ${elapsed} ms`);
  if (elapsed < 1000) {
    // Every one was decided within one window.
    assert.equal(ok, 20, `${ok} ok in ${elapsed} ms`);
    assert.equal(limited, 5);
    // The admin API counts against the same limit.
    const late = await api("POST", `/api/zones/${z.id}/broadcast`, { event_type: "storm", payload: {} });
    if (Date.now() - t0 < 1000) {
      assert.equal(late.status, 429, JSON.stringify(late.body));
      assert.equal(late.body.error, "rate_limited");
    }
  } else {
    console.log(`the burst took ${elapsed} ms: only its totals were checked`);
  }
  // Every member gets exactly the accepted ones.
  await eventually(() => {
    for (const got of storms) assert.equal(got.filter((p) => p.payload.burst !== undefined).length, ok);
  }, "the accepted burst at every member");

  // The admin API: delivered with agent_id null and its seq.
  await sleep(1100);
  const notice = { text: "rain soon" };
  const noticed = members.map((ch) => within(next(ch, "weather.notice"), "the admin broadcast at every member"));
  const sent = await api("POST", `/api/zones/${z.id}/broadcast`, { event_type: "weather.notice", payload: notice });
  assert.equal(sent.status, 200, JSON.stringify(sent.body));
  assert.equal(typeof sent.body.seq, "number");
  for (const f of await Promise.all(noticed)) {
    assert.deepEqual(f, { agent_id: null, payload: notice, seq: sent.body.seq });
  }
  const bad = await api("POST", `/api/zones/${z.id}/broadcast`, { event_type: "agent_moved", payload: {} });
  assert.equal(bad.status, 422, JSON.stringify(bad.body));
  assert.equal(bad.body.error, "invalid_payload");
  const unknown = await api("POST", "/api/zones/00000000-0000-7000-8000-000000000000/broadcast", {
    event_type: "storm",
    payload: {},
  });
  assert.equal(unknown.status, 404, JSON.stringify(unknown.body));

  // 25 admin broadcasts at once: past the zone's limit, 429.
  await sleep(1100);
  t0 = Date.now();
  const posted = await Promise.all(
    Array.from({ length: 25 }, (_, i) =>
      api("POST", `/api/zones/${z.id}/broadcast`, { event_type: "storm", payload: { admin: i } }),
    ),
  );
  elapsed = Date.now() - t0;
  const accepted = posted.filter((p) => p.status === 200);
  const tooMany = posted.filter((p) => p.status === 429);
  assert.equal(accepted.length + tooMany.length, 25, JSON.stringify(posted));
  assert.ok(tooMany.every((p) => p.body.error === "rate_limited"));
  assert.ok(accepted.every((p) => typeof p.body.seq === "number"));
  assert.equal(new Set(accepted.map((p) => p.body.seq)).size, accepted.length, "one seq each");
  if (elapsed < 1000) {
    assert.equal(accepted.length, 20, `${accepted.length} accepted in ${elapsed} ms`);
    assert.equal(tooMany.length, 5);
  } else {
    console.log(`the admin burst took ${elapsed} ms: only its totals were checked`);
  }
  await eventually(() => {
    for (const got of storms) {
      assert.equal(got.filter((p) => p.payload.admin !== undefined && p.agent_id === null).length, accepted.length);
    }
  }, "the accepted admin burst at every member");

  // Every payload carries seq: one member sees them strictly increasing.
  assert.ok(annSeqs.length >= 1 + ok + 1 + accepted.length, `seqs seen: ${annSeqs}`);
  for (let i = 1; i < annSeqs.length; i++) {
    assert.ok(annSeqs[i] > annSeqs[i - 1], `seq ${annSeqs[i]} after ${annSeqs[i - 1]}: ${annSeqs}`);
  }
});

// Recovery after a reconnect: a client passes its last seen seq and epoch on every rejoin
// (channel params as a function), and gets exactly what it missed, in order, once.
const ZONE_EVENTS = ["agent_entered", "agent_left", "agent_moved", "agent_interaction", "resource_changed", "environment_tick"];

/// A channel that remembers the last seq it saw, and records every zone event and join reply.
function tracked(socket, topic, agent, tok) {
  const t = { last: null, epoch: null, events: [], replies: [] };
  t.channel = socket.channel(topic, () => ({
    agent_id: agent,
    token: tok,
    ...(t.last === null ? {} : { since: { seq: t.last, epoch: t.epoch } }),
  }));
  for (const event of ZONE_EVENTS) {
    t.channel.on(event, (payload) => {
      t.events.push({ event, ...payload });
      if (t.last === null || payload.seq > t.last) t.last = payload.seq;
    });
  }
  t.join = () =>
    new Promise((resolve, reject) => {
      t.channel
        .join()
        .receive("ok", (reply) => {
          t.replies.push(reply);
          t.epoch = reply.epoch;
          // Recovered: the missed events follow and move `last`. Not: start from the snapshot.
          if (!reply.recovered) t.last = reply.seq;
          resolve(reply);
        })
        .receive("error", (e) => reject(Object.assign(new Error("join refused"), { response: e })));
    });
  return t;
}

test("a client whose transport is cut gets every move it missed once, in order, with recovered: true", async () => {
  const z = await zone();
  const topic = `zone:${z.id}`;
  const observer = tracked(connect(), topic, "olga", await token("olga", z.id));
  await observer.join();
  // Reconnects a second after its transport is cut: the moves happen while it is away.
  const flaky = connect({ reconnectAfterMs: () => 1000 });
  const client = tracked(flaky, topic, "cleo", await token("cleo", z.id));
  const first = await client.join();
  assert.equal(first.recovered, false, "a first join recovers nothing");
  assert.equal(typeof first.seq, "number");
  assert.equal(typeof first.epoch, "string");
  const mover = connect().channel(topic, { agent_id: "mia", token: await token("mia", z.id) });
  await join(mover);
  await eventually(() => assert.ok(client.events.some((e) => e.event === "agent_entered" && e.agent_id === "mia")), "mia seen");

  flaky.conn.close(4000, "test drop");
  await eventually(() => assert.notEqual(client.channel.state, "joined"), "the client noticed the drop");
  const replies = await Promise.all(
    Array.from({ length: 100 }, (_, i) => push(mover, "agent_move", { position: { x: i, y: 0, z: 0 } })),
  );
  assert.ok(replies.every((r) => r.status === "ok"), JSON.stringify(replies.find((r) => r.status !== "ok")));

  const moves = () => client.events.filter((e) => e.event === "agent_moved" && e.agent_id === "mia");
  await eventually(() => assert.equal(moves().length, 100), "every move reached the client", 8000);
  assert.equal(client.replies.length, 2, "one rejoin");
  assert.equal(client.replies[1].recovered, true, JSON.stringify(client.replies[1]));
  assert.equal(client.replies[1].epoch, first.epoch);
  // Each move once, in the order they were applied (their seq order).
  const seqs = moves().map((e) => e.seq);
  assert.equal(new Set(seqs).size, 100, "no move twice");
  assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b), "in order");
  // Every event the client saw, in the order it saw them, strictly increasing except its own
  // rejoin's agent_entered, which comes after what it missed.
  const all = client.events.filter((e) => !(e.event === "agent_entered" && e.agent_id === "cleo"));
  for (let i = 1; i < all.length; i++) assert.ok(all[i].seq > all[i - 1].seq, `seq ${all[i].seq} after ${all[i - 1].seq}`);

  const rejoins = async (outcome) => {
    const text = await (await fetch(base + "/metrics")).text();
    const line = text.split("\n").find((l) => l.startsWith(`thunderline_zone_rejoins_total{outcome="${outcome}"}`));
    return line ? Number(line.split(" ").pop()) : 0;
  };
  assert.ok((await rejoins("recovered")) >= 1, "counted in /metrics");

  // The observer never dropped: it saw every event from its join on, with no gap.
  await eventually(() => assert.equal(observer.events.filter((e) => e.event === "agent_moved").length, 100), "observer saw every move");
  const seen = observer.events.map((e) => e.seq);
  for (let i = 1; i < seen.length; i++) assert.equal(seen[i], seen[i - 1] + 1, `observer: ${seen}`);
});

test("a rejoin with an unknown epoch, or a seq beyond the zone's, gets a fresh snapshot and no replay", async () => {
  const z = await zone();
  const topic = `zone:${z.id}`;
  const mover = connect().channel(topic, { agent_id: "max", token: await token("max", z.id) });
  const joined = await join(mover);
  for (let i = 0; i < 5; i++) assert.equal((await push(mover, "agent_move", { position: { x: i, y: 1, z: 0 } })).status, "ok");

  const cases = [
    ["an unknown epoch", { seq: 0, epoch: "not-an-epoch" }],
    ["a seq beyond the zone's last", { seq: 1_000_000, epoch: joined.epoch }],
  ];
  for (const [what, since] of cases) {
    const socket = connect();
    const agent = `late-${cases.findIndex((c) => c[0] === what)}`;
    const channel = socket.channel(topic, { agent_id: agent, token: await token(agent, z.id), since });
    const seen = [];
    for (const event of ZONE_EVENTS) channel.on(event, (p) => seen.push({ event, ...p }));
    const reply = await join(channel);
    assert.equal(reply.recovered, false, what);
    assert.ok(reply.seq >= joined.seq + 5 + 1, `${what}: the snapshot reflects every move and this join`);
    await eventually(() => assert.ok(seen.some((e) => e.event === "agent_entered" && e.agent_id === agent)), `${what}: own entry`);
    await new Promise((r) => setTimeout(r, 200));
    assert.ok(seen.every((e) => e.seq >= reply.seq), `${what}: nothing old replayed: ${JSON.stringify(seen)}`);
    socket.disconnect();
  }

  // A since of the wrong shape is refused with a reason.
  const bad = connect().channel(topic, { agent_id: "bad", token: await token("bad", z.id), since: { seq: "x" } });
  const e = await refusal(bad);
  assert.equal(e.reason, "invalid_payload");
});

test("the admin API pages a zone's events by seq", async () => {
  const z = await zone();
  const topic = `zone:${z.id}`;
  const mover = connect().channel(topic, { agent_id: "pia", token: await token("pia", z.id) });
  await join(mover);
  for (let i = 0; i < 6; i++) assert.equal((await push(mover, "agent_move", { position: { x: i, y: 2, z: 0 } })).status, "ok");
  await eventually(async () => {
    const { status, body } = await api("GET", `/api/zones/${z.id}/events?after_seq=2&limit=3`);
    assert.equal(status, 200);
    assert.deepEqual(body.events.map((e) => e.seq), [3, 4, 5]);
    assert.equal(body.limit, 3);
    assert.ok(body.total >= 5, JSON.stringify(body));
    assert.ok(body.events.every((e) => e.type === "agent_moved" && e.zone_id === z.id));
  }, "a page of three after seq 2");
});

test("a channel whose token expires, or is revoked, is closed with the reason; a fresh token joins again", async () => {
  const z = await zone();
  const topic = `zone:${z.id}`;
  const { status, body } = await api("POST", "/api/tokens", {
    agent_id: "quin", zone_id: z.id, permissions: ["spawn_agents"], ttl_seconds: 1,
  });
  assert.equal(status, 200, JSON.stringify(body));
  const socket = connect();
  const brief = socket.channel(topic, { agent_id: "quin", token: body.token });
  const expired = new Promise((resolve) => brief.onClose((payload) => resolve(payload)));
  await join(brief);
  assert.equal((await expired).reason, "token_expired");
  assert.equal(brief.state, "closed");
  await eventually(async () => {
    const { body } = await api("GET", `/api/zones/${z.id}`);
    assert.equal(body.active_session_count, 0);
  }, "the expired session left");

  const again = socket.channel(topic, { agent_id: "quin", token: await token("quin", z.id) });
  const revoked = new Promise((resolve) => again.onClose((payload) => resolve(payload)));
  await join(again);
  const answer = await api("POST", "/api/tokens/revoke", { agent_id: "quin", zone_id: z.id });
  assert.equal(answer.status, 200, JSON.stringify(answer.body));
  assert.equal((await revoked).reason, "token_revoked");
  const fresh = socket.channel(topic, { agent_id: "quin", token: await token("quin", z.id) });
  await join(fresh);
  assert.equal(fresh.state, "joined");
});
