// The subscription's own rules, without a server: order, once, gaps, and listeners that call
// back in.

import assert from "node:assert/strict";
import { test } from "node:test";

import { Subscription } from "../dist/subscription.js";

function subscription() {
  const host = { forwarded: [], resyncs: 0, left: 0 };
  host.leave = async (s) => {
    host.left += 1;
    s.end(0, "unsubscribed by the client");
  };
  host.forward = (p) => host.forwarded.push(p.offset);
  host.resync = () => (host.resyncs += 1);
  const s = new Subscription("c", false, host);
  const seen = [];
  const unrecovered = [];
  s.on("publication", (p) => seen.push(p.offset));
  s.on("unrecovered", (e) => unrecovered.push(e.reason));
  return { s, host, seen, unrecovered };
}

test("a new epoch under a live subscription is reported, delivered and resynced", () => {
  const { s, host, seen, unrecovered } = subscription();
  s.attach({ recoverable: true, offset: 10, epoch: "A" });
  s.publication({ channel: "c", data: 1, offset: 11 });
  // The stream started over: offset 1 of a new epoch.
  s.publication({ channel: "c", data: 2, offset: 1 });
  assert.deepEqual(seen, [11, 1]);
  assert.deepEqual(unrecovered, ["gap"]);
  assert.equal(host.resyncs, 1);
  s.resynced("B");
  assert.deepEqual(s.position, { offset: 1, epoch: "B" });
  s.publication({ channel: "c", data: 3, offset: 2 });
  assert.deepEqual(seen, [11, 1, 2]);
  assert.deepEqual(unrecovered, ["gap"], "no second gap");
  assert.deepEqual(host.forwarded, [11, 1, 2], "the client hears every delivery");
});

test("recovered publications come before the subscription is live, each once", () => {
  const { s, host, seen } = subscription();
  s.attach({ recoverable: true, offset: 2, epoch: "A" });
  s.detach();
  const publications = [3, 4, 5].map((offset) => ({ offset, data: offset }));
  s.attach({ recoverable: true, offset: 5, epoch: "A", recovered: true, publications });
  assert.deepEqual(seen, [3, 4, 5]);
  assert.deepEqual(host.forwarded, [3, 4, 5]);
  s.publication({ channel: "c", data: 6, offset: 6 });
  assert.deepEqual(seen, [3, 4, 5, 6]);
});

test("a subscription ended before its reply stays ended", async () => {
  const { s } = subscription();
  await s.unsubscribe();
  s.attach({ recoverable: false });
  assert.equal(s.state, "unsubscribed");
});

test("a listener that unsubscribes during a resubscribe is obeyed", () => {
  const { s } = subscription();
  s.attach({ recoverable: false });
  s.detach();
  s.on("unrecovered", () => void s.unsubscribe());
  s.attach({ recoverable: false });
  assert.equal(s.state, "unsubscribed");
});

test("a lost range moves the position past it: the next publication is no gap", () => {
  const { s, host, seen, unrecovered } = subscription();
  const lost = [];
  s.on("lost", (e) => lost.push(e));
  s.attach({ recoverable: true, offset: 10, epoch: "A" });
  s.publication({ channel: "c", data: 1, offset: 11 });
  s.lost({ count: 3, from: 12, to: 14 });
  s.publication({ channel: "c", data: 2, offset: 15 });
  assert.deepEqual(seen, [11, 15]);
  assert.deepEqual(lost, [{ channel: "c", count: 3, from: 12, to: 14 }]);
  assert.deepEqual(unrecovered, [], "what the server named is not a gap");
  assert.equal(host.resyncs, 0);
  assert.deepEqual(s.position, { offset: 15, epoch: "A" });
});
