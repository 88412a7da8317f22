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
        let start = Instant::now();
        let published = self.publish_and_fan_out(channel, data, now);
        self.hub.metrics().record_publication(start.elapsed());
        published
    }

    fn publish_and_fan_out(&self, channel: &str, data: &[u8], now: Instant) -> Published {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::metrics::Metrics;

    fn broker() -> MemoryBroker {
        let file =
            "[namespaces.h]\nhistory_size = 10\nhistory_ttl = \"1m\"\nhistory_meta_ttl = \"1h\"\n";
        let config = Arc::new(Config::from_layers(Some(("test", file)), &[], &[]).unwrap());
        MemoryBroker::new(
            Hub::new(
                config.clone(),
                Arc::new(Metrics::default()),
                crate::events::Events::new(&config, Arc::from("test")),
            ),
            config,
        )
    }

    #[test]
    fn sweep_forgets_expired_streams_but_never_one_in_use() {
        let b = broker();
        let t = Instant::now();
        b.publish("h:x", b"1", None, t);
        b.publish("plain", b"1", None, t);
        assert_eq!(b.sweep(t), 1, "only channels with history have a stream");
        // Publications expire after history_ttl; the position stays.
        assert_eq!(b.sweep(t + Duration::from_secs(61)), 1);
        let (page, position) = b
            .history("h:x", None, 10, false, t + Duration::from_secs(61))
            .unwrap();
        assert!(page.is_empty());
        assert_eq!(position.offset, 1);
        let lost = t + Duration::from_secs(3601);
        let held = b.stream("h:x", t, false).unwrap();
        assert_eq!(b.sweep(lost), 1, "a stream someone holds stays");
        drop(held);
        assert_eq!(b.sweep(lost), 0, "an expired position is forgotten");
        let fresh = b.publish("h:x", b"2", None, lost);
        assert_eq!(fresh.offset, 1, "and the channel starts over");
        assert_ne!(fresh.epoch, position.epoch.to_string(), "in a new epoch");
    }

    #[test]
    fn idempotency_keys_expire_with_the_window_and_are_per_channel() {
        let b = broker();
        let t = Instant::now();
        let first = b.publish("h:k", b"1", Some("key"), t);
        assert_eq!(
            b.publish("h:k", b"2", Some("key"), t + Duration::from_secs(299)),
            first
        );
        assert_eq!(
            b.publish("h:other", b"1", Some("key"), t).offset,
            1,
            "another channel, another key space"
        );
        let later = b.publish("h:k", b"3", Some("key"), t + Duration::from_secs(300));
        assert_eq!(
            later.offset, 2,
            "after idempotency_window the key is forgotten"
        );
        b.sweep(t + Duration::from_secs(600));
        assert!(b.seen.lock().unwrap().is_empty());
    }
}
