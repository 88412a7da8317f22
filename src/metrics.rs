//! Node counters and their Prometheus text exposition (GET /metrics on the admin listener),
//! through `prometheus-client`.
//!
//! One struct of counter handles resolved once, when the node is built, so the hot path pays
//! one relaxed atomic add and never a lookup or an allocation: deliveries are counted once
//! per publication (not per subscriber), frames and bytes written once per write batch.
//! What changes rarely (a connection's end, a gRPC call) looks its label up in a family.
//! The fan-out time histogram is lock-free (its own atomics, encoded by the library). Gauges
//! (connections, channels, event groups) are read from their owners at scrape time.
//! docs/operations.md names every metric.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::wire::ErrorCode;

/// The content type of [`Metrics::render`]'s text (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Upper bounds (seconds) of the fan-out time histogram's buckets.
const FANOUT_BUCKETS: [f64; 12] = [
    0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
];

/// The methods the control listener serves (a test checks this against the proto).
pub const GRPC_METHODS: &[&str] = &[
    "/sidecast.v1.Control/Publish",
    "/sidecast.v1.Control/PublishStream",
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
    "/sidecast.v1.Control/Receipt",
    "/sidecast.v1.Control/Events",
    "/sidecast.v1.Control/Reply",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcLabels {
    method: &'static str,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub connects: Counter,
    pub publications: Counter,
    /// Frames queued to connections by fan-out.
    pub deliveries: Counter,
    pub slow_consumer_closes: Counter,
    pub slow_consumer_drops: Counter,
    /// Delivery receipts forgotten before they expired (max_pending_receipts).
    pub receipts_forgotten: Counter,
    pub write_timeouts: Counter,
    /// Subscriptions ended with `unsub` 2500 (a cluster node lost a channel's continuity).
    pub resubscribes: Counter,
    pub messages_received: Counter,
    /// Frames and bytes written to sockets.
    pub messages_sent: Counter,
    pub bytes_sent: Counter,
    /// Write system calls to client sockets (frames per write = messages_sent / writes).
    pub socket_writes: Counter,
    /// Error replies to client commands, by code (indexed by `ErrorCode as usize`).
    errors: Vec<Counter>,
    /// Connections ended after the upgrade, by close code.
    disconnects: Family<CodeLabel, Counter>,
    /// Control API calls by method and gRPC status code.
    grpc: Family<GrpcLabels, Counter>,
    /// Client rpcs by outcome.
    rpcs: Family<OutcomeLabel, Counter>,
    fanout: FanoutHistogram,
    /// What the last scrape read from the node's parts.
    gauges: Arc<Mutex<Gauges>>,
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
    /// Tokio tasks alive in the node's runtime (a leak shows here first).
    pub tasks: usize,
    pub ready: bool,
    /// The engine serves (always for the memory engine; Redis reachable and carrying
    /// publications).
    pub engine_ready: bool,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let gauges = Arc::new(Mutex::new(Gauges::default()));
        registry.register_collector(Box::new(ScrapeGauges(gauges.clone())));
        let mut counter = |name: &str, help: &str| {
            let counter = Counter::default();
            registry.register(name, help, counter.clone());
            counter
        };
        let connects = counter(
            "sidecast_connects",
            "Connections authenticated (rate: connection rate)",
        );
        let messages_received = counter(
            "sidecast_messages_received",
            "Messages received from clients",
        );
        let messages_sent = counter("sidecast_messages_sent", "Frames written to clients");
        let bytes_sent = counter(
            "sidecast_bytes_sent",
            "Bytes written to clients, frame headers included",
        );
        let socket_writes = counter(
            "sidecast_socket_writes",
            "Write system calls to client sockets",
        );
        let publications = counter(
            "sidecast_publications",
            "Publications (control API and clients)",
        );
        let deliveries = counter(
            "sidecast_deliveries",
            "Publication frames queued to subscribers",
        );
        let slow_consumer_closes = counter(
            "sidecast_slow_consumer_closes",
            "Connections closed with 4004 because their queue overflowed",
        );
        let slow_consumer_drops = counter(
            "sidecast_slow_consumer_drops",
            "Publications dropped from full queues by slow_consumer = drop_oldest or conflate (each reported with a lost push)",
        );
        let receipts_forgotten = counter(
            "sidecast_receipts_forgotten",
            "Delivery receipts forgotten before they expired, to stay within max_pending_receipts",
        );
        let write_timeouts = counter(
            "sidecast_write_timeouts",
            "Connections dropped because a write took longer than write_timeout",
        );
        let resubscribes = counter(
            "sidecast_resubscribes",
            "Subscriptions ended with unsub 2500 for the client to resubscribe and recover",
        );
        let disconnects = Family::default();
        registry.register(
            "sidecast_disconnects",
            "WebSocket connections ended after the upgrade, by close code (1006: no close)",
            disconnects.clone(),
        );
        let error_family = Family::<CodeLabel, Counter>::default();
        registry.register(
            "sidecast_command_errors",
            "Error replies to client commands, by code",
            error_family.clone(),
        );
        // Every code is shown from the start (0 until it happens), and its handle kept.
        let errors = ErrorCode::ALL
            .iter()
            .map(|code| {
                let label = CodeLabel {
                    code: code.as_str().to_string(),
                };
                error_family.get_or_create(&label).clone()
            })
            .collect();
        let grpc = Family::default();
        registry.register(
            "sidecast_grpc_requests",
            "Control API calls by method and status (streams count when they open)",
            grpc.clone(),
        );
        let rpcs = Family::default();
        registry.register("sidecast_rpcs", "Client rpcs by outcome", rpcs.clone());
        let fanout = FanoutHistogram::default();
        registry.register(
            "sidecast_fanout_seconds",
            "Time from a publication reaching the node to its frame queued to every subscriber",
            fanout.clone(),
        );
        Metrics {
            registry,
            connects,
            publications,
            deliveries,
            slow_consumer_closes,
            slow_consumer_drops,
            receipts_forgotten,
            write_timeouts,
            resubscribes,
            messages_received,
            messages_sent,
            bytes_sent,
            socket_writes,
            errors,
            disconnects,
            grpc,
            rpcs,
            fanout,
            gauges,
        }
    }

    /// Publications a full queue dropped to make room (their policy keeps the connection).
    pub fn record_dropped(&self, publications: usize) {
        self.slow_consumer_drops.inc_by(publications as u64);
    }

    /// One fan-out: frames `queued` to subscribers, and queues it `overflowed` (each such
    /// connection is now closing with 4004).
    pub fn record_fanout(&self, queued: u32, overflowed: u32) {
        self.deliveries.inc_by(u64::from(queued));
        if overflowed > 0 {
            self.slow_consumer_closes.inc_by(u64::from(overflowed));
        }
    }

    /// One publication, and how long encoding it and queueing it to every subscriber took.
    pub fn record_publication(&self, took: Duration) {
        self.publications.inc();
        self.fanout.observe(took);
    }

    /// `writes` system calls wrote `frames` whole frames and `bytes` bytes.
    pub fn record_write(&self, writes: usize, frames: usize, bytes: usize) {
        self.messages_sent.inc_by(frames as u64);
        self.bytes_sent.inc_by(bytes as u64);
        self.socket_writes.inc_by(writes as u64);
    }

    pub fn record_error(&self, code: ErrorCode) {
        self.errors[code as usize].inc();
    }

    pub fn record_disconnect(&self, code: u16) {
        let label = CodeLabel {
            code: code.to_string(),
        };
        self.disconnects.get_or_create(&label).inc();
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
        let labels = GrpcLabels {
            method,
            code: code_name(code),
        };
        self.grpc.get_or_create(&labels).inc();
    }

    pub fn record_rpc(&self, outcome: &'static str) {
        self.rpcs.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// The Prometheus text exposition format (version 0.0.4), with `g` read from the node.
    pub fn render(&self, g: &Gauges) -> String {
        *self.gauges.lock().expect("gauges lock") = *g;
        let mut out = String::with_capacity(4096);
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
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

/// The publication fan-out time: fixed buckets of relaxed atomics, so that recording takes
/// no lock (the library's histogram takes one per observation). Clones share the counts.
#[derive(Clone, Debug, Default)]
struct FanoutHistogram(Arc<Buckets>);

#[derive(Debug, Default)]
struct Buckets {
    buckets: [AtomicU64; FANOUT_BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl FanoutHistogram {
    fn observe(&self, took: Duration) {
        let this = &self.0;
        let seconds = took.as_secs_f64();
        if let Some(i) = FANOUT_BUCKETS.iter().position(|b| seconds <= *b) {
            this.buckets[i].fetch_add(1, Relaxed);
        }
        this.count.fetch_add(1, Relaxed);
        this.sum_nanos.fetch_add(took.as_nanos() as u64, Relaxed);
    }
}

impl EncodeMetric for FanoutHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let this = &self.0;
        // The encoder adds the buckets up itself: each is given its own count.
        let mut buckets: Vec<(f64, u64)> = FANOUT_BUCKETS
            .iter()
            .zip(&this.buckets)
            .map(|(le, n)| (*le, n.load(Relaxed)))
            .collect();
        let finite: u64 = buckets.iter().map(|(_, n)| n).sum();
        // Read after the buckets: a publication recorded in between may be in a bucket and
        // not yet in the count, and +Inf must not be below the last bucket.
        let count = this.count.load(Relaxed).max(finite);
        buckets.push((f64::INFINITY, count - finite));
        let sum = this.sum_nanos.load(Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// The gauges read at scrape time (and the event stream's totals, counted by its owner).
/// Their help texts end with a period: the library adds one only to registered metrics.
#[derive(Debug)]
struct ScrapeGauges(Arc<Mutex<Gauges>>);

impl Collector for ScrapeGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let g = *self.0.lock().expect("gauges lock");
        let gauges: [(&str, &str, u64); 11] = [
            (
                "sidecast_up",
                "1 while the node accepts connections, 0 once it drains.",
                u64::from(g.ready),
            ),
            (
                "sidecast_engine_ready",
                "1 while the engine serves: always for the memory engine; Redis reachable and carrying publications.",
                u64::from(g.engine_ready),
            ),
            (
                "sidecast_uptime_seconds",
                "Seconds since the node started.",
                g.uptime_seconds,
            ),
            (
                "sidecast_tasks",
                "Tokio tasks alive in the node's runtime: one per connection, plus a fixed few.",
                g.tasks as u64,
            ),
            (
                "sidecast_connections",
                "Authenticated WebSocket connections open now.",
                g.connections as u64,
            ),
            (
                "sidecast_users",
                "Distinct users connected now.",
                g.users as u64,
            ),
            (
                "sidecast_channels",
                "Channels with at least one subscriber on this node.",
                g.channels as u64,
            ),
            (
                "sidecast_subscriptions",
                "Subscriptions of the connections open now.",
                g.subscriptions as u64,
            ),
            (
                "sidecast_event_groups",
                "Event groups kept (with or without members).",
                g.event_groups as u64,
            ),
            (
                "sidecast_event_members",
                "Event stream members connected.",
                g.event_members as u64,
            ),
            (
                "sidecast_events_buffered",
                "Events kept until acknowledged, all groups.",
                g.events_buffered as u64,
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value as i64);
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        let counters: [(&str, &str, u64); 2] = [
            (
                "sidecast_events_delivered",
                "Events sent to members (redeliveries included).",
                g.events_delivered,
            ),
            (
                "sidecast_events_lost",
                "Events dropped because a group's buffer was full, or (events_scope = cluster) this node's queue to Redis.",
                g.events_lost,
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        Ok(())
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
            text.contains(r#"sidecast_grpc_requests_total{method="other",code="Unimplemented"} 2"#),
            "{text}"
        );
        assert!(text.contains(
            r#"sidecast_grpc_requests_total{method="/sidecast.v1.Control/Info",code="OK"} 1"#
        ));
    }

    #[test]
    fn the_exposition_names_every_metric_as_documented() {
        let m = Metrics::default();
        m.connects.inc();
        m.record_error(ErrorCode::Forbidden);
        m.record_disconnect(4004);
        m.record_rpc("ok");
        m.record_grpc("/sidecast.v1.Control/Publish", 0);
        m.record_publication(Duration::from_micros(30));
        m.record_publication(Duration::from_secs(1));
        m.resubscribes.inc();
        let text = m.render(&Gauges {
            connections: 3,
            events_lost: 2,
            ready: true,
            engine_ready: true,
            ..Gauges::default()
        });
        for line in [
            "sidecast_connects_total 1",
            "sidecast_connections 3",
            "sidecast_resubscribes_total 1",
            "sidecast_engine_ready 1",
            "sidecast_up 1",
            "sidecast_events_lost_total 2",
            r#"sidecast_command_errors_total{code="forbidden"} 1"#,
            r#"sidecast_command_errors_total{code="rpc_error"} 0"#,
            r#"sidecast_disconnects_total{code="4004"} 1"#,
            r#"sidecast_rpcs_total{outcome="ok"} 1"#,
            "# TYPE sidecast_fanout_seconds histogram",
            r#"sidecast_fanout_seconds_bucket{le="5e-05"} 1"#,
            r#"sidecast_fanout_seconds_bucket{le="+Inf"} 2"#,
            "sidecast_fanout_seconds_count 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        for help in text.lines().filter(|l| l.starts_with("# HELP ")) {
            assert!(help.ends_with('.') && !help.ends_with(".."), "{help}");
        }
        // The documented names, each with its TYPE line.
        let doc = include_str!("../docs/operations.md");
        for name in doc
            .split('`')
            .filter(|w| w.starts_with("sidecast_") && !w.contains(['{', ' ']))
        {
            let base = name.trim_end_matches("_total");
            assert!(
                text.lines().any(|l| l.starts_with("# TYPE ")
                    && (l[7..].starts_with(&format!("{base} "))
                        || l[7..].starts_with(&format!("{base}_total ")))),
                "{name} is documented but not exposed"
            );
        }
    }
}
