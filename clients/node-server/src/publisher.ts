// Publishing many over one Control.PublishStream: publish() writes at once, without waiting
// for the answers before it, and resolves with its own answer. sidecast publishes a stream's
// requests in order and answers them in order, so answers are matched by id.

import grpc from "@grpc/grpc-js";

import type { PublishResult, Sidecast } from "./control.js";
import { encode } from "./control.js";
import { SidecastError } from "./errors.js";

export interface PublisherOptions {
  /** Most publications written and not yet answered: publish() waits for room beyond it
   * (default 256, the answers sidecast queues for one stream). */
  maxInFlight?: number;
  /** Milliseconds a publication may wait for its answer (default: the client's `timeout`).
   * Past it the stream is cancelled and every unanswered publication rejected. */
  timeout?: number;
}

type Stream = grpc.ClientDuplexStream<unknown, unknown>;

interface Answer {
  id: number;
  published?: PublishResult | null;
  error?: { code: number; message: string } | null;
}

interface Pending {
  resolve: (result: PublishResult) => void;
  reject: (error: SidecastError) => void;
  timer: NodeJS.Timeout;
}

export class Publisher {
  private stream: Stream | null = null;
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  /** publish() calls waiting for room. */
  private readonly waiting: (() => void)[] = [];
  /** publish() calls accepted and not yet written, and close() calls waiting for them. */
  private queued = 0;
  private readonly drained: (() => void)[] = [];
  private closing = false;
  private readonly maxInFlight: number;
  private readonly timeout: number;

  constructor(
    private readonly sidecast: Sidecast,
    options: PublisherOptions & { defaultTimeout: number },
  ) {
    this.maxInFlight = Math.max(1, options.maxInFlight ?? 256);
    this.timeout = options.timeout ?? options.defaultTimeout;
  }

  /** Publishes `data` (any JSON value; a Uint8Array is sent as already-encoded JSON) and
   * resolves with its offset, epoch and local deliveries. A refused publication rejects with
   * the SidecastError unary `publish` would have thrown, and the stream goes on. When the
   * stream breaks (sidecast stopping, the connection lost, the timeout) every unanswered
   * publication rejects: it may or may not have been published, so retry it with the same
   * idempotency key. The next publish() opens a new stream. */
  async publish(channel: string, data: unknown, options: { idempotencyKey?: string } = {}): Promise<PublishResult> {
    const payload = encode(data);
    if (this.closing) throw new SidecastError(grpc.status.FAILED_PRECONDITION, "the publisher is closed");
    this.queued++;
    try {
      while (this.pending.size >= this.maxInFlight) {
        await new Promise<void>((resolve) => this.waiting.push(resolve));
      }
      return this.write(channel, payload, options.idempotencyKey ?? "");
    } finally {
      if (--this.queued === 0) for (const wake of this.drained.splice(0)) wake();
    }
  }

  private write(channel: string, payload: Buffer, idempotencyKey: string): Promise<PublishResult> {
    const stream = this.stream ?? this.open();
    const id = this.nextId++;
    const answer = new Promise<PublishResult>((resolve, reject) => {
      const timer = setTimeout(
        () => this.fail(stream, grpc.status.DEADLINE_EXCEEDED, `no answer within ${this.timeout} ms`),
        this.timeout,
      );
      this.pending.set(id, { resolve, reject, timer });
    });
    stream.write({ id, publication: { channel, data: payload, idempotencyKey } });
    return answer;
  }

  /** Publications written and not yet answered. */
  get inFlight(): number {
    return this.pending.size;
  }

  /** Half-closes the stream once the publications already accepted are written: resolves
   * when every one has been answered (or has failed). publish() after close() rejects. */
  async close(): Promise<void> {
    this.closing = true;
    while (this.queued > 0) await new Promise<void>((resolve) => this.drained.push(resolve));
    const stream = this.stream;
    if (!stream) return;
    const ended = new Promise<void>((resolve) => stream.on("status", () => resolve()));
    stream.end();
    await ended;
  }

  private open(): Stream {
    const stream = this.sidecast.openPublishStream();
    this.stream = stream;
    stream.on("data", (answer: Answer) => {
      const pending = this.pending.get(answer.id);
      if (!pending) return;
      this.settle(answer.id, pending);
      if (answer.error) pending.reject(new SidecastError(answer.error.code, answer.error.message));
      else pending.resolve(answer.published!);
    });
    // 'status' comes once, whatever ended the call; 'error' repeats it for non-OK ones.
    stream.on("status", (status: grpc.StatusObject) => {
      const code = status.code === grpc.status.OK ? grpc.status.UNAVAILABLE : status.code;
      this.fail(stream, code, status.details || "the publish stream ended");
    });
    stream.on("error", () => {});
    return stream;
  }

  /** Ends `stream` (if still current) and rejects what it left unanswered. */
  private fail(stream: Stream, code: number, reason: string): void {
    if (this.stream !== stream) return;
    this.stream = null;
    stream.cancel();
    for (const [id, pending] of [...this.pending]) {
      this.settle(id, pending);
      pending.reject(
        new SidecastError(code, `${reason}; unanswered, so it may or may not have been published: retry with the same idempotency key`),
      );
    }
  }

  private settle(id: number, pending: Pending): void {
    clearTimeout(pending.timer);
    this.pending.delete(id);
    this.waiting.shift()?.();
  }
}
