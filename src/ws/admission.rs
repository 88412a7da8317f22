//! Who may open a WebSocket: the node's connection limit, the per-address limits, and which
//! address a connection comes from.
//!
//! `server` asks [`Admission::admit`] before each upgrade; the [`Ticket`] it gets travels
//! with the session and gives the places back when dropped. Answers (docs/operations.md):
//! 503 at `max_connections` or `max_connections_per_ip`, 429 past `connect_rate_per_ip`.
//! The address is the peer's, or, when the peer is one of `trusted_proxies`, the rightmost
//! address of `X-Forwarded-For` that is not a trusted proxy itself.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ipnet::IpNet;

/// Why an upgrade is refused, with its HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the server is at max_connections")]
    NodeFull,
    #[error("too many connections from this address (max_connections_per_ip)")]
    AddressFull,
    #[error("too many connection attempts from this address (connect_rate_per_ip)")]
    RateLimited,
}

impl Refusal {
    pub fn status(self) -> u16 {
        match self {
            Refusal::NodeFull | Refusal::AddressFull => 503,
            Refusal::RateLimited => 429,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    /// 0: no limit.
    pub per_ip: usize,
    /// Attempts per second, with a burst of as many; 0: no limit.
    pub rate_per_ip: f64,
    pub trusted_proxies: Vec<IpNet>,
}

pub struct Admission {
    limits: Limits,
    open: AtomicUsize,
    addresses: Mutex<Addresses>,
}

#[derive(Default)]
struct Addresses {
    map: HashMap<IpAddr, Address>,
    /// The map's size after the last sweep: the next sweep waits until it doubles, so that
    /// sweeping stays amortized O(1) per upgrade.
    swept_at: usize,
}

struct Address {
    open: usize,
    tokens: f64,
    refilled: Instant,
}

/// Entries kept before idle addresses are swept from the map.
const SWEEP_ABOVE: usize = 4096;

/// A place taken by one connection; dropping it gives the place back.
pub struct Ticket {
    admission: Arc<Admission>,
    ip: Option<IpAddr>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission.open.fetch_sub(1, Relaxed);
        if let Some(ip) = self.ip {
            let mut addresses = self.admission.addresses.lock().expect("admission lock");
            if let Some(a) = addresses.map.get_mut(&ip) {
                a.open = a.open.saturating_sub(1);
                // Without a rate there is nothing else to remember about the address.
                if a.open == 0 && self.admission.limits.rate_per_ip == 0.0 {
                    addresses.map.remove(&ip);
                }
            }
        }
    }
}

impl Admission {
    pub fn new(limits: Limits) -> Arc<Admission> {
        Arc::new(Admission {
            limits,
            open: AtomicUsize::new(0),
            addresses: Mutex::new(Addresses::default()),
        })
    }

    /// WebSocket connections holding a ticket now.
    pub fn open(&self) -> usize {
        self.open.load(Relaxed)
    }

    /// The client's address: the peer, or what trusted proxies say it forwarded.
    pub fn client_ip(&self, peer: IpAddr, forwarded_for: Option<&str>) -> IpAddr {
        let trusted = |ip: &IpAddr| self.limits.trusted_proxies.iter().any(|n| n.contains(ip));
        if !trusted(&peer) {
            return peer;
        }
        let Some(header) = forwarded_for else {
            return peer;
        };
        let mut client = peer;
        for hop in header.rsplit(',') {
            let hop = hop.trim();
            // `1.2.3.4`, `1.2.3.4:5678`, `[::1]:5678`.
            let parsed = hop
                .parse::<IpAddr>()
                .or_else(|_| hop.parse::<std::net::SocketAddr>().map(|s| s.ip()));
            let Ok(ip) = parsed else {
                break;
            };
            client = ip;
            if !trusted(&ip) {
                break;
            }
        }
        client
    }

    /// Takes a place for a connection from `ip`, or says why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<Ticket, Refusal> {
        let per_address = self.limits.per_ip > 0 || self.limits.rate_per_ip > 0.0;
        if per_address {
            let mut guard = self.addresses.lock().expect("admission lock");
            let addresses = &mut *guard;
            if addresses.map.len() > SWEEP_ABOVE.max(2 * addresses.swept_at) {
                // A bucket refills completely within a second: older idle entries are forgotten.
                addresses.map.retain(|_, a| {
                    a.open > 0 || now.duration_since(a.refilled) < std::time::Duration::from_secs(1)
                });
                addresses.swept_at = addresses.map.len();
            }
            let burst = self.limits.rate_per_ip.max(1.0);
            let address = addresses.map.entry(ip).or_insert(Address {
                open: 0,
                tokens: burst,
                refilled: now,
            });
            if self.limits.rate_per_ip > 0.0 {
                let elapsed = now.duration_since(address.refilled).as_secs_f64();
                address.tokens = (address.tokens + elapsed * self.limits.rate_per_ip).min(burst);
                address.refilled = now;
                if address.tokens < 1.0 {
                    return Err(Refusal::RateLimited);
                }
                address.tokens -= 1.0;
            }
            if self.limits.per_ip > 0 && address.open >= self.limits.per_ip {
                return Err(Refusal::AddressFull);
            }
            if self.open.load(Relaxed) >= self.limits.max_connections {
                return Err(Refusal::NodeFull);
            }
            address.open += 1;
            self.open.fetch_add(1, Relaxed);
            return Ok(Ticket {
                admission: self.clone(),
                ip: Some(ip),
            });
        }
        // Without per-address limits, only the node's count: no lock.
        let taken = self
            .open
            .fetch_update(Relaxed, Relaxed, |n| {
                (n < self.limits.max_connections).then_some(n + 1)
            })
            .is_ok();
        if !taken {
            return Err(Refusal::NodeFull);
        }
        Ok(Ticket {
            admission: self.clone(),
            ip: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits() -> Limits {
        Limits {
            max_connections: 3,
            per_ip: 2,
            rate_per_ip: 0.0,
            trusted_proxies: vec!["10.0.0.0/8".parse().unwrap()],
        }
    }

    #[test]
    fn node_and_address_limits_give_places_back() {
        let a = Admission::new(limits());
        let t = Instant::now();
        let (x, y): (IpAddr, IpAddr) = ("1.1.1.1".parse().unwrap(), "2.2.2.2".parse().unwrap());
        let first = a.admit(x, t).unwrap();
        let _second = a.admit(x, t).unwrap();
        assert_eq!(a.admit(x, t).err(), Some(Refusal::AddressFull));
        let _third = a.admit(y, t).unwrap();
        assert_eq!(a.admit(y, t).err(), Some(Refusal::NodeFull));
        drop(first);
        assert_eq!(a.open(), 2);
        assert!(a.admit(x, t).is_ok());
    }

    #[test]
    fn rate_per_address_refills() {
        let a = Admission::new(Limits {
            max_connections: 100,
            per_ip: 0,
            rate_per_ip: 2.0,
            trusted_proxies: vec![],
        });
        let t = Instant::now();
        let x: IpAddr = "1.1.1.1".parse().unwrap();
        let tickets: Vec<_> = (0..2).map(|_| a.admit(x, t).unwrap()).collect();
        assert_eq!(a.admit(x, t).err(), Some(Refusal::RateLimited));
        assert!(a.admit(x, t + Duration::from_millis(500)).is_ok());
        drop(tickets);
    }

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let a = Admission::new(limits());
        let proxy: IpAddr = "10.1.2.3".parse().unwrap();
        let stranger: IpAddr = "8.8.8.8".parse().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(a.client_ip(stranger, Some("1.2.3.4")), stranger);
        assert_eq!(a.client_ip(proxy, Some("1.2.3.4")), ip("1.2.3.4"));
        assert_eq!(
            a.client_ip(proxy, Some("6.6.6.6, 1.2.3.4, 10.9.9.9")),
            ip("1.2.3.4"),
            "the rightmost untrusted hop; what the client wrote itself is not believed"
        );
        assert_eq!(a.client_ip(proxy, Some("1.2.3.4:5678")), ip("1.2.3.4"));
        assert_eq!(a.client_ip(proxy, None), proxy);
        assert_eq!(a.client_ip(proxy, Some("garbage")), proxy);
    }
}
