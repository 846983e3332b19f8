// The console at `/` in a real browser: Debian's Chromium, headless, driven by Playwright,
// against a running daemon (tests/console.rs starts it and sets THUNDERLINE_URL,
// THUNDERLINE_ADMIN_TOKEN and CONSOLE_SCREENSHOT).
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";
import { Socket } from "phoenix";
import WebSocket from "ws";
import { adminApi } from "./admin.mjs";

const base = process.env.THUNDERLINE_URL;
const admin = process.env.THUNDERLINE_ADMIN_TOKEN;
const screenshot = process.env.CONSOLE_SCREENSHOT;
assert.ok(base && admin && screenshot, "THUNDERLINE_URL, THUNDERLINE_ADMIN_TOKEN and CONSOLE_SCREENSHOT must be set");

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync"],
});
const sockets = [];
after(async () => {
  sockets.forEach((s) => s.disconnect());
  await browser.close();
});

const api = adminApi(base, admin);

async function agent(zoneId, agentId) {
  const { token } = await api("POST", "/api/tokens", { agent_id: agentId, zone_id: zoneId, permissions: ["spawn_agents"], ttl_seconds: 600 });
  const socket = new Socket(base.replace(/^http/, "ws") + "/socket", { transport: WebSocket });
  socket.connect();
  sockets.push(socket);
  const channel = socket.channel(`zone:${zoneId}`, { agent_id: agentId, token });
  await new Promise((resolve, reject) => channel.join().receive("ok", resolve).receive("error", reject));
  const move = (x, y) => new Promise((resolve) => channel.push("agent_move", { position: { x, y, z: 0 } }).receive("ok", resolve).receive("error", resolve));
  return { channel, move };
}

/// Every request the page makes, to check that nothing leaves the daemon's own address.
function watchRequests(page) {
  const urls = [];
  page.on("request", (r) => urls.push(r.url()));
  return urls;
}

test("without the admin token the console shows nothing but the prompt for it", async () => {
  const page = await browser.newPage();
  const urls = watchRequests(page);
  await page.goto(base + "/");
  await page.waitForSelector("#login:not([hidden])");
  assert.equal(await page.isHidden("#app"), true);
  assert.equal(await page.locator("#stages tbody tr").count(), 0);
  assert.equal(await page.locator("#zones tbody tr").count(), 0);
  // A wrong token is refused and still shows nothing.
  await page.fill("#token", "not-the-admin-token-not-the-admin-token");
  await page.click("#login button");
  await page.waitForFunction(() => document.getElementById("login-error").textContent.includes("refused"));
  assert.equal(await page.isHidden("#app"), true);
  assert.ok(urls.every((u) => u.startsWith(base)), `only the daemon is asked: ${urls.filter((u) => !u.startsWith(base))}`);
  await page.close();
});

test("with the token: stage counters and a zone's agents change on the page as traffic flows", async () => {
  const zone = await api("POST", "/api/zones", { name: "Console glade", capacity: 100, permissions: 0x03, resources: { food: { amount: 80, max: 100, regen: 1 } } });
  const page = await browser.newPage({ viewport: { width: 1280, height: 1100 } });
  const urls = watchRequests(page);
  // The token once in the URL: taken, then out of the address bar.
  await page.goto(`${base}/?token=${encodeURIComponent(admin)}`);
  await page.waitForSelector("#app:not([hidden])");
  assert.ok(!page.url().includes("token="), page.url());
  await page.waitForSelector("#stages tbody tr[data-stage='processor']");

  // Traffic: one agent moving all the time.
  const ada = await agent(zone.id, "ada");
  let x = 0;
  let moving = true;
  const traffic = (async () => {
    while (moving) {
      x += 1;
      await ada.move(x, x % 7);
      await new Promise((r) => setTimeout(r, 30));
    }
  })();
  const processorIn = async () => Number((await page.textContent("#stages tr[data-stage='processor'] td:nth-child(3)")).replace("k", "e3"));
  await page.waitForFunction(() => {
    const cell = document.querySelector("#stages tr[data-stage='processor'] td:nth-child(3)");
    return cell && parseFloat(cell.textContent) > 0;
  }, null, { timeout: 10_000 });
  assert.ok((await processorIn()) > 0, "the processor's rate moved");
  // The daemon runs with pipelines/nats.toml: its JetStream source is shown, with its lag.
  await page.waitForFunction(() => document.querySelector("#sources tbody").textContent.startsWith("jetstream"));
  assert.match(await page.textContent("#sources tbody tr"), /^jetstream\d+/);

  // Dead letters agree: the pipeline's box counts what the sources' and the stages' tables count
  // (tests/js_client.rs publishes CONSOLE_DEAD_LETTERS commands the source dead-letters), and
  // every count is a whole number.
  const wanted = Number(process.env.CONSOLE_DEAD_LETTERS ?? 0);
  // The sources' dead-letter columns are found by their headings.
  await page.waitForFunction((wanted) => {
    const heads = [...document.querySelectorAll("#sources thead th")].map((th) => th.textContent);
    const columns = [heads.indexOf("dead letters: refused"), heads.indexOf("dead letters: undecodable")];
    const row = document.querySelector("#sources tbody tr");
    return columns.every((i) => i >= 0) && row && row.cells.length > Math.max(...columns)
      && columns.reduce((n, i) => n + Number(row.cells[i].textContent), 0) >= wanted;
  }, wanted, { timeout: 30_000 });
  const seen = await page.evaluate(() => {
    const heads = [...document.querySelectorAll("#sources thead th")].map((th) => th.textContent);
    const columns = [heads.indexOf("dead letters: refused"), heads.indexOf("dead letters: undecodable")];
    const texts = [...document.querySelectorAll("#graph text")].map((t) => t.textContent);
    return {
      box: texts[texts.indexOf("dead letters") + 1],
      sources: [...document.querySelectorAll("#sources tbody tr")].flatMap((r) => columns.map((i) => r.cells[i].textContent)),
      stages: [...document.querySelectorAll("#stages tbody tr")].map((r) => r.cells[7].textContent),
    };
  });
  const counts = [...seen.sources, ...seen.stages];
  for (const n of counts) assert.match(n, /^\d+$/, `a count is a whole number: ${JSON.stringify(seen)}`);
  const sum = counts.reduce((all, n) => all + Number(n), 0);
  assert.ok(sum >= wanted, JSON.stringify(seen));
  assert.equal(seen.box, `${sum} in all`, JSON.stringify(seen));

  // The zone list, then the zone: its agents change as agents come.
  await page.fill("#zone-q", "console glade");
  await page.click("#zone-search button");
  const row = page.locator(`#zones tr[data-zone='${zone.id}']`);
  await row.waitFor();
  await row.click();
  await page.waitForFunction(() => document.getElementById("agents").textContent.includes("ada ("));
  assert.ok(!(await page.textContent("#agents")).includes("bob"));
  const bob = await agent(zone.id, "bob");
  await bob.move(3, 4);
  await page.waitForFunction(() => document.getElementById("agents").textContent.includes("bob (3, 4, 0)"), null, { timeout: 10_000 });
  await page.waitForFunction(() => document.querySelectorAll("#events li").length > 0);
  const newest = await page.locator("#events li").first().getAttribute("value");
  assert.ok(Number(newest) > 1, `events carry their seq: ${newest}`);
  // The zone's interest radius is shown, and follows a change.
  await page.waitForFunction(() => document.getElementById("zone-title").textContent.includes("every move to everyone"));
  await api("PATCH", `/api/zones/${zone.id}`, { interest_radius: 25 });
  await page.waitForFunction(() => document.getElementById("zone-title").textContent.includes("interest radius 25"), null, { timeout: 10_000 });
  await page.click("#zone-search button");
  await page.waitForFunction((id) => document.querySelector(`#zones tr[data-zone='${id}']`)?.cells[3].textContent === "25", zone.id, { timeout: 10_000 });

  // Under traffic it draws at most twice a second.
  const draws = async () => Number(await page.evaluate(() => document.body.dataset.draws ?? 0));
  const before = await draws();
  await page.waitForTimeout(3000);
  const drawn = (await draws()) - before;
  assert.ok(drawn >= 1 && drawn <= 7, `${drawn} draws in 3 s`);

  moving = false;
  await traffic;
  await page.waitForTimeout(600);
  await page.screenshot({ path: screenshot, fullPage: true });
  assert.ok(urls.every((u) => u.startsWith(base) || u.startsWith(base.replace(/^http/, "ws"))), `only the daemon is asked: ${urls.filter((u) => !u.startsWith(base))}`);
  await page.close();
});

test("the zone list is paged and searchable", async () => {
  await Promise.all(Array.from({ length: 45 }, (_, i) => api("POST", "/api/zones", { name: `Bulk ${i}`, permissions: 0x03 })));
  const page = await browser.newPage();
  await page.goto(`${base}/?token=${encodeURIComponent(admin)}`);
  await page.waitForSelector("#app:not([hidden])");
  await page.fill("#zone-q", "bulk");
  await page.click("#zone-search button");
  await page.waitForFunction(() => document.getElementById("page-info").textContent.includes("1–20 of 45"));
  assert.equal(await page.locator("#zones tbody tr").count(), 20);
  await page.click("#next");
  await page.waitForFunction(() => document.getElementById("page-info").textContent.includes("21–40 of 45"));
  await page.click("#next");
  await page.waitForFunction(() => document.getElementById("page-info").textContent.includes("41–45 of 45"));
  assert.equal(await page.locator("#zones tbody tr").count(), 5);
  assert.equal(await page.isDisabled("#next"), true);
  await page.close();
});
