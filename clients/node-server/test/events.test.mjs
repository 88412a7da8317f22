// The event consumer against a real sidecast: events handed over in order and acknowledged
// after the handler, retries of a failing handler, client rpc answered by the handler's
// return value, a clean leave, and a new join after sidecast restarts.

import assert from "node:assert/strict";
import { after, test } from "node:test";

import { RpcError, Sidecast, mintToken } from "../dist/index.js";
import { Recorder, SECRET, client, closeAll, next, startSidecast } from "./support.mjs";

const FILE = `
[namespaces.room]
public = true
allow_client_publish = true
`;

after(closeAll);

async function connected(node, user) {
  const c = client(node.url, { token: await mintToken({ user, secret: SECRET, meta: { plan: "pro" } }) });
  const event = next(c, "connected");
  c.connect();
  return { c, id: (await event).client };
}

test("events arrive in order, are acknowledged after the handler, and rpcs are answered", async () => {
  const node = await startSidecast({ file: FILE });
  const sidecast = new Sidecast({ address: node.grpc });
  const seen = new Recorder();
  const errors = new Recorder();
  let failOnce = true;
  const consumer = sidecast.consume({
    group: "app",
    rpcMethods: ["app."],
    backoff: { minDelay: 20, maxDelay: 50 },
    onJoined: (j) => seen.push({ joined: j.resumed }),
    onEvent: async (event) => {
      // The first publish fails once: it is retried in place, then acknowledged.
      if (event.kind === "publish" && failOnce) {
        failOnce = false;
        throw new Error("database busy");
      }
      seen.push(event);
    },
    onRpc: async ({ method, data, user }) => {
      if (method === "app.echo") return { echo: data, user };
      if (method === "app.boom") throw new Error("a bug");
      throw new RpcError(404, `no method ${method}`);
    },
    onError: (error, about) => errors.push({ message: error.message, about: about?.kind ?? about?.method }),
  });
  try {
    await seen.find("the join", (e) => e.joined === false);
    const { c, id } = await connected(node, "ann");
    const room = c.subscribe("room:a");
    await next(room, "subscribed");
    await c.publish("room:a", { n: 1 });
    assert.deepEqual(await c.rpc("app.echo", { x: 1 }), { echo: { x: 1 }, user: "ann" });
    const missing = await c.rpc("app.nope", {}).catch((e) => e);
    assert.equal(missing.code, "rpc_error");
    assert.equal(missing.rpcCode, 404);
    const boom = await c.rpc("app.boom", {}).catch((e) => e);
    assert.equal(boom.rpcCode, 500);
    await errors.find("the rpc handler's error", (e) => e.about === "app.boom" && e.message === "a bug");
    c.disconnect();
    const disconnect = await seen.find("the disconnect", (e) => e.kind === "disconnect");
    assert.equal(disconnect.code, 1000);

    const events = seen.items.filter((e) => e.kind);
    assert.deepEqual(
      events.map((e) => [e.seq, e.kind, e.client, e.user]),
      [[1, "connect", id, "ann"], [2, "subscribe", id, "ann"], [3, "publish", id, "ann"], [4, "disconnect", id, "ann"]],
    );
    assert.deepEqual(events[0].meta, { plan: "pro" });
    assert.deepEqual(events[2].data, { n: 1 });
    assert.ok(events[0].time instanceof Date && Math.abs(events[0].time - Date.now()) < 60_000);
    assert.ok(errors.items.some((e) => e.about === "publish" && e.message === "database busy"));

    await consumer.stop();
    // Everything handled was acknowledged: the group left behind holds nothing.
    const joined = new Recorder();
    const probe = sidecast.consume({ group: "app", onEvent: () => {}, onJoined: (j) => joined.push(j) });
    const j = await joined.find("the probe's join", () => true);
    assert.equal(j.resumed, true);
    assert.equal(j.buffered, 0);
    await probe.stop();
  } finally {
    await consumer.stop();
    sidecast.close();
    await node.kill();
  }
});

test("what a stopped consumer left unacknowledged is redelivered to the next one", async () => {
  const node = await startSidecast({ file: FILE });
  const sidecast = new Sidecast({ address: node.grpc });
  const first = new Recorder();
  let release;
  const stuck = new Promise((r) => (release = r));
  const consumer = sidecast.consume({
    group: "slow",
    kinds: ["connect"],
    onJoined: () => first.push("joined"),
    onEvent: async (event) => {
      first.push(event);
      await stuck;
      throw new Error("gave up");
    },
  });
  try {
    await first.find("the join", (e) => e === "joined");
    const { id } = await connected(node, "bob");
    await first.find("bob's connect", (e) => e.kind === "connect");
    const stopped = consumer.stop();
    release();
    await stopped;

    const second = new Recorder();
    const next = sidecast.consume({ group: "slow", kinds: ["connect"], onEvent: (e) => second.push(e) });
    const again = await second.find("the redelivered connect", (e) => e.kind === "connect");
    assert.equal(again.client, id);
    assert.equal(again.redelivered, true);
    await next.stop();
  } finally {
    release();
    await consumer.stop();
    sidecast.close();
    await node.kill();
  }
});

test("after sidecast restarts, the consumer joins again and receives new events", async () => {
  const node = await startSidecast({ file: FILE });
  const sidecast = new Sidecast({ address: node.grpc });
  const seen = new Recorder();
  const errors = new Recorder();
  const consumer = sidecast.consume({
    group: "app",
    kinds: ["connect"],
    backoff: { minDelay: 50, maxDelay: 200 },
    onJoined: (j) => seen.push({ joined: j }),
    onEvent: (e) => seen.push(e),
    onError: (e) => errors.push(e),
  });
  try {
    await seen.find("the first join", (e) => e.joined);
    await node.restart();
    await errors.find("the broken stream", (e) => ["UNAVAILABLE", "CANCELLED", "INTERNAL"].includes(e.code));
    await seen.find("the second join", () => seen.items.filter((e) => e.joined).length === 2);
    const { id } = await connected(node, "cy");
    const connect = await seen.find("cy's connect", (e) => e.kind === "connect" && e.client === id);
    // A restarted sidecast starts every group anew.
    assert.equal(connect.seq, 1);
    assert.equal(seen.items.filter((e) => e.joined)[1].joined.resumed, false);
  } finally {
    await consumer.stop();
    sidecast.close();
    await node.kill();
  }
});
