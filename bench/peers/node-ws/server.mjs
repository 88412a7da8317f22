// A minimal broadcast server on Node's `ws`, a side-by-side peer for sidecast benchmarks.
//
// It speaks the subset of sidecast's client protocol (docs/protocol.md) that the load
// generator uses: connect (the JWT is decoded, NOT verified), subscribe, unsubscribe,
// ping/pong, and `pub` pushes. Publications come in over plain HTTP:
//   POST /publish?channel=NAME   body: the JSON data   -> 200 {"delivered":N}
//   GET  /stats                                       -> 200 {"connections":N,"channels":M,"slow_closed":K}
//
// Env: PORT (WebSocket, default 8081, path /ws), PUBLISH_PORT (HTTP, default 8091).
// Both listen on 127.0.0.1 only.

import { createServer } from 'node:http';
import { randomBytes } from 'node:crypto';
import { WebSocket, WebSocketServer } from 'ws';

const HOST = '127.0.0.1';
const WS_PATH = '/ws';
const PORT = portFromEnv('PORT', 8081);
const PUBLISH_PORT = portFromEnv('PUBLISH_PORT', 8091);

const MAX_MESSAGE = 65536; // sidecast's max_message_size
const MAX_PUBLICATION = 65536; // sidecast's max_publication_size
const MAX_BUFFERED = 1024 * 1024; // sidecast's max_queue_bytes
const CLOSE_TIMEOUT_MS = 3000; // sidecast waits 3 s for the client's Close, then cuts TCP

/** channel name -> Set of sockets subscribed to it */
const channels = new Map();
let slowClosed = 0;

// ---------------------------------------------------------------- WebSocket side

const wss = new WebSocketServer({
  host: HOST,
  port: PORT,
  path: WS_PATH,
  perMessageDeflate: false,
  maxPayload: MAX_MESSAGE,
  closeTimeout: CLOSE_TIMEOUT_MS,
});

wss.on('connection', (ws) => {
  ws.user = null; // set by connect
  ws.subs = new Set(); // channels this socket is in
  ws.on('message', (data, isBinary) => onMessage(ws, data, isBinary));
  ws.on('close', () => leaveAll(ws));
  ws.on('error', () => {}); // always followed by 'close'
});

function onMessage(ws, data, isBinary) {
  if (ws.readyState !== WebSocket.OPEN) return; // closing: ignore further input
  if (isBinary) return ws.close(4500, 'binary frames are not supported');

  let msg;
  try {
    msg = JSON.parse(data.toString());
  } catch {
    return ws.close(4500, 'invalid JSON');
  }
  if (msg === null || typeof msg !== 'object' || Array.isArray(msg)) {
    return ws.close(4500, 'expected a JSON object');
  }

  const { id, op } = msg;
  if (op === 'pong') return; // with or without an id, never answered
  if (id === undefined) return ws.close(4500, 'missing id');
  if (!Number.isSafeInteger(id) || id < 0) return ws.close(4500, 'id must be a non-negative integer');

  switch (op) {
    case 'connect':
      return onConnect(ws, id, msg.token);
    case 'subscribe':
    case 'unsubscribe':
    case 'ping':
      if (ws.user === null) return ws.close(4001, 'connect first');
      break;
    case undefined:
      return replyError(ws, id, 'missing op');
    default:
      return replyError(ws, id, `unknown op ${JSON.stringify(String(op))}`);
  }

  if (op === 'ping') return replyOk(ws, id);

  const { channel } = msg;
  if (channel === undefined) return replyError(ws, id, 'missing channel');
  if (typeof channel !== 'string') return replyError(ws, id, 'channel must be a string');
  if (channel === '') return replyError(ws, id, 'invalid channel name');

  if (op === 'subscribe') {
    if (ws.subs.has(channel)) {
      return reply(ws, `{"id":${id},"error":{"code":"already_subscribed","message":"already subscribed"}}`);
    }
    // Reply first: on this single thread no publication can slip in between.
    if (replyOk(ws, id)) join(ws, channel);
  } else {
    leave(ws, channel);
    replyOk(ws, id);
  }
}

function onConnect(ws, id, token) {
  if (ws.user !== null) return replyError(ws, id, 'already connected');
  if (typeof token !== 'string') return replyError(ws, id, 'missing token');

  const claims = decodeJwtPayload(token);
  if (claims === null) return ws.close(4001, 'malformed token');
  const { sub, subs } = claims;
  if (typeof sub !== 'string' || sub === '') return ws.close(4001, 'missing sub claim');

  ws.user = sub;
  const connected = JSON.stringify({
    type: 'connected',
    version: 1,
    client: randomBytes(16).toString('hex'),
    user: sub,
  });
  if (!reply(ws, connected)) return;

  if (!Array.isArray(subs)) return;
  for (const channel of subs) {
    if (typeof channel !== 'string' || channel === '' || ws.subs.has(channel)) continue;
    if (!reply(ws, `{"type":"sub","channel":${JSON.stringify(channel)}}`)) return;
    join(ws, channel);
  }
}

/** The JWT's payload (middle part, base64url JSON), or null. No signature check. */
function decodeJwtPayload(token) {
  const parts = token.split('.');
  if (parts.length !== 3) return null;
  try {
    const claims = JSON.parse(Buffer.from(parts[1], 'base64url').toString());
    return claims !== null && typeof claims === 'object' && !Array.isArray(claims) ? claims : null;
  } catch {
    return null;
  }
}

function join(ws, channel) {
  let sockets = channels.get(channel);
  if (sockets === undefined) {
    sockets = new Set();
    channels.set(channel, sockets);
  }
  sockets.add(ws);
  ws.subs.add(channel);
}

function leave(ws, channel) {
  if (!ws.subs.delete(channel)) return;
  const sockets = channels.get(channel);
  sockets.delete(ws);
  if (sockets.size === 0) channels.delete(channel);
}

function leaveAll(ws) {
  for (const channel of ws.subs) {
    const sockets = channels.get(channel);
    sockets.delete(ws);
    if (sockets.size === 0) channels.delete(channel);
  }
  ws.subs.clear();
}

function replyOk(ws, id) {
  return reply(ws, `{"id":${id},"result":{}}`);
}

function replyError(ws, id, message) {
  return reply(ws, `{"id":${id},"error":{"code":"bad_request","message":${JSON.stringify(message)}}}`);
}

/** Send one text frame, honouring the 1 MiB bound. False when the socket is gone or was closed. */
function reply(ws, text) {
  if (ws.readyState !== WebSocket.OPEN) return false;
  if (ws.bufferedAmount + Buffer.byteLength(text) > MAX_BUFFERED) {
    closeSlow(ws);
    return false;
  }
  ws.send(text);
  return true;
}

/**
 * The socket's outbound buffer would pass 1 MiB: like sidecast's bounded queue, drop it
 * from every channel at once and send Close 4004. A reader too stuck to drain what is
 * already buffered loses TCP after `closeTimeout` (3 s).
 */
function closeSlow(ws) {
  slowClosed++;
  leaveAll(ws);
  ws.close(4004, 'slow consumer');
}

/** Fan one publication out to the channel's subscribers; returns how many got it. */
function publish(channel, body) {
  const sockets = channels.get(channel);
  if (sockets === undefined) return 0;

  // Built once per publication, sent as-is to every subscriber.
  const text = `{"type":"pub","channel":${JSON.stringify(channel)},"data":${body}}`;
  const bytes = Buffer.byteLength(text);
  let delivered = 0;
  for (const ws of sockets) {
    if (ws.readyState !== WebSocket.OPEN) continue;
    if (ws.bufferedAmount + bytes > MAX_BUFFERED) {
      closeSlow(ws); // removes ws from `sockets`: safe while iterating a Set
      continue;
    }
    ws.send(text);
    delivered++;
  }
  return delivered;
}

// ---------------------------------------------------------------- HTTP publish side

const http = createServer((req, res) => {
  const q = req.url.indexOf('?');
  const path = q === -1 ? req.url : req.url.slice(0, q);

  if (path === '/publish' && req.method === 'POST') {
    const channel = q === -1 ? null : new URLSearchParams(req.url.slice(q + 1)).get('channel');
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size <= MAX_PUBLICATION) chunks.push(chunk);
    });
    req.on('end', () => {
      if (!channel) return respond(res, 400, { error: 'missing channel' });
      if (size > MAX_PUBLICATION) return respond(res, 413, { error: 'publication too large' });
      const body = chunks.length === 1 ? chunks[0].toString() : Buffer.concat(chunks).toString();
      try {
        JSON.parse(body); // sidecast refuses data that is not JSON; so does the peer
      } catch {
        return respond(res, 400, { error: 'data is not valid JSON' });
      }
      respond(res, 200, { delivered: publish(channel, body) });
    });
    return;
  }

  if (path === '/stats' && req.method === 'GET') {
    return respond(res, 200, {
      connections: wss.clients.size,
      channels: channels.size,
      slow_closed: slowClosed,
    });
  }

  req.resume(); // drain any body so the connection stays usable
  respond(res, 404, { error: 'not found' });
});

// The load generator reuses one keep-alive connection.
http.keepAliveTimeout = 60_000;
http.headersTimeout = 65_000;

function respond(res, status, value) {
  const body = JSON.stringify(value);
  res.writeHead(status, {
    'Content-Type': 'application/json',
    'Content-Length': Buffer.byteLength(body),
  });
  res.end(body);
}

// ---------------------------------------------------------------- start and stop

function portFromEnv(name, fallback) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const port = Number(raw);
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    console.error(`node-ws peer: ${name} must be a port number, got ${JSON.stringify(raw)}`);
    process.exit(2);
  }
  return port;
}

function listening(server) {
  return new Promise((resolve, reject) => {
    server.once('listening', resolve);
    server.once('error', reject);
  });
}

const wsReady = listening(wss);
http.listen(PUBLISH_PORT, HOST);
try {
  await Promise.all([wsReady, listening(http)]);
} catch (err) {
  console.error(`node-ws peer: ${err.message}`);
  process.exit(1);
}
console.log(`node-ws peer listening ws=${wss.address().port} publish=${http.address().port}`);

let stopping = false;
function stop() {
  if (stopping) return;
  stopping = true;
  // Hard stop in case some peer never answers the Close.
  setTimeout(() => process.exit(0), 3000).unref();
  http.close();
  http.closeAllConnections();
  for (const ws of wss.clients) ws.close(1001, 'server shutting down');
  const force = setTimeout(() => {
    for (const ws of wss.clients) ws.terminate();
  }, 1000);
  wss.close(() => {
    clearTimeout(force);
    process.exit(0);
  });
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
