// The SSE transport behind the WebSocket interface the client uses: the stream's events are
// its messages, commands are POSTed one at a time (so they keep their order), and a `close`
// event, a refused request or a lost stream is its close. docs/protocol.md, section 14.

import type { WebSocketLike } from "./client.js";

type Fetch = typeof fetch;

/** A refused request's body, or the `close` event's data. */
interface CloseData {
  code?: number;
  reason?: string;
}

export class SseSocket implements WebSocketLike {
  readyState = 0;
  onopen: ((event: unknown) => void) | null = null;
  onmessage: ((event: { data: unknown }) => void) | null = null;
  onclose: ((event: { code: number; reason: string }) => void) | null = null;
  onerror: ((event: unknown) => void) | null = null;

  private readonly abort = new AbortController();
  private session: string | null = null;
  /** The stream was accepted (its `session` event came): the transport works. */
  established = false;
  /** Commands not yet POSTed, in order; the stream's session key comes first. */
  private readonly outbox: string[] = [];
  private posting = false;
  private closed = false;

  constructor(
    private readonly url: string,
    private readonly withCookie: boolean,
    private readonly fetchFn: Fetch,
  ) {
    // The stream opens with the `connect` command, which carries the token: the client
    // sends it as soon as the socket is open.
    queueMicrotask(() => {
      if (this.closed) return;
      this.readyState = 1;
      this.onopen?.({});
    });
  }

  send(data: string): void {
    if (this.closed) return;
    const command = JSON.parse(data) as Record<string, unknown>;
    if (command.op === "connect") {
      void this.stream(command.token as string | undefined, command.subs as Record<string, unknown> | undefined);
      return;
    }
    this.outbox.push(data);
    void this.post();
  }

  close(code = 1000, reason = ""): void {
    this.finish(code, reason);
  }

  private async stream(token: string | undefined, subs: Record<string, unknown> | undefined): Promise<void> {
    const headers: Record<string, string> = {};
    if (token) headers.authorization = `Bearer ${token}`;
    // The positions of the server-side subscriptions, as `connect`'s `subs` would carry them.
    if (subs && Object.keys(subs).length > 0) headers["last-event-id"] = JSON.stringify(subs);
    let response: Response;
    try {
      response = await this.fetchFn(this.url, {
        headers,
        signal: this.abort.signal,
        credentials: this.withCookie ? "include" : "same-origin",
        cache: "no-store",
      });
    } catch {
      return this.finish(1006, "the stream could not be opened");
    }
    if (!response.ok || !response.body) {
      const refused = (await response.json().catch(() => ({}))) as CloseData;
      if (refused.reason === "missing token") {
        // Over a WebSocket a `connect` without a token (and without the cookie) is answered
        // with this error reply rather than a close: the client reacts the same way.
        const error = { code: "bad_request", message: "missing token" };
        this.onmessage?.({ data: JSON.stringify({ id: 1, error }) });
      }
      return this.finish(refused.code ?? 1006, refused.reason ?? `HTTP ${response.status}`);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let text = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        text += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
        let end: number;
        while ((end = text.indexOf("\n\n")) >= 0) {
          const block = text.slice(0, end);
          text = text.slice(end + 2);
          this.event(block);
          if (this.closed) return;
        }
      }
    } catch {
      // Aborted by close(), or the network failed: either way the stream is over.
    }
    this.finish(1006, "the stream ended");
  }

  private event(block: string): void {
    let name = "message";
    const data: string[] = [];
    for (const line of block.split("\n")) {
      const colon = line.indexOf(":");
      if (colon === 0) continue;
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") name = value;
      else if (field === "data") data.push(value);
    }
    if (data.length === 0) return;
    const payload = data.join("\n");
    if (name === "session") {
      this.session = (JSON.parse(payload) as { session: string }).session;
      this.established = true;
      void this.post();
    } else if (name === "close") {
      const close = JSON.parse(payload) as CloseData;
      this.finish(close.code ?? 1005, close.reason ?? "");
    } else if (name === "message") {
      this.onmessage?.({ data: payload });
    }
  }

  /** POSTs what waits, one command at a time. */
  private async post(): Promise<void> {
    if (this.posting || this.session === null) return;
    this.posting = true;
    const url = new URL(this.url);
    url.search = `session=${this.session}`;
    try {
      while (this.outbox.length > 0 && !this.closed) {
        const body = this.outbox[0];
        let response: Response;
        try {
          response = await this.fetchFn(url.toString(), {
            method: "POST",
            body,
            headers: { "content-type": "text/plain" },
            credentials: this.withCookie ? "include" : "same-origin",
            signal: this.abort.signal,
          });
        } catch {
          return this.finish(1006, "a command could not be sent");
        }
        if (response.status === 429) {
          // The connection has not read what came before yet: try again shortly.
          await new Promise((resolve) => setTimeout(resolve, 100));
          continue;
        }
        this.outbox.shift();
        if (response.status === 404) {
          // The connection ended: its stream carries the close event, which wins if it
          // comes within a second.
          setTimeout(() => this.finish(1006, "the stream's session is gone"), 1000);
          return;
        }
        if (!response.ok) {
          const refused = (await response.json().catch(() => ({}))) as CloseData;
          return this.finish(refused.code ?? 1006, refused.reason ?? `HTTP ${response.status}`);
        }
      }
    } finally {
      this.posting = false;
    }
  }

  private finish(code: number, reason: string): void {
    if (this.closed) return;
    this.closed = true;
    this.readyState = 3;
    this.abort.abort();
    const onclose = this.onclose;
    queueMicrotask(() => onclose?.({ code, reason }));
  }
}
