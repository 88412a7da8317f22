//! A channel's history (the memory engine's stream) against a model of what it must keep:
//! arbitrary appends, time passing, recoveries from arbitrary positions and limits, pages
//! and removals. A recovery returns exactly the publications after the position, in order,
//! each once, when all of them are kept and fit the limits, and nothing otherwise: never a
//! part. Offsets only grow within an epoch.
#![no_main]

use std::time::{Duration, Instant};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sidecast::broker::history::{History, Retention};
use sidecast::wire::{Position, Publication, Recovery};

/// What the model keeps of one publication.
struct Kept {
    offset: u64,
    expires: Instant,
    data: Bytes,
}

fuzz_target!(|data: &[u8]| {
    let mut bytes = data.iter().copied();
    let mut next = || bytes.next();
    let (Some(size), Some(ttl)) = (next(), next()) else {
        return;
    };
    let retention = Retention {
        size: usize::from(size % 16) + 1,
        ttl: Duration::from_millis(u64::from(ttl) * 10 + 1),
        meta_ttl: Duration::from_secs(3600),
    };
    let start = Instant::now();
    let mut now = start;
    let mut history = History::new(now, retention);
    let epoch = history.position().epoch;
    let mut model: Vec<Kept> = Vec::new();
    let mut top = 0u64;
    while let (Some(op), Some(arg)) = (next(), next()) {
        // The model's kept publications at `now`.
        model.retain(|k| k.expires > now);
        match op % 5 {
            0 => {
                let data = Bytes::from(vec![b'7'; usize::from(arg)]);
                let offset = history.append(data.clone(), now, retention);
                assert_eq!(offset, top + 1, "offsets grow by one");
                top = offset;
                model.push(Kept {
                    offset,
                    expires: now + retention.ttl,
                    data,
                });
                if model.len() > retention.size {
                    model.remove(0);
                }
            }
            1 => now += Duration::from_millis(u64::from(arg)),
            2 => {
                let since_offset = top.saturating_sub(u64::from(arg % 32)) + u64::from(arg >> 7);
                let other_epoch = arg % 11 == 0;
                let since = Position {
                    offset: since_offset,
                    epoch: if other_epoch {
                        "another".into()
                    } else {
                        epoch.clone()
                    },
                };
                let max_count = usize::from(arg % 13);
                let max_bytes = usize::from(arg) * 40;
                let wanted: Vec<Publication> = model
                    .iter()
                    .filter(|k| k.offset > since_offset)
                    .map(|k| Publication {
                        offset: k.offset,
                        data: k.data.clone(),
                    })
                    .collect();
                let missed = top.saturating_sub(since_offset);
                let possible = !other_epoch
                    && since_offset <= top
                    && (missed == 0
                        || (missed <= max_count as u64
                            && wanted.first().map(|p| p.offset) == Some(since_offset + 1)
                            && wanted.iter().map(Publication::reply_size).sum::<usize>()
                                <= max_bytes));
                match history.recover(&since, now, max_count, max_bytes) {
                    Recovery::Complete(got) => {
                        assert!(
                            possible,
                            "recovered what could not be: since {since_offset}, top {top}"
                        );
                        let expected: Vec<u64> = (since_offset + 1..=top).collect();
                        let offsets: Vec<u64> = got.iter().map(|p| p.offset).collect();
                        assert_eq!(offsets, expected, "all of it, in order, once");
                        assert_eq!(got, wanted);
                    }
                    Recovery::Impossible => {
                        assert!(
                            !possible,
                            "refused what it could recover: since {since_offset}, top {top}"
                        );
                    }
                }
            }
            3 => {
                let since = (arg % 3 != 0).then(|| top.saturating_sub(u64::from(arg % 20)));
                let limit = usize::from(arg % 7);
                let reverse = arg % 2 == 1;
                let page: Vec<u64> = history
                    .page(since, limit, reverse, now)
                    .iter()
                    .map(|p| p.offset)
                    .collect();
                let mut expected: Vec<u64> = model.iter().map(|k| k.offset).collect();
                if reverse {
                    let before = since.unwrap_or(u64::MAX);
                    expected.reverse();
                    expected.retain(|o| *o < before);
                } else {
                    let after = since.unwrap_or(0);
                    expected.retain(|o| *o > after);
                }
                expected.truncate(limit);
                assert_eq!(page, expected);
            }
            _ => {
                history.clear();
                model.clear();
                assert_eq!(
                    history.position().offset,
                    top,
                    "the position outlives a removal"
                );
            }
        }
        assert!(!history.lost(now) || now >= start + retention.meta_ttl);
    }
});
