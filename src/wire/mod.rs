//! The wire vocabulary of client protocol v1, at the bottom of the layers: it imports
//! nothing else of sidecast, and everything above may import it.
//!
//! - `inbound` decodes the client's WebSocket frames; `frame` encodes the server's.
//! - `command` decodes a client's commands; `message` encodes what the server sends (replies
//!   and pushes, one enum) and holds the closed set of error codes.
//! - `close` is the table of close codes; `channel` the rules of channel names and grant
//!   patterns; `position` the stream positions and publications that recovery carries;
//!   `json` the check every publication's data passes once; `origin` the upgrade's Origin rules;
//!   `cookie` the session cookie's name and where its value is; `sse` the events the SSE
//!   transport makes of server frames; `traceparent` the W3C trace context a publication
//!   may carry; `clip` how error messages
//!   quote what the caller sent.
//!
//! docs/protocol.md is the specification these files follow.

pub mod channel;
mod clip;
pub mod close;
pub mod command;
pub mod cookie;
mod error_code;
pub mod frame;
pub mod inbound;
pub mod json;
pub mod message;
pub mod origin;
pub mod position;
pub mod sse;
pub mod traceparent;

pub use clip::clip;
pub use close::Close;
pub use message::{ErrorCode, ServerMessage};
pub use position::{Attach, Position, Publication, Recovery};
pub use traceparent::{TraceId, TraceParent};

pub const PROTOCOL_VERSION: u32 = 1;
pub const SUBPROTOCOL: &str = "sidecast.v1";
