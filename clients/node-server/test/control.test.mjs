// The typed control API against a real sidecast: every unary call, seen from real clients.

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";

import { Sidecast, SidecastError, mintToken } from "../dist/index.js";
import { SECRET, client, closeAll, next, startSidecast } from "./support.mjs";

const FILE = `
[namespaces.chat]
public = true
presence = true
history_size = 10
history_ttl = "5m"
`;

let node;
let sidecast;

before(async () => {
  node = await startSidecast({ file: FILE });
  sidecast = new Sidecast({ address: node.grpc });
});

after(async () => {
  closeAll();
  sidecast.close();
  await node.kill();
});

async function connected(user) {
  const c = client(node.url, { token: await mintToken({ user, secret: SECRET }) });
  const event = next(c, "connected");
  c.connect();
  return { c, id: (await event).client };
}

test("publish reaches subscribers; an idempotency key publishes once and returns the first result", async () => {
  const { c } = await connected("ann");
  const room = c.subscribe("chat:idem");
  await next(room, "subscribed");
  const got = [];
  room.on("publication", (p) => got.push(p.data));
  const first = await sidecast.publish("chat:idem", { text: "hi" }, { idempotencyKey: "k1" });
  const again = await sidecast.publish("chat:idem", { text: "hi" }, { idempotencyKey: "k1" });
  assert.equal(first.offset, 1);
  assert.equal(first.delivered, 1);
  assert.deepEqual({ offset: again.offset, epoch: again.epoch }, { offset: first.offset, epoch: first.epoch });
  const marker = next(room, "publication", (p) => p.data === "end");
  await sidecast.publish("chat:idem", "end");
  await marker;
  assert.deepEqual(got, [{ text: "hi" }, "end"]);

  const page = await sidecast.history("chat:idem", { limit: 10 });
  assert.deepEqual(page.publications, [{ offset: 1, data: { text: "hi" } }, { offset: 2, data: "end" }]);
  assert.equal(page.offset, 2);
  assert.equal(page.epoch, first.epoch);
  const since = await sidecast.history("chat:idem", { since: { offset: 1, epoch: first.epoch }, limit: 10 });
  assert.deepEqual(since.publications, [{ offset: 2, data: "end" }]);
  await sidecast.historyRemove("chat:idem");
  assert.deepEqual((await sidecast.history("chat:idem")).publications, []);
});

test("broadcast publishes into several channels, one result each", async () => {
  const results = await sidecast.broadcast(["chat:b1", "chat:b2"], { n: 1 });
  assert.equal(results.length, 2);
  assert.ok(results.every((r) => r.offset === 1 && r.epoch), JSON.stringify(results));
});

test("subscribe, send, unsubscribe and disconnect by user reach that user's connection", async () => {
  const { c, id } = await connected("bob");
  const made = next(c, "subscription");
  assert.deepEqual(await sidecast.subscribe("chat:srv", { user: "bob" }), { subscribed: 1, alreadySubscribed: 0, limitExceeded: 0 });
  const sub = await made;
  assert.equal(sub.channel, "chat:srv");
  assert.equal(sub.serverSide, true);

  assert.deepEqual(await sidecast.presence("chat:srv"), [{ client: id, user: "bob", info: null }]);
  assert.deepEqual(await sidecast.presenceStats("chat:srv"), { numClients: 1, numUsers: 1 });
  assert.deepEqual(await sidecast.channels("chat:sr*"), [{ channel: "chat:srv", subscribers: 1 }]);
  const info = await sidecast.info();
  assert.ok(info.connections >= 1 && info.nodes.length === 1 && info.version, JSON.stringify(info));

  const message = next(c, "message");
  assert.deepEqual(await sidecast.send({ client: id }, { hello: "bob" }), { delivered: 1 });
  assert.deepEqual((await message).data, { hello: "bob" });

  const ended = next(sub, "unsubscribed");
  assert.deepEqual(await sidecast.unsubscribe("chat:srv", { user: "bob" }), { unsubscribed: 1 });
  assert.equal((await ended).code, 2000);

  const closed = next(c, "disconnected");
  assert.deepEqual(await sidecast.disconnect({ user: "bob" }, { code: 4100, reason: "moderated" }), { disconnected: 1 });
  const event = await closed;
  assert.equal(event.code, 4100);
  assert.equal(event.reason, "moderated");
});

test("a refused call rejects with a SidecastError naming the gRPC status", async () => {
  const error = await sidecast.publish("", 1).catch((e) => e);
  assert.ok(error instanceof SidecastError, String(error));
  assert.equal(error.code, "INVALID_ARGUMENT");
  assert.ok(error.message.length > 0);
  await assert.rejects(sidecast.publish("chat:x", undefined), /JSON value/);
});

test("the API key is sent on every call; without it sidecast answers UNAUTHENTICATED", async () => {
  const guarded = await startSidecast({ file: FILE, settings: { api_key: "k-123" } });
  const without = new Sidecast({ address: guarded.grpc });
  const withKey = new Sidecast({ address: guarded.grpc, apiKey: "k-123" });
  try {
    assert.equal((await without.info().catch((e) => e)).code, "UNAUTHENTICATED");
    assert.equal((await withKey.publish("chat:k", 1)).offset, 1);
  } finally {
    without.close();
    withKey.close();
    await guarded.kill();
  }
});

test("TLS to the control listener, with the CA that signed sidecast's certificate", async () => {
  const dir = mkdtempSync(join(tmpdir(), "sidecast-tls-"));
  const file = (name) => join(dir, name);
  const openssl = (...args) => execFileSync("openssl", args, { stdio: "pipe" });
  openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
    "-subj", "/CN=test CA", "-keyout", file("ca.key"), "-out", file("ca.pem"));
  openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=localhost",
    "-keyout", file("server.key"), "-out", file("server.csr"));
  writeFileSync(file("ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n");
  openssl("x509", "-req", "-in", file("server.csr"), "-CA", file("ca.pem"), "-CAkey", file("ca.key"),
    "-CAcreateserial", "-days", "1", "-extfile", file("ext"), "-out", file("server.pem"));
  const secure = await startSidecast({
    file: FILE,
    settings: { grpc_tls_cert_file: file("server.pem"), grpc_tls_key_file: file("server.key") },
  });
  const trusted = new Sidecast({ address: secure.grpc, tls: { ca: file("ca.pem") }, timeout: 3000 });
  const plain = new Sidecast({ address: secure.grpc, timeout: 1000 });
  try {
    assert.equal((await trusted.publish("chat:tls", 1)).offset, 1);
    // A plaintext channel never becomes ready against a TLS listener: its deadline passes.
    assert.equal((await plain.info().catch((e) => e)).code, "DEADLINE_EXCEEDED");
  } finally {
    trusted.close();
    plain.close();
    await secure.kill();
  }
});
