//! The backend event stream and client rpc: what connections do, delivered to the backends
//! that joined a group on Control.Events.
//!
//! The hub emits connect, disconnect, subscribe and unsubscribe under its own lock, so a
//! client's events are numbered in the order its state changed; the session emits client
//! publishes and rpcs. [`Events::emit`] never waits: each group (`group::Group`, pure)
//! buffers the event and says which member gets it, and the member's bounded channel carries
//! it to its gRPC stream. The channel has room for the member's window, and a member never
//! holds more than its window, so `try_send` fails only when the stream is gone; rpcs travel
//! on a second channel of their own, so they can never take the events' room. A member
//! that is removed stops at once: its [`Signal`] makes its stream end (with the reason)
//! instead of handing out events already given to another member. `grpc::events` is the
//! thin shell on the wire. With `events_scope = "cluster"`, `relay` carries events through
//! Redis instead, so that a group receives every node's.

mod event;
mod group;
mod relay;
mod rpc;

use std::collections::HashMap;
use std::sync::atomic::{
    AtomicBool, AtomicU32,
    Ordering::{Acquire, Relaxed, Release},
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot, Notify};

pub use event::{Body, Delivery, EventKind, Joined, ToMember, What};
pub use group::MemberId;
use group::{Bounds, Group};
use relay::Relay;
pub use relay::{Acked, LocalGroup, RelayEnds, KINDS as RELAYED_KINDS};

use crate::config::{Config, EventsScope};

/// Set when a member is removed: its stream yields the reason (if any) and ends.
#[derive(Default)]
pub struct Signal {
    gone: AtomicBool,
    reason: Mutex<Option<EventsError>>,
}

impl Signal {
    fn set(&self, reason: Option<EventsError>) {
        *self.reason.lock().expect("signal lock") = reason;
        self.gone.store(true, Release);
    }

    /// None while the member is in its group; Some(reason) once removed (the reason once).
    pub fn gone(&self) -> Option<Option<EventsError>> {
        if !self.gone.load(Acquire) {
            return None;
        }
        Some(self.reason.lock().expect("signal lock").take())
    }
}

/// What the member's stream reads: its events, its rpcs, and whether it was removed.
pub struct Receivers {
    pub events: mpsc::Receiver<ToMember>,
    pub rpcs: mpsc::Receiver<Delivery>,
    pub signal: Arc<Signal>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventsError {
    #[error("the first request on the stream must be join")]
    JoinFirst,
    #[error("join was already sent on this stream")]
    JoinTwice,
    #[error("invalid join: {0}")]
    BadJoin(String),
    #[error("an event was held unacknowledged for longer than events_ack_timeout ({0:?}): rejoin to receive events again")]
    AckTimeout(Duration),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("too many event groups (events_max_groups is {0})")]
    TooManyGroups(usize),
}

/// How a backend answered an rpc.
#[derive(Debug)]
pub enum RpcAnswer {
    /// A JSON value.
    Data(Vec<u8>),
    Error {
        code: u32,
        message: String,
    },
    /// The member that received the rpc left before answering.
    Gone,
}

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("no backend answers rpc method {0:?}")]
    NoBackend(String),
}

/// Rpcs a member's rpc channel holds; a member whose rpc channel is full is skipped.
const RPC_SLOTS: usize = 64;

#[derive(Clone)]
pub struct Events {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<Registry>,
    /// Bits of the kinds some group wants: emitting an unwanted kind costs one load.
    wanted: AtomicU32,
    limits: Bounds,
    window: usize,
    max_groups: usize,
    node_id: Arc<str>,
    /// Woken by every acknowledgement, for the drain at shutdown.
    acked: Notify,
    /// With `events_scope = "cluster"`: the way to and from the cluster's shared streams.
    relay: Option<Relay>,
}

#[derive(Default)]
struct Registry {
    groups: HashMap<String, Group>,
    members: HashMap<MemberId, MemberHandle>,
    next_member: MemberId,
    rpcs: HashMap<String, PendingRpc>,
    closed: bool,
    /// Events sent to members, and dropped by full buffers, since the start (with the cluster
    /// scope, `Stats::lost` adds what the queue to Redis refused).
    delivered: u64,
    lost: u64,
}

/// What /metrics shows of the event stream.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub groups: usize,
    pub members: usize,
    pub buffered: usize,
    pub delivered: u64,
    pub lost: u64,
}

struct MemberHandle {
    group: String,
    /// Room for the joined message and the member's window.
    events: mpsc::Sender<ToMember>,
    rpcs: mpsc::Sender<Delivery>,
    signal: Arc<Signal>,
}

impl MemberHandle {
    /// Ends the member's stream with `reason` (or a clean end), even with events queued.
    fn stop(self, reason: Option<EventsError>) {
        self.signal.set(reason);
    }
}

struct PendingRpc {
    member: MemberId,
    answer: oneshot::Sender<RpcAnswer>,
}

/// A join, validated.
pub struct Join {
    pub group: String,
    pub kinds: u32,
    pub rpc_methods: Vec<String>,
    pub window: usize,
}

// === impl Events ===

impl Events {
    pub fn new(config: &Config, node_id: Arc<str>) -> Events {
        Events {
            inner: Arc::new(Inner {
                state: Mutex::new(Registry::default()),
                wanted: AtomicU32::new(0),
                limits: Bounds {
                    max_events: config.events_buffer,
                    max_bytes: config.events_buffer_bytes,
                    ack_timeout: config.events_ack_timeout,
                    ttl: config.events_group_ttl,
                },
                window: config.events_window,
                max_groups: config.events_max_groups,
                node_id,
                acked: Notify::new(),
                relay: (config.events_scope == EventsScope::Cluster)
                    .then(|| Relay::new(config.events_buffer)),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.inner.state.lock().expect("events lock")
    }

    /// True when some group receives this kind: callers skip building events nobody wants.
    pub fn wants(&self, kind: EventKind) -> bool {
        self.inner.wanted.load(Relaxed) & kind.bit() != 0
            || self.inner.relay.as_ref().is_some_and(|r| r.wants(kind))
    }

    /// Hands an event to every group that wants it. Never waits.
    pub fn emit(&self, client: &str, user: &str, what: What) {
        let Some(event_kind) = what.kind() else {
            return;
        };
        if !self.wants(event_kind) {
            return;
        }
        let body = Arc::new(Body {
            client: Arc::from(client),
            user: Arc::from(user),
            time_ms: unix_ms(),
            what,
        });
        if let Some(relay) = &self.inner.relay {
            relay.send(event_kind, body);
            return;
        }
        let now = Instant::now();
        let mut state = self.lock();
        let mut out = Vec::new();
        let mut lost = 0;
        for group in state.groups.values_mut() {
            if group.wants(event_kind) {
                let dropped = group.dropped();
                out.extend(group.push(body.clone(), now));
                lost += group.dropped() - dropped;
            }
        }
        state.lost += lost;
        if deliver(&mut state, out, now) {
            drop(state);
            self.inner.acked.notify_waiters();
        }
    }

    /// Adds a member to its group (created if new). The receiver yields `joined` first, then
    /// the group's events; it ends when the member is dropped or the server shuts down.
    pub fn join(&self, join: Join) -> Result<(MemberId, Receivers), EventsError> {
        let window = match join.window {
            0 => self.inner.window,
            w => w.min(self.inner.window),
        };
        let (events_tx, events) = mpsc::channel(window + 1);
        let (rpcs_tx, rpcs) = mpsc::channel(RPC_SLOTS);
        let signal = Arc::new(Signal::default());
        let now = Instant::now();
        let mut state = self.lock();
        if state.closed {
            return Err(EventsError::ShuttingDown);
        }
        if !state.groups.contains_key(&join.group) && state.groups.len() >= self.inner.max_groups {
            return Err(EventsError::TooManyGroups(self.inner.max_groups));
        }
        state.next_member += 1;
        let id = state.next_member;
        let resumed = state.groups.contains_key(&join.group);
        let limits = self.inner.limits;
        let group = state
            .groups
            .entry(join.group.clone())
            .or_insert_with(|| Group::new(limits, now));
        let buffered = group.buffered() as u64;
        let joined = ToMember::Joined(Joined {
            member: id,
            resumed,
            window,
            buffered,
            node_id: self.inner.node_id.to_string(),
        });
        events_tx.try_send(joined).expect("a new channel has room");
        let out = group.join(id, window, join.kinds, join.rpc_methods, now);
        state.members.insert(
            id,
            MemberHandle {
                group: join.group,
                events: events_tx,
                rpcs: rpcs_tx,
                signal: signal.clone(),
            },
        );
        self.update_wanted(&state);
        deliver(&mut state, out, now);
        drop(state);
        self.membership_changed();
        tracing::info!(member = id, "event stream member joined");
        Ok((
            id,
            Receivers {
                events,
                rpcs,
                signal,
            },
        ))
    }

    /// Acknowledges events of the member's group.
    pub fn ack(&self, member: MemberId, seqs: &[u64]) {
        let now = Instant::now();
        let mut state = self.lock();
        let Some(name) = state.members.get(&member).map(|m| m.group.clone()) else {
            return;
        };
        let out = match state.groups.get_mut(&name) {
            Some(group) => {
                if let Some(relay) = &self.inner.relay {
                    let held = seqs.iter().copied().filter(|s| group.holds(*s)).collect();
                    relay.acked(&name, held);
                }
                group.ack(seqs, now)
            }
            None => return,
        };
        deliver(&mut state, out, now);
        drop(state);
        self.inner.acked.notify_waiters();
    }

    /// Removes a member (its stream ended); idempotent.
    pub fn leave(&self, member: MemberId) {
        let now = Instant::now();
        let mut state = self.lock();
        remove_member(&mut state, member, None, now);
        drop(state);
        self.inner.acked.notify_waiters();
        self.membership_changed();
    }

    /// Ends a member's stream with `error`; its events go to the others.
    pub fn evict(&self, member: MemberId, error: EventsError) {
        let now = Instant::now();
        let mut state = self.lock();
        remove_member(&mut state, member, Some(error), now);
        drop(state);
        self.inner.acked.notify_waiters();
        self.membership_changed();
    }

    /// Drops members holding an event longer than events_ack_timeout, and forgets groups
    /// without a member for longer than events_group_ttl. Called every second.
    pub fn sweep(&self, now: Instant) {
        let mut state = self.lock();
        let overdue: Vec<MemberId> = state.groups.values().flat_map(|g| g.overdue(now)).collect();
        let dropped = !overdue.is_empty();
        for member in overdue {
            if let Some(handle) = state.members.get(&member) {
                tracing::warn!(
                    member,
                    group = %handle.group,
                    "event stream member dropped: no ack within events_ack_timeout"
                );
            }
            let error = EventsError::AckTimeout(self.inner.limits.ack_timeout);
            remove_member(&mut state, member, Some(error), now);
        }
        let before = state.groups.len();
        state.groups.retain(|name, g| {
            let keep = !g.expired(now);
            if !keep {
                tracing::info!(group = %name, buffered = g.buffered(), "event group forgotten after events_group_ttl");
            }
            keep
        });
        if state.groups.len() != before {
            self.update_wanted(&state);
        }
        drop(state);
        if dropped {
            self.inner.acked.notify_waiters();
            self.membership_changed();
        }
    }

    /// Waits until every group with a member has nothing unacknowledged (and, with the
    /// cluster scope, every event of this node's connections is in Redis), or until
    /// `deadline`.
    pub async fn drained(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            let acked = self.inner.acked.notified();
            tokio::pin!(acked);
            acked.as_mut().enable();
            let unsent = self.inner.relay.as_ref().map_or(0, Relay::unsent);
            let busy = unsent > 0
                || self
                    .lock()
                    .groups
                    .values()
                    .any(|g| g.has_members() && g.buffered() > 0);
            if !busy {
                return true;
            }
            if tokio::time::timeout_at(deadline, acked).await.is_err() {
                return false;
            }
        }
    }

    pub fn stats(&self) -> Stats {
        let state = self.lock();
        Stats {
            groups: state.groups.len(),
            members: state.members.len(),
            buffered: state.groups.values().map(Group::buffered).sum(),
            delivered: state.delivered,
            lost: state.lost + self.inner.relay.as_ref().map_or(0, Relay::refused),
        }
    }

    /// Ends every member's stream (shutdown); no join succeeds after this.
    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        for (_, handle) in state.members.drain() {
            handle.stop(Some(EventsError::ShuttingDown));
        }
        state.groups.clear();
        self.update_wanted(&state);
        for (_, rpc) in state.rpcs.drain() {
            let _ = rpc.answer.send(RpcAnswer::Gone);
        }
        drop(state);
        self.membership_changed();
    }

    /// Tells the cluster engine that local groups may have gained or lost their members.
    fn membership_changed(&self) {
        if let Some(relay) = &self.inner.relay {
            relay.changed();
        }
    }

    fn update_wanted(&self, state: &Registry) {
        let wanted = state.groups.values().fold(0, |acc, g| acc | g.kinds);
        self.inner.wanted.store(wanted, Relaxed);
    }
}

/// Sends each event to its member; a member whose stream is gone leaves, and its events go
/// to the others. True when a member was removed.
fn deliver(state: &mut Registry, mut out: group::Out, now: Instant) -> bool {
    let mut removed = false;
    while !out.is_empty() {
        let mut gone: Vec<MemberId> = Vec::new();
        for (member, event) in out.drain(..) {
            if gone.contains(&member) {
                continue;
            }
            let Some(handle) = state.members.get(&member) else {
                continue;
            };
            let response = ToMember::Event(event);
            // The channel has room for the member's window: this fails only when the
            // member's stream is gone.
            if handle.events.try_send(response).is_err() {
                gone.push(member);
            } else {
                state.delivered += 1;
            }
        }
        for member in gone {
            removed = true;
            out.extend(take_member(state, member, None, now));
        }
    }
    removed
}

fn remove_member(
    state: &mut Registry,
    member: MemberId,
    reason: Option<EventsError>,
    now: Instant,
) {
    let out = take_member(state, member, reason, now);
    deliver(state, out, now);
}

/// Removes a member: its stream ends, its rpcs fail at once, its events go back to the group.
fn take_member(
    state: &mut Registry,
    member: MemberId,
    reason: Option<EventsError>,
    now: Instant,
) -> group::Out {
    let Some(handle) = state.members.remove(&member) else {
        return Vec::new();
    };
    tracing::info!(member, group = %handle.group, "event stream member left");
    let group = handle.group.clone();
    handle.stop(reason);
    let rpcs: Vec<String> = state
        .rpcs
        .iter()
        .filter(|(_, p)| p.member == member)
        .map(|(id, _)| id.clone())
        .collect();
    for id in rpcs {
        if let Some(p) = state.rpcs.remove(&id) {
            let _ = p.answer.send(RpcAnswer::Gone);
        }
    }
    match state.groups.get_mut(&group) {
        Some(group) => group.leave(member, now),
        None => Vec::new(),
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
