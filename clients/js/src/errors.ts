// The errors a call can end with: the protocol's error codes, and the client's own.

/** The protocol's error codes (docs/protocol.md, section 4), and the client's own:
 * `timeout` (no reply within the call's timeout) and `disconnected` (the connection ended
 * before the reply). */
export type ErrorCode =
  | "bad_request"
  | "unauthorized"
  | "forbidden"
  | "not_found"
  | "not_available"
  | "already_subscribed"
  | "unrecoverable_position"
  | "limit_exceeded"
  | "unavailable"
  | "internal"
  | "rpc_error"
  | "timeout"
  | "disconnected";

/** A failed call: `code` is what to act on, `message` is for humans. */
export class SidecastError extends Error {
  readonly code: ErrorCode;
  /** The backend's own code, for `rpc_error`. */
  readonly rpcCode?: number;

  constructor(code: ErrorCode, message: string, rpcCode?: number) {
    super(message);
    this.name = "SidecastError";
    this.code = code;
    this.rpcCode = rpcCode;
  }
}
