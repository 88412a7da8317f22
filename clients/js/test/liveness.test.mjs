// What the client does when the node goes quiet or drains: nodes of its own, with a short
// heartbeat, so that other tests' connections are not affected.

import assert from "node:assert/strict";
import { test } from "node:test";

import WebSocket from "ws";

import { Client } from "../dist/index.js";
import { next, startSidecast, token } from "./helpers.mjs";

test("a node that goes silent is taken for dead and reconnected to", async (t) => {
  const node = await startSidecast({ settings: { ping_interval: "1s", pong_timeout: "1s" } });
  const c = new Client({ url: node.url, token: token("quiet"), WebSocket, backoff: { minDelay: 50, maxDelay: 200 } });
  t.after(() => (c.disconnect(), node.kill()));
  c.connect();
  await next(c, "connected");
  // Frozen: its sockets stay open, and nothing comes (no ping) for longer than the
  // heartbeat's interval and timeout.
  const lost = next(c, "disconnected");
  const back = next(c, "connected");
  node.signal("SIGSTOP");
  const dead = await lost;
  assert.equal(dead.reason, "no ping from the server");
  assert.equal(dead.reconnecting, true);
  node.signal("SIGCONT");
  await back;
  c.disconnect();
  await node.kill();
});

test("after a drain (1001) it comes back, its first attempt spread", async (t) => {
  const node = await startSidecast({});
  const c = new Client({
    url: node.url,
    token: token("drained"),
    WebSocket,
    backoff: { minDelay: 50, maxDelay: 200, drainSpread: 300 },
  });
  t.after(() => (c.disconnect(), node.kill()));
  c.connect();
  await next(c, "connected");
  const closed = next(c, "disconnected");
  // Registered now: the client may be back before the test sees the node up again.
  const back = next(c, "connected");
  node.signal("SIGTERM");
  const event = await closed;
  assert.equal(event.code, 1001);
  assert.equal(event.reconnecting, true);
  await node.exited();
  await node.start();
  await back;
  c.disconnect();
  await node.kill();
});
