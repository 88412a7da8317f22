// The client side of tests/container/run.sh: a @sidecast/client connection through the
// container's WebSocket port, a publication from the backend through its gRPC port, then
// `docker stop`, during which the client must be closed with 1001 (the drain).
// Usage: node client.mjs WS_URL GRPC_ADDRESS CONTAINER
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createRequire } from "node:module";
import { promisify } from "node:util";

import { Client } from "../../clients/js/dist/index.js";
import { control, next, token } from "../../clients/js/test/helpers.mjs";

const WebSocket = createRequire(new URL("../../clients/js/package.json", import.meta.url))("ws");
const [url, grpcAddress, container] = process.argv.slice(2);

const backend = control(grpcAddress);
// No reconnect during the test: the drain's close is what is checked.
const client = new Client({
  url,
  token: token("alice", { channels: ["news"] }),
  WebSocket,
  backoff: { minDelay: 60_000, maxDelay: 60_000 },
});
try {
  const connected = next(client, "connected");
  client.connect();
  assert.equal((await connected).user, "alice");
  const sub = client.subscribe("news");
  await next(sub, "subscribed");
  const publication = next(sub, "publication");
  await backend.publish("news", { from: "the backend" });
  assert.deepEqual((await publication).data, { from: "the backend" });
  console.error("tests/container: a client connected through the container and received a publication");

  const closed = next(client, "disconnected");
  const stopped = promisify(execFile)("docker", ["stop", "-t", "20", container]);
  const { code, reason } = await closed;
  assert.equal(code, 1001, `closed with ${code} ${reason}`);
  assert.equal(reason, "server shutting down");
  await stopped;
} finally {
  client.disconnect();
  backend.close();
}
