//! What every request handler of this node shares: a cheap `Clone` handle.
//!
//! Built once by `lib::run`; the WebSocket sessions and the control API each hold one.

use std::sync::Arc;
use std::time::Instant;

use crate::auth::Verifier;
use crate::broker::Broker;
use crate::config::Config;
use crate::hub::Hub;
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct Node {
    pub config: Arc<Config>,
    pub hub: Hub,
    pub broker: Arc<Broker>,
    pub verifier: Arc<Verifier>,
    pub metrics: Arc<Metrics>,
    /// Random per process start.
    pub id: Arc<str>,
    pub started: Instant,
}
