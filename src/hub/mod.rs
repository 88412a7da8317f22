//! The hub: which connections exist on this node, which channels they are subscribed to,
//! and fan-out of encoded frames to them.
//!
//! Callers: the WebSocket session (client commands), the control API (server-side actions)
//! and the broker (publications to deliver on this node). The hub is synchronous: every
//! method computes under a plain `Mutex`/`RwLock`, queues frames with a non-blocking push,
//! and returns. Lock order is global state, then one channel; a channel lock is never held
//! while the global one is taken.

mod channel;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use serde_json::value::RawValue;

use channel::{Channel, Subscriber};
pub use channel::{ClientId, Fanout};

use crate::channel::Pattern;
use crate::config::{Config, NamespaceOptions};
use crate::events::Events;
use crate::metrics::Metrics;
use crate::outbox::{Flush, Outbox, Push};
use crate::pb;
use crate::ws::close::Close;
use crate::ws::{frame, protocol};

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

/// Who made a subscription: it decides whether a token refresh can revoke it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The client asked, under its token's grants.
    Client,
    /// The token's `subs` claim or Control.Subscribe.
    Server,
}

/// Who a server-side action applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    User(String),
    Client(String),
}

#[derive(Clone)]
pub struct Hub {
    shared: Arc<Shared>,
}

struct Shared {
    state: RwLock<State>,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    /// Connection and subscription changes are emitted under the hub's lock, so that a
    /// client's events are numbered in the order its state changed.
    events: Events,
}

#[derive(Default)]
struct State {
    channels: HashMap<Arc<str>, Arc<Channel>>,
    clients: HashMap<ClientId, Client>,
    users: HashMap<Arc<str>, Vec<ClientId>>,
}

struct Client {
    user: Arc<str>,
    info: Option<Arc<RawValue>>,
    outbox: Arc<Outbox>,
    subs: HashMap<Arc<str>, Origin>,
}

/// A presence entry.
#[derive(Debug, Clone)]
pub struct Member {
    pub client: String,
    pub user: String,
    pub info: Option<Arc<RawValue>>,
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
                state: RwLock::new(State::default()),
                config,
                metrics,
                events,
            }),
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.shared.state.read().expect("hub lock")
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.shared.state.write().expect("hub lock")
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
        if events.wants(pb::EventKind::Connect) {
            let connect = pb::ConnectEvent {
                meta: meta
                    .map(|m| m.get().as_bytes().to_vec())
                    .unwrap_or_default(),
                info: info
                    .as_ref()
                    .map(|i| i.get().as_bytes().to_vec())
                    .unwrap_or_default(),
            };
            events.emit(&id, user, pb::event::Kind::Connect(connect));
        }
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
        let channels: Vec<Arc<Channel>> = {
            let mut state = self.write();
            let Some(client) = state.clients.remove(id) else {
                return;
            };
            let disconnect = pb::DisconnectEvent {
                code: u32::from(close.code),
                reason: close.reason.clone(),
            };
            self.shared
                .events
                .emit(id, &client.user, pb::event::Kind::Disconnect(disconnect));
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
        let channels: Vec<Arc<Channel>> = {
            let mut state = self.write();
            let State {
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

    /// Subscribes a connection. `first` is queued to it before any publication of the channel
    /// (the subscribe reply, or a `sub` push for server-side subscriptions). The sockets to
    /// write (the connection's, and those of a `join` fan-out) are returned as a [`Flush`],
    /// for the caller to run once the engine's lock is released.
    pub fn subscribe(
        &self,
        id: &str,
        name: &str,
        origin: Origin,
        first: Bytes,
    ) -> Result<Flush, HubError> {
        let max_subscriptions = self.shared.config.max_subscriptions;
        let name: Arc<str> = Arc::from(name);
        // Reserve the subscription on the client first, so that two concurrent subscribes of
        // one connection (client and backend) cannot both pass the checks.
        let (id, subscriber) = {
            let mut state = self.write();
            let id = state
                .clients
                .get_key_value(id)
                .map(|(k, _)| k.clone())
                .ok_or(HubError::UnknownClient)?;
            let client = state.clients.get_mut(&id).expect("present");
            if client.subs.contains_key(&name) {
                return Err(HubError::AlreadySubscribed);
            }
            if client.subs.len() >= max_subscriptions {
                return Err(HubError::TooManySubscriptions(max_subscriptions));
            }
            let subscriber = Subscriber {
                outbox: client.outbox.clone(),
                user: client.user.clone(),
                info: client.info.clone(),
            };
            // Checked here too (the channel lock under the global one is the lock order), so
            // that a full channel refuses before the subscription is announced.
            if let Some(channel) = state.channels.get(&name) {
                let max = channel.options.max_subscribers;
                if max > 0 && channel.lock().subscribers.len() >= max {
                    return Err(HubError::ChannelFull(max));
                }
            }
            let client = state.clients.get_mut(&id).expect("present");
            client.subs.insert(name.clone(), origin);
            // Announced with the reservation, under the write lock: before the client can see
            // `first` and act on it, and before its disconnect.
            if self.shared.events.wants(pb::EventKind::Subscribe) {
                let subscribe = pb::SubscribeEvent {
                    channel: name.to_string(),
                    server_side: origin == Origin::Server,
                };
                self.shared.events.emit(
                    &id,
                    &subscriber.user,
                    pb::event::Kind::Subscribe(subscribe),
                );
            }
            (id, subscriber)
        };
        let user = subscriber.user.clone();
        let mut flush = Flush::default();
        let (channel, subscriber_outbox) = loop {
            let channel = {
                let mut state = self.write();
                let options = self.shared.config.channel_options(&name).clone();
                state
                    .channels
                    .entry(name.clone())
                    .or_insert_with(|| Arc::new(Channel::new(name.clone(), options)))
                    .clone()
            };
            let mut ch = channel.lock();
            if ch.removed {
                continue;
            }
            let max = channel.options.max_subscribers;
            if max > 0 && ch.subscribers.len() >= max {
                drop(ch);
                self.remove_if_empty(&channel);
                // The channel filled up after the check above: the announced subscription
                // is withdrawn.
                if let Some(client) = self.write().clients.get_mut(&id) {
                    if client.subs.remove(&name).is_some()
                        && self.shared.events.wants(pb::EventKind::Unsubscribe)
                    {
                        let unsubscribe = pb::UnsubscribeEvent {
                            channel: name.to_string(),
                            code: UNSUB_CHANNEL_FULL,
                        };
                        self.shared.events.emit(
                            &id,
                            &user,
                            pb::event::Kind::Unsubscribe(unsubscribe),
                        );
                    }
                }
                return Err(HubError::ChannelFull(max));
            }
            if subscriber.outbox.push_later(first) == Push::Deferred {
                flush.add(&subscriber.outbox);
            }
            if channel.options.join_leave {
                let join = frame::text(&protocol::encode_presence_event(
                    "join",
                    &channel.name,
                    &id,
                    &subscriber.user,
                    subscriber.info.as_deref(),
                ));
                flush.append(ch.fan_out(&join, None).1);
            }
            let outbox = subscriber.outbox.clone();
            ch.subscribers.insert(id.clone(), subscriber);
            break (channel.clone(), outbox);
        };
        // The connection may have gone, or unsubscribed, while the channel lock was taken.
        let (present, still) = match self.read().clients.get(&id) {
            Some(client) => (true, client.subs.contains_key(&name)),
            None => (false, false),
        };
        if !still {
            self.detach(&id, &channel);
            if present {
                // A backend Unsubscribe overtook this subscribe; the client saw `first`, so it
                // is told that the subscription ended.
                let unsub = protocol::encode_unsub(&name, protocol::UnsubReason::Backend);
                subscriber_outbox.push(frame::text(&unsub));
            }
        }
        Ok(flush)
    }

    /// Unsubscribes a connection; `notify` queues an `unsub` push with that reason.
    /// Returns false when it was not subscribed.
    pub fn unsubscribe(&self, id: &str, name: &str, notify: Option<protocol::UnsubReason>) -> bool {
        let channel = {
            let mut state = self.write();
            let State {
                clients, channels, ..
            } = &mut *state;
            let Some(client) = clients.get_mut(id) else {
                return false;
            };
            if client.subs.remove(name).is_none() {
                return false;
            }
            if self.shared.events.wants(pb::EventKind::Unsubscribe) {
                let unsubscribe = pb::UnsubscribeEvent {
                    channel: name.to_string(),
                    code: notify.map_or(0, protocol::UnsubReason::code),
                };
                self.shared.events.emit(
                    id,
                    &client.user,
                    pb::event::Kind::Unsubscribe(unsubscribe),
                );
            }
            (channels.get(name).cloned(), client.outbox.clone())
        };
        let (channel, outbox) = channel;
        if let Some(channel) = channel {
            self.detach(id, &channel);
        }
        // Queued after the connection left the channel: no `pub` of it can follow the `unsub`.
        if let Some(reason) = notify {
            outbox.push(frame::text(&protocol::encode_unsub(name, reason)));
        }
        true
    }

    fn detach(&self, id: &str, channel: &Arc<Channel>) {
        let mut ch = channel.lock();
        let mut left = Flush::default();
        if let Some(sub) = ch.subscribers.remove(id) {
            if channel.options.join_leave {
                let leave = frame::text(&protocol::encode_presence_event(
                    "leave",
                    &channel.name,
                    id,
                    &sub.user,
                    sub.info.as_deref(),
                ));
                left = ch.fan_out(&leave, None).1;
            }
        }
        let empty = ch.subscribers.is_empty();
        drop(ch);
        left.run();
        if empty {
            self.remove_if_empty(channel);
        }
    }

    /// Drops a channel from the index once nobody is subscribed, so that subscribe and
    /// unsubscribe churn leaves nothing behind.
    fn remove_if_empty(&self, channel: &Arc<Channel>) {
        let mut state = self.write();
        let mut ch = channel.lock();
        if ch.subscribers.is_empty() && !ch.removed {
            ch.removed = true;
            if state
                .channels
                .get(&channel.name)
                .is_some_and(|c| Arc::ptr_eq(c, channel))
            {
                state.channels.remove(&channel.name);
            }
        }
    }

    /// Queues an encoded frame to every subscriber of `name` on this node.
    pub fn fan_out(&self, name: &str, frame: &Bytes) -> Fanout {
        loop {
            let Some(channel) = self.read().channels.get(name).cloned() else {
                return Fanout::default();
            };
            let ch = channel.lock();
            if ch.removed {
                continue;
            }
            let (counts, flush) = ch.fan_out(frame, None);
            drop(ch);
            flush.run();
            self.shared.metrics.record_fanout(counts);
            return counts;
        }
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

    /// Every connection (for shutdown).
    pub fn all_connections(&self) -> Vec<Arc<Outbox>> {
        self.read()
            .clients
            .values()
            .map(|c| c.outbox.clone())
            .collect()
    }

    /// The channels a connection is subscribed to, with who made each subscription.
    pub fn subscriptions(&self, id: &str) -> Vec<(Arc<str>, Origin)> {
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

    /// Who is subscribed to a channel; None where its namespace keeps no presence.
    pub fn presence(&self, name: &str) -> Option<Vec<Member>> {
        if !self.options(name).presence {
            return None;
        }
        let Some(channel) = self.read().channels.get(name).cloned() else {
            return Some(Vec::new());
        };
        let ch = channel.lock();
        Some(
            ch.subscribers
                .iter()
                .map(|(id, s)| Member {
                    client: id.to_string(),
                    user: s.user.to_string(),
                    info: s.info.clone(),
                })
                .collect(),
        )
    }

    /// (clients, distinct users) subscribed to a channel with presence enabled.
    pub fn presence_stats(&self, name: &str) -> Option<(usize, usize)> {
        let members = self.presence(name)?;
        let mut users: Vec<&str> = members.iter().map(|m| m.user.as_str()).collect();
        users.sort_unstable();
        users.dedup();
        Some((members.len(), users.len()))
    }

    /// Channels with subscribers on this node, matching `pattern` when given.
    pub fn channels(&self, pattern: Option<&Pattern>) -> Vec<(String, usize)> {
        let channels: Vec<Arc<Channel>> = self
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
