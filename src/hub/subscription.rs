//! Subscriptions on this node: a connection joins a channel's subscribers (with its first
//! frame queued before any publication of the channel, and `join` pushes where enabled) and
//! leaves it (with `unsub` and `leave` pushes), and a channel nobody is subscribed to is
//! dropped from the index. Lock order as in `hub`: the index, then one channel.

use std::sync::Arc;

use bytes::Bytes;

use super::subscribers::{Subscriber, Subscribers};
use super::{Change, Hub, HubError, Index, SubscribedBy, UNSUB_CHANNEL_FULL};
use crate::events::{EventKind, What};
use crate::outbox::{Flush, Push};
use crate::wire::message::{Membership, UnsubReason};
use crate::wire::ServerMessage;

impl Hub {
    /// Subscribes a connection. `first` is queued to it before any publication of the channel
    /// (the subscribe reply, or a `sub` push for server-side subscriptions). The sockets to
    /// write (the connection's, and those of a `join` fan-out) are returned as a [`Flush`],
    /// for the caller to run once the engine's lock is released.
    pub fn subscribe(
        &self,
        id: &str,
        name: &str,
        origin: SubscribedBy,
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
            if self.shared.events.wants(EventKind::Subscribe) {
                let subscribe = What::Subscribe {
                    channel: name.to_string(),
                    server_side: origin == SubscribedBy::Server,
                };
                self.shared.events.emit(&id, &subscriber.user, subscribe);
            }
            (id, subscriber)
        };
        let user = subscriber.user.clone();
        let mut flush = self.flush();
        let (channel, subscriber_outbox) = loop {
            let channel = {
                let mut state = self.write();
                let options = self.shared.config.channel_options(&name).clone();
                state
                    .channels
                    .entry(name.clone())
                    .or_insert_with(|| Arc::new(Subscribers::new(name.clone(), options)))
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
                        && self.shared.events.wants(EventKind::Unsubscribe)
                    {
                        let unsubscribe = What::Unsubscribe {
                            channel: name.to_string(),
                            code: UNSUB_CHANNEL_FULL,
                        };
                        self.shared.events.emit(&id, &user, unsubscribe);
                    }
                }
                return Err(HubError::ChannelFull(max));
            }
            if subscriber.outbox.push_later(first) == Push::Deferred {
                flush.add(&subscriber.outbox);
            }
            if channel.options.join_leave {
                let join = ServerMessage::JoinLeave {
                    kind: Membership::Join,
                    channel: &channel.name,
                    client: &id,
                    user: &subscriber.user,
                    info: subscriber.info.as_deref(),
                }
                .frame();
                ch.fan_out(&join, None, &mut flush);
            }
            let outbox = subscriber.outbox.clone();
            self.observe(Change::Subscription {
                joined: true,
                channel: &channel.name,
                client: &id,
                user: &subscriber.user,
                info: subscriber.info.as_deref(),
            });
            ch.subscribers.insert(id.clone(), subscriber);
            break (channel.clone(), outbox);
        };
        // The connection may have gone, or unsubscribed, while the channel lock was taken.
        let (present, still) = match self.read().clients.get(&id) {
            Some(client) => (true, client.subs.contains_key(&name)),
            None => (false, false),
        };
        if !still {
            // Written with the rest by the caller, after the engine's lock is released.
            self.detach_into(&id, &channel, &mut flush);
            if present {
                // A backend Unsubscribe overtook this subscribe; the client saw `first`, so it
                // is told that the subscription ended.
                let unsub = ServerMessage::Unsub {
                    channel: &name,
                    reason: UnsubReason::Backend,
                };
                if subscriber_outbox.push_later(unsub.frame()) == Push::Deferred {
                    flush.add(&subscriber_outbox);
                }
            }
        }
        Ok(flush)
    }

    /// Unsubscribes a connection; `notify` queues an `unsub` push with that reason.
    /// Returns false when it was not subscribed.
    pub fn unsubscribe(&self, id: &str, name: &str, notify: Option<UnsubReason>) -> bool {
        let channel = {
            let mut state = self.write();
            let Index {
                clients, channels, ..
            } = &mut *state;
            let Some(client) = clients.get_mut(id) else {
                return false;
            };
            if client.subs.remove(name).is_none() {
                return false;
            }
            if self.shared.events.wants(EventKind::Unsubscribe) {
                let unsubscribe = What::Unsubscribe {
                    channel: name.to_string(),
                    code: notify.map_or(0, UnsubReason::code),
                };
                self.shared.events.emit(id, &client.user, unsubscribe);
            }
            (channels.get(name).cloned(), client.outbox.clone())
        };
        let (channel, outbox) = channel;
        if let Some(channel) = channel {
            self.detach(id, &channel);
        }
        // Queued after the connection left the channel: no `pub` of it can follow the `unsub`.
        if let Some(reason) = notify {
            let unsub = ServerMessage::Unsub {
                channel: name,
                reason,
            };
            outbox.push(unsub.frame());
        }
        true
    }

    /// Ends every subscription to a channel on this node with an `unsub` push, adding the
    /// sockets to write to `flush` (the engine calls this under its channel lock).
    pub fn unsubscribe_all_into(&self, name: &str, reason: UnsubReason, flush: &mut Flush) {
        let Some(channel) = self.read().channels.get(name).cloned() else {
            return;
        };
        let ids: Vec<_> = channel.lock().subscribers.keys().cloned().collect();
        for id in ids {
            let outbox = {
                let mut state = self.write();
                let Some(client) = state.clients.get_mut(&id) else {
                    continue;
                };
                if client.subs.remove(name).is_none() {
                    continue;
                }
                if self.shared.events.wants(EventKind::Unsubscribe) {
                    let unsubscribe = What::Unsubscribe {
                        channel: name.to_string(),
                        code: reason.code(),
                    };
                    self.shared.events.emit(&id, &client.user, unsubscribe);
                }
                client.outbox.clone()
            };
            self.detach_into(&id, &channel, flush);
            if reason.resubscribe() {
                self.shared.metrics.resubscribes.inc();
            }
            let unsub = ServerMessage::Unsub {
                channel: name,
                reason,
            };
            if outbox.push_later(unsub.frame()) == Push::Deferred {
                flush.add(&outbox);
            }
        }
    }

    /// Takes a connection out of one channel (with `leave` pushes where enabled) and writes
    /// what that queued.
    pub(super) fn detach(&self, id: &str, channel: &Arc<Subscribers>) {
        let mut flush = self.flush();
        self.detach_into(id, channel, &mut flush);
        flush.run();
    }

    /// [`Hub::detach`], with the sockets to write added to `flush`.
    fn detach_into(&self, id: &str, channel: &Arc<Subscribers>, flush: &mut Flush) {
        let mut ch = channel.lock();
        if let Some(sub) = ch.subscribers.remove(id) {
            if channel.options.receipts {
                let now = std::time::Instant::now();
                self.receipts().left(id, &channel.name, now);
            }
            self.observe(Change::Subscription {
                joined: false,
                channel: &channel.name,
                client: id,
                user: &sub.user,
                info: sub.info.as_deref(),
            });
            if channel.options.join_leave {
                let leave = ServerMessage::JoinLeave {
                    kind: Membership::Leave,
                    channel: &channel.name,
                    client: id,
                    user: &sub.user,
                    info: sub.info.as_deref(),
                }
                .frame();
                ch.fan_out(&leave, None, flush);
            }
        }
        let empty = ch.subscribers.is_empty();
        drop(ch);
        if empty {
            self.remove_if_empty(channel);
        }
    }

    /// Drops a channel from the index once nobody is subscribed, so that subscribe and
    /// unsubscribe churn leaves nothing behind.
    pub(super) fn remove_if_empty(&self, channel: &Arc<Subscribers>) {
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
}
