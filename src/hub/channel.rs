//! One channel's subscribers and presence, behind the channel's own lock.
//!
//! The hub finds a [`Channel`] under its global lock, lets go of that lock, then takes this
//! one: publishers to different channels never wait for each other, and publishers to one
//! channel are serialized here, which gives every subscriber the same order. Whatever must
//! arrive before a subscription's first publication (the subscribe reply) is queued under
//! this lock too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use serde_json::value::RawValue;

use crate::config::NamespaceOptions;
use crate::outbox::{Flush, Outbox, Push};

pub type ClientId = Arc<str>;

pub struct Channel {
    pub name: Arc<str>,
    pub options: NamespaceOptions,
    state: Mutex<ChannelState>,
}

pub struct ChannelState {
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

// === impl Channel ===

impl Channel {
    pub fn new(name: Arc<str>, options: NamespaceOptions) -> Channel {
        Channel {
            name,
            options,
            state: Mutex::new(ChannelState {
                subscribers: HashMap::new(),
                removed: false,
            }),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, ChannelState> {
        self.state.lock().expect("channel lock")
    }
}

impl ChannelState {
    /// Queues one encoded frame to every subscriber except `skip`; the sockets that were
    /// idle are written by running the returned [`Flush`] once this lock is released.
    pub fn fan_out(&self, frame: &Bytes, skip: Option<&str>) -> (Fanout, Flush) {
        let mut counts = Fanout::default();
        let mut flush = Flush::default();
        for (id, sub) in &self.subscribers {
            if skip == Some(&**id) {
                continue;
            }
            match sub.outbox.push_later(frame.clone()) {
                Push::Deferred => {
                    flush.add(&sub.outbox);
                    counts.queued += 1;
                }
                Push::Queued | Push::Written => counts.queued += 1,
                Push::Overflow => counts.overflowed += 1,
                Push::Closed => {}
            }
        }
        (counts, flush)
    }
}
