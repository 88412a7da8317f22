// mintToken: tokens sidecast accepts, with each kind of key it can verify.

import assert from "node:assert/strict";
import { generateKeyPairSync } from "node:crypto";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";

import { Sidecast, mintToken } from "../dist/index.js";
import { SECRET, client, closeAll, next, startSidecast } from "./support.mjs";

const FILE = `
[namespaces.chat]
presence = true
`;

after(closeAll);

test("an HS256 token connects with its user, channels and info", async () => {
  const node = await startSidecast({ file: FILE });
  const backend = new Sidecast({ address: node.grpc });
  try {
    const token = await mintToken({ user: "ann", channels: ["chat:*"], info: { name: "Ann" }, expiresIn: 60, secret: SECRET });
    const c = client(node.url, { token });
    const connected = next(c, "connected");
    c.connect();
    const { client: id, user } = await connected;
    assert.equal(user, "ann");
    // `chat` is not public: only the token's channels claim lets ann in.
    const room = c.subscribe("chat:1");
    await next(room, "subscribed");
    assert.deepEqual(await backend.presence("chat:1"), [{ client: id, user: "ann", info: { name: "Ann" } }]);
    const refused = next(c.subscribe("chat2:1"), "error");
    assert.equal((await refused).code, "forbidden");
  } finally {
    backend.close();
    await node.kill();
  }
});

test("a token signed with the wrong secret is refused with 4001 bad signature", async () => {
  const node = await startSidecast({ file: FILE });
  try {
    const token = await mintToken({ user: "ann", secret: "another secret" });
    const c = client(node.url, { token });
    const closed = next(c, "disconnected");
    c.connect();
    const event = await closed;
    assert.equal(event.code, 4001, JSON.stringify(event));
    assert.equal(event.reason, "bad signature");
  } finally {
    await node.kill();
  }
});

for (const [algorithm, type, options] of [
  ["ES256", "ec", { namedCurve: "P-256" }],
  ["EdDSA", "ed25519", {}],
  ["RS256", "rsa", { modulusLength: 2048 }],
]) {
  test(`an ${algorithm} token is verified with sidecast's public key`, async () => {
    const { publicKey, privateKey } = generateKeyPairSync(type, options);
    const dir = mkdtempSync(join(tmpdir(), "sidecast-keys-"));
    const keyFile = join(dir, "public.pem");
    writeFileSync(keyFile, publicKey.export({ type: "spki", format: "pem" }));
    const node = await startSidecast({ file: FILE, settings: { token_public_key_file: keyFile, token_algorithms: algorithm } });
    try {
      const pem = privateKey.export({ type: "pkcs8", format: "pem" });
      const token = await mintToken({
        user: "bob",
        privateKey: pem,
        ...(algorithm === "RS256" ? { algorithm } : {}),
        expiresIn: "2m",
      });
      const c = client(node.url, { token });
      const connected = next(c, "connected");
      c.connect();
      assert.equal((await connected).user, "bob");
    } finally {
      await node.kill();
    }
  });
}

test("mintToken refuses what cannot make a valid token", async () => {
  await assert.rejects(mintToken({ user: "", secret: SECRET }), /user is required/);
  await assert.rejects(mintToken({ user: "a" }), /secret or a privateKey/);
  const { privateKey } = generateKeyPairSync("rsa", { modulusLength: 2048 });
  await assert.rejects(mintToken({ user: "a", privateKey }), /say which algorithm/);
});
