//! The embedded engine: histories and idempotency keys kept in this process, publications
//! handed straight to this node's hub.
//!
//! Each channel that keeps history, or that was published to with an idempotency key, has a
//! [`Record`] behind its own lock: a publication is deduplicated, appended and queued to the
//! hub's subscribers under it, and a new subscription reads its position (and recovers) and
//! joins the hub under it, so every publication is either in what a subscriber recovered or
//! delivered to it live, never both and never neither. Channels without either publish with
//! no engine lock at all (the hub's channel lock orders their publications). Sockets are
//! written after the record's lock is released.
//!
//! Lock order: the record map, then one record, then the hub's own locks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;

use crate::config::{Config, NamespaceOptions};
use crate::hub::Hub;
use crate::wire::message::ClientInfo;
use crate::wire::{Attach, Position, Publication, Recovery, TraceParent};

use super::history::{History, Retention};
use super::Published;

pub struct MemoryBroker {
    hub: Hub,
    config: Arc<Config>,
    records: Mutex<HashMap<Arc<str>, Arc<Mutex<Record>>>>,
}

/// What the engine keeps of one channel.
#[derive(Default)]
struct Record {
    /// Some where the channel's namespace keeps history.
    history: Option<History>,
    /// Idempotency key → the first result and when it is forgotten.
    seen: HashMap<String, (Published, Instant)>,
}

fn retention(options: &NamespaceOptions) -> Retention {
    Retention {
        size: options.history_size,
        ttl: options.history_ttl,
        meta_ttl: options.history_meta_ttl,
    }
}

impl Record {
    /// The channel's history, started over in a new epoch once its position expired.
    fn history(&mut self, now: Instant, retention: Retention) -> Option<&mut History> {
        let history = self.history.as_mut()?;
        if history.lost(now) {
            *history = History::new(now, retention);
        }
        Some(history)
    }
}

impl MemoryBroker {
    pub fn new(hub: Hub, config: Arc<Config>) -> MemoryBroker {
        MemoryBroker {
            hub,
            config,
            records: Mutex::new(HashMap::new()),
        }
    }

    /// The channel's record, made on first use when `create`; None for a channel without
    /// history unless `keyed` (a publish with an idempotency key).
    fn record(
        &self,
        channel: &str,
        now: Instant,
        create: bool,
        keyed: bool,
    ) -> Option<Arc<Mutex<Record>>> {
        let options = self.config.channel_options(channel);
        if !options.has_history() && !keyed {
            return None;
        }
        let mut records = self.records.lock().expect("records lock");
        if let Some(record) = records.get(channel) {
            return Some(record.clone());
        }
        if !create {
            return None;
        }
        let record = Arc::new(Mutex::new(Record {
            history: options
                .has_history()
                .then(|| History::new(now, retention(options))),
            seen: HashMap::new(),
        }));
        records.insert(Arc::from(channel), record.clone());
        Some(record)
    }

    pub fn publish(
        &self,
        channel: &str,
        data: &[u8],
        idempotency_key: Option<&str>,
        receipt: Option<std::time::Duration>,
        trace: Option<&TraceParent>,
        now: Instant,
    ) -> Published {
        let start = Instant::now();
        let Some(record) = self.record(channel, now, true, idempotency_key.is_some()) else {
            let (counts, flush) = self.hub.deliver(channel, data, None, None, trace);
            self.hub.metrics().record_publication(start.elapsed());
            flush.run();
            return Published {
                offset: 0,
                epoch: String::new(),
                delivered: counts.queued,
                replayed: false,
            };
        };
        let retention = retention(self.config.channel_options(channel));
        let mut record = record.lock().expect("record lock");
        if let Some((first, until)) = idempotency_key.and_then(|key| record.seen.get(key)) {
            if now < *until {
                return Published {
                    replayed: true,
                    ..first.clone()
                };
            }
        }
        let (published, flush) = match record.history(now, retention) {
            Some(history) => {
                let offset = history.append(Bytes::copy_from_slice(data), now, retention);
                let epoch = history.position().epoch.to_string();
                let (counts, flush) = self
                    .hub
                    .deliver(channel, data, Some(offset), receipt, trace);
                let published = Published {
                    offset,
                    epoch,
                    delivered: counts.queued,
                    replayed: false,
                };
                (published, flush)
            }
            None => {
                let (counts, flush) = self.hub.deliver(channel, data, None, None, trace);
                let published = Published {
                    offset: 0,
                    epoch: String::new(),
                    delivered: counts.queued,
                    replayed: false,
                };
                (published, flush)
            }
        };
        if let Some(key) = idempotency_key {
            let until = now + self.config.idempotency_window;
            record
                .seen
                .insert(key.to_string(), (published.clone(), until));
        }
        drop(record);
        self.hub.metrics().record_publication(start.elapsed());
        flush.run();
        published
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
        let Some(record) = self.record(channel, now, true, false) else {
            // Nothing can be recovered where nothing is kept.
            return attach(Attach {
                position: None,
                recovery: since.map(|_| Recovery::Impossible),
                receipts: false,
            });
        };
        let retention = retention(self.config.channel_options(channel));
        let mut record = record.lock().expect("record lock");
        let history = record
            .history(now, retention)
            .expect("a channel with history");
        let recovery =
            since.map(|since| history.recover(since, now, self.config.max_recovery, budget));
        attach(Attach {
            position: Some(history.position()),
            recovery,
            receipts: false,
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
    ) -> Option<(Vec<Publication>, Position)> {
        let record = self.record(channel, now, true, false)?;
        let retention = retention(self.config.channel_options(channel));
        let mut record = record.lock().expect("record lock");
        let history = record.history(now, retention)?;
        Some((history.page(since, limit, reverse, now), history.position()))
    }

    /// Drops a channel's kept publications (its position stays); false without history.
    pub fn remove_history(&self, channel: &str, now: Instant) -> bool {
        match self.record(channel, now, false, false) {
            Some(record) => {
                if let Some(history) = record.lock().expect("record lock").history.as_mut() {
                    history.clear();
                }
                true
            }
            None => self.config.channel_options(channel).has_history(),
        }
    }

    /// One node's subscribers are the whole presence of a channel.
    pub fn presence(&self, channel: &str) -> Vec<ClientInfo> {
        self.hub.subscribers(channel)
    }

    /// Drops expired publications, positions and idempotency keys; returns how many records
    /// remain. A record that someone holds (a publish or subscribe in progress: its `Arc` is
    /// shared) or whose lock is taken is left for the next sweep, so that no caller ever works
    /// on a record that is no longer the channel's, and the sweep never waits on a fan-out.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut records = self.records.lock().expect("records lock");
        records.retain(|_, record| {
            if Arc::strong_count(record) > 1 {
                return true;
            }
            match record.try_lock() {
                Ok(mut r) => {
                    r.seen.retain(|_, (_, until)| now < *until);
                    let history_kept = match r.history.as_mut() {
                        Some(history) => {
                            history.trim(now);
                            !history.lost(now)
                        }
                        None => false,
                    };
                    history_kept || !r.seen.is_empty()
                }
                Err(_) => true,
            }
        });
        records.len()
    }
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
    fn sweep_forgets_expired_histories_but_never_one_in_use() {
        let b = broker();
        let t = Instant::now();
        b.publish("h:x", b"1", None, None, None, t);
        b.publish("plain", b"1", None, None, None, t);
        assert_eq!(b.sweep(t), 1, "only channels with history have a record");
        // Publications expire after history_ttl; the position stays.
        assert_eq!(b.sweep(t + Duration::from_secs(61)), 1);
        let (page, position) = b
            .history("h:x", None, 10, false, t + Duration::from_secs(61))
            .unwrap();
        assert!(page.is_empty());
        assert_eq!(position.offset, 1);
        let lost = t + Duration::from_secs(3601);
        let held = b.record("h:x", t, false, false).unwrap();
        assert_eq!(b.sweep(lost), 1, "a record someone holds stays");
        drop(held);
        assert_eq!(b.sweep(lost), 0, "an expired position is forgotten");
        let fresh = b.publish("h:x", b"2", None, None, None, lost);
        assert_eq!(fresh.offset, 1, "and the channel starts over");
        assert_ne!(fresh.epoch, position.epoch.to_string(), "in a new epoch");
    }

    #[test]
    fn idempotency_keys_expire_with_the_window_and_are_per_channel() {
        let b = broker();
        let t = Instant::now();
        let first = b.publish("h:k", b"1", Some("key"), None, None, t);
        assert_eq!(
            b.publish(
                "h:k",
                b"2",
                Some("key"),
                None,
                None,
                t + Duration::from_secs(299)
            ),
            Published {
                replayed: true,
                ..first.clone()
            }
        );
        assert_eq!(
            b.publish("h:other", b"1", Some("key"), None, None, t)
                .offset,
            1,
            "another channel, another key space"
        );
        let later = b.publish(
            "h:k",
            b"3",
            Some("key"),
            None,
            None,
            t + Duration::from_secs(300),
        );
        assert_eq!(
            later.offset, 2,
            "after idempotency_window the key is forgotten"
        );
        // A channel without history keeps its keys only as long as the window.
        b.publish("plain", b"1", Some("key"), None, None, t);
        assert!(b.record("plain", t, false, true).is_some());
        assert_eq!(
            b.sweep(t + Duration::from_secs(600)),
            2,
            "the histories stay"
        );
        assert!(b.record("plain", t, false, true).is_none());
        let h = b.record("h:k", t, false, false).unwrap();
        assert!(h.lock().unwrap().seen.is_empty());
    }
}
