// Test support: a real sidecast started from the build, tokens, and the backend's gRPC calls.

import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtempSync, writeFileSync } from "node:fs";
import { createServer as createHttpServer, request as httpRequest } from "node:http";
import { connect, createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const root = fileURLToPath(new URL("../../../", import.meta.url));
export const SECRET = "sdk-test-secret";
/** Every wait in these tests ends by then: a broken behaviour fails, never hangs. */
export const PATIENCE = 10_000;

async function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
    server.on("error", reject);
  });
}

/** A sidecast node on loopback; `file` is a TOML configuration (namespaces), `settings`
 * more `--set` pairs. restart() starts it again on the same ports. A port found free can be
 * taken by someone else before the node binds it: then the node is started on other ports. */
export async function startSidecast(options = {}) {
  for (let attempt = 1; ; attempt++) {
    try {
      return await tryStart(options);
    } catch (e) {
      if (attempt >= 5) throw e;
    }
  }
}

async function tryStart({ file = "", settings = {} }) {
  const bin = process.env.SIDECAST_BIN ?? join(root, "target/debug/sidecast");
  const dir = mkdtempSync(join(tmpdir(), "sidecast-sdk-"));
  const config = join(dir, "sidecast.toml");
  writeFileSync(config, file);
  const ports = { ws: await freePort(), grpc: await freePort(), admin: await freePort() };
  const args = [
    "--config", config,
    "--ws-addr", `127.0.0.1:${ports.ws}`,
    "--grpc-addr", `127.0.0.1:${ports.grpc}`,
    "--admin-addr", `127.0.0.1:${ports.admin}`,
    "--set", `token_hmac_secret=${SECRET}`,
    "--set", "shutdown_timeout=2s",
    "--set", "drain_window=100ms",
    ...Object.entries(settings).flatMap(([k, v]) => ["--set", `${k}=${v}`]),
  ];
  let child = null;
  const node = {
    url: `ws://127.0.0.1:${ports.ws}/ws`,
    grpc: `127.0.0.1:${ports.grpc}`,
    admin: `http://127.0.0.1:${ports.admin}`,
    async start() {
      const c = spawn(bin, args, { stdio: ["ignore", "ignore", "pipe"], env: { ...process.env, SIDECAST_LOG: "warn" } });
      child = c;
      let stderr = "";
      c.stderr.on("data", (d) => (stderr += d));
      let exited = false;
      c.on("exit", () => (exited = true));
      await until(`sidecast ready on ${ports.admin}`, async () => {
        if (exited) throw new Error(`sidecast exited at start: ${stderr}`);
        try {
          const res = await fetch(`http://127.0.0.1:${ports.admin}/readyz`);
          return res.status === 200;
        } catch {
          return false;
        }
      });
    },
    /** SIGKILL: the node vanishes (clients see their sockets end without a Close). */
    kill() {
      const c = child;
      child = null;
      if (!c || c.exitCode !== null) return Promise.resolve();
      return new Promise((resolve) => {
        c.on("exit", resolve);
        c.kill("SIGKILL");
      });
    },
    /** Sends `signal` to the node: SIGTERM drains it (1001), SIGSTOP freezes it (its
     * sockets stay open but silent), SIGCONT wakes it. */
    signal(signal) {
      child?.kill(signal);
    },
    /** Waits for the node to exit (after SIGTERM). */
    exited() {
      const c = child;
      child = null;
      if (!c || c.exitCode !== null) return Promise.resolve();
      return new Promise((resolve) => c.on("exit", resolve));
    },
    async restart() {
      await node.kill();
      await node.start();
    },
  };
  try {
    await node.start();
  } catch (e) {
    await node.kill();
    throw e;
  }
  return node;
}

/** A redis-server of this test on a free loopback port, without persistence. */
export async function startRedis() {
  const port = await freePort();
  const child = spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], {
    stdio: "ignore",
  });
  const redis = {
    url: `redis://127.0.0.1:${port}`,
    /** Sends one command (its words) and resolves with the raw reply. */
    command(...words) {
      return new Promise((resolve, reject) => {
        const socket = connect(port, "127.0.0.1");
        const encoded = `*${words.length}\r\n` + words.map((w) => `$${Buffer.byteLength(w)}\r\n${w}\r\n`).join("");
        socket.on("connect", () => socket.write(encoded));
        socket.on("data", (d) => {
          socket.destroy();
          resolve(d.toString());
        });
        socket.on("error", reject);
      });
    },
    kill() {
      if (child.exitCode !== null) return Promise.resolve();
      return new Promise((resolve) => {
        child.on("exit", resolve);
        child.kill("SIGKILL");
      });
    },
  };
  await until(`redis-server on ${port}`, async () => {
    try {
      return (await redis.command("PING")).startsWith("+PONG");
    } catch {
      return false;
    }
  });
  return redis;
}

/** An HTTP proxy on loopback in front of the node at `target` (its ws URL) that refuses
 * every WebSocket upgrade with 403 and forwards everything else as it streams, as some
 * corporate proxies do. `url` is the node's ws URL through it; `upgrades` counts refusals. */
export async function blockingProxy(target) {
  const upstream = new URL(target);
  const proxy = { upgrades: 0 };
  const server = createHttpServer((req, res) => {
    const forward = httpRequest(
      { host: upstream.hostname, port: upstream.port, method: req.method, path: req.url, headers: req.headers },
      (answer) => {
        res.writeHead(answer.statusCode, answer.headers);
        answer.pipe(res);
        // The node went away mid-answer: the client's connection ends too.
        answer.on("close", () => {
          if (!answer.complete) res.destroy();
        });
      },
    );
    forward.on("error", () => res.destroy());
    res.on("close", () => forward.destroy());
    req.pipe(forward);
  });
  server.on("upgrade", (req, socket) => {
    proxy.upgrades += 1;
    socket.end("HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  proxy.url = `ws://127.0.0.1:${server.address().port}/ws`;
  proxy.close = () => {
    server.closeAllConnections();
    server.close();
  };
  return proxy;
}

/** Polls `check` until it holds, failing after PATIENCE. */
export async function until(what, check) {
  const deadline = Date.now() + PATIENCE;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for: ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** The next event `name` of `emitter` that satisfies `predicate`, within PATIENCE. */
export function next(emitter, name, predicate = () => true) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`timed out waiting for the event ${name}`));
    }, PATIENCE);
    const off = emitter.on(name, (event) => {
      if (!predicate(event)) return;
      clearTimeout(timer);
      off();
      resolve(event);
    });
  });
}

function b64url(data) {
  return Buffer.from(data).toString("base64url");
}

/** An HS256 token for `user`, expiring in `ttl` seconds, with extra claims. */
export function token(user, claims = {}, ttl = 3600) {
  const now = Math.floor(Date.now() / 1000);
  const header = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify({ sub: user, iat: now, exp: now + ttl, ...claims }));
  const signature = createHmac("sha256", SECRET).update(`${header}.${body}`).digest("base64url");
  return `${header}.${body}.${signature}`;
}

/** The backend: the generated Control client of proto/sidecast/v1/control.proto. */
export function control(address) {
  const definition = protoLoader.loadSync(join(root, "proto/sidecast/v1/control.proto"), {
    keepCase: true,
    longs: Number,
    defaults: true,
  });
  const { Control } = grpc.loadPackageDefinition(definition).sidecast.v1;
  const client = new Control(address, grpc.credentials.createInsecure());
  const unary = (method) => (request) =>
    new Promise((resolve, reject) =>
      // waitForReady: a node that restarts is waited for (within PATIENCE), not failed at once.
      client[method](request, { waitForReady: true, deadline: Date.now() + PATIENCE }, (error, response) =>
        error ? reject(error) : resolve(response),
      ),
    );
  return {
    publish: (channel, data, extra = {}) => unary("Publish")({ channel, data: Buffer.from(JSON.stringify(data)), ...extra }),
    disconnect: (user, code, reason = "") => unary("Disconnect")({ target: { user }, code, reason }),
    receipt: (channel, offset) => unary("Receipt")({ channel, offset }),
    close: () => client.close(),
  };
}
