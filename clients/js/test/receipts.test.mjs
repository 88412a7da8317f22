// Delivery receipts through the SDK: on a channel whose namespace has `receipts`, the client
// acknowledges each publication once the app's listeners have returned (or when the app says
// so, with manualAck), also after a reconnect, and Control.Receipt counts it for a
// publication made with `receipt`.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import WebSocket from "ws";

import { Client } from "../dist/index.js";
import { control, next, startSidecast, token, until } from "./helpers.mjs";

let node;
let backend;

before(async () => {
  node = await startSidecast({
    file: '[namespaces.r]\nhistory_size = 100\nhistory_ttl = "5m"\npublic = true\nreceipts = true\nreceipt_timeout = "30s"\n',
  });
  backend = control(node.grpc);
});

after(async () => {
  backend?.close();
  await node?.kill();
});

const fast = { minDelay: 20, maxDelay: 100, drainSpread: 100 };

test("a publication is acknowledged once its listeners return, and the backend sees it", async () => {
  const client = new Client({ url: node.url, token: token("ada"), WebSocket, backoff: fast });
  client.connect();
  const room = client.subscribe("r:auto");
  await next(room, "subscribed");
  const handled = [];
  room.on("publication", (p) => handled.push(p.offset));
  const { offset } = await backend.publish("r:auto", { text: "hi" }, { receipt: true });
  await until("handled", () => handled.length === 1);
  await until("acknowledged", async () => (await backend.receipt("r:auto", offset)).acknowledged === 1);
  const receipt = await backend.receipt("r:auto", offset);
  assert.equal(receipt.delivered, 1);
  assert.deepEqual(receipt.missing_users, []);
  client.disconnect();
});

test("with manualAck nothing is acknowledged until the app says so", async () => {
  const client = new Client({ url: node.url, token: token("ben"), WebSocket, backoff: fast });
  client.connect();
  const room = client.subscribe("r:manual", { manualAck: true });
  await next(room, "subscribed");
  const first = await backend.publish("r:manual", { n: 1 }, { receipt: true });
  const second = await backend.publish("r:manual", { n: 2 }, { receipt: true });
  await until("both delivered", () => room.position?.offset === second.offset);
  // A round trip: anything the client sent before it has been handled.
  await client.presenceStats("r:manual").catch(() => {});
  assert.equal((await backend.receipt("r:manual", first.offset)).acknowledged, 0);
  assert.deepEqual((await backend.receipt("r:manual", first.offset)).missing_users, ["ben"]);
  // One cumulative acknowledgement covers both.
  room.ack();
  await until("acknowledged", async () => (await backend.receipt("r:manual", second.offset)).acknowledged === 1);
  assert.equal((await backend.receipt("r:manual", first.offset)).acknowledged, 1);
  client.disconnect();
});

test("publications made while it reconnects are acknowledged, recovered or live", async () => {
  // A node tallies what it delivers: another reader stays while cal reconnects.
  const other = new Client({ url: node.url, token: token("dot"), WebSocket, backoff: fast });
  other.connect();
  await next(other.subscribe("r:away"), "subscribed");
  const client = new Client({ url: node.url, token: token("cal"), WebSocket, backoff: fast });
  client.connect();
  const room = client.subscribe("r:away");
  await next(room, "subscribed");
  const handled = [];
  room.on("publication", (p) => handled.push(p.data.n));
  // The connection drops (4006, reconnect) while the backend publishes on.
  const resumed = next(room, "subscribed", (e) => e.resumed);
  await backend.disconnect("cal", 4006);
  const offsets = [];
  for (let n = 1; n <= 3; n++) offsets.push((await backend.publish("r:away", { n }, { receipt: true })).offset);
  await resumed;
  await until("all three", () => handled.length === 3);
  for (const offset of offsets) {
    await until(`offset ${offset} acknowledged`, async () => (await backend.receipt("r:away", offset)).acknowledged === 2);
  }
  client.disconnect();
  other.disconnect();
});
