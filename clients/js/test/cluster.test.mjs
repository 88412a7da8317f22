// The SDK against a cluster: two sidecast nodes sharing a redis-server. When a node's link
// to Redis breaks, its subscriptions end with `unsub` 2500 and the SDK subscribes again from
// its position: the app sees every publication once, in order.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import WebSocket from "ws";

import { Client } from "../dist/index.js";
import { control, next, startRedis, startSidecast, token, until } from "./helpers.mjs";

const FILE = `
[namespaces.room]
history_size = 1000
history_ttl = "5m"
public = true
`;

let redis;
let nodes = [];
let backend;
const clients = [];

before(async () => {
  redis = await startRedis();
  const settings = { broker: redis.url };
  nodes = [await startSidecast({ file: FILE, settings }), await startSidecast({ file: FILE, settings })];
  backend = control(nodes[1].grpc);
});

after(async () => {
  for (const c of clients) c.disconnect();
  backend.close();
  for (const n of nodes) await n.kill();
  await redis.kill();
});

test("publications made on another node arrive once and in order across a broken Redis link", async () => {
  const c = new Client({
    url: nodes[0].url,
    token: token("alice"),
    WebSocket,
    backoff: { minDelay: 50, maxDelay: 200, drainSpread: 200 },
    timeout: 5000,
  });
  clients.push(c);
  c.connect();
  const room = c.subscribe("room:1");
  await next(room, "subscribed");
  const seen = [];
  room.on("publication", (p) => seen.push(p.data));
  const unrecovered = [];
  room.on("unrecovered", (e) => unrecovered.push(e));
  const states = [];
  room.on("state", (s) => states.push(s));

  const publishing = (async () => {
    for (let i = 1; i <= 100; i++) await backend.publish("room:1", i);
  })();
  // Every node's pub/sub connections drop while the publications go on.
  const killed = await redis.command("CLIENT", "KILL", "TYPE", "pubsub");
  assert.match(killed, /^:[1-9]/, killed);
  await publishing;
  await until("all 100 publications", () => seen.length >= 100);
  assert.deepEqual(seen, Array.from({ length: 100 }, (_, i) => i + 1), "once each, in order");
  assert.deepEqual(unrecovered, [], "recovered, not lost");
  assert.ok(states.some((s) => s.state === "subscribing"), "it subscribed again after the 2500");
  assert.equal(room.state, "subscribed");
});
