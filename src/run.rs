//! Running a node: bind, serve the three listeners, and drain on shutdown.
//!
//! `main` and the tests call [`run`] with listeners that are already bound and a shutdown
//! token, so tests bind port 0 and run many nodes in one process.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::Health;
use crate::auth::KeyError;
use crate::config::Config;
use crate::node::Node;
use crate::wire::close::{self, Close};
use crate::ws::admission::{self, Admission};
use crate::ws::server::Tasks;

/// The three listeners of a node.
pub struct Listeners {
    pub ws: TcpListener,
    pub grpc: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds the configured addresses.
    pub async fn bind(config: &Config) -> std::io::Result<Listeners> {
        let bind = |addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
        };
        Ok(Listeners {
            ws: bind(config.ws_addr).await?,
            grpc: bind(config.grpc_addr).await?,
            admin: bind(config.admin_addr).await?,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("token keys: {0}")]
    Keys(#[from] KeyError),
    #[error("the control API stopped: {0}")]
    Control(String),
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// Runs a node until `shutdown` is cancelled, then drains: readiness turns false, every
/// WebSocket is closed with 1001 (in batches over drain_window), the backends acknowledge the disconnect events, event
/// streams end, calls in flight finish, and the whole takes at most `shutdown_timeout`
/// (connections still open then are dropped).
pub async fn run(
    listeners: Listeners,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    // tonic's TLS uses the process's default crypto provider: ring, the one this crate builds.
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let ws_tls = crate::tls::ws_acceptor(&config)?;
    let grpc_tls = crate::tls::grpc_config(&config)?;
    let node = Node::build(config)?;
    let config = node.config.clone();
    let admission = Admission::new(admission::Limits {
        max_connections: config.max_connections,
        per_ip: config.max_connections_per_ip,
        rate_per_ip: config.connect_rate_per_ip as f64,
        trusted_proxies: config.trusted_proxies.clone(),
    });
    let health = Arc::new(Health::default());
    let sessions = Tasks {
        tracker: TaskTracker::new(),
        shutdown: CancellationToken::new(),
        kill: CancellationToken::new(),
    };
    let servers = TaskTracker::new();
    let stop_accepting = CancellationToken::new();
    servers.spawn(crate::ws::server::serve(
        listeners.ws,
        ws_tls,
        node.clone(),
        admission,
        sessions.clone(),
        stop_accepting.clone(),
    ));
    let grpc_stop = CancellationToken::new();
    let streams_closing = CancellationToken::new();
    let (mut grpc_health, health_service) = crate::grpc::health().await;
    let grpc = servers.spawn(crate::grpc::serve(
        listeners.grpc,
        grpc_tls,
        node.clone(),
        health_service,
        streams_closing.clone(),
        grpc_stop.clone(),
    ));
    // Expired history positions and idempotency keys are forgotten in the background; event
    // members past events_ack_timeout are dropped, groups past events_group_ttl forgotten.
    let sweep_stop = CancellationToken::new();
    let swept = node.clone();
    servers.spawn(every(SWEEP_INTERVAL, sweep_stop.clone(), move || {
        swept.sweep()
    }));
    // Orders from the other nodes of a cluster (none for a node alone).
    let orders = node.clone();
    let orders_stop = sweep_stop.clone();
    servers.spawn(async move { orders.serve_orders(orders_stop).await });
    let events = node.events.clone();
    servers.spawn(every(
        EVENTS_SWEEP_INTERVAL,
        sweep_stop.clone(),
        move || events.sweep(std::time::Instant::now()),
    ));
    let admin_stop = CancellationToken::new();
    servers.spawn(crate::admin::serve(
        listeners.admin,
        health.clone(),
        node.clone(),
        admin_stop.clone(),
    ));
    tracing::info!(
        ws = %config.ws_addr, path = %config.ws_path, grpc = %config.grpc_addr, admin = %config.admin_addr,
        max_connections = config.max_connections,
        engine = match config.engine() {
            crate::config::Engine::Memory => "memory".to_string(),
            crate::config::Engine::Redis(seeds) if config.redis_cluster => {
                format!("redis cluster ({} seed addresses)", seeds.len())
            }
            crate::config::Engine::Redis(addresses) => format!("redis ({} addresses)", addresses.len()),
        },
        "sidecast is serving"
    );

    let mut failure = None;
    tokio::select! {
        _ = shutdown.cancelled() => {}
        result = grpc => {
            // The control API died on its own: stop the node rather than run half of it.
            let message = match result {
                Ok(Ok(())) => "it ended".to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            };
            tracing::error!(%message, "control API stopped");
            failure = Some(RunError::Control(message));
        }
    }
    // The last part of shutdown_timeout is kept for the event streams' ends (their status)
    // to be written: the process must not exit with them in flight.
    let grace = final_grace(config.shutdown_timeout);
    let deadline = tokio::time::Instant::now() + config.shutdown_timeout - grace;
    tracing::info!("draining");
    health.set_draining();
    grpc_health.set_draining().await;
    stop_accepting.cancel();
    close_paced(&node, config.drain_window).await;
    sessions.shutdown.cancel();
    sessions.tracker.close();
    if tokio::time::timeout_at(deadline, sessions.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections still open at shutdown_timeout: dropping them");
        sessions.kill.cancel();
        // Killed connections end at once unless a write is stuck; those are dropped with the runtime.
        let _ = tokio::time::timeout(KILL_GRACE, sessions.tracker.wait()).await;
    }
    // The connections' disconnect events reach the backends before their streams end.
    if !node.events.drained(deadline).await {
        tracing::warn!("events still unacknowledged at shutdown_timeout");
    }
    node.events.close();
    streams_closing.cancel();
    grpc_health.close().await;
    grpc_stop.cancel();
    sweep_stop.cancel();
    admin_stop.cancel();
    servers.close();
    if tokio::time::timeout(grace, servers.wait()).await.is_err() {
        tracing::warn!("control calls still running at shutdown_timeout");
    }
    tracing::info!("stopped");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Closes the authenticated connections with 1001 in batches spread over `window`, so that
/// their reconnects do not all land on the other nodes in the same second. What is left
/// (connections that were not authenticated yet) is closed after it by the caller.
async fn close_paced(node: &Node, window: std::time::Duration) {
    let connections = node.all_connections();
    let batches = (window.as_millis() / DRAIN_TICK.as_millis()).max(1) as usize;
    let per_batch = connections.len().div_ceil(batches).max(1);
    tracing::info!(
        connections = connections.len(),
        ?window,
        "closing connections with 1001"
    );
    let mut tick = tokio::time::interval(DRAIN_TICK);
    // A stalled tick delays the rest; it never closes two batches at once.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for batch in connections.chunks(per_batch) {
        tick.tick().await;
        for outbox in batch {
            outbox.schedule_close(Close::new(close::GOING_AWAY, "server shutting down"));
        }
    }
}

/// How often a batch of connections is closed during the drain window.
const DRAIN_TICK: std::time::Duration = std::time::Duration::from_millis(100);

/// Runs `task` every `period` until `stop`.
async fn every(period: std::time::Duration, stop: CancellationToken, task: impl Fn()) {
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => task(),
        }
    }
}

/// How often expired history positions and idempotency keys are swept.
const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// The end of shutdown_timeout kept for the event streams' last status to be written: a
/// tenth of it, at most a second.
fn final_grace(shutdown_timeout: std::time::Duration) -> std::time::Duration {
    (shutdown_timeout / 10).min(std::time::Duration::from_secs(1))
}

/// How often event members are checked for events_ack_timeout.
const EVENTS_SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// How long killed connections get to end after shutdown_timeout.
const KILL_GRACE: std::time::Duration = std::time::Duration::from_millis(500);
