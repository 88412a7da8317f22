//! One connection's outbound queue, bounded in bytes: the meeting point of fan-out and the socket.
//!
//! The hub, the session and the control API push encoded frames with [`Outbox::push`],
//! which never waits. On a plain TCP connection whose queue is empty, the push writes the
//! frame to the socket itself (a non-blocking `write`, under this outbox's lock, so nothing
//! can come between): the common case of a subscriber keeping up costs one system call and
//! no task wake-up. A fan-out queues its frame everywhere first and then writes to the idle
//! sockets with a [`Flush`], or, when the node is behind, wakes their connections so that
//! each writes all that accumulated at once. Whatever the socket does not take at once is
//! queued, and the connection's task drains it with [`Outbox::poll_drain`] (vectored
//! writes of everything queued, then the close frame, if one is scheduled) when the socket
//! is writable again; TLS connections are always drained that way. Every write happens
//! under this outbox's lock and a frame leaves the queue only once written, so the queue
//! holds every byte not yet written and a connection never holds more than `limit` bytes of
//! frames. On overflow the queued frames are dropped and a close with 4004 is scheduled:
//! the rest of the channel is never held back by one reader.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{
    AtomicBool, AtomicU64, AtomicUsize,
    Ordering::{AcqRel, Acquire, Relaxed, Release},
};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;
use bytes::{Buf, Bytes};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use crate::metrics::Metrics;
use crate::ws::close::{self, Close};

/// What became of a pushed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Written to the socket at once.
    Written,
    /// Queued for the connection's task (the socket was full, or this is TLS).
    Queued,
    /// Queued by [`Outbox::push_later`] on an idle socket: add the outbox to a [`Flush`].
    Deferred,
    /// This push overflowed the bound: the connection is now closing with 4004.
    Overflow,
    /// The connection is closing; the frame was dropped.
    Closed,
}

pub struct Outbox {
    state: Mutex<State>,
    /// The connection's task, woken when something is queued for it or a close scheduled.
    waker: AtomicWaker,
    woken: AtomicBool,
    limit: usize,
    metrics: Option<Arc<Metrics>>,
}

#[derive(Default)]
struct State {
    frames: VecDeque<Bytes>,
    /// Bytes in `frames` not yet written.
    queued: usize,
    close: Option<Close>,
    /// The close frame was queued (or the connection was lost): nothing more goes after it.
    close_taken: bool,
    /// [`Outbox::poll_drain`] told its caller the close frame is out (whoever wrote it).
    close_reported: bool,
    /// The first queued frame was partly written.
    front_started: bool,
    /// Bytes went to a writer that buffers (TLS) since its last flush.
    unflushed: bool,
    /// The socket, for writes made by [`Outbox::push`]; None on TLS connections and once
    /// the connection has finished.
    direct: Option<Arc<TcpStream>>,
}

/// What a [`Outbox::poll_drain`] got done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Everything queued is written (and flushed): nothing left to drain for now.
    pub done: bool,
    /// The close frame is written: the connection may end.
    pub close_sent: bool,
}

impl Push {
    /// The frame is on its way: written, or queued for the connection's task.
    pub fn accepted(self) -> bool {
        matches!(self, Push::Written | Push::Queued | Push::Deferred)
    }
}

// === impl Outbox ===

impl Outbox {
    /// An outbox whose frames only the connection's task writes (TLS).
    pub fn new(limit: usize) -> Outbox {
        Outbox {
            state: Mutex::new(State::default()),
            waker: AtomicWaker::new(),
            woken: AtomicBool::new(false),
            limit,
            metrics: None,
        }
    }

    /// Counts what the connection's task writes in `metrics` (TLS connections).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Outbox {
        self.metrics = Some(metrics);
        self
    }

    /// An outbox that writes to `tcp` itself when nothing is queued; its writes are counted
    /// in `metrics` like the drain's.
    pub fn direct(limit: usize, tcp: Arc<TcpStream>, metrics: Arc<Metrics>) -> Outbox {
        Outbox {
            state: Mutex::new(State {
                direct: Some(tcp),
                ..State::default()
            }),
            waker: AtomicWaker::new(),
            woken: AtomicBool::new(false),
            limit,
            metrics: Some(metrics),
        }
    }

    /// Writes or queues a frame without waiting. Never blocks on the socket.
    pub fn push(&self, frame: Bytes) -> Push {
        self.push_with(frame, false)
    }

    /// Queues a frame for a fan-out: when this connection's socket is idle, nothing is
    /// written or woken and [`Push::Deferred`] asks the caller to add the outbox to a
    /// [`Flush`], which writes to many sockets from one task (or wakes their connections).
    pub fn push_later(&self, frame: Bytes) -> Push {
        self.push_with(frame, true)
    }

    fn push_with(&self, frame: Bytes, later: bool) -> Push {
        let mut state = self.state.lock().expect("outbox lock");
        if state.close.is_some() {
            return Push::Closed;
        }
        if state.queued + frame.len() > self.limit {
            // The rest of a frame already partly written must still go, or the close frame
            // would land inside it.
            let keep = usize::from(state.front_started);
            state.frames.truncate(keep);
            state.queued = state.frames.front().map_or(0, Bytes::len);
            state.close = Some(Close::new(close::SLOW_CONSUMER, "slow consumer"));
            drop(state);
            self.wake();
            return Push::Overflow;
        }
        let was_empty = state.frames.is_empty();
        state.queued += frame.len();
        state.frames.push_back(frame);
        if was_empty && state.direct.is_some() {
            if later {
                return Push::Deferred;
            }
            if self.write_queued(&mut state) {
                return Push::Written;
            }
        }
        drop(state);
        if was_empty {
            self.wake();
        }
        Push::Queued
    }

    /// Writes what is queued straight to the socket; what the socket does not take at once
    /// is left to the connection's task.
    pub fn flush(&self) {
        let mut state = self.state.lock().expect("outbox lock");
        if state.frames.is_empty() || self.write_queued(&mut state) {
            return;
        }
        drop(state);
        self.wake();
    }

    /// Writes queued frames with non-blocking vectored writes until the queue is empty
    /// (true) or the socket takes no more (false). Called with the lock held, so nothing
    /// can come between these bytes and the drain's.
    fn write_queued(&self, state: &mut State) -> bool {
        let Some(tcp) = state.direct.clone() else {
            return false;
        };
        loop {
            let offered = state.frames.iter().take(MAX_SLICES).map(Bytes::len).sum();
            let result = match state.frames.len() {
                1 => tcp.try_write(&state.frames[0]),
                _ => with_slices(&state.frames, |slices| tcp.try_write_vectored(slices)),
            };
            // An error (the peer is gone) leaves the frames queued: the drain meets the
            // same error and ends the connection.
            let Ok(written) = result else {
                return false;
            };
            self.advance(state, written);
            if state.frames.is_empty() {
                return true;
            }
            if written < offered {
                return false;
            }
        }
    }

    /// Drops `written` bytes from the front of the queue and counts the write.
    fn advance(&self, state: &mut State, written: usize) {
        state.queued -= written;
        let mut left = written;
        let mut completed = 0;
        while left > 0 {
            let first = state.frames.front_mut().expect("written bytes were queued");
            if left >= first.len() {
                left -= first.len();
                state.frames.pop_front();
                completed += 1;
                state.front_started = false;
            } else {
                first.advance(left);
                left = 0;
                state.front_started = true;
            }
        }
        if let Some(metrics) = &self.metrics {
            metrics.record_write(1, completed, written);
        }
    }

    /// True when [`Outbox::poll_drain`] has something to do: frames queued, a close frame
    /// not yet queued, or bytes a buffering writer has not flushed.
    pub fn has_work(&self) -> bool {
        let state = self.state.lock().expect("outbox lock");
        !state.frames.is_empty()
            || (state.close.is_some() && !state.close_reported)
            || state.unflushed
    }

    /// Writes what is queued to `io` (the connection's own writing side), the close frame
    /// last, until everything is written and flushed or `io` takes no more. Ready once it
    /// wrote anything (so the caller can see progress) or finished; Pending, with `cx`
    /// registered, when `io` took nothing. Cancel-safe: progress is kept in the queue.
    pub fn poll_drain<W: AsyncWrite + Unpin>(
        &self,
        cx: &mut Context<'_>,
        io: &mut W,
    ) -> Poll<io::Result<Drained>> {
        let mut state = self.state.lock().expect("outbox lock");
        let mut progress = false;
        loop {
            if state.frames.is_empty() {
                let close = match state.close_taken {
                    false => state.close.as_ref(),
                    true => None,
                };
                if let Some(frame) = close.map(|c| crate::ws::frame::close(c.code, &c.reason)) {
                    state.queued += frame.len();
                    state.frames.push_back(frame);
                    state.close_taken = true;
                    continue;
                }
                if state.unflushed {
                    match Pin::new(&mut *io).poll_flush(cx) {
                        Poll::Ready(Ok(())) => state.unflushed = false,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending if progress => break,
                        Poll::Pending => return Poll::Pending,
                    }
                }
                state.close_reported = state.close_taken;
                return Poll::Ready(Ok(Drained {
                    done: true,
                    close_sent: state.close_taken,
                }));
            }
            let written = with_slices(&state.frames, |slices| {
                Pin::new(&mut *io).poll_write_vectored(cx, slices)
            });
            match written {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(written)) => {
                    self.advance(&mut state, written);
                    state.unflushed = true;
                    progress = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending if progress => break,
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(Drained {
            done: false,
            close_sent: false,
        }))
    }

    /// Schedules a close after the frames already queued. The first close wins;
    /// returns false when one was already scheduled.
    pub fn close(&self, close: Close) -> bool {
        let mut state = self.state.lock().expect("outbox lock");
        if state.close.is_some() {
            return false;
        }
        state.close = Some(close);
        drop(state);
        self.wake();
        true
    }

    /// What ended the connection: the close scheduled first (by the server, or the client's
    /// echoed), else 1006 (it ended without a close: the socket was lost).
    pub fn ended(&self) -> Close {
        self.state
            .lock()
            .expect("outbox lock")
            .close
            .clone()
            .unwrap_or_else(|| Close::new(close::ABNORMAL, "connection lost"))
    }

    /// Records why a connection is dropped without a close frame (a write failed or timed
    /// out), unless a close was scheduled already. Nothing is sent after this.
    pub fn lost(&self, reason: &str) {
        let mut state = self.state.lock().expect("outbox lock");
        if state.close.is_none() {
            state.close = Some(Close::new(close::ABNORMAL, reason));
            state.close_taken = true;
            state.close_reported = true;
            state.frames.clear();
            state.queued = 0;
            state.front_started = false;
            state.unflushed = false;
        }
    }

    /// True once a close is scheduled (by anyone).
    pub fn is_closing(&self) -> bool {
        self.state.lock().expect("outbox lock").close.is_some()
    }

    /// The connection is done with the socket: pushes only queue from now on, and the
    /// socket's descriptor is not kept open by this outbox.
    pub fn detach(&self) {
        self.state.lock().expect("outbox lock").direct = None;
    }

    /// Wakes the connection's task (or makes its next [`Outbox::poll_wait`] ready).
    fn wake(&self) {
        self.woken.store(true, Release);
        self.waker.wake();
    }

    /// Ready once something was queued for the connection's task or a close scheduled
    /// since the last time it was; only the connection's task waits.
    pub fn poll_wait(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.waker.register(cx.waker());
        match self.woken.swap(false, AcqRel) {
            true => Poll::Ready(()),
            false => Poll::Pending,
        }
    }

    /// Bytes held by this connection's queue, not yet written.
    pub fn held(&self) -> usize {
        self.state.lock().expect("outbox lock").queued
    }

    /// The frames queued now (a partly written one as what is left of it).
    #[cfg(test)]
    pub fn queued(&self) -> Vec<Bytes> {
        let state = self.state.lock().expect("outbox lock");
        state.frames.iter().cloned().collect()
    }
}

/// At most this many frames go to one vectored write.
const MAX_SLICES: usize = 64;

/// Calls `write` with the first frames as `IoSlice`s, built on the stack.
fn with_slices<R>(frames: &VecDeque<Bytes>, write: impl FnOnce(&[IoSlice<'_>]) -> R) -> R {
    let mut slices = [IoSlice::new(&[]); MAX_SLICES];
    let mut count = 0;
    for frame in frames.iter().take(MAX_SLICES) {
        slices[count] = IoSlice::new(frame);
        count += 1;
    }
    write(&slices[..count])
}

/// The outboxes a fan-out left to write ([`Push::Deferred`]). Their frames wait until it
/// runs (or until something else wakes their connections): it must not be dropped unrun.
#[derive(Default)]
#[must_use = "the queued frames are written only when the Flush runs"]
pub struct Flush(Vec<Arc<Outbox>>);

impl Flush {
    /// While the node keeps up, this many sockets are written by the publisher itself; the
    /// rest go to a task of their own, so that a publish returns once its frames are queued.
    const INLINE: usize = 16;
    /// A flushing task lets other tasks run after this many sockets (~0.6 ms of writes
    /// here): what else the node has to do, another publication's first subscribers among
    /// it, waits at most that long. With 256, the first subscriber of a publication sent
    /// while 10,000 others were being written waited 7.5-13 ms (p50); with 64, 2.8-4.9 ms,
    /// at the same CPU per delivery (BENCHMARKS.md, issue 6's sixth session).
    const CHUNK: usize = 64;
    /// Behind, a flush of at most this many sockets wakes their connections instead.
    const WAKE_MAX: usize = 2048;

    pub fn add(&mut self, outbox: &Arc<Outbox>) {
        self.0.push(outbox.clone());
    }

    pub fn append(&mut self, mut other: Flush) {
        self.0.append(&mut other.0);
    }

    /// Writes to every socket (see `Flush::INLINE`); called once the channel lock is
    /// released. When a flushing task (of any publication, in this process) is still
    /// writing, and for 100 ms after that was last seen, the node is behind: the sockets
    /// of a flush of at most `Flush::WAKE_MAX` are left to their connections' tasks
    /// instead, which by the time they run hold several publications each and write them
    /// together (see `FLUSHING`).
    pub fn run(self) {
        if self.0.is_empty() {
            return;
        }
        let behind = BEHIND.is_behind(FLUSHING.load(Acquire) > 0, elapsed_ms());
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
        if self.0.is_empty() {
            return;
        }
        let runtime = tokio::runtime::Handle::try_current();
        match (Self::route(self.0.len(), behind, runtime.is_ok()), runtime) {
            (Route::Wake, _) => self.0.iter().for_each(|outbox| outbox.wake()),
            (Route::Task, Ok(runtime)) => {
                // The first few at once: the first subscribers do not wait for a task switch.
                self.0[..Self::INLINE]
                    .iter()
                    .for_each(|outbox| outbox.flush());
                let running = Flushing::start();
                runtime.spawn(async move {
                    let _running = running;
                    for chunk in self.0[Self::INLINE..].chunks(Self::CHUNK) {
                        chunk.iter().for_each(|outbox| outbox.flush());
                        tokio::task::yield_now().await;
                    }
                });
            }
            (Route::Inline | Route::Task, _) => self.0.iter().for_each(|outbox| outbox.flush()),
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

/// Flushing tasks still writing, in this process. Under load a publication's frames reach
/// sockets that still hold the previous ones: written by one flushing task per publication,
/// each socket would still take one write per frame (S5 at 200k deliveries/s of 1 KiB
/// saturated the core at 1.5 frames per write); woken instead, each connection's task
/// drains its whole queue at once (2.5 to 3 frames per write, and the same load at 5 CPU-s
/// per million: BENCHMARKS.md, issue 6's fifth session). A heuristic shared by every node
/// of the process (two publications in a row can look "behind" without a real lag, which
/// costs a task switch, nothing else): either way every frame is written, in order.
static FLUSHING: AtomicUsize = AtomicUsize::new(0);

/// Whether the node is behind (see [`FLUSHING`]), for the process.
static BEHIND: Behind = Behind::new();

/// Once a flush finds an earlier one still writing, publications are left to the
/// connections' tasks for `Behind::FOR_MS`: a flushing task started between two of them
/// would write one frame per socket again.
struct Behind {
    /// Until when (milliseconds since [`elapsed_ms`]'s start).
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

/// Milliseconds since the first call, from the monotonic clock.
fn elapsed_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// Counts one flushing task in [`FLUSHING`] for as long as it lives.
struct Flushing;

impl Flushing {
    fn start() -> Flushing {
        FLUSHING.fetch_add(1, AcqRel);
        Flushing
    }
}

impl Drop for Flushing {
    fn drop(&mut self) {
        FLUSHING.fetch_sub(1, AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;

    /// Drains into memory (a writer that takes everything at once).
    fn drain(outbox: &Outbox) -> (Vec<u8>, Drained) {
        let mut out = Vec::new();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match outbox.poll_drain(&mut cx, &mut out) {
            Poll::Ready(Ok(drained)) => (out, drained),
            other => panic!("a Vec takes everything: {other:?}"),
        }
    }

    #[test]
    fn bounded_in_bytes() {
        let outbox = Outbox::new(10);
        assert_eq!(outbox.push(Bytes::from_static(b"12345")), Push::Queued);
        assert_eq!(outbox.push(Bytes::from_static(b"12345")), Push::Queued);
        assert_eq!(outbox.held(), 10);
        assert!(outbox.has_work());
        assert_eq!(outbox.push(Bytes::from_static(b"1")), Push::Overflow);
        assert_eq!(outbox.push(Bytes::from_static(b"1")), Push::Closed);
        let (out, drained) = drain(&outbox);
        assert_eq!(
            out,
            &crate::ws::frame::close(4004, "slow consumer")[..],
            "queued frames are dropped on overflow, the close is sent"
        );
        assert_eq!(
            drained,
            Drained {
                done: true,
                close_sent: true
            }
        );
        assert!(!outbox.has_work(), "the close is sent once");
        assert_eq!(drain(&outbox).0, b"");
    }

    /// A connected pair whose server side is known writable to tokio.
    async fn pair() -> (Arc<TcpStream>, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        server.writable().await.unwrap();
        (Arc::new(server), client)
    }

    #[tokio::test]
    async fn idle_sockets_are_written_directly_and_in_order() {
        use tokio::io::AsyncReadExt;
        let (server, mut client) = pair().await;
        let metrics = Arc::new(Metrics::default());
        let outbox = Outbox::direct(64 << 20, server.clone(), metrics.clone());
        assert_eq!(outbox.push(Bytes::from_static(b"one ")), Push::Written);
        assert_eq!(
            outbox.push_later(Bytes::from_static(b"two ")),
            Push::Deferred
        );
        assert_eq!(
            outbox.push_later(Bytes::from_static(b"three ")),
            Push::Queued,
            "already waiting for a flush"
        );
        outbox.flush();
        assert_eq!(outbox.held(), 0);
        let mut got = vec![0; 14];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"one two three ");
        assert_eq!(metrics.messages_sent.load(Relaxed), 3);
        assert_eq!(metrics.socket_writes.load(Relaxed), 2);

        // A client that does not read fills the socket: what it does not take stays queued,
        // whole frames and the rest of a partly written one, in order.
        let mut pushed = Vec::new();
        let mut i = 0u32;
        loop {
            let frame = Bytes::from(vec![(i % 251) as u8; 65_536 + i as usize]);
            pushed.extend_from_slice(&frame);
            i += 1;
            if outbox.push(frame) == Push::Queued {
                break;
            }
        }
        assert!(outbox.held() > 0);
        assert_eq!(outbox.push(Bytes::from_static(b"end")), Push::Queued);
        pushed.extend_from_slice(b"end");
        let expected = pushed.len();
        let reader = tokio::spawn(async move {
            let mut got = vec![0; expected];
            client.read_exact(&mut got).await.unwrap();
            got
        });
        while outbox.held() > 0 {
            server.writable().await.unwrap();
            outbox.flush();
        }
        assert!(reader.await.unwrap() == pushed, "every byte, in order");
    }

    #[tokio::test]
    async fn overflow_keeps_the_rest_of_a_partly_written_frame() {
        let (server, _client) = pair().await;
        let limit = 256 << 10;
        let outbox = Outbox::direct(limit, server, Arc::new(Metrics::default()));
        // The client never reads: the socket fills, and some frame is written only in part,
        // or not at all.
        let mut last = 0;
        for i in 0..10_000u32 {
            last = 100_000 + i as usize;
            if outbox.push(Bytes::from(vec![1; last])) == Push::Queued {
                break;
            }
        }
        let held = outbox.held();
        assert!(held > 0 && held <= last);
        let partly_written = held < last;
        assert_eq!(
            outbox.push(Bytes::from(vec![2; limit])),
            Push::Overflow,
            "over the bound"
        );
        assert_eq!(outbox.ended().code, close::SLOW_CONSUMER);
        let frames = outbox.queued();
        if partly_written {
            assert_eq!(
                frames.len(),
                1,
                "the started frame is finished before the close"
            );
            assert_eq!(frames[0].len(), held);
        } else {
            assert!(frames.is_empty(), "whole frames are dropped");
        }
    }

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
        let mut flush = Flush::default();
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

        let mut flush = Flush::default();
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

    #[test]
    fn close_follows_queued_frames_and_first_wins() {
        let outbox = Outbox::new(100);
        outbox.push(Bytes::from_static(b"a"));
        assert!(outbox.close(Close::new(4006, "bye")));
        assert!(!outbox.close(Close::new(1001, "later")));
        let mut expected = b"a".to_vec();
        expected.extend_from_slice(&crate::ws::frame::close(4006, "bye"));
        assert_eq!(drain(&outbox).0, expected);
    }
}
