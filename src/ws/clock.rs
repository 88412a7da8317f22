//! A connection's clocks: the connect deadline (close 4001 without a `connect`), the
//! heartbeat (a `ping` push every ping_interval, close 4007 when no `pong` follows within
//! pong_timeout) and the token's expiry (close 4002). [`Clock`] is a pure state machine
//! driven with `now` by the connection's task (`connection`), which also keeps the write
//! timeout and the close handshake's deadline.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use crate::config::Config;
use crate::outbox::Outbox;
use crate::wire::close::{self, Close};
use crate::wire::ServerMessage;

/// How long a connection waits for the client to answer its Close before dropping the socket.
pub const CLOSE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// What the connection's commands tell its clock (both live in the connection's task).
#[derive(Default)]
pub struct Liveness {
    authenticated: bool,
    /// Token expiry, seconds since the Unix epoch.
    expires_at: u64,
    pong_seen: bool,
    /// Set when a deadline changed (authentication, refresh): the clock is read again.
    changed: bool,
}

impl Liveness {
    pub fn authenticate(&mut self, expires_at: u64) {
        self.expires_at = expires_at;
        self.authenticated = true;
        self.changed = true;
    }
    pub fn set_expiry(&mut self, expires_at: u64) {
        self.expires_at = expires_at;
        self.changed = true;
    }
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }
    pub fn pong(&mut self) {
        self.pong_seen = true;
    }
}

/// The connection's deadlines: a pure state machine driven with `now`.
pub struct Clock {
    connect_deadline: Instant,
    next_ping: Option<Instant>,
    pong_deadline: Option<Instant>,
}

/// Far enough to mean "no deadline".
pub const NEVER: Duration = Duration::from_secs(365 * 24 * 3600);

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
        live: &mut Liveness,
        config: &Config,
        outbox: &Outbox,
        now: Instant,
        unix: u64,
    ) -> Instant {
        if !live.authenticated {
            if now >= self.connect_deadline {
                outbox.schedule_close(Close::new(
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
                if !live.pong_seen {
                    outbox
                        .schedule_close(Close::new(close::TIMEOUT, "no pong within pong_timeout"));
                    return now + NEVER;
                }
                self.pong_deadline = None;
            }
        }
        // A new ping waits for the previous pong's deadline, whatever the two settings are.
        if self.pong_deadline.is_none() && now >= ping_at {
            live.pong_seen = false;
            outbox.push(ServerMessage::Ping.frame());
            self.next_ping = Some(now + config.ping_interval);
            self.pong_deadline = Some(now + config.pong_timeout);
        }
        let expires = live
            .expires_at
            .saturating_add(config.token_leeway.as_secs());
        if unix >= expires {
            outbox.schedule_close(Close::new(close::TOKEN_EXPIRED, "token expired"));
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut live = Liveness::default();
        let outbox = Outbox::new(1 << 20);
        let mut clock = Clock::new(t0, &config);
        // Unauthenticated: the connect deadline.
        assert_eq!(clock.tick(&mut live, &config, &outbox, s(1), unix0), s(10));
        live.authenticate(unix0 + 100);
        assert!(live.take_changed() && !live.take_changed());
        // First ping 25 s after authentication.
        assert_eq!(
            clock.tick(&mut live, &config, &outbox, s(2), unix0 + 2),
            s(27)
        );
        assert_eq!(
            clock.tick(&mut live, &config, &outbox, s(27), unix0 + 27),
            s(37),
            "ping sent, pong due"
        );
        assert_eq!(outbox.queued()[0], ServerMessage::Ping.frame());
        live.pong();
        assert_eq!(
            clock.tick(&mut live, &config, &outbox, s(37), unix0 + 37),
            s(52),
            "pong seen: next ping"
        );
        // Expiry (exp 100 + leeway 5) comes before the next ping.
        assert_eq!(
            clock.tick(&mut live, &config, &outbox, s(52), unix0 + 52),
            s(62)
        );
        live.pong();
        assert_eq!(
            clock.tick(&mut live, &config, &outbox, s(62), unix0 + 62),
            s(77)
        );
        assert_eq!(
            clock.tick(&mut live, &config, &outbox, s(105), unix0 + 105),
            s(105) + NEVER
        );
        assert_eq!(outbox.ended().code, close::TOKEN_EXPIRED);
    }

    #[test]
    fn clock_closes_without_pong_or_connect() {
        let config = Config::from_layers(None, &[], &[]).unwrap();
        let t0 = Instant::now();
        let mut live = Liveness::default();
        let outbox = Outbox::new(1 << 20);
        let mut clock = Clock::new(t0, &config);
        clock.tick(&mut live, &config, &outbox, t0 + Duration::from_secs(10), 0);
        assert_eq!(outbox.ended().code, close::UNAUTHORIZED);

        let outbox = Outbox::new(1 << 20);
        let mut clock = Clock::new(t0, &config);
        live.authenticate(u64::MAX / 2);
        clock.tick(&mut live, &config, &outbox, t0, 0);
        clock.tick(
            &mut live,
            &config,
            &outbox,
            t0 + Duration::from_secs(25),
            25,
        );
        clock.tick(
            &mut live,
            &config,
            &outbox,
            t0 + Duration::from_secs(35),
            35,
        );
        assert_eq!(outbox.ended().code, close::TIMEOUT);
    }
}
