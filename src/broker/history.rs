//! One channel's history: pure and synchronous, driven with `now`.
//!
//! Owned by the memory engine (one [`History`] per channel with history). A publication gets the
//! next offset (the previous one + 1) in the stream's epoch; the epoch is a random string
//! that changes only when the stream is lost (its position expired after history_meta_ttl
//! without publications, or the engine restarted). Publications expire after history_ttl or
//! when more than history_size are kept; the position (epoch and top offset) outlives them.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::wire::{Position, Publication, Recovery};

/// A kept publication and when it expires.
#[derive(Clone, Debug)]
struct Kept {
    publication: Publication,
    expires: Instant,
}

/// How long a stream keeps what.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    pub size: usize,
    pub ttl: Duration,
    pub meta_ttl: Duration,
}

pub struct History {
    epoch: Arc<str>,
    top: u64,
    entries: VecDeque<Kept>,
    meta_expires: Instant,
}

impl History {
    pub fn new(now: Instant, retention: Retention) -> History {
        History {
            epoch: Arc::from(format!("{:016x}", rand::random::<u64>())),
            top: 0,
            entries: VecDeque::new(),
            meta_expires: now + retention.meta_ttl,
        }
    }

    /// True once the position itself has expired: the history must start over in a new epoch.
    pub fn lost(&self, now: Instant) -> bool {
        now >= self.meta_expires
    }

    /// Drops publications whose history_ttl has passed.
    pub fn trim(&mut self, now: Instant) {
        while self.entries.front().is_some_and(|e| e.expires <= now) {
            self.entries.pop_front();
        }
    }

    pub fn position(&self) -> Position {
        Position {
            offset: self.top,
            epoch: self.epoch.clone(),
        }
    }

    /// Appends a publication; returns its offset.
    pub fn append(&mut self, data: Bytes, now: Instant, retention: Retention) -> u64 {
        self.trim(now);
        self.top += 1;
        self.entries.push_back(Kept {
            publication: Publication {
                offset: self.top,
                data,
            },
            expires: now + retention.ttl,
        });
        while self.entries.len() > retention.size {
            self.entries.pop_front();
        }
        self.meta_expires = now + retention.meta_ttl;
        self.top
    }

    /// The publications after `since`, if all of them are still kept and they are at most
    /// `max_count` and `max_bytes` (data bytes) in total.
    pub fn recover(
        &mut self,
        since: &Position,
        now: Instant,
        max_count: usize,
        max_bytes: usize,
    ) -> Recovery {
        self.trim(now);
        if since.epoch != self.epoch || since.offset > self.top {
            return Recovery::Impossible;
        }
        let missed = self.top - since.offset;
        if missed == 0 {
            return Recovery::Complete(Vec::new());
        }
        if missed > max_count as u64 {
            return Recovery::Impossible;
        }
        match self.entries.front() {
            Some(first) if first.publication.offset <= since.offset + 1 => {}
            _ => return Recovery::Impossible,
        }
        let wanted: Vec<Publication> = self
            .entries
            .iter()
            .filter(|e| e.publication.offset > since.offset)
            .map(|e| e.publication.clone())
            .collect();
        let bytes: usize = wanted.iter().map(Publication::reply_size).sum();
        if bytes > max_bytes {
            return Recovery::Impossible;
        }
        Recovery::Complete(wanted)
    }

    /// A page of kept publications: after `since` (oldest first) or before it (newest first
    /// when `reverse`), at most `limit`.
    pub fn page(
        &mut self,
        since: Option<u64>,
        limit: usize,
        reverse: bool,
        now: Instant,
    ) -> Vec<Publication> {
        self.trim(now);
        let kept = self.entries.iter().map(|e| &e.publication);
        if reverse {
            let before = since.unwrap_or(u64::MAX);
            kept.rev()
                .filter(|p| p.offset < before)
                .take(limit)
                .cloned()
                .collect()
        } else {
            let after = since.unwrap_or(0);
            kept.filter(|p| p.offset > after)
                .take(limit)
                .cloned()
                .collect()
        }
    }

    /// Drops every kept publication; the position stays, so clients keep resuming.
    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: Retention = Retention {
        size: 3,
        ttl: Duration::from_secs(60),
        meta_ttl: Duration::from_secs(3600),
    };

    fn data(n: u64) -> Bytes {
        Bytes::from(n.to_string())
    }

    #[test]
    fn offsets_and_bounded_size() {
        let t = Instant::now();
        let mut s = History::new(t, R);
        for n in 1..=5 {
            assert_eq!(s.append(data(n), t, R), n);
        }
        let kept: Vec<u64> = s
            .page(None, 10, false, t)
            .iter()
            .map(|e| e.offset)
            .collect();
        assert_eq!(kept, vec![3, 4, 5]);
        let newest: Vec<u64> = s.page(None, 2, true, t).iter().map(|e| e.offset).collect();
        assert_eq!(newest, vec![5, 4]);
        let after: Vec<u64> = s
            .page(Some(3), 10, false, t)
            .iter()
            .map(|e| e.offset)
            .collect();
        assert_eq!(after, vec![4, 5]);
    }

    #[test]
    fn recovery_is_complete_or_nothing() {
        let t = Instant::now();
        let mut s = History::new(t, R);
        for n in 1..=5 {
            s.append(data(n), t, R);
        }
        let epoch = s.position().epoch;
        let at = |offset| Position {
            offset,
            epoch: epoch.clone(),
        };
        let got = |r: Recovery| match r {
            Recovery::Complete(v) => Some(v.iter().map(|e| e.offset).collect::<Vec<_>>()),
            Recovery::Impossible => None,
        };
        assert_eq!(got(s.recover(&at(2), t, 300, 1 << 20)), Some(vec![3, 4, 5]));
        assert_eq!(
            got(s.recover(&at(5), t, 300, 1 << 20)),
            Some(vec![]),
            "at the top: nothing missed"
        );
        assert_eq!(
            got(s.recover(&at(1), t, 300, 1 << 20)),
            None,
            "publication 2 is gone"
        );
        assert_eq!(
            got(s.recover(&at(6), t, 300, 1 << 20)),
            None,
            "ahead of the stream"
        );
        assert_eq!(
            got(s.recover(&at(2), t, 2, 1 << 20)),
            None,
            "more than max_count"
        );
        assert_eq!(
            got(s.recover(&at(2), t, 300, 2)),
            None,
            "more than max_bytes"
        );
        assert_eq!(
            got(s.recover(
                &at(4),
                t,
                300,
                1 + crate::wire::position::PUBLICATION_OVERHEAD
            )),
            Some(vec![5]),
            "data plus overhead fits"
        );
        let other = Position {
            offset: 4,
            epoch: Arc::from("other"),
        };
        assert_eq!(
            got(s.recover(&other, t, 300, 1 << 20)),
            None,
            "another epoch"
        );
    }

    #[test]
    fn publications_expire_but_the_position_stays() {
        let t = Instant::now();
        let mut s = History::new(t, R);
        s.append(data(1), t, R);
        let later = t + Duration::from_secs(61);
        let top = Position {
            offset: 1,
            epoch: s.position().epoch,
        };
        assert!(s.page(None, 10, false, later).is_empty());
        assert_eq!(
            s.recover(&top, later, 300, 1 << 20),
            Recovery::Complete(vec![])
        );
        assert_eq!(
            s.recover(
                &Position {
                    offset: 0,
                    ..top.clone()
                },
                later,
                300,
                1 << 20
            ),
            Recovery::Impossible
        );
        assert!(!s.lost(later));
        assert!(s.lost(t + Duration::from_secs(3600)));
        s.clear();
        assert_eq!(s.position().offset, 1, "clearing keeps the position");
    }
}

/// Properties over arbitrary sequences of appends, expiries, clears and recoveries.
#[cfg(test)]
mod properties {
    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Step {
        /// Time passes (ms), then a publication of this many bytes.
        Append(u64, usize),
        /// Recover from `back` offsets below the top, within these limits.
        Recover {
            back: u64,
            max_count: usize,
            max_bytes: usize,
        },
        Clear,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (0u64..400, 0usize..300).prop_map(|(ms, len)| Step::Append(ms, len)),
            3 => (0u64..30, 0usize..40, 0usize..4000).prop_map(|(back, max_count, max_bytes)| {
                Step::Recover { back, max_count, max_bytes }
            }),
            1 => Just(Step::Clear),
        ]
    }

    proptest! {
        /// Offsets grow by one within the epoch; a recovery is every publication after the
        /// position, in order and once, whenever they are all kept and within the limits,
        /// and nothing otherwise.
        #[test]
        fn offsets_grow_and_recovery_is_all_or_nothing(
            steps in vec(step(), 1..120),
            size in 1usize..20,
            ttl_ms in 100u64..3000,
        ) {
            let retention = Retention {
                size,
                ttl: Duration::from_millis(ttl_ms),
                meta_ttl: Duration::from_secs(3600),
            };
            let mut now = Instant::now();
            let mut history = History::new(now, retention);
            let epoch = history.position().epoch;
            let mut top = 0;
            for step in steps {
                match step {
                    Step::Append(ms, len) => {
                        now += Duration::from_millis(ms);
                        let offset = history.append(Bytes::from(vec![b'1'; len]), now, retention);
                        prop_assert_eq!(offset, top + 1);
                        top = offset;
                    }
                    Step::Recover { back, max_count, max_bytes } => {
                        let since = top.saturating_sub(back);
                        let kept = history.page(Some(since), usize::MAX, false, now);
                        let all_kept = kept.iter().map(|p| p.offset).eq(since + 1..=top);
                        let bytes: usize = kept.iter().map(Publication::reply_size).sum();
                        let position = Position { offset: since, epoch: epoch.clone() };
                        let recovery = history.recover(&position, now, max_count, max_bytes);
                        let fits = kept.len() <= max_count && bytes <= max_bytes;
                        match recovery {
                            Recovery::Complete(got) => {
                                prop_assert!(got.iter().map(|p| p.offset).eq(since + 1..=top));
                                prop_assert!(fits);
                            }
                            Recovery::Impossible => prop_assert!(!(all_kept && fits)),
                        }
                        let elsewhere = Position { offset: since, epoch: Arc::from("other") };
                        prop_assert_eq!(
                            history.recover(&elsewhere, now, max_count, max_bytes),
                            Recovery::Impossible
                        );
                    }
                    Step::Clear => history.clear(),
                }
                prop_assert_eq!(history.position(), Position { offset: top, epoch: epoch.clone() });
            }
        }
    }
}
