// Interop test: tokens minted with the `jose` npm package (exactly the way a
// Next.js route handler would, via `new SignJWT(...)`) must be accepted by
// sidecast, and bad tokens must be rejected with the right close codes.
//
// Run by a Rust integration test as `node tests/js/jose_connect.mjs` with:
//   SIDECAST_WS_URL     e.g. ws://127.0.0.1:PORT/ws
//   SIDECAST_HS_SECRET  HS256 shared secret (raw string)
//   SIDECAST_ES256_KEY  path to a PKCS#8 PEM private key for ES256
// Optional:
//   SIDECAST_JS_STEP_TIMEOUT_MS  per-wait timeout (default 5000)
//
// On success the last line on stdout is exactly:
//   jose interop: 4 passed, 0 failed
// On any failure a message is printed to stderr and the exit code is 1.

import { readFileSync } from 'node:fs';
import { SignJWT, importPKCS8 } from 'jose';
import WebSocket from 'ws';

const SUBPROTOCOL = 'sidecast.v1';
const STEP_TIMEOUT_MS = Number(process.env.SIDECAST_JS_STEP_TIMEOUT_MS) || 5000;
const TOTAL_TESTS = 4;
const CLOSE_AUTH_FAILED = 4001;
const CLOSE_TOKEN_EXPIRED = 4002;

let passed = 0;
let currentTest = '(setup)';

function fail(message) {
  process.stderr.write(`jose interop: FAIL in ${currentTest}: ${message}\n`);
  process.stderr.write(`jose interop: ${passed} passed, 1 failed\n`);
  process.exit(1);
}

process.on('unhandledRejection', (err) => fail(`unhandled rejection: ${err?.stack ?? err}`));
process.on('uncaughtException', (err) => fail(`uncaught exception: ${err?.stack ?? err}`));

// Global watchdog: every wait has its own timeout, this is only a last resort.
setTimeout(() => fail('global watchdog fired (script ran for more than 60 s)'), 60_000).unref();

function requireEnv(name) {
  const value = process.env[name];
  if (value === undefined || value === '') fail(`environment variable ${name} is not set`);
  return value;
}

function step(message) {
  process.stdout.write(`  ok - ${message}\n`);
}

function show(value) {
  const s = JSON.stringify(value);
  return s.length > 400 ? `${s.slice(0, 400)}...` : s;
}

// ---------------------------------------------------------------------------
// A small wrapper around a `ws` client socket: buffers incoming JSON messages
// (dropping server heartbeats `{"type":"ping"}`), remembers close/error, and
// offers awaitable helpers that each time out after STEP_TIMEOUT_MS.
// ---------------------------------------------------------------------------
class Conn {
  constructor(url, label) {
    this.label = label;
    this.inbox = [];
    this.seen = []; // every non-ping message, for diagnostics
    this.opened = false;
    this.closeInfo = null;
    this.error = null;
    this.httpRejection = null;
    this.waiters = new Set();

    this.ws = new WebSocket(url, [SUBPROTOCOL], { handshakeTimeout: STEP_TIMEOUT_MS });

    this.ws.on('open', () => {
      this.opened = true;
      this.poke();
    });
    this.ws.on('message', (data, isBinary) => {
      let msg;
      if (isBinary) {
        msg = { __invalid: `unexpected binary frame (${data.length} bytes)` };
      } else {
        const text = data.toString('utf8');
        try {
          msg = JSON.parse(text);
        } catch {
          msg = { __invalid: `text frame is not JSON: ${text.slice(0, 200)}` };
        }
        if (msg === null || typeof msg !== 'object' || Array.isArray(msg)) {
          msg = { __invalid: `text frame is not a JSON object: ${text.slice(0, 200)}` };
        }
      }
      if (msg.type === 'ping') return; // server heartbeat
      this.seen.push(msg);
      this.inbox.push(msg);
      this.poke();
    });
    this.ws.on('close', (code, reason) => {
      this.closeInfo = { code, reason: reason.toString('utf8') };
      this.poke();
    });
    this.ws.on('error', (err) => {
      this.error = err;
      this.poke();
    });
    this.ws.on('unexpected-response', (req, res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (chunk) => {
        if (body.length < 500) body += chunk;
      });
      const done = () => {
        if (this.httpRejection) return;
        this.httpRejection = `HTTP ${res.statusCode} ${res.statusMessage ?? ''} body=${JSON.stringify(body.slice(0, 500))}`;
        this.poke();
        req.destroy();
      };
      res.on('end', done);
      res.on('error', done);
      res.on('close', done);
    });
  }

  poke() {
    for (const w of [...this.waiters]) w();
  }

  closeText() {
    return this.closeInfo
      ? `code ${this.closeInfo.code}, reason ${JSON.stringify(this.closeInfo.reason)}`
      : 'not closed';
  }

  // Resolve with the first non-undefined value returned by `check`, which is
  // re-evaluated on every socket event; reject if it throws or on timeout.
  until(desc, check) {
    return new Promise((resolve, reject) => {
      const cleanup = () => {
        clearTimeout(timer);
        this.waiters.delete(waiter);
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(
          new Error(
            `[${this.label}] timed out after ${STEP_TIMEOUT_MS} ms waiting for ${desc}` +
              ` (socket state ${this.ws.readyState}, ${this.closeText()},` +
              ` messages seen: ${show(this.seen)})`,
          ),
        );
      }, STEP_TIMEOUT_MS);
      const waiter = () => {
        let result;
        try {
          result = check();
        } catch (err) {
          cleanup();
          reject(err);
          return;
        }
        if (result !== undefined) {
          cleanup();
          resolve(result);
        }
      };
      this.waiters.add(waiter);
      waiter();
    });
  }

  async open() {
    await this.until('the WebSocket handshake to complete', () => {
      if (this.opened) return true;
      if (this.httpRejection) {
        throw new Error(`[${this.label}] WebSocket upgrade rejected: ${this.httpRejection}`);
      }
      if (this.error) {
        throw new Error(`[${this.label}] WebSocket handshake failed: ${this.error.message}`);
      }
      if (this.closeInfo) {
        throw new Error(`[${this.label}] socket closed during handshake (${this.closeText()})`);
      }
      return undefined;
    });
    if (this.ws.protocol !== SUBPROTOCOL) {
      throw new Error(
        `[${this.label}] server selected subprotocol ${JSON.stringify(this.ws.protocol)}, expected ${JSON.stringify(SUBPROTOCOL)}`,
      );
    }
  }

  send(obj) {
    this.ws.send(JSON.stringify(obj), { binary: false });
  }

  // Wait for a message matching `pred`. Server pushes without an `id` are
  // skipped; an `error` reply or a reply with some other id is a failure.
  waitFor(desc, pred) {
    return this.until(desc, () => {
      while (this.inbox.length > 0) {
        const msg = this.inbox.shift();
        if (msg.__invalid) throw new Error(`[${this.label}] ${msg.__invalid} (waiting for ${desc})`);
        if (pred(msg)) return msg;
        if ('error' in msg) {
          throw new Error(`[${this.label}] server replied with an error while waiting for ${desc}: ${show(msg)}`);
        }
        if ('id' in msg) {
          throw new Error(`[${this.label}] unexpected reply while waiting for ${desc}: ${show(msg)}`);
        }
        // Unrelated push: ignore.
      }
      if (this.closeInfo) {
        throw new Error(
          `[${this.label}] socket closed (${this.closeText()}) while waiting for ${desc}; messages seen: ${show(this.seen)}`,
        );
      }
      if (this.error) {
        throw new Error(`[${this.label}] socket error while waiting for ${desc}: ${this.error.message}`);
      }
      return undefined;
    });
  }

  // Wait for the server to close the socket; fails early if the server says
  // `connected` (i.e. it accepted a token that it must reject).
  waitClose(desc) {
    return this.until(desc, () => {
      while (this.inbox.length > 0) {
        const msg = this.inbox.shift();
        if (msg.type === 'connected') {
          throw new Error(`[${this.label}] server accepted the connection but should have rejected it: ${show(msg)}`);
        }
        // Anything else (e.g. an error frame sent before the close) is fine.
      }
      if (this.httpRejection) {
        throw new Error(
          `[${this.label}] WebSocket upgrade rejected (${this.httpRejection}); expected the server to accept the upgrade and then close the socket`,
        );
      }
      if (this.closeInfo) return this.closeInfo;
      return undefined;
    });
  }

  dispose() {
    this.waiters.clear();
    try {
      if (this.ws.readyState === WebSocket.OPEN) this.ws.close(1000);
      else if (this.ws.readyState !== WebSocket.CLOSED) this.ws.terminate();
    } catch {
      // ignore
    }
  }
}

async function withConn(url, label, fn) {
  const conn = new Conn(url, label);
  try {
    return await fn(conn);
  } finally {
    conn.dispose();
  }
}

const CLIENT_ID_RE = /^[0-9a-f]{32}$/i;

function expectConnected(conn, msg, user) {
  if (msg.user !== user) {
    throw new Error(`[${conn.label}] connected as ${JSON.stringify(msg.user)}, expected ${JSON.stringify(user)}: ${show(msg)}`);
  }
  if (typeof msg.client !== 'string' || !CLIENT_ID_RE.test(msg.client)) {
    throw new Error(`[${conn.label}] "client" is not 32 hex chars: ${show(msg)}`);
  }
}

// ---------------------------------------------------------------------------

async function main() {
  const wsUrl = requireEnv('SIDECAST_WS_URL');
  const hsSecret = requireEnv('SIDECAST_HS_SECRET');
  const esKeyPath = requireEnv('SIDECAST_ES256_KEY');

  const hsKey = new TextEncoder().encode(hsSecret);
  const wrongHsKey = new TextEncoder().encode(`${hsSecret}-definitely-wrong`);

  let esPem;
  try {
    esPem = readFileSync(esKeyPath, 'utf8');
  } catch (err) {
    fail(`cannot read SIDECAST_ES256_KEY (${esKeyPath}): ${err.message}`);
  }
  const esKey = await importPKCS8(esPem, 'ES256');

  // --- Test 1: HS256 token in the first frame, then subscribe ------------
  currentTest = 'test 1 (HS256 first-frame connect + subscribe)';
  {
    const token = await new SignJWT({ channels: ['chat:*'], info: { name: 'Alice' } })
      .setProtectedHeader({ alg: 'HS256' })
      .setSubject('alice')
      .setIssuedAt()
      .setExpirationTime('5m')
      .sign(hsKey);

    await withConn(wsUrl, 'hs256-first-frame', async (conn) => {
      await conn.open();
      step(`HS256: WebSocket open, subprotocol ${conn.ws.protocol}`);

      conn.send({ id: 1, op: 'connect', token });
      const connected = await conn.waitFor('the "connected" push', (m) => m.type === 'connected');
      expectConnected(conn, connected, 'alice');
      step(`HS256: connected as alice (client ${connected.client})`);

      conn.send({ id: 2, op: 'subscribe', channel: 'chat:lobby' });
      const sub = await conn.waitFor('the reply to id 2 (subscribe chat:lobby)', (m) => m.id === 2);
      if (!('result' in sub)) {
        throw new Error(`[${conn.label}] subscribe chat:lobby reply has no "result": ${show(sub)}`);
      }
      step('HS256: subscribe chat:lobby -> result');

      conn.send({ id: 3, op: 'subscribe', channel: 'news:x' });
      const denied = await conn.waitFor(
        'the reply to id 3 (subscribe news:x)',
        (m) => m.id === 3,
      );
      if ('result' in denied || denied.error?.code !== 'forbidden') {
        throw new Error(`[${conn.label}] subscribe news:x: expected error.code "forbidden", got ${show(denied)}`);
      }
      step('HS256: subscribe news:x -> forbidden');
    });
    passed++;
    console.log(`PASS ${passed}/${TOTAL_TESTS}: HS256 token (first frame) accepted, channel grants enforced`);
  }

  // --- Test 2: ES256 token in the query string -----------------------------
  currentTest = 'test 2 (ES256 query-string connect)';
  {
    const token = await new SignJWT({ channels: ['chat:*'], info: { name: 'Bob' } })
      .setProtectedHeader({ alg: 'ES256' })
      .setSubject('bob')
      .setIssuedAt()
      .setExpirationTime('5m')
      .sign(esKey);

    const url = new URL(wsUrl);
    url.searchParams.set('token', token);
    await withConn(url.toString(), 'es256-query', async (conn) => {
      await conn.open();
      step(`ES256: WebSocket open with ?token=, subprotocol ${conn.ws.protocol}`);
      const connected = await conn.waitFor('the "connected" push', (m) => m.type === 'connected');
      expectConnected(conn, connected, 'bob');
      step(`ES256: connected as bob (client ${connected.client})`);
    });
    passed++;
    console.log(`PASS ${passed}/${TOTAL_TESTS}: ES256 token (query string) accepted`);
  }

  // --- Test 3: HS256 token signed with the wrong secret -> 4001 ------------
  currentTest = 'test 3 (wrong HS256 secret -> close 4001)';
  {
    const token = await new SignJWT({ channels: ['chat:*'] })
      .setProtectedHeader({ alg: 'HS256' })
      .setSubject('alice')
      .setIssuedAt()
      .setExpirationTime('5m')
      .sign(wrongHsKey);

    await withConn(wsUrl, 'hs256-wrong-secret', async (conn) => {
      await conn.open();
      conn.send({ id: 1, op: 'connect', token });
      const { code, reason } = await conn.waitClose(`close code ${CLOSE_AUTH_FAILED}`);
      if (code !== CLOSE_AUTH_FAILED) {
        throw new Error(`[${conn.label}] expected close code ${CLOSE_AUTH_FAILED}, got ${code} (reason ${JSON.stringify(reason)})`);
      }
      step(`wrong secret: closed with ${code} (${JSON.stringify(reason)})`);
    });
    passed++;
    console.log(`PASS ${passed}/${TOTAL_TESTS}: token with wrong signature rejected with ${CLOSE_AUTH_FAILED}`);
  }

  // --- Test 4: expired HS256 token -> 4002 ----------------------------------
  currentTest = 'test 4 (expired HS256 token -> close 4002)';
  {
    const now = Math.floor(Date.now() / 1000);
    const token = await new SignJWT({ channels: ['chat:*'] })
      .setProtectedHeader({ alg: 'HS256' })
      .setSubject('alice')
      .setIssuedAt(now - 120)
      .setExpirationTime(now - 60)
      .sign(hsKey);

    await withConn(wsUrl, 'hs256-expired', async (conn) => {
      await conn.open();
      conn.send({ id: 1, op: 'connect', token });
      const { code, reason } = await conn.waitClose(`close code ${CLOSE_TOKEN_EXPIRED}`);
      if (code !== CLOSE_TOKEN_EXPIRED) {
        throw new Error(`[${conn.label}] expected close code ${CLOSE_TOKEN_EXPIRED}, got ${code} (reason ${JSON.stringify(reason)})`);
      }
      step(`expired token: closed with ${code} (${JSON.stringify(reason)})`);
    });
    passed++;
    console.log(`PASS ${passed}/${TOTAL_TESTS}: expired token rejected with ${CLOSE_TOKEN_EXPIRED}`);
  }

  console.log(`jose interop: ${passed} passed, 0 failed`);
  process.exit(0);
}

main().catch((err) => fail(err?.message ?? String(err)));
