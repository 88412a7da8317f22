//! Node counters and their Prometheus text exposition (GET /metrics on the admin listener).
//!
//! One struct of concrete atomic handles, always present, so the hot path pays one relaxed add
//! and never a lookup or an allocation: deliveries are counted once per publication (not per
//! subscriber), frames and bytes written once per write batch. What changes rarely (a
//! connection's end, a gRPC call) may take a small lock to keep a label. Gauges (connections,
//! channels, event groups) are read from their owners at scrape time. docs/operations.md
//! names every metric.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use crate::hub::Fanout;
use crate::wire::ErrorCode;

/// Upper bounds (seconds) of the fan-out time histogram's buckets.
const FANOUT_BUCKETS: [f64; 12] = [
    0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
];

#[derive(Default, Debug)]
pub struct Metrics {
    pub connects: AtomicU64,
    pub publications: AtomicU64,
    /// Frames queued to connections by fan-out.
    pub deliveries: AtomicU64,
    pub slow_consumer_closes: AtomicU64,
    pub write_timeouts: AtomicU64,
    pub messages_received: AtomicU64,
    /// Frames and bytes written to sockets.
    pub messages_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    /// Write system calls to client sockets (frames per write = messages_sent / writes).
    pub socket_writes: AtomicU64,
    /// Error replies to client commands, by code (indexed by `ErrorCode as usize`).
    errors: [AtomicU64; ERROR_CODES],
    /// Connections ended after the upgrade, by close code.
    disconnects: Mutex<BTreeMap<u16, u64>>,
    /// Control API calls by method and gRPC status code.
    grpc: Mutex<BTreeMap<(String, i32), u64>>,
    /// Client rpcs by outcome.
    rpcs: Mutex<BTreeMap<&'static str, u64>>,
    fanout: Histogram,
}

const ERROR_CODES: usize = 11;

/// The methods the control listener serves (a test checks this against the proto).
pub const GRPC_METHODS: &[&str] = &[
    "/sidecast.v1.Control/Publish",
    "/sidecast.v1.Control/Broadcast",
    "/sidecast.v1.Control/Subscribe",
    "/sidecast.v1.Control/Unsubscribe",
    "/sidecast.v1.Control/Disconnect",
    "/sidecast.v1.Control/Send",
    "/sidecast.v1.Control/Presence",
    "/sidecast.v1.Control/PresenceStats",
    "/sidecast.v1.Control/Channels",
    "/sidecast.v1.Control/Info",
    "/sidecast.v1.Control/History",
    "/sidecast.v1.Control/HistoryRemove",
    "/sidecast.v1.Control/Events",
    "/sidecast.v1.Control/Reply",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

#[derive(Default, Debug)]
struct Histogram {
    buckets: [AtomicU64; FANOUT_BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

/// What /metrics reads from the node's parts at scrape time.
#[derive(Debug, Default, Clone, Copy)]
pub struct Gauges {
    pub connections: usize,
    pub users: usize,
    pub channels: usize,
    pub subscriptions: usize,
    pub event_groups: usize,
    pub event_members: usize,
    pub events_buffered: usize,
    pub events_delivered: u64,
    pub events_lost: u64,
    pub uptime_seconds: u64,
    pub ready: bool,
}

impl Metrics {
    pub fn record_fanout(&self, counts: Fanout) {
        self.deliveries.fetch_add(u64::from(counts.queued), Relaxed);
        if counts.overflowed > 0 {
            self.slow_consumer_closes
                .fetch_add(u64::from(counts.overflowed), Relaxed);
        }
    }

    /// One publication, and how long encoding it and queueing it to every subscriber took.
    pub fn record_publication(&self, took: Duration) {
        self.publications.fetch_add(1, Relaxed);
        let seconds = took.as_secs_f64();
        if let Some(i) = FANOUT_BUCKETS.iter().position(|b| seconds <= *b) {
            self.fanout.buckets[i].fetch_add(1, Relaxed);
        }
        self.fanout.count.fetch_add(1, Relaxed);
        self.fanout
            .sum_nanos
            .fetch_add(took.as_nanos() as u64, Relaxed);
    }

    /// Writes to a connection's socket: `writes` system calls carrying `frames` frames.
    /// `writes` system calls wrote `frames` whole frames and `bytes` bytes.
    pub fn record_write(&self, writes: usize, frames: usize, bytes: usize) {
        self.messages_sent.fetch_add(frames as u64, Relaxed);
        self.bytes_sent.fetch_add(bytes as u64, Relaxed);
        self.socket_writes.fetch_add(writes as u64, Relaxed);
    }

    pub fn record_error(&self, code: ErrorCode) {
        self.errors[code as usize].fetch_add(1, Relaxed);
    }

    pub fn record_disconnect(&self, code: u16) {
        *self
            .disconnects
            .lock()
            .expect("metrics lock")
            .entry(code)
            .or_default() += 1;
    }

    /// A control API call; `method` is the request path. Only the listener's own methods get
    /// a label of their own (anything else counts as "other"), so clients cannot grow the
    /// label set, and no label needs escaping.
    pub fn record_grpc(&self, method: &str, code: i32) {
        let method = GRPC_METHODS
            .iter()
            .find(|m| **m == method)
            .copied()
            .unwrap_or("other");
        *self
            .grpc
            .lock()
            .expect("metrics lock")
            .entry((method.to_string(), code))
            .or_default() += 1;
    }

    pub fn record_rpc(&self, outcome: &'static str) {
        *self
            .rpcs
            .lock()
            .expect("metrics lock")
            .entry(outcome)
            .or_default() += 1;
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }

    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let load = |a: &AtomicU64| a.load(Relaxed);
        // (name, type, help, value) of every metric without labels.
        let scalars: [(&str, &str, &str, u64); 20] = [
            (
                "sidecast_up",
                "gauge",
                "1 while the node accepts connections, 0 once it drains.",
                u64::from(g.ready),
            ),
            (
                "sidecast_uptime_seconds",
                "gauge",
                "Seconds since the node started.",
                g.uptime_seconds,
            ),
            (
                "sidecast_connections",
                "gauge",
                "Authenticated WebSocket connections open now.",
                g.connections as u64,
            ),
            (
                "sidecast_users",
                "gauge",
                "Distinct users connected now.",
                g.users as u64,
            ),
            (
                "sidecast_channels",
                "gauge",
                "Channels with at least one subscriber on this node.",
                g.channels as u64,
            ),
            (
                "sidecast_subscriptions",
                "gauge",
                "Subscriptions of the connections open now.",
                g.subscriptions as u64,
            ),
            (
                "sidecast_connects_total",
                "counter",
                "Connections authenticated (rate: connection rate).",
                load(&self.connects),
            ),
            (
                "sidecast_messages_received_total",
                "counter",
                "Messages received from clients.",
                load(&self.messages_received),
            ),
            (
                "sidecast_messages_sent_total",
                "counter",
                "Frames written to clients.",
                load(&self.messages_sent),
            ),
            (
                "sidecast_bytes_sent_total",
                "counter",
                "Bytes written to clients, frame headers included.",
                load(&self.bytes_sent),
            ),
            (
                "sidecast_socket_writes_total",
                "counter",
                "Write system calls to client sockets.",
                load(&self.socket_writes),
            ),
            (
                "sidecast_publications_total",
                "counter",
                "Publications (control API and clients).",
                load(&self.publications),
            ),
            (
                "sidecast_deliveries_total",
                "counter",
                "Publication frames queued to subscribers.",
                load(&self.deliveries),
            ),
            (
                "sidecast_slow_consumer_closes_total",
                "counter",
                "Connections closed with 4004 because their queue overflowed.",
                load(&self.slow_consumer_closes),
            ),
            (
                "sidecast_write_timeouts_total",
                "counter",
                "Connections dropped because a write took longer than write_timeout.",
                load(&self.write_timeouts),
            ),
            (
                "sidecast_event_groups",
                "gauge",
                "Event groups kept (with or without members).",
                g.event_groups as u64,
            ),
            (
                "sidecast_event_members",
                "gauge",
                "Event stream members connected.",
                g.event_members as u64,
            ),
            (
                "sidecast_events_buffered",
                "gauge",
                "Events kept until acknowledged, all groups.",
                g.events_buffered as u64,
            ),
            (
                "sidecast_events_delivered_total",
                "counter",
                "Events sent to members (redeliveries included).",
                g.events_delivered,
            ),
            (
                "sidecast_events_lost_total",
                "counter",
                "Events dropped because a group's buffer was full.",
                g.events_lost,
            ),
        ];
        for (name, kind, help, value) in scalars {
            metric(name, kind, help, &[(String::new(), value.to_string())]);
        }
        // Families with a label, each from its own map.
        let labeled = |pairs: Vec<(String, u64)>| -> Vec<(String, String)> {
            pairs.into_iter().map(|(l, v)| (l, v.to_string())).collect()
        };
        let disconnects = self.disconnects.lock().expect("metrics lock");
        let disconnects = labeled(
            disconnects
                .iter()
                .map(|(code, n)| (format!("{{code=\"{code}\"}}"), *n))
                .collect(),
        );
        metric(
            "sidecast_disconnects_total",
            "counter",
            "WebSocket connections ended after the upgrade, by close code (1006: no close).",
            &disconnects,
        );
        let errors = labeled(
            ErrorCode::ALL
                .iter()
                .map(|code| {
                    (
                        format!("{{code=\"{}\"}}", code.as_str()),
                        load(&self.errors[*code as usize]),
                    )
                })
                .collect(),
        );
        metric(
            "sidecast_command_errors_total",
            "counter",
            "Error replies to client commands, by code.",
            &errors,
        );
        let grpc = self.grpc.lock().expect("metrics lock");
        let grpc = labeled(
            grpc.iter()
                .map(|((method, code), n)| {
                    (
                        format!("{{method=\"{method}\",code=\"{}\"}}", code_name(*code)),
                        *n,
                    )
                })
                .collect(),
        );
        metric(
            "sidecast_grpc_requests_total",
            "counter",
            "Control API calls by method and status (streams count when they open).",
            &grpc,
        );
        let rpcs = self.rpcs.lock().expect("metrics lock");
        let rpcs = labeled(
            rpcs.iter()
                .map(|(outcome, n)| (format!("{{outcome=\"{outcome}\"}}"), *n))
                .collect(),
        );
        metric(
            "sidecast_rpcs_total",
            "counter",
            "Client rpcs by outcome.",
            &rpcs,
        );
        let mut cumulative = 0;
        let mut buckets: Vec<(String, String)> = FANOUT_BUCKETS
            .iter()
            .zip(&self.fanout.buckets)
            .map(|(le, n)| {
                cumulative += n.load(Relaxed);
                (format!("_bucket{{le=\"{le}\"}}"), cumulative.to_string())
            })
            .collect();
        // Read after the buckets: a publication recorded in between may be in a bucket and
        // not yet in the count, and +Inf must not be below the last bucket.
        let count = self.fanout.count.load(Relaxed).max(cumulative);
        buckets.push(("_bucket{le=\"+Inf\"}".into(), count.to_string()));
        buckets.push((
            "_sum".into(),
            format!("{}", self.fanout.sum_nanos.load(Relaxed) as f64 / 1e9),
        ));
        buckets.push(("_count".into(), count.to_string()));
        metric(
            "sidecast_fanout_seconds",
            "histogram",
            "Time from a publication reaching the node to its frame queued to every subscriber.",
            &buckets,
        );
        out
    }
}

/// The gRPC status code's name as go-grpc-prometheus writes it ("OK", "InvalidArgument").
fn code_name(code: i32) -> String {
    match tonic::Code::from(code) {
        tonic::Code::Ok => "OK".into(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_control_method_has_its_label() {
        let proto = include_str!("../proto/sidecast/v1/control.proto");
        let methods: Vec<&str> = proto
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .map(|l| l.split('(').next().unwrap().trim())
            .collect();
        assert!(methods.len() >= 14);
        for m in methods {
            let path = format!("/sidecast.v1.Control/{m}");
            assert!(GRPC_METHODS.contains(&path.as_str()), "{path}");
        }
    }

    #[test]
    fn unknown_methods_share_one_label() {
        let m = Metrics::default();
        m.record_grpc("/grpc.health.v1.Health/Evil\"}", 12);
        m.record_grpc("/x/y", 12);
        m.record_grpc("/sidecast.v1.Control/Info", 0);
        let text = m.render(&Gauges::default());
        assert!(
            text.contains(r#"sidecast_grpc_requests_total{method="other",code="Unimplemented"} 2"#)
        );
        assert!(text.contains(
            r#"sidecast_grpc_requests_total{method="/sidecast.v1.Control/Info",code="OK"} 1"#
        ));
    }
}
