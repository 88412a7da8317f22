// The connection's token: the one given, or one from getToken (one request at a time), and
// its refresh over the live socket before it expires (one refresh in flight, whoever asks).

import { SidecastError } from "./errors.js";

/** setTimeout's largest delay: longer ones fire at once. */
const MAX_DELAY = 2 ** 31 - 1;

export interface TokenOptions {
  token?: string;
  getToken?: () => Promise<string>;
  refreshBefore?: number;
}

export class Tokens {
  /** The token to connect with; cleared when the server refused it (4001, 4002). */
  private token: string | null;
  private request: Promise<string> | null = null;
  private refreshing: Promise<void> | null = null;
  private timer: ReturnType<typeof setTimeout> | null = null;

  /** `send` refreshes over the socket and resolves with the new `expires_in`; `report`
   * tells the app of a failed refresh. */
  constructor(
    private readonly options: TokenOptions,
    private readonly send: (token: string) => Promise<number>,
    private readonly report: (error: Error) => void,
  ) {
    this.token = options.token ?? null;
  }

  /** The token to connect with: the given one, or one from getToken. */
  current(): Promise<string> {
    if (this.token) return Promise.resolve(this.token);
    return this.fresh();
  }

  /** The server refused the token: the next connect asks for a new one. */
  refused(): void {
    this.token = null;
  }

  private fresh(): Promise<string> {
    const getToken = this.options.getToken;
    if (!getToken) return Promise.reject(new Error("sidecast: the token was refused and there is no getToken"));
    this.request ??= getToken()
      .then((token) => {
        this.token = token;
        return token;
      })
      .finally(() => {
        this.request = null;
      });
    return this.request;
  }

  /** Plans the refresh of a token that expires in `expiresIn` seconds. */
  schedule(expiresIn: number): void {
    this.stop();
    if (!this.options.getToken) return;
    const before = this.options.refreshBefore ?? Math.max(5, expiresIn / 5);
    // Never sooner than half the token's life (or 5 s): a refreshBefore as long as the
    // lifetime must not turn into a refresh loop.
    const inSeconds = Math.max(expiresIn - before, Math.min(expiresIn / 2, 5));
    this.later(inSeconds * 1000);
  }

  /** No refresh planned (the connection ended). */
  stop(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }

  private later(ms: number): void {
    this.stop();
    this.timer = setTimeout(() => {
      this.timer = null;
      void this.refresh();
    }, Math.min(ms, MAX_DELAY));
  }

  /** Sends a fresh token; at most one refresh is ever in flight. */
  refresh(): Promise<void> {
    this.refreshing ??= (async () => {
      try {
        const token = await this.fresh();
        this.schedule(await this.send(token));
      } catch (e) {
        const error = e instanceof Error ? e : new Error(String(e));
        this.report(error);
        if (error instanceof SidecastError && error.code === "unauthorized") {
          // A token the server refused: try once more a little later, before the old one
          // expires (the server closes with 4002 then, and reconnecting fetches a new one).
          this.token = null;
          this.later(5000);
        }
      } finally {
        this.refreshing = null;
      }
    })();
    return this.refreshing;
  }
}
