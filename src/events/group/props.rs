//! Property tests of the event group: arbitrary joins, leaves, events and acknowledgements
//! against a model of what each member holds, then everyone acknowledges everything. Every
//! event is delivered at least once or named by a `lost` event, never both; no member holds
//! more than its window; a client's events are held by one member at a time and first sent
//! in order; what a departed member held comes back, marked redelivered; an acknowledged
//! event is never sent again; the buffer stays within its bounds.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;

#[derive(Debug, Clone)]
enum Op {
    /// A new member with this window.
    Join(usize),
    /// The member at this index (of those present) leaves.
    Leave(usize),
    /// An event of client `c{0}` with `{1}` bytes of data.
    Push(u8, usize),
    /// The member at this index acknowledges its `{1}` oldest events.
    Ack(usize, usize),
    /// An event acknowledged before is acknowledged again.
    AckAgain,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (1usize..5).prop_map(Op::Join),
        1 => (0usize..4).prop_map(Op::Leave),
        6 => (0u8..5, 0usize..400).prop_map(|(c, n)| Op::Push(c, n)),
        4 => (0usize..4, 0usize..5).prop_map(|(m, n)| Op::Ack(m, n)),
        1 => Just(Op::AckAgain),
    ]
}

/// What the test knows from the group's answers alone.
#[derive(Default)]
struct Model {
    /// Members present: window and the sequence numbers they hold, oldest first.
    members: BTreeMap<MemberId, (usize, Vec<u64>)>,
    next_member: MemberId,
    /// Events (not `lost` ones) delivered at least once, with their client.
    delivered: BTreeMap<u64, Arc<str>>,
    /// Held by a member that left, not acknowledged since: each must come back redelivered.
    returned: BTreeSet<u64>,
    acked: BTreeSet<u64>,
    /// Ranges named by `lost` events, and their own sequence numbers.
    lost: Vec<(u64, u64)>,
    lost_events: BTreeSet<u64>,
    /// Per client, the last sequence number sent for the first time.
    first_sends: BTreeMap<Arc<str>, u64>,
    pushes: u64,
}

impl Model {
    fn member(&self, index: usize) -> Option<MemberId> {
        self.members
            .keys()
            .nth(index % self.members.len().max(1))
            .copied()
    }

    /// Takes in what the group sent; checks each delivery against what came before.
    fn sent(&mut self, out: Out) -> Result<(), TestCaseError> {
        for (member, delivery) in out {
            let seq = delivery.seq;
            prop_assert!(!self.acked.contains(&seq), "acknowledged {seq} sent again");
            let (window, held) = self
                .members
                .get_mut(&member)
                .ok_or_else(|| TestCaseError::fail(format!("{seq} sent to absent {member}")))?;
            held.push(seq);
            prop_assert!(held.len() <= *window, "member {member} over its window");
            if let What::Lost {
                first_seq,
                last_seq,
            } = delivery.body.what
            {
                if self.lost_events.insert(seq) {
                    self.lost.push((first_seq, last_seq));
                }
                continue;
            }
            let client = delivery.body.client.clone();
            if delivery.redelivered {
                prop_assert!(
                    self.returned.remove(&seq),
                    "{seq} redelivered, not held by a departed member"
                );
            } else {
                prop_assert!(
                    self.delivered.insert(seq, client.clone()).is_none(),
                    "{seq} sent twice without being redelivered"
                );
                let last = self.first_sends.insert(client.clone(), seq).unwrap_or(0);
                prop_assert!(last < seq, "client {client}: {seq} after {last}");
            }
            // A client's unacknowledged events are all on one member.
            let holders = self
                .members
                .iter()
                .filter(|(_, (_, held))| {
                    held.iter()
                        .any(|s| self.delivered.get(s).is_some_and(|c| *c == client))
                })
                .count();
            prop_assert!(holders <= 1, "client {client} held by {holders} members");
        }
        Ok(())
    }

    fn acks(&mut self, member: MemberId, seqs: &[u64]) {
        let (_, held) = self.members.get_mut(&member).expect("present");
        held.retain(|s| !seqs.contains(s));
        self.acked.extend(seqs);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_event_is_delivered_or_reported_lost(
        max_events in 1usize..10,
        max_bytes in 200usize..3000,
        ops in proptest::collection::vec(op(), 1..120),
    ) {
        let t = Instant::now();
        let bounds = Bounds {
            max_events,
            max_bytes,
            ack_timeout: Duration::from_secs(30),
            ttl: Duration::from_secs(600),
        };
        let mut g = Group::new(bounds, t);
        let mut m = Model::default();
        for op in ops {
            match op {
                Op::Join(window) => {
                    m.next_member += 1;
                    let id = m.next_member;
                    m.members.insert(id, (window, Vec::new()));
                    m.sent(g.join(id, window, 0, Vec::new(), t))?;
                }
                Op::Leave(index) => {
                    let Some(id) = m.member(index) else { continue };
                    let (_, held) = m.members.remove(&id).expect("present");
                    m.returned.extend(held.iter().filter(|s| !m.lost_events.contains(s)));
                    m.sent(g.leave(id, t))?;
                }
                Op::Push(client, bytes) => {
                    m.pushes += 1;
                    let body = Arc::new(Body {
                        client: Arc::from(format!("c{client}")),
                        user: Arc::from("u"),
                        time_ms: 0,
                        what: What::Publish {
                            channel: "c".into(),
                            data: vec![b'1'; bytes],
                            offset: 0,
                            epoch: String::new(),
                        },
                    });
                    m.sent(g.push(body, t))?;
                }
                Op::Ack(index, n) => {
                    let Some(id) = m.member(index) else { continue };
                    let seqs: Vec<u64> = m.members[&id].1.iter().take(n).copied().collect();
                    m.acks(id, &seqs);
                    m.sent(g.ack(&seqs, t))?;
                }
                Op::AckAgain => {
                    let Some(seq) = m.acked.first().copied() else { continue };
                    m.sent(g.ack(&[seq], t))?;
                }
            }
            prop_assert!(g.buffered() <= max_events);
            prop_assert!(g.bytes <= max_bytes);
        }

        // Everyone acknowledges everything, with a member that has room for it all.
        m.next_member += 1;
        let last = m.next_member;
        m.members.insert(last, (usize::MAX, Vec::new()));
        m.sent(g.join(last, usize::MAX, 0, Vec::new(), t))?;
        loop {
            let held: Vec<(MemberId, Vec<u64>)> = m
                .members
                .iter()
                .map(|(id, (_, held))| (*id, held.clone()))
                .collect();
            for (id, seqs) in held {
                m.acks(id, &seqs);
                m.sent(g.ack(&seqs, t))?;
            }
            if m.members.values().all(|(_, held)| held.is_empty()) {
                break;
            }
        }
        prop_assert_eq!(g.buffered(), 0);
        prop_assert!(m.returned.is_empty(), "never redelivered: {:?}", m.returned);

        // Each pushed event was delivered or named lost, never both.
        let mut named = BTreeSet::new();
        for (first, last) in &m.lost {
            for seq in *first..=*last {
                prop_assert!(named.insert(seq), "{seq} named lost twice");
                prop_assert!(!m.delivered.contains_key(&seq), "{seq} delivered and named lost");
            }
        }
        prop_assert_eq!(named.len() as u64, g.dropped());
        prop_assert_eq!(m.delivered.len() as u64 + g.dropped(), m.pushes);
        let numbered = m.delivered.len() + named.len() + m.lost_events.len();
        let seen: BTreeSet<u64> = m
            .delivered
            .keys()
            .chain(&named)
            .chain(&m.lost_events)
            .copied()
            .collect();
        prop_assert_eq!(seen.len(), numbered);
        prop_assert_eq!(seen.last().copied().unwrap_or(0), numbered as u64, "numbered without gaps");
    }
}
