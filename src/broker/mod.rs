//! The engine boundary: where a publication goes to reach every node's subscribers, and
//! where channels keep their history.
//!
//! The control API and client publishes call [`Broker::publish`]; the engine appends the
//! publication to the channel's history (where the namespace keeps one) and delivers it to
//! the [`Hub`](crate::hub::Hub) of every node that has subscribers. Subscribing goes through
//! [`Broker::subscribe`] so that reading a channel's position (and recovering what a client
//! missed) and joining its subscribers happen with no publication in between. The
//! in-memory engine serves a single node with nothing to install; a Redis engine (several
//! nodes sharing publications, history and presence) is another variant of this enum, chosen
//! at runtime by configuration, not by a cargo feature.

mod history;
mod memory;

use std::time::Instant;

pub use history::{Entry, Position, Recovery, ENTRY_OVERHEAD};
pub use memory::{recovered, MemoryBroker};

/// What a publish returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Published {
    /// Position in the channel's history: 0 where the channel keeps none.
    pub offset: u64,
    /// The history stream's epoch: empty where the channel keeps none.
    pub epoch: String,
    /// Connections on this node the publication was queued to.
    pub delivered: u32,
}

/// What a new subscription starts from.
#[derive(Debug)]
pub struct Attach {
    /// The channel's current position; None where it keeps no history.
    pub position: Option<Position>,
    /// What was missed since the position the client gave, if it gave one.
    pub recovery: Option<Recovery>,
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The engine cannot be reached (never for the memory engine).
    #[error("engine unavailable: {0}")]
    Unavailable(String),
}

pub enum Broker {
    Memory(MemoryBroker),
}

impl Broker {
    /// Publishes `data` (validated JSON) to `channel`. With an `idempotency_key` seen for this
    /// channel within idempotency_window, returns the first result and publishes nothing.
    pub async fn publish(
        &self,
        channel: &str,
        data: &[u8],
        idempotency_key: Option<&str>,
    ) -> Result<Published, BrokerError> {
        match self {
            Broker::Memory(memory) => {
                Ok(memory.publish(channel, data, idempotency_key, Instant::now()))
            }
        }
    }

    /// Runs `attach` with the channel's position and recovery, atomically with respect to
    /// the channel's publications. `budget` bounds the recovered bytes: the caller gives what
    /// its connection's queue can still take without tripping the slow-consumer close.
    pub fn subscribe<R>(
        &self,
        channel: &str,
        since: Option<&Position>,
        budget: usize,
        attach: impl FnOnce(Attach) -> R,
    ) -> R {
        match self {
            Broker::Memory(memory) => {
                memory.subscribe(channel, since, budget, Instant::now(), attach)
            }
        }
    }

    /// A page of history and the channel's position; None where it keeps no history.
    pub fn history(
        &self,
        channel: &str,
        since: Option<u64>,
        limit: usize,
        reverse: bool,
    ) -> Option<(Vec<Entry>, Position)> {
        match self {
            Broker::Memory(memory) => {
                memory.history(channel, since, limit, reverse, Instant::now())
            }
        }
    }

    /// Drops a channel's kept publications, keeping its position; false without history.
    pub fn remove_history(&self, channel: &str) -> bool {
        match self {
            Broker::Memory(memory) => memory.remove_history(channel, Instant::now()),
        }
    }

    /// Periodic housekeeping: forgets expired positions and idempotency keys.
    pub fn sweep(&self) {
        match self {
            Broker::Memory(memory) => {
                memory.sweep(Instant::now());
            }
        }
    }
}
