//! How a fan-out's sockets are written once its locks are released: by the publisher, by
//! a task of their own, or by their connections' tasks when the node is behind.
//!
//! A fan-out queues its frame into every subscriber's [`Outbox`] under the channel's lock
//! and collects the idle sockets in a [`Flush`]; whoever holds the flush runs it after
//! letting go of every lock. [`Pacing`] is the node's own state of that choice.

use std::sync::atomic::{
    AtomicU64, AtomicUsize,
    Ordering::{AcqRel, Acquire, Relaxed},
};
use std::sync::Arc;
use std::time::Instant;

use tracing::Instrument;

use super::Outbox;

/// The outboxes a fan-out left to write ([`Push::Deferred`](super::Push::Deferred)). Their frames wait until it
/// runs (or until something else wakes their connections): it must not be dropped unrun.
#[must_use = "the queued frames are written only when the Flush runs"]
pub struct Flush {
    outboxes: Vec<Arc<Outbox>>,
    pacing: Arc<Pacing>,
    /// A traced publication's `writes` span: open until every socket is written.
    span: Option<tracing::Span>,
}

impl Flush {
    /// While the node keeps up, this many sockets are written by the publisher itself; the
    /// rest go to a task of their own, so that a publish returns once its frames are queued.
    const INLINE: usize = 16;
    /// A flushing task lets other tasks run after this many sockets (~0.6 ms of writes
    /// here): what else the node has to do, another publication's first subscribers among
    /// it, waits at most that long. With 256, the first subscriber of a publication sent
    /// while 10,000 others were being written waited 7.5-13 ms (p50); with 64, 2.8-4.9 ms,
    /// at the same CPU per delivery (bench/results/history.md, "Flush::CHUNK 256 → 64").
    const CHUNK: usize = 64;
    /// Behind, a flush of at most this many sockets wakes their connections instead.
    const WAKE_MAX: usize = 2048;

    /// An empty flush of the node whose writing is paced by `pacing`.
    pub fn new(pacing: Arc<Pacing>) -> Flush {
        Flush {
            outboxes: Vec::new(),
            pacing,
            span: None,
        }
    }

    /// Writes inside `span` (the first one given, when flushes are merged: the others
    /// end at once, marked `route = "merged"`).
    pub fn traced(&mut self, span: tracing::Span) {
        match &self.span {
            None => self.span = Some(span),
            Some(_) => {
                span.record("route", "merged");
            }
        }
    }

    pub fn add(&mut self, outbox: &Arc<Outbox>) {
        self.outboxes.push(outbox.clone());
    }

    /// Takes over another flush's sockets: one run then writes what both queued, each
    /// socket once (frames queued behind a deferred one go out in the same write).
    pub fn extend(&mut self, other: Flush) {
        self.outboxes.extend(other.outboxes);
        if let Some(span) = other.span {
            self.traced(span);
        }
    }

    /// Writes to every socket (see `Flush::INLINE`); called once every lock is released.
    /// When a flushing task of this node is still writing, and for 100 ms after that was
    /// last seen, the node is behind: the sockets of a flush of at most `Flush::WAKE_MAX`
    /// are left to their connections' tasks instead, which by the time they run hold
    /// several publications each and write them together (see [`Pacing`]).
    pub fn run(self) {
        if self.outboxes.is_empty() {
            return;
        }
        let behind = self.pacing.is_behind();
        self.run_as(behind);
    }

    /// How a flush of `sockets` is written, `behind` or not, inside a runtime or not.
    fn route(sockets: usize, behind: bool, in_runtime: bool) -> Route {
        match () {
            _ if !in_runtime => Route::Inline,
            // A very large fan-out is still written by one task: waking thousands of
            // connections per publication costs more than the batching saves.
            _ if behind && sockets <= Self::WAKE_MAX => Route::Wake,
            _ if sockets > Self::INLINE => Route::Task,
            _ => Route::Inline,
        }
    }

    fn run_as(self, behind: bool) {
        if self.outboxes.is_empty() {
            return;
        }
        let runtime = tokio::runtime::Handle::try_current();
        let outboxes = self.outboxes;
        let route = Self::route(outboxes.len(), behind, runtime.is_ok());
        let span = self.span;
        if let Some(span) = &span {
            span.record("sockets", outboxes.len());
            span.record("route", route.name());
        }
        let _writing = span.as_ref().map(|span| span.enter());
        match (route, runtime) {
            (Route::Wake, _) => outboxes.iter().for_each(|outbox| outbox.wake()),
            (Route::Task, Ok(runtime)) => {
                // The first few at once: the first subscribers do not wait for a task switch.
                outboxes[..Self::INLINE]
                    .iter()
                    .for_each(|outbox| outbox.flush());
                let running = Flushing::start(self.pacing);
                let rest = async move {
                    let _running = running;
                    for chunk in outboxes[Self::INLINE..].chunks(Self::CHUNK) {
                        chunk.iter().for_each(|outbox| outbox.flush());
                        tokio::task::yield_now().await;
                    }
                };
                match &span {
                    Some(span) => runtime.spawn(rest.instrument(span.clone())),
                    None => runtime.spawn(rest),
                };
            }
            (Route::Inline | Route::Task, _) => outboxes.iter().for_each(|outbox| outbox.flush()),
        }
    }
}

/// [`Flush::route`]'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// Every socket written by the caller.
    Inline,
    /// The first `Flush::INLINE` written by the caller, the rest by a task of their own.
    Task,
    /// Every connection woken to write for itself.
    Wake,
}

impl Route {
    fn name(self) -> &'static str {
        match self {
            Route::Inline => "inline",
            Route::Task => "task",
            Route::Wake => "wake",
        }
    }
}

/// Whether a node is behind with its writing, shared by its flushes. Under load a
/// publication's frames reach sockets that still hold the previous ones: written by one
/// flushing task per publication, each socket would still take one write per frame (S5 at
/// 200k deliveries/s of 1 KiB saturated the core at 1.5 frames per write); woken instead,
/// each connection's task drains its whole queue at once (2.5 to 3 frames per write, and
/// the same load at 5 CPU-s per million: bench/results/history.md). A heuristic (two publications in a
/// row can look "behind" without a real lag, which costs a task switch, nothing else):
/// either way every frame is written, in order.
#[derive(Debug)]
pub struct Pacing {
    /// Flushing tasks still writing.
    flushing: AtomicUsize,
    behind: Behind,
    /// The origin of `Behind`'s milliseconds.
    start: Instant,
}

impl Default for Pacing {
    fn default() -> Pacing {
        Pacing {
            flushing: AtomicUsize::new(0),
            behind: Behind::new(),
            start: Instant::now(),
        }
    }
}

impl Pacing {
    fn is_behind(&self) -> bool {
        let now_ms = self.start.elapsed().as_millis() as u64;
        self.behind
            .is_behind(self.flushing.load(Acquire) > 0, now_ms)
    }
}

/// Once a flush finds an earlier one still writing, publications are left to the
/// connections' tasks for `Behind::FOR_MS`: a flushing task started between two of them
/// would write one frame per socket again.
#[derive(Debug)]
struct Behind {
    /// Until when (milliseconds since the node's [`Pacing`] began).
    until: AtomicU64,
}

impl Behind {
    const FOR_MS: u64 = 100;

    const fn new() -> Behind {
        Behind {
            until: AtomicU64::new(0),
        }
    }

    /// Behind if a flushing task is running now, or was seen running in the last `FOR_MS`.
    fn is_behind(&self, flushing: bool, now_ms: u64) -> bool {
        if flushing {
            self.until.store(now_ms + Self::FOR_MS, Relaxed);
            true
        } else {
            now_ms < self.until.load(Relaxed)
        }
    }
}

/// Counts one flushing task in its node's [`Pacing`] for as long as it lives.
struct Flushing(Arc<Pacing>);

impl Flushing {
    fn start(pacing: Arc<Pacing>) -> Flushing {
        pacing.flushing.fetch_add(1, AcqRel);
        Flushing(pacing)
    }
}

impl Drop for Flushing {
    fn drop(&mut self) {
        self.0.flushing.fetch_sub(1, AcqRel);
    }
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use std::task::{Context, Poll};

    use bytes::Bytes;

    use super::*;
    use crate::metrics::Metrics;
    use crate::outbox::tests::pair;
    use crate::outbox::Push;

    #[test]
    fn behind_lasts_for_a_while_after_a_flushing_task_was_seen() {
        let behind = Behind::new();
        assert!(!behind.is_behind(false, 1_000), "nothing seen yet");
        assert!(behind.is_behind(true, 1_000), "a flushing task is running");
        assert!(behind.is_behind(false, 1_000 + Behind::FOR_MS - 1));
        assert!(!behind.is_behind(false, 1_000 + Behind::FOR_MS));
        assert!(behind.is_behind(true, 5_000), "seen again: a new window");
        assert!(behind.is_behind(false, 5_000 + Behind::FOR_MS - 1));
    }

    #[test]
    fn how_a_flush_is_written() {
        use Route::*;
        let route = Flush::route;
        // Keeping up: a few sockets by the caller, more by a task of their own.
        assert_eq!(route(1, false, true), Inline);
        assert_eq!(route(Flush::INLINE, false, true), Inline);
        assert_eq!(route(Flush::INLINE + 1, false, true), Task);
        assert_eq!(route(Flush::WAKE_MAX + 1, false, true), Task);
        // Behind: the connections write for themselves, unless there are too many of them.
        assert_eq!(route(1, true, true), Wake);
        assert_eq!(route(Flush::WAKE_MAX, true, true), Wake);
        assert_eq!(route(Flush::WAKE_MAX + 1, true, true), Task);
        // Outside a runtime (nothing to spawn on, nobody to wake): the caller writes.
        assert_eq!(route(Flush::WAKE_MAX + 1, false, false), Inline);
        assert_eq!(route(1, true, false), Inline);
    }

    #[tokio::test]
    async fn a_flush_behind_wakes_the_connections_instead_of_writing() {
        let mut pairs = Vec::new();
        let pacing = Arc::new(Pacing::default());
        let mut flush = Flush::new(pacing.clone());
        for _ in 0..Flush::INLINE + 4 {
            let (server, client) = pair().await;
            let outbox = Arc::new(Outbox::direct(
                1 << 20,
                server,
                Arc::new(Metrics::default()),
            ));
            assert_eq!(outbox.push_later(Bytes::from_static(b"x")), Push::Deferred);
            flush.add(&outbox);
            pairs.push((outbox, client));
        }
        flush.run_as(true);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        for (outbox, _) in &pairs {
            assert_eq!(outbox.held(), 1, "left to the connection's task");
            assert_eq!(outbox.poll_wait(&mut cx), Poll::Ready(()), "which is woken");
        }

        let mut flush = Flush::new(pacing);
        for (outbox, _) in &pairs {
            assert_eq!(outbox.push_later(Bytes::from_static(b"y")), Push::Queued);
            flush.add(outbox);
        }
        flush.run_as(false);
        // The first INLINE at once, the rest by the flushing task.
        for (outbox, _) in &pairs[..Flush::INLINE] {
            assert_eq!(outbox.held(), 0);
        }
        for (outbox, client) in &mut pairs {
            while outbox.held() > 0 {
                tokio::task::yield_now().await;
            }
            let mut got = [0u8; 2];
            tokio::io::AsyncReadExt::read_exact(client, &mut got)
                .await
                .unwrap();
            assert_eq!(&got, b"xy");
        }
    }
}
