//! The engine shared by several nodes through Redis: one or more addresses, each a link of
//! its own, or one Redis Cluster, a single link whose commands the cluster client routes by
//! slot (`redis_cluster`; every key a script touches shares a hash tag, see `keys`).
//!
//! - **Publish** runs `publish.lua` on the channel's address: the idempotency key, the next
//!   offset in the channel's epoch, the append to a bounded stream and the PUBLISH on the
//!   channel's topic, as one step. Every node subscribed to the topic receives it, in the
//!   order Redis ran the scripts.
//! - **Delivery** (`feed`): a node subscribes to a channel's topic while it has local
//!   subscribers (on one of a few pub/sub connections per address), and hands what arrives
//!   to its hub through the channel's frontier (`table`): once each, in offset order. A gap
//!   in the offsets, a new epoch, or a pub/sub connection that broke ends the local
//!   subscriptions with `unsub` 2500, so that each client resubscribes and recovers from
//!   the stream: nothing is skipped without a signal.
//! - **Subscribe** (`subscribe`): the topic's SUBSCRIBE is confirmed before the stream is
//!   read, and the subscriber attaches at the frontier, so that every publication is in its
//!   recovery or delivered live, never both and never neither (rule 4).
//! - **Presence** (`presence`): each node writes its subscribers with an expiry it
//!   refreshes; a dead node's entries expire and the node that removes them announces the
//!   `leave`, once.
//! - **Event groups** (`events`, with `events_scope = "cluster"`): a stream per group on
//!   the first address, written by every node, delivered by the node holding its lease.
//! - **Readiness**: every address answers its pings and a canary publication comes back
//!   through each pub/sub connection.
//!
//! Lock order: the table, then one entry, then the hub's locks. No lock is held across an
//! `.await`; SUBSCRIBE and UNSUBSCRIBE of one feed are ordered by its async mutex.

mod cluster;
mod envelope;
mod event_entry;
mod events;
mod feed;
mod keys;
mod link;
mod presence;
mod ring;
mod subscribe;
#[cfg(test)]
mod sweep_race;
mod table;

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::Script;
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::{Config, Engine, NamespaceOptions};
use crate::hub::Hub;
use crate::wire::message::ClientInfo;
use crate::wire::{Position, Publication, TraceParent};

use super::{BrokerError, Published};
pub use cluster::Order;
use cluster::{Asked, ORDER_QUEUE};
use feed::Feed;
use keys::Keys;
use link::Link;
use presence::Recorder;
use table::{Step, Table};

/// The engine's handle; its tasks stop when it is dropped.
pub struct RedisBroker {
    inner: Arc<Inner>,
    /// Orders from other nodes, taken once by this node (see [`RedisBroker::orders`]).
    orders: std::sync::Mutex<Option<mpsc::Receiver<Order>>>,
    _stop: DropGuard,
}

struct Inner {
    hub: Hub,
    config: Arc<Config>,
    node: Arc<str>,
    keys: Keys,
    /// One per address, in the configured order.
    links: Vec<Link>,
    /// `redis_pubsub_connections` per address: feed `shard * n + i`.
    feeds: Vec<Feed>,
    table: Table,
    recorder: Arc<Recorder>,
    scripts: Scripts,
    /// Orders from other nodes, for this node to carry out.
    orders: mpsc::Sender<Order>,
    asked: Asked,
    /// When this node's heartbeat was last written: it counts as a live node since.
    beat: std::sync::Mutex<Option<Instant>>,
    /// Redis's clock minus this node's, in ms (see `cluster`).
    clock_offset: std::sync::atomic::AtomicI64,
}

struct Scripts {
    publish: Script,
    read: Script,
    presence: Script,
    reap: Script,
    events: Script,
    lease: Script,
    /// Redis's TIME, from the primary serving the key given.
    time: Script,
}

/// How often each feed's canary is published; a feed whose canary has not come back for
/// three periods makes the node not ready.
const CANARY_INTERVAL: Duration = Duration::from_secs(1);
/// How often topics without local subscribers are unsubscribed.
const UNUSED_SWEEP: Duration = Duration::from_secs(2);

impl RedisBroker {
    /// Starts the engine's tasks (connections, canaries, presence); never fails: an address
    /// that cannot be reached is retried, and the node is not ready meanwhile.
    pub fn new(hub: Hub, config: Arc<Config>, node: Arc<str>) -> RedisBroker {
        let Engine::Redis(addresses) = config.engine() else {
            panic!("RedisBroker::new without redis addresses");
        };
        let per = config.redis_pubsub_connections;
        let links: Vec<Link> = if config.redis_cluster {
            let home = Keys::new(&config.redis_prefix, true).nodes();
            vec![Link::cluster(&addresses, config.redis_timeout, home)]
        } else {
            addresses
                .iter()
                .map(|a| Link::new(a, config.redis_timeout))
                .collect()
        };
        let feeds = (0..links.len() * per).map(|i| Feed::new(i / per)).collect();
        let recorder = Arc::new(Recorder::default());
        {
            let recorder = recorder.clone();
            let config = config.clone();
            hub.set_observer(Box::new(move |change| recorder.record(&config, change)));
        }
        let (orders, orders_rx) = mpsc::channel(ORDER_QUEUE);
        let inner = Arc::new(Inner {
            orders,
            asked: Asked::default(),
            beat: std::sync::Mutex::new(None),
            clock_offset: std::sync::atomic::AtomicI64::new(0),
            keys: Keys::new(&config.redis_prefix, config.redis_cluster),
            hub,
            config,
            node,
            links,
            feeds,
            table: Table::default(),
            recorder,
            scripts: Scripts {
                publish: Script::new(include_str!("publish.lua")),
                read: Script::new(include_str!("read.lua")),
                presence: Script::new(include_str!("presence.lua")),
                reap: Script::new(include_str!("reap.lua")),
                events: Script::new(include_str!("events.lua")),
                lease: Script::new(include_str!("lease.lua")),
                time: Script::new("return redis.call('TIME')"),
            },
        });
        let stop = CancellationToken::new();
        for shard in 0..inner.links.len() {
            let (inner, stop) = (inner.clone(), stop.clone());
            tokio::spawn(async move { inner.links[shard].supervise(stop).await });
        }
        for index in 0..inner.feeds.len() {
            let (inner, stop) = (inner.clone(), stop.clone());
            tokio::spawn(async move { inner.run_feed(index, stop).await });
        }
        {
            let (inner, stop) = (inner.clone(), stop.clone());
            tokio::spawn(async move { inner.run_canaries(stop).await });
        }
        {
            let (inner, stop) = (inner.clone(), stop.clone());
            tokio::spawn(async move { inner.run_presence(stop).await });
        }
        if let Some(ends) = inner.hub.events().relay_take() {
            inner.start_events(ends, &stop);
        }
        RedisBroker {
            inner,
            orders: std::sync::Mutex::new(Some(orders_rx)),
            _stop: stop.drop_guard(),
        }
    }

    pub async fn publish(
        &self,
        channel: &str,
        data: &[u8],
        idempotency_key: Option<&str>,
        receipt: Option<Duration>,
        trace: Option<&TraceParent>,
    ) -> Result<Published, BrokerError> {
        self.inner
            .publish(channel, data, idempotency_key, receipt, trace)
            .await
    }

    pub async fn subscribe<R>(
        &self,
        channel: &str,
        since: Option<&Position>,
        budget: usize,
        attach: impl FnOnce(crate::wire::Attach) -> R,
    ) -> Result<R, BrokerError> {
        self.inner.subscribe(channel, since, budget, attach).await
    }

    pub async fn history(
        &self,
        channel: &str,
        since: Option<u64>,
        limit: usize,
        reverse: bool,
    ) -> Result<Option<(Vec<Publication>, Position)>, BrokerError> {
        if !self.inner.options(channel).has_history() {
            return Ok(None);
        }
        let (direction, from) = match (reverse, since) {
            (false, since) => ('f', since.map_or(0, |s| s as i64)),
            (true, None) => ('r', -1),
            (true, Some(since)) => ('r', since as i64),
        };
        let read = self.inner.read(channel, direction, from, limit).await?;
        Ok(Some((read.entries, read.position)))
    }

    pub async fn remove_history(&self, channel: &str) -> Result<bool, BrokerError> {
        if !self.inner.options(channel).has_history() {
            return Ok(false);
        }
        let stream = self.inner.keys.stream(channel);
        self.inner
            .link(channel)
            .call(|mut c| async move {
                redis::cmd("DEL")
                    .arg(stream)
                    .query_async::<()>(&mut c)
                    .await
            })
            .await?;
        Ok(true)
    }

    pub async fn presence(&self, channel: &str) -> Result<Vec<ClientInfo>, BrokerError> {
        self.inner.presence(channel).await
    }

    /// Orders from other nodes (Some once): the node carries each out and answers it.
    pub fn orders(&self) -> Option<mpsc::Receiver<Order>> {
        self.orders.lock().expect("orders lock").take()
    }

    /// Gives an order to every other live node; their answers, as they came within
    /// redis_timeout.
    pub async fn ask(&self, body: Box<RawValue>) -> Result<Vec<Box<RawValue>>, BrokerError> {
        self.inner.ask(body).await
    }

    pub async fn answer(&self, order: Order, body: Box<RawValue>) -> Result<(), BrokerError> {
        self.inner.answer(order, body).await
    }

    /// The live nodes' ids, this one's included.
    pub async fn nodes(&self) -> Result<Vec<String>, BrokerError> {
        self.inner.nodes().await
    }

    /// True while every address answers and each pub/sub connection carries the canary.
    pub fn ready(&self) -> bool {
        self.inner.ready()
    }
}

/// A read of a channel's position and kept publications.
struct Read {
    position: Position,
    entries: Vec<Publication>,
}

impl Inner {
    fn options(&self, channel: &str) -> &NamespaceOptions {
        self.config.channel_options(channel)
    }

    fn shard(&self, channel: &str) -> usize {
        ring::shard(channel, self.links.len())
    }

    fn link(&self, channel: &str) -> &Link {
        &self.links[self.shard(channel)]
    }

    /// The feed a channel's topic is subscribed on.
    fn feed_of(&self, channel: &str) -> usize {
        let per = self.config.redis_pubsub_connections;
        // Another hash than the shard's, so channels of one shard spread over its feeds.
        let spread = (ring::hash(channel).rotate_left(17) % per as u64) as usize;
        self.shard(channel) * per + spread
    }

    fn fresh_epoch() -> String {
        format!("{:016x}", rand::random::<u64>())
    }

    async fn publish(
        &self,
        channel: &str,
        data: &[u8],
        idempotency_key: Option<&str>,
        receipt: Option<Duration>,
        trace: Option<&TraceParent>,
    ) -> Result<Published, BrokerError> {
        let start = Instant::now();
        let options = self.options(channel);
        let keys = &self.keys;
        let mut invocation = self.scripts.publish.prepare_invoke();
        invocation
            .key(keys.meta(channel))
            .key(keys.stream(channel))
            .key(keys.seen(channel, idempotency_key.unwrap_or("")))
            .arg(data)
            .arg(options.history_size)
            .arg(options.history_ttl.as_millis() as u64)
            .arg(options.history_meta_ttl.as_millis() as u64)
            .arg(Inner::fresh_epoch())
            .arg(self.config.idempotency_window.as_millis() as u64)
            .arg(keys.topic(channel))
            .arg(if options.has_history() { "1" } else { "0" })
            .arg(if idempotency_key.is_some() { "1" } else { "0" })
            .arg(envelope::publication_head(receipt, trace))
            .arg(if self.config.redis_cluster { "1" } else { "0" });
        let reply: String = self
            .link(channel)
            .call(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await?;
        let link = self.link(channel);
        let (fresh, result) = reply.split_at(1);
        let (offset, epoch) = result
            .split_once(':')
            .and_then(|(o, e)| Some((o.parse::<u64>().ok()?, e)))
            .ok_or_else(|| link.unavailable(format!("unexpected publish reply {reply:?}")))?;
        let mut published = Published {
            offset,
            epoch: epoch.to_string(),
            delivered: 0,
            replayed: fresh == "s",
        };
        // This node's subscribers get it now when it is the next one, rather than when the
        // topic brings it back (which the frontier then skips).
        if fresh == "n" && offset > 0 {
            if let Some(entry) = self.table.get(channel) {
                let mut entry = entry.lock().expect("entry lock");
                match entry.published(epoch, offset) {
                    Step::Deliver => {
                        let (counts, flush) =
                            self.hub
                                .deliver(channel, data, Some(offset), receipt, trace);
                        entry.last = (offset, counts.queued);
                        drop(entry);
                        flush.run();
                        published.delivered = counts.queued;
                    }
                    // The topic brought it first (the pub/sub reply can overtake the
                    // script's).
                    Step::Skip if entry.last.0 == offset => published.delivered = entry.last.1,
                    Step::Skip | Step::Gap => {}
                }
            }
        }
        self.hub.metrics().record_publication(start.elapsed());
        Ok(published)
    }

    /// Runs `read.lua`: the position and up to `count` publications after `from`
    /// (`direction` 'f') or before it ('r', -1 for the top).
    async fn read(
        &self,
        channel: &str,
        direction: char,
        from: i64,
        count: usize,
    ) -> Result<Read, BrokerError> {
        let options = self.options(channel);
        let mut invocation = self.scripts.read.prepare_invoke();
        invocation
            .key(self.keys.meta(channel))
            .key(self.keys.stream(channel))
            .arg(Inner::fresh_epoch())
            .arg(options.history_meta_ttl.as_millis() as u64)
            .arg(options.history_ttl.as_millis() as u64)
            .arg(direction.to_string())
            .arg(from)
            .arg(count)
            .arg(if self.config.redis_cluster { "1" } else { "0" });
        let link = self.link(channel);
        let reply: Vec<redis::Value> = link
            .call(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await?;
        parse_read(&reply).ok_or_else(|| link.unavailable("unexpected read reply"))
    }

    fn ready(&self) -> bool {
        let fresh = CANARY_INTERVAL * 3;
        let beating = self
            .beat
            .lock()
            .expect("beat lock")
            .is_some_and(|at| at.elapsed() < fresh);
        beating && self.links.iter().all(Link::is_up) && self.feeds.iter().all(|f| f.carries(fresh))
    }

    /// Publishes each feed's canary through its address, and this node's heartbeat, every
    /// CANARY_INTERVAL.
    async fn run_canaries(&self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(CANARY_INTERVAL);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.heartbeat().await {
                tracing::debug!(error = %e, "heartbeat not written");
            }
            if let Err(e) = self.reap().await {
                tracing::debug!(error = %e, "dead nodes not reaped");
            }
            for (index, feed) in self.feeds.iter().enumerate() {
                let topic = self.keys.canary(&self.node, index);
                let sent = self.links[feed.shard].publish(topic, b"1".to_vec()).await;
                if let Err(e) = sent {
                    tracing::debug!(error = %e, "canary not published");
                }
            }
        }
    }
}

/// `{epoch, top, id, data, id, data...}` from `read.lua`.
fn parse_read(reply: &[redis::Value]) -> Option<Read> {
    use redis::Value;
    let text = |v: &Value| -> Option<Vec<u8>> {
        match v {
            Value::BulkString(b) => Some(b.clone()),
            Value::SimpleString(s) => Some(s.clone().into_bytes()),
            _ => None,
        }
    };
    let epoch = String::from_utf8(text(reply.first()?)?).ok()?;
    let top = match reply.get(1)? {
        Value::Int(n) => *n as u64,
        _ => return None,
    };
    let mut entries = Vec::new();
    for pair in reply[2..].chunks(2) {
        let [id, data] = pair else { return None };
        let id = String::from_utf8(text(id)?).ok()?;
        let offset = id.split_once('-')?.0.parse().ok()?;
        entries.push(Publication {
            offset,
            data: bytes::Bytes::from(text(data)?),
        });
    }
    Some(Read {
        position: Position {
            offset: top,
            epoch: Arc::from(epoch),
        },
        entries,
    })
}
