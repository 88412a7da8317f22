// docs/recipes.md against a real node with the recipes' configuration: live cursors,
// typing indicators, read positions (kept by the backend from its publish events), delivery
// receipts and a live dashboard, each with @sidecast/client in the page and @sidecast/server in the backend.

import assert from "node:assert/strict";
import { test } from "node:test";

import { mintToken } from "../dist/index.js";
import { Recorder, SECRET, client, next, nodeForTests, until } from "./support.mjs";

const FILE = `
[namespaces.cursors]
allow_client_publish = true
slow_consumer = "conflate"
conflate_by = "user"

[namespaces.typing]
allow_client_publish = true
slow_consumer = "conflate"
conflate_by = "user"

[namespaces.reads]
allow_client_publish = true
slow_consumer = "conflate"
conflate_by = "user"

[namespaces.dash]
history_size = 1
history_ttl = "1h"

[namespaces.orders]
history_size = 100
history_ttl = "1h"
receipts = true
receipt_timeout = "1s"
trace_ids = true
`;
const CHANNELS = ["cursors:*", "typing:*", "reads:*", "dash:*", "orders:*"];

const ctx = nodeForTests(FILE);

async function connected(user) {
  const token = await mintToken({ user, channels: CHANNELS, secret: SECRET });
  const c = client(ctx.node.url, { token });
  const up = next(c, "connected");
  c.connect();
  await up;
  return c;
}

async function subscribed(c, channel, options) {
  const sub = c.subscribe(channel, options);
  await next(sub, "subscribed");
  return sub;
}

test("live cursors: every move of the others, in order, with who moved", async () => {
  const [ann, bob] = [await connected("ann"), await connected("bob")];
  const cursors = await subscribed(bob, "cursors:doc1");
  await subscribed(ann, "cursors:doc1");
  const moves = [];
  cursors.on("publication", ({ data }) => moves.push(data));
  const last = next(cursors, "publication", ({ data }) => data.x === 30);
  for (let x = 1; x <= 30; x++) await ann.publish("cursors:doc1", { user: "ann", x, y: 2 * x });
  await last;
  assert.deepEqual(moves.map((m) => [m.user, m.x]), Array.from({ length: 30 }, (_, i) => ["ann", i + 1]));
});

test("typing indicators: started, then stopped", async () => {
  const [ann, bob] = [await connected("ann"), await connected("bob")];
  const typing = await subscribed(bob, "typing:room1");
  await subscribed(ann, "typing:room1");
  const started = next(typing, "publication");
  await ann.publish("typing:room1", { user: "ann", typing: true });
  assert.deepEqual((await started).data, { user: "ann", typing: true });
  const stopped = next(typing, "publication");
  await ann.publish("typing:room1", { user: "ann", typing: false });
  assert.deepEqual((await stopped).data, { user: "ann", typing: false });
});

test("read positions: the others see them, the backend keeps them with the verified user", async () => {
  const saved = new Recorder();
  const joined = new Recorder();
  const consumer = ctx.sidecast.consume({
    group: "reads",
    kinds: ["publish"],
    onJoined: (j) => joined.push(j),
    onEvent: async (event) => {
      if (event.kind === "publish" && event.channel.startsWith("reads:")) saved.push([event.user, event.data.upTo]);
    },
  });
  try {
    await joined.find("the consumer's join", () => true);
    const [ann, bob] = [await connected("ann"), await connected("bob")];
    const reads = await subscribed(bob, "reads:room1");
    await subscribed(ann, "reads:room1");
    const seen = next(reads, "publication");
    await ann.publish("reads:room1", { user: "ann", upTo: 42 });
    assert.deepEqual((await seen).data, { user: "ann", upTo: 42 });
    assert.deepEqual(await saved.find("the saved position", () => true), ["ann", 42]);
  } finally {
    await consumer.stop();
  }
});

test("delivery receipts: the backend learns who handled an update, and who did not", async () => {
  const [ann, bob] = [await connected("ann"), await connected("bob")];
  const shown = [];
  const orders = await subscribed(ann, "orders:7");
  orders.on("publication", ({ data }) => shown.push(data.status));
  // bob's page receives but never gets to handle it: its acknowledgement is never sent.
  await subscribed(bob, "orders:7", { manualAck: true });
  const { offset } = await ctx.sidecast.publish("orders:7", { status: "shipped" }, { receipt: true });
  await until("ann's page shows it", () => shown.length === 1);
  let receipt;
  await until("the deadline", async () => (receipt = await ctx.sidecast.receipt("orders:7", offset)).complete);
  assert.equal(receipt.delivered, 2);
  assert.equal(receipt.acknowledged, 1);
  assert.deepEqual(receipt.missingUsers, ["bob"]);
});

test("a traced update: the page and the receipt carry the backend's trace id", async () => {
  const ann = await connected("ann");
  const traces = [];
  const orders = await subscribed(ann, "orders:8");
  orders.on("publication", ({ trace }) => traces.push(trace));
  const traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
  const published = await ctx.sidecast.publish("orders:8", { status: "packed" }, { receipt: true, traceparent });
  assert.equal(published.traceId, "4bf92f3577b34da6a3ce929d0e0e4736");
  await until("ann's page shows it", () => traces.length === 1);
  assert.deepEqual(traces, ["4bf92f3577b34da6a3ce929d0e0e4736"]);
  const receipt = await ctx.sidecast.receipt("orders:8", published.offset);
  assert.equal(receipt.traceId, "4bf92f3577b34da6a3ce929d0e0e4736");
  assert.equal(receipt.delivered, 1);
});

test("a live dashboard: the latest figures on load, then every update", async () => {
  await ctx.sidecast.publish("dash:sales", { total: 100 });
  await ctx.sidecast.publish("dash:sales", { total: 120 });
  const page = await connected("viewer");
  const sales = await subscribed(page, "dash:sales");
  const { publications } = await page.history("dash:sales", { limit: 1, reverse: true });
  assert.deepEqual(publications.map((p) => p.data), [{ total: 120 }], "the latest on load");
  const update = next(sales, "publication");
  await ctx.sidecast.publish("dash:sales", { total: 150 });
  assert.deepEqual((await update).data, { total: 150 });
});
