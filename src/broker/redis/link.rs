//! The command connection to one Redis address, or to a Redis Cluster through its seed
//! addresses: every call has a deadline, and a call that fails on the connection (an I/O
//! error, a timeout on a half-open socket) drops it, so the next one never waits on a dead
//! socket. A supervisor task connects (with backoff while Redis is down, logging the
//! address) and pings it.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::super::BrokerError;
use crate::config::redact;

pub struct Link {
    /// The address as shown in logs and errors: without its password.
    pub address: String,
    /// Clients of the address, or of each seed of a cluster: what pub/sub connections use.
    clients: Vec<redis::Client>,
    /// Set for a Redis Cluster: commands go to the node serving their key's slot; and the
    /// key whose primary the supervisor pings (the cluster's own keys live there).
    cluster: Option<(ClusterClient, String)>,
    conn: Mutex<Option<Conn>>,
    timeout: Duration,
    /// Wakes the supervisor when a call dropped the connection.
    lost: Notify,
    /// Whether the last connection attempt or ping failed, so a failure is logged once.
    down: AtomicBool,
}

static PING_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new("return 1"));

/// How often a connected link is pinged.
pub const PING_INTERVAL: Duration = Duration::from_secs(1);
/// Reconnect backoff: from the first to the last, doubling.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// The wait before the next retry: from the first of [`BACKOFF`], doubling up to its last,
/// back to the first after a success.
pub struct Backoff(Duration);

impl Backoff {
    pub fn new() -> Backoff {
        Backoff(BACKOFF.0)
    }

    pub fn reset(&mut self) {
        self.0 = BACKOFF.0;
    }

    /// Sleeps for the current wait, then doubles it; false when `stop` came first.
    pub async fn wait(&mut self, stop: &CancellationToken) -> bool {
        tokio::select! {
            _ = stop.cancelled() => return false,
            _ = tokio::time::sleep(self.0) => {}
        }
        self.0 = (self.0 * 2).min(BACKOFF.1);
        true
    }
}

impl Link {
    pub fn new(address: &str, timeout: Duration) -> Link {
        Link {
            address: redact(address),
            clients: vec![redis::Client::open(address).expect("an address checked by the config")],
            cluster: None,
            conn: Mutex::new(None),
            timeout,
            lost: Notify::new(),
            down: AtomicBool::new(false),
        }
    }

    /// A Redis Cluster reached through `seeds` (any of its nodes; it finds the others),
    /// pinged through the primary serving `home`.
    pub fn cluster(seeds: &[String], timeout: Duration, home: String) -> Link {
        let clients = seeds
            .iter()
            .map(|a| redis::Client::open(a.as_str()).expect("an address checked by the config"))
            .collect();
        let cluster = ClusterClient::builder(seeds.iter().map(String::as_str))
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .build()
            .expect("addresses checked by the config");
        let shown: Vec<String> = seeds.iter().map(|a| redact(a)).collect();
        Link {
            address: format!("the cluster of {}", shown.join(",")),
            clients,
            cluster: Some((cluster, home)),
            conn: Mutex::new(None),
            timeout,
            lost: Notify::new(),
            down: AtomicBool::new(false),
        }
    }

    /// The client a pub/sub connection's `attempt` uses. A cluster's classic pub/sub reaches
    /// every node, so any seed serves; successive attempts go round the seeds, so that a dead
    /// node is not tried forever.
    pub fn pubsub_client(&self, attempt: usize) -> &redis::Client {
        &self.clients[attempt % self.clients.len()]
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    pub fn is_up(&self) -> bool {
        self.conn.lock().expect("link lock").is_some()
    }

    pub fn unavailable(&self, what: impl std::fmt::Display) -> BrokerError {
        BrokerError::Unavailable(format!("Redis at {}: {what}", self.address))
    }

    /// Runs `call` on the connection within the deadline.
    pub async fn call<T, F, Fut>(&self, call: F) -> Result<T, BrokerError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let Some(conn) = self.conn.lock().expect("link lock").clone() else {
            return Err(self.unavailable("not connected"));
        };
        // A cluster connection mends itself (a node lost, a failover): one node's failure
        // must not cut every channel off, so only the supervisor's ping replaces it.
        let single = matches!(conn, Conn::Single(_));
        match tokio::time::timeout(self.timeout, call(conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                if single && broken(&e) {
                    self.drop_connection();
                }
                Err(self.unavailable(e))
            }
            Err(_) => {
                if single {
                    self.drop_connection();
                }
                Err(self.unavailable(format!(
                    "no answer within {:?} (a command on its way may still run)",
                    self.timeout
                )))
            }
        }
    }

    /// PUBLISH `payload` on `topic`; how many subscribers Redis handed it to.
    pub async fn publish(&self, topic: String, payload: Vec<u8>) -> Result<u64, BrokerError> {
        self.call(|mut c| async move {
            redis::cmd("PUBLISH")
                .arg(topic)
                .arg(payload)
                .query_async::<u64>(&mut c)
                .await
        })
        .await
    }

    fn drop_connection(&self) {
        if self.conn.lock().expect("link lock").take().is_some() {
            self.lost.notify_one();
        }
    }

    /// A new connection of its own, whose commands may wait up to `response_timeout` (a
    /// blocking read must not hold up the shared connection's other commands).
    pub async fn connect(&self, response_timeout: Duration) -> RedisResult<Conn> {
        if let Some((cluster, _)) = &self.cluster {
            let config = redis::cluster::ClusterConfig::new()
                .set_connection_timeout(self.timeout)
                .set_response_timeout(response_timeout);
            return cluster
                .get_async_connection_with_config(config)
                .await
                .map(Conn::Cluster);
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(response_timeout));
        let mut conn = self.clients[0]
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        // A cluster node would answer most keys with MOVED: refuse it by name instead. (A
        // server that refuses INFO to this user is taken for what it was configured as.)
        let info: String = redis::cmd("INFO")
            .arg("cluster")
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        if info.contains("cluster_enabled:1") {
            return Err(RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "this is a node of a Redis Cluster; set redis_cluster = true",
            )));
        }
        Ok(Conn::Single(conn))
    }

    /// A PING; on a cluster, a script on the primary serving the home key, rather than a
    /// PING of every primary (which one primary failing over would fail).
    async fn ping(&self) -> Result<(), BrokerError> {
        match &self.cluster {
            None => {
                self.call(|mut c| async move { redis::cmd("PING").query_async::<()>(&mut c).await })
                    .await
            }
            Some((_, home)) => {
                let invocation = PING_SCRIPT.key(home);
                self.call(|mut c| async move { invocation.invoke_async::<()>(&mut c).await })
                    .await
            }
        }
    }

    /// Keeps a connection up until `stop`.
    pub async fn supervise(&self, stop: CancellationToken) {
        let mut backoff = Backoff::new();
        loop {
            if !self.is_up() {
                let attempt = tokio::select! {
                    _ = stop.cancelled() => return,
                    attempt = tokio::time::timeout(self.timeout, self.connect(self.timeout)) => attempt,
                };
                match attempt {
                    Ok(Ok(conn)) => {
                        tracing::info!(address = %self.address, "connected to Redis");
                        self.down.store(false, Ordering::Relaxed);
                        *self.conn.lock().expect("link lock") = Some(conn);
                        backoff.reset();
                    }
                    failed => {
                        let error = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => format!("no answer within {:?}", self.timeout),
                        };
                        if !self.down.swap(true, Ordering::Relaxed) {
                            tracing::error!(address = %self.address, %error, "cannot reach Redis; retrying");
                        }
                        if !backoff.wait(&stop).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.lost.notified() => {}
                _ = tokio::time::sleep(PING_INTERVAL) => {
                    if let Err(e) = self.ping().await {
                        self.drop_connection();
                        if !self.down.swap(true, Ordering::Relaxed) {
                            tracing::error!(address = %self.address, error = %e, "lost Redis; reconnecting");
                        }
                    }
                }
            }
        }
    }
}

/// A command connection: to one address, or to a cluster (which routes each command by its
/// key's slot; a pipeline must keep to one slot).
#[derive(Clone)]
pub enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Whether an error means the connection itself is no good.
fn broken(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() || e.is_timeout()
}
