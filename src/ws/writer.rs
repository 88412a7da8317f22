//! A connection's writer: drains what its socket did not take at once.
//!
//! Spawned by the session next to the reader. A frame pushed to an idle plain-TCP socket is
//! written by the push itself ([`Outbox::push`]); the writer drains the rest of the
//! connection's [`Outbox`] (every frame queued since the last write, in one vectored write,
//! then a flush) when the socket was full or busy, and on TLS connections. It owns the
//! connection's clocks: the connect deadline, the heartbeat (a `ping` push every
//! ping_interval, close 4007 when no `pong` follows within pong_timeout), the token's
//! expiry (close 4002) and the write timeout (the socket is dropped). It sends at most one
//! Close frame, then waits a bounded time for the reader to see the client's answer.

use std::io::IoSlice;
use std::sync::atomic::{
    AtomicBool, AtomicU64,
    Ordering::{AcqRel, Acquire, Relaxed, Release},
};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::ws::close::{self, Close};
use crate::ws::{frame, protocol};

/// How long the writer waits for the client to answer its Close before dropping the socket.
pub const CLOSE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// What the reader tells the writer about the connection, without a lock.
#[derive(Default)]
pub struct Liveness {
    authenticated: AtomicBool,
    /// Token expiry, seconds since the Unix epoch.
    expires_at: AtomicU64,
    pong_seen: AtomicBool,
    /// Set when a deadline changed (authentication, refresh): the writer re-reads its clock.
    changed: AtomicBool,
}

impl Liveness {
    pub fn authenticate(&self, expires_at: u64) {
        self.expires_at.store(expires_at, Relaxed);
        self.authenticated.store(true, Release);
        self.changed.store(true, Release);
    }
    pub fn set_expiry(&self, expires_at: u64) {
        self.expires_at.store(expires_at, Relaxed);
        self.changed.store(true, Release);
    }
    fn take_changed(&self) -> bool {
        self.changed.load(Relaxed) && self.changed.swap(false, AcqRel)
    }
    pub fn pong(&self) {
        self.pong_seen.store(true, Relaxed);
    }
}

/// The connection's deadlines: a pure state machine driven by the writer with `now`.
pub struct Clock {
    connect_deadline: Instant,
    next_ping: Option<Instant>,
    pong_deadline: Option<Instant>,
}

/// Far enough to mean "no deadline".
const NEVER: Duration = Duration::from_secs(365 * 24 * 3600);

impl Clock {
    pub fn new(now: Instant, config: &Config) -> Clock {
        Clock {
            connect_deadline: now + config.connect_timeout,
            next_ping: None,
            pong_deadline: None,
        }
    }

    /// Acts on every deadline passed at `now` (`unix`: seconds since the Unix epoch) by queueing
    /// a ping or scheduling a close, and returns when to look again.
    pub fn tick(
        &mut self,
        live: &Liveness,
        config: &Config,
        outbox: &Outbox,
        now: Instant,
        unix: u64,
    ) -> Instant {
        if !live.authenticated.load(Acquire) {
            if now >= self.connect_deadline {
                outbox.close(Close::new(
                    close::UNAUTHORIZED,
                    "no connect within connect_timeout",
                ));
                return now + NEVER;
            }
            return self.connect_deadline;
        }
        let ping_at = *self.next_ping.get_or_insert(now + config.ping_interval);
        if let Some(deadline) = self.pong_deadline {
            if now >= deadline {
                if !live.pong_seen.load(Relaxed) {
                    outbox.close(Close::new(close::TIMEOUT, "no pong within pong_timeout"));
                    return now + NEVER;
                }
                self.pong_deadline = None;
            }
        }
        // A new ping waits for the previous pong's deadline, whatever the two settings are.
        if self.pong_deadline.is_none() && now >= ping_at {
            live.pong_seen.store(false, Relaxed);
            outbox.push(frame::text(protocol::PING));
            self.next_ping = Some(now + config.ping_interval);
            self.pong_deadline = Some(now + config.pong_timeout);
        }
        let expires = live
            .expires_at
            .load(Relaxed)
            .saturating_add(config.token.leeway.as_secs());
        if unix >= expires {
            outbox.close(Close::new(close::TOKEN_EXPIRED, "token expired"));
            return now + NEVER;
        }
        let timer = match self.pong_deadline {
            Some(deadline) => deadline,
            None => self.next_ping.unwrap_or(ping_at),
        };
        timer.min(now + Duration::from_secs(expires - unix).min(NEVER))
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub struct Writer<W> {
    pub io: W,
    pub outbox: Arc<Outbox>,
    pub live: Arc<Liveness>,
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    /// Ends this connection now (the reader ended, or the server gave up waiting).
    pub conn: CancellationToken,
    /// The server is shutting down: close with 1001.
    pub shutdown: CancellationToken,
}

// === impl Writer ===

impl<W: AsyncWrite + Unpin> Writer<W> {
    /// Takes `&mut self`: spawned as `async move { writer.run().await }`, which holds the
    /// writer once (an async fn taking `mut self` would hold it twice).
    pub async fn run(&mut self) {
        let mut clock = Clock::new(Instant::now(), &self.config);
        let mut frames: Vec<Bytes> = Vec::new();
        // Registered once: re-creating these futures on every wakeup costs a lock each.
        let conn_cancelled = self.conn.clone().cancelled_owned();
        let shutdown = self.shutdown.clone().cancelled_owned();
        let sleep = sleep_until(Instant::now());
        tokio::pin!(conn_cancelled, shutdown, sleep);
        let mut timers_due = true;
        let mut draining = false;
        let mut shutting_down = false;
        loop {
            if timers_due || self.live.take_changed() {
                let next = clock.tick(
                    &self.live,
                    &self.config,
                    &self.outbox,
                    Instant::now(),
                    unix_now(),
                );
                sleep.as_mut().reset(next);
                timers_due = false;
            }
            let close = self.outbox.take(&mut frames);
            if !frames.is_empty() {
                let written = self.write(&frames).await;
                frames.clear();
                self.outbox.release();
                if !written {
                    break;
                }
            }
            if let Some(close) = close {
                if self.write(&[frame::close(close.code, &close.reason)]).await && !draining {
                    let _ = timeout(CLOSE_HANDSHAKE_TIMEOUT, &mut conn_cancelled).await;
                }
                break;
            }
            if draining {
                break;
            }
            tokio::select! {
                biased;
                _ = &mut conn_cancelled => draining = true,
                _ = &mut shutdown, if !shutting_down => {
                    shutting_down = true;
                    self.outbox.close(Close::new(close::GOING_AWAY, "server shutting down"));
                }
                _ = self.outbox.wait() => {}
                () = &mut sleep => timers_due = true,
            }
        }
        self.outbox.detach();
        let _ = timeout(self.config.write_timeout, self.io.shutdown()).await;
        self.conn.cancel();
    }

    /// Writes `frames` within write_timeout; false when the socket is gone or too slow.
    async fn write(&mut self, frames: &[Bytes]) -> bool {
        match timeout(self.config.write_timeout, write_all(&mut self.io, frames)).await {
            Ok(Ok(writes)) => {
                let bytes = frames.iter().map(Bytes::len).sum();
                self.metrics.record_write(writes, frames.len(), bytes);
                true
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "write failed");
                self.outbox.lost("write failed");
                false
            }
            Err(_) => {
                Metrics::inc(&self.metrics.write_timeouts);
                tracing::debug!("write timed out; dropping the connection");
                self.outbox.lost("write timed out");
                false
            }
        }
    }
}

/// Writes every frame with as few vectored writes as the socket allows, then flushes;
/// returns how many writes it took.
async fn write_all<W: AsyncWrite + Unpin>(io: &mut W, frames: &[Bytes]) -> std::io::Result<usize> {
    const MAX_SLICES: usize = 64;
    let mut index = 0;
    let mut offset = 0;
    let mut writes = 0;
    while index < frames.len() {
        // The slices are built on the stack inside each poll, not kept in this future: an
        // array held across an await would add a kilobyte to every connection's writer.
        let mut written = std::future::poll_fn(|cx| {
            let mut slices: [IoSlice<'_>; MAX_SLICES] = [IoSlice::new(&[]); MAX_SLICES];
            let mut count = 0;
            for (i, f) in frames[index..].iter().take(MAX_SLICES).enumerate() {
                slices[i] = IoSlice::new(if i == 0 { &f[offset..] } else { &f[..] });
                count += 1;
            }
            std::pin::Pin::new(&mut *io).poll_write_vectored(cx, &slices[..count])
        })
        .await?;
        writes += 1;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let left = frames[index].len() - offset;
            if written >= left {
                written -= left;
                index += 1;
                offset = 0;
            } else {
                offset += written;
                written = 0;
            }
        }
    }
    io.flush().await?;
    Ok(writes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn write_all_survives_partial_writes() {
        // A pipe with a tiny buffer forces many short writes.
        let (mut a, mut b) = tokio::io::duplex(7);
        let frames: Vec<Bytes> = (0..100u8)
            .map(|i| Bytes::from(vec![i; (i as usize % 13) + 1]))
            .collect();
        let expected: Vec<u8> = frames.iter().flat_map(|f| f.to_vec()).collect();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut b, &mut got)
                .await
                .unwrap();
            got
        });
        write_all(&mut a, &frames).await.unwrap();
        drop(a);
        assert_eq!(reader.await.unwrap(), expected);
    }

    #[test]
    fn clock_deadlines() {
        let config = Config::from_layers(
            None,
            &[],
            &[
                ("connect_timeout".into(), "10s".into()),
                ("ping_interval".into(), "25s".into()),
                ("pong_timeout".into(), "10s".into()),
                ("token_leeway".into(), "5s".into()),
            ],
        )
        .unwrap();
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let unix0 = 1_000_000;
        let live = Liveness::default();
        let outbox = Outbox::new(1 << 20);
        let mut clock = Clock::new(t0, &config);
        let mut frames = Vec::new();
        // Unauthenticated: the connect deadline.
        assert_eq!(clock.tick(&live, &config, &outbox, s(1), unix0), s(10));
        live.authenticate(unix0 + 100);
        assert!(live.take_changed() && !live.take_changed());
        // First ping 25 s after authentication.
        assert_eq!(clock.tick(&live, &config, &outbox, s(2), unix0 + 2), s(27));
        assert_eq!(
            clock.tick(&live, &config, &outbox, s(27), unix0 + 27),
            s(37),
            "ping sent, pong due"
        );
        assert_eq!(outbox.take(&mut frames), None);
        assert_eq!(&frames[0][2..], protocol::PING);
        live.pong();
        assert_eq!(
            clock.tick(&live, &config, &outbox, s(37), unix0 + 37),
            s(52),
            "pong seen: next ping"
        );
        // Expiry (exp 100 + leeway 5) comes before the next ping.
        assert_eq!(
            clock.tick(&live, &config, &outbox, s(52), unix0 + 52),
            s(62)
        );
        live.pong();
        assert_eq!(
            clock.tick(&live, &config, &outbox, s(62), unix0 + 62),
            s(77)
        );
        frames.clear();
        assert_eq!(
            clock.tick(&live, &config, &outbox, s(105), unix0 + 105),
            s(105) + NEVER
        );
        assert_eq!(outbox.take(&mut frames).unwrap().code, close::TOKEN_EXPIRED);
    }

    #[test]
    fn clock_closes_without_pong_or_connect() {
        let config = Config::from_layers(None, &[], &[]).unwrap();
        let t0 = Instant::now();
        let live = Liveness::default();
        let outbox = Outbox::new(1 << 20);
        let mut clock = Clock::new(t0, &config);
        clock.tick(&live, &config, &outbox, t0 + Duration::from_secs(10), 0);
        assert_eq!(
            outbox.take(&mut Vec::new()).unwrap().code,
            close::UNAUTHORIZED
        );

        let outbox = Outbox::new(1 << 20);
        let mut clock = Clock::new(t0, &config);
        live.authenticate(u64::MAX / 2);
        clock.tick(&live, &config, &outbox, t0, 0);
        clock.tick(&live, &config, &outbox, t0 + Duration::from_secs(25), 25);
        clock.tick(&live, &config, &outbox, t0 + Duration::from_secs(35), 35);
        assert_eq!(outbox.take(&mut Vec::new()).unwrap().code, close::TIMEOUT);
    }
}
