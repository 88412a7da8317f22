// What a close code means for the client: docs/protocol.md, section 10. The one table the
// reconnect logic reads.

/** What the client does after the connection closed with a code. */
export type AfterClose =
  /** Reconnect with backoff (and recover subscriptions). */
  | "reconnect"
  /** Fetch a new token first, then reconnect. */
  | "new-token"
  /** Do not reconnect: the app must change something (client, token, user action). */
  | "stop";

/** The policy for a close code, including codes this client does not know (by range). */
export function afterClose(code: number): AfterClose {
  switch (code) {
    case 1000:
      // Our own close echoed: the app asked for it.
      return "stop";
    case 1002:
    case 1007:
    case 1009:
      return "stop";
    case 4001:
    case 4002:
      return "new-token";
    case 1001:
    case 1005:
    case 1006:
    case 1011:
    case 4004:
    case 4005:
    case 4006:
    case 4007:
      return "reconnect";
  }
  if (code >= 4000 && code <= 4499) return "reconnect";
  if (code >= 4500 && code <= 4999) return "stop";
  // Anything else (other 1xxx, 3xxx): a transport problem; try again.
  return "reconnect";
}
