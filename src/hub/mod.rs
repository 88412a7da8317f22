//! The hub: which connections exist on this node, which channels they are subscribed to,
//! and fan-out of encoded frames to them.
//!
//! Callers: the node's use-cases (`crate::node`) and the engine, which delivers each
//! publication here ([`Hub::deliver`]). The hub is synchronous: every method computes under
//! a plain `Mutex`/`RwLock`, queues frames with a non-blocking push, and returns the
//! sockets to write as a [`Flush`] for the caller to run once every lock is released. Lock
//! order is the index, then one channel; a channel lock is never held while the index's is
//! taken. `receipts` tallies delivery receipts behind a lock of its own, taken last.

mod receipts;
mod subscribers;
mod subscription;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use serde_json::value::RawValue;

pub use receipts::Receipt;
use receipts::Receipts;
use subscribers::Subscribers;
pub use subscribers::{ClientId, Fanout};

use crate::config::{Config, NamespaceOptions, SlowConsumer};
use crate::events::{EventKind, Events, What};
use crate::metrics::Metrics;
use crate::outbox::{Flush, Outbox, Pacing, Tag};
use crate::wire::channel::Pattern;
use crate::wire::message::ClientInfo;
use crate::wire::{Close, ServerMessage, TraceParent};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    #[error("already subscribed")]
    AlreadySubscribed,
    #[error("too many subscriptions on this connection (max {0})")]
    TooManySubscriptions(usize),
    #[error("channel is full (max {0} subscribers)")]
    ChannelFull(usize),
    #[error("unknown client")]
    UnknownClient,
}

/// The unsubscribe event's code when a subscription announced by a subscribe event failed
/// after all (the channel reached max_subscribers meanwhile).
pub const UNSUB_CHANNEL_FULL: u32 = 2002;

/// What changed on this node, as an engine shared by several nodes records it: a
/// connection that joined or left a channel (presence, and `join`/`leave` relayed to the
/// other nodes), or a connection that began or ended (so that another node can report its
/// end if this node dies).
pub enum Change<'a> {
    Subscription {
        joined: bool,
        channel: &'a str,
        client: &'a str,
        user: &'a str,
        info: Option<&'a RawValue>,
    },
    Connection {
        connected: bool,
        client: &'a str,
        user: &'a str,
    },
}

/// Told every [`Change`], under the hub's channel lock: it must only record and return.
pub type Observer = Box<dyn Fn(Change<'_>) + Send + Sync>;

/// Who made a subscription: it decides whether a token refresh can revoke it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribedBy {
    /// The client asked, under its token's grants.
    Client,
    /// The token's `subs` claim or Control.Subscribe.
    Server,
}

/// Who a server-side action applies to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    User(String),
    Client(String),
}

#[derive(Clone)]
pub struct Hub {
    shared: Arc<Shared>,
}

struct Shared {
    index: RwLock<Index>,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    /// How this node's flushes are written (see `outbox::Pacing`).
    pacing: Arc<Pacing>,
    /// Connection and subscription changes are emitted under the hub's lock, so that a
    /// client's events are numbered in the order its state changed.
    events: Events,
    /// Set once by an engine that records membership (see [`Change`]).
    observer: std::sync::OnceLock<Observer>,
    /// Delivery receipts of `receipts` channels (a leaf lock).
    receipts: std::sync::Mutex<Receipts>,
}

/// Who is connected and subscribed where.
#[derive(Default)]
struct Index {
    channels: HashMap<Arc<str>, Arc<Subscribers>>,
    clients: HashMap<ClientId, Client>,
    users: HashMap<Arc<str>, Vec<ClientId>>,
}

struct Client {
    user: Arc<str>,
    info: Option<Arc<RawValue>>,
    outbox: Arc<Outbox>,
    subs: HashMap<Arc<str>, SubscribedBy>,
}

/// Node-wide counts for Control.Info.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub connections: usize,
    pub users: usize,
    pub channels: usize,
    pub subscriptions: usize,
}

// === impl Hub ===

impl Hub {
    pub fn new(config: Arc<Config>, metrics: Arc<Metrics>, events: Events) -> Hub {
        Hub {
            shared: Arc::new(Shared {
                index: RwLock::new(Index::default()),
                receipts: std::sync::Mutex::new(Receipts::new(config.max_pending_receipts)),
                pacing: Arc::new(Pacing::new(config.write_coalesce)),
                config,
                metrics,
                events,
                observer: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Has `observer` told every subscription change from now on (once per hub).
    pub fn set_observer(&self, observer: Observer) {
        if self.shared.observer.set(observer).is_err() {
            panic!("a hub has one observer");
        }
    }

    fn observe(&self, change: Change<'_>) {
        if let Some(observer) = self.shared.observer.get() {
            observer(change);
        }
    }

    /// Queues a frame made elsewhere (another node's `join` or `leave`) to every subscriber
    /// of `channel` here; the caller runs the flush.
    pub fn relay(&self, channel: &str, frame: &bytes::Bytes) -> Flush {
        let mut flush = self.flush();
        if let Some(subscribers) = self.read().channels.get(channel).cloned() {
            subscribers.lock().fan_out(frame, None, &mut flush);
        }
        flush
    }

    /// Whether anyone is subscribed to `channel` on this node.
    pub fn has_subscribers(&self, channel: &str) -> bool {
        self.read().channels.contains_key(channel)
    }

    /// Every channel with subscribers here, with who is subscribed.
    pub fn presence_snapshot(&self) -> Vec<(Arc<str>, Vec<ClientInfo>)> {
        let channels: Vec<Arc<Subscribers>> = self.read().channels.values().cloned().collect();
        channels
            .into_iter()
            .map(|c| {
                let clients = c
                    .lock()
                    .subscribers
                    .iter()
                    .map(|(id, s)| ClientInfo {
                        client: id.to_string(),
                        user: s.user.to_string(),
                        info: s.info.clone(),
                    })
                    .collect();
                (c.name.clone(), clients)
            })
            .collect()
    }

    /// The backend event stream this hub reports to.
    pub fn events(&self) -> &Events {
        &self.shared.events
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// An empty flush of this node.
    pub fn flush(&self) -> Flush {
        Flush::new(self.shared.pacing.clone())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.shared.index.read().expect("hub lock")
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.shared.index.write().expect("hub lock")
    }

    /// Adds an authenticated connection (a `connect` event with the token's `meta`).
    pub fn register(
        &self,
        id: ClientId,
        user: &str,
        info: Option<Arc<RawValue>>,
        meta: Option<&RawValue>,
        outbox: Arc<Outbox>,
    ) {
        let mut state = self.write();
        let events = &self.shared.events;
        if events.wants(EventKind::Connect) {
            let connect = What::Connect {
                meta: meta
                    .map(|m| m.get().as_bytes().to_vec())
                    .unwrap_or_default(),
                info: info
                    .as_ref()
                    .map(|i| i.get().as_bytes().to_vec())
                    .unwrap_or_default(),
            };
            events.emit(&id, user, connect);
        }
        self.observe(Change::Connection {
            connected: true,
            client: &id,
            user,
        });
        let user: Arc<str> = Arc::from(user);
        state
            .users
            .entry(user.clone())
            .or_default()
            .push(id.clone());
        state.clients.insert(
            id,
            Client {
                user,
                info,
                outbox,
                subs: HashMap::new(),
            },
        );
    }

    /// Removes a connection and all its subscriptions (with `leave` where enabled), and
    /// emits its one `disconnect` event with the close that ended it.
    pub fn unregister(&self, id: &str, close: &Close) {
        // The client leaves the index first: a concurrent subscribe then finds it gone and
        // undoes its own work, so no subscriber outlives its connection.
        let channels: Vec<Arc<Subscribers>> = {
            let mut state = self.write();
            let Some(client) = state.clients.remove(id) else {
                return;
            };
            let disconnect = What::Disconnect {
                code: close.code,
                reason: close.reason.clone(),
            };
            self.shared.events.emit(id, &client.user, disconnect);
            self.observe(Change::Connection {
                connected: false,
                client: id,
                user: &client.user,
            });
            if let Some(ids) = state.users.get_mut(&client.user) {
                ids.retain(|c| &**c != id);
                if ids.is_empty() {
                    state.users.remove(&client.user);
                }
            }
            client
                .subs
                .keys()
                .filter_map(|name| state.channels.get(name).cloned())
                .collect()
        };
        for channel in channels {
            self.detach(id, &channel);
        }
    }

    /// Replaces a connection's public info (after a token refresh).
    pub fn update_info(&self, id: &str, info: Option<Arc<RawValue>>) {
        let channels: Vec<Arc<Subscribers>> = {
            let mut state = self.write();
            let Index {
                clients, channels, ..
            } = &mut *state;
            let Some(client) = clients.get_mut(id) else {
                return;
            };
            client.info = info.clone();
            client
                .subs
                .keys()
                .filter_map(|c| channels.get(c).cloned())
                .collect()
        };
        for channel in channels {
            if let Some(sub) = channel.lock().subscribers.get_mut(id) {
                sub.info = info.clone();
            }
        }
    }

    /// Queues a publication to every subscriber of `channel` on this node, encoded once
    /// (and not at all where the channel has none here). The engine calls this in the
    /// channel's publication order and runs the returned [`Flush`] once its own locks are
    /// released. A traced publication's `fanout` and `writes` spans are children of the
    /// span `trace` names.
    pub fn deliver(
        &self,
        channel: &str,
        data: &[u8],
        offset: Option<u64>,
        receipt: Option<std::time::Duration>,
        trace: Option<&TraceParent>,
    ) -> (Fanout, Flush) {
        let mut flush = self.flush();
        loop {
            let Some(subscribers) = self.read().channels.get(channel).cloned() else {
                return (Fanout::default(), flush);
            };
            let roster = subscribers.lock();
            if roster.removed {
                continue;
            }
            let options = &subscribers.options;
            let trace_id = trace.map(|t| &t.trace_id);
            let frame = ServerMessage::Pub {
                channel,
                data,
                offset,
                trace: trace_id.filter(|_| options.trace_ids),
            }
            .frame();
            let tag = tag(channel, options, data, offset);
            // Tallied before it is queued: an acknowledgement can come back before this
            // returns.
            let tallied = offset.zip(receipt).filter(|_| options.receipts);
            if let Some((offset, timeout)) = tallied {
                let now = std::time::Instant::now();
                let forgotten =
                    self.receipts()
                        .published(channel, offset, now, timeout, trace_id.copied());
                self.shared
                    .metrics
                    .receipts_forgotten
                    .inc_by(forgotten as u64);
            }
            let fanout = trace.map(|t| crate::trace::fanout(channel, offset, t));
            let counts = match &fanout {
                None => roster.fan_out(&frame, tag.as_ref(), &mut flush),
                Some(span) => span.in_scope(|| {
                    let counts = roster.fan_out(&frame, tag.as_ref(), &mut flush);
                    span.record("subscribers", counts.queued);
                    flush.traced(crate::trace::writes());
                    counts
                }),
            };
            drop(roster);
            if let Some((offset, _)) = tallied {
                self.receipts().delivered(channel, offset, counts.queued);
            }
            let metrics = &self.shared.metrics;
            metrics.record_fanout(counts.queued, counts.overflowed);
            return (counts, flush);
        }
    }

    fn receipts(&self) -> std::sync::MutexGuard<'_, Receipts> {
        self.shared.receipts.lock().expect("receipts lock")
    }

    /// A subscription of a `receipts` channel starts, its first offset `from`; `recovered`
    /// are the offsets it was given from history.
    pub fn reading(
        &self,
        id: &str,
        channel: &str,
        from: u64,
        recovered: impl Iterator<Item = u64>,
    ) {
        // Under the index's lock: an unsubscribe either comes after (and its `left` finds
        // the reader) or before (and there is no reader to make).
        let state = self.read();
        let Some((id, client)) = state.clients.get_key_value(id) else {
            return;
        };
        if !client.subs.contains_key(channel) {
            return;
        }
        let now = std::time::Instant::now();
        self.receipts()
            .reading(id, &client.user, channel, from, recovered, now);
    }

    /// A connection acknowledges every publication of `channel` up to `offset`; false when
    /// it is not reading the channel with receipts.
    pub fn ack(&self, id: &str, channel: &str, offset: u64) -> bool {
        let now = std::time::Instant::now();
        self.receipts().ack(id, channel, offset, now)
    }

    /// This node's receipt of a publication, if it tallied it.
    pub fn receipt(&self, channel: &str, offset: u64) -> Option<Receipt> {
        let now = std::time::Instant::now();
        self.receipts().receipt(channel, offset, now)
    }

    /// Forgets the receipts that expired.
    pub fn expire_receipts(&self) {
        self.receipts().expire(std::time::Instant::now());
    }

    /// The outboxes of a target's current connections, with their ids.
    pub fn connections(&self, target: &Target) -> Vec<(ClientId, Arc<Outbox>)> {
        let state = self.read();
        let ids: Vec<ClientId> = match target {
            Target::User(user) => state.users.get(user.as_str()).cloned().unwrap_or_default(),
            Target::Client(id) => state
                .clients
                .get_key_value(id.as_str())
                .map(|(k, _)| k.clone())
                .into_iter()
                .collect(),
        };
        ids.into_iter()
            .filter_map(|id| {
                state
                    .clients
                    .get(&id)
                    .map(|c| (id.clone(), c.outbox.clone()))
            })
            .collect()
    }

    /// Bytes queued to a connection and not yet written (0 for one that is gone).
    pub fn held(&self, id: &str) -> usize {
        let outbox = self.read().clients.get(id).map(|c| c.outbox.clone());
        outbox.map_or(0, |outbox| outbox.held())
    }

    /// Every connection (for shutdown).
    pub fn all_connections(&self) -> Vec<Arc<Outbox>> {
        self.read()
            .clients
            .values()
            .map(|c| c.outbox.clone())
            .collect()
    }

    /// The channels a connection is subscribed to, with who made each subscription.
    pub fn subscriptions(&self, id: &str) -> Vec<(Arc<str>, SubscribedBy)> {
        self.read()
            .clients
            .get(id)
            .map(|c| c.subs.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default()
    }

    pub fn is_subscribed(&self, id: &str, channel: &str) -> bool {
        self.read()
            .clients
            .get(id)
            .is_some_and(|c| c.subs.contains_key(channel))
    }

    pub fn options(&self, channel: &str) -> &NamespaceOptions {
        self.shared.config.channel_options(channel)
    }

    /// Who is subscribed to a channel on this node.
    pub fn subscribers(&self, name: &str) -> Vec<ClientInfo> {
        let Some(channel) = self.read().channels.get(name).cloned() else {
            return Vec::new();
        };
        let ch = channel.lock();
        ch.subscribers
            .iter()
            .map(|(id, s)| ClientInfo {
                client: id.to_string(),
                user: s.user.to_string(),
                info: s.info.clone(),
            })
            .collect()
    }

    /// Channels with subscribers on this node, matching `pattern` when given.
    pub fn channels(&self, pattern: Option<&Pattern>) -> Vec<(String, usize)> {
        let channels: Vec<Arc<Subscribers>> = self
            .read()
            .channels
            .values()
            .filter(|c| pattern.is_none_or(|p| p.matches(&c.name)))
            .cloned()
            .collect();
        let mut out: Vec<(String, usize)> = channels
            .iter()
            .map(|c| (c.name.to_string(), c.lock().subscribers.len()))
            .filter(|(_, n)| *n > 0)
            .collect();
        out.sort();
        out
    }

    pub fn counts(&self) -> Counts {
        let state = self.read();
        Counts {
            connections: state.clients.len(),
            users: state.users.len(),
            channels: state.channels.len(),
            subscriptions: state.clients.values().map(|c| c.subs.len()).sum(),
        }
    }
}

/// A publication's [`Tag`] when its channel's `slow_consumer` policy is not `disconnect`:
/// its key is the `conflate_by` field's JSON text, when the data is an object that has it.
fn tag(
    channel: &str,
    options: &NamespaceOptions,
    data: &[u8],
    offset: Option<u64>,
) -> Option<Arc<Tag>> {
    if options.slow_consumer == SlowConsumer::Disconnect {
        return None;
    }
    let key = options.conflate_by.as_deref().and_then(|field| {
        let object: HashMap<String, &RawValue> = serde_json::from_slice(data).ok()?;
        Some(Box::from(object.get(field)?.get().as_bytes()))
    });
    Some(Arc::new(Tag {
        channel: Arc::from(channel),
        offset: offset.unwrap_or(0),
        key,
    }))
}
