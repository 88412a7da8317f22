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
}

export class Subscription extends Emitter<SubscriptionEvents> {
  readonly channel: string;
  /** Made by the server (the token's `subs` claim, or the backend): recovered through
   * `connect`, never resubscribed by the client. */
  readonly serverSide: boolean;
  private _state: SubscriptionState = "subscribing";
  private _position?: Position;
  private attached = false;

  /** @internal */
  constructor(
    channel: string,
    serverSide: boolean,
    private readonly leave: (s: Subscription) => Promise<void>,
  ) {
    super();
    this.channel = channel;
    this.serverSide = serverSide;
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
    return this.leave(this);
  }

  /** @internal The subscription is live: a subscribe reply or a `sub` push. */
  attach(result: AttachResult): void {
    const resumed = this.attached;
    this.attached = true;
    const previous = this._position;
    let recovered = !resumed;
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
    this.setState("subscribed");
    this.emit("subscribed", {
      channel: this.channel,
      resumed,
      recovered,
      position: this.position,
    });
  }

  /** @internal A `pub` push of this channel. */
  publication(publication: Publication): void {
    if (this._state !== "subscribed") return;
    this.deliver(publication, this._position?.epoch);
  }

  private deliver(publication: Publication, epoch: string | undefined): void {
    const offset = publication.offset;
    if (offset === undefined || epoch === undefined) {
      this.emit("publication", publication);
      return;
    }
    const last = this._position;
    if (last && last.epoch === epoch) {
      // Already delivered (recovered, then seen again live): at most once.
      if (offset <= last.offset) return;
      if (offset > last.offset + 1) {
        // A gap within the subscription: the stream started over, or publications expired.
        this.emit("unrecovered", { channel: this.channel, reason: "gap", position: last });
      }
    }
    this._position = { offset, epoch };
    this.emit("publication", publication);
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
