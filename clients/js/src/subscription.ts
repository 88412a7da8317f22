// One channel subscription as the app sees it: it survives reconnects, recovers what was
// missed through the channel's stream position, and hands each publication to the app once,
// in offset order. docs/protocol.md, sections 5, 6 and 13.

import { Emitter } from "./emitter.js";
import type { SidecastError } from "./errors.js";

/** A place in a channel's stream: what recovery resumes from. */
export interface Position {
  offset: number;
  epoch: string;
}

/** A publication as the app receives it; `offset` is set on channels with history. */
export interface Publication<T = unknown> {
  channel: string;
  data: T;
  offset?: number;
  /** The trace id of a traced publication, in a namespace with `trace_ids`. */
  trace?: string;
}

/** A client in presence, `join` and `leave`. */
export interface ClientInfo {
  client: string;
  user: string;
  info: unknown;
}

export type SubscriptionState = "subscribing" | "subscribed" | "unsubscribed";

export interface SubscriptionEvents extends Record<string, unknown> {
  publication: Publication;
  join: ClientInfo & { channel: string };
  leave: ClientInfo & { channel: string };
  /** The subscription is live (again). `resumed`: after a reconnect; `recovered`: every
   * publication missed meanwhile was delivered before this event. */
  subscribed: { channel: string; resumed: boolean; recovered: boolean; position?: Position };
  /** Publications may have been missed and could not be recovered (the channel keeps no
   * history, keeps too little, or its stream started over): reload the app's state. */
  unrecovered: { channel: string; reason: "no_history" | "not_recovered" | "gap"; position?: Position };
  /** The server dropped publications from this connection's full queue instead of closing
   * it (a namespace with `slow_consumer = "drop_oldest"` or `"conflate"`): `count` of them,
   * and on a channel with history the offsets `from` to `to`, which `history` can fetch. The
   * publications after them follow with no gap reported. */
  lost: { channel: string; count: number; from?: number; to?: number };
  /** The subscription ended: by the app (code 0), or by the server (`unsub` codes). */
  unsubscribed: { channel: string; code: number; reason: string };
  /** A subscribe the server refused; the subscription ends. */
  error: SidecastError;
  state: { channel: string; state: SubscriptionState };
}

/** What a subscribe reply or a `sub` push carries (docs/protocol.md, section 3). */
export interface AttachResult {
  recoverable: boolean;
  offset?: number;
  epoch?: string;
  recovered?: boolean;
  publications?: { offset: number; data: unknown }[];
  /** The channel's namespace asks for acknowledgements (delivery receipts). */
  receipts?: boolean;
}

export interface SubscribeOptions {
  /** On a channel with receipts, acknowledge with `subscription.ack()` instead of after
   * the `publication` listeners return (for handling that finishes later). */
  manualAck?: boolean;
}

/** What a subscription needs of its client. */
export interface SubscriptionHost {
  leave(subscription: Subscription): Promise<void>;
  /** Every publication delivered to the app, for the client's own `publication` event. */
  forward(publication: Publication): void;
  /** The channel's stream changed under a live subscription: learn its epoch. */
  resync(subscription: Subscription): void;
  /** Acknowledges every publication of the channel up to `offset` (delivery receipts). */
  ack(subscription: Subscription, offset: number): void;
}

export class Subscription extends Emitter<SubscriptionEvents> {
  readonly channel: string;
  private _serverSide: boolean;
  private _state: SubscriptionState = "subscribing";
  private _position?: Position;
  private attached = false;
  /** The server asks this channel's subscribers to acknowledge. */
  private receipts = false;
  /** The highest offset handled (and to be acknowledged), and the epoch it belongs to. */
  private handled = 0;
  private handledEpoch: string | undefined;
  private ackQueued = false;

  /** @internal */
  constructor(
    channel: string,
    serverSide: boolean,
    private readonly host: SubscriptionHost,
    private readonly options: SubscribeOptions = {},
  ) {
    super();
    this.channel = channel;
    this._serverSide = serverSide;
  }

  /** Made by the server (the token's `subs` claim, or the backend): recovered through
   * `connect`, never resubscribed by the client. */
  get serverSide(): boolean {
    return this._serverSide;
  }

  get state(): SubscriptionState {
    return this._state;
  }

  /** The last publication delivered (with its epoch), where the channel keeps history. */
  get position(): Position | undefined {
    return this._position ? { ...this._position } : undefined;
  }

  /** Ends the subscription (the server is told when connected). */
  unsubscribe(): Promise<void> {
    return this.host.leave(this);
  }

  /** On a channel with receipts (`manualAck`): every publication up to `offset` (by
   * default the last one delivered) is handled; the server counts it acknowledged. */
  ack(offset?: number): void {
    const upTo = offset ?? this._position?.offset;
    if (upTo !== undefined) this.handledUpTo(upTo);
  }

  /** @internal The server made this subscription too (the token's `subs` claim). */
  markServerSide(): void {
    this._serverSide = true;
  }

  /** @internal The subscription is live: a subscribe reply or a `sub` push. */
  attach(result: AttachResult): void {
    // Ended while its subscribe was on the way: the client has told the server.
    if (this._state === "unsubscribed") return;
    const resumed = this.attached;
    this.attached = true;
    const previous = this._position;
    let recovered = !resumed;
    this.receipts = result.receipts === true;
    if (this.receipts && result.epoch !== this.handledEpoch) {
      // A new stream: what was handled in the old one is not in it.
      this.handled = 0;
      this.handledEpoch = result.epoch;
    }
    if (result.recoverable && result.epoch !== undefined && result.offset !== undefined) {
      if (result.recovered) {
        for (const p of result.publications ?? []) {
          this.deliver({ channel: this.channel, data: p.data, offset: p.offset }, result.epoch);
        }
        recovered = true;
      } else if (resumed || result.recovered === false) {
        this.emit("unrecovered", {
          channel: this.channel,
          reason: "not_recovered",
          position: previous,
        });
        recovered = false;
      }
      if (!this._position || this._position.epoch !== result.epoch || this._position.offset < result.offset) {
        this._position = { offset: result.offset, epoch: result.epoch };
      }
    } else if (resumed) {
      this.emit("unrecovered", { channel: this.channel, reason: "no_history" });
      recovered = false;
    }
    // A listener above may have ended the subscription.
    if ((this._state as SubscriptionState) === "unsubscribed") return;
    // An acknowledgement the previous connection may not have carried goes again.
    if (this.receipts && resumed && this.handled > 0) this.host.ack(this, this.handled);
    this.setState("subscribed");
    this.emit("subscribed", {
      channel: this.channel,
      resumed,
      recovered,
      position: this.position,
    });
  }

  /** @internal A live `pub` push of this channel. Within one connection publications come
   * in order, each once (protocol §6): an offset that is not one more than the last means
   * the stream started over in a new epoch (or publications in between are gone). */
  publication(publication: Publication): void {
    if (this._state !== "subscribed") return;
    const offset = publication.offset;
    const last = this._position;
    if (offset !== undefined && last && offset !== last.offset + 1) {
      this.emit("unrecovered", { channel: this.channel, reason: "gap", position: { ...last } });
      // A new stream: what was handled in the old one is not in it.
      this.handled = 0;
      this.handledEpoch = undefined;
      // The new epoch is learnt from the server; the offset is this publication's.
      this._position = { offset, epoch: last.epoch };
      this.host.resync(this);
      this.emitPublication(publication);
      return;
    }
    this.deliver(publication, last?.epoch);
  }

  /** @internal A `lost` push of this channel: the position moves past what was dropped. */
  lost(lost: { count: number; from?: number; to?: number }): void {
    if (this._state !== "subscribed") return;
    const last = this._position;
    if (lost.to !== undefined && last && lost.to > last.offset) {
      this._position = { offset: lost.to, epoch: last.epoch };
    }
    this.emit("lost", { channel: this.channel, ...lost });
  }

  /** @internal The channel's current epoch, after a gap (see `publication`). */
  resynced(epoch: string): void {
    if (this._position) this._position = { offset: this._position.offset, epoch };
    this.handledEpoch ??= epoch;
  }

  private deliver(publication: Publication, epoch: string | undefined): void {
    const offset = publication.offset;
    if (offset !== undefined && epoch !== undefined) {
      const last = this._position;
      // Already delivered: at most once.
      if (last && last.epoch === epoch && offset <= last.offset) return;
      this._position = { offset, epoch };
    }
    this.emitPublication(publication);
  }

  private emitPublication(publication: Publication): void {
    this.emit("publication", publication);
    this.host.forward(publication);
    // Handled once the listeners have returned.
    if (this.receipts && !this.options.manualAck && publication.offset !== undefined) {
      this.handledUpTo(publication.offset);
    }
  }

  /** Acknowledges up to `offset`, once for everything handled in the same task. */
  private handledUpTo(offset: number): void {
    if (!this.receipts || offset <= this.handled) return;
    this.handled = offset;
    if (this.ackQueued) return;
    this.ackQueued = true;
    queueMicrotask(() => {
      this.ackQueued = false;
      if (this._state === "subscribed") this.host.ack(this, this.handled);
    });
  }

  /** @internal The connection ended: the subscription waits for the next one. */
  detach(): void {
    if (this._state === "subscribed") this.setState("subscribing");
  }

  /** @internal The subscription is over. */
  end(code: number, reason: string): void {
    if (this._state === "unsubscribed") return;
    this.setState("unsubscribed");
    this.emit("unsubscribed", { channel: this.channel, code, reason });
  }

  /** @internal The server refused the subscribe. */
  fail(error: SidecastError): void {
    this.emit("error", error);
    this.end(0, error.message);
  }

  /** @internal A `join` or `leave` push. */
  membership(kind: "join" | "leave", who: ClientInfo): void {
    this.emit(kind, { ...who, channel: this.channel });
  }

  private setState(state: SubscriptionState): void {
    if (this._state === state) return;
    this._state = state;
    this.emit("state", { channel: this.channel, state });
  }
}
