// @sidecast/client in a real browser: Debian's Chromium, headless, driven by playwright-core
// (no downloaded browser). The page loads the built SDK, subscribes, receives, survives a
// node restart, and recovers what was published while its connection was down; another
// page connects with its session cookie instead of a token.

import assert from "node:assert/strict";
import { existsSync, mkdirSync, readFileSync } from "node:fs";
import { createServer } from "node:http";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { after, before, test } from "node:test";

import { build } from "esbuild";
import { chromium } from "playwright-core";

import WebSocket from "ws";

import { Client } from "../dist/index.js";
import { blockingProxy, control, startSidecast, token, until } from "./helpers.mjs";

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const here = fileURLToPath(new URL(".", import.meta.url));
const dist = fileURLToPath(new URL("../dist/", import.meta.url));

let node;
let backend;
let http;
let browser;

before(async () => {
  node = await startSidecast({
    file: '[namespaces.h]\nhistory_size = 100\nhistory_ttl = "5m"\npublic = true\n[namespaces.room]\npresence = true\njoin_leave = true\npublic = true\n',
  });
  backend = control(node.grpc);
  // The React binding's page, bundled with React.
  const bundled = await build({
    entryPoints: [join(here, "page/react-app.mjs")],
    bundle: true,
    format: "esm",
    write: false,
    logLevel: "warning",
    define: { "process.env.NODE_ENV": '"production"' },
  });
  const reactApp = bundled.outputFiles[0].text;
  // The pages and the built SDK, from loopback.
  http = createServer((req, res) => {
    const path = new URL(req.url, "http://x").pathname;
    if (path === "/react") {
      res.writeHead(200, { "content-type": "text/html" });
      res.end('<!doctype html><div id="root"></div><script type="module" src="/react-app.js"></script>');
      return;
    }
    if (path === "/eventsource") {
      // docs/protocol.md section 14's plain EventSource client, as written there, with the
      // node's address in front of its paths.
      res.writeHead(200, { "content-type": "text/html" });
      res.end(`<!doctype html><script>
        const params = new URLSearchParams(location.search);
        const base = params.get("base");
        const token = params.get("token");
        window.messages = [];
        const es = new EventSource(base + "/sse?channel=h:es&token=" + token);
        let session;
        es.addEventListener("session", (e) => { session = JSON.parse(e.data).session; });
        es.onmessage = (e) => {
          const message = JSON.parse(e.data);
          window.messages.push(message);
          if (message.type === "ping") fetch(base + "/sse?session=" + session, { method: "POST", body: '{"op":"pong"}' });
        };
      </script>`);
      return;
    }
    if (path === "/react-app.js") {
      res.writeHead(200, { "content-type": "text/javascript" }).end(reactApp);
      return;
    }
    const file = path.startsWith("/sdk/") ? join(dist, path.slice(5)) : join(here, "page/index.html");
    if (!existsSync(file)) {
      res.writeHead(404).end();
      return;
    }
    const type = file.endsWith(".js") ? "text/javascript" : "text/html";
    res.writeHead(200, { "content-type": type }).end(readFileSync(file));
  });
  await new Promise((resolve) => http.listen(0, "127.0.0.1", resolve));
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-background-networking",
      "--disable-component-update",
      "--no-first-run",
      "--disable-sync",
      "--disable-quic",
    ],
  });
});

after(async () => {
  await browser?.close();
  http?.close();
  backend?.close();
  await node?.kill();
});

test("a page subscribes, receives, survives a restart and recovers", async () => {
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  const params = new URLSearchParams({ url: node.url, token: token("browser"), channel: "h:page" });
  await page.goto(`http://127.0.0.1:${http.address().port}/?${params}`);
  const received = () => page.evaluate(() => window.sidecastTest.received);
  const events = () => page.evaluate(() => window.sidecastTest.events);
  await until("subscribed", async () => (await events()).length === 1);
  await backend.publish("h:page", { n: 1 });
  await until("the first publication", async () => (await received()).length === 1);

  // The node restarts: the page reconnects; its memory engine starts a new stream, which the
  // page is told it could not recover.
  await node.restart();
  await until("resubscribed after the restart", async () => (await events()).some((e) => e.resumed));
  assert.ok((await events()).some((e) => e.name === "unrecovered"));
  await backend.publish("h:page", { n: 2 });
  await until("a publication after the restart", async () => (await received()).length === 2);

  // The backend drops the connection while publishing on: nothing lost, nothing twice.
  const publishing = (async () => {
    for (let n = 3; n <= 12; n++) await backend.publish("h:page", { n });
  })();
  await backend.disconnect("browser", 4006);
  await publishing;
  await until("all twelve", async () => (await received()).length >= 12);
  assert.deepEqual(await received(), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
  assert.equal(await page.textContent("#state"), "connected");
  assert.deepEqual(errors, []);
  const shots = fileURLToPath(new URL("../test-results/", import.meta.url));
  mkdirSync(shots, { recursive: true });
  await page.screenshot({ path: join(shots, "browser.png") });
});

test("a page on the app's origin connects with its session cookie, without a token", async () => {
  const origin = `http://127.0.0.1:${http.address().port}`;
  // A node that takes the cookie `sid` from pages of this origin only.
  const cookieNode = await startSidecast({
    file: '[namespaces.h]\nhistory_size = 100\nhistory_ttl = "5m"\npublic = true\n',
    settings: { auth_cookie: "sid", allowed_origins: origin },
  });
  const cookieBackend = control(cookieNode.grpc);
  const context = await browser.newContext();
  try {
    // Cookies are per host, not per port: the browser sends it with the upgrade to the node.
    await context.addCookies([
      { name: "sid", value: token("cookie-page"), url: origin, httpOnly: true, sameSite: "Lax" },
    ]);
    const page = await context.newPage();
    const errors = [];
    page.on("pageerror", (e) => errors.push(e.message));
    const params = new URLSearchParams({ url: cookieNode.url, cookie: "1", channel: "h:cookie" });
    await page.goto(`${origin}/?${params}`);
    const events = () => page.evaluate(() => window.sidecastTest.events);
    await until("subscribed", async () => (await events()).length === 1);
    await cookieBackend.publish("h:cookie", { n: 1 });
    await until("the publication", async () => (await page.evaluate(() => window.sidecastTest.received)).length === 1);
    assert.equal(await page.textContent("#state"), "connected");
    assert.deepEqual(errors, []);
  } finally {
    await context.close();
    cookieBackend.close();
    await cookieNode.kill();
  }
});

test("behind a proxy that blocks WebSockets a page goes on over SSE, survives a restart and recovers", async () => {
  // The proxy is another origin than the page's: the stream and the commands are CORS
  // requests (with a preflight for the Authorization header).
  const proxy = await blockingProxy(node.url);
  try {
    const page = await browser.newPage();
    const errors = [];
    page.on("pageerror", (e) => errors.push(e.message));
    const params = new URLSearchParams({ url: proxy.url, token: token("sse-page"), channel: "h:sse" });
    await page.goto(`http://127.0.0.1:${http.address().port}/?${params}`);
    const received = () => page.evaluate(() => window.sidecastTest.received);
    const events = () => page.evaluate(() => window.sidecastTest.events);
    await until("subscribed", async () => (await events()).length === 1);
    assert.equal(await page.evaluate(() => window.sidecastTest.client.transport), "sse");
    assert.ok(proxy.upgrades >= 2);
    await backend.publish("h:sse", { n: 1 });
    await until("the first publication", async () => (await received()).length === 1);
    // A call from the page: a POST whose reply comes on the stream.
    const stats = await page.evaluate(() => window.sidecastTest.client.presenceStats("h:sse").catch((e) => e.code));
    assert.equal(stats, "not_available");
    // The node restarts: the page comes back over SSE, told its gap could not be recovered
    // (the memory engine starts a new stream).
    await node.restart();
    await until("resubscribed after the restart", async () => (await events()).some((e) => e.resumed));
    assert.ok((await events()).some((e) => e.name === "unrecovered"));
    // The backend drops the connection while publishing on: the page reconnects over SSE
    // and recovers, nothing lost, nothing twice.
    const publishing = (async () => {
      for (let n = 2; n <= 8; n++) await backend.publish("h:sse", { n });
    })();
    await backend.disconnect("sse-page", 4006);
    await publishing;
    await until("all eight", async () => (await received()).length >= 8);
    assert.deepEqual(await received(), [1, 2, 3, 4, 5, 6, 7, 8]);
    assert.equal(await page.evaluate(() => window.sidecastTest.client.transport), "sse");
    assert.equal(await page.textContent("#state"), "connected");
    assert.deepEqual(errors, []);
    await page.close();
  } finally {
    proxy.close();
  }
});

test("a plain EventSource reads the stream and recovers by itself through Last-Event-ID", async () => {
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  const base = node.url.replace("ws://", "http://").replace(/\/ws$/, "");
  const params = new URLSearchParams({ base, token: token("es-page") });
  await page.goto(`http://127.0.0.1:${http.address().port}/eventsource?${params}`);
  const messages = () => page.evaluate(() => window.messages);
  const pubs = async () => (await messages()).filter((m) => m.type === "pub").map((m) => m.data.n);
  await until("subscribed", async () => (await messages()).some((m) => m.type === "sub"));
  await backend.publish("h:es", { n: 1 });
  await until("the first publication", async () => (await pubs()).length === 1);
  // The stream ends (a backend's 4006); the browser reconnects on its own a second later,
  // sending the last event id, and the `sub` push brings back what was published meanwhile.
  await backend.disconnect("es-page", 4006);
  await backend.publish("h:es", { n: 2 });
  await backend.publish("h:es", { n: 3 });
  await until("resubscribed", async () => (await messages()).filter((m) => m.type === "sub").length === 2);
  const sub = (await messages()).filter((m) => m.type === "sub")[1];
  assert.equal(sub.recovered, true);
  assert.deepEqual(sub.publications.map((p) => p.data.n), [2, 3]);
  await backend.publish("h:es", { n: 4 });
  await until("live again", async () => (await pubs()).includes(4));
  assert.deepEqual(await pubs(), [1, 4]);
  assert.deepEqual(errors, []);
  await page.close();
});

test("the React binding subscribes while mounted and lets go on unmount", async () => {
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  const params = new URLSearchParams({
    url: node.url,
    token: token("react"),
    channel: "h:react",
    room: "room:1",
  });
  await page.goto(`http://127.0.0.1:${http.address().port}/react?${params}`);
  const feed = () => page.textContent("#feed");
  await until("subscribed", async () => (await feed())?.startsWith("subscribed"));
  await backend.publish("h:react", { n: 1 });
  await until("rendered", async () => (await feed()) === 'subscribed: {"n":1}');
  // usePresence: the page itself, then another client joining and leaving.
  const people = () => page.textContent("#people");
  await until("present", async () => (await people()) === "react");
  const other = new Client({ url: node.url, token: token("zoe"), WebSocket });
  other.connect();
  const room = other.subscribe("room:1");
  await until("zoe joined", async () => (await people()) === "react,zoe");
  await room.unsubscribe();
  await until("zoe left", async () => (await people()) === "react");
  other.disconnect();
  await page.evaluate(() => window.sidecastReact.hide());
  await until("unmounted", async () => (await feed()) === "unmounted");
  await until("unsubscribed", () =>
    page.evaluate(() => window.sidecastReact.client.getSubscription("h:react") === undefined),
  );
  await backend.publish("h:react", { n: 2 });
  // A round trip through the node: a publication sent before it would have arrived by now.
  await page.evaluate(() => window.sidecastReact.client.presenceStats("h:react").catch((e) => e.code));
  assert.deepEqual(await page.evaluate(() => window.sidecastReact.received), [1]);
  assert.deepEqual(errors, []);
});
