//! Who may open a WebSocket: the node's connection limit, the per-address limits, and which
//! address a connection comes from.
//!
//! `server` asks [`Admission::accept`] as soon as it accepts a socket, so that sockets still
//! sending their upgrade headers hold places too; the [`Ticket`] it gets travels with the
//! session and gives the places back when dropped. Answers (docs/operations.md): 503 at
//! `max_connections` or `max_connections_per_ip`, 429 past `connect_rate_per_ip`.
//! The address is the peer's, or, when the peer is one of `trusted_proxies`, the rightmost
//! address of `X-Forwarded-For` that is not a trusted proxy itself: a proxied socket holds a
//! place of the node's at accept, and its client's address is counted at the upgrade
//! ([`Admission::forwarded`]), once the headers are read.

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

    fn trusted(&self, ip: &IpAddr) -> bool {
        self.limits.trusted_proxies.iter().any(|n| n.contains(ip))
    }

    fn per_address(&self) -> bool {
        self.limits.per_ip > 0 || self.limits.rate_per_ip > 0.0
    }

    /// A place for a socket just accepted from `peer`. A trusted proxy's socket takes only a
    /// place of the node's: its client is known, and counted, at the upgrade.
    pub fn accept(self: &Arc<Self>, peer: IpAddr, now: Instant) -> Result<Ticket, Refusal> {
        if self.trusted(&peer) {
            return self.node_place();
        }
        self.admit(peer, now)
    }

    /// Counts the client a trusted proxy forwarded against its address's limits; nothing to
    /// do for a ticket that already has its address.
    pub fn forwarded(&self, ticket: &mut Ticket, ip: IpAddr, now: Instant) -> Result<(), Refusal> {
        if ticket.ip.is_some() || !self.per_address() {
            return Ok(());
        }
        let mut guard = self.addresses.lock().expect("admission lock");
        self.address_place(&mut guard, ip, now)?;
        ticket.ip = Some(ip);
        Ok(())
    }

    /// The client's address: the peer, or what trusted proxies say it forwarded.
    pub fn client_ip(&self, peer: IpAddr, forwarded_for: Option<&str>) -> IpAddr {
        let trusted = |ip: &IpAddr| self.trusted(ip);
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
    fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<Ticket, Refusal> {
        if !self.per_address() {
            return self.node_place();
        }
        let mut guard = self.addresses.lock().expect("admission lock");
        let addresses = &mut *guard;
        // The address's checks first (the rate counts refused attempts too), then the node's.
        self.address_check(addresses, ip, now)?;
        if self.open.load(Relaxed) >= self.limits.max_connections {
            return Err(Refusal::NodeFull);
        }
        self.address_take(addresses, ip);
        self.open.fetch_add(1, Relaxed);
        Ok(Ticket {
            admission: self.clone(),
            ip: Some(ip),
        })
    }

    /// A place of the node's only: no lock.
    fn node_place(self: &Arc<Self>) -> Result<Ticket, Refusal> {
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

    fn address_place(
        &self,
        addresses: &mut Addresses,
        ip: IpAddr,
        now: Instant,
    ) -> Result<(), Refusal> {
        self.address_check(addresses, ip, now)?;
        self.address_take(addresses, ip);
        Ok(())
    }

    /// The address's rate (taking a token) and its count of open connections.
    fn address_check(
        &self,
        addresses: &mut Addresses,
        ip: IpAddr,
        now: Instant,
    ) -> Result<(), Refusal> {
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
        Ok(())
    }

    fn address_take(&self, addresses: &mut Addresses, ip: IpAddr) {
        addresses.map.get_mut(&ip).expect("checked above").open += 1;
    }
}
