// The whole thing in a browser: this Next.js app built and started, a real sidecast beside
// it, two users in Debian's headless Chromium. Screenshots go to test-results/.
//
// By default the test builds the app (unless NEXT_BUILT is set), starts its standalone server
// and a sidecast process. With E2E_APP_URL it drives an app that is already running instead
// (tests/container/run.sh: the app and sidecast as two containers of one pod), reaching
// sidecast's control API at E2E_SIDECAST_GRPC and restarting sidecast with the command in
// E2E_SIDECAST_RESTART (a JSON array).

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdirSync, readFileSync } from "node:fs";
import { createServer } from "node:net";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";

import { chromium } from "playwright-core";
import { Sidecast } from "@sidecast/server";

import { SECRET, startSidecast } from "../../../clients/js/test/helpers.mjs";

const here = fileURLToPath(new URL("..", import.meta.url));
const artifacts = fileURLToPath(new URL(process.env.E2E_APP_URL ? "../test-results/pod/" : "../test-results/", import.meta.url));
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
/** Every wait ends by then: a broken behaviour fails the test, never hangs the run. */
const PATIENCE = 30_000;

let node;
let app;
let appStderr = "";
let appUrl;
let backend;
let browser;
const pageErrors = [];

function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
    server.on("error", reject);
  });
}

/** Runs a command to its end within `patience`, failing with its output otherwise. */
function run(command, args, patience) {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { cwd: here, stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, NEXT_TELEMETRY_DISABLED: "1" } });
    let output = "";
    child.stdout.on("data", (d) => (output += d));
    child.stderr.on("data", (d) => (output += d));
    const timer = setTimeout(() => child.kill("SIGKILL"), patience);
    child.on("exit", (code) => {
      clearTimeout(timer);
      code === 0 ? resolve(output) : reject(new Error(`${command} ${args.join(" ")} failed (${code}):\n${output}`));
    });
  });
}

async function until(what, check, patience = PATIENCE) {
  const deadline = Date.now() + patience;
  for (;;) {
    if (await check()) return;
    if (Date.now() > deadline) throw new Error(`timed out waiting for: ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

before(async () => {
  mkdirSync(artifacts, { recursive: true });
  if (process.env.E2E_APP_URL) {
    appUrl = process.env.E2E_APP_URL;
    const [command, ...args] = JSON.parse(process.env.E2E_SIDECAST_RESTART);
    node = { grpc: process.env.E2E_SIDECAST_GRPC, restart: () => run(command, args, 60_000), kill: async () => {} };
  } else {
    await startLocally();
  }
  backend = new Sidecast({ address: node.grpc });
  await until(`the app at ${appUrl}`, async () => {
    if (app && app.exitCode !== null) throw new Error(`the app exited: ${appStderr}`);
    try {
      return (await fetch(appUrl)).status === 200;
    } catch {
      return false;
    }
  });
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"],
  });
});

/** One build per run (`npm run build`: the standalone server, with its static files) unless
 * NEXT_BUILT says the caller has built it already; then sidecast and the app's server. */
async function startLocally() {
  if (!process.env.NEXT_BUILT) await run("npm", ["run", "build"], 300_000);
  node = await startSidecast({ file: readFileSync(`${here}/sidecast.toml`, "utf8") });
  const port = await freePort();
  appUrl = `http://127.0.0.1:${port}`;
  app = spawn("node", [".next/standalone/examples/nextjs/server.js"], {
    cwd: here,
    stdio: ["ignore", "ignore", "pipe"],
    env: {
      ...process.env,
      NEXT_TELEMETRY_DISABLED: "1",
      HOSTNAME: "127.0.0.1",
      PORT: String(port),
      SIDECAST_GRPC: node.grpc,
      SIDECAST_WS_URL: node.url,
      SIDECAST_TOKEN_SECRET: SECRET,
      SESSION_SECRET: "e2e-session-secret",
    },
    detached: true,
  });
  app.stderr.on("data", (d) => (appStderr += d));
}

after(async () => {
  await browser?.close();
  if (app && app.exitCode === null) process.kill(-app.pid, "SIGKILL");
  backend?.close();
  await node?.kill();
});

/** A signed-in page of `name`, in its own browser context (its own cookie). `path` lets the
 * test cut the page's network path to sidecast: while `path.down`, its WebSockets are refused. */
async function signedIn(name, path = null) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(PATIENCE);
  page.on("pageerror", (e) => pageErrors.push(`${name}: ${e.message}`));
  if (path) {
    await page.routeWebSocket(/\/ws$/, (ws) => {
      if (path.down) {
        ws.close({ code: 1011, reason: "test: network path down" });
        return;
      }
      ws.connectToServer();
    });
  }
  await page.goto(appUrl);
  await page.getByLabel("name").fill(name);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.locator('[data-testid="connection"][data-state="connected"]').waitFor();
  return page;
}

const texts = (page) => page.locator('[data-testid="messages"] .text').allTextContents();
const people = (page) => page.locator('[data-testid="presence"] li').allTextContents();

async function send(page, text) {
  await page.getByLabel("message").fill(text);
  await page.getByRole("button", { name: "Send" }).click();
  await until(`"${text}" shown to its sender`, async () => (await texts(page)).includes(text));
}

test("two users chat, see presence and typing, survive a restart and recover a gap in order", async () => {
  const path = { down: false };
  const alice = await signedIn("alice");
  const bob = await signedIn("bob", path);

  // Presence, both ways.
  for (const page of [alice, bob]) {
    await until("both users in presence", async () => JSON.stringify(await people(page)) === '["alice","bob"]');
  }

  // Typing: bob types, alice sees it.
  await bob.getByLabel("message").fill("hel");
  await alice.getByText("bob is typing…").waitFor();

  // A message through the app's server action reaches the other page.
  await send(alice, "hello bob");
  await until("bob sees alice's message", async () => (await texts(bob)).includes("hello bob"));
  await bob.getByLabel("message").fill("");

  // Client rpc answered by the app's event consumer; the rename is published to the room.
  await bob.getByLabel("room title").fill("Standup");
  await bob.getByRole("button", { name: "Rename" }).click();
  for (const page of [alice, bob]) {
    await page.locator('[data-testid="title"]', { hasText: "Standup" }).waitFor();
  }
  await alice.screenshot({ path: `${artifacts}/1-alice-chatting.png` });

  // sidecast restarts (memory engine): both pages reconnect, and chat goes on.
  const firstNode = (await backend.info()).nodeId;
  await node.restart();
  await until("both users reconnected to the new process", async () => {
    const info = await backend.info();
    const here = (await backend.presence("chat:lobby")).map((c) => c.user).sort();
    return info.nodeId !== firstNode && JSON.stringify(here) === '["alice","bob"]';
  });
  // The new process has a new history (memory engine): the pages say they reloaded it.
  for (const page of [alice, bob]) await page.locator('[data-testid="sync"][data-sync="reloaded"]').waitFor();
  await send(alice, "after the restart");
  await until("bob sees the message after the restart", async () => (await texts(bob)).includes("after the restart"));
  await bob.screenshot({ path: `${artifacts}/2-bob-after-restart.png` });

  // Bob's network path goes down: sidecast closes his socket (4006) and his reconnects are
  // refused while alice sends five messages. When the path is back, bob recovers them from
  // history, in order, once each.
  path.down = true;
  assert.deepEqual(await backend.disconnect({ user: "bob" }, { code: 4006, reason: "test" }), { disconnected: 1 });
  const gap = ["r1", "r2", "r3", "r4", "r5"];
  for (const text of gap) await send(alice, text);
  assert.ok(!(await texts(bob)).includes("r1"), "bob cannot have seen r1 live");
  await bob.locator('[data-testid="connection"]:not([data-state="connected"])').waitFor();
  path.down = false;
  await until("bob recovers the gap", async () => (await texts(bob)).includes("r5"));
  // Recovered from his stream position, not reloaded from history.
  await bob.locator('[data-testid="sync"][data-sync="recovered"]').waitFor();
  assert.deepEqual(await texts(bob), await texts(alice));
  assert.deepEqual((await texts(bob)).slice(-5), gap);
  await bob.screenshot({ path: `${artifacts}/3-bob-recovered.png` });

  assert.deepEqual(pageErrors, []);
});
