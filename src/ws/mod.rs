//! The client edge: the WebSocket listener and one task per connection.
//!
//! `server` accepts and upgrades (after `admission`'s limits); `connection` is a
//! connection's task: it reads frames with `reader` (from a plain TCP socket shared with the
//! outbox through `socket`, or any other stream), keeps the deadlines of `clock`, and hands
//! each message to its `handler`, which decodes the command, calls the node, and replies;
//! `error` maps what fails to the reply's code, `rate` bounds the command rate, `rpc` waits
//! for a backend's answer. `sse` serves the same connections over Server-Sent Events, for
//! clients whose network blocks WebSockets. The wire format itself is `crate::wire`.

pub mod admission;
mod clock;
mod connection;
mod error;
mod footprint;
mod handler;
mod rate;
mod reader;
mod rpc;
pub mod server;
mod socket;
pub mod sse;

pub use clock::unix_now;
pub use footprint::connection_state_sizes;
