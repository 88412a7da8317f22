//! What the generator measures about deliveries: latency, time to the last subscriber,
//! loss, duplicates and reordering.
//!
//! Every publication's data is `{"c":CHANNEL,"s":SEQ,"t":NANOS,"p":"PAD"}`: the channel's
//! index, its per-channel sequence number and the Unix time in nanoseconds at which it was
//! due to be sent (the intended time, so that a lagging sender shows up as latency rather
//! than hiding it). Everything runs on one thread; `Stats` lives in an `Rc<RefCell<_>>`.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;

pub fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Builds a publication's data with `pad` bytes of padding.
pub fn payload(channel: u32, seq: u64, due_nanos: u64, pad: usize) -> Vec<u8> {
    let mut out = format!(r#"{{"c":{channel},"s":{seq},"t":{due_nanos},"p":""#).into_bytes();
    out.resize(out.len() + pad, b'x');
    out.extend_from_slice(b"\"}");
    out
}

/// (channel, seq, due nanos) from a `pub` frame's payload.
pub fn parse_pub(frame: &[u8]) -> Option<(u32, u64, u64)> {
    let at = frame.windows(5).position(|w| w == br#"{"c":"#)? + 5;
    let mut rest = &frame[at..];
    let mut number = |prefix: &[u8]| -> Option<u64> {
        rest = rest.strip_prefix(prefix)?;
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        let value = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
        rest = &rest[digits..];
        Some(value)
    };
    let c = number(b"")?;
    let s = number(b",\"s\":")?;
    let t = number(b",\"t\":")?;
    Some((c as u32, s, t))
}

/// A connection's last sequence number per channel.
#[derive(Default)]
pub struct Sequences(Vec<(u32, u64)>);

pub struct Stats {
    /// Publish-to-receive latency, microseconds.
    pub latency: Histogram<u64>,
    /// Per publication: from when it was actually sent (not when it was due: the sender's
    /// timer is only good to ~1 ms) until its first subscriber had it, microseconds.
    pub to_first: Histogram<u64>,
    /// Per publication: until its last expected subscriber had it, microseconds.
    pub to_last: Histogram<u64>,
    pub received: u64,
    pub gaps: u64,
    pub duplicates: u64,
    pub reordered: u64,
    /// Deliveries the publications sent in this window should produce.
    pub expected: u64,
    pub closes: HashMap<u16, u64>,
    /// Publications being tracked to their last subscriber.
    pending: HashMap<(u32, u64), Pending>,
    /// In a shard process (`shard.rs`): what its own connections saw of each publication,
    /// for the main process to merge; the main process alone knows who should receive what.
    seen: Option<HashMap<(u32, u64), Seen>>,
}

struct Pending {
    /// Subscribers still to receive it.
    remaining: u32,
    /// The worst latency so far, µs.
    worst_us: u64,
    /// When it was sent, and when its first subscriber had it (ns since the epoch).
    sent_ns: u64,
    first_ns: Option<u64>,
}

/// One publication as a shard's connections saw it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Seen {
    pub got: u32,
    pub worst_us: u64,
    pub first_ns: u64,
}

impl Default for Stats {
    fn default() -> Stats {
        let histogram = || Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid bounds");
        Stats {
            latency: histogram(),
            to_first: histogram(),
            to_last: histogram(),
            received: 0,
            gaps: 0,
            duplicates: 0,
            reordered: 0,
            expected: 0,
            closes: HashMap::new(),
            pending: HashMap::new(),
            seen: None,
        }
    }
}

impl Stats {
    /// The statistics of a shard process: publications are noted as seen, not tracked.
    pub fn for_shard() -> Stats {
        Stats {
            seen: Some(HashMap::new()),
            ..Stats::default()
        }
    }

    /// A publication is about to be sent to `subscribers` connections.
    pub fn published(&mut self, channel: u32, seq: u64, subscribers: u32, track_last: bool) {
        self.expected += u64::from(subscribers);
        if track_last && subscribers > 0 {
            let pending = Pending {
                remaining: subscribers,
                worst_us: 0,
                sent_ns: now_nanos(),
                first_ns: None,
            };
            self.pending.insert((channel, seq), pending);
        }
    }

    /// A connection received a publication.
    pub fn delivered(&mut self, seqs: &mut Sequences, frame: &[u8]) {
        let Some((channel, seq, due)) = parse_pub(frame) else {
            return;
        };
        let now = now_nanos();
        let micros = now.saturating_sub(due) / 1000;
        self.received += 1;
        let _ = self.latency.record(micros.max(1));
        match seqs.0.iter_mut().find(|(c, _)| *c == channel) {
            Some((_, last)) => {
                if seq == *last + 1 {
                    *last = seq;
                } else if seq > *last {
                    self.gaps += seq - *last - 1;
                    *last = seq;
                } else if seq == *last {
                    self.duplicates += 1;
                } else {
                    self.reordered += 1;
                }
            }
            None => seqs.0.push((channel, seq)),
        }
        if let Some(seen) = &mut self.seen {
            let entry = seen.entry((channel, seq)).or_insert(Seen {
                got: 0,
                worst_us: 0,
                first_ns: now,
            });
            entry.got += 1;
            entry.worst_us = entry.worst_us.max(micros);
        } else {
            let one = Seen {
                got: 1,
                worst_us: micros,
                first_ns: now,
            };
            self.track(channel, seq, one);
        }
    }

    /// Counts `seen` towards a tracked publication; records its times once all have it.
    fn track(&mut self, channel: u32, seq: u64, seen: Seen) {
        let Some(entry) = self.pending.get_mut(&(channel, seq)) else {
            return;
        };
        entry.remaining = entry.remaining.saturating_sub(seen.got);
        entry.worst_us = entry.worst_us.max(seen.worst_us);
        entry.first_ns = Some(
            entry
                .first_ns
                .map_or(seen.first_ns, |f| f.min(seen.first_ns)),
        );
        if entry.remaining == 0 {
            let done = self.pending.remove(&(channel, seq)).expect("present");
            let first = done.first_ns.unwrap_or(done.sent_ns);
            let _ = self
                .to_first
                .record((first.saturating_sub(done.sent_ns) / 1000).max(1));
            let _ = self.to_last.record(done.worst_us.max(1));
        }
    }

    /// What a shard saw in this window, as one JSON line for the main process.
    pub fn report(&self) -> serde_json::Value {
        let latency: Vec<[u64; 2]> = self
            .latency
            .iter_recorded()
            .map(|v| [v.value_iterated_to(), v.count_at_value()])
            .collect();
        let seen: Vec<[u64; 5]> = self
            .seen
            .iter()
            .flatten()
            .map(|((c, s), v)| [u64::from(*c), *s, u64::from(v.got), v.worst_us, v.first_ns])
            .collect();
        let closes: Vec<[u64; 2]> = self
            .closes
            .iter()
            .map(|(code, n)| [u64::from(*code), *n])
            .collect();
        serde_json::json!({
            "received": self.received, "gaps": self.gaps, "duplicates": self.duplicates,
            "reordered": self.reordered, "closes": closes, "latency": latency, "seen": seen,
        })
    }

    /// Adds a shard's report (`report`) to this window's figures.
    pub fn merge(&mut self, report: &serde_json::Value) -> anyhow::Result<()> {
        let number = |key: &str| {
            report[key]
                .as_u64()
                .ok_or_else(|| anyhow::anyhow!("shard report without {key}: {report}"))
        };
        self.received += number("received")?;
        self.gaps += number("gaps")?;
        self.duplicates += number("duplicates")?;
        self.reordered += number("reordered")?;
        let rows = |key: &str| -> anyhow::Result<Vec<Vec<u64>>> {
            report[key]
                .as_array()
                .ok_or_else(|| anyhow::anyhow!("shard report without {key}"))?
                .iter()
                .map(|row| {
                    row.as_array()
                        .and_then(|r| r.iter().map(|v| v.as_u64()).collect::<Option<Vec<u64>>>())
                        .ok_or_else(|| anyhow::anyhow!("bad {key} row: {row}"))
                })
                .collect()
        };
        for row in rows("closes")? {
            *self.closes.entry(row[0] as u16).or_default() += row[1];
        }
        for row in rows("latency")? {
            let _ = self.latency.record_n(row[0], row[1]);
        }
        for row in rows("seen")? {
            let seen = Seen {
                got: row[2] as u32,
                worst_us: row[3],
                first_ns: row[4],
            };
            self.track(row[0] as u32, row[1], seen);
        }
        Ok(())
    }

    /// Deliveries still missing: expected minus received (never negative).
    pub fn missing(&self) -> u64 {
        self.expected.saturating_sub(self.received)
    }

    /// Starts a new measurement window (pending publications are kept).
    pub fn reset(&mut self) {
        self.latency.reset();
        self.to_first.reset();
        self.to_last.reset();
        self.received = 0;
        self.gaps = 0;
        self.duplicates = 0;
        self.reordered = 0;
        self.expected = 0;
        self.pending.clear();
        if let Some(seen) = &mut self.seen {
            seen.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trip() {
        let data = payload(7, 42, 123_456, 10);
        let frame = [
            br#"{"type":"pub","channel":"room:7","data":"#.as_slice(),
            &data,
            b"}",
        ]
        .concat();
        assert_eq!(parse_pub(&frame), Some((7, 42, 123_456)));
        assert!(serde_json::from_slice::<serde_json::Value>(&data).is_ok());
    }

    #[test]
    fn sequences() {
        let mut stats = Stats::default();
        let mut seqs = Sequences::default();
        let frame = |s: u64| payload(1, s, now_nanos(), 0);
        for s in [1, 2, 4, 4, 3] {
            stats.delivered(&mut seqs, &frame(s));
        }
        assert_eq!((stats.gaps, stats.duplicates, stats.reordered), (1, 1, 1));
    }

    #[test]
    fn a_publication_completes_across_processes() {
        let frame = |s: u64| {
            let data = payload(0, s, now_nanos(), 0);
            [
                br#"{"type":"pub","channel":"fan","data":"#.as_slice(),
                &data,
                b"}",
            ]
            .concat()
        };
        let mut main = Stats::default();
        main.published(0, 1, 3, true);
        main.delivered(&mut Sequences::default(), &frame(1));
        let mut shard = Stats::for_shard();
        shard.delivered(&mut Sequences::default(), &frame(1));
        assert_eq!(main.to_last.len(), 0, "one of three subscribers is not all");
        main.merge(&shard.report()).unwrap();
        assert_eq!((main.received, main.to_last.len()), (2, 0));
        shard.reset();
        shard.delivered(&mut Sequences::default(), &frame(1));
        main.merge(&shard.report()).unwrap();
        assert_eq!((main.received, main.missing()), (3, 0));
        assert_eq!((main.to_first.len(), main.to_last.len()), (1, 1));
        assert_eq!(main.latency.len(), 3);
    }
}
