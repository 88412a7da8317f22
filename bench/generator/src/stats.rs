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
    /// Per tracked publication: (subscribers still to receive it, subscribers in all, worst
    /// latency so far).
    /// (subscribers still to receive it, subscribers in all, worst latency, sent at in ns).
    pending: HashMap<(u32, u64), (u32, u32, u64, u64)>,
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
        }
    }
}

impl Stats {
    /// A publication is about to be sent to `subscribers` connections.
    pub fn published(&mut self, channel: u32, seq: u64, subscribers: u32, track_last: bool) {
        self.expected += u64::from(subscribers);
        if track_last && subscribers > 0 {
            let sent = now_nanos();
            self.pending
                .insert((channel, seq), (subscribers, subscribers, 0, sent));
        }
    }

    /// A connection received a publication.
    pub fn delivered(&mut self, seqs: &mut Sequences, frame: &[u8]) {
        let Some((channel, seq, due)) = parse_pub(frame) else {
            return;
        };
        let micros = now_nanos().saturating_sub(due) / 1000;
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
        if let Some(entry) = self.pending.get_mut(&(channel, seq)) {
            if entry.0 == entry.1 {
                let since_sent = now_nanos().saturating_sub(entry.3) / 1000;
                let _ = self.to_first.record(since_sent.max(1));
            }
            entry.0 -= 1;
            entry.2 = entry.2.max(micros);
            if entry.0 == 0 {
                let worst = entry.2;
                self.pending.remove(&(channel, seq));
                let _ = self.to_last.record(worst.max(1));
            }
        }
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
}
