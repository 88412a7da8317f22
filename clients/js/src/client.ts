// The connection: connect with a token in the first frame, answer the heartbeat, refresh the
// token before it expires, reconnect by the close code's policy with backoff, restore every
// subscription with its position, and match replies to calls. docs/protocol.md is the
// protocol; docs/sdk.md the model.

import { backoffDelay, type BackoffOptions } from "./backoff.js";
import { afterClose } from "./codes.js";
import { Emitter } from "./emitter.js";
import { SseSocket } from "./sse.js";
import { SidecastError, type ErrorCode } from "./errors.js";
import { Tokens } from "./tokens.js";
import {
  Subscription,
  type AttachResult,
  type ClientInfo,
  type Position,
  type Publication,
  type SubscribeOptions,
  type SubscriptionHost,
} from "./subscription.js";

/** What the client needs of a WebSocket: the browser's, Node 22's, or the `ws` package's. */
export interface WebSocketLike {
  readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
}

export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

export interface ClientOptions {
  /** `ws://host:8080/ws` or `wss://…`. */
  url: string;
  /** A token string; or use `getToken`, which can give a fresh one after 4001/4002 and for
   * refreshes. One of the two is required, unless `cookie` is set. */
  token?: string;
  getToken?: () => Promise<string>;
  /** Authenticate with the app's session cookie, which the browser sends with the upgrade
   * (the server's `auth_cookie`, docs/operations.md): no token needed. A token or getToken,
   * when also given, wins. After the cookie expires (4002) or is refused (4001) the client
   * reconnects with whatever cookie the app has set meanwhile; when the browser has none
   * (logged out), it stops and emits `error`. */
  cookie?: boolean;
  /** A WebSocket implementation; the global one by default (browsers, Node ≥ 22). */
  WebSocket?: WebSocketConstructor;
  /** The transports to try, in order (default both): after `sseAfter` attempts in a row
   * that fail before the transport opens (a proxy that blocks WebSockets), the client goes
   * on with the next one (Server-Sent Events, docs/protocol.md §14), and round again. */
  transports?: Transport[];
  /** The SSE endpoint; by default `url` with http(s) for ws(s) and `/sse` for a final `/ws`. */
  sseUrl?: string;
  /** WebSocket attempts that fail before opening, in a row, before the SSE fallback (default 2). */
  sseAfter?: number;
  /** A fetch implementation for SSE; the global one by default. */
  fetch?: typeof fetch;
  backoff?: BackoffOptions;
  /** How long a call waits for its reply, in ms (default 10000). */
  timeout?: number;
  /** Refresh the token this many seconds before it expires (default: a fifth of its
   * lifetime, at least 5 s). */
  refreshBefore?: number;
}

export type ConnectionState = "disconnected" | "connecting" | "connected";

export type Transport = "websocket" | "sse";

export interface ClientEvents extends Record<string, unknown> {
  state: { state: ConnectionState };
  connected: { client: string; user: string; expiresIn: number };
  /** The connection ended. `reconnecting`: the client will try again by itself. */
  disconnected: { code: number; reason: string; reconnecting: boolean };
  /** A direct message from the backend (Control.Send). */
  message: { data: unknown };
  /** Every publication of every subscription, after its subscription's own listeners. */
  publication: Publication;
  /** Something the app should know that no call returns: a refused refresh, a token
   * callback that failed. */
  error: Error;
  /** A subscription made by the server (the token's `subs` claim or the backend). */
  subscription: Subscription;
}

interface Pending {
  resolve: (result: unknown) => void;
  reject: (error: SidecastError) => void;
  timer: ReturnType<typeof setTimeout> | null;
}

/** A call waiting for the connection. */
interface Waiting {
  wake: () => void;
  fail: (error: SidecastError) => void;
}

/** setTimeout's largest delay: longer ones fire at once. */
const MAX_DELAY = 2 ** 31 - 1;

const OPEN = 1;

export class Client extends Emitter<ClientEvents> {
  private readonly options: ClientOptions;
  private readonly WS: WebSocketConstructor | undefined;
  private ws: WebSocketLike | null = null;
  private readonly transports: Transport[];
  private readonly sseUrl: string | undefined;
  private transportIndex = 0;
  /** Attempts in a row whose transport failed before it opened. */
  private failures = 0;
  private _state: ConnectionState = "disconnected";
  /** The app asked to be connected (connect() without a later disconnect()). */
  private wanted = false;
  private attempt = 0;
  private reconnectTimer: ReturnType<typeof setTimeout> | null = null;
  private watchdog: ReturnType<typeof setTimeout> | null = null;
  private silenceLimit = 0;
  private nextId = 2;
  private readonly pending = new Map<number, Pending>();
  private readonly subscriptions = new Map<string, Subscription>();
  private readonly tokens: Tokens;
  private readonly waiting: Waiting[] = [];
  /** One more for every socket opened or given up: a late callback of an older one is ignored. */
  private generation = 0;
  private readonly host: SubscriptionHost = {
    leave: (s) => this.leave(s),
    forward: (p) => this.emit("publication", p),
    resync: (s) => this.resync(s),
    ack: (s, offset) => {
      if (this._state === "connected") this.send({ op: "ack", channel: s.channel, offset });
    },
  };

  constructor(options: ClientOptions) {
    super();
    if (!options.token && !options.getToken && !options.cookie) {
      throw new Error("sidecast: give a token, getToken or cookie: true");
    }
    const WS =
      options.WebSocket ??
      (globalThis as unknown as { WebSocket?: WebSocketConstructor }).WebSocket;
    this.sseUrl = options.sseUrl ?? sseUrlOf(options.url);
    const canSse = this.sseUrl !== undefined && (options.fetch ?? globalThis.fetch) !== undefined;
    this.transports = (options.transports ?? ["websocket", "sse"]).filter((t) =>
      t === "websocket" ? WS !== undefined : canSse,
    );
    if (this.transports.length === 0) {
      throw new Error("sidecast: no transport: pass options.WebSocket, or a fetch and an sseUrl");
    }
    this.options = options;
    this.WS = WS;
    this.tokens = new Tokens(
      options,
      async (token) => ((await this.call({ op: "refresh", token })) as { expires_in: number }).expires_in,
      (error) => this.emit("error", error),
    );
  }

  get state(): ConnectionState {
    return this._state;
  }

  /** The transport of the current (or next) connection. */
  get transport(): Transport {
    return this.transports[this.transportIndex];
  }

  /** Connects, and keeps reconnecting until disconnect() or a close that forbids it. */
  connect(): void {
    if (this.wanted) return;
    this.wanted = true;
    this.attempt = 0;
    this.transportIndex = 0;
    this.failures = 0;
    void this.open();
  }

  /** Closes the connection and stops reconnecting; subscriptions are kept for the next
   * connect(). */
  disconnect(): void {
    this.wanted = false;
    this.generation += 1;
    this.clearTimers();
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      ws.onclose = null;
      ws.onmessage = null;
      ws.close(1000, "client disconnect");
    }
    this.lost(1000, "client disconnect", false);
  }

  /** Subscribes to a channel (or returns the existing subscription). The subscription is
   * made now if connected, and again after every reconnect, recovering what was missed. */
  subscribe(channel: string, options: SubscribeOptions = {}): Subscription {
    const existing = this.subscriptions.get(channel);
    if (existing && existing.state !== "unsubscribed") return existing;
    const subscription = new Subscription(channel, false, this.host, options);
    this.subscriptions.set(channel, subscription);
    if (this._state === "connected") this.sendSubscribe(subscription);
    return subscription;
  }

  /** The subscription to a channel, the client's or the server's. */
  getSubscription(channel: string): Subscription | undefined {
    return this.subscriptions.get(channel);
  }

  publish(channel: string, data: unknown): Promise<void> {
    return this.call({ op: "publish", channel, data }).then(() => undefined);
  }

  async presence(channel: string): Promise<ClientInfo[]> {
    const result = (await this.call({ op: "presence", channel })) as {
      clients: Record<string, { user: string; info: unknown }>;
    };
    return Object.entries(result.clients).map(([client, c]) => ({ client, user: c.user, info: c.info }));
  }

  async presenceStats(channel: string): Promise<{ clients: number; users: number }> {
    const result = (await this.call({ op: "presence_stats", channel })) as {
      num_clients: number;
      num_users: number;
    };
    return { clients: result.num_clients, users: result.num_users };
  }

  async history(
    channel: string,
    query: { since?: Position; limit?: number; reverse?: boolean } = {},
  ): Promise<{ publications: Publication[]; position: Position }> {
    const result = (await this.call({ op: "history", channel, ...query })) as {
      publications: { offset: number; data: unknown }[];
      offset: number;
      epoch: string;
    };
    return {
      publications: result.publications.map((p) => ({ channel, data: p.data, offset: p.offset })),
      position: { offset: result.offset, epoch: result.epoch },
    };
  }

  /** Asks the backend (docs/backend.md); resolves with its answer. */
  async rpc<T = unknown>(method: string, data: unknown = null): Promise<T> {
    const result = (await this.call({ op: "rpc", method, data })) as { data: T };
    return result.data;
  }

  // === the connection ===

  private setState(state: ConnectionState): void {
    if (this._state === state) return;
    this._state = state;
    this.emit("state", { state });
  }

  private async open(): Promise<void> {
    if (!this.wanted) return;
    const generation = ++this.generation;
    this.setState("connecting");
    // Without a token, `connect` goes without one and the server reads the session cookie.
    let token: string | undefined;
    try {
      if (this.options.token || this.options.getToken) token = await this.tokens.current();
    } catch (e) {
      if (generation !== this.generation) return;
      this.emit("error", e instanceof Error ? e : new Error(String(e)));
      if (this.wanted && generation === this.generation) this.scheduleReconnect(1006);
      return;
    }
    // disconnect(), or another open(), came meanwhile.
    if (!this.wanted || generation !== this.generation) return;
    const ws = this.socket();
    this.ws = ws;
    let opened = false;
    ws.onopen = () => {
      if (this.ws !== ws) return;
      opened = true;
      // Positions of the server-side subscriptions, to recover them (docs/protocol.md §2).
      const subs: Record<string, Position> = {};
      for (const s of this.subscriptions.values()) {
        const position = s.position;
        if (s.serverSide && s.state !== "unsubscribed" && position) subs[s.channel] = position;
      }
      ws.send(JSON.stringify({ id: 1, op: "connect", token, subs }));
    };
    ws.onmessage = (event) => {
      if (this.ws !== ws) return;
      const text =
        typeof event.data === "string" ? event.data : new TextDecoder().decode(event.data as ArrayBuffer);
      this.onMessage(text);
    };
    ws.onerror = () => {
      // Followed by onclose, which decides what to do.
    };
    ws.onclose = (event) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.countAttempt(ws instanceof SseSocket ? ws.established : opened);
      this.onClose(event.code, event.reason);
    };
  }

  private socket(): WebSocketLike {
    if (this.transport === "sse") {
      const fetchFn = this.options.fetch ?? globalThis.fetch.bind(globalThis);
      return new SseSocket(this.sseUrl as string, this.options.cookie === true, fetchFn);
    }
    return new (this.WS as WebSocketConstructor)(this.options.url, "sidecast.v1");
  }

  /** After `sseAfter` attempts in a row that never opened, the next transport (and after
   * the last, the first again: an outage also fails every attempt, and must not leave the
   * client on SSE for good, or on an endpoint the server has turned off). */
  private countAttempt(opened: boolean): void {
    this.failures = opened ? 0 : this.failures + 1;
    if (this.failures >= (this.options.sseAfter ?? 2) && this.transports.length > 1) {
      this.transportIndex = (this.transportIndex + 1) % this.transports.length;
      this.failures = 0;
    }
  }

  private onMessage(text: string): void {
    this.feedWatchdog();
    let m: Record<string, unknown>;
    try {
      m = JSON.parse(text);
    } catch {
      return;
    }
    if (m.id === 1 && m.error && this._state === "connecting") {
      // The connect was refused before any token check: in cookie mode, no session cookie.
      const error = m.error as { code: ErrorCode; message: string };
      this.wanted = false;
      this.emit("error", new SidecastError(error.code, `connect refused: ${error.message} (is the session cookie set?)`));
      this.ws?.close(1000);
      return;
    }
    if (typeof m.id === "number") {
      const pending = this.pending.get(m.id);
      if (!pending) return;
      this.pending.delete(m.id);
      if (pending.timer) clearTimeout(pending.timer);
      const error = m.error as { code: ErrorCode; message: string; rpc_code?: number } | undefined;
      if (error) pending.reject(new SidecastError(error.code, error.message, error.rpc_code));
      else pending.resolve(m.result);
      return;
    }
    const channel = m.channel as string;
    switch (m.type) {
      case "connected":
        return this.onConnected(m);
      case "ping":
        return this.send({ op: "pong" });
      case "pub": {
        const publication: Publication = { channel, data: m.data, offset: m.offset as number | undefined };
        if (typeof m.trace === "string") publication.trace = m.trace;
        this.subscriptions.get(channel)?.publication(publication);
        return;
      }
      case "join":
      case "leave":
        return this.subscriptions.get(channel)?.membership(m.type, m as unknown as ClientInfo);
      case "sub": {
        let subscription = this.subscriptions.get(channel);
        const isNew = !subscription || subscription.state === "unsubscribed";
        if (!subscription || isNew) {
          subscription = new Subscription(channel, true, this.host);
          this.subscriptions.set(channel, subscription);
        }
        if (isNew) this.emit("subscription", subscription);
        return subscription.attach(m as unknown as AttachResult);
      }
      case "unsub": {
        const subscription = this.subscriptions.get(channel);
        // Not subscribed (yet): its subscribe's reply, or a second unsub of a race, is to
        // come (protocol §5); the unsub that counts follows the reply.
        if (!subscription || subscription.state !== "subscribed") return;
        if (m.resubscribe === true) {
          // The node may have missed publications (code 2500, a cluster node whose link to
          // Redis broke): subscribe again from the position, which recovers them.
          subscription.detach();
          return this.sendSubscribe(subscription);
        }
        this.subscriptions.delete(channel);
        return subscription.end(m.code as number, m.reason as string);
      }
      case "message":
        return this.emit("message", { data: m.data });
      case "lost":
        return this.subscriptions.get(channel)?.lost({
          count: m.count as number,
          from: m.from as number | undefined,
          to: m.to as number | undefined,
        });
    }
  }

  private onConnected(m: Record<string, unknown>): void {
    this.attempt = 0;
    const pingInterval = (m.ping_interval as number) ?? 25;
    const pongTimeout = (m.pong_timeout as number) ?? 10;
    // Nothing at all for a ping interval and its pong timeout: the connection is dead.
    this.silenceLimit = (pingInterval + pongTimeout) * 1000 + 2000;
    this.feedWatchdog();
    this.setState("connected");
    const expiresIn = m.expires_in as number;
    this.tokens.schedule(expiresIn);
    this.emit("connected", { client: m.client as string, user: m.user as string, expiresIn });
    for (const subscription of this.subscriptions.values()) {
      if (!subscription.serverSide && subscription.state !== "unsubscribed") {
        this.sendSubscribe(subscription);
      }
    }
    // The server's own subscriptions come as `sub` pushes right after `connected`, so
    // before the reply to this ping: one still waiting then was not made again (a backend
    // subscription, or a channel the new token's `subs` dropped).
    const generation = this.generation;
    this.call({ op: "ping" }).then(
      () => {
        if (generation !== this.generation) return;
        for (const subscription of [...this.subscriptions.values()]) {
          if (subscription.serverSide && subscription.state === "subscribing") {
            this.subscriptions.delete(subscription.channel);
            subscription.end(0, "the server did not subscribe again after the reconnect");
          }
        }
      },
      () => {},
    );
    for (const waiting of this.waiting.splice(0)) waiting.wake();
  }

  private onClose(code: number, reason: string): void {
    this.clearTimers();
    this.generation += 1;
    const policy = afterClose(code);
    if (policy === "new-token") {
      // The server refused the token (or it expired): the next attempt asks for a new one.
      this.tokens.refused();
    }
    const canRetry =
      this.wanted &&
      (policy === "reconnect" ||
        (policy === "new-token" && (this.options.getToken !== undefined || this.options.cookie === true)));
    // Decided before the app hears of it: a connect() or disconnect() in its listener wins.
    if (!canRetry) this.wanted = false;
    const generation = this.generation;
    this.lost(code, reason, canRetry);
    if (canRetry && this.wanted && generation === this.generation && !this.reconnectTimer) {
      this.scheduleReconnect(code);
    }
  }

  /** The connection is gone: calls fail, subscriptions wait. */
  private lost(code: number, reason: string, reconnecting: boolean): void {
    for (const [id, pending] of this.pending) {
      if (pending.timer) clearTimeout(pending.timer);
      pending.reject(new SidecastError("disconnected", `the connection closed (${code})`));
      this.pending.delete(id);
    }
    if (!reconnecting) {
      // Nothing will connect by itself: calls waiting for the connection end now.
      for (const waiting of this.waiting.splice(0)) {
        waiting.fail(new SidecastError("disconnected", `the connection closed (${code})`));
      }
    }
    for (const subscription of this.subscriptions.values()) subscription.detach();
    const was = this._state;
    this.setState(reconnecting ? "connecting" : "disconnected");
    if (was !== "disconnected") this.emit("disconnected", { code, reason, reconnecting });
  }

  private scheduleReconnect(code: number): void {
    const backoff = this.options.backoff ?? {};
    let delay = backoffDelay(this.attempt, backoff);
    if (code === 1001 && this.attempt === 0) {
      // A draining node: its clients come back spread over a while, not all at once.
      delay = Math.floor(Math.random() * (backoff.drainSpread ?? 5000));
    }
    this.attempt += 1;
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = null;
      void this.open();
    }, Math.min(delay, MAX_DELAY));
  }

  private feedWatchdog(): void {
    if (this.watchdog) clearTimeout(this.watchdog);
    if (!this.silenceLimit) return;
    this.watchdog = setTimeout(() => {
      const ws = this.ws;
      if (!ws) return;
      this.ws = null;
      ws.onclose = null;
      ws.onmessage = null;
      ws.close(4007, "no ping from the server");
      this.onClose(1006, "no ping from the server");
    }, this.silenceLimit);
  }

  private clearTimers(): void {
    for (const timer of [this.reconnectTimer, this.watchdog]) {
      if (timer) clearTimeout(timer);
    }
    this.reconnectTimer = this.watchdog = null;
    this.tokens.stop();
    this.silenceLimit = 0;
  }

  /** Sends a fresh token over the live socket; at most one refresh is ever in flight. */
  refresh(): Promise<void> {
    return this.tokens.refresh();
  }

  // === calls ===

  private send(message: Record<string, unknown>): void {
    if (this.ws && this.ws.readyState === OPEN) this.ws.send(JSON.stringify(message));
  }

  private sendSubscribe(subscription: Subscription): void {
    const since = subscription.position;
    const command = { op: "subscribe", channel: subscription.channel, ...(since ? { since } : {}) };
    // Handled as the reply is read, not a microtask later: a `pub` read right after it (in
    // the same chunk) must find the subscription live. No timeout: replies come in command
    // order, and a lost connection fails the command.
    this.command(
      command,
      null,
      (result) => subscription.attach(result as AttachResult),
      (error: SidecastError) => {
        if (error.code === "disconnected") return;
        if (error.code === "already_subscribed" && subscription.state === "subscribed") {
          // The token's `subs` claim made it first (its `sub` push came before this reply).
          subscription.markServerSide();
          return;
        }
        if (this.subscriptions.get(subscription.channel) === subscription) {
          this.subscriptions.delete(subscription.channel);
        }
        subscription.fail(error);
      },
    );
  }

  private async leave(subscription: Subscription): Promise<void> {
    if (this.subscriptions.get(subscription.channel) === subscription) {
      this.subscriptions.delete(subscription.channel);
    }
    if (subscription.state === "unsubscribed") return;
    subscription.end(0, "unsubscribed by the client");
    // Also while its subscribe is on the way: the server answers unsubscribe in order, so
    // it ends whatever the subscribe made.
    if (this._state === "connected") {
      await this.call({ op: "unsubscribe", channel: subscription.channel });
    }
  }

  /** After a gap, the channel's current epoch (a history page of 0). */
  private resync(subscription: Subscription): void {
    this.history(subscription.channel, { limit: 0 }).then(
      ({ position }) => subscription.resynced(position.epoch),
      () => {},
    );
  }

  /** Sends a command now (the caller knows the connection is up); `onResult` or `onError`
   * runs as its reply is read. `timeout`: ms, or none when null. */
  private command(
    command: Record<string, unknown>,
    timeout: number | null,
    onResult: (result: unknown) => void,
    onError: (error: SidecastError) => void,
  ): void {
    const id = this.nextId++;
    const timer =
      timeout === null
        ? null
        : setTimeout(() => {
            this.pending.delete(id);
            onError(new SidecastError("timeout", `no reply within ${timeout} ms`));
          }, timeout);
    this.pending.set(id, { resolve: onResult, reject: onError, timer });
    this.send({ id, ...command });
  }

  /** Sends a command and resolves with its result; waits for the connection first.
   * `timeout`: ms, the client's default when undefined, none when null. */
  private async call(command: Record<string, unknown>, timeout?: number | null): Promise<unknown> {
    const limit = timeout === undefined ? this.options.timeout ?? 10000 : timeout;
    if (this._state !== "connected") {
      if (!this.wanted) throw new SidecastError("disconnected", "not connected: call connect() first");
      await new Promise<void>((resolve, reject) => {
        const timer =
          limit === null
            ? null
            : setTimeout(() => {
                const i = this.waiting.indexOf(waiting);
                if (i >= 0) this.waiting.splice(i, 1);
                reject(new SidecastError("timeout", "not connected within the call's timeout"));
              }, limit);
        const waiting: Waiting = {
          wake: () => {
            if (timer) clearTimeout(timer);
            resolve();
          },
          fail: (error) => {
            if (timer) clearTimeout(timer);
            reject(error);
          },
        };
        this.waiting.push(waiting);
      });
    }
    return new Promise((resolve, reject) => this.command(command, limit, resolve, reject));
  }
}

/** `ws://host/ws` → `http://host/sse`; undefined when `url` does not end in `/ws`. */
function sseUrlOf(url: string): string | undefined {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    return undefined;
  }
  if (!parsed.pathname.endsWith("/ws")) return undefined;
  parsed.protocol = parsed.protocol === "wss:" ? "https:" : "http:";
  parsed.pathname = parsed.pathname.slice(0, -"/ws".length) + "/sse";
  parsed.search = "";
  return parsed.toString();
}
