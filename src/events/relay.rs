//! Events of the whole cluster (`events_scope = "cluster"`): the node hands what its
//! connections do to the engine instead of its own groups, and its groups receive the
//! cluster's events, numbered by the engine, while this node delivers them.
//!
//! [`Events::emit`] still never waits: it `try_send`s every event (rpcs aside) to a bounded
//! queue that the engine's writer empties into Redis, where the append keeps it for the
//! groups that want it; an event that does not fit the queue is counted by kind, and the
//! writer turns the counts into `lost` ranges in every group that wanted those kinds. What members
//! acknowledge goes back to the engine, which forgets it in Redis. The groups' rules (window,
//! per-client order on one member, redelivery when a member leaves, ack timeout) are the
//! ones in `group`; only the numbering and the buffer's bound move to Redis.

use std::sync::atomic::{
    AtomicU64, AtomicUsize,
    Ordering::{AcqRel, Acquire, Relaxed},
};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{mpsc, Notify};

use super::{deliver, Body, EventKind, Events};

/// Kinds of event the queue to Redis can count as dropped (every kind but rpc).
pub const KINDS: [EventKind; 5] = [
    EventKind::Connect,
    EventKind::Disconnect,
    EventKind::Subscribe,
    EventKind::Unsubscribe,
    EventKind::Publish,
];

pub(super) struct Relay {
    outgoing: mpsc::Sender<Arc<Body>>,
    /// Events the queue refused, by [`EventKind`] index, not yet reported to Redis.
    dropped: [AtomicU64; 6],
    /// Events queued and not yet in Redis.
    unsent: AtomicUsize,
    /// Events the queue refused since the start (for /metrics).
    refused: AtomicU64,
    acks: mpsc::UnboundedSender<Acked>,
    /// Woken when a local group gains its first member or loses its last.
    changed: Arc<Notify>,
    ends: Mutex<Option<RelayEnds>>,
}

/// What the engine takes once: the events to append, and the acknowledgements.
pub struct RelayEnds {
    pub outgoing: mpsc::Receiver<Arc<Body>>,
    pub acks: mpsc::UnboundedReceiver<Acked>,
    /// Woken when the local groups' members change.
    pub changed: Arc<Notify>,
}

/// Sequence numbers of one group its members acknowledged.
#[derive(Debug)]
pub struct Acked {
    pub group: String,
    pub seqs: Vec<u64>,
}

/// A local group, as the engine registers it.
#[derive(Debug, Clone)]
pub struct LocalGroup {
    pub name: String,
    pub kinds: u32,
    pub has_members: bool,
}

impl Relay {
    /// `queue`: how many events may wait for Redis.
    pub(super) fn new(queue: usize) -> Relay {
        let (outgoing, outgoing_rx) = mpsc::channel(queue.max(1));
        let (acks, acks_rx) = mpsc::unbounded_channel();
        let changed = Arc::new(Notify::new());
        Relay {
            outgoing,
            dropped: Default::default(),
            unsent: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            acks,
            changed: changed.clone(),
            ends: Mutex::new(Some(RelayEnds {
                outgoing: outgoing_rx,
                acks: acks_rx,
                changed,
            })),
        }
    }

    /// Every kind but rpc goes to Redis: only there is it known, at the moment of the
    /// append, which groups of the cluster exist and what they want (a node's own view of
    /// that would lag behind joins on other nodes, and events would be lost in the gap).
    pub(super) fn wants(&self, kind: EventKind) -> bool {
        kind != EventKind::Rpc
    }

    pub(super) fn send(&self, kind: EventKind, body: Arc<Body>) {
        self.unsent.fetch_add(1, AcqRel);
        if self.outgoing.try_send(body).is_err() {
            self.unsent.fetch_sub(1, AcqRel);
            self.dropped[kind as usize].fetch_add(1, Relaxed);
            self.refused.fetch_add(1, Relaxed);
        }
    }

    pub(super) fn acked(&self, group: &str, seqs: Vec<u64>) {
        if !seqs.is_empty() {
            let _ = self.acks.send(Acked {
                group: group.to_string(),
                seqs,
            });
        }
    }

    pub(super) fn changed(&self) {
        self.changed.notify_one();
    }

    pub(super) fn unsent(&self) -> usize {
        self.unsent.load(Acquire)
    }

    pub(super) fn refused(&self) -> u64 {
        self.refused.load(Relaxed)
    }
}

impl Events {
    fn relay(&self) -> &Relay {
        self.inner
            .relay
            .as_ref()
            .expect("relay calls come from the cluster engine")
    }

    /// The queue's receiving ends, for the engine (Some once, and only with the cluster
    /// scope).
    pub fn relay_take(&self) -> Option<RelayEnds> {
        self.inner
            .relay
            .as_ref()?
            .ends
            .lock()
            .expect("relay lock")
            .take()
    }

    /// Takes the counts of events dropped before reaching Redis, by [`KINDS`].
    pub fn relay_take_dropped(&self) -> [u64; 5] {
        KINDS.map(|k| self.relay().dropped[k as usize].swap(0, Relaxed))
    }

    /// `n` queued events are in Redis now.
    pub fn relay_appended(&self, n: usize) {
        self.relay().unsent.fetch_sub(n, AcqRel);
        self.inner.acked.notify_waiters();
    }

    /// The local groups: their names, kinds and whether members are joined here.
    pub fn relay_groups(&self) -> Vec<LocalGroup> {
        self.lock()
            .groups
            .iter()
            .map(|(name, g)| LocalGroup {
                name: name.clone(),
                kinds: g.kinds,
                has_members: g.has_members(),
            })
            .collect()
    }

    /// How many more events the local group can take from the shared stream; None when it
    /// has no member here.
    pub fn relay_room(&self, group: &str) -> Option<usize> {
        let state = self.lock();
        let g = state.groups.get(group).filter(|g| g.has_members())?;
        Some(g.room())
    }

    /// Hands events of the shared stream to the local group's members: `(seq, body,
    /// redelivered)`, in order. False when the group has no member here any more.
    pub fn relay_deliver(&self, group: &str, entries: Vec<(u64, Arc<Body>, bool)>) -> bool {
        let now = Instant::now();
        let mut state = self.lock();
        let Some(g) = state.groups.get_mut(group).filter(|g| g.has_members()) else {
            return false;
        };
        let out = g.relay(entries, now);
        if deliver(&mut state, out, now) {
            drop(state);
            self.inner.acked.notify_waiters();
        }
        true
    }

    /// This node no longer delivers the group's stream: forgets what it held of it (the node
    /// that delivers it next hands those events out again).
    pub fn relay_release(&self, group: &str) {
        if let Some(g) = self.lock().groups.get_mut(group) {
            g.clear();
        }
    }
}
