// A subscriber whose socket stops reading, in a namespace with slow_consumer = "drop_oldest":
// the SDK reports what the server dropped (the `lost` push) and delivers the rest in order,
// with no gap, over the same connection.

import assert from "node:assert/strict";
import { test } from "node:test";

import WebSocket from "ws";

import { Client } from "../dist/index.js";
import { control, next, startSidecast, token, until } from "./helpers.mjs";

const FILE = `
[namespaces.feed]
history_size = 10
history_ttl = "1m"
public = true
slow_consumer = "drop_oldest"
`;

/** The sockets the SDK opened, so that the test can stop reading one. */
const sockets = [];
class Tracked extends WebSocket {
  constructor(...args) {
    super(...args);
    sockets.push(this);
  }
}

async function drops(node) {
  const text = await (await fetch(`${node.admin}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith("sidecast_slow_consumer_drops_total "));
  return Number(line?.split(" ")[1] ?? 0);
}

test("a slow subscriber hears which publications were dropped and gets the rest in order", async () => {
  const node = await startSidecast({
    file: FILE,
    settings: { max_queue_bytes: "131072", max_publication_size: "16384", write_timeout: "30s" },
  });
  const backend = control(node.grpc);
  const c = new Client({ url: node.url, token: token("slow"), WebSocket: Tracked, timeout: 5000 });
  try {
    c.connect();
    const sub = c.subscribe("feed:x");
    await next(sub, "subscribed");
    const seen = [];
    const gaps = [];
    sub.on("publication", (p) => seen.push({ offset: p.offset, end: p.data.end === true }));
    sub.on("lost", (l) => seen.push({ lost: [l.from, l.to, l.count] }));
    sub.on("unrecovered", (e) => gaps.push(e));
    sockets.at(-1)._socket.pause();

    const pad = "p".repeat(8000);
    let published = 0;
    while ((await drops(node)) === 0) {
      assert.ok(published < 3000, `nothing dropped after ${published}`);
      for (let i = 0; i < 25; i++) {
        published += 1;
        await backend.publish("feed:x", { n: published, pad });
      }
    }
    await backend.publish("feed:x", { end: true });
    sockets.at(-1)._socket.resume();
    await until("the last publication", () => seen.some((e) => e.end));

    let offset = 1;
    let ranges = 0;
    for (const e of seen) {
      if (e.lost) {
        const [from, to, count] = e.lost;
        assert.equal(from, offset);
        assert.equal(count, to - from + 1);
        offset = to + 1;
        ranges += 1;
      } else {
        assert.equal(e.offset, offset);
        offset += 1;
      }
    }
    assert.ok(ranges > 0, "something was dropped and named");
    assert.equal(offset, published + 2, "every offset delivered or named once");
    assert.deepEqual(gaps, []);
    assert.equal(sockets.length, 1, "one connection throughout");
  } finally {
    c.disconnect();
    backend.close();
    await node.kill();
  }
});
