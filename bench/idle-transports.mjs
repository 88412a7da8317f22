// Opens N idle connections of one transport (`ws` or `sse`) against the node of pid PID on
// PORT, each authenticated, waits 2 s, and prints the node's RSS growth per connection.
//   node bench/idle-transports.mjs PID PORT ws|sse N     (bench/idle-transports runs both)
import http from "node:http";
import { readFileSync } from "node:fs";
import { createHmac } from "node:crypto";
import WebSocket from "../clients/js/node_modules/ws/index.js";
const [pid, port, kind, n] = [process.argv[2], process.argv[3], process.argv[4], Number(process.argv[5])];
const rss = () => Number(readFileSync(`/proc/${pid}/status`, "utf8").match(/VmRSS:\s+(\d+)/)[1]);
const b64 = (s) => Buffer.from(s).toString("base64url");
const tok = (u) => { const h = b64(JSON.stringify({ alg: "HS256" })); const b = b64(JSON.stringify({ sub: u, exp: Math.floor(Date.now() / 1000) + 3600 })); return `${h}.${b}.${createHmac("sha256", "bench-secret").update(`${h}.${b}`).digest("base64url")}`; };
const before = rss();
const agent = new http.Agent({ keepAlive: false, maxSockets: Infinity });
let open = 0;
await new Promise((resolve) => {
  for (let i = 0; i < n; i++) {
    if (kind === "sse") {
      http.get({ host: "127.0.0.1", port, path: "/sse?token=" + tok("u" + i), agent }, (res) => {
        let seen = "";
        res.on("data", (d) => { if (seen !== null) { seen += d; if (seen.includes('"connected"')) { seen = null; if (++open === n) resolve(); } } });
      });
    } else {
      const ws = new WebSocket(`ws://127.0.0.1:${port}/ws`, "sidecast.v1");
      ws.on("open", () => ws.send(JSON.stringify({ id: 1, op: "connect", token: tok("u" + i) })));
      ws.on("message", () => { if (++open === n) resolve(); });
    }
  }
});
await new Promise((r) => setTimeout(r, 2000));
const after = rss();
console.log(`${kind} ${n}: RSS ${before} -> ${after} KiB, ${(((after - before) * 1024) / n).toFixed(0)} B per connection`);
process.exit(0);
