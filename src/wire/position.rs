//! Positions in a channel's stream and the publications a client can recover: what a
//! subscribe reply, a `sub` push and a history page carry.
//!
//! The engine (`broker`) produces these values and the encoders of `message` write them;
//! docs/protocol.md (recovery) is the specification.

use std::sync::Arc;

use bytes::Bytes;

/// A stream position: what a client remembers to resume from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    pub offset: u64,
    pub epoch: Arc<str>,
}

/// A kept publication: its offset and its data (the backend's JSON, verbatim).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publication {
    pub offset: u64,
    pub data: Bytes,
}

/// What one publication adds to a reply besides its data: `{"offset":N,"data":}` and a comma.
pub const PUBLICATION_OVERHEAD: usize = 40;

impl Publication {
    /// The bytes it takes in a reply, which the page and recovery limits count.
    pub fn reply_size(&self) -> usize {
        self.data.len() + PUBLICATION_OVERHEAD
    }
}

/// The answer to "what did I miss since this position?".
#[derive(Debug, PartialEq, Eq)]
pub enum Recovery {
    /// Every publication after the position, in order (possibly none).
    Complete(Vec<Publication>),
    /// The epoch changed, a publication after the position has expired, or more were missed
    /// than allowed: nothing is returned, never a part.
    Impossible,
}

impl Recovery {
    pub fn recovered(&self) -> bool {
        matches!(self, Recovery::Complete(_))
    }
}

/// What a new subscription starts from.
#[derive(Debug)]
pub struct Attach {
    /// The channel's current position; None where it keeps no history.
    pub position: Option<Position>,
    /// What was missed since the position the client gave, if it gave one.
    pub recovery: Option<Recovery>,
    /// The channel's namespace asks for acknowledgements (`receipts`).
    pub receipts: bool,
}
