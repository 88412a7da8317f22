//! The embedded engine: history streams kept in this process, publications handed straight
//! to this node's hub.
//!
//! A channel with history serializes publish and subscribe on its stream's lock: a
//! publication is appended and fanned out under it, and a new subscription reads its
//! position (and recovers) and joins the hub under it, so every publication is either in
//! what a subscriber recovered or delivered to it live, never both and never neither.
//! Lock order: the stream map, then one stream, then the hub's own locks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;

use crate::config::{Config, NamespaceOptions};
use crate::hub::Hub;
use crate::ws::{frame, protocol};

use super::history::{Entry, Position, Recovery, Retention, Stream};
use super::{Attach, Published};

pub struct MemoryBroker {
    hub: Hub,
    config: Arc<Config>,
    streams: Mutex<HashMap<Arc<str>, Arc<Mutex<Stream>>>>,
    seen: Mutex<Seen>,
}

/// (channel, idempotency key) → the first result and when it is forgotten.
type Seen = HashMap<(Arc<str>, String), (Published, Instant)>;

fn retention(options: &NamespaceOptions) -> Retention {
    Retention {
        size: options.history_size,
        ttl: options.history_ttl,
        meta_ttl: options.history_meta_ttl,
    }
}

impl MemoryBroker {
    pub fn new(hub: Hub, config: Arc<Config>) -> MemoryBroker {
        MemoryBroker {
            hub,
            config,
            streams: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// The channel's stream (made on first use, started over once its position expired), or
    /// None for a channel without history.
    fn stream(&self, channel: &str, now: Instant, create: bool) -> Option<Arc<Mutex<Stream>>> {
        let options = self.config.channel_options(channel);
        if !options.has_history() {
            return None;
        }
        let mut streams = self.streams.lock().expect("streams lock");
        if let Some(stream) = streams.get(channel) {
            return Some(stream.clone());
        }
        if !create {
            return None;
        }
        let stream = Arc::new(Mutex::new(Stream::new(now, retention(options))));
        streams.insert(Arc::from(channel), stream.clone());
        Some(stream)
    }

    pub fn publish(
        &self,
        channel: &str,
        data: &[u8],
        idempotency_key: Option<&str>,
        now: Instant,
    ) -> Published {
        let Some(key) = idempotency_key else {
            return self.publish_once(channel, data, now);
        };
        // Held across the publication, so that two calls with one key cannot both publish.
        let mut seen = self.seen.lock().expect("idempotency lock");
        let id = (Arc::<str>::from(channel), key.to_string());
        if let Some((first, until)) = seen.get(&id) {
            if now < *until {
                return first.clone();
            }
        }
        let published = self.publish_once(channel, data, now);
        seen.insert(
            id,
            (published.clone(), now + self.config.idempotency_window),
        );
        published
    }

    fn publish_once(&self, channel: &str, data: &[u8], now: Instant) -> Published {
        let Some(stream) = self.stream(channel, now, true) else {
            // Encoded once, frame header included; every subscriber shares these bytes.
            let frame = frame::text(&protocol::encode_pub(channel, data, None));
            let counts = self.hub.fan_out(channel, &frame);
            return Published {
                offset: 0,
                epoch: String::new(),
                delivered: counts.queued,
            };
        };
        let retention = retention(self.config.channel_options(channel));
        let mut stream = stream.lock().expect("stream lock");
        if stream.lost(now) {
            *stream = Stream::new(now, retention);
        }
        let offset = stream.append(Bytes::copy_from_slice(data), now, retention);
        let frame = frame::text(&protocol::encode_pub(channel, data, Some(offset)));
        let counts = self.hub.fan_out(channel, &frame);
        Published {
            offset,
            epoch: stream.position().epoch.to_string(),
            delivered: counts.queued,
        }
    }

    /// Runs `attach` with the channel's position (and the recovery from `since`) while no
    /// publication of the channel can slip between the two.
    pub fn subscribe<R>(
        &self,
        channel: &str,
        since: Option<&Position>,
        budget: usize,
        now: Instant,
        attach: impl FnOnce(Attach) -> R,
    ) -> R {
        let Some(stream) = self.stream(channel, now, true) else {
            // Nothing can be recovered where nothing is kept.
            return attach(Attach {
                position: None,
                recovery: since.map(|_| Recovery::Impossible),
            });
        };
        let retention = retention(self.config.channel_options(channel));
        let mut stream = stream.lock().expect("stream lock");
        if stream.lost(now) {
            *stream = Stream::new(now, retention);
        }
        let recovery =
            since.map(|since| stream.recover(since, now, self.config.max_recovery, budget));
        attach(Attach {
            position: Some(stream.position()),
            recovery,
        })
    }

    /// A page of the channel's history and its position; None without history.
    pub fn history(
        &self,
        channel: &str,
        since: Option<u64>,
        limit: usize,
        reverse: bool,
        now: Instant,
    ) -> Option<(Vec<Entry>, Position)> {
        let stream = self.stream(channel, now, true)?;
        let retention = retention(self.config.channel_options(channel));
        let mut stream = stream.lock().expect("stream lock");
        if stream.lost(now) {
            *stream = Stream::new(now, retention);
        }
        Some((stream.page(since, limit, reverse, now), stream.position()))
    }

    /// Drops a channel's kept publications (its position stays); false without history.
    pub fn remove_history(&self, channel: &str, now: Instant) -> bool {
        match self.stream(channel, now, false) {
            Some(stream) => {
                stream.lock().expect("stream lock").clear();
                true
            }
            None => self.config.channel_options(channel).has_history(),
        }
    }

    /// Drops expired publications, positions and idempotency keys; returns how many streams
    /// remain. A stream that someone holds (a publish or subscribe in progress: its `Arc` is
    /// shared) or whose lock is taken is left for the next sweep, so that no caller ever works
    /// on a stream that is no longer the channel's, and the sweep never waits on a fan-out.
    pub fn sweep(&self, now: Instant) -> usize {
        self.seen
            .lock()
            .expect("idempotency lock")
            .retain(|_, (_, until)| now < *until);
        let mut streams = self.streams.lock().expect("streams lock");
        streams.retain(|_, stream| {
            if Arc::strong_count(stream) > 1 {
                return true;
            }
            match stream.try_lock() {
                Ok(mut s) => {
                    s.trim(now);
                    !s.lost(now)
                }
                Err(_) => true,
            }
        });
        streams.len()
    }
}

/// Whether a recovery succeeded, for replies.
pub fn recovered(recovery: &Recovery) -> bool {
    matches!(recovery, Recovery::Complete(_))
}
