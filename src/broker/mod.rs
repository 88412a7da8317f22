//! The engine boundary: where a publication goes to reach every node's subscribers.
//!
//! The control API and client publishes call [`Broker::publish`]; the engine delivers the
//! publication to the [`Hub`](crate::hub::Hub) of every node that has subscribers. The
//! in-memory engine serves a single node with nothing to install; a Redis engine (several
//! nodes sharing publications, history and presence) is another variant of this enum,
//! chosen at runtime by configuration, not by a cargo feature.

mod memory;

pub use memory::MemoryBroker;

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
    /// Publishes `data` (validated JSON) to `channel`.
    pub async fn publish(&self, channel: &str, data: &[u8]) -> Result<Published, BrokerError> {
        match self {
            Broker::Memory(memory) => Ok(memory.publish(channel, data)),
        }
    }
}
