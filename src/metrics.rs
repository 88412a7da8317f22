//! Node counters: one struct of concrete atomic handles, always present, so the hot path
//! pays one relaxed add and never a lookup. The control API's Info reads them; a later
//! Prometheus endpoint renders the same fields.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::hub::Fanout;

#[derive(Default, Debug)]
pub struct Metrics {
    pub connects: AtomicU64,
    pub disconnects: AtomicU64,
    pub publications: AtomicU64,
    /// Frames queued to connections by fan-out.
    pub deliveries: AtomicU64,
    pub slow_consumer_closes: AtomicU64,
    pub write_timeouts: AtomicU64,
    pub messages_received: AtomicU64,
}

impl Metrics {
    pub fn record_fanout(&self, counts: Fanout) {
        self.publications.fetch_add(1, Relaxed);
        self.deliveries.fetch_add(u64::from(counts.queued), Relaxed);
        if counts.overflowed > 0 {
            self.slow_consumer_closes
                .fetch_add(u64::from(counts.overflowed), Relaxed);
        }
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }

    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }
}
