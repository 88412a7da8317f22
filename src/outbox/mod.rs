//! One connection's outbound queue, bounded in bytes: the meeting point of fan-out and the socket.
//!
//! The hub, the session and the control API push encoded frames with [`Outbox::push`],
//! which never waits. On a plain TCP connection whose queue is empty, the push writes the
//! frame to the socket itself (a non-blocking `write`, under this outbox's lock, so nothing
//! can come between): the common case of a subscriber keeping up costs one system call and
//! no task wake-up. A fan-out queues its frame everywhere first and then writes to the idle
//! sockets with a [`Flush`], or, when the node is behind, leaves them to the node's flushing
//! task, which writes each once with all that accumulated for it. Whatever the socket does not take at once is
//! queued, and the connection's task drains it with [`Outbox::poll_drain`] (vectored
//! writes of everything queued, then the close frame, if one is scheduled) when the socket
//! is writable again; TLS connections are always drained that way. Every write happens
//! under this outbox's lock and a frame leaves the queue only once written, so the queue
//! holds every byte not yet written and a connection never holds more than `limit` bytes of
//! frames. On overflow the queued frames are dropped and a close with 4004 is scheduled:
//! the rest of the channel is never held back by one reader, unless the queue holds
//! publications of channels whose `slow_consumer` policy keeps the connection (a [`Tag`]):
//! then the oldest of those make room, and a `lost` push tells the client which. With
//! `conflate`, a queued publication is replaced by a newer one with the same key.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{
    AtomicBool,
    Ordering::{AcqRel, Release},
};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;
use bytes::{Buf, Bytes};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use crate::metrics::Metrics;
use crate::wire::close::{self, Close};
use crate::wire::message::ServerMessage;

mod flush;

pub use flush::{Flush, Pacing};

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

/// A publication in subscribers' queues whose channel's `slow_consumer` policy lets it be
/// dropped (or replaced) instead of closing the connection; one per fan-out, shared.
#[derive(Debug)]
pub struct Tag {
    pub channel: Arc<str>,
    /// 0 when the channel keeps no history.
    pub offset: u64,
    /// The `conflate_by` value (its JSON text), when the channel conflates and the data
    /// has the field.
    pub key: Option<Box<[u8]>>,
}

impl Tag {
    fn replaces(&self, older: &Tag) -> bool {
        self.key.is_some() && self.key == older.key && self.channel == older.channel
    }
}

/// A frame waiting for the socket.
struct Queued {
    frame: Bytes,
    tag: Option<Arc<Tag>>,
}

impl Queued {
    fn plain(frame: Bytes) -> Queued {
        Queued { frame, tag: None }
    }
}

pub struct Outbox {
    state: Mutex<Queue>,
    /// The connection's task, woken when something is queued for it or a close scheduled.
    waker: AtomicWaker,
    woken: AtomicBool,
    limit: usize,
    metrics: Option<Arc<Metrics>>,
}

#[derive(Default)]
struct Queue {
    frames: VecDeque<Queued>,
    /// Bytes in `frames` not yet written.
    queued: usize,
    close: Option<Close>,
    /// The close frame was queued (or the connection was lost): nothing more goes after it.
    close_taken: bool,
    /// [`Outbox::poll_drain`] told its caller the close frame is out (whoever wrote it).
    close_reported: bool,
    /// The scheduled close answers the client's own Close: its code was received, whether
    /// or not the answer gets written.
    close_received: bool,
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
            state: Mutex::new(Queue::default()),
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
            state: Mutex::new(Queue {
                direct: Some(tcp),
                ..Queue::default()
            }),
            waker: AtomicWaker::new(),
            woken: AtomicBool::new(false),
            limit,
            metrics: Some(metrics),
        }
    }

    /// Writes or queues a frame without waiting. Never blocks on the socket.
    pub fn push(&self, frame: Bytes) -> Push {
        self.push_with(frame, None, false)
    }

    /// Queues a frame for a fan-out: when this connection's socket is idle, nothing is
    /// written or woken and [`Push::Deferred`] asks the caller to add the outbox to a
    /// [`Flush`], which writes to many sockets at once (or leaves them to the node's flushing task).
    pub fn push_later(&self, frame: Bytes) -> Push {
        self.push_with(frame, None, true)
    }

    /// [`Outbox::push_later`] for a publication, with its [`Tag`] when its channel's policy
    /// lets it be dropped or replaced.
    pub fn push_publication(&self, frame: Bytes, tag: Option<&Arc<Tag>>) -> Push {
        self.push_with(frame, tag, true)
    }

    fn push_with(&self, frame: Bytes, tag: Option<&Arc<Tag>>, later: bool) -> Push {
        let mut state = self.state.lock().expect("outbox lock");
        if state.close.is_some() {
            return Push::Closed;
        }
        if let Some(tag) = tag.filter(|t| t.key.is_some()) {
            conflate(&mut state, tag);
        }
        if state.queued + frame.len() > self.limit && !self.make_room(&mut state, frame.len()) {
            // The rest of a frame already partly written must still go, or the close frame
            // would land inside it.
            let keep = usize::from(state.front_started);
            state.frames.truncate(keep);
            state.queued = state.frames.front().map_or(0, |q| q.frame.len());
            state.close = Some(Close::new(close::SLOW_CONSUMER, "slow consumer"));
            drop(state);
            self.wake();
            return Push::Overflow;
        }
        let was_empty = state.frames.is_empty();
        state.queued += frame.len();
        state.frames.push_back(Queued {
            frame,
            tag: tag.cloned(),
        });
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
    fn write_queued(&self, state: &mut Queue) -> bool {
        let Some(tcp) = state.direct.clone() else {
            return false;
        };
        loop {
            let offered = state
                .frames
                .iter()
                .take(MAX_SLICES)
                .map(|q| q.frame.len())
                .sum();
            let result = match state.frames.len() {
                1 => tcp.try_write(&state.frames[0].frame),
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
    fn advance(&self, state: &mut Queue, written: usize) {
        state.queued -= written;
        let mut left = written;
        let mut completed = 0;
        while left > 0 {
            let first = &mut state
                .frames
                .front_mut()
                .expect("written bytes were queued")
                .frame;
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
                if let Some(frame) = close.map(|c| crate::wire::frame::close(c.code, &c.reason)) {
                    state.queued += frame.len();
                    state.frames.push_back(Queued::plain(frame));
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
    pub fn schedule_close(&self, close: Close) -> bool {
        let mut state = self.state.lock().expect("outbox lock");
        if state.close.is_some() {
            return false;
        }
        state.close = Some(close);
        drop(state);
        self.wake();
        true
    }

    /// Schedules the answer to the client's Close (its code echoed): like
    /// [`Outbox::schedule_close`], but the code counts as received even if the answer is
    /// never written.
    pub fn schedule_answer(&self, close: Close) -> bool {
        let mut state = self.state.lock().expect("outbox lock");
        if state.close.is_some() {
            return false;
        }
        state.close = Some(close);
        state.close_received = true;
        drop(state);
        self.wake();
        true
    }

    /// What ended the connection: the close sent or received (the client's, echoed), else
    /// 1006 (it ended without a close: the socket was lost, or a close could not be written).
    pub fn ended(&self) -> Close {
        self.state
            .lock()
            .expect("outbox lock")
            .close
            .clone()
            .unwrap_or_else(|| Close::new(close::ABNORMAL, "connection lost"))
    }

    /// Records why a connection is dropped without a close frame (a write failed or timed
    /// out, the peer went away), unless a close was already written or received: a close
    /// scheduled but never written is not what the client saw. Nothing is sent after this.
    pub fn lost(&self, reason: &str) {
        let mut state = self.state.lock().expect("outbox lock");
        if !(state.close_reported || state.close_received) {
            let reason = match &state.close {
                // Said, so that the event still tells why the server was closing it.
                Some(unsent) => {
                    format!("{reason} before its close {} could be written", unsent.code)
                }
                None => reason.to_string(),
            };
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
    pub(crate) fn wake(&self) {
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
        state.frames.iter().map(|q| q.frame.clone()).collect()
    }

    /// Drops the oldest tagged publications (never a frame partly written) until `need`
    /// more bytes fit beside the `lost` pushes that name them, which take the first one's
    /// place;
    /// false, with nothing dropped, when they cannot make that room.
    fn make_room(&self, state: &mut Queue, need: usize) -> bool {
        let start = usize::from(state.front_started);
        let mut dropped: Vec<usize> = Vec::new();
        let mut lost: Vec<LostRange> = Vec::new();
        let mut freed = 0;
        // A `lost` push costs its channel's name and some 60 bytes of JSON and header.
        let reserve =
            |lost: &[LostRange]| -> usize { lost.iter().map(|r| r.channel.len() + 80).sum() };
        for (i, queued) in state.frames.iter().enumerate().skip(start) {
            if state.queued - freed + need + reserve(&lost) <= self.limit {
                break;
            }
            let Some(tag) = &queued.tag else { continue };
            freed += queued.frame.len();
            dropped.push(i);
            match lost.iter_mut().find(|r| r.channel == tag.channel) {
                Some(range) => range.add(tag.offset),
                None => lost.push(LostRange::new(tag)),
            }
        }
        let frames: Vec<Bytes> = lost.iter().map(LostRange::frame).collect();
        let added: usize = frames.iter().map(Bytes::len).sum();
        if dropped.is_empty() || state.queued - freed + need + added > self.limit {
            return false;
        }
        let mut index = 0;
        let mut next = dropped.iter().peekable();
        state.frames.retain(|_| {
            let drop = next.peek().is_some_and(|&&d| d == index);
            if drop {
                next.next();
            }
            index += 1;
            !drop
        });
        // Where the first dropped publication was: before everything that came after it.
        for (at, frame) in frames.into_iter().enumerate() {
            state.frames.insert(dropped[0] + at, Queued::plain(frame));
        }
        state.queued = state.queued - freed + added;
        if let Some(metrics) = &self.metrics {
            metrics.record_dropped(dropped.len());
        }
        true
    }
}

/// The publications of one channel a [`Outbox::make_room`] dropped.
struct LostRange {
    channel: Arc<str>,
    count: u64,
    /// The lowest and highest offsets; (0, 0) without history.
    offsets: (u64, u64),
}

impl LostRange {
    fn new(tag: &Tag) -> LostRange {
        LostRange {
            channel: tag.channel.clone(),
            count: 1,
            offsets: (tag.offset, tag.offset),
        }
    }

    fn add(&mut self, offset: u64) {
        self.count += 1;
        self.offsets = (self.offsets.0.min(offset), self.offsets.1.max(offset));
    }

    fn frame(&self) -> Bytes {
        ServerMessage::Lost {
            channel: &self.channel,
            count: self.count,
            offsets: (self.offsets.1 > 0).then_some(self.offsets),
        }
        .frame()
    }
}

/// Removes the queued publication `tag` replaces (never a frame partly written).
fn conflate(state: &mut Queue, tag: &Tag) {
    let start = usize::from(state.front_started);
    let older = state
        .frames
        .iter()
        .skip(start)
        .position(|q| q.tag.as_ref().is_some_and(|t| tag.replaces(t)));
    if let Some(i) = older {
        let old = state.frames.remove(start + i).expect("found");
        state.queued -= old.frame.len();
    }
}

/// At most this many frames go to one vectored write.
const MAX_SLICES: usize = 64;

/// Calls `write` with the first frames as `IoSlice`s, built on the stack.
fn with_slices<R>(frames: &VecDeque<Queued>, write: impl FnOnce(&[IoSlice<'_>]) -> R) -> R {
    let mut slices = [IoSlice::new(&[]); MAX_SLICES];
    let mut count = 0;
    for queued in frames.iter().take(MAX_SLICES) {
        slices[count] = IoSlice::new(&queued.frame);
        count += 1;
    }
    write(&slices[..count])
}

#[cfg(test)]
mod tests;
