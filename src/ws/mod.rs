//! The client side: WebSocket listener, one session per connection, and protocol v1.
//!
//! `server` accepts and upgrades; `session` reads a connection's frames (decoded by
//! `inbound`) and acts on its commands; `socket` shares a plain TCP socket with the outbox,
//! which writes to it when idle, and `writer` drains the rest; `protocol` and `frame` are the
//! pure encoding of what travels; `close` is the table of close codes.

pub mod admission;
pub mod close;
mod footprint;
pub mod frame;
mod inbound;
pub mod origin;
pub mod protocol;
pub mod server;
mod session;
mod socket;
mod writer;

pub use footprint::connection_state_sizes;
pub use writer::unix_now;
