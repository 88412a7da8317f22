//! What the backends hear about: the domain events the hub and the node report, as the
//! event groups keep and deliver them. `grpc::events` turns them into the control API's
//! messages; nothing here knows the wire.

use std::sync::Arc;

/// The kinds a group can ask for (`Join::kinds`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Connect,
    Disconnect,
    Subscribe,
    Unsubscribe,
    Publish,
    Rpc,
}

impl EventKind {
    /// The kind's bit in a group's set of kinds.
    pub fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

/// What happened to a connection (or to a group's buffer, for `Lost`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum What {
    /// A connection authenticated; `meta` and `info` are the token's claims as JSON text
    /// (empty when absent).
    Connect {
        meta: Vec<u8>,
        info: Vec<u8>,
    },
    /// A connection ended, with the close that ended it.
    Disconnect {
        code: u16,
        reason: String,
    },
    Subscribe {
        channel: String,
        server_side: bool,
    },
    /// `code`: 0 when the client asked, else the `unsub` push's code.
    Unsubscribe {
        channel: String,
        code: u32,
    },
    Publish {
        channel: String,
        data: Vec<u8>,
        offset: u64,
        epoch: String,
    },
    Rpc {
        rpc_id: String,
        method: String,
        data: Vec<u8>,
    },
    /// Events `first_seq..=last_seq` of the group were dropped: its buffer was full.
    Lost {
        first_seq: u64,
        last_seq: u64,
    },
}

impl What {
    /// The kind a group asks for to receive it; None for `Lost`, which every group gets.
    pub fn kind(&self) -> Option<EventKind> {
        Some(match self {
            What::Connect { .. } => EventKind::Connect,
            What::Disconnect { .. } => EventKind::Disconnect,
            What::Subscribe { .. } => EventKind::Subscribe,
            What::Unsubscribe { .. } => EventKind::Unsubscribe,
            What::Publish { .. } => EventKind::Publish,
            What::Rpc { .. } => EventKind::Rpc,
            What::Lost { .. } => return None,
        })
    }
}

/// An event as it happened, shared by every group that receives it.
#[derive(Debug)]
pub struct Body {
    /// Empty for events about no connection (`lost`).
    pub client: Arc<str>,
    pub user: Arc<str>,
    pub time_ms: u64,
    pub what: What,
}

impl Body {
    /// What the event counts against the buffer's byte bound.
    pub fn size(&self) -> usize {
        let payload = match &self.what {
            What::Connect { meta, info } => meta.len() + info.len(),
            What::Disconnect { reason, .. } => reason.len(),
            What::Subscribe { channel, .. } | What::Unsubscribe { channel, .. } => channel.len(),
            What::Publish {
                channel,
                data,
                epoch,
                ..
            } => channel.len() + data.len() + epoch.len(),
            What::Rpc {
                rpc_id,
                method,
                data,
            } => rpc_id.len() + method.len() + data.len(),
            What::Lost { .. } => 0,
        };
        EVENT_OVERHEAD + self.client.len() + self.user.len() + payload
    }
}

/// Bytes an event costs beyond its strings: the entry, its map node and the shared body.
pub const EVENT_OVERHEAD: usize = 160;

/// An event handed to a member: its group's sequence number (0 for rpcs, which are not
/// acknowledged) and whether another member had it before.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub seq: u64,
    pub redelivered: bool,
    pub body: Arc<Body>,
}

/// What a member's stream carries, in order: `Joined` first, then its events.
#[derive(Debug)]
pub enum ToMember {
    Joined(Joined),
    Event(Delivery),
}

/// The answer to a join.
#[derive(Debug, Clone)]
pub struct Joined {
    pub member: u64,
    /// The group existed (its buffer was kept while it had no member).
    pub resumed: bool,
    pub window: usize,
    pub buffered: u64,
    pub node_id: String,
}
