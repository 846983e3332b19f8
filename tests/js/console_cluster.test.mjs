// The console of a node of a cluster, in a real browser (Debian's Chromium, headless, driven by
// Playwright): the nodes, alive, with what each carries, and each zone's owner. Run by
// `cargo test` (tests/js_client.rs), which starts two nodes and sets THUNDERLINE_URL (node A),
// THUNDERLINE_URL_B and THUNDERLINE_ADMIN_TOKEN.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";
import { adminApi } from "./admin.mjs";

const base = process.env.THUNDERLINE_URL;
const admin = process.env.THUNDERLINE_ADMIN_TOKEN;
assert.ok(base && admin, "THUNDERLINE_URL and THUNDERLINE_ADMIN_TOKEN must be set");
const api = adminApi(base, admin);

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync"],
});
after(() => browser.close());

test("the console shows the cluster's nodes and each zone's owner", async () => {
  const zone = await api("POST", "/api/zones", { name: "console-owned", capacity: 10 });
  const owner = (await api("GET", `/api/zones/${zone.id}`)).assigned_server;
  assert.ok(["a", "b"].includes(owner), owner);

  const page = await browser.newPage();
  await page.goto(`${base}/?token=${encodeURIComponent(admin)}`);
  await page.waitForSelector("#cluster-section:not([hidden])");
  // Both nodes, alive, each with its incarnation and figures.
  await page.waitForFunction(() => {
    const rows = [...document.querySelectorAll("#nodes tbody tr")];
    const names = rows.map((r) => r.dataset.node).sort();
    return names.join(",") === "a,b" && rows.every((r) => r.cells[1].textContent === "yes");
  });
  const cells = await page.$$eval("#nodes tbody tr", (rows) => rows.map((r) => [...r.cells].map((c) => c.textContent)));
  for (const row of cells) {
    assert.match(row[2], /^[0-9a-f]{12}$/, `incarnation: ${row}`);
    assert.match(row[3], /^\d+$/, `zones owned: ${row}`);
    assert.match(row[4], /^\d+$/, `connections: ${row}`);
    assert.match(row[5], /^\d+\.\d$/, `forwarded/s: ${row}`);
  }
  // The owner's row counts the zone, and the zone's row names its owner.
  await page.waitForFunction(
    ([name, id]) => {
      const row = document.querySelector(`#zones tr[data-zone="${id}"]`);
      const node = document.querySelector(`#nodes tr[data-node="${name}"]`);
      return row?.cells[1].textContent === name && Number(node?.cells[3].textContent) >= 1;
    },
    [owner, zone.id],
  );
  await page.close();
});
