// The SSE fallback: behind a proxy that refuses WebSocket upgrades, the client goes on over
// Server-Sent Events by itself, with the same API: subscriptions, calls, the heartbeat,
// token refresh, reconnects that recover what was missed, and close codes.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import WebSocket from "ws";

import { Client } from "../dist/index.js";
import { blockingProxy, control, next, startSidecast, token, until } from "./helpers.mjs";

let node;
let backend;
let proxy;

before(async () => {
  node = await startSidecast({
    file: '[namespaces.h]\nhistory_size = 100\nhistory_ttl = "5m"\npublic = true\n[namespaces.room]\npresence = true\npublic = true\n',
    settings: { ping_interval: "1s", pong_timeout: "1s" },
  });
  backend = control(node.grpc);
  proxy = await blockingProxy(node.url);
});

after(async () => {
  proxy?.close();
  backend?.close();
  await node?.kill();
});

const fast = { minDelay: 20, maxDelay: 100, drainSpread: 100 };

test("behind a proxy that blocks WebSockets the client falls back to SSE and works the same", async () => {
  const client = new Client({
    url: proxy.url,
    getToken: async () => token("sam", { publish: ["h:*"] }, 60),
    WebSocket,
    backoff: fast,
  });
  client.connect();
  const feed = client.subscribe("h:feed");
  const received = [];
  feed.on("publication", (p) => received.push(p.data.n));
  await next(feed, "subscribed");
  assert.equal(client.transport, "sse");
  assert.equal(proxy.upgrades, 2, "two WebSocket attempts, then SSE");

  await backend.publish("h:feed", { n: 1 });
  await until("the backend's publication", () => received.length === 1);
  // Calls go as POSTs and their replies come on the stream, in order.
  await client.publish("h:feed", { n: 2 });
  await until("its own publication", () => received.length === 2);
  const room = client.subscribe("room:1");
  await next(room, "subscribed");
  assert.deepEqual(await client.presenceStats("room:1"), { clients: 1, users: 1 });
  await client.refresh();

  // Heartbeats: the server pings every second and closes (4007) a client that does not
  // answer; the client answers over POST, so it is still the same connection seconds later.
  const disconnects = [];
  client.on("disconnected", (e) => disconnects.push(e.code));
  await new Promise((resolve) => setTimeout(resolve, 3000));
  assert.deepEqual(disconnects, []);

  // The backend drops the connection (4006, reconnect) while publishing on: the client
  // comes back over SSE and recovers what it missed, once each.
  const publishing = (async () => {
    for (let n = 3; n <= 10; n++) await backend.publish("h:feed", { n });
  })();
  await backend.disconnect("sam", 4006);
  await publishing;
  await until("every publication", () => received.length >= 10);
  assert.deepEqual(received, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
  assert.deepEqual(disconnects, [4006]);
  assert.equal(client.transport, "sse");
  client.disconnect();
});

test("over SSE a refused token is the same close code: the client asks for a new one", async () => {
  let calls = 0;
  const client = new Client({
    url: proxy.url,
    getToken: async () => {
      calls += 1;
      // The first token is already expired (4002); the next one is good.
      return calls === 1 ? token("tia", {}, -60) : token("tia");
    },
    transports: ["sse"],
    backoff: fast,
  });
  const closes = [];
  client.on("disconnected", (e) => closes.push(e.code));
  client.connect();
  const connected = await next(client, "connected");
  assert.equal(connected.user, "tia");
  assert.equal(client.transport, "sse");
  assert.deepEqual(closes, [4002]);
  client.disconnect();
});

test("a backend's close code that forbids reconnecting stops the client over SSE too", async () => {
  const client = new Client({ url: node.url, token: token("uma"), transports: ["sse"], backoff: fast });
  client.connect();
  await next(client, "connected");
  const disconnected = next(client, "disconnected");
  await backend.disconnect("uma", 4503, "banned");
  const event = await disconnected;
  assert.deepEqual(event, { code: 4503, reason: "banned", reconnecting: false });
  assert.equal(client.state, "disconnected");
});

test("over SSE a cookie client without a cookie stops and says why, as over a WebSocket", async () => {
  const cookieNode = await startSidecast({ settings: { auth_cookie: "sid", allowed_origins: "https://app.example" } });
  try {
    // Node's fetch keeps no cookies: the stream is opened without one.
    const client = new Client({ url: cookieNode.url, cookie: true, transports: ["sse"], backoff: fast });
    const error = next(client, "error");
    client.connect();
    assert.equal((await error).code, "bad_request");
    await until("stopped", () => client.state === "disconnected");
  } finally {
    await cookieNode.kill();
  }
});

test("after an outage fails both transports the client goes round to the WebSocket again", async () => {
  // Nothing listens on this port: every attempt of either transport fails before opening.
  const dead = await startSidecast({});
  const url = dead.url;
  await dead.kill();
  // Each attempt, recorded as the client makes it.
  const attempts = [];
  class CountedWebSocket extends WebSocket {
    constructor(...args) {
      attempts.push("websocket");
      super(...args);
    }
  }
  const countedFetch = (...args) => {
    attempts.push("sse");
    return globalThis.fetch(...args);
  };
  const client = new Client({ url, token: token("vic"), WebSocket: CountedWebSocket, fetch: countedFetch, backoff: fast });
  client.connect();
  try {
    await until("two of each, then the WebSocket", () => attempts.length >= 5);
    assert.deepEqual(attempts.slice(0, 5), ["websocket", "websocket", "sse", "sse", "websocket"]);
  } finally {
    client.disconnect();
  }
});
