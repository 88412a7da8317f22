//! How a fan-out's sockets are written once its locks are released: by the publisher, or
//! by the node's flushing task, which under load writes each socket once with everything
//! that accumulated for it.
//!
//! A fan-out queues its frame into every subscriber's [`Outbox`] under the channel's lock
//! and collects the idle sockets in a [`Flush`]; whoever holds the flush runs it after
//! letting go of every lock. [`Pacing`] is the node's own state of that choice.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// rest go to the node's flushing task, so that a publish returns once its frames are
    /// queued.
    const INLINE: usize = 16;
    /// The flushing task lets other tasks run after this many sockets (~0.6 ms of writes
    /// here): what else the node has to do, another publication's first subscribers among
    /// it, waits at most that long. With 256, the first subscriber of a publication sent
    /// while 10,000 others were being written waited 7.5-13 ms (p50); with 64, 2.8-4.9 ms,
    /// at the same CPU per delivery (bench/results/history.md, "Flush::CHUNK 256 → 64").
    const CHUNK: usize = 64;

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
    /// While the node's flushing task is busy (writing, or with sockets waiting for its
    /// next turn), and for 100 ms after it was last seen so, the node is behind: every
    /// socket is left to that task, which by the time it gets there holds several
    /// publications for many of them and writes them together (see [`Pacing`]).
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
            _ if behind => Route::Queued,
            _ if sockets > Self::INLINE => Route::Task,
            _ => Route::Inline,
        }
    }

    fn run_as(self, behind: bool) {
        if self.outboxes.is_empty() {
            return;
        }
        let runtime = tokio::runtime::Handle::try_current();
        let mut outboxes = self.outboxes;
        let route = Self::route(outboxes.len(), behind, runtime.is_ok());
        let span = self.span;
        if let Some(span) = &span {
            span.record("sockets", outboxes.len());
            span.record("route", route.name());
        }
        match (route, runtime) {
            (Route::Task | Route::Queued, Ok(runtime)) => {
                if route == Route::Task {
                    // The first few at once: the first subscribers do not wait for a task switch.
                    let _writing = span.as_ref().map(|span| span.enter());
                    outboxes
                        .drain(..Self::INLINE)
                        .for_each(|outbox| outbox.flush());
                }
                self.pacing
                    .queue(outboxes, span, &runtime, route == Route::Queued);
            }
            _ => {
                let _writing = span.as_ref().map(|span| span.enter());
                outboxes.iter().for_each(|outbox| outbox.flush());
            }
        }
    }
}

/// [`Flush::route`]'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// Every socket written by the caller.
    Inline,
    /// The first `Flush::INLINE` written by the caller, the rest by the flushing task.
    Task,
    /// Every socket left to the flushing task's next turn (behind).
    Queued,
}

impl Route {
    fn name(self) -> &'static str {
        match self {
            Route::Inline => "inline",
            Route::Task => "task",
            Route::Queued => "queued",
        }
    }
}

/// How a node writes the sockets its fan-outs leave: one flushing task at a time takes
/// every socket queued so far and writes each once (a turn), then takes what queued
/// meanwhile.
///
/// Under load a publication's frames reach sockets that still hold the previous ones. A
/// task per publication would write one frame per socket again (S5 at 200k deliveries/s of
/// 1 KiB saturated the core at 1.5 frames per write); waking every connection's task to
/// drain its own queue batches them but costs a task wake per socket (about 1.3 µs, a
/// fifth of a single-frame delivery: BENCHMARKS.md, "Where a single-frame delivery's time
/// goes"). One task taking turns writes every frame queued to a socket in one write, with
/// nothing woken. While the node is behind, its turns begin at least `coalesce`
/// (`write_coalesce`) apart, so that each write carries what that time brought: a write
/// costs the kernel about the same for one small frame as for several, so under load
/// the CPU per delivery falls with the frames per write, for at most `coalesce` more
/// latency (BENCHMARKS.md, "Coalescing under load"). A socket the kernel does not take at
/// once is handed to its connection's task, as everywhere else.
pub struct Pacing {
    queued: Mutex<Queued>,
    coalesce: Duration,
    behind: Behind,
    /// The origin of `Behind`'s milliseconds.
    start: Instant,
}

/// What waits for the flushing task, and what it is doing.
#[derive(Default)]
struct Queued {
    outboxes: Vec<Arc<Outbox>>,
    /// The `writes` spans of traced flushes among them, ended once their turn is written.
    spans: Vec<tracing::Span>,
    /// A flushing task is running; it takes `outboxes` before it ends.
    running: bool,
    /// It is writing a turn (not waiting for the next one).
    writing: bool,
    /// When its last turn began.
    last_turn: Option<tokio::time::Instant>,
}

impl Pacing {
    /// The pacing of a node whose turns, while it is behind, begin `coalesce` apart.
    pub fn new(coalesce: Duration) -> Pacing {
        Pacing {
            queued: Mutex::new(Queued::default()),
            coalesce,
            behind: Behind::new(),
            start: Instant::now(),
        }
    }

    /// Behind: a flush finds the flushing task writing a turn or sockets waiting for one,
    /// or found that in the last `Behind::FOR_MS`.
    fn is_behind(&self) -> bool {
        let now_ms = self.start.elapsed().as_millis() as u64;
        let busy = {
            let queued = self.queued.lock().expect("pacing lock");
            queued.writing || !queued.outboxes.is_empty()
        };
        self.behind.is_behind(busy, now_ms)
    }

    /// Leaves `outboxes` to the flushing task, starting one if none is running. Queued
    /// `behind`, they wait for the next turn's time; otherwise a new task writes them at once.
    fn queue(
        self: &Arc<Self>,
        outboxes: Vec<Arc<Outbox>>,
        span: Option<tracing::Span>,
        runtime: &tokio::runtime::Handle,
        behind: bool,
    ) {
        let mut queued = self.queued.lock().expect("pacing lock");
        if queued.outboxes.is_empty() {
            queued.outboxes = outboxes;
        } else {
            queued.outboxes.extend(outboxes);
        }
        queued.spans.extend(span);
        if !std::mem::replace(&mut queued.running, true) {
            drop(queued);
            runtime.spawn(self.clone().flushing(behind));
        }
    }

    /// The flushing task: turns until nothing is queued, each but an unhurried first one
    /// beginning `coalesce` after the one before.
    async fn flushing(self: Arc<Self>, mut paced: bool) {
        let mut turn = Vec::new();
        loop {
            let last = {
                let mut queued = self.queued.lock().expect("pacing lock");
                if queued.outboxes.is_empty() {
                    queued.running = false;
                    return;
                }
                queued.last_turn
            };
            // Only this task takes from the queue: what it saw is still there after the wait.
            if let Some(last) = last.filter(|_| paced && !self.coalesce.is_zero()) {
                tokio::time::sleep_until(last + self.coalesce).await;
            }
            paced = true;
            let spans = {
                let mut queued = self.queued.lock().expect("pacing lock");
                std::mem::swap(&mut turn, &mut queued.outboxes);
                queued.writing = true;
                queued.last_turn = Some(tokio::time::Instant::now());
                std::mem::take(&mut queued.spans)
            };
            let writes = async {
                for chunk in turn.chunks(Flush::CHUNK) {
                    chunk.iter().for_each(|outbox| outbox.flush());
                    tokio::task::yield_now().await;
                }
            };
            match spans.first() {
                Some(span) => writes.instrument(span.clone()).await,
                None => writes.await,
            }
            self.queued.lock().expect("pacing lock").writing = false;
            turn.clear();
            drop(spans);
        }
    }
}

impl std::fmt::Debug for Pacing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let queued = self.queued.lock().expect("pacing lock");
        f.debug_struct("Pacing")
            .field("queued", &queued.outboxes.len())
            .field("running", &queued.running)
            .field("writing", &queued.writing)
            .field("coalesce", &self.coalesce)
            .field("behind", &self.behind)
            .finish()
    }
}

/// Once a flush finds the flushing task busy, publications are left to it for
/// `Behind::FOR_MS`: written by the publisher between two turns, a socket would get one
/// frame per write again.
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

    /// Behind if the flushing task is busy now, or was seen busy in the last `FOR_MS`.
    fn is_behind(&self, flushing: bool, now_ms: u64) -> bool {
        if flushing {
            self.until.store(now_ms + Self::FOR_MS, Relaxed);
            true
        } else {
            now_ms < self.until.load(Relaxed)
        }
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
        // Keeping up: a few sockets by the caller, more by the flushing task.
        assert_eq!(route(1, false, true), Inline);
        assert_eq!(route(Flush::INLINE, false, true), Inline);
        assert_eq!(route(Flush::INLINE + 1, false, true), Task);
        assert_eq!(route(100_000, false, true), Task);
        // Behind: every socket waits for the flushing task's next turn.
        assert_eq!(route(1, true, true), Queued);
        assert_eq!(route(100_000, true, true), Queued);
        // Outside a runtime (nothing to spawn on): the caller writes.
        assert_eq!(route(100_000, false, false), Inline);
        assert_eq!(route(1, true, false), Inline);
    }

    async fn outboxes(n: usize) -> (Vec<(Arc<Outbox>, tokio::net::TcpStream)>, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::default());
        let mut pairs = Vec::new();
        for _ in 0..n {
            let (server, client) = pair().await;
            pairs.push((
                Arc::new(Outbox::direct(1 << 20, server, metrics.clone())),
                client,
            ));
        }
        (pairs, metrics)
    }

    /// Queues `frame` everywhere and runs the flush `behind` or not.
    fn publish(
        pacing: &Arc<Pacing>,
        pairs: &[(Arc<Outbox>, tokio::net::TcpStream)],
        frame: &'static [u8],
        behind: bool,
    ) {
        let mut flush = Flush::new(pacing.clone());
        for (outbox, _) in pairs {
            if outbox.push_later(Bytes::from_static(frame)) == Push::Deferred {
                flush.add(outbox);
            }
        }
        flush.run_as(behind);
    }

    async fn all_written(pairs: &[(Arc<Outbox>, tokio::net::TcpStream)]) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while pairs.iter().any(|(outbox, _)| outbox.held() > 0) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "frames left unwritten"
            );
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn behind_the_next_turn_waits_for_its_time_and_writes_each_socket_once() {
        let coalesce = std::time::Duration::from_millis(300);
        let pacing = Arc::new(Pacing::new(coalesce));
        let (mut pairs, metrics) = outboxes(Flush::INLINE + 4).await;

        // Keeping up: the first INLINE at once, the rest by the flushing task's first turn.
        publish(&pacing, &pairs, b"x", false);
        let first_turn = tokio::time::Instant::now();
        for (outbox, _) in &pairs[..Flush::INLINE] {
            assert_eq!(outbox.held(), 0);
        }
        all_written(&pairs).await;
        assert_eq!(metrics.socket_writes.get(), pairs.len() as u64);

        // Behind: two publications wait for the next turn, `coalesce` after the first.
        publish(&pacing, &pairs, b"y", true);
        publish(&pacing, &pairs, b"z", true);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        if first_turn.elapsed() < coalesce {
            for (outbox, _) in &pairs {
                assert_eq!(outbox.held(), 2, "left to the next turn, nothing woken");
                let mut cx = Context::from_waker(std::task::Waker::noop());
                assert_eq!(outbox.poll_wait(&mut cx), Poll::Pending);
            }
        }
        all_written(&pairs).await;
        assert!(
            first_turn.elapsed() >= coalesce,
            "the turn waited for its time"
        );
        assert_eq!(
            metrics.socket_writes.get(),
            2 * pairs.len() as u64,
            "both frames in one write per socket"
        );
        for (_, client) in &mut pairs {
            let mut got = [0u8; 3];
            tokio::io::AsyncReadExt::read_exact(client, &mut got)
                .await
                .unwrap();
            assert_eq!(&got, b"xyz");
        }
    }

    #[tokio::test]
    async fn without_coalescing_the_next_turn_follows_at_once() {
        let pacing = Arc::new(Pacing::new(std::time::Duration::ZERO));
        let (mut pairs, _) = outboxes(Flush::INLINE + 4).await;
        publish(&pacing, &pairs, b"x", false);
        all_written(&pairs).await;
        let started = tokio::time::Instant::now();
        publish(&pacing, &pairs, b"y", true);
        all_written(&pairs).await;
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        for (_, client) in &mut pairs {
            let mut got = [0u8; 2];
            tokio::io::AsyncReadExt::read_exact(client, &mut got)
                .await
                .unwrap();
            assert_eq!(&got, b"xy");
        }
    }
}
