//! sidecast: a WebSocket fan-out sidecar controlled over gRPC.
//!
//! The layers, top to bottom; each imports only those below it (a test in `layers` checks
//! that the core imports no edge and no generated protobuf):
//! - **edges**: `ws` (clients' WebSockets), `grpc` (the backends' control API, and the only
//!   user of `pb`), `admin` (health and metrics), `run` (starts and drains them), `main`.
//! - **the node's API**: `node`, every use-case (publish, subscribe, history, presence,
//!   send, disconnect, info...), called by the edges.
//! - **core**: `hub` (this node's connections and channels, fan-out), `broker` (the engine
//!   boundary: history, offsets, idempotency, presence, delivery to the hub; in memory or
//!   on Redis), `outbox` (a connection's
//!   bounded queue, and how a fan-out's sockets are written), `events` (the backend event
//!   stream's groups), `auth`, `config`, `metrics`, `tls`, `trace` (the spans of traced
//!   publications, and their export).
//! - **wire**: `wire`, the vocabulary of protocol v1 (frames, close codes, commands, server
//!   messages, channel names), importing nothing of ours.
//!
//! A publication from the control API to a subscriber's socket passes through six files:
//! 1. `grpc/service.rs`: `Publish` turns the request into [`node::Node::publish`];
//! 2. `node/publish.rs`: checks the channel and the data, hands them to the engine;
//! 3. `broker/memory.rs` (dispatched by `broker/mod.rs`): the next offset and the history
//!    append under the channel's record lock, then [`hub::Hub::deliver`] (on Redis:
//!    `broker/redis/mod.rs` runs the publish script, and each node's `broker/redis/feed.rs`
//!    hands what comes back on the channel's topic to its hub);
//! 4. `hub/mod.rs`: encodes the frame once (`wire::message`) and pushes it into each
//!    subscriber's outbox under the channel's lock (`hub/subscribers.rs` holds the set);
//! 5. `outbox/flush.rs`: once every lock is released, writes the idle sockets (the first 16
//!    inline, the rest by the node's flushing task) or, when the node is behind, leaves them
//!    all to that task's next turn, `write_coalesce` after its last;
//! 6. `outbox/mod.rs`: the non-blocking write (or the connection's task drains the queue).
//!
//! A client's command goes `ws/connection.rs` (frames) → `ws/handler.rs` (decode with
//! `wire::command`, call the node) → `node/` → the same path.

pub mod admin;
pub mod auth;
pub mod broker;
pub mod config;
pub mod events;
pub mod grpc;
pub mod hub;
#[cfg(test)]
mod layers;
pub mod metrics;
pub mod node;
pub mod outbox;
pub mod pb;
mod run;
#[doc(hidden)]
pub mod testkit;
pub mod tls;
pub mod trace;
pub mod wire;
pub mod ws;

pub use run::{run, Listeners, RunError};
