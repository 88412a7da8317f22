// One error type for every failed call: the gRPC status by name, and sidecast's message.

import grpc from "@grpc/grpc-js";

/** A control call or the event stream failed. `code` is the gRPC status name
 * (`INVALID_ARGUMENT`, `NOT_FOUND`, `UNAVAILABLE`, `UNAUTHENTICATED`, …; the table is in
 * docs/backend.md and proto/sidecast/v1/control.proto), `message` sidecast's reason. */
export class SidecastError extends Error {
  readonly code: string;
  readonly status: number;

  constructor(status: number, message: string) {
    super(message);
    this.name = "SidecastError";
    this.status = status;
    this.code = grpc.status[status] ?? `STATUS_${status}`;
  }

  static from(error: unknown): SidecastError {
    if (error instanceof SidecastError) return error;
    const e = error as Partial<grpc.ServiceError>;
    if (typeof e?.code === "number") return new SidecastError(e.code, e.details || e.message || "");
    return new SidecastError(grpc.status.UNKNOWN, String((error as Error)?.message ?? error));
  }
}

/** What an rpc handler throws to answer the client with an error: `code` and `message`
 * reach the client as `rpc_code` and `message` (docs/protocol.md). Anything else thrown
 * answers 500 "internal error", without the exception's text. */
export class RpcError extends Error {
  readonly code: number;

  constructor(code: number, message: string) {
    super(message);
    this.name = "RpcError";
    this.code = code;
  }
}
