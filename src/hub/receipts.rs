//! Delivery receipts: for each publication of a `receipts` channel, how many of this node's
//! subscribers were given it (live or recovered), how many acknowledged it by its deadline,
//! and which users did not. A pure structure driven with `now`, kept behind one lock in the
//! hub; that lock is a leaf (nothing else is locked while it is held).
//!
//! A client acknowledges cumulatively (`ack` with a channel and an offset: every publication
//! of the channel up to that offset is handled), so a subscription needs only its first
//! offset and its last acknowledged one. A tally is frozen once its deadline has passed: its
//! list of users who did not acknowledge is made then, before any later acknowledgement.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::wire::TraceId;

/// The most users a receipt names; the rest are counted.
pub const MISSING_LISTED: usize = 100;

/// What a node answers about one publication.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// Deliveries of the publication (to subscriptions here, live or recovered).
    pub delivered: u32,
    /// Of those, acknowledged by the deadline.
    pub acknowledged: u32,
    /// Users with a delivery not acknowledged (by the deadline, once it has passed); at
    /// most [`MISSING_LISTED`], each once.
    pub missing: Vec<String>,
    /// Missing deliveries beyond the list.
    pub missing_more: u32,
    /// The deadline has passed: the counts are final.
    pub complete: bool,
    /// The trace id the publication carried (a Publish's `traceparent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

impl Receipt {
    /// Adds another node's receipt of the same publication.
    pub fn merge(&mut self, other: Receipt) {
        self.delivered += other.delivered;
        self.acknowledged += other.acknowledged;
        self.complete &= other.complete;
        for user in other.missing {
            if self.missing.contains(&user) {
                continue;
            }
            if self.missing.len() < MISSING_LISTED {
                self.missing.push(user);
            } else {
                self.missing_more += 1;
            }
        }
        self.missing_more += other.missing_more;
        if self.trace_id.is_none() {
            self.trace_id = other.trace_id;
        }
    }
}

pub struct Receipts {
    channels: HashMap<Arc<str>, Channel>,
    /// Every tally by when it expires (then by a sequence number), for expiry and the
    /// bound: deadlines differ per publication, so offsets do not tell.
    order: BTreeMap<(Instant, u64), (Arc<str>, u64)>,
    sequence: u64,
    max: usize,
}

#[derive(Default)]
struct Channel {
    tallies: BTreeMap<u64, Tally>,
    readers: HashMap<Arc<str>, Reader>,
    /// The tallies not frozen yet, by deadline.
    due: BTreeSet<(Instant, u64)>,
}

struct Reader {
    user: Arc<str>,
    /// The first offset this subscription was given.
    from: u64,
    /// Every offset up to this one is acknowledged.
    acked: u64,
    /// The newest offset it was given by a recovery (0: none).
    recovered: u64,
}

struct Tally {
    deadline: Instant,
    delivered: u32,
    acked: u32,
    /// Users whose delivery was not acknowledged: those who left before acknowledging, then
    /// (when frozen) every reader still behind.
    missing: Vec<Arc<str>>,
    missing_more: u32,
    frozen: bool,
    /// Its key in `Receipts::order`.
    order: (Instant, u64),
    trace: Option<TraceId>,
}

impl Receipts {
    /// At most `max` publications tallied at once: past it the oldest is forgotten.
    pub fn new(max: usize) -> Receipts {
        Receipts {
            channels: HashMap::new(),
            order: BTreeMap::new(),
            sequence: 0,
            max,
        }
    }

    /// How many publications are tallied.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// A publication is about to be delivered here: its tally starts, with a deadline of
    /// `now + timeout`, and stays queryable for another `timeout`. Returns how many tallies
    /// were forgotten to stay within the bound.
    pub fn published(
        &mut self,
        channel: &str,
        offset: u64,
        now: Instant,
        timeout: Duration,
        trace: Option<TraceId>,
    ) -> usize {
        self.expire(now);
        let name: Arc<str> = match self.channels.get_key_value(channel) {
            Some((name, _)) => name.clone(),
            None => Arc::from(channel),
        };
        self.sequence += 1;
        let order = (now + timeout * 2, self.sequence);
        let tally = Tally {
            deadline: now + timeout,
            delivered: 0,
            acked: 0,
            missing: Vec::new(),
            missing_more: 0,
            frozen: false,
            order,
            trace,
        };
        let entry = self.channels.entry(name.clone()).or_default();
        entry.due.insert((tally.deadline, offset));
        // The same offset again: a new epoch of the channel replaces the old tally.
        if let Some(old) = entry.tallies.insert(offset, tally) {
            entry.due.remove(&(old.deadline, offset));
            self.order.remove(&old.order);
        }
        self.order.insert(order, (name, offset));
        let mut forgotten = 0;
        while self.order.len() > self.max {
            self.forget_first();
            forgotten += 1;
        }
        forgotten
    }

    /// The publication went to `count` subscriptions here.
    pub fn delivered(&mut self, channel: &str, offset: u64, count: u32) {
        if let Some(tally) = self.tally_mut(channel, offset) {
            tally.delivered += count;
        }
    }

    /// A subscription starts reading `channel` from offset `from`; `recovered` are the
    /// offsets it was given at once, from history.
    pub fn reading(
        &mut self,
        client: &Arc<str>,
        user: &Arc<str>,
        channel: &str,
        from: u64,
        recovered: impl Iterator<Item = u64>,
        now: Instant,
    ) {
        let name = match self.channels.get_key_value(channel) {
            Some((name, _)) => name.clone(),
            None => Arc::from(channel),
        };
        let entry = self.channels.entry(name).or_default();
        freeze_due(entry, now);
        let mut newest = 0;
        for offset in recovered {
            newest = newest.max(offset);
            if let Some(tally) = entry.tallies.get_mut(&offset) {
                if !tally.frozen {
                    tally.delivered += 1;
                }
            }
        }
        // From 0: an acknowledgement the client could not send on its previous connection
        // (of a publication before `from`) still counts for a user listed missing.
        let reader = Reader {
            user: user.clone(),
            from,
            acked: 0,
            recovered: newest,
        };
        entry.readers.insert(client.clone(), reader);
    }

    /// The subscription acknowledges every publication of `channel` up to `offset`; false
    /// when it is not a reader of the channel.
    pub fn ack(&mut self, client: &str, channel: &str, offset: u64, now: Instant) -> bool {
        let Some(entry) = self.channels.get_mut(channel) else {
            return false;
        };
        freeze_due(entry, now);
        let Some(reader) = entry.readers.get_mut(client) else {
            return false;
        };
        // Nothing above the newest tally can be counted yet: a client acknowledging ahead
        // (up to u64::MAX) moves no further than that.
        let newest = entry.tallies.keys().next_back().copied().unwrap_or(0);
        let offset = offset.min(newest);
        if offset <= reader.acked {
            return true;
        }
        let start = reader.acked + 1;
        reader.acked = offset;
        let user = reader.user.clone();
        let (from, recovered) = (reader.from, reader.recovered);
        for (&at, tally) in entry.tallies.range_mut(start..=offset) {
            if tally.frozen {
                continue;
            }
            // A user who left (another connection) before acknowledging, and now
            // acknowledges what came back to them: before `from` (what the old connection
            // could not carry), or in this subscription's recovery.
            let owed = at < from || at <= recovered;
            let returned = owed
                .then(|| tally.missing.iter().position(|u| *u == user))
                .flatten();
            if let Some(i) = returned {
                tally.missing.swap_remove(i);
            }
            // Before `from` this subscription was not given it: it counts only for its user.
            if at >= from || returned.is_some() {
                tally.acked += 1;
            }
        }
        true
    }

    /// The subscription ended: what it was given and did not acknowledge is missing.
    pub fn left(&mut self, client: &str, channel: &str, now: Instant) {
        let Some(entry) = self.channels.get_mut(channel) else {
            return;
        };
        freeze_due(entry, now);
        let Some(reader) = entry.readers.remove(client) else {
            return;
        };
        let start = reader
            .acked
            .max(reader.from.saturating_sub(1))
            .saturating_add(1);
        for (_, tally) in entry.tallies.range_mut(start..) {
            if !tally.frozen {
                add_missing(tally, &reader.user);
            }
        }
        if entry.readers.is_empty() && entry.tallies.is_empty() {
            self.channels.remove(channel);
        }
    }

    /// What this node knows of a publication, if it tallied it.
    pub fn receipt(&mut self, channel: &str, offset: u64, now: Instant) -> Option<Receipt> {
        let entry = self.channels.get_mut(channel)?;
        freeze_due(entry, now);
        let tally = entry.tallies.get(&offset)?;
        let mut missing: Vec<String> = tally.missing.iter().map(|u| u.to_string()).collect();
        let mut missing_more = tally.missing_more;
        if !tally.frozen {
            for reader in entry.readers.values() {
                if reader.from <= offset && reader.acked < offset {
                    push_listed(&mut missing, &mut missing_more, &reader.user);
                }
            }
        }
        Some(Receipt {
            delivered: tally.delivered,
            acknowledged: tally.acked,
            missing,
            missing_more,
            complete: tally.frozen,
            trace_id: tally.trace.map(|t| t.to_string()),
        })
    }

    /// Forgets what expired.
    pub fn expire(&mut self, now: Instant) {
        while self
            .order
            .first_key_value()
            .is_some_and(|((expires, _), _)| *expires <= now)
        {
            self.forget_first();
        }
    }

    /// Forgets the tally that expires first.
    fn forget_first(&mut self) {
        let Some((_, (channel, offset))) = self.order.pop_first() else {
            return;
        };
        if let Some(entry) = self.channels.get_mut(&channel) {
            if let Some(tally) = entry.tallies.remove(&offset) {
                entry.due.remove(&(tally.deadline, offset));
            }
            if entry.readers.is_empty() && entry.tallies.is_empty() {
                self.channels.remove(&channel);
            }
        }
    }

    fn tally_mut(&mut self, channel: &str, offset: u64) -> Option<&mut Tally> {
        self.channels.get_mut(channel)?.tallies.get_mut(&offset)
    }
}

/// Freezes the tallies whose deadline has passed: who did not acknowledge is decided now.
fn freeze_due(entry: &mut Channel, now: Instant) {
    let Channel {
        tallies,
        readers,
        due,
    } = entry;
    while let Some(&(deadline, offset)) = due.first() {
        if deadline > now {
            break;
        }
        due.pop_first();
        let Some(tally) = tallies.get_mut(&offset) else {
            continue;
        };
        tally.frozen = true;
        if tally.acked >= tally.delivered && tally.missing.is_empty() {
            continue;
        }
        for reader in readers.values() {
            if reader.from <= offset && reader.acked < offset {
                add_missing(tally, &reader.user);
            }
        }
    }
}

fn add_missing(tally: &mut Tally, user: &Arc<str>) {
    if tally.missing.contains(user) {
        return;
    }
    if tally.missing.len() < MISSING_LISTED {
        tally.missing.push(user.clone());
    } else {
        tally.missing_more += 1;
    }
}

fn push_listed(missing: &mut Vec<String>, more: &mut u32, user: &str) {
    if missing.iter().any(|u| u == user) {
        return;
    }
    if missing.len() < MISSING_LISTED {
        missing.push(user.to_string());
    } else {
        *more += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arc(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    const T: Duration = Duration::from_secs(10);

    #[test]
    fn acknowledgements_count_by_the_deadline_and_name_who_did_not() {
        let t0 = Instant::now();
        let mut r = Receipts::new(100);
        for (client, user) in [("c1", "ann"), ("c2", "bob"), ("c3", "cy")] {
            r.reading(&arc(client), &arc(user), "ch", 1, std::iter::empty(), t0);
        }
        r.published("ch", 1, t0, T, None);
        r.delivered("ch", 1, 3);
        r.published("ch", 2, t0, T, None);
        r.delivered("ch", 2, 3);
        // ann handled both at once; bob only the first; cy nothing, then leaves.
        assert!(r.ack("c1", "ch", 2, t0));
        assert!(r.ack("c2", "ch", 1, t0));
        r.left("c3", "ch", t0);
        let open = r.receipt("ch", 2, t0).unwrap();
        assert_eq!(
            (open.delivered, open.acknowledged, open.complete),
            (3, 1, false)
        );
        let mut missing = open.missing.clone();
        missing.sort();
        assert_eq!(missing, ["bob", "cy"]);
        // After the deadline a late acknowledgement changes nothing.
        let late = t0 + T + Duration::from_millis(1);
        assert!(r.ack("c2", "ch", 2, late));
        let done = r.receipt("ch", 2, late).unwrap();
        assert_eq!((done.acknowledged, done.complete), (1, true));
        let mut missing = done.missing;
        missing.sort();
        assert_eq!(missing, ["bob", "cy"]);
        assert_eq!(r.receipt("ch", 1, late).unwrap().acknowledged, 2);
        // A client that is not a reader is not counted.
        assert!(!r.ack("c9", "ch", 2, t0));
        // Kept for another timeout after the deadline, then forgotten.
        r.expire(t0 + T * 2);
        assert!(r.receipt("ch", 1, t0 + T * 2).is_none());
        assert_eq!(r.len(), 0);
    }

    #[test]
    fn a_recovered_publication_is_delivered_and_acknowledged_like_a_live_one() {
        let t0 = Instant::now();
        let mut r = Receipts::new(100);
        r.reading(&arc("c1"), &arc("ann"), "ch", 1, std::iter::empty(), t0);
        r.published("ch", 1, t0, T, None);
        r.delivered("ch", 1, 1);
        // ann leaves without acknowledging: missing; she comes back, recovers and acks.
        r.left("c1", "ch", t0);
        assert_eq!(r.receipt("ch", 1, t0).unwrap().missing, ["ann"]);
        r.reading(&arc("c2"), &arc("ann"), "ch", 1, [1].into_iter(), t0);
        assert!(r.ack("c2", "ch", 1, t0));
        let receipt = r.receipt("ch", 1, t0).unwrap();
        assert_eq!((receipt.delivered, receipt.acknowledged), (2, 1));
        assert!(receipt.missing.is_empty());
        // An acknowledgement that did not make it before the connection ended comes on the
        // next one, whose subscription starts after it.
        r.left("c2", "ch", t0);
        r.reading(&arc("c4"), &arc("dan"), "ch", 1, std::iter::empty(), t0);
        r.published("ch", 2, t0, T, None);
        r.delivered("ch", 2, 1);
        r.left("c4", "ch", t0);
        r.reading(&arc("c5"), &arc("dan"), "ch", 3, std::iter::empty(), t0);
        assert!(r.ack("c5", "ch", 2, t0));
        let receipt = r.receipt("ch", 2, t0).unwrap();
        assert_eq!((receipt.delivered, receipt.acknowledged), (1, 1));
        assert!(receipt.missing.is_empty());
        // Not owed: acknowledging what it was never given counts for nothing.
        r.reading(&arc("c6"), &arc("eve"), "ch", 3, std::iter::empty(), t0);
        assert!(r.ack("c6", "ch", 2, t0));
        assert_eq!(r.receipt("ch", 2, t0).unwrap().acknowledged, 1);
        // Acknowledging ahead of what it was given counts nothing, then or later.
        r.reading(&arc("c7"), &arc("fay"), "ch", 3, std::iter::empty(), t0);
        assert!(r.ack("c7", "ch", 10, t0));
        r.published("ch", 3, t0, T, None);
        r.delivered("ch", 3, 1);
        assert_eq!(r.receipt("ch", 3, t0).unwrap().acknowledged, 0);
        // Up to u64::MAX, then leaving: no overflow, and the user owes what came after.
        assert!(r.ack("c7", "ch", u64::MAX, t0));
        r.published("ch", 4, t0, T, None);
        r.delivered("ch", 4, 1);
        r.left("c7", "ch", t0);
        assert!(r
            .receipt("ch", 4, t0)
            .unwrap()
            .missing
            .contains(&"fay".to_string()));
        // A subscription that starts after a publication was neither given nor owes it.
        r.reading(&arc("c3"), &arc("bob"), "ch", 2, std::iter::empty(), t0);
        assert!(r.receipt("ch", 1, t0).unwrap().missing.is_empty());
    }

    #[test]
    fn each_publication_keeps_its_own_deadline() {
        let t0 = Instant::now();
        let mut r = Receipts::new(100);
        r.reading(&arc("c1"), &arc("ann"), "ch", 1, std::iter::empty(), t0);
        r.published("ch", 1, t0, Duration::from_secs(3600), None);
        r.published("ch", 2, t0, Duration::from_secs(1), None);
        let later = t0 + Duration::from_secs(2);
        assert!(r.receipt("ch", 2, later).unwrap().complete);
        assert!(!r.receipt("ch", 1, later).unwrap().complete);
        // A late acknowledgement counts for the open one only.
        assert!(r.ack("c1", "ch", 2, later));
        assert_eq!(r.receipt("ch", 2, later).unwrap().acknowledged, 0);
        assert_eq!(r.receipt("ch", 1, later).unwrap().acknowledged, 1);
        // The short one expires first.
        r.expire(t0 + Duration::from_secs(3));
        assert!(r.receipt("ch", 2, later).is_none());
        assert!(r.receipt("ch", 1, later).is_some());
    }

    #[test]
    fn a_user_with_two_connections_owes_each_delivery() {
        let t0 = Instant::now();
        let mut r = Receipts::new(100);
        r.reading(&arc("tab1"), &arc("uma"), "ch", 1, std::iter::empty(), t0);
        r.reading(&arc("tab2"), &arc("uma"), "ch", 1, std::iter::empty(), t0);
        r.published("ch", 1, t0, T, None);
        r.delivered("ch", 1, 2);
        r.left("tab1", "ch", t0);
        assert!(r.ack("tab2", "ch", 1, t0));
        let receipt = r.receipt("ch", 1, t0).unwrap();
        assert_eq!((receipt.delivered, receipt.acknowledged), (2, 1));
        assert_eq!(receipt.missing, ["uma"]);
    }

    #[test]
    fn the_bound_forgets_the_oldest_and_lists_stay_bounded() {
        let t0 = Instant::now();
        let mut r = Receipts::new(3);
        for offset in 1..=5 {
            r.published("ch", offset, t0, T, None);
        }
        assert_eq!(r.len(), 3);
        assert!(r.receipt("ch", 2, t0).is_none());
        assert!(r.receipt("ch", 3, t0).is_some());
        for n in 0..150 {
            let client = arc(&format!("c{n}"));
            r.reading(&client, &client, "ch", 5, std::iter::empty(), t0);
        }
        let receipt = r.receipt("ch", 5, t0).unwrap();
        assert_eq!((receipt.missing.len(), receipt.missing_more), (100, 50));
        let mut merged = receipt.clone();
        merged.merge(receipt);
        assert_eq!((merged.missing.len(), merged.missing_more), (100, 100));
    }
}
