// The event-stream consumer: joins a group, hands each event to the app, acknowledges it
// once the app's handler has returned, answers client rpc with what the rpc handler returns,
// and joins again after the stream breaks (sidecast restarting, a network blip), so that
// what was not acknowledged comes back, marked redelivered.

import type grpc from "@grpc/grpc-js";

import { RpcError, SidecastError } from "./errors.js";
import type { Sidecast } from "./control.js";
import { decode } from "./control.js";

export type EventKind = "connect" | "disconnect" | "subscribe" | "unsubscribe" | "publish";

interface Common {
  /** Per group, +1 per event (docs/backend.md). */
  seq: number;
  /** The connection the event is about, and its user. */
  client: string;
  user: string;
  time: Date;
  /** Sent before to a member that left without acknowledging it: handle idempotently. */
  redelivered: boolean;
}

export type SidecastEvent = Common &
  (
    | { kind: "connect"; meta: unknown; info: unknown }
    | { kind: "disconnect"; code: number; reason: string }
    | { kind: "subscribe"; channel: string; serverSide: boolean }
    | { kind: "unsubscribe"; channel: string; code: number }
    | { kind: "publish"; channel: string; data: unknown; offset: number; epoch: string }
    /** Events the group's buffer had no room for: seq firstSeq..lastSeq will never come. */
    | { kind: "lost"; firstSeq: number; lastSeq: number }
  );

export interface RpcCall {
  id: string;
  method: string;
  data: unknown;
  client: string;
  user: string;
}

export interface Joined {
  member: string;
  /** The group existed: what it buffered while nobody was joined follows. */
  resumed: boolean;
  window: number;
  buffered: number;
  nodeId: string;
}

export interface ConsumeOptions {
  /** The group: replicas of one backend share it; each group gets every event. */
  group: string;
  /** Which events to receive; default all five. */
  kinds?: EventKind[];
  /** Runs for each event, one at a time in `seq` order; the event is acknowledged when it
   * resolves. When it throws, it is retried with backoff (and `onError` told) until it
   * succeeds or the stream ends, after which sidecast redelivers the event. */
  onEvent?: (event: SidecastEvent) => unknown;
  /** Answers client rpc: its return value is the reply's data; throw an RpcError to answer
   * with a code. Given, the group joins with the rpc kind and `rpcMethods`. */
  onRpc?: (call: RpcCall) => unknown;
  /** Method prefixes this group answers ("room."); empty answers every method. */
  rpcMethods?: string[];
  /** Most events held unacknowledged (default: the server's events_window). */
  window?: number;
  onJoined?: (joined: Joined) => void;
  /** A handler failed, the stream broke, or a Reply could not be sent. The consumer goes on. */
  onError?: (error: Error, event?: SidecastEvent | RpcCall) => void;
  /** Reconnect and retry delays, in milliseconds (default 200 → 5000, doubling, jittered). */
  backoff?: { minDelay?: number; maxDelay?: number };
}

const KINDS: EventKind[] = ["connect", "disconnect", "subscribe", "unsubscribe", "publish"];
/** How long stop() waits for sidecast to end the stream after the half-close. */
const LEAVE_PATIENCE = 5000;

type Stream = grpc.ClientDuplexStream<unknown, unknown>;

export class Consumer {
  /** Resolves once the consumer has stopped. */
  readonly stopped: Promise<void>;
  private stopping = false;
  private stream: Stream | null = null;
  /** Wakes the session (to leave) and any backoff sleep when stop() is called. */
  private readonly wakers = new Set<() => void>();

  constructor(
    private readonly sidecast: Sidecast,
    private readonly options: ConsumeOptions,
  ) {
    if (!options.group) throw new TypeError("consume: group is required");
    if (!options.onEvent && !options.onRpc) throw new TypeError("consume: give onEvent, onRpc or both");
    this.stopped = this.run();
  }

  /** Finishes the event in hand, acknowledges it, half-closes the stream and waits for
   * sidecast to end it: what was not acknowledged goes to the group's other members or waits
   * for the next join. */
  async stop(): Promise<void> {
    this.stopping = true;
    for (const wake of [...this.wakers]) wake();
    await this.stopped;
  }

  private async run(): Promise<void> {
    let failures = 0;
    while (!this.stopping) {
      const { joined, error } = await this.session();
      if (this.stopping) break;
      failures = joined ? 1 : failures + 1;
      if (error) this.options.onError?.(error);
      await this.pause(delay(this.options.backoff, failures));
    }
  }

  /** One stream from join to its end. */
  private session(): Promise<{ joined: boolean; error?: Error }> {
    const stream = this.sidecast.openEvents();
    this.stream = stream;
    let joined = false;
    let queue = Promise.resolve();
    const kinds = (this.options.kinds ?? (this.options.onEvent ? KINDS : [])).map(wireKind);
    if (this.options.onRpc) kinds.push("EVENT_KIND_RPC");
    stream.write({
      join: {
        group: this.options.group,
        kinds,
        rpcMethods: this.options.onRpc ? (this.options.rpcMethods ?? []) : [],
        window: this.options.window ?? 0,
      },
    });
    return new Promise((resolve) => {
      let ended = false;
      let leaving = false;
      // stop(): once the events in hand are handled and acknowledged, half-close, and give
      // sidecast a moment to end the stream.
      const leave = () => {
        leaving = true;
        queue.then(() => {
          if (ended) return;
          stream.end();
          setTimeout(() => stream.cancel(), LEAVE_PATIENCE).unref();
        });
      };
      const end = (error?: Error) => {
        if (ended) return;
        ended = true;
        this.wakers.delete(leave);
        this.stream = null;
        // Handlers in flight finish; their acks have no stream left: sidecast redelivers.
        queue.then(() => resolve({ joined, error }));
      };
      stream.on("data", (message: { joined?: Joined | null; event?: RawEvent | null }) => {
        if (message.joined) {
          joined = true;
          this.options.onJoined?.(message.joined);
        } else if (message.event) {
          const raw = message.event;
          if (raw.kind === "rpc") {
            void this.answer(raw);
          } else if (!leaving) {
            // After the half-close nothing new is started: unacknowledged, it goes to the
            // group's other members.
            const event = fromWire(raw);
            queue = queue.then(() => this.handle(stream, event));
          }
        }
      });
      // 'status' comes once, whatever ended the call; 'error' repeats it for non-OK ones.
      stream.on("status", (status: grpc.StatusObject) =>
        end(status.code === 0 ? undefined : new SidecastError(status.code, status.details)),
      );
      stream.on("error", () => {});
      this.wakers.add(leave);
      if (this.stopping) leave();
    });
  }

  private async handle(stream: Stream, event: SidecastEvent): Promise<void> {
    for (let attempt = 1; ; attempt++) {
      try {
        await this.options.onEvent?.(event);
        break;
      } catch (e) {
        this.options.onError?.(e instanceof Error ? e : new Error(String(e)), event);
        if (this.stream !== stream || this.stopping) return;
        await this.pause(delay(this.options.backoff, attempt));
        if (this.stream !== stream || this.stopping) return;
      }
    }
    if (this.stream === stream && stream.writable) stream.write({ ack: { seqs: [event.seq] } });
  }

  private async answer(raw: RawEvent): Promise<void> {
    const rpc = raw.rpc!;
    const call: RpcCall = { id: rpc.rpcId, method: rpc.method, data: decode(rpc.data), client: raw.client, user: raw.user };
    let answer: Parameters<Sidecast["reply"]>[1];
    try {
      answer = { data: (await this.options.onRpc!(call)) ?? null };
    } catch (e) {
      if (e instanceof RpcError) answer = { error: { code: e.code, message: e.message } };
      else {
        this.options.onError?.(e instanceof Error ? e : new Error(String(e)), call);
        answer = { error: { code: 500, message: "internal error" } };
      }
    }
    try {
      await this.sidecast.reply(call.id, answer);
    } catch (e) {
      // NOT_FOUND: the client stopped waiting (rpc_timeout) or left.
      this.options.onError?.(SidecastError.from(e), call);
    }
  }

  /** Sleeps `ms`, or less when stop() is called. */
  private pause(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.wakers.delete(done);
        resolve();
      };
      const timer = setTimeout(done, ms);
      this.wakers.add(done);
    });
  }
}

interface RawEvent {
  seq: number;
  client: string;
  user: string;
  timeMs: number;
  redelivered: boolean;
  kind: string;
  connect?: { meta: Buffer; info: Buffer };
  disconnect?: { code: number; reason: string };
  subscribe?: { channel: string; serverSide: boolean };
  unsubscribe?: { channel: string; code: number };
  publish?: { channel: string; data: Buffer; offset: number; epoch: string };
  rpc?: { rpcId: string; method: string; data: Buffer };
  lost?: { firstSeq: number; lastSeq: number };
}

function fromWire(raw: RawEvent): SidecastEvent {
  const common = { seq: raw.seq, client: raw.client, user: raw.user, time: new Date(raw.timeMs), redelivered: raw.redelivered };
  switch (raw.kind) {
    case "connect":
      return { ...common, kind: "connect", meta: decode(raw.connect!.meta), info: decode(raw.connect!.info) };
    case "disconnect":
      return { ...common, kind: "disconnect", code: raw.disconnect!.code, reason: raw.disconnect!.reason };
    case "subscribe":
      return { ...common, kind: "subscribe", channel: raw.subscribe!.channel, serverSide: raw.subscribe!.serverSide };
    case "unsubscribe":
      return { ...common, kind: "unsubscribe", channel: raw.unsubscribe!.channel, code: raw.unsubscribe!.code };
    case "publish": {
      const p = raw.publish!;
      return { ...common, kind: "publish", channel: p.channel, data: decode(p.data), offset: p.offset, epoch: p.epoch };
    }
    case "lost":
      return { ...common, kind: "lost", firstSeq: raw.lost!.firstSeq, lastSeq: raw.lost!.lastSeq };
    default:
      throw new Error(`sidecast: unknown event kind ${raw.kind}`);
  }
}

function wireKind(kind: EventKind): string {
  if (!KINDS.includes(kind)) throw new TypeError(`consume: unknown event kind ${kind}`);
  return `EVENT_KIND_${kind.toUpperCase()}`;
}

function delay(backoff: ConsumeOptions["backoff"], attempt: number): number {
  const min = backoff?.minDelay ?? 200;
  const max = backoff?.maxDelay ?? 5000;
  const ceiling = Math.min(max, min * 2 ** Math.max(0, attempt - 1));
  return ceiling / 2 + Math.random() * (ceiling / 2);
}
