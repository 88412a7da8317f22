export { Sidecast } from "./control.js";
export type { HistoryPage, Info, NodeStats, Presence, PublishResult, Receipt, SidecastOptions, Target, TlsOptions } from "./control.js";
export { Consumer } from "./events.js";
export { Publisher } from "./publisher.js";
export type { PublisherOptions } from "./publisher.js";
export type { ConsumeOptions, EventKind, Joined, RpcCall, SidecastEvent } from "./events.js";
export { RpcError, SidecastError } from "./errors.js";
export { mintToken } from "./token.js";
export type { TokenOptions } from "./token.js";
