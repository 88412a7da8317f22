//! What every request handler of this node shares: a cheap `Clone` handle.
//!
//! Built once by `lib::run`; the WebSocket sessions and the control API each hold one.

use std::sync::Arc;
use std::time::Instant;

use crate::auth::{KeyError, Verifier};
use crate::broker::{Broker, MemoryBroker};
use crate::config::Config;
use crate::events::Events;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::ws::admission::{self, Admission};

#[derive(Clone)]
pub struct Node {
    pub config: Arc<Config>,
    pub hub: Hub,
    pub broker: Arc<Broker>,
    pub verifier: Arc<Verifier>,
    pub metrics: Arc<Metrics>,
    pub events: Events,
    /// Who may open a WebSocket (max_connections and the per-address limits).
    pub admission: Arc<Admission>,
    /// Random per process start.
    pub id: Arc<str>,
    pub started: Instant,
}

impl Node {
    /// Builds a node's shared state on the in-memory engine; fails when the token keys
    /// named by the configuration cannot be read.
    pub fn build(config: Config) -> Result<Node, KeyError> {
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::default());
        let verifier = Arc::new(Verifier::from_config(&config.token)?);
        let id: Arc<str> = Arc::from(format!("{:016x}", rand::random::<u64>()));
        let events = Events::new(&config, id.clone());
        let hub = Hub::new(config.clone(), metrics.clone(), events.clone());
        let broker = Arc::new(Broker::Memory(MemoryBroker::new(
            hub.clone(),
            config.clone(),
        )));
        let admission = Admission::new(admission::Limits {
            max_connections: config.max_connections,
            per_ip: config.max_connections_per_ip,
            rate_per_ip: config.connect_rate_per_ip as f64,
            trusted_proxies: config.trusted_proxies.clone(),
        });
        Ok(Node {
            config,
            hub,
            broker,
            verifier,
            metrics,
            events,
            admission,
            id,
            started: Instant::now(),
        })
    }
}
