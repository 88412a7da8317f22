//! One channel's subscribers and presence, behind the channel's own lock.
//!
//! The hub finds a channel's [`Subscribers`] under its global lock, lets go of that lock, then takes this
//! one: publishers to different channels never wait for each other, and publishers to one
//! channel are serialized here, which gives every subscriber the same order. Whatever must
//! arrive before a subscription's first publication (the subscribe reply) is queued under
//! this lock too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use serde_json::value::RawValue;

use crate::config::NamespaceOptions;
use crate::outbox::{Flush, Outbox, Push, Tag};

pub type ClientId = Arc<str>;

/// One channel's subscribers on this node.
pub struct Subscribers {
    pub name: Arc<str>,
    pub options: NamespaceOptions,
    roster: Mutex<Roster>,
}

/// What the channel's lock guards.
pub struct Roster {
    pub subscribers: HashMap<ClientId, Subscriber>,
    /// Set when the hub removed the channel from its index; a late arrival looks it up again.
    pub removed: bool,
}

pub struct Subscriber {
    pub outbox: Arc<Outbox>,
    pub user: Arc<str>,
    pub info: Option<Arc<RawValue>>,
}

/// Counts of one fan-out.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fanout {
    pub queued: u32,
    pub overflowed: u32,
}

// === impl Subscribers ===

impl Subscribers {
    pub fn new(name: Arc<str>, options: NamespaceOptions) -> Subscribers {
        Subscribers {
            name,
            options,
            roster: Mutex::new(Roster {
                subscribers: HashMap::new(),
                removed: false,
            }),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Roster> {
        self.roster.lock().expect("channel lock")
    }
}

impl Roster {
    /// Queues one encoded frame to every subscriber; the sockets that were idle are added
    /// to `flush`, to be written once this lock is released.
    /// `tag`: the publication's, when its channel's `slow_consumer` policy lets a full queue
    /// drop or replace it.
    pub fn fan_out(&self, frame: &Bytes, tag: Option<&Arc<Tag>>, flush: &mut Flush) -> Fanout {
        let mut counts = Fanout::default();
        for sub in self.subscribers.values() {
            match sub.outbox.push_publication(frame.clone(), tag) {
                Push::Deferred => {
                    flush.add(&sub.outbox);
                    counts.queued += 1;
                }
                Push::Queued | Push::Written => counts.queued += 1,
                Push::Overflow => counts.overflowed += 1,
                Push::Closed => {}
            }
        }
        counts
    }
}
