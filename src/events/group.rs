//! One event group: its buffer of unacknowledged events, its members, and which member gets
//! which event. Pure and synchronous: every method takes `now` and returns the events to send
//! as `(member, delivery)` pairs; `events::Events` owns the locks and the channels.
//!
//! The rules (docs/backend.md says the same to users):
//! - Every event the group wants gets the next sequence number and stays in the buffer until
//!   a member acknowledges it. The buffer is bounded in events and bytes; an event that does
//!   not fit is dropped, and so is every later one until acknowledgements make room for a
//!   `lost` event naming the range.
//! - A member holds at most `window` unacknowledged events.
//! - A client's events go to the member that holds its unacknowledged events, so they are
//!   handled in order; a client with none in flight goes to the member its id hashes to
//!   among those with room (rendezvous hashing, stable while the members stay the same).
//! - A member that leaves (or is dropped for holding an event longer than ack_timeout) gives
//!   back its unacknowledged events: they go to the others, in order, marked redelivered.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::event::{Body, Delivery, EventKind, What};

pub type MemberId = u64;

#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub max_events: usize,
    pub max_bytes: usize,
    pub ack_timeout: Duration,
    pub ttl: Duration,
}

struct Entry {
    body: Arc<Body>,
    size: usize,
    /// The member holding it unacknowledged, and since when.
    sent: Option<(MemberId, Instant)>,
    redelivered: bool,
}

struct Member {
    window: usize,
    in_flight: usize,
}

impl Member {
    fn room(&self) -> usize {
        self.window.saturating_sub(self.in_flight)
    }
}

pub type Out = Vec<(MemberId, Delivery)>;

pub struct Group {
    /// [`EventKind::bit`] of each kind the group receives.
    pub kinds: u32,
    /// With the rpc kind: method prefixes the group answers; empty for every method.
    pub rpc_methods: Vec<String>,
    limits: Bounds,
    next_seq: u64,
    buffer: BTreeMap<u64, Entry>,
    /// Buffered events not held by any member, in order.
    pending: BTreeSet<u64>,
    bytes: usize,
    members: BTreeMap<MemberId, Member>,
    /// Clients with events in flight: the member holding them, and how many.
    affinity: HashMap<Arc<str>, (MemberId, usize)>,
    /// Sequence numbers dropped since the last `lost` event.
    lost: Option<(u64, u64)>,
    /// Events dropped since the group was made.
    dropped: u64,
    /// Since when the group has had no member.
    empty_since: Option<Instant>,
}

// === impl Group ===

impl Group {
    pub fn new(limits: Bounds, now: Instant) -> Group {
        Group {
            kinds: 0,
            rpc_methods: Vec::new(),
            limits,
            next_seq: 1,
            buffer: BTreeMap::new(),
            pending: BTreeSet::new(),
            bytes: 0,
            members: BTreeMap::new(),
            affinity: HashMap::new(),
            lost: None,
            dropped: 0,
            empty_since: Some(now),
        }
    }

    pub fn wants(&self, kind: EventKind) -> bool {
        self.kinds & kind.bit() != 0
    }

    /// Adds a member; the latest join sets the group's kinds and rpc methods.
    pub fn join(
        &mut self,
        id: MemberId,
        window: usize,
        kinds: u32,
        rpc_methods: Vec<String>,
        now: Instant,
    ) -> Out {
        self.kinds = kinds;
        self.rpc_methods = rpc_methods;
        self.members.insert(
            id,
            Member {
                window,
                in_flight: 0,
            },
        );
        self.empty_since = None;
        self.pump(now)
    }

    /// Removes a member; its unacknowledged events go to the others.
    pub fn leave(&mut self, id: MemberId, now: Instant) -> Out {
        if self.members.remove(&id).is_none() {
            return Vec::new();
        }
        for (seq, entry) in &mut self.buffer {
            if entry.sent.is_some_and(|(m, _)| m == id) {
                entry.sent = None;
                entry.redelivered = true;
                self.pending.insert(*seq);
            }
        }
        self.affinity.retain(|_, (m, _)| *m != id);
        if self.members.is_empty() {
            self.empty_since = Some(now);
        }
        self.pump(now)
    }

    /// Buffers an event (or counts it lost when the buffer is full) and sends it if a member
    /// can take it. A push frees no room, so what was pending before still waits: only the
    /// new event is placed, which keeps emitting cheap.
    ///
    /// Once an event is dropped, every event is dropped until an acknowledgement makes room
    /// for the `lost` event (`ack`): so an overflow is one range, named by one `lost` event,
    /// even when the bound is in bytes and a smaller event would still fit.
    pub fn push(&mut self, body: Arc<Body>, now: Instant) -> Out {
        let seq = self.next_seq;
        self.next_seq += 1;
        let size = body.size();
        if self.lost.is_some() || !self.has_room(size) {
            self.dropped += 1;
            self.lost = Some(match self.lost {
                Some((first, _)) => (first, seq),
                None => (seq, seq),
            });
            return Vec::new();
        }
        self.insert(seq, body, size);
        self.place(seq, now, &mut HashSet::new())
            .into_iter()
            .collect()
    }

    /// Buffers events numbered elsewhere (a cluster's shared stream, which bounds them
    /// itself), in order and above every buffered number, and sends what members can take.
    pub fn relay(&mut self, entries: Vec<(u64, Arc<Body>, bool)>, now: Instant) -> Out {
        for (seq, body, redelivered) in entries {
            self.next_seq = self.next_seq.max(seq + 1);
            let size = body.size();
            self.insert(seq, body, size);
            if let Some(entry) = self.buffer.get_mut(&seq) {
                entry.redelivered = redelivered;
            }
        }
        self.pump(now)
    }

    /// Forgets every buffered event (another node now delivers the group's shared stream);
    /// the members stay.
    pub fn clear(&mut self) {
        self.buffer.clear();
        self.pending.clear();
        self.bytes = 0;
        self.affinity.clear();
        for member in self.members.values_mut() {
            member.in_flight = 0;
        }
    }

    /// Whether `seq` is buffered (not yet acknowledged).
    pub fn holds(&self, seq: u64) -> bool {
        self.buffer.contains_key(&seq)
    }

    /// How many more events the buffer's event bound allows.
    pub fn room(&self) -> usize {
        self.limits.max_events.saturating_sub(self.buffer.len())
    }

    /// Forgets acknowledged events, whoever held them.
    pub fn ack(&mut self, seqs: &[u64], now: Instant) -> Out {
        for seq in seqs {
            let Some(entry) = self.buffer.remove(seq) else {
                continue;
            };
            self.bytes -= entry.size;
            self.pending.remove(seq);
            if let Some((m, _)) = entry.sent {
                if let Some(member) = self.members.get_mut(&m) {
                    member.in_flight -= 1;
                }
                if let Some((_, count)) = self.affinity.get_mut(&entry.body.client) {
                    *count -= 1;
                    if *count == 0 {
                        self.affinity.remove(&entry.body.client);
                    }
                }
            }
        }
        self.report_lost();
        self.pump(now)
    }

    /// Members holding an event unacknowledged for longer than ack_timeout.
    pub fn overdue(&self, now: Instant) -> Vec<MemberId> {
        let mut out: Vec<MemberId> = self
            .buffer
            .values()
            .filter_map(|e| e.sent)
            .filter(|(_, since)| now.duration_since(*since) >= self.limits.ack_timeout)
            .map(|(m, _)| m)
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// No member for longer than the group's ttl: the group may be forgotten.
    pub fn expired(&self, now: Instant) -> bool {
        self.empty_since
            .is_some_and(|since| now.duration_since(since) >= self.limits.ttl)
    }

    pub fn has_members(&self) -> bool {
        !self.members.is_empty()
    }

    /// Events dropped because the buffer was full, since the group was made.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Events buffered: unacknowledged or not yet sent.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// The members in the order an rpc from `client` tries them.
    pub fn rpc_order(&self, client: &str) -> Vec<MemberId> {
        let mut members: Vec<MemberId> = self.members.keys().copied().collect();
        members.sort_by_key(|m| std::cmp::Reverse(score(client, *m)));
        members
    }

    fn has_room(&self, size: usize) -> bool {
        self.buffer.len() < self.limits.max_events && self.bytes + size <= self.limits.max_bytes
    }

    fn insert(&mut self, seq: u64, body: Arc<Body>, size: usize) {
        self.bytes += size;
        self.buffer.insert(
            seq,
            Entry {
                body,
                size,
                sent: None,
                redelivered: false,
            },
        );
        self.pending.insert(seq);
    }

    /// Turns a range of dropped events into a `lost` event, once there is room for it; returns
    /// its sequence number.
    fn report_lost(&mut self) -> Option<u64> {
        let (first, last) = self.lost?;
        let body = Arc::new(Body {
            client: Arc::from(""),
            user: Arc::from(""),
            time_ms: crate::events::unix_ms(),
            what: What::Lost {
                first_seq: first,
                last_seq: last,
            },
        });
        let size = body.size();
        if !self.has_room(size) {
            return None;
        }
        self.lost = None;
        let seq = self.next_seq;
        self.next_seq += 1;
        self.insert(seq, body, size);
        Some(seq)
    }

    /// Sends pending events, in order, to members with room (after acks, joins and leaves:
    /// what frees room).
    fn pump(&mut self, now: Instant) -> Out {
        let mut out = Vec::new();
        let mut blocked: HashSet<Arc<str>> = HashSet::new();
        let pending: Vec<u64> = self.pending.iter().copied().collect();
        for seq in pending {
            if !self.members.values().any(|m| m.room() > 0) {
                break;
            }
            out.extend(self.place(seq, now, &mut blocked));
        }
        out
    }

    /// Sends one pending event if a member can take it; a client whose event waits is added
    /// to `blocked`, so its later events wait too.
    fn place(
        &mut self,
        seq: u64,
        now: Instant,
        blocked: &mut HashSet<Arc<str>>,
    ) -> Option<(MemberId, Delivery)> {
        let entry = self
            .buffer
            .get_mut(&seq)
            .expect("pending events are buffered");
        let client = entry.body.client.clone();
        let target = if client.is_empty() {
            self.members
                .iter()
                .filter(|(_, m)| m.room() > 0)
                .max_by_key(|(_, m)| m.room())
                .map(|(id, _)| *id)
        } else if blocked.contains(&client) {
            None
        } else if let Some((m, _)) = self.affinity.get(&client) {
            // Behind its earlier events, on the member that holds them.
            Some(*m).filter(|m| self.members[m].room() > 0)
        } else {
            self.members
                .iter()
                .filter(|(_, m)| m.room() > 0)
                .max_by_key(|(id, _)| score(&client, **id))
                .map(|(id, _)| *id)
        };
        let Some(target) = target else {
            if !client.is_empty() {
                blocked.insert(client);
            }
            return None;
        };
        entry.sent = Some((target, now));
        self.members
            .get_mut(&target)
            .expect("chosen among members")
            .in_flight += 1;
        if !client.is_empty() {
            self.affinity.entry(client).or_insert((target, 0)).1 += 1;
        }
        self.pending.remove(&seq);
        Some((target, event(seq, entry)))
    }
}

fn event(seq: u64, entry: &Entry) -> Delivery {
    Delivery {
        seq,
        redelivered: entry.redelivered,
        body: entry.body.clone(),
    }
}

/// Rendezvous hashing: the member with the highest score for a client gets it.
fn score(client: &str, member: MemberId) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    client.hash(&mut hasher);
    member.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: Bounds = Bounds {
        max_events: 100,
        max_bytes: 1 << 20,
        ack_timeout: Duration::from_secs(30),
        ttl: Duration::from_secs(600),
    };

    fn body(client: &str) -> Arc<Body> {
        Arc::new(Body {
            client: Arc::from(client),
            user: Arc::from("u"),
            time_ms: 0,
            what: What::Subscribe {
                channel: "c".into(),
                server_side: false,
            },
        })
    }

    fn seqs(out: &Out, member: MemberId) -> Vec<u64> {
        out.iter()
            .filter(|(m, _)| *m == member)
            .map(|(_, e)| e.seq)
            .collect()
    }

    #[test]
    fn window_bounds_what_a_member_holds_and_acks_release_the_rest() {
        let t = Instant::now();
        let mut g = Group::new(BOUNDS, t);
        assert!(g.join(1, 2, 0, Vec::new(), t).is_empty());
        let mut sent = Vec::new();
        for _ in 0..5 {
            sent.extend(seqs(&g.push(body("a"), t), 1));
        }
        assert_eq!(sent, [1, 2], "window of 2");
        assert_eq!(g.buffered(), 5);
        assert_eq!(seqs(&g.ack(&[1, 2, 99], t), 1), [3, 4]);
        assert_eq!(seqs(&g.ack(&[3], t), 1), [5]);
    }

    #[test]
    fn a_leaving_member_gives_its_events_to_another_in_order() {
        let t = Instant::now();
        let mut g = Group::new(BOUNDS, t);
        g.join(1, 10, 0, Vec::new(), t);
        for _ in 0..3 {
            g.push(body("a"), t);
        }
        // The second member gets nothing of client a while member 1 holds a's events.
        g.join(2, 10, 0, Vec::new(), t);
        assert_eq!(seqs(&g.push(body("a"), t), 1), [4]);
        let out = g.leave(1, t);
        assert_eq!(seqs(&out, 2), [1, 2, 3, 4]);
        assert!(out.iter().all(|(_, e)| e.redelivered));
    }

    #[test]
    fn a_full_member_holds_back_its_clients_only() {
        let t = Instant::now();
        let mut g = Group::new(BOUNDS, t);
        g.join(1, 1, 0, Vec::new(), t);
        g.join(2, 100, 0, Vec::new(), t);
        // Clients that prefer member 1 (a, c) and member 2 (b).
        let prefer = |m| -> Vec<String> {
            (0..100)
                .map(|i| format!("c{i}"))
                .filter(|c| g.rpc_order(c)[0] == m)
                .collect()
        };
        let (ones, twos) = (prefer(1), prefer(2));
        let (a, b, c) = (ones[0].clone(), twos[0].clone(), ones[1].clone());
        assert_eq!(seqs(&g.push(body(&a), t), 1), [1]);
        // Member 1 is full: a's next event waits for it, b's goes to member 2.
        assert!(g.push(body(&a), t).is_empty());
        assert_eq!(seqs(&g.push(body(&b), t), 2), [3]);
        // A client that would go to member 1 goes to the member with room.
        assert_eq!(seqs(&g.push(body(&c), t), 2), [4]);
        assert_eq!(g.overdue(t + Duration::from_secs(31)), vec![1, 2]);
        assert_eq!(seqs(&g.ack(&[1], t), 1), [2]);
    }

    #[test]
    fn overflow_is_reported_with_the_range_once_there_is_room() {
        let t = Instant::now();
        let limits = Bounds {
            max_events: 3,
            ..BOUNDS
        };
        let mut g = Group::new(limits, t);
        for _ in 0..6 {
            g.push(body("a"), t);
        }
        assert_eq!(g.buffered(), 3);
        let out = g.join(1, 10, 0, Vec::new(), t);
        assert_eq!(seqs(&out, 1), [1, 2, 3]);
        let out = g.ack(&[1, 2, 3], t);
        assert_eq!(out.len(), 1);
        let (_, lost) = &out[0];
        assert_eq!(lost.seq, 7);
        assert_eq!(
            lost.body.what,
            What::Lost {
                first_seq: 4,
                last_seq: 6
            }
        );
        assert_eq!(seqs(&g.push(body("a"), t), 1), [8]);
    }

    /// Bounded by bytes: small events would still fit after a large one is dropped, but the
    /// overflow stays one range until acknowledgements make room, so one `lost` event names
    /// it, and nothing that was kept is ever named lost.
    #[test]
    fn a_byte_bounded_overflow_is_one_range_reported_after_acks() {
        let t = Instant::now();
        let limits = Bounds {
            max_bytes: 10_000,
            ..BOUNDS
        };
        let publish = |n: usize| {
            Arc::new(Body {
                client: Arc::from("a"),
                user: Arc::from("u"),
                time_ms: 0,
                what: What::Publish {
                    channel: "c".into(),
                    data: vec![b'1'; n],
                    offset: 0,
                    epoch: String::new(),
                },
            })
        };
        let mut g = Group::new(limits, t);
        g.join(1, 1000, 0, Vec::new(), t);
        let mut delivered = Vec::new();
        for i in 0..60 {
            let size = if i % 2 == 0 { 2000 } else { 1 };
            delivered.extend(g.push(publish(size), t));
        }
        let losts = |out: &Out| -> Vec<(u64, u64)> {
            out.iter()
                .filter_map(|(_, e)| match e.body.what {
                    What::Lost {
                        first_seq,
                        last_seq,
                    } => Some((first_seq, last_seq)),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(
            losts(&delivered),
            [],
            "no lost event before an acknowledgement"
        );
        let kept: Vec<u64> = delivered.iter().map(|(_, e)| e.seq).collect();
        let out = g.ack(&kept, t);
        let reported = losts(&out);
        assert_eq!(reported.len(), 1, "{reported:?}");
        let (first, last) = reported[0];
        assert_eq!(first, *kept.last().unwrap() + 1);
        assert_eq!(last, 60);
        assert_eq!(g.dropped(), last - first + 1);
    }

    #[test]
    fn a_group_without_members_expires_after_its_ttl() {
        let t = Instant::now();
        let mut g = Group::new(BOUNDS, t);
        g.join(1, 10, 0, Vec::new(), t);
        assert!(!g.expired(t + Duration::from_secs(3600)));
        g.leave(1, t);
        assert!(!g.expired(t + Duration::from_secs(599)));
        assert!(g.expired(t + Duration::from_secs(600)));
    }

    #[test]
    fn relayed_events_keep_their_numbers_and_a_clear_hands_nothing_back() {
        let t = Instant::now();
        let mut g = Group::new(BOUNDS, t);
        g.join(1, 2, 0, Vec::new(), t);
        let out = g.relay(
            vec![
                (7, body("a"), true),
                (9, body("a"), false),
                (12, body("b"), false),
            ],
            t,
        );
        let sent: Vec<(u64, bool)> = out.iter().map(|(_, e)| (e.seq, e.redelivered)).collect();
        assert_eq!(sent, [(7, true), (9, false)], "numbers kept, window of 2");
        assert!(g.holds(12) && !g.holds(8));
        assert_eq!(g.room(), BOUNDS.max_events - 3);
        assert_eq!(seqs(&g.ack(&[7], t), 1), [12]);
        // Another node delivers the group now: nothing held here is sent again, and the
        // member has its whole window for what comes next.
        g.clear();
        assert_eq!(g.buffered(), 0);
        assert!(g.ack(&[9, 12], t).is_empty());
        let out = g.relay(vec![(13, body("a"), false), (14, body("b"), false)], t);
        assert_eq!(seqs(&out, 1), [13, 14]);
    }
}
