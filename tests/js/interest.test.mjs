// Interest management through the official phoenix client: in a zone with an interest_radius,
// each agent hears only the moves within the radius, and is told when another agent comes into
// or goes out of its view. Run by tests/js_client.rs, which sets THUNDERLINE_URL and
// THUNDERLINE_ADMIN_TOKEN.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { adminClient } from "./admin.mjs";
import { closeAll, connect as connectTo, eventually, join, next, push } from "./channels.mjs";

const base = process.env.THUNDERLINE_URL;
const admin = process.env.THUNDERLINE_ADMIN_TOKEN;
assert.ok(base && admin, "THUNDERLINE_URL and THUNDERLINE_ADMIN_TOKEN must be set");

after(closeAll);

const { api, zone, token } = adminClient(base, admin);
const connect = () => connectTo(base);

/// What a session hears of movement, in order.
const MOVEMENT = ["agent_moved", "agent_entered_view", "agent_left_view", "agent_interaction"];

/// `agent` joined to `zoneId` on a socket of its own, recording what it hears of movement as
/// short strings: `moved b 6`, `entered b 6`, `left b`, `interaction a`.
async function member(agent, zoneId) {
  const channel = connect().channel(`zone:${zoneId}`, { agent_id: agent, token: await token(agent, zoneId) });
  const heard = [];
  for (const event of MOVEMENT) {
    channel.on(event, (p) => {
      const what = event.replace("agent_", "").replace("_view", "");
      heard.push(p.position ? `${what} ${p.agent_id} ${p.position.x}` : `${what} ${p.agent_id}`);
      if (event === "agent_moved") assert.equal(typeof p.seq, "number");
    });
  }
  const marks = [];
  channel.on("mark", (p) => marks.push(p.payload.n));
  const reply = await join(channel);
  return { agent, channel, heard, marks, reply, take: () => heard.splice(0) };
}

/// Waits until every member has heard mark `n` (a broadcast to the whole zone): everything the
/// zone did before it has reached them, in seq order.
let markNo = 0;
async function settle(zoneId, members) {
  const n = ++markNo;
  const { status } = await api("POST", `/api/zones/${zoneId}/broadcast`, { event_type: "mark", payload: { n } });
  assert.ok(status >= 200 && status < 300, `the mark was refused: ${status}`);
  await eventually(() => members.forEach((m) => assert.ok(m.marks.includes(n), `${m.agent} heard mark ${n}`)), "the mark everywhere");
}

async function move(m, x) {
  const r = await push(m.channel, "agent_move", { position: { x, y: 0, z: 0 } });
  assert.equal(r.status, "ok", JSON.stringify(r));
}

test("agents on a line: moves reach only the agents within the radius, views open and close both ways", async () => {
  const z = await zone({ interest_radius: 10, permissions: 0x07 });
  assert.equal(z.interest_radius, 10);
  const [a, b, c, d] = [await member("a", z.id), await member("b", z.id), await member("c", z.id), await member("d", z.id)];
  const all = [a, b, c, d];
  // No position yet: nobody in view.
  for (const m of all) assert.deepEqual(m.reply.in_view, [], `${m.agent}'s in_view`);

  await move(a, 0); // nobody else placed: a hears only itself
  await move(b, 6); // a and b, 6 apart, see each other
  await move(c, 12); // c and b 6 apart; c and a 12 apart
  await move(d, 30); // alone
  await settle(z.id, all);
  assert.deepEqual(a.take(), ["moved a 0", "entered b 6", "moved b 6"]);
  assert.deepEqual(b.take(), ["entered a 0", "moved b 6", "entered c 12", "moved c 12"]);
  assert.deepEqual(c.take(), ["entered b 6", "moved c 12"]);
  assert.deepEqual(d.take(), ["moved d 30"]);

  await move(c, 16); // b and c exactly 10 apart: still in view
  await move(c, 16.5); // 10.5: out of view both ways
  await move(d, 25); // d and c 8.5 apart: into view both ways
  await settle(z.id, all);
  assert.deepEqual(a.take(), []);
  assert.deepEqual(b.take(), ["moved c 16", "left c"]);
  assert.deepEqual(c.take(), ["moved c 16", "left b", "moved c 16.5", "entered d 25", "moved d 25"]);
  assert.deepEqual(d.take(), ["entered c 16.5", "moved d 25"]);

  // An interaction reaches the actor, the target, and the agents within the radius of the actor.
  const r = await push(a.channel, "agent_interact", { target_agent_id: "d", kind: "wave" });
  assert.equal(r.status, "ok", JSON.stringify(r));
  await settle(z.id, all);
  assert.deepEqual(a.take(), ["interaction a"]);
  assert.deepEqual(b.take(), ["interaction a"]);
  assert.deepEqual(c.take(), []);
  assert.deepEqual(d.take(), ["interaction a"]);

  // Zone-wide events still reach everyone.
  const entered = all.map((m) => next(m.channel, "agent_entered", (p) => p.agent_id === "e"));
  const e = await member("e", z.id);
  assert.deepEqual(e.reply.in_view, [], "a new agent has no position: nothing in view");
  await Promise.all(entered);

  // A rejoin takes the agent's last position again: its join reply shows its view, and the
  // agents within its radius are told it came into view.
  const aLeft = all.filter((m) => m !== a).map((m) => next(m.channel, "agent_left", (p) => p.agent_id === "a"));
  await new Promise((resolve) => a.channel.leave().receive("ok", resolve));
  await Promise.all(aLeft);
  const again = await member("a", z.id);
  assert.deepEqual(again.reply.in_view, [{ agent_id: "b", position: { x: 6, y: 0, z: 0 } }]);
  await settle(z.id, [again, b, c, d, e]);
  assert.deepEqual(b.take(), ["entered a 0"], "b sees a again; leaving needed no agent_left_view");
  assert.deepEqual(c.take(), []);
  assert.deepEqual(d.take(), []);
  assert.deepEqual(again.take(), []);
  await move(again, 1);
  await settle(z.id, [again, b, c, d, e]);
  assert.deepEqual(again.take(), ["moved a 1"]);
  assert.deepEqual(b.take(), ["moved a 1"]);
  assert.deepEqual(e.take(), [], "no position: hears no moves");
});

test("changing the radius recomputes every view at once; bad radii are refused and change nothing", async () => {
  const z = await zone({ interest_radius: 10, permissions: 0x07 });
  const [a, b, c, d] = [await member("a", z.id), await member("b", z.id), await member("c", z.id), await member("d", z.id)];
  const all = [a, b, c, d];
  await move(a, 0);
  await move(b, 6);
  await move(c, 16.5);
  await move(d, 25);
  await settle(z.id, all);
  all.forEach((m) => m.take());

  for (const bad of [0, -1, "5", true, {}]) {
    const { status, body } = await api("PATCH", `/api/zones/${z.id}`, { interest_radius: bad });
    assert.ok(status >= 400 && status < 500, `${JSON.stringify(bad)}: ${status}`);
    assert.equal(typeof body.error, "string", JSON.stringify(body));
    assert.ok("details" in body, JSON.stringify(body));
  }
  assert.equal((await api("GET", `/api/zones/${z.id}`)).body.interest_radius, 10);
  for (const bad of [0, -2, "ten"]) {
    const created = await api("POST", "/api/zones", { name: "bad radius", interest_radius: bad });
    assert.ok(created.status >= 400 && created.status < 500, `create with ${JSON.stringify(bad)}: ${created.status}`);
    assert.equal(typeof created.body.error, "string");
  }

  // 20: a–c (16.5), b–c (10.5) and b–d (19) come into view.
  const updated = next(a.channel, "zone_updated");
  const { status, body } = await api("PATCH", `/api/zones/${z.id}`, { interest_radius: 20 });
  assert.equal(status, 200, JSON.stringify(body));
  assert.equal(body.interest_radius, 20);
  assert.equal((await updated).interest_radius, 20);
  await settle(z.id, all);
  assert.deepEqual(a.take(), ["entered c 16.5"]);
  assert.deepEqual(b.take(), ["entered c 16.5", "entered d 25"]);
  assert.deepEqual(c.take(), ["entered a 0", "entered b 6"]);
  assert.deepEqual(d.take(), ["entered b 6"]);

  // null: every move to everyone again, so a and d see each other too.
  assert.equal((await api("PATCH", `/api/zones/${z.id}`, { interest_radius: null })).body.interest_radius, null);
  await settle(z.id, all);
  assert.deepEqual(a.take(), ["entered d 25"]);
  assert.deepEqual(d.take(), ["entered a 0"]);
  await move(a, 0.5);
  await settle(z.id, all);
  for (const m of all) assert.deepEqual(m.take().filter((h) => h.startsWith("moved")), ["moved a 0.5"], m.agent);

  // 5: only c–d (8.5)? no: nobody is within 5 of anyone.
  await api("PATCH", `/api/zones/${z.id}`, { interest_radius: 5 });
  await settle(z.id, all);
  assert.deepEqual(a.take(), ["left b", "left c", "left d"]);
  assert.deepEqual(b.take(), ["left a", "left c", "left d"]);
  assert.deepEqual(c.take(), ["left a", "left b", "left d"]);
  assert.deepEqual(d.take(), ["left a", "left b", "left c"]);

  // The changes are in the zone's log.
  const { body: log } = await api("GET", `/api/zones/${z.id}/events?limit=1000`);
  const radii = log.events.filter((e) => e.type === "zone_updated").map((e) => e.payload.interest_radius);
  assert.deepEqual(radii, [20, null, 5]);
});

test("a zone without a radius is unchanged: every move to everyone, no view events, no in_view", async () => {
  const z = await zone({ permissions: 0x07 });
  assert.equal(z.interest_radius, null);
  const [a, b, far] = [await member("a", z.id), await member("b", z.id), await member("far", z.id)];
  for (const m of [a, b, far]) assert.equal(m.reply.in_view, undefined);
  await move(a, 0);
  await move(far, 1000);
  await move(b, 3);
  await settle(z.id, [a, b, far]);
  for (const m of [a, b, far]) assert.deepEqual(m.take(), ["moved a 0", "moved far 1000", "moved b 3"], m.agent);
});

test("a rejoin with since recovers only what its client would have received", async () => {
  const z = await zone({ interest_radius: 10, permissions: 0x07 });
  const topic = `zone:${z.id}`;
  // x's steady session, y near it, far away from both.
  const [x, y, far] = [await member("x", z.id), await member("y", z.id), await member("far", z.id)];
  await move(x, 0);
  await move(y, 5);
  await move(far, 100);

  // x's second connection tracks the last seq it saw, drops, and rejoins a second later.
  const flaky = connectTo(base, { reconnectAfterMs: () => 1000 });
  const tok = await token("x", z.id);
  const t = { last: null, epoch: null, heard: [], replies: [] };
  const channel = flaky.channel(topic, () => ({ agent_id: "x", token: tok, ...(t.last === null ? {} : { since: { seq: t.last, epoch: t.epoch } }) }));
  for (const event of MOVEMENT) {
    channel.on(event, (p) => {
      if (p.seq !== undefined && (t.last === null || p.seq > t.last)) t.last = p.seq;
      const what = event.replace("agent_", "").replace("_view", "");
      t.heard.push(p.position ? `${what} ${p.agent_id} ${p.position.x}` : `${what} ${p.agent_id}`);
    });
  }
  for (const event of ["agent_entered", "agent_left", "mark"]) {
    channel.on(event, (p) => {
      if (t.last === null || p.seq > t.last) t.last = p.seq;
    });
  }
  await new Promise((resolve, reject) =>
    channel
      .join()
      .receive("ok", (reply) => {
        t.replies.push(reply);
        t.epoch = reply.epoch;
        if (!reply.recovered) t.last = reply.seq;
        resolve();
      })
      .receive("error", reject),
  );
  assert.deepEqual(t.replies[0].in_view, [{ agent_id: "y", position: { x: 5, y: 0, z: 0 } }]);
  await settle(z.id, [x, y, far]);
  x.take();

  flaky.conn.close(4000, "test drop");
  await eventually(() => assert.notEqual(channel.state, "joined"), "the drop noticed");
  await move(y, 6); // near x: x hears it
  await move(far, 50); // far from x: x does not
  await move(far, 8); // into x's view
  await eventually(() => assert.equal(t.replies.length, 2), "the rejoin", 8000);
  assert.equal(t.replies[1].recovered, true, JSON.stringify(t.replies[1]));
  await settle(z.id, [x, y, far]);
  // The steady session heard exactly this; the rejoined one got the same back, and no more.
  const heardSteady = ["moved y 6", "entered far 8", "moved far 8"];
  assert.deepEqual(x.take(), heardSteady);
  assert.deepEqual(t.heard, heardSteady, "recovered: what x's sessions were sent while it was away");
});
