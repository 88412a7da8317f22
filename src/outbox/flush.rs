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
    /// A turn's writer lets other tasks run after this many sockets (~0.6 ms of writes
    /// here): what else the node has to do (reading, answering the control API, a small
    /// fan-out written by its publisher) waits at most that long. With 256, the first
    /// subscriber of a small publication sent while 10,000 others were being written waited
    /// 7.5-13 ms (p50); with 64, 2.8-4.9 ms, at the same CPU per delivery
    /// (bench/results/history.md, "Flush::CHUNK 256 → 64").
    const CHUNK: usize = 64;
    /// A turn of more sockets than this is shared by several tasks, up to one per worker
    /// thread of the runtime.
    const SPREAD: usize = 256;

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
            // A small fan-out (a room, a user's connections) never waits for a turn: its
            // idle sockets gain nothing by waiting, and those with frames still queued
            // already carry its frame in their next write.
            _ if !in_runtime || sockets <= Self::INLINE => Route::Inline,
            _ if behind => Route::Queued,
            _ => Route::Task,
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
    /// The first `Flush::INLINE` written by the caller, the rest by the flushing task at once.
    Task,
    /// Every socket left to the flushing task's next turn (behind, more than `Flush::INLINE`).
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
/// latency (BENCHMARKS.md, "Coalescing under load"). A flush that is not behind cuts that
/// wait short. A socket the kernel does not take at once is handed to its connection's
/// task, as everywhere else.
pub struct Pacing {
    queued: Mutex<Queued>,
    /// Ends the wait between two turns early: a flush that is not behind came.
    hurry: tokio::sync::Notify,
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
    /// It is writing a turn.
    writing: bool,
    /// It is waiting for the next turn's time, `coalesce` after the last one began.
    pacing: bool,
    /// A flush that was not behind is among `outboxes`: the next turn begins at once.
    due: bool,
    /// When its last turn began.
    last_turn: Option<tokio::time::Instant>,
}

impl Pacing {
    /// The pacing of a node whose turns, while it is behind, begin `coalesce` apart.
    pub fn new(coalesce: Duration) -> Pacing {
        Pacing {
            queued: Mutex::new(Queued::default()),
            hurry: tokio::sync::Notify::new(),
            coalesce,
            behind: Behind::new(),
            start: Instant::now(),
        }
    }

    /// Behind: a flush finds the flushing task writing a turn, or with sockets it has not
    /// got to yet (not those waiting for the next turn's time), or found that in the last
    /// `Behind::FOR_MS`.
    fn is_behind(&self) -> bool {
        let now_ms = self.start.elapsed().as_millis() as u64;
        let busy = {
            let queued = self.queued.lock().expect("pacing lock");
            queued.writing || (!queued.outboxes.is_empty() && !queued.pacing)
        };
        self.behind.is_behind(busy, now_ms)
    }

    /// Leaves `outboxes` to the flushing task, starting one if none is running. Queued
    /// `behind`, they wait for the next turn's time; otherwise the next turn begins at once.
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
        queued.due |= !behind;
        let start = !std::mem::replace(&mut queued.running, true);
        let hurry = !behind && queued.pacing;
        drop(queued);
        if start {
            runtime.spawn(self.clone().flushing());
        } else if hurry {
            self.hurry.notify_one();
        }
    }

    /// The flushing task: turns until nothing is queued, each beginning `coalesce` after
    /// the one before unless a flush that was not behind is among its sockets.
    async fn flushing(self: Arc<Self>) {
        let mut running = Running {
            pacing: self.clone(),
            ended: false,
        };
        let mut spare = Vec::new();
        loop {
            let wait = {
                let mut queued = self.queued.lock().expect("pacing lock");
                if queued.outboxes.is_empty() {
                    queued.running = false;
                    running.ended = true;
                    return;
                }
                let wait = queued
                    .last_turn
                    .map(|last| last + self.coalesce)
                    .filter(|_| !queued.due && !self.coalesce.is_zero());
                queued.pacing = wait.is_some();
                wait
            };
            // Only this task takes from the queue: what it saw is still there after the wait.
            if let Some(until) = wait {
                let sleep = tokio::time::sleep_until(until);
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        _ = &mut sleep => break,
                        _ = self.hurry.notified() => {
                            if self.queued.lock().expect("pacing lock").due {
                                break;
                            }
                        }
                    }
                }
            }
            let (turn, spans) = {
                let mut queued = self.queued.lock().expect("pacing lock");
                let turn = std::mem::replace(&mut queued.outboxes, spare);
                queued.pacing = false;
                queued.due = false;
                queued.writing = true;
                queued.last_turn = Some(tokio::time::Instant::now());
                (turn, std::mem::take(&mut queued.spans))
            };
            let writes = write_turn(turn);
            spare = match spans.first() {
                Some(span) => writes.instrument(span.clone()).await,
                None => writes.await,
            };
            self.queued.lock().expect("pacing lock").writing = false;
            drop(spans);
        }
    }
}

/// Writes a turn's sockets: by several tasks when there are more than `Flush::SPREAD` and
/// the runtime has several workers to run them (on one, they would only take turns with
/// each other, and whatever else waits would wait for all of them: measured, p99s rose by
/// 2-4 ms and the publisher fell behind at 300k deliveries/s,
/// bench/results/2026-12-04-coalesce-spread-one-worker.txt). Gives back the emptied vector.
async fn write_turn(mut turn: Vec<Arc<Outbox>>) -> Vec<Arc<Outbox>> {
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    let pieces = turn.len().div_ceil(Flush::SPREAD).clamp(1, workers.max(1));
    let size = turn.len().div_ceil(pieces);
    let mut writers = tokio::task::JoinSet::new();
    for _ in 1..pieces {
        let piece = turn.split_off(turn.len().saturating_sub(size));
        writers.spawn(async move { Writing::new(piece).write().await });
    }
    let mut first = Writing::new(turn);
    first.write().await;
    while writers.join_next().await.is_some() {}
    first.finish()
}

/// Sockets being written by one task. What is left unwritten when it is dropped early (a
/// panic, the runtime stopping) is handed to the connections' tasks.
struct Writing {
    outboxes: Vec<Arc<Outbox>>,
    done: usize,
}

impl Writing {
    fn new(outboxes: Vec<Arc<Outbox>>) -> Writing {
        Writing { outboxes, done: 0 }
    }

    async fn write(&mut self) {
        while self.done < self.outboxes.len() {
            let end = (self.done + Flush::CHUNK).min(self.outboxes.len());
            self.outboxes[self.done..end]
                .iter()
                .for_each(|outbox| outbox.flush());
            self.done = end;
            tokio::task::yield_now().await;
        }
    }

    fn finish(mut self) -> Vec<Arc<Outbox>> {
        let mut outboxes = std::mem::take(&mut self.outboxes);
        outboxes.clear();
        outboxes
    }
}

impl Drop for Writing {
    fn drop(&mut self) {
        let left = self.outboxes.get(self.done..).unwrap_or_default();
        left.iter().for_each(|outbox| outbox.wake());
    }
}

/// Marks the flushing task gone however it ends; one that ended early (a panic) leaves
/// what was queued after its turn to a new task. One that ended by itself (`ended`) has
/// already let go of `running`, which may by then belong to its successor.
struct Running {
    pacing: Arc<Pacing>,
    ended: bool,
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let mut queued = self.pacing.queued.lock().unwrap_or_else(|e| e.into_inner());
        let runtime = tokio::runtime::Handle::try_current().ok();
        let left = queued.running && !queued.outboxes.is_empty() && runtime.is_some();
        queued.writing = false;
        queued.pacing = false;
        queued.running = left;
        drop(queued);
        if let Some(runtime) = runtime.filter(|_| left) {
            runtime.spawn(self.pacing.clone().flushing());
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
            .field("pacing", &queued.pacing)
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
        // Behind: a larger fan-out waits for the flushing task's next turn, a small one not.
        assert_eq!(route(Flush::INLINE, true, true), Inline);
        assert_eq!(route(Flush::INLINE + 1, true, true), Queued);
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

    /// Reads `expected` from every client, and asserts it is what came.
    async fn received(pairs: &mut [(Arc<Outbox>, tokio::net::TcpStream)], expected: &[u8]) {
        for (_, client) in pairs {
            let mut got = vec![0u8; expected.len()];
            tokio::io::AsyncReadExt::read_exact(client, &mut got)
                .await
                .unwrap();
            assert_eq!(got, expected);
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
        received(&mut pairs, b"xyz").await;
    }

    /// Waiting out the pace is not being behind, and a flush that is not behind ends the
    /// wait: with a minute between turns, both groups are written within the test's patience.
    #[tokio::test]
    async fn a_flush_that_is_not_behind_ends_the_wait_for_the_next_turn() {
        let pacing = Arc::new(Pacing::new(std::time::Duration::from_secs(60)));
        let (mut paced, _) = outboxes(Flush::INLINE + 4).await;
        let (mut other, _) = outboxes(Flush::INLINE + 4).await;
        publish(&pacing, &paced, b"x", false);
        all_written(&paced).await;
        publish(&pacing, &paced, b"y", true);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(
            paced.iter().all(|(outbox, _)| outbox.held() == 1),
            "waiting for the next turn"
        );
        assert!(
            !pacing.is_behind(),
            "sockets waiting out the pace are not a node behind"
        );
        publish(&pacing, &other, b"z", false);
        all_written(&paced).await;
        all_written(&other).await;
        received(&mut paced, b"xy").await;
        received(&mut other, b"z").await;
    }

    /// Sockets a writer leaves unwritten (it panicked, or the runtime stopped) go to their
    /// connections' tasks.
    #[tokio::test]
    async fn sockets_left_unwritten_go_to_their_connections() {
        let (pairs, _) = outboxes(3).await;
        for (outbox, _) in &pairs {
            assert_eq!(outbox.push_later(Bytes::from_static(b"x")), Push::Deferred);
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        for (outbox, _) in &pairs {
            assert_eq!(outbox.poll_wait(&mut cx), Poll::Pending);
        }
        drop(Writing::new(pairs.iter().map(|(o, _)| o.clone()).collect()));
        for (outbox, _) in &pairs {
            assert_eq!(outbox.held(), 1);
            assert_eq!(outbox.poll_wait(&mut cx), Poll::Ready(()), "woken");
        }
    }

    /// A turn of more than `Flush::SPREAD` sockets on a runtime of two workers is shared by
    /// two tasks: each socket written once, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_turn_is_spread_over_several_writers() {
        let pacing = Arc::new(Pacing::new(std::time::Duration::ZERO));
        let (mut pairs, metrics) = outboxes(Flush::SPREAD * 2 + 10).await;
        publish(&pacing, &pairs, b"x", false);
        all_written(&pairs).await;
        assert_eq!(metrics.socket_writes.get(), pairs.len() as u64);
        received(&mut pairs, b"x").await;
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
        received(&mut pairs, b"xy").await;
    }
}
