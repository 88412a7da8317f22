// @sidecast/client against a real sidecast: connect, reconnect, recovery, tokens, close codes.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import WebSocket from "ws";

import { Client, afterClose, backoffDelay } from "../dist/index.js";
import { control, next, startSidecast, token, until } from "./helpers.mjs";

const FILE = `
[namespaces.h]
history_size = 100
history_ttl = "5m"
public = true
[namespaces.chat]
public = true
`;

let node;
let backend;
/** Every client a test made, disconnected after it, also when it failed. */
const clients = [];

before(async () => {
  node = await startSidecast({ file: FILE, settings: { token_leeway: "0s" } });
  backend = control(node.grpc);
});

after(async () => {
  for (const c of clients) c.disconnect();
  backend.close();
  await node.kill();
});

/** A client of `user`; quick backoff so that tests do not wait. */
function client(user, options = {}) {
  return made(new Client({
    url: node.url,
    token: token(user),
    WebSocket,
    backoff: { minDelay: 50, maxDelay: 200, drainSpread: 200 },
    timeout: 5000,
    ...options,
  }));
}

function made(c) {
  clients.push(c);
  return c;
}

test("connects with the token in the first frame and receives publications", async () => {
  const c = client("alice");
  const connected = next(c, "connected");
  c.connect();
  assert.equal((await connected).user, "alice");
  const sub = c.subscribe("chat:1");
  await next(sub, "subscribed");
  const got = next(sub, "publication");
  await backend.publish("chat:1", { text: "hi" });
  assert.deepEqual((await got).data, { text: "hi" });
  assert.equal(sub.state, "subscribed");
  c.disconnect();
  assert.equal(c.state, "disconnected");
});

test("recovers what was published while it was away, exactly once and in order", async () => {
  const c = client("bob");
  c.connect();
  const sub = c.subscribe("h:recover");
  await next(sub, "subscribed");
  const seen = [];
  sub.on("publication", (p) => seen.push(p.data.n));
  const unrecovered = [];
  sub.on("unrecovered", (e) => unrecovered.push(e));
  for (let n = 1; n <= 3; n++) await backend.publish("h:recover", { n });
  await until("the first three", () => seen.length === 3);
  // Away: the subscription is kept, and what is published meanwhile is recovered.
  c.disconnect();
  for (let n = 4; n <= 8; n++) await backend.publish("h:recover", { n });
  const resumed = next(sub, "subscribed", (e) => e.resumed);
  c.connect();
  const event = await resumed;
  assert.equal(event.recovered, true);
  assert.deepEqual(seen, [1, 2, 3, 4, 5, 6, 7, 8], "recovered before the subscription is live");
  // The backend drops the connection (4006: reconnect with backoff) while publishing on.
  const publishing = (async () => {
    for (let n = 9; n <= 20; n++) await backend.publish("h:recover", { n });
  })();
  await backend.disconnect("bob", 4006);
  await publishing;
  await until("all twenty", () => seen.length >= 20).catch(async (e) => {
    const top = await c.history("h:recover", { limit: 0 }).then((h) => h.position.offset, (x) => x.code);
    throw new Error(`${e.message}: saw ${seen}, position ${JSON.stringify(sub.position)}, top ${top}`);
  });
  assert.deepEqual(seen, Array.from({ length: 20 }, (_, i) => i + 1), "no gap, no duplicate");
  assert.deepEqual(unrecovered, []);
  assert.equal(sub.position.offset, 20);
  c.disconnect();
});

test("reconnects after the node restarts and says the gap was not recovered", async () => {
  const c = client("carol");
  c.connect();
  const sub = c.subscribe("h:restart");
  await next(sub, "subscribed");
  const first = next(sub, "publication");
  await backend.publish("h:restart", { n: 1 });
  await first;
  const disconnected = next(c, "disconnected");
  const unrecovered = next(sub, "unrecovered");
  const resumed = next(sub, "subscribed", (e) => e.resumed);
  await node.restart();
  assert.equal((await disconnected).reconnecting, true);
  // The memory engine's stream starts over in a new epoch: nothing can be recovered.
  assert.equal((await unrecovered).reason, "not_recovered");
  assert.equal((await resumed).recovered, false);
  const got = next(sub, "publication");
  await backend.publish("h:restart", { n: 2 });
  assert.deepEqual((await got).data, { n: 2 });
  c.disconnect();
});

test("a channel without history reports every reconnect as a possible gap", async () => {
  const c = client("dave");
  c.connect();
  const sub = c.subscribe("chat:nohistory");
  await next(sub, "subscribed");
  const unrecovered = next(sub, "unrecovered");
  const resumed = next(sub, "subscribed", (e) => e.resumed);
  await backend.disconnect("dave", 4006);
  assert.equal((await unrecovered).reason, "no_history");
  assert.equal((await resumed).recovered, false);
  c.disconnect();
});

test("server-side subscriptions are recovered through connect", async () => {
  const c = client("ivan", { token: token("ivan", { subs: ["h:ivan"] }) });
  const made = next(c, "subscription");
  c.connect();
  const sub = await made;
  assert.equal(sub.channel, "h:ivan");
  assert.equal(sub.serverSide, true);
  const seen = [];
  sub.on("publication", (p) => seen.push(p.data.n));
  for (let n = 1; n <= 2; n++) await backend.publish("h:ivan", { n });
  await until("the first two", () => seen.length === 2);
  c.disconnect();
  for (let n = 3; n <= 5; n++) await backend.publish("h:ivan", { n });
  const resumed = next(sub, "subscribed", (e) => e.resumed);
  c.connect();
  assert.equal((await resumed).recovered, true);
  assert.deepEqual(seen, [1, 2, 3, 4, 5]);
  c.disconnect();
});

test("a subscription ended before its reply leaves nothing behind on the server", async () => {
  const c = client("judy");
  c.connect();
  await next(c, "connected");
  const first = c.subscribe("chat:quick");
  await first.unsubscribe(); // its subscribe is still on the way
  assert.equal(first.state, "unsubscribed");
  // Had the server kept it, this would be refused as already_subscribed.
  const again = c.subscribe("chat:quick");
  const subscribed = await next(again, "subscribed");
  assert.equal(subscribed.resumed, false);
  assert.equal(first.state, "unsubscribed");
  c.disconnect();
});

test("subscribing early to a channel of the token's subs keeps the subscription", async () => {
  const c = client("kim", { token: token("kim", { subs: ["chat:kim"] }) });
  const sub = c.subscribe("chat:kim"); // before connecting: the subs claim makes it too
  const errors = [];
  sub.on("error", (e) => errors.push(e));
  c.connect();
  await next(sub, "subscribed");
  // The client's own subscribe is answered already_subscribed: a ping orders after it.
  assert.equal((await c.presenceStats("chat:kim").catch((e) => e.code)), "not_available");
  assert.deepEqual(errors, []);
  assert.equal(sub.state, "subscribed");
  assert.equal(sub.serverSide, true);
  const got = next(sub, "publication");
  await backend.publish("chat:kim", 1);
  assert.equal((await got).data, 1);
  c.disconnect();
});

test("connect, disconnect and connect again while the token is on its way: one socket", async () => {
  let sockets = 0;
  class Counted extends WebSocket {
    constructor(...args) {
      super(...args);
      sockets += 1;
    }
  }
  const c = made(new Client({
    url: node.url,
    WebSocket: Counted,
    getToken: async () => {
      await new Promise((r) => setTimeout(r, 100));
      return token("leo");
    },
  }));
  c.connect();
  c.disconnect();
  c.connect();
  await next(c, "connected");
  // The first open() was overtaken while waiting for its token: it opens nothing.
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(sockets, 1);
  assert.equal(c.state, "connected");
  c.disconnect();
});

test("close codes decide whether it reconnects", async () => {
  for (const [code, reconnects] of [
    [4006, true],
    [4100, true],
    [4499, true],
    [4503, false],
    [4600, false],
  ]) {
    const c = client(`codes-${code}`);
    c.connect();
    await next(c, "connected");
    const disconnected = next(c, "disconnected");
    await backend.disconnect(`codes-${code}`, code);
    const event = await disconnected;
    assert.equal(event.code, code);
    assert.equal(event.reconnecting, reconnects, `after ${code}`);
    if (reconnects) {
      await next(c, "connected");
    } else {
      assert.equal(c.state, "disconnected");
    }
    c.disconnect();
  }
});

test("after 4002 it fetches a new token and reconnects", async () => {
  let calls = 0;
  const c = made(new Client({
    url: node.url,
    WebSocket,
    backoff: { minDelay: 50, maxDelay: 200 },
    // Never refreshes before expiry here: the node closes with 4002 first.
    refreshBefore: -60,
    getToken: async () => {
      calls += 1;
      return token("erin", {}, calls === 1 ? 1 : 3600);
    },
  }));
  c.connect();
  await next(c, "connected");
  const closed = await next(c, "disconnected");
  assert.equal(closed.code, 4002);
  assert.equal(closed.reconnecting, true);
  await next(c, "connected");
  assert.equal(calls, 2);
  c.disconnect();
});

test("refreshes the token over the live socket before it expires", async () => {
  let calls = 0;
  const c = made(new Client({
    url: node.url,
    WebSocket,
    refreshBefore: 2,
    getToken: async () => {
      calls += 1;
      return token("frank", {}, calls === 1 ? 3 : 3600);
    },
  }));
  const disconnected = [];
  c.on("disconnected", (e) => disconnected.push(e.code));
  c.connect();
  await next(c, "connected");
  await until("the refresh", () => calls === 2);
  // Past the first token's expiry, still on the same connection.
  await new Promise((r) => setTimeout(r, 3500));
  assert.equal(c.state, "connected");
  assert.deepEqual(disconnected, []);
  c.disconnect();
});

test("one refresh in flight, however often it is asked for", async () => {
  let calls = 0;
  const c = made(new Client({
    url: node.url,
    WebSocket,
    token: token("grace"),
    getToken: async () => {
      calls += 1;
      await new Promise((r) => setTimeout(r, 300));
      return token("grace");
    },
  }));
  c.connect();
  await next(c, "connected");
  await Promise.all([c.refresh(), c.refresh(), c.refresh()]);
  assert.equal(calls, 1);
  c.disconnect();
});

test("calls return their results and typed errors", async () => {
  const c = client("heidi", { token: token("heidi", { publish: ["chat:*"] }) });
  c.connect();
  const sub = c.subscribe("h:calls");
  await next(sub, "subscribed");
  await c.publish("chat:x", { ok: true });
  await backend.publish("h:calls", { n: 1 });
  const page = await c.history("h:calls", { limit: 10 });
  assert.deepEqual(page.publications.map((p) => p.data), [{ n: 1 }]);
  assert.equal(page.position.offset, 1);
  await assert.rejects(c.presence("h:calls"), (e) => e.code === "not_available");
  await assert.rejects(c.publish("news", 1), (e) => e.code === "forbidden");
  await assert.rejects(c.rpc("nobody.home"), (e) => e.code === "unavailable");
  c.disconnect();
});

test("the close-code table and the backoff bounds", () => {
  for (const code of [1002, 1007, 1009, 4500, 4503, 4600, 4999, 4777]) assert.equal(afterClose(code), "stop", `${code}`);
  for (const code of [4001, 4002]) assert.equal(afterClose(code), "new-token");
  for (const code of [1001, 1006, 1011, 4004, 4005, 4006, 4007, 4100, 4499, 4321]) {
    assert.equal(afterClose(code), "reconnect", `${code}`);
  }
  const options = { minDelay: 100, maxDelay: 1000 };
  for (let attempt = 0; attempt < 40; attempt++) {
    const high = backoffDelay(attempt, options, () => 0.999999);
    assert.ok(high >= 0 && high <= Math.min(1000, 100 * 2 ** attempt), `${attempt}: ${high}`);
    assert.equal(backoffDelay(attempt, options, () => 0), 0, "full jitter starts at 0");
  }
  assert.ok(backoffDelay(10, options, () => 0.999999) >= 999, "grows to the bound");
});
