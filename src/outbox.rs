//! One connection's outbound queue, bounded in bytes: the meeting point of fan-out and the socket.
//!
//! The hub, the session and the control API push encoded frames with [`Outbox::push`],
//! which never waits; the connection's writer (`ws::writer`) drains everything queued with
//! [`Outbox::take`] and writes it in one vectored write. Frames taken but not yet written
//! still count against the bound until [`Outbox::release`], so a connection never holds
//! more than `limit` bytes of frames. On overflow the queued frames are dropped and a
//! close with 4004 is scheduled: the rest of the channel is never held back by one reader.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::ws::close::{self, Close};

/// What became of a pushed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// This push overflowed the bound: the connection is now closing with 4004.
    Overflow,
    /// The connection is closing; the frame was dropped.
    Closed,
}

pub struct Outbox {
    state: Mutex<State>,
    wake: Notify,
    limit: usize,
}

#[derive(Default)]
struct State {
    frames: VecDeque<Bytes>,
    queued: usize,
    in_flight: usize,
    close: Option<Close>,
    /// The close was handed to the writer; nothing more is queued after it.
    close_taken: bool,
}

// === impl Outbox ===

impl Outbox {
    pub fn new(limit: usize) -> Outbox {
        Outbox {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            limit,
        }
    }

    /// Queues a frame without waiting. Never blocks on the socket.
    pub fn push(&self, frame: Bytes) -> Push {
        let mut state = self.state.lock().expect("outbox lock");
        if state.close.is_some() {
            return Push::Closed;
        }
        if state.queued + state.in_flight + frame.len() > self.limit {
            state.frames.clear();
            state.queued = 0;
            state.close = Some(Close::new(close::SLOW_CONSUMER, "slow consumer"));
            drop(state);
            self.wake.notify_one();
            return Push::Overflow;
        }
        let was_empty = state.frames.is_empty();
        state.queued += frame.len();
        state.frames.push_back(frame);
        drop(state);
        if was_empty {
            self.wake.notify_one();
        }
        Push::Queued
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
        self.wake.notify_one();
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
            state.frames.clear();
            state.queued = 0;
        }
    }

    /// True once a close is scheduled (by anyone).
    pub fn is_closing(&self) -> bool {
        self.state.lock().expect("outbox lock").close.is_some()
    }

    /// Moves every queued frame into `frames` (which the writer reuses) and returns the close
    /// to send after them, once.
    pub fn take(&self, frames: &mut Vec<Bytes>) -> Option<Close> {
        let mut state = self.state.lock().expect("outbox lock");
        state.in_flight += state.queued;
        state.queued = 0;
        frames.extend(state.frames.drain(..));
        if state.close.is_some() && !state.close_taken {
            state.close_taken = true;
            return state.close.clone();
        }
        None
    }

    /// The writer wrote what it took.
    pub fn release(&self) {
        self.state.lock().expect("outbox lock").in_flight = 0;
    }

    /// Resolves after something was queued or a close scheduled (or [`Outbox::poke`]).
    pub async fn wait(&self) {
        self.wake.notified().await
    }

    /// Wakes the writer to re-read its timers (for example after a token refresh).
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    /// Bytes held by this connection's queue, in flight included.
    pub fn held(&self) -> usize {
        let state = self.state.lock().expect("outbox lock");
        state.queued + state.in_flight
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_in_bytes_with_in_flight_counted() {
        let outbox = Outbox::new(10);
        assert_eq!(outbox.push(Bytes::from_static(b"12345")), Push::Queued);
        let mut frames = Vec::new();
        assert_eq!(outbox.take(&mut frames), None);
        assert_eq!(frames.len(), 1);
        assert_eq!(outbox.push(Bytes::from_static(b"12345")), Push::Queued);
        assert_eq!(outbox.held(), 10);
        // The first frame is still being written: one more byte overflows.
        assert_eq!(outbox.push(Bytes::from_static(b"1")), Push::Overflow);
        assert_eq!(outbox.push(Bytes::from_static(b"1")), Push::Closed);
        frames.clear();
        let close = outbox.take(&mut frames).unwrap();
        assert!(frames.is_empty(), "queued frames are dropped on overflow");
        assert_eq!(close.code, 4004);
        assert_eq!(outbox.take(&mut frames), None, "the close is taken once");
    }

    #[test]
    fn close_follows_queued_frames_and_first_wins() {
        let outbox = Outbox::new(100);
        outbox.push(Bytes::from_static(b"a"));
        assert!(outbox.close(Close::new(4006, "bye")));
        assert!(!outbox.close(Close::new(1001, "later")));
        let mut frames = Vec::new();
        assert_eq!(outbox.take(&mut frames).unwrap().code, 4006);
        assert_eq!(frames.len(), 1);
    }
}
