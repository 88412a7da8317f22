//! The engine boundary: what every engine (the embedded memory engine, and the Redis engine
//! shared by several nodes) must do, and the rules its callers may rely on.
//!
//! The node's use-cases (`crate::node`) are the only callers. An engine is chosen at run
//! time by configuration (`broker`), never by a cargo feature; [`Broker`] is the closed set
//! of them.
//!
//! # The contract
//! 1. **Publish is atomic per channel.** For a channel whose namespace keeps history,
//!    [`Broker::publish`] takes the next offset (the previous + 1) in the channel's epoch,
//!    appends the data to the bounded history (history_size, history_ttl) and records the
//!    idempotency key, as one step: two publishes to one channel never share an offset, and
//!    a key seen within idempotency_window returns the first publication's offset and epoch
//!    and publishes nothing. Channels without history publish with offset 0 and an empty
//!    epoch (keys still hold).
//! 2. **Delivery to the local hub.** Every publication of a channel reaches this node's
//!    [`Hub`] exactly once and in offset order, through [`Hub::deliver`]: the memory engine
//!    before publish returns, an engine shared by nodes when the publication comes back to
//!    this node (or at once, when it is the next one here). The engine runs the returned
//!    [`Flush`](crate::outbox::Flush) after it has released every lock of its own, so no
//!    socket is written under an engine lock. `Published::delivered` counts this node's
//!    subscribers it was queued to (a shared engine may report 0 when the publication
//!    reached them by another path first). Where a shared engine cannot deliver every
//!    publication (its link broke, the stream restarted), it ends the local subscriptions
//!    with `unsub` 2500 so that each client resubscribes and recovers: nothing is skipped
//!    without a signal.
//! 3. **Positions and epochs.** A channel's [`Position`] is its epoch and the last offset
//!    given. The epoch changes only when the history is lost (its position expired after
//!    history_meta_ttl without a publication, or the engine lost it), never otherwise.
//! 4. **Subscribe sees no gap.** [`Broker::subscribe`] calls `attach` with the channel's
//!    position (and, given `since`, the [`Recovery`](crate::wire::Recovery)) at a moment when no publication of the
//!    channel can be delivered to the local hub between the position read and `attach`
//!    returning: each publication is in the recovery or delivered live to the new
//!    subscriber, never both and never neither. Recovery is all or nothing: every
//!    publication after `since`, at most max_recovery of them and `budget` bytes
//!    (`Publication::reply_size`), or
//!    [`Recovery::Impossible`](crate::wire::Recovery::Impossible).
//! 5. **History pages.** [`Broker::history`] returns at most `limit` kept publications after
//!    `since` (oldest first) or before it (newest first with `reverse`), and the position;
//!    None where the namespace keeps no history. [`Broker::remove_history`] drops what is
//!    kept and keeps the position.
//! 6. **Presence** is the set of connections subscribed to a channel across every node
//!    sharing the engine. Nodes record it from their hub's subscriptions (the hub's
//!    observer); a node that dies without removing its entries has them expire. The memory
//!    engine serves one node, whose hub is the whole record: it answers from the hub, and
//!    nothing can expire.
//! 7. **Errors.** [`BrokerError::Unavailable`] means the engine could not be reached or did
//!    not answer in time: a subscribe made no subscription; a publish did not happen when
//!    the engine could not be reached, and may still happen when it did not answer (a
//!    request already on its way), which a retry with the same idempotency key makes safe.
//!    The memory engine never fails.
//!
//! `conformance` is the suite that drives every rule above through the boundary; each
//! engine runs it.

#[cfg(test)]
mod conformance;
pub mod history;
mod memory;
mod redis;

use std::sync::Arc;
use std::time::Instant;

pub use memory::MemoryBroker;
pub use redis::{Order, RedisBroker};

use crate::config::{Config, Engine};
use crate::hub::Hub;
use crate::trace;
use crate::wire::message::ClientInfo;
use crate::wire::{Attach, Position, Publication, TraceParent};
use tracing::Instrument;

/// What a publish returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Published {
    /// Position in the channel's history: 0 where the channel keeps none.
    pub offset: u64,
    /// The history's epoch: empty where the channel keeps none.
    pub epoch: String,
    /// Connections on this node the publication was queued to.
    pub delivered: u32,
    /// A replay: the idempotency key was seen within idempotency_window, this is the first
    /// publication's result, and nothing was published now.
    pub replayed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The engine cannot be reached (never for the memory engine).
    #[error("engine unavailable: {0}")]
    Unavailable(String),
}

/// The engines.
pub enum Broker {
    Memory(MemoryBroker),
    Redis(RedisBroker),
}

impl Broker {
    /// The embedded engine, delivering to `hub`.
    pub fn memory(hub: Hub, config: Arc<Config>) -> Broker {
        Broker::Memory(MemoryBroker::new(hub, config))
    }

    /// The engine the configuration names (`broker`), delivering to `hub`; `node` names
    /// this node to the others.
    pub fn build(hub: Hub, config: Arc<Config>, node: Arc<str>) -> Broker {
        match config.engine() {
            Engine::Memory => Broker::memory(hub, config),
            Engine::Redis(_) => Broker::Redis(RedisBroker::new(hub, config, node)),
        }
    }

    /// Whether the engine can serve: always for the memory engine; for Redis, while every
    /// address answers and publications come back through each pub/sub connection.
    pub fn ready(&self) -> bool {
        match self {
            Broker::Memory(_) => true,
            Broker::Redis(redis) => redis.ready(),
        }
    }

    /// Orders from the other nodes of a cluster, for this node to carry out and answer
    /// ([`Broker::answer`]); Some once, and only for an engine shared by nodes.
    pub fn orders(&self) -> Option<tokio::sync::mpsc::Receiver<Order>> {
        match self {
            Broker::Memory(_) => None,
            Broker::Redis(redis) => redis.orders(),
        }
    }

    /// Gives an order (the node's JSON) to every other node sharing the engine; their
    /// answers, those that came within redis_timeout. None for a node alone.
    pub async fn ask(
        &self,
        body: Box<serde_json::value::RawValue>,
    ) -> Result<Vec<Box<serde_json::value::RawValue>>, BrokerError> {
        match self {
            Broker::Memory(_) => Ok(Vec::new()),
            Broker::Redis(redis) => redis.ask(body).await,
        }
    }

    /// Answers an order of another node.
    pub async fn answer(
        &self,
        order: Order,
        body: Box<serde_json::value::RawValue>,
    ) -> Result<(), BrokerError> {
        match self {
            Broker::Memory(_) => Ok(()),
            Broker::Redis(redis) => redis.answer(order, body).await,
        }
    }

    /// The ids of the live nodes sharing the engine (this one's only, for the memory engine).
    pub async fn nodes(&self, this: &str) -> Result<Vec<String>, BrokerError> {
        match self {
            Broker::Memory(_) => Ok(vec![this.to_string()]),
            Broker::Redis(redis) => redis.nodes().await,
        }
    }

    /// Publishes `data` (validated JSON) to `channel` (rules 1 and 2); with `receipt`, the
    /// nodes that deliver it tally its delivery receipt with that deadline; with `trace`, it
    /// is traced on every node that delivers it.
    pub async fn publish(
        &self,
        channel: &str,
        data: &[u8],
        idempotency_key: Option<&str>,
        receipt: Option<std::time::Duration>,
        trace: Option<&TraceParent>,
    ) -> Result<Published, BrokerError> {
        let Some(parent) = trace else {
            return match self {
                Broker::Memory(memory) => {
                    let now = Instant::now();
                    Ok(memory.publish(channel, data, idempotency_key, receipt, None, now))
                }
                Broker::Redis(redis) => {
                    (redis.publish(channel, data, idempotency_key, receipt, None)).await
                }
            };
        };
        // A traced publication: the engine's span, and the traceparent of the hops after it.
        let span = trace::engine(self.name(), channel);
        let next = trace::handed_on(&span, parent);
        match self {
            Broker::Memory(memory) => span.in_scope(|| {
                let now = Instant::now();
                Ok(memory.publish(channel, data, idempotency_key, receipt, Some(&next), now))
            }),
            Broker::Redis(redis) => {
                let publish = redis.publish(channel, data, idempotency_key, receipt, Some(&next));
                publish.instrument(span).await
            }
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Broker::Memory(_) => "memory",
            Broker::Redis(_) => "redis",
        }
    }

    /// Runs `attach` with the channel's position and recovery, with no publication of the
    /// channel delivered in between (rule 4). `budget` bounds the recovered bytes.
    pub async fn subscribe<R>(
        &self,
        channel: &str,
        since: Option<&Position>,
        budget: usize,
        attach: impl FnOnce(Attach) -> R,
    ) -> Result<R, BrokerError> {
        match self {
            Broker::Memory(memory) => {
                Ok(memory.subscribe(channel, since, budget, Instant::now(), attach))
            }
            Broker::Redis(redis) => redis.subscribe(channel, since, budget, attach).await,
        }
    }

    /// A page of history and the channel's position; None where it keeps no history (rule 5).
    pub async fn history(
        &self,
        channel: &str,
        since: Option<u64>,
        limit: usize,
        reverse: bool,
    ) -> Result<Option<(Vec<Publication>, Position)>, BrokerError> {
        match self {
            Broker::Memory(memory) => {
                Ok(memory.history(channel, since, limit, reverse, Instant::now()))
            }
            Broker::Redis(redis) => redis.history(channel, since, limit, reverse).await,
        }
    }

    /// Drops a channel's kept publications, keeping its position; false without history.
    pub async fn remove_history(&self, channel: &str) -> Result<bool, BrokerError> {
        match self {
            Broker::Memory(memory) => Ok(memory.remove_history(channel, Instant::now())),
            Broker::Redis(redis) => redis.remove_history(channel).await,
        }
    }

    /// Who is subscribed to `channel` on every node (rule 6).
    pub async fn presence(&self, channel: &str) -> Result<Vec<ClientInfo>, BrokerError> {
        match self {
            Broker::Memory(memory) => Ok(memory.presence(channel)),
            Broker::Redis(redis) => redis.presence(channel).await,
        }
    }

    /// Periodic housekeeping: forgets expired positions and idempotency keys (Redis
    /// expires its keys itself).
    pub fn sweep(&self) {
        match self {
            Broker::Memory(memory) => {
                memory.sweep(Instant::now());
            }
            Broker::Redis(_) => {}
        }
    }
}
