// The typed control API: one method per unary RPC of sidecast.v1.Control, JSON in and out.

import { readFileSync } from "node:fs";

import grpc from "@grpc/grpc-js";

import { SidecastError } from "./errors.js";
import { Consumer, type ConsumeOptions } from "./events.js";
import { controlConstructor, type RawControl } from "./proto.js";
import { Publisher, type PublisherOptions } from "./publisher.js";

export interface TlsOptions {
  /** PEM CA certificate(s) that signed sidecast's `grpc_tls_cert_file`; the system's when absent. */
  ca?: string | Buffer;
  /** PEM client certificate and key, when sidecast requires them (`grpc_tls_client_ca_file`). */
  cert?: string | Buffer;
  key?: string | Buffer;
  /** The name to check the server certificate against, when it differs from the address's host. */
  serverName?: string;
}

export interface SidecastOptions {
  /** host:port of sidecast's control listener. Default: SIDECAST_GRPC or 127.0.0.1:50051. */
  address?: string;
  /** Sent as `authorization: Bearer <key>` on every call. Default: SIDECAST_API_KEY. */
  apiKey?: string;
  /** TLS to the control listener: true for the system's CAs, or the PEM material. A string
   * ending in .pem/.crt/.key is read as a file. Off by default (sidecar on localhost). */
  tls?: boolean | TlsOptions;
  /** Deadline of each unary call in milliseconds (default 5000). Calls made while sidecast is
   * starting or restarting wait for it within this deadline. */
  timeout?: number;
}

/** `{ user }` reaches every connection of a user (on every node of a cluster); `{ client }`
 * one connection by its id. */
export type Target = { user: string; client?: undefined } | { client: string; user?: undefined };

export interface PublishResult {
  /** The publication's position in the channel's history (0 without history). */
  offset: number;
  epoch: string;
  /** Subscribers it was handed to on the node that took the call. */
  delivered: number;
  /** The trace id of a traced publication (its `traceparent`), else "". */
  traceId: string;
}

export interface Presence {
  client: string;
  user: string;
  info: unknown;
}

export interface HistoryPage {
  publications: { offset: number; data: unknown }[];
  /** The stream's current top offset and epoch. */
  offset: number;
  epoch: string;
}

export interface Receipt {
  delivered: number;
  acknowledged: number;
  missingUsers: string[];
  missingMore: number;
  complete: boolean;
  /** The trace id of a traced publication, else "". */
  traceId: string;
}

export interface NodeStats {
  nodeId: string;
  uptimeSeconds: number;
  connections: number;
  users: number;
  channels: number;
  subscriptions: number;
}

export interface Info extends NodeStats {
  version: string;
  /** Every live node of a cluster (Redis engine); the one node otherwise. */
  nodes: NodeStats[];
}

/** The control API of one sidecast (or of a cluster, through any of its nodes). */
export class Sidecast {
  readonly address: string;
  private readonly raw: RawControl;
  private readonly metadata: grpc.Metadata;
  private readonly timeout: number;

  constructor(options: SidecastOptions = {}) {
    this.address = options.address ?? process.env.SIDECAST_GRPC ?? "127.0.0.1:50051";
    this.timeout = options.timeout ?? 5000;
    // waitForReady: a call made while sidecast starts or restarts waits for it (within the
    // deadline) instead of failing at once with UNAVAILABLE.
    this.metadata = new grpc.Metadata({ waitForReady: true });
    const apiKey = options.apiKey ?? process.env.SIDECAST_API_KEY;
    if (apiKey) this.metadata.set("authorization", `Bearer ${apiKey}`);
    const channelOptions: grpc.ChannelOptions = {};
    if (typeof options.tls === "object" && options.tls.serverName) {
      channelOptions["grpc.ssl_target_name_override"] = options.tls.serverName;
    }
    const Control = controlConstructor();
    this.raw = new Control(this.address, credentials(options.tls), channelOptions);
  }

  /** Publishes `data` (any JSON value; a Uint8Array is sent as already-encoded JSON). With an
   * idempotency key, a retry of the same publication returns the first result and publishes
   * nothing again. */
  /** `receipt`: tally the publication's delivery receipt (a namespace with `receipts`),
   * for `receipt()`; `receiptTimeoutMs`: its deadline, instead of the namespace's.
   * `traceparent`: a W3C traceparent (your current span's) making it part of your trace. */
  async publish(
    channel: string,
    data: unknown,
    options: { idempotencyKey?: string; receipt?: boolean; receiptTimeoutMs?: number; traceparent?: string } = {},
  ): Promise<PublishResult> {
    return this.call("Publish", {
      channel,
      data: encode(data),
      idempotencyKey: options.idempotencyKey ?? "",
      receipt: options.receipt ?? false,
      receiptTimeoutMs: options.receiptTimeoutMs ?? 0,
      traceparent: options.traceparent ?? "",
    });
  }

  /** A publisher over one Control.PublishStream, for many publications: each publish()
   * resolves with its own result without waiting for the ones before it. */
  publisher(options: PublisherOptions = {}): Publisher {
    return new Publisher(this, { ...options, defaultTimeout: this.timeout });
  }

  /** One publication into several channels; one result per channel, in order. */
  async broadcast(channels: string[], data: unknown): Promise<PublishResult[]> {
    const reply = await this.call<{ results: PublishResult[] }>("Broadcast", { channels, data: encode(data) });
    return reply.results;
  }

  /** Subscribes the target's connections to `channel` (they get a `sub` push). */
  async subscribe(channel: string, target: Target): Promise<{ subscribed: number; alreadySubscribed: number; limitExceeded: number }> {
    return this.call("Subscribe", { channel, target });
  }

  async unsubscribe(channel: string, target: Target): Promise<{ unsubscribed: number }> {
    return this.call("Unsubscribe", { channel, target });
  }

  /** Closes the target's connections with `code` (4006 "reconnect now", 4503, or your own
   * in 4100–4499 (the client reconnects) and 4600–4999 (it stops); docs/protocol.md) and `reason`. */
  async disconnect(target: Target, options: { code?: number; reason?: string } = {}): Promise<{ disconnected: number }> {
    return this.call("Disconnect", { target, code: options.code ?? 0, reason: options.reason ?? "" });
  }

  /** Sends `data` to the target's connections only (a `message` push, no channel). */
  async send(target: Target, data: unknown): Promise<{ delivered: number }> {
    return this.call("Send", { target, data: encode(data) });
  }

  async presence(channel: string): Promise<Presence[]> {
    const reply = await this.call<{ clients: { client: string; user: string; info: Buffer }[] }>("Presence", { channel });
    return reply.clients.map((c) => ({ client: c.client, user: c.user, info: decode(c.info) }));
  }

  async presenceStats(channel: string): Promise<{ numClients: number; numUsers: number }> {
    return this.call("PresenceStats", { channel });
  }

  /** Channels with subscribers, optionally matching a pattern (`chat:*`). */
  async channels(pattern = ""): Promise<{ channel: string; subscribers: number }[]> {
    const reply = await this.call<{ channels: { channel: string; subscribers: number }[] }>("Channels", { pattern });
    return reply.channels;
  }

  async info(): Promise<Info> {
    return this.call("Info", {});
  }

  /** A page of the channel's history, oldest first: the first `limit` (default 100, at most
   * the server's max_recovery) kept, or, with `since`, those after that position; `reverse`
   * for newest first. `limit: 0` returns only the stream's position. */
  async history(
    channel: string,
    options: { since?: { offset: number; epoch: string }; limit?: number; reverse?: boolean } = {},
  ): Promise<HistoryPage> {
    const reply = await this.call<{ publications: { offset: number; data: Buffer }[]; offset: number; epoch: string }>("History", {
      channel,
      since: options.since ?? null,
      limit: options.limit ?? 100,
      reverse: options.reverse ?? false,
    });
    return {
      publications: reply.publications.map((p) => ({ offset: p.offset, data: decode(p.data) })),
      offset: reply.offset,
      epoch: reply.epoch,
    };
  }

  async historyRemove(channel: string): Promise<void> {
    await this.call("HistoryRemove", { channel });
  }

  /** A publication's delivery receipt (a namespace with `receipts`): deliveries, how many
   * were acknowledged by the deadline, and the users who did not acknowledge (at most 100,
   * the rest counted in `missingMore`); `complete` once the deadline has passed. */
  async receipt(channel: string, offset: number): Promise<Receipt> {
    return this.call("Receipt", { channel, offset });
  }

  /** Answers a client rpc by its id, with data or an error. `consume` does this for you. */
  async reply(rpcId: string, answer: { data: unknown } | { error: { code: number; message: string } }): Promise<void> {
    const request = "error" in answer ? { rpcId, error: answer.error } : { rpcId, data: encode(answer.data) };
    await this.call("Reply", request);
  }

  /** Joins an event group and runs `onEvent` / `onRpc` for what arrives, until stop(). */
  consume(options: ConsumeOptions): Consumer {
    return new Consumer(this, options);
  }

  /** Closes the channel to sidecast; stop consumers first. */
  close(): void {
    this.raw.close();
  }

  /** The bidirectional Events stream, for the consumer. */
  openEvents(): grpc.ClientDuplexStream<unknown, unknown> {
    const events = this.raw.Events as (metadata: grpc.Metadata, options: grpc.CallOptions) => grpc.ClientDuplexStream<unknown, unknown>;
    return events.call(this.raw, this.metadata, {});
  }

  /** The bidirectional PublishStream, for the publisher. */
  openPublishStream(): grpc.ClientDuplexStream<unknown, unknown> {
    const publish = this.raw.PublishStream as (metadata: grpc.Metadata, options: grpc.CallOptions) => grpc.ClientDuplexStream<unknown, unknown>;
    return publish.call(this.raw, this.metadata, {});
  }

  private call<T>(method: string, request: unknown): Promise<T> {
    const fn = this.raw[method] as (
      request: unknown,
      metadata: grpc.Metadata,
      options: grpc.CallOptions,
      callback: (error: grpc.ServiceError | null, response: T) => void,
    ) => void;
    return new Promise((resolve, reject) =>
      fn.call(this.raw, request, this.metadata, { deadline: Date.now() + this.timeout }, (error, response) =>
        error ? reject(SidecastError.from(error)) : resolve(response),
      ),
    );
  }
}

function credentials(tls: SidecastOptions["tls"]): grpc.ChannelCredentials {
  if (!tls) return grpc.credentials.createInsecure();
  if (tls === true) return grpc.credentials.createSsl();
  return grpc.credentials.createSsl(pem(tls.ca), pem(tls.key), pem(tls.cert));
}

function pem(value: string | Buffer | undefined): Buffer | null {
  if (value === undefined) return null;
  if (Buffer.isBuffer(value)) return value;
  return /\.(pem|crt|key)$/.test(value) ? readFileSync(value) : Buffer.from(value);
}

export function encode(data: unknown): Buffer {
  if (data instanceof Uint8Array) return Buffer.from(data);
  const text = JSON.stringify(data);
  if (text === undefined) throw new TypeError("sidecast: data must be a JSON value");
  return Buffer.from(text);
}

/** A JSON payload as a value; empty bytes (an absent field) as null. */
export function decode(bytes: Buffer | Uint8Array | undefined): unknown {
  if (!bytes || bytes.length === 0) return null;
  return JSON.parse(Buffer.from(bytes).toString("utf8"));
}
