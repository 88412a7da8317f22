//! Typed configuration, read and validated once at start.
//!
//! [`Config`] declares every key once: its name, type, default and meaning (the field, its
//! serde attributes and `Default`). `layers` reads a TOML file, `SIDECAST_*` variables and
//! command-line overrides into it, later ones winning, and `rules` checks what no single
//! value can say. An unknown key or a bad value is a [`ConfigError`] naming the key, and
//! `main` exits with 64. There is no silent fallback: a key that is absent takes its
//! documented default (docs/configuration.md, which a test holds to the same keys).

mod layers;
mod rules;
mod values;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use serde::{Deserialize, Serialize};

pub use layers::ConfigError;
pub use values::{format_duration, parse_duration, redact, Secret};

use crate::wire::origin::OriginPattern;
use values::{duration, nets, nonempty};

/// The longest `write_coalesce`: a frame may wait this much longer under load. No longer
/// than the window a node stays behind after it was last seen busy (`Behind::FOR_MS`):
/// a longer wait would be cut short by the first fan-out after that window.
pub const MAX_WRITE_COALESCE: Duration = Duration::from_millis(100);

/// The longest deadline of a publication's delivery receipt (`receipt_timeout`, and a
/// Publish's `receipt_timeout_ms`).
pub const MAX_RECEIPT_DEADLINE: Duration = Duration::from_secs(3600);

/// Exit code for a configuration error (EX_USAGE from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

/// Every key of the configuration file (flat keys are also `SIDECAST_<KEY>` variables and
/// `--set key=value` flags).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The WebSocket listener.
    pub ws_addr: SocketAddr,
    pub ws_path: String,
    /// The Server-Sent Events transport's path on the same listener; empty turns it off.
    pub sse_path: String,
    /// Browser Origins allowed to upgrade; empty allows any.
    pub allowed_origins: Vec<OriginPattern>,
    /// The cookie whose value (a JWT) authenticates a `connect` without a token.
    #[serde(deserialize_with = "nonempty")]
    pub auth_cookie: Option<String>,
    /// PEM files: TLS on the WebSocket listener when both are set.
    #[serde(deserialize_with = "nonempty")]
    pub ws_tls_cert_file: Option<PathBuf>,
    #[serde(deserialize_with = "nonempty")]
    pub ws_tls_key_file: Option<PathBuf>,
    /// PEM files: TLS on the control listener, and client certificates (mTLS) with the CA.
    #[serde(deserialize_with = "nonempty")]
    pub grpc_tls_cert_file: Option<PathBuf>,
    #[serde(deserialize_with = "nonempty")]
    pub grpc_tls_key_file: Option<PathBuf>,
    #[serde(deserialize_with = "nonempty")]
    pub grpc_tls_client_ca_file: Option<PathBuf>,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    #[serde(deserialize_with = "nonempty")]
    pub api_key: Option<Secret>,
    #[serde(deserialize_with = "nonempty")]
    pub token_hmac_secret: Option<Secret>,
    #[serde(deserialize_with = "nonempty")]
    pub token_public_key_file: Option<PathBuf>,
    #[serde(deserialize_with = "nonempty")]
    pub token_jwks_file: Option<PathBuf>,
    /// Never empty after validation when a key is set (HS256 for a lone HMAC secret).
    pub token_algorithms: Vec<Algorithm>,
    #[serde(deserialize_with = "nonempty")]
    pub token_audience: Option<String>,
    #[serde(deserialize_with = "nonempty")]
    pub token_issuer: Option<String>,
    #[serde(with = "duration")]
    pub token_leeway: Duration,
    pub dev_secret_file: PathBuf,
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    #[serde(with = "duration")]
    pub ping_interval: Duration,
    #[serde(with = "duration")]
    pub pong_timeout: Duration,
    #[serde(with = "duration")]
    pub write_timeout: Duration,
    /// While the node is behind with its writing, its fan-outs' writes begin this far apart
    /// (0: as soon as the previous ones are written).
    #[serde(with = "duration")]
    pub write_coalesce: Duration,
    #[serde(with = "duration")]
    pub shutdown_timeout: Duration,
    /// The 1001 closes at shutdown are spread over this window.
    #[serde(with = "duration")]
    pub drain_window: Duration,
    /// WebSocket connections one node holds (derived from the open-file limit when 0 is given).
    pub max_connections: usize,
    /// 0: no limit.
    pub max_connections_per_ip: usize,
    /// Upgrade attempts per second per address; 0: no limit.
    pub connect_rate_per_ip: usize,
    /// Peers whose X-Forwarded-For is believed.
    #[serde(with = "nets")]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Commands a connection may send per second (a burst of twice as many); 0: no limit.
    pub max_commands_per_second: usize,
    /// How long a client may take to send its upgrade request's headers.
    #[serde(with = "duration")]
    pub header_read_timeout: Duration,
    pub max_message_size: usize,
    pub max_queue_bytes: usize,
    /// SO_SNDBUF of each WebSocket connection's socket (the kernel doubles it); 0 leaves the
    /// kernel's autotuning, which lets a stalled reader's socket hold up to `tcp_wmem`'s
    /// maximum (4 MiB by default) on top of `max_queue_bytes`.
    pub socket_send_buffer: usize,
    pub max_publication_size: usize,
    pub max_subscriptions: usize,
    /// Most publications one recovery may return.
    pub max_recovery: usize,
    /// How long a Publish idempotency_key is remembered.
    #[serde(with = "duration")]
    pub idempotency_window: Duration,
    /// Events one group keeps unacknowledged (sent or not), and their bytes.
    pub events_buffer: usize,
    pub events_buffer_bytes: usize,
    /// Most events one member holds unacknowledged.
    pub events_window: usize,
    /// A member holding an event longer is dropped from its group.
    #[serde(with = "duration")]
    pub events_ack_timeout: Duration,
    /// How long a group without a member keeps its buffer.
    #[serde(with = "duration")]
    pub events_group_ttl: Duration,
    /// Event groups a node keeps at once (with or without members).
    pub events_max_groups: usize,
    /// Whose events a node's event stream carries: its own connections' (`node`), or, on
    /// Redis, every node's (`cluster`).
    pub events_scope: EventsScope,
    /// How long a client's rpc waits for the backend's Reply.
    #[serde(with = "duration")]
    pub rpc_timeout: Duration,
    /// Rpcs one connection may have waiting at once.
    pub max_rpc_in_flight: usize,
    /// Publications whose delivery receipts this node keeps at once; past it the oldest
    /// is forgotten.
    pub max_pending_receipts: usize,
    /// Connections the control API (gRPC) holds at once; past it, new ones are closed.
    pub max_control_connections: usize,
    /// How often the control API pings each connection (HTTP/2 PING), and how long the
    /// answer may take before the connection is closed: how a dead backend is found.
    #[serde(with = "duration")]
    pub grpc_keepalive_interval: Duration,
    #[serde(with = "duration")]
    pub grpc_keepalive_timeout: Duration,
    pub log_format: LogFormat,
    /// Where the spans of traced publications are exported (OTLP over gRPC, e.g.
    /// `http://127.0.0.1:4317`); empty exports none.
    pub otlp_endpoint: String,
    /// The engine: `memory` (this node alone), or one or more `redis://` addresses
    /// separated by commas (channels spread over them by consistent hashing).
    pub broker: String,
    /// Longest wait for any one Redis command or connection attempt.
    #[serde(with = "duration")]
    pub redis_timeout: Duration,
    /// How long a node that stopped refreshing keeps its clients in presence.
    #[serde(with = "duration")]
    pub redis_presence_ttl: Duration,
    /// Prefix of every Redis key and pub/sub channel, so clusters can share a Redis.
    pub redis_prefix: String,
    /// Pub/sub connections each node holds to each Redis address.
    pub redis_pubsub_connections: usize,
    /// Whether the `broker` addresses are seeds of one Redis Cluster (channels spread over
    /// its slots) rather than independent Redis servers (spread by consistent hashing).
    pub redis_cluster: bool,
    /// Options of channels without a namespace of their own.
    pub channel_defaults: NamespaceOptions,
    pub namespaces: HashMap<String, NamespaceOptions>,
}

impl Default for Config {
    fn default() -> Config {
        let addr = |text: &str| text.parse().expect("a valid default address");
        let secs = Duration::from_secs;
        Config {
            ws_addr: addr("0.0.0.0:8080"),
            ws_path: "/ws".into(),
            sse_path: "/sse".into(),
            allowed_origins: Vec::new(),
            auth_cookie: None,
            ws_tls_cert_file: None,
            ws_tls_key_file: None,
            grpc_tls_cert_file: None,
            grpc_tls_key_file: None,
            grpc_tls_client_ca_file: None,
            grpc_addr: addr("127.0.0.1:50051"),
            admin_addr: addr("127.0.0.1:9090"),
            api_key: None,
            token_hmac_secret: None,
            token_public_key_file: None,
            token_jwks_file: None,
            token_algorithms: Vec::new(),
            token_audience: None,
            token_issuer: None,
            token_leeway: secs(5),
            dev_secret_file: ".sidecast/dev-secret".into(),
            connect_timeout: secs(10),
            ping_interval: secs(25),
            pong_timeout: secs(10),
            write_timeout: secs(5),
            write_coalesce: Duration::from_millis(20),
            shutdown_timeout: secs(10),
            drain_window: secs(2),
            max_connections: 0,
            max_connections_per_ip: 0,
            connect_rate_per_ip: 0,
            trusted_proxies: Vec::new(),
            max_commands_per_second: 100,
            header_read_timeout: secs(10),
            max_message_size: 65536,
            max_queue_bytes: 1 << 20,
            socket_send_buffer: 256 << 10,
            max_publication_size: 65536,
            max_subscriptions: 128,
            max_recovery: 300,
            idempotency_window: secs(300),
            events_buffer: 10_000,
            events_buffer_bytes: 16 << 20,
            events_window: 256,
            events_ack_timeout: secs(30),
            events_group_ttl: secs(600),
            events_max_groups: 64,
            events_scope: EventsScope::Node,
            rpc_timeout: secs(5),
            max_rpc_in_flight: 16,
            max_pending_receipts: 10_000,
            max_control_connections: 1024,
            grpc_keepalive_interval: secs(30),
            grpc_keepalive_timeout: secs(10),
            log_format: LogFormat::Text,
            otlp_endpoint: String::new(),
            broker: "memory".into(),
            redis_timeout: secs(2),
            redis_presence_ttl: secs(30),
            redis_prefix: "sidecast".into(),
            redis_pubsub_connections: 2,
            redis_cluster: false,
            channel_defaults: NamespaceOptions::default(),
            namespaces: HashMap::new(),
        }
    }
}

/// Where channels' state lives: this process, or Redis shared by several nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Engine {
    Memory,
    /// Addresses, each a shard.
    Redis(Vec<String>),
}

/// Whose events an event group receives (`events_scope`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventsScope {
    /// The connections of the node the backend's stream is on.
    Node,
    /// Every node's connections, through a stream per group in Redis.
    Cluster,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Options of a namespace (`[namespaces.NAME]`) or of channels without one (`[channel_defaults]`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct NamespaceOptions {
    /// Publications kept per channel for recovery and the history queries; 0 keeps none.
    pub history_size: usize,
    /// How long a kept publication lives; required when history_size is set.
    #[serde(with = "duration")]
    pub history_ttl: Duration,
    /// How long a channel's position (epoch and last offset) outlives its last publication.
    #[serde(with = "duration")]
    pub history_meta_ttl: Duration,
    /// Keep who is subscribed, for the presence queries.
    pub presence: bool,
    /// Push `join` and `leave` to subscribers when others subscribe and leave.
    pub join_leave: bool,
    /// Subscribers may publish from the socket, without a `publish` grant.
    pub allow_client_publish: bool,
    /// Any authenticated client may subscribe, without a `channels` grant.
    pub public: bool,
    /// 0 for no limit.
    pub max_subscribers: usize,
    /// What a subscriber's full queue does to the channel's publications.
    pub slow_consumer: SlowConsumer,
    /// With `slow_consumer = "conflate"`: the top-level field of a publication's data whose
    /// value is its key; a queue keeps only the newest unwritten publication per key.
    pub conflate_by: Option<String>,
    /// Subscribers acknowledge what they handled, and each publication's delivery receipt
    /// can be asked for; needs history (a publication is named by its offset).
    pub receipts: bool,
    /// How long after a publication its acknowledgements count.
    #[serde(with = "duration")]
    pub receipt_timeout: Duration,
    /// A traced publication's `pub` push carries its trace id (`trace`).
    pub trace_ids: bool,
}

/// `slow_consumer`: what happens when a subscriber's queue (`max_queue_bytes`) is full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SlowConsumer {
    /// The connection closes with 4004.
    #[default]
    Disconnect,
    /// The oldest queued publications of such channels make room, and the client is told
    /// which it lost (a `lost` push).
    DropOldest,
    /// As `drop_oldest`, and a queued publication is replaced by a newer one with the same
    /// `conflate_by` key.
    Conflate,
}

impl Default for NamespaceOptions {
    fn default() -> NamespaceOptions {
        NamespaceOptions {
            history_size: 0,
            history_ttl: Duration::ZERO,
            history_meta_ttl: Duration::from_secs(24 * 3600),
            presence: false,
            join_leave: false,
            allow_client_publish: false,
            public: false,
            max_subscribers: 0,
            slow_consumer: SlowConsumer::Disconnect,
            conflate_by: None,
            receipts: false,
            receipt_timeout: Duration::from_secs(10),
            trace_ids: false,
        }
    }
}

impl NamespaceOptions {
    pub fn has_history(&self) -> bool {
        self.history_size > 0
    }
}

/// What token verification reads of the configuration.
#[derive(Clone, Debug)]
pub struct TokenConfig {
    pub hmac_secret: Option<Secret>,
    pub public_key_file: Option<PathBuf>,
    pub jwks_file: Option<PathBuf>,
    pub algorithms: Vec<Algorithm>,
    pub audience: Option<String>,
    pub issuer: Option<String>,
    pub leeway: Duration,
}

impl TokenConfig {
    pub fn has_key(&self) -> bool {
        self.hmac_secret.is_some() || self.public_key_file.is_some() || self.jwks_file.is_some()
    }
}

impl Config {
    /// The `token_*` keys, for token verification.
    pub fn token(&self) -> TokenConfig {
        TokenConfig {
            hmac_secret: self.token_hmac_secret.clone(),
            public_key_file: self.token_public_key_file.clone(),
            jwks_file: self.token_jwks_file.clone(),
            algorithms: self.token_algorithms.clone(),
            audience: self.token_audience.clone(),
            issuer: self.token_issuer.clone(),
            leeway: self.token_leeway,
        }
    }

    /// The engine the `broker` key names.
    pub fn engine(&self) -> Engine {
        if self.broker == "memory" {
            return Engine::Memory;
        }
        Engine::Redis(
            self.broker
                .split(',')
                .map(|a| a.trim().to_string())
                .filter(|a| !a.is_empty())
                .collect(),
        )
    }

    /// The options that apply to a channel: its namespace's, or the defaults.
    pub fn channel_options(&self, channel: &str) -> &NamespaceOptions {
        crate::wire::channel::namespace(channel)
            .and_then(|ns| self.namespaces.get(ns))
            .unwrap_or(&self.channel_defaults)
    }

    /// The effective configuration as a TOML file: every key with its value (defaults
    /// included), secrets masked as "***".
    pub fn to_toml(&self) -> String {
        // Secrets serialize as "***"; Redis passwords in `broker` are hidden the same way.
        let mut shown = self.clone();
        shown.broker = self
            .broker
            .split(',')
            .map(redact)
            .collect::<Vec<_>>()
            .join(",");
        toml::to_string(&shown).expect("the configuration serializes")
    }
}

pub fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

/// The default max_connections: the process's open-file limit less a reserve for the other
/// listeners, gRPC connections and files.
pub fn default_max_connections() -> usize {
    const RESERVE: usize = 100;
    let limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|soft| soft.parse::<usize>().ok())
        })
        .unwrap_or(10_000);
    limit.saturating_sub(RESERVE).max(1)
}
