//! The node's API: every use-case of sidecast, in one type that the edges call.
//!
//! `ws` (a client's commands) and `grpc` (a backend's calls) translate a request into one
//! call here and the [`NodeError`] into their wire; they never reach the hub or the engine
//! themselves. Each use-case validates its input, encodes what it sends once
//! (`wire::message`), takes its locks in the order below, runs the [`Flush`](crate::outbox::Flush)
//! of the sockets it queued to only after every lock is released, and returns a typed error.
//!
//! - `publish`: publish, broadcast, and a client's publish.
//! - `subscribe`: subscribe and unsubscribe, for a client, a backend or the token's `subs`.
//! - `connection`: a connection's life (connect, refresh, end) and what a backend does to
//!   connections (send, disconnect).
//! - `query`: history, presence, channels and info.
//! - `cluster`: what a backend asks of every node (send, disconnect, subscribe and
//!   unsubscribe by target, channels, info), and the other nodes' orders carried out here.
//!
//! Lock order, outermost first: the engine's (one channel's record), the hub's index, one
//! channel's subscribers, one connection's outbox. No lock is held across an `.await` or a
//! socket write that a [`Flush`](crate::outbox::Flush) makes.

mod cluster;
mod connection;
mod error;
mod publish;
mod query;
mod subscribe;

use std::sync::Arc;
use std::time::Instant;

pub use cluster::NodeCounts;
pub use error::NodeError;
pub use publish::{WithReceipt, MAX_RECEIPT_DEADLINE};
pub use query::{Asker, Info};
pub use subscribe::Subscribed;

pub use crate::broker::Published;
pub use crate::hub::{ClientId, Target};

use crate::auth::{Claims, KeyError, Verifier};
use crate::broker::Broker;
use crate::config::Config;
use crate::events::Events;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::wire::channel;

/// What every request handler of this node shares: a cheap `Clone` handle.
#[derive(Clone)]
pub struct Node {
    pub config: Arc<Config>,
    pub verifier: Arc<Verifier>,
    pub metrics: Arc<Metrics>,
    /// The backend event stream and client rpc.
    pub events: Events,
    /// Random per process start.
    pub id: Arc<str>,
    pub started: Instant,
    hub: Hub,
    broker: Arc<Broker>,
}

/// A client acting through its connection: its id and its token's grants.
#[derive(Clone, Copy)]
pub struct Conn<'a> {
    pub id: &'a ClientId,
    pub claims: &'a Claims,
}

impl Node {
    /// Builds a node's shared state on the engine the configuration names (its tasks
    /// start on the current tokio runtime); fails when the token keys named by the
    /// configuration cannot be read.
    pub fn build(config: Config) -> Result<Node, KeyError> {
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::default());
        let verifier = Arc::new(Verifier::from_config(&config.token())?);
        let id: Arc<str> = Arc::from(format!("{:016x}", rand::random::<u64>()));
        let events = Events::new(&config, id.clone());
        let hub = Hub::new(config.clone(), metrics.clone(), events.clone());
        let broker = Arc::new(Broker::build(hub.clone(), config.clone(), id.clone()));
        Ok(Node {
            config,
            verifier,
            metrics,
            events,
            id,
            started: Instant::now(),
            hub,
            broker,
        })
    }

    /// Whether the engine serves (Redis reachable and carrying publications).
    pub fn engine_ready(&self) -> bool {
        self.broker.ready()
    }

    /// Periodic housekeeping: the engine forgets expired positions and idempotency keys.
    pub fn sweep(&self) {
        self.broker.sweep();
        self.hub.expire_receipts();
    }

    /// A channel name, checked.
    pub fn check_channel(name: &str) -> Result<(), NodeError> {
        channel::validate(name).map_err(|error| NodeError::Channel {
            channel: name.to_string(),
            error,
        })
    }

    /// Publication or message data: at most max_publication_size, one JSON value.
    pub fn check_data(&self, data: &[u8]) -> Result<(), NodeError> {
        self.data_size(data.len())?;
        crate::wire::json::validate(data).map_err(NodeError::Json)
    }

    fn data_size(&self, size: usize) -> Result<(), NodeError> {
        let max = self.config.max_publication_size;
        if size > max {
            return Err(NodeError::TooLarge { size, max });
        }
        Ok(())
    }
}
