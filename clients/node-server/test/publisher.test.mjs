// The publisher over Control.PublishStream against a real sidecast: order, answers by id,
// refusals that do not end the stream, close, and a stalled or killed node that never
// leaves a publish() hanging.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { Sidecast, SidecastError, mintToken } from "../dist/index.js";
import { PATIENCE, SECRET, client, closeAll, next, startSidecast, until } from "./support.mjs";

const FILE = `
[namespaces.chat]
public = true
history_size = 1000
history_ttl = "5m"
`;

let node;
let sidecast;

before(async () => {
  node = await startSidecast({ file: FILE });
  sidecast = new Sidecast({ address: node.grpc, timeout: 2000 });
});

after(async () => {
  closeAll();
  sidecast.close();
  await node.kill();
});

async function subscribed(channel) {
  const c = client(node.url, { token: await mintToken({ user: "ann", secret: SECRET }) });
  c.connect();
  const sub = c.subscribe(channel);
  await next(sub, "subscribed");
  const got = [];
  sub.on("publication", (p) => got.push(p.data));
  return got;
}

test("publications written without waiting are published in order and answered each with its own result", async () => {
  const got = await subscribed("chat:order");
  const publisher = sidecast.publisher();
  const results = await Promise.all(Array.from({ length: 300 }, (_, i) => publisher.publish("chat:order", { i })));
  assert.deepEqual(
    results.map((r) => r.offset),
    Array.from({ length: 300 }, (_, i) => i + 1),
  );
  assert.ok(results.every((r) => r.delivered === 1 && r.epoch === results[0].epoch));
  await until("all 300 delivered", () => got.length === 300);
  assert.deepEqual(
    got.map((d) => d.i),
    Array.from({ length: 300 }, (_, i) => i),
  );
  // A retry with the same idempotency key answers the first result and publishes nothing.
  const first = await publisher.publish("chat:order", "once", { idempotencyKey: "k1" });
  const again = await publisher.publish("chat:order", "once", { idempotencyKey: "k1" });
  assert.deepEqual({ offset: again.offset, epoch: again.epoch }, { offset: first.offset, epoch: first.epoch });
  await publisher.close();
  assert.equal(publisher.inFlight, 0);
});

test("a refused publication rejects with its code and the stream goes on", async () => {
  const publisher = sidecast.publisher();
  const refused = publisher.publish("chat:refused", new TextEncoder().encode("not json"));
  const bad = publisher.publish("chat:has space", 1);
  const fine = publisher.publish("chat:refused", { ok: true });
  await assert.rejects(refused, (e) => e instanceof SidecastError && e.code === "INVALID_ARGUMENT" && /JSON/i.test(e.message));
  await assert.rejects(bad, (e) => e instanceof SidecastError && e.code === "INVALID_ARGUMENT");
  assert.equal((await fine).offset, 1);
  await publisher.close();
});

test("close() waits for every answer; publish() after it rejects", async () => {
  const publisher = sidecast.publisher({ maxInFlight: 8 });
  const pending = Array.from({ length: 50 }, (_, i) => publisher.publish("chat:close", i));
  assert.ok(publisher.inFlight <= 8);
  await publisher.close();
  const results = await Promise.all(pending);
  assert.equal(results.at(-1).offset, 50);
  await assert.rejects(publisher.publish("chat:close", 51), (e) => e.code === "FAILED_PRECONDITION");
});

test("a stalled node: the unanswered publication rejects at the timeout, and the next one opens a new stream", async () => {
  const publisher = sidecast.publisher({ timeout: 500 });
  assert.equal((await publisher.publish("chat:stall", "before")).offset, 1);
  node.signal("SIGSTOP");
  // The stop takes effect a moment after the signal: wait until a call really goes unanswered.
  const quick = new Sidecast({ address: node.grpc, timeout: 200 });
  try {
    await until("the node to stall", () => quick.info().then(() => false, () => true));
    const started = Date.now();
    await assert.rejects(
      publisher.publish("chat:stall", "during", { idempotencyKey: "during" }),
      (e) => e.code === "DEADLINE_EXCEEDED" && /retry with the same idempotency key/.test(e.message),
    );
    assert.ok(Date.now() - started < PATIENCE, "the timeout ended the wait");
  } finally {
    node.signal("SIGCONT");
    quick.close();
  }
  // The retry with the same key publishes once, whether or not the stalled request made it.
  const retried = await publisher.publish("chat:stall", "during", { idempotencyKey: "during" });
  assert.equal(retried.offset, 2);
  assert.equal((await publisher.publish("chat:stall", "after")).offset, 3);
  await publisher.close();
});

test("a killed node: what was unanswered rejects; after a restart the publisher carries on", async () => {
  const publisher = sidecast.publisher({ timeout: 3000 });
  assert.equal((await publisher.publish("chat:kill", "before")).offset, 1);
  await node.kill();
  // UNAVAILABLE when the stream's end is seen first; DEADLINE_EXCEEDED when the request
  // went to a new stream that waits for the node.
  await assert.rejects(publisher.publish("chat:kill", "lost"), (e) => ["UNAVAILABLE", "DEADLINE_EXCEEDED"].includes(e.code));
  await node.start();
  await until("the control API answers again", () => sidecast.info().then(() => true, () => false));
  // The memory engine starts every channel anew after a restart.
  const result = await publisher.publish("chat:kill", "after");
  assert.equal(result.offset, 1);
  await publisher.close();
});
