// Test support: a real sidecast (started from this checkout's build by the client SDK's test
// helpers) and real WebSocket clients of @sidecast/client.

import { after, before } from "node:test";

import WebSocket from "ws";

import { Client } from "../../js/dist/index.js";
import { Sidecast } from "../dist/index.js";
import { startSidecast } from "../../js/test/helpers.mjs";
export { PATIENCE, SECRET, next, startSidecast, until } from "../../js/test/helpers.mjs";

/** A node with `file` as its configuration for the tests of one file, and a Sidecast on it
 * (`ctx.node`, `ctx.sidecast` once the tests run); both stopped, and the clients closed, after. */
export function nodeForTests(file) {
  const ctx = {};
  before(async () => {
    ctx.node = await startSidecast({ file });
    ctx.sidecast = new Sidecast({ address: ctx.node.grpc });
  });
  after(async () => {
    closeAll();
    ctx.sidecast.close();
    await ctx.node.kill();
  });
  return ctx;
}

/** A connected @sidecast/client for `token` (or getToken); disconnected by `closeAll`. */
const clients = [];
export function client(url, options) {
  const c = new Client({
    url,
    WebSocket,
    backoff: { minDelay: 50, maxDelay: 200, drainSpread: 200 },
    timeout: 5000,
    ...options,
  });
  clients.push(c);
  return c;
}

export function closeAll() {
  for (const c of clients.splice(0)) c.disconnect();
}

/** Collects what a handler receives, and waits (with a deadline) for what it should have. */
export class Recorder {
  constructor() {
    this.items = [];
    this.waiters = [];
  }
  push(item) {
    this.items.push(item);
    for (const w of [...this.waiters]) w();
  }
  /** Resolves with the first recorded item matching `predicate`, failing after PATIENCE. */
  async find(what, predicate, patience = 10_000) {
    const deadline = Date.now() + patience;
    for (;;) {
      const found = this.items.find(predicate);
      if (found) return found;
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${what}; got ${JSON.stringify(this.items)}`);
      await new Promise((resolve) => {
        const timer = setTimeout(done, left);
        const waiters = this.waiters;
        function done() {
          clearTimeout(timer);
          waiters.splice(waiters.indexOf(done), 1);
          resolve();
        }
        waiters.push(done);
      });
    }
  }
}
