//! The client side: WebSocket listener, one session per connection, and protocol v1.
//!
//! `server` accepts and upgrades; `session` reads a connection's frames (decoded by
//! `inbound`) and acts on its commands; `socket` shares a plain TCP socket with the outbox,
//! which writes to it when idle (the session drains the rest); `clock` keeps a connection's
//! deadlines; `protocol` and `frame` are the
//! pure encoding of what travels; `close` is the table of close codes.

pub mod admission;
mod clock;
pub mod close;
mod footprint;
pub mod frame;
mod inbound;
pub mod origin;
pub mod protocol;
pub mod server;
mod session;
mod socket;

pub use clock::unix_now;
pub use footprint::connection_state_sizes;
