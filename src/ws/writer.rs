//! A connection's writer: the only code that writes to its socket.
//!
//! Spawned by the session next to the reader. It drains the connection's [`Outbox`] (every
//! frame queued since the last write, in one vectored write, then a flush), and owns the
//! connection's clocks: the connect deadline, the heartbeat (a `ping` push every
//! ping_interval, close 4007 when no `pong` follows within pong_timeout), the token's
//! expiry (close 4002) and the write timeout (the socket is dropped). It sends at most one
//! Close frame, then waits a bounded time for the reader to see the client's answer.

use std::io::IoSlice;
use std::sync::atomic::{
    AtomicBool, AtomicU64,
    Ordering::{Acquire, Relaxed, Release},
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
}

impl Liveness {
    pub fn authenticate(&self, expires_at: u64) {
        self.expires_at.store(expires_at, Relaxed);
        self.authenticated.store(true, Release);
    }
    pub fn set_expiry(&self, expires_at: u64) {
        self.expires_at.store(expires_at, Relaxed);
    }
    pub fn pong(&self) {
        self.pong_seen.store(true, Relaxed);
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
    pub async fn run(mut self) {
        let started = Instant::now();
        let connect_deadline = started + self.config.connect_timeout;
        let mut next_ping: Option<Instant> = None;
        let mut pong_deadline: Option<Instant> = None;
        let mut frames: Vec<Bytes> = Vec::new();
        loop {
            let draining = self.conn.is_cancelled();
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
                if self.write(&[frame::close(close.code, &close.reason)]).await {
                    let _ = timeout(CLOSE_HANDSHAKE_TIMEOUT, self.conn.cancelled()).await;
                }
                break;
            }
            if draining {
                break;
            }

            let now = Instant::now();
            let mut wake = Vec::with_capacity(4);
            if !self.live.authenticated.load(Acquire) {
                if now >= connect_deadline {
                    self.outbox.close(Close::new(
                        close::UNAUTHORIZED,
                        "no connect within connect_timeout",
                    ));
                    continue;
                }
                wake.push(connect_deadline);
            } else {
                let ping_at = *next_ping.get_or_insert(now + self.config.ping_interval);
                if let Some(deadline) = pong_deadline {
                    if now >= deadline {
                        if !self.live.pong_seen.load(Relaxed) {
                            self.outbox
                                .close(Close::new(close::TIMEOUT, "no pong within pong_timeout"));
                            continue;
                        }
                        pong_deadline = None;
                    } else {
                        wake.push(deadline);
                    }
                }
                // A new ping waits for the previous pong's deadline, whatever the two settings are.
                if now >= ping_at && pong_deadline.is_none() {
                    self.live.pong_seen.store(false, Relaxed);
                    self.outbox.push(frame::text(protocol::PING));
                    next_ping = Some(now + self.config.ping_interval);
                    pong_deadline = Some(now + self.config.pong_timeout);
                    continue;
                }
                if pong_deadline.is_none() {
                    wake.push(ping_at);
                }
                let expires =
                    self.live.expires_at.load(Relaxed) + self.config.token.leeway.as_secs();
                let unix = unix_now();
                if unix >= expires {
                    self.outbox
                        .close(Close::new(close::TOKEN_EXPIRED, "token expired"));
                    continue;
                }
                wake.push(now + Duration::from_secs(expires - unix));
            }
            let next = wake
                .into_iter()
                .min()
                .unwrap_or(now + self.config.ping_interval);
            tokio::select! {
                biased;
                _ = self.conn.cancelled() => {}
                _ = self.shutdown.cancelled(), if !self.outbox.is_closing() => {
                    self.outbox.close(Close::new(close::GOING_AWAY, "server shutting down"));
                }
                _ = self.outbox.wait() => {}
                _ = sleep_until(next) => {}
            }
        }
        let _ = timeout(self.config.write_timeout, self.io.shutdown()).await;
        self.conn.cancel();
    }

    /// Writes `frames` within write_timeout; false when the socket is gone or too slow.
    async fn write(&mut self, frames: &[Bytes]) -> bool {
        match timeout(self.config.write_timeout, write_all(&mut self.io, frames)).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "write failed");
                false
            }
            Err(_) => {
                Metrics::inc(&self.metrics.write_timeouts);
                tracing::debug!("write timed out; dropping the connection");
                false
            }
        }
    }
}

/// Writes every frame with as few vectored writes as the socket allows, then flushes.
async fn write_all<W: AsyncWrite + Unpin>(io: &mut W, frames: &[Bytes]) -> std::io::Result<()> {
    const MAX_SLICES: usize = 64;
    let mut index = 0;
    let mut offset = 0;
    while index < frames.len() {
        let mut slices: [IoSlice<'_>; MAX_SLICES] = [IoSlice::new(&[]); MAX_SLICES];
        let mut count = 0;
        for (i, f) in frames[index..].iter().take(MAX_SLICES).enumerate() {
            slices[i] = IoSlice::new(if i == 0 { &f[offset..] } else { &f[..] });
            count += 1;
        }
        let mut written = io.write_vectored(&slices[..count]).await?;
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
    io.flush().await
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
}
