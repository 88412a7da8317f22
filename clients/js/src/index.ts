// @sidecast/client: the browser and Node client of sidecast (docs/sdk.md).

export { Client } from "./client.js";
export type {
  ClientEvents,
  ClientOptions,
  ConnectionState,
  Transport,
  WebSocketConstructor,
  WebSocketLike,
} from "./client.js";
export { Subscription } from "./subscription.js";
export type {
  ClientInfo,
  Position,
  Publication,
  SubscribeOptions,
  SubscriptionEvents,
  SubscriptionState,
} from "./subscription.js";
export { SidecastError } from "./errors.js";
export type { ErrorCode } from "./errors.js";
export { afterClose } from "./codes.js";
export type { AfterClose } from "./codes.js";
export { backoffDelay } from "./backoff.js";
export type { BackoffOptions } from "./backoff.js";
