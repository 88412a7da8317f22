// Cookie mode against a real sidecast with auth_cookie: the client connects without a token,
// the upgrade carrying the app's session cookie, and reconnects with the renewed cookie
// after the old one expires.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import WebSocket from "ws";

import { Client } from "../dist/index.js";
import { control, next, startSidecast, token, until } from "./helpers.mjs";

const ORIGIN = "https://app.example.com";
const FILE = `
[namespaces.h]
history_size = 100
history_ttl = "5m"
public = true
`;

let node;
let backend;
const clients = [];

before(async () => {
  node = await startSidecast({
    file: FILE,
    settings: { token_leeway: "0s", auth_cookie: "sid", allowed_origins: ORIGIN },
  });
  backend = control(node.grpc);
});

after(async () => {
  for (const c of clients) c.disconnect();
  backend.close();
  await node.kill();
});

/** What a browser on the app's page does: the page's Origin, and the cookie jar's `sid`
 * (read at each upgrade, so the app can renew it) among other cookies. */
function browserWebSocket(jar) {
  return class extends WebSocket {
    constructor(url, protocols) {
      const headers = { Origin: ORIGIN };
      if (jar.sid) headers.Cookie = `theme=dark; sid=${jar.sid}`;
      super(url, protocols, { headers });
    }
  };
}

function cookieClient(jar) {
  const c = new Client({
    url: node.url,
    cookie: true,
    WebSocket: browserWebSocket(jar),
    backoff: { minDelay: 50, maxDelay: 200, drainSpread: 200 },
    timeout: 5000,
  });
  clients.push(c);
  return c;
}

test("connects with the session cookie, and after it expires reconnects with the renewed one and recovers", async () => {
  // The server's clock counts whole seconds: 2 s leaves at least one for the connect.
  const jar = { sid: token("ann", {}, 2) };
  const c = cookieClient(jar);
  const connected = [];
  c.on("connected", (e) => connected.push(e));
  const closes = [];
  c.on("disconnected", (e) => closes.push(e));
  c.connect();
  const sub = c.subscribe("h:cookie");
  await next(sub, "subscribed");
  assert.equal(connected[0].user, "ann");
  const got = [];
  sub.on("publication", (p) => got.push(p.data.n));
  await backend.publish("h:cookie", { n: 1 });
  await until("the first publication", () => got.length === 1);

  // The app renews its cookie; the live socket still has the old one until it expires.
  jar.sid = token("ann", {}, 3600);
  await until("the expiry's close", () => closes.length === 1);
  assert.deepEqual([closes[0].code, closes[0].reconnecting], [4002, true]);
  await backend.publish("h:cookie", { n: 2 });
  await until("the reconnect with the renewed cookie", () => connected.length === 2);
  assert.equal(connected[1].user, "ann");
  assert.ok(connected[1].expiresIn > 3000, "connected with the renewed cookie");
  await until("the recovered publication", () => got.length === 2);
  assert.deepEqual(got, [1, 2]);
});

test("without a session cookie it stops and says why instead of retrying", async () => {
  const c = cookieClient({});
  const errors = [];
  c.on("error", (e) => errors.push(e));
  const disconnected = next(c, "disconnected");
  c.connect();
  const closed = await disconnected;
  assert.equal(closed.reconnecting, false);
  assert.equal(errors.length, 1);
  assert.equal(errors[0].code, "bad_request");
  assert.match(errors[0].message, /missing token/);
  assert.equal(c.state, "disconnected");
});

test("another site's page is refused before the upgrade, cookie or not", async () => {
  const ws = new WebSocket(node.url, "sidecast.v1", {
    headers: { Origin: "https://evil.example", Cookie: `sid=${token("ann")}` },
  });
  const status = await new Promise((resolve, reject) => {
    ws.on("unexpected-response", (_req, res) => resolve(res.statusCode));
    ws.on("open", () => reject(new Error("upgraded")));
    ws.on("error", () => {});
  });
  assert.equal(status, 403);
});
