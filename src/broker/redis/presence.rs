//! Presence (and the membership of namespaces with join/leave) across nodes. The hub tells
//! the [`Recorder`] each join and leave (synchronously, under its lock); a task writes them
//! to the channels' Redis hashes with an expiry, relays `join`/`leave` to the other nodes,
//! and every third of redis_presence_ttl rewrites every local entry with a new expiry and
//! clears the channels' expired entries. A node that dies
//! stops refreshing: its entries expire, and the node that clears them publishes their
//! `leave` from the same script, so each is announced once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::value::RawValue;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::envelope::Member;
use super::{BrokerError, Inner};
use crate::config::Config;
use crate::hub::Change;
use crate::wire::message::ClientInfo;

/// How many presence pipelines are in flight at once.
const WRITES_AT_ONCE: usize = 16;

/// A pipeline of presence writes: its address, and on a cluster its channel.
type Batch = (usize, Option<String>);

/// A join or leave waiting to be written.
struct Pending {
    joined: bool,
    channel: Arc<str>,
    client: String,
    user: String,
    info: Option<Box<RawValue>>,
}

/// A connection that began (Some(user)) or ended (None), waiting to be written.
type Connection = (String, Option<String>);

#[derive(Default)]
pub struct Recorder {
    pending: Mutex<(Vec<Pending>, Vec<Connection>)>,
    wake: Notify,
}

impl Recorder {
    /// The hub's observer: keeps what a channel with presence or join/leave needs, and
    /// every connection's start and end.
    pub fn record(&self, config: &Config, change: Change<'_>) {
        match change {
            Change::Subscription {
                joined,
                channel,
                client,
                user,
                info,
            } => {
                let options = config.channel_options(channel);
                if !options.presence && !options.join_leave {
                    return;
                }
                self.pending.lock().expect("recorder lock").0.push(Pending {
                    joined,
                    channel: Arc::from(channel),
                    client: client.to_string(),
                    user: user.to_string(),
                    info: info.map(|i| i.to_owned()),
                });
            }
            Change::Connection {
                connected,
                client,
                user,
            } => {
                let user = connected.then(|| user.to_string());
                self.pending
                    .lock()
                    .expect("recorder lock")
                    .1
                    .push((client.to_string(), user));
            }
        }
        self.wake.notify_one();
    }

    fn take(&self) -> (Vec<Pending>, Vec<Connection>) {
        std::mem::take(&mut *self.pending.lock().expect("recorder lock"))
    }
}

/// What a presence hash holds for a client: `{"u":user,"i":info}`.
fn value(user: &str, info: Option<&RawValue>) -> String {
    #[derive(serde::Serialize)]
    struct Value<'a> {
        u: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        i: Option<&'a RawValue>,
    }
    serde_json::to_string(&Value { u: user, i: info }).expect("a presence value encodes")
}

impl Inner {
    pub(super) async fn run_presence(&self, stop: CancellationToken) {
        let ttl = self.config.redis_presence_ttl;
        let mut refresh = tokio::time::interval(ttl / 3);
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    // The leaves of a node shutting down, as far as Redis takes them now;
                    // what is left expires.
                    self.write_changes(self.recorder.take()).await;
                    // Out of the live nodes at once, rather than after redis_presence_ttl.
                    let (key, node) = (self.keys.nodes(), self.node.to_string());
                    let _ = self.links[0]
                        .call(|mut c| async move {
                            redis::cmd("ZREM").arg(key).arg(node).query_async::<()>(&mut c).await
                        })
                        .await;
                    return;
                }
                _ = self.recorder.wake.notified() => {
                    self.write_changes(self.recorder.take()).await;
                }
                _ = refresh.tick() => self.refresh().await,
            }
        }
    }

    /// Writes joins and leaves, one pipeline per address, and this node's connections to the
    /// first address (what another node reports ended if this one dies).
    async fn write_changes(&self, (changes, connections): (Vec<Pending>, Vec<Connection>)) {
        if changes.is_empty() && connections.is_empty() {
            return;
        }
        let ttl = self.config.redis_presence_ttl.as_millis() as u64;
        let expires = self.now_ms() + ttl;
        let mut pipes: HashMap<Batch, redis::Pipeline> = HashMap::new();
        if !connections.is_empty() {
            let pipe = pipes.entry((0, None)).or_default();
            let key = self.keys.connections(&self.node);
            for (client, user) in connections {
                match user {
                    Some(user) => pipe.hset(&key, client, user).ignore(),
                    None => pipe.hdel(&key, client).ignore(),
                };
            }
            pipe.pexpire(&key, self.connections_ttl()).ignore();
        }
        for change in changes {
            let options = self.options(&change.channel);
            let pipe = pipes.entry(self.batch(&change.channel)).or_default();
            let (hash, zset) = (
                self.keys.presence(&change.channel),
                self.keys.presence_expiry(&change.channel),
            );
            // Namespaces with join/leave keep entries too, so that a dead node's members
            // expire and their `leave` is announced.
            if options.presence || options.join_leave {
                if change.joined {
                    let value = value(&change.user, change.info.as_deref());
                    pipe.hset(&hash, &change.client, value).ignore();
                    pipe.zadd(&zset, &change.client, expires).ignore();
                    pipe.pexpire(&hash, ttl as i64).ignore();
                    pipe.pexpire(&zset, ttl as i64).ignore();
                } else {
                    pipe.hdel(&hash, &change.client).ignore();
                    pipe.zrem(&zset, &change.client).ignore();
                }
            }
            if options.join_leave {
                let member = Member {
                    node: self.node.to_string(),
                    joined: change.joined,
                    client: change.client,
                    user: change.user,
                    info: change.info,
                };
                pipe.publish(self.keys.topic(&change.channel), member.encode())
                    .ignore();
            }
        }
        for written in self.write_all(pipes).await {
            if let Err(e) = written {
                // Joins are written again by the next refresh; leaves expire.
                tracing::warn!(error = %e, "presence changes not written");
            }
        }
    }

    /// Rewrites every local entry with a new expiry, and clears each channel's expired ones.
    async fn refresh(&self) {
        let ttl = self.config.redis_presence_ttl.as_millis() as u64;
        let expires = self.now_ms() + ttl;
        let mut pipes: HashMap<Batch, redis::Pipeline> = HashMap::new();
        let mut channels = Vec::new();
        for (channel, clients) in self.hub.presence_snapshot() {
            let options = self.options(&channel);
            if !options.presence && !options.join_leave {
                continue;
            }
            let pipe = pipes.entry(self.batch(&channel)).or_default();
            let (hash, zset) = (
                self.keys.presence(&channel),
                self.keys.presence_expiry(&channel),
            );
            for client in clients {
                pipe.hset(
                    &hash,
                    &client.client,
                    value(&client.user, client.info.as_deref()),
                )
                .ignore();
                pipe.zadd(&zset, &client.client, expires).ignore();
            }
            pipe.pexpire(&hash, ttl as i64).ignore();
            pipe.pexpire(&zset, ttl as i64).ignore();
            channels.push(channel);
        }
        for written in self.write_all(pipes).await {
            if let Err(e) = written {
                tracing::warn!(error = %e, "presence not refreshed");
            }
        }
        for channel in channels {
            // Clears (and announces) the entries of nodes that stopped refreshing.
            let _ = self.presence(&channel).await;
        }
    }

    /// Which pipeline a channel's writes join: one per address; on a Redis Cluster one per
    /// channel, since a cluster's pipeline must keep to one slot.
    fn batch(&self, channel: &str) -> Batch {
        let own = self.links[0].is_cluster().then(|| channel.to_string());
        (self.shard(channel), own)
    }

    /// Runs the pipelines, a few side by side (a cluster's has one per channel).
    async fn write_all(
        &self,
        pipes: HashMap<Batch, redis::Pipeline>,
    ) -> Vec<Result<(), BrokerError>> {
        use futures_util::StreamExt;
        let writes = pipes.into_iter().map(|((shard, _), pipe)| {
            self.links[shard].call(|mut c| async move { pipe.query_async::<()>(&mut c).await })
        });
        futures_util::stream::iter(writes)
            .buffer_unordered(WRITES_AT_ONCE)
            .collect()
            .await
    }

    /// The channel's presence on every node, without expired entries.
    pub(super) async fn presence(&self, channel: &str) -> Result<Vec<ClientInfo>, BrokerError> {
        let announce = self.options(channel).join_leave;
        let mut invocation = self.scripts.presence.prepare_invoke();
        invocation
            .key(self.keys.presence(channel))
            .key(self.keys.presence_expiry(channel))
            .arg(self.now_ms())
            .arg(self.keys.topic(channel))
            .arg(if announce { "1" } else { "0" });
        let link = self.link(channel);
        let pairs: Vec<(String, String)> = link
            .call(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await?;
        Ok(pairs
            .into_iter()
            .filter_map(|(client, value)| {
                #[derive(serde::Deserialize)]
                struct Value {
                    u: String,
                    i: Option<Box<RawValue>>,
                }
                let value: Value = serde_json::from_str(&value).ok()?;
                Some(ClientInfo {
                    client,
                    user: value.u,
                    info: value.i.map(Arc::from),
                })
            })
            .collect())
    }
}
