//! Typed configuration, read and validated once at start.
//!
//! `main` calls [`Config::load`] with three layers, later ones winning: a TOML file
//! (`--config`), environment variables `SIDECAST_<KEY>`, and command-line overrides.
//! Tests call [`Config::from_layers`] with plain maps instead of touching the process
//! environment. Every key is known in advance ([`KEYS`]); an unknown key or a bad value
//! is a [`ConfigError`] naming the key, and `main` exits with 64. There is no silent
//! fallback: a key that is absent takes its documented default, nothing else does.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use serde::{Deserialize, Serialize};

/// Exit code for a configuration error (EX_USAGE from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    File { path: String, message: String },
    #[error("unknown configuration key {0}")]
    UnknownKey(String),
    #[error("invalid value for {key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

/// How a flat key's value is written in an env var or a `--set key=value` flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Str,
    Int,
    Bool,
    Duration,
    Addr,
    /// Comma-separated in env vars and flags, a TOML array in the file.
    List,
}

/// Every flat key, its kind and its default (as written in a file); `docs/configuration.md` mirrors this.
pub const KEYS: &[(&str, Kind, &str)] = &[
    ("ws_addr", Kind::Addr, "0.0.0.0:8080"),
    ("ws_path", Kind::Str, "/ws"),
    ("allowed_origins", Kind::List, ""),
    ("ws_tls_cert_file", Kind::Str, ""),
    ("ws_tls_key_file", Kind::Str, ""),
    ("grpc_tls_cert_file", Kind::Str, ""),
    ("grpc_tls_key_file", Kind::Str, ""),
    ("grpc_tls_client_ca_file", Kind::Str, ""),
    ("grpc_addr", Kind::Addr, "127.0.0.1:50051"),
    ("admin_addr", Kind::Addr, "127.0.0.1:9090"),
    ("api_key", Kind::Str, ""),
    ("token_hmac_secret", Kind::Str, ""),
    ("token_public_key_file", Kind::Str, ""),
    ("token_jwks_file", Kind::Str, ""),
    (
        "token_algorithms",
        Kind::List,
        "[] (HS256 when only an HMAC secret is set)",
    ),
    ("token_audience", Kind::Str, ""),
    ("token_issuer", Kind::Str, ""),
    ("token_leeway", Kind::Duration, "5s"),
    ("dev_secret_file", Kind::Str, ".sidecast/dev-secret"),
    ("connect_timeout", Kind::Duration, "10s"),
    ("ping_interval", Kind::Duration, "25s"),
    ("pong_timeout", Kind::Duration, "10s"),
    ("write_timeout", Kind::Duration, "5s"),
    ("shutdown_timeout", Kind::Duration, "10s"),
    ("drain_window", Kind::Duration, "2s"),
    ("max_connections", Kind::Int, "0"),
    ("max_connections_per_ip", Kind::Int, "0"),
    ("connect_rate_per_ip", Kind::Int, "0"),
    ("trusted_proxies", Kind::List, ""),
    ("max_commands_per_second", Kind::Int, "100"),
    ("header_read_timeout", Kind::Duration, "10s"),
    ("max_message_size", Kind::Int, "65536"),
    ("max_queue_bytes", Kind::Int, "1048576"),
    ("socket_send_buffer", Kind::Int, "262144"),
    ("max_publication_size", Kind::Int, "65536"),
    ("max_subscriptions", Kind::Int, "128"),
    ("max_recovery", Kind::Int, "300"),
    ("idempotency_window", Kind::Duration, "5m"),
    ("events_buffer", Kind::Int, "10000"),
    ("events_buffer_bytes", Kind::Int, "16777216"),
    ("events_window", Kind::Int, "256"),
    ("events_ack_timeout", Kind::Duration, "30s"),
    ("events_group_ttl", Kind::Duration, "10m"),
    ("events_max_groups", Kind::Int, "64"),
    ("rpc_timeout", Kind::Duration, "5s"),
    ("max_rpc_in_flight", Kind::Int, "16"),
    ("log_format", Kind::Str, "text"),
];

/// Kubernetes injects `SIDECAST_PORT`, `SIDECAST_PORT_8080_TCP...` and
/// `SIDECAST_SERVICE_HOST/PORT...` into pods when a Service is named `sidecast`: not keys.
fn is_service_link(var: &str) -> bool {
    var == "SIDECAST_PORT"
        || var.starts_with("SIDECAST_PORT_")
        || var.starts_with("SIDECAST_SERVICE_HOST")
        || var.starts_with("SIDECAST_SERVICE_PORT")
}

/// Keys whose values `config print` masks.
const SECRET_KEYS: &[&str] = &["api_key", "token_hmac_secret"];

/// Env vars with the prefix that are not configuration keys.
const ENV_NOT_KEYS: &[&str] = &["SIDECAST_LOG", "SIDECAST_CONFIG"];

/// Options of a namespace (`[namespaces.NAME]`) or of channels without one (`[channel_defaults]`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct NamespaceOptions {
    /// Publications kept per channel for recovery and the history queries; 0 keeps none.
    pub history_size: usize,
    /// How long a kept publication lives; required when history_size is set.
    #[serde(deserialize_with = "duration_field", serialize_with = "duration_text")]
    pub history_ttl: Duration,
    /// How long a channel's position (epoch and last offset) outlives its last publication.
    #[serde(deserialize_with = "duration_field", serialize_with = "duration_text")]
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
        }
    }
}

impl NamespaceOptions {
    pub fn has_history(&self) -> bool {
        self.history_size > 0
    }
}

fn duration_text<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

/// Writes a duration the way the configuration reads it: `24h`, `5m`, `10s`, `250ms`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0 => "0s".into(),
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
        ms => format!("{ms}ms"),
    }
}

fn duration_field<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// A value never printed in full: Debug shows only that it is set.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

#[derive(Clone, Debug)]
pub struct TokenConfig {
    pub hmac_secret: Option<Secret>,
    pub public_key_file: Option<PathBuf>,
    pub jwks_file: Option<PathBuf>,
    /// Never empty after validation (or after development mode fills in the secret).
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

#[derive(Clone, Debug)]
pub struct Config {
    pub ws_addr: SocketAddr,
    pub ws_path: String,
    /// PEM files: TLS on the WebSocket listener when both are set.
    pub ws_tls_cert_file: Option<PathBuf>,
    pub ws_tls_key_file: Option<PathBuf>,
    /// PEM files: TLS on the control listener, and client certificates (mTLS) with the CA.
    pub grpc_tls_cert_file: Option<PathBuf>,
    pub grpc_tls_key_file: Option<PathBuf>,
    pub grpc_tls_client_ca_file: Option<PathBuf>,
    /// Browser Origins allowed to upgrade; empty allows any.
    pub allowed_origins: Vec<crate::wire::origin::OriginPattern>,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub api_key: Option<Secret>,
    pub token: TokenConfig,
    pub dev_secret_file: PathBuf,
    pub connect_timeout: Duration,
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    pub write_timeout: Duration,
    pub shutdown_timeout: Duration,
    /// The 1001 closes at shutdown are spread over this window.
    pub drain_window: Duration,
    /// WebSocket connections one node holds (derived from the open-file limit when 0 is given).
    pub max_connections: usize,
    /// 0: no limit.
    pub max_connections_per_ip: usize,
    /// Upgrade attempts per second per address; 0: no limit.
    pub connect_rate_per_ip: usize,
    /// Peers whose X-Forwarded-For is believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Commands a connection may send per second (a burst of twice as many); 0: no limit.
    pub max_commands_per_second: usize,
    /// How long a client may take to send its upgrade request's headers.
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
    pub idempotency_window: Duration,
    /// Events one group keeps unacknowledged (sent or not), and their bytes.
    pub events_buffer: usize,
    pub events_buffer_bytes: usize,
    /// Most events one member holds unacknowledged.
    pub events_window: usize,
    /// A member holding an event longer is dropped from its group.
    pub events_ack_timeout: Duration,
    /// How long a group without a member keeps its buffer.
    pub events_group_ttl: Duration,
    /// Event groups a node keeps at once (with or without members).
    pub events_max_groups: usize,
    /// How long a client's rpc waits for the backend's Reply.
    pub rpc_timeout: Duration,
    /// Rpcs one connection may have waiting at once.
    pub max_rpc_in_flight: usize,
    pub log_format: LogFormat,
    pub channel_defaults: NamespaceOptions,
    pub namespaces: HashMap<String, NamespaceOptions>,
    /// The merged layers as given (before defaults), for `sidecast config print`.
    source: toml::Table,
}

/// The file's shape; every field optional so that absent keys take defaults.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    ws_addr: Option<String>,
    ws_path: Option<String>,
    allowed_origins: Option<Vec<String>>,
    ws_tls_cert_file: Option<String>,
    ws_tls_key_file: Option<String>,
    grpc_tls_cert_file: Option<String>,
    grpc_tls_key_file: Option<String>,
    grpc_tls_client_ca_file: Option<String>,
    grpc_addr: Option<String>,
    admin_addr: Option<String>,
    api_key: Option<String>,
    token_hmac_secret: Option<String>,
    token_public_key_file: Option<String>,
    token_jwks_file: Option<String>,
    token_algorithms: Option<Vec<String>>,
    token_audience: Option<String>,
    token_issuer: Option<String>,
    token_leeway: Option<String>,
    dev_secret_file: Option<String>,
    connect_timeout: Option<String>,
    ping_interval: Option<String>,
    pong_timeout: Option<String>,
    write_timeout: Option<String>,
    shutdown_timeout: Option<String>,
    drain_window: Option<String>,
    max_connections: Option<u64>,
    max_connections_per_ip: Option<u64>,
    connect_rate_per_ip: Option<u64>,
    trusted_proxies: Option<Vec<String>>,
    max_commands_per_second: Option<u64>,
    header_read_timeout: Option<String>,
    max_message_size: Option<u64>,
    max_queue_bytes: Option<u64>,
    socket_send_buffer: Option<u64>,
    max_publication_size: Option<u64>,
    max_subscriptions: Option<u64>,
    max_recovery: Option<u64>,
    idempotency_window: Option<String>,
    events_buffer: Option<u64>,
    events_buffer_bytes: Option<u64>,
    events_window: Option<u64>,
    events_ack_timeout: Option<String>,
    events_group_ttl: Option<String>,
    events_max_groups: Option<u64>,
    rpc_timeout: Option<String>,
    max_rpc_in_flight: Option<u64>,
    log_format: Option<String>,
    channel_defaults: Option<NamespaceOptions>,
    namespaces: Option<BTreeMap<String, NamespaceOptions>>,
}

// === impl Config ===

impl Config {
    /// Loads the configuration of the process: `file`, then the `SIDECAST_*` environment,
    /// then `overrides` (`key=value` pairs from the command line).
    pub fn load(
        file: Option<&Path>,
        overrides: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let text = match file {
            Some(path) => Some((
                path.display().to_string(),
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?,
            )),
            None => None,
        };
        // vars() would panic on a variable that is not UTF-8; such values reach validation
        // (lossily converted) and fail there with the variable's name.
        let env: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.to_string_lossy().into_owned())))
            .collect();
        Config::from_layers(
            text.as_ref().map(|(p, t)| (p.as_str(), t.as_str())),
            &env,
            overrides,
        )
    }

    /// Builds a configuration from a file's text (with its name, for messages), environment
    /// pairs (only those starting with `SIDECAST_` are read) and override pairs.
    pub fn from_layers(
        file: Option<(&str, &str)>,
        env: &[(String, String)],
        overrides: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let mut table = match file {
            Some((path, text)) => text.parse::<toml::Table>().map_err(|e| ConfigError::File {
                path: path.to_string(),
                message: e.message().to_string(),
            })?,
            None => toml::Table::new(),
        };
        for (var, value) in env {
            let Some(key) = var.strip_prefix("SIDECAST_") else {
                continue;
            };
            if ENV_NOT_KEYS.contains(&var.as_str()) || is_service_link(var) {
                continue;
            }
            let key = key.to_ascii_lowercase();
            let kind = kind_of(&key).ok_or_else(|| ConfigError::UnknownKey(var.clone()))?;
            table.insert(key, to_toml(var, kind, value)?);
        }
        for (key, value) in overrides {
            let kind = kind_of(key).ok_or_else(|| ConfigError::UnknownKey(key.clone()))?;
            table.insert(key.clone(), to_toml(key, kind, value)?);
        }
        // Re-serialize the merged table so that serde reports the offending `key = value`
        // line: the values from env and flags were type-checked above, so what fails here
        // came from the file.
        let merged = toml::to_string(&table).expect("a toml table serializes");
        let raw: RawConfig = toml::from_str(&merged).map_err(|e| {
            let line = e
                .span()
                .and_then(|span| merged[..span.start].lines().last().map(str::to_string))
                .map(|l| l.trim().to_string())
                .unwrap_or_default();
            ConfigError::File {
                path: file.map(|(p, _)| p).unwrap_or("(merged)").to_string(),
                message: format!("{} {line}", e.message().trim()),
            }
        })?;
        let mut config = Config::validate(raw)?;
        // Kept for `config print` only, secrets masked already so that no Debug shows them.
        for key in SECRET_KEYS {
            if let Some(value) = table.get_mut(*key) {
                *value = toml::Value::String("***".into());
            }
        }
        config.source = table;
        Ok(config)
    }

    /// The effective configuration as a TOML file: every key with its value (defaults
    /// included), the namespaces' options in full, and secrets masked as "***".
    pub fn to_toml(&self) -> String {
        let mut table = toml::Table::new();
        for (key, kind, default) in KEYS {
            let value = match self.source.get(*key) {
                Some(value) => Some(value.clone()),
                None if *kind == Kind::Str && default.is_empty() => None,
                None if *kind == Kind::List => Some(toml::Value::Array(Vec::new())),
                None => to_toml(key, *kind, default).ok(),
            };
            let Some(value) = value else { continue };
            let value = if SECRET_KEYS.contains(key) {
                toml::Value::String("***".into())
            } else {
                value
            };
            table.insert(key.to_string(), value);
        }
        let algorithms = self
            .token
            .algorithms
            .iter()
            .map(|a| toml::Value::String(format!("{a:?}")))
            .collect();
        table.insert("token_algorithms".into(), toml::Value::Array(algorithms));
        let options = |o: &NamespaceOptions| toml::Value::try_from(o).expect("options serialize");
        table.insert("channel_defaults".into(), options(&self.channel_defaults));
        let namespaces: BTreeMap<&String, toml::Value> = self
            .namespaces
            .iter()
            .map(|(n, o)| (n, options(o)))
            .collect();
        if !namespaces.is_empty() {
            table.insert(
                "namespaces".into(),
                toml::Value::try_from(namespaces).expect("namespaces serialize"),
            );
        }
        toml::to_string(&table).expect("a table serializes")
    }

    fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
        let addr =
            |key: &str, v: Option<String>| parse_addr(key, &v.unwrap_or_else(|| default_of(key)));
        let dur = |key: &str, v: Option<String>| {
            parse_duration(&v.unwrap_or_else(|| default_of(key))).map_err(|m| invalid(key, m))
        };
        let size = |key: &str, v: Option<u64>| -> Result<usize, ConfigError> {
            let n = v.unwrap_or_else(|| default_of(key).parse().expect("numeric default"));
            if n == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
            usize::try_from(n).map_err(|_| invalid(key, "too large"))
        };
        let count = |key: &str, v: Option<u64>| -> Result<usize, ConfigError> {
            let n = v.unwrap_or_else(|| default_of(key).parse().expect("numeric default"));
            usize::try_from(n).map_err(|_| invalid(key, "too large"))
        };
        let nonempty = |v: Option<String>| v.filter(|s| !s.is_empty());

        let ws_path = raw.ws_path.unwrap_or_else(|| default_of("ws_path"));
        if !ws_path.starts_with('/') {
            return Err(invalid("ws_path", "must start with '/'"));
        }
        let algorithms = raw
            .token_algorithms
            .unwrap_or_default()
            .iter()
            .map(|a| parse_algorithm(a))
            .collect::<Result<Vec<_>, _>>()?;
        let token = TokenConfig {
            hmac_secret: nonempty(raw.token_hmac_secret).map(Secret::new),
            public_key_file: nonempty(raw.token_public_key_file).map(PathBuf::from),
            jwks_file: nonempty(raw.token_jwks_file).map(PathBuf::from),
            algorithms,
            audience: nonempty(raw.token_audience),
            issuer: nonempty(raw.token_issuer),
            leeway: dur("token_leeway", raw.token_leeway)?,
        };
        let log_format = match raw.log_format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid(
                    "log_format",
                    format!("expected text or json, got {other:?}"),
                ))
            }
        };
        let mut config = Config {
            ws_addr: addr("ws_addr", raw.ws_addr)?,
            ws_path,
            ws_tls_cert_file: nonempty(raw.ws_tls_cert_file).map(PathBuf::from),
            ws_tls_key_file: nonempty(raw.ws_tls_key_file).map(PathBuf::from),
            grpc_tls_cert_file: nonempty(raw.grpc_tls_cert_file).map(PathBuf::from),
            grpc_tls_key_file: nonempty(raw.grpc_tls_key_file).map(PathBuf::from),
            grpc_tls_client_ca_file: nonempty(raw.grpc_tls_client_ca_file).map(PathBuf::from),
            allowed_origins: raw
                .allowed_origins
                .unwrap_or_default()
                .iter()
                .map(|o| {
                    crate::wire::origin::OriginPattern::parse(o)
                        .map_err(|m| invalid("allowed_origins", m))
                })
                .collect::<Result<_, _>>()?,
            grpc_addr: addr("grpc_addr", raw.grpc_addr)?,
            admin_addr: addr("admin_addr", raw.admin_addr)?,
            api_key: nonempty(raw.api_key).map(Secret::new),
            token,
            dev_secret_file: PathBuf::from(
                raw.dev_secret_file
                    .unwrap_or_else(|| default_of("dev_secret_file")),
            ),
            connect_timeout: dur("connect_timeout", raw.connect_timeout)?,
            ping_interval: dur("ping_interval", raw.ping_interval)?,
            pong_timeout: dur("pong_timeout", raw.pong_timeout)?,
            write_timeout: dur("write_timeout", raw.write_timeout)?,
            shutdown_timeout: dur("shutdown_timeout", raw.shutdown_timeout)?,
            drain_window: dur("drain_window", raw.drain_window)?,
            max_connections: match count("max_connections", raw.max_connections)? {
                0 => default_max_connections(),
                n => n,
            },
            max_connections_per_ip: count("max_connections_per_ip", raw.max_connections_per_ip)?,
            connect_rate_per_ip: count("connect_rate_per_ip", raw.connect_rate_per_ip)?,
            trusted_proxies: raw
                .trusted_proxies
                .unwrap_or_default()
                .iter()
                .map(|p| parse_net(p))
                .collect::<Result<_, _>>()?,
            max_commands_per_second: count("max_commands_per_second", raw.max_commands_per_second)?,
            header_read_timeout: dur("header_read_timeout", raw.header_read_timeout)?,
            max_message_size: size("max_message_size", raw.max_message_size)?,
            max_queue_bytes: size("max_queue_bytes", raw.max_queue_bytes)?,
            socket_send_buffer: count("socket_send_buffer", raw.socket_send_buffer)?,
            max_publication_size: size("max_publication_size", raw.max_publication_size)?,
            max_subscriptions: size("max_subscriptions", raw.max_subscriptions)?,
            max_recovery: size("max_recovery", raw.max_recovery)?,
            idempotency_window: dur("idempotency_window", raw.idempotency_window)?,
            events_buffer: size("events_buffer", raw.events_buffer)?,
            events_buffer_bytes: size("events_buffer_bytes", raw.events_buffer_bytes)?,
            events_window: size("events_window", raw.events_window)?,
            events_ack_timeout: dur("events_ack_timeout", raw.events_ack_timeout)?,
            events_group_ttl: dur("events_group_ttl", raw.events_group_ttl)?,
            events_max_groups: size("events_max_groups", raw.events_max_groups)?,
            rpc_timeout: dur("rpc_timeout", raw.rpc_timeout)?,
            max_rpc_in_flight: size("max_rpc_in_flight", raw.max_rpc_in_flight)?,
            log_format,
            channel_defaults: raw.channel_defaults.unwrap_or_default(),
            namespaces: HashMap::new(),
            source: toml::Table::new(),
        };
        for (name, options) in raw.namespaces.unwrap_or_default() {
            if name.is_empty()
                || name.contains(':')
                || crate::wire::channel::validate(&name).is_err()
            {
                return Err(invalid(
                    &format!("namespaces.{name}"),
                    "not a valid namespace name",
                ));
            }
            check_history(&format!("namespaces.{name}"), &options)?;
            config.namespaces.insert(name, options);
        }
        check_history("channel_defaults", &config.channel_defaults)?;
        for key in [
            "connect_timeout",
            "ping_interval",
            "pong_timeout",
            "write_timeout",
            "shutdown_timeout",
            "events_ack_timeout",
            "rpc_timeout",
            "header_read_timeout",
        ] {
            if config.duration(key).is_zero() {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if config.max_publication_size > config.max_queue_bytes / 4 {
            return Err(invalid(
                "max_publication_size",
                format!(
                    "must be at most a quarter of max_queue_bytes ({})",
                    config.max_queue_bytes / 4
                ),
            ));
        }
        for (cert, key, cert_name, key_name) in [
            (
                &config.ws_tls_cert_file,
                &config.ws_tls_key_file,
                "ws_tls_cert_file",
                "ws_tls_key_file",
            ),
            (
                &config.grpc_tls_cert_file,
                &config.grpc_tls_key_file,
                "grpc_tls_cert_file",
                "grpc_tls_key_file",
            ),
        ] {
            if cert.is_some() != key.is_some() {
                let missing = if cert.is_none() { cert_name } else { key_name };
                return Err(invalid(
                    missing,
                    "set both the certificate and the key file",
                ));
            }
        }
        if config.grpc_tls_client_ca_file.is_some() && config.grpc_tls_cert_file.is_none() {
            return Err(invalid(
                "grpc_tls_client_ca_file",
                "client certificates need TLS on the control listener: set grpc_tls_cert_file and grpc_tls_key_file",
            ));
        }
        if config.drain_window >= config.shutdown_timeout {
            return Err(invalid(
                "drain_window",
                format!(
                    "must be shorter than shutdown_timeout ({})",
                    format_duration(config.shutdown_timeout)
                ),
            ));
        }
        if config.events_window > config.events_buffer {
            return Err(invalid(
                "events_window",
                format!("must be at most events_buffer ({})", config.events_buffer),
            ));
        }
        if !config.grpc_addr.ip().is_loopback() && config.api_key.is_none() {
            return Err(invalid(
                "grpc_addr",
                format!(
                    "{} is not a loopback address: set api_key to expose the control API",
                    config.grpc_addr
                ),
            ));
        }
        config.check_token_keys()?;
        Ok(config)
    }

    fn check_token_keys(&mut self) -> Result<(), ConfigError> {
        let token = &mut self.token;
        let asymmetric = token.public_key_file.is_some() || token.jwks_file.is_some();
        if token.algorithms.is_empty() {
            if asymmetric {
                return Err(invalid(
                    "token_algorithms",
                    "must be set (for example RS256, ES256 or EdDSA) when a public key or JWKS file is configured",
                ));
            }
            if token.hmac_secret.is_some() {
                token.algorithms = vec![Algorithm::HS256];
            }
        }
        // jsonwebtoken's Algorithm is non-exhaustive: anything unnamed counts as its own family.
        let family = |alg: &Algorithm| -> u8 {
            use Algorithm::*;
            if is_hmac(*alg) {
                0
            } else if matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512) {
                1
            } else if matches!(alg, ES256 | ES384) {
                2
            } else {
                3
            }
        };
        let mut families: Vec<u8> = token
            .algorithms
            .iter()
            .map(family)
            .filter(|f| *f != 0)
            .collect();
        families.sort_unstable();
        families.dedup();
        if token.public_key_file.is_some() && token.jwks_file.is_none() && families.len() > 1 {
            return Err(invalid(
                "token_algorithms",
                "token_public_key_file holds one key, so pin algorithms of one family (RS/PS, ES or EdDSA), or use token_jwks_file",
            ));
        }
        for alg in &token.algorithms {
            if is_hmac(*alg) && token.hmac_secret.is_none() {
                return Err(invalid(
                    "token_algorithms",
                    format!("{alg:?} needs token_hmac_secret"),
                ));
            }
            if !is_hmac(*alg) && !asymmetric {
                return Err(invalid(
                    "token_algorithms",
                    format!("{alg:?} needs token_public_key_file or token_jwks_file"),
                ));
            }
        }
        Ok(())
    }

    fn duration(&self, key: &str) -> Duration {
        match key {
            "connect_timeout" => self.connect_timeout,
            "ping_interval" => self.ping_interval,
            "pong_timeout" => self.pong_timeout,
            "write_timeout" => self.write_timeout,
            "events_ack_timeout" => self.events_ack_timeout,
            "rpc_timeout" => self.rpc_timeout,
            "header_read_timeout" => self.header_read_timeout,
            _ => self.shutdown_timeout,
        }
    }

    /// The options that apply to a channel: its namespace's, or the defaults.
    pub fn channel_options(&self, channel: &str) -> &NamespaceOptions {
        crate::wire::channel::namespace(channel)
            .and_then(|ns| self.namespaces.get(ns))
            .unwrap_or(&self.channel_defaults)
    }
}

fn check_history(table: &str, options: &NamespaceOptions) -> Result<(), ConfigError> {
    if options.has_history() && options.history_ttl.is_zero() {
        return Err(invalid(
            &format!("{table}.history_ttl"),
            "must be set when history_size is",
        ));
    }
    if options.has_history() && options.history_meta_ttl < options.history_ttl {
        return Err(invalid(
            &format!("{table}.history_meta_ttl"),
            "must be at least history_ttl",
        ));
    }
    Ok(())
}

pub fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

fn kind_of(key: &str) -> Option<Kind> {
    KEYS.iter()
        .find(|(k, _, _)| *k == key)
        .map(|(_, kind, _)| *kind)
}

fn default_of(key: &str) -> String {
    KEYS.iter()
        .find(|(k, _, _)| *k == key)
        .map(|(_, _, d)| d.to_string())
        .expect("every key has a default")
}

/// Converts an env var or flag value to the TOML value of its key's kind.
fn to_toml(name: &str, kind: Kind, value: &str) -> Result<toml::Value, ConfigError> {
    Ok(match kind {
        Kind::Str => toml::Value::String(value.to_string()),
        Kind::Int => toml::Value::Integer(
            value
                .trim()
                .parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| {
                    invalid(
                        name,
                        format!("expected a non-negative integer, got {value:?}"),
                    )
                })?,
        ),
        Kind::Bool => toml::Value::Boolean(match value.trim() {
            "true" | "1" => true,
            "false" | "0" => false,
            _ => {
                return Err(invalid(
                    name,
                    format!("expected true or false, got {value:?}"),
                ))
            }
        }),
        Kind::Duration => {
            parse_duration(value).map_err(|m| invalid(name, m))?;
            toml::Value::String(value.trim().to_string())
        }
        Kind::Addr => {
            parse_addr(name, value)?;
            toml::Value::String(value.trim().to_string())
        }
        Kind::List => toml::Value::Array(
            value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_string()))
                .collect(),
        ),
    })
}

fn parse_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.trim().parse().map_err(|_| {
        invalid(
            key,
            format!("expected an address like 127.0.0.1:8080, got {value:?}"),
        )
    })
}

/// An address or a network: `10.0.0.1`, `10.0.0.0/8`, `fd00::/8`.
fn parse_net(text: &str) -> Result<ipnet::IpNet, ConfigError> {
    let text = text.trim();
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| {
            invalid(
                "trusted_proxies",
                format!("{text:?} is not an address or a network (10.0.0.0/8)"),
            )
        })
}

fn parse_algorithm(name: &str) -> Result<Algorithm, ConfigError> {
    Algorithm::from_str(name).map_err(|_| {
        invalid(
            "token_algorithms",
            format!("unknown algorithm {name:?} (expected HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384 or EdDSA)"),
        )
    })
}

/// The longest duration any key accepts: longer ones are mistakes (and overflow clocks).
const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Parses `250ms`, `10s`, `5m` or `1h`, up to 30 days.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("expected a duration like 500ms, 10s, 5m or 1h, got {text:?}"))?;
    let duration = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => {
            return Err(format!(
                "expected a duration like 500ms, 10s, 5m or 1h, got {text:?}"
            ))
        }
    };
    if duration > MAX_DURATION {
        return Err(format!("{text:?} is longer than the maximum of 30 days"));
    }
    Ok(duration)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults() {
        let c = Config::from_layers(None, &[], &[]).unwrap();
        assert_eq!(c.ws_addr.to_string(), "0.0.0.0:8080");
        assert_eq!(c.grpc_addr.to_string(), "127.0.0.1:50051");
        assert_eq!(c.ping_interval, Duration::from_secs(25));
        assert_eq!(c.max_queue_bytes, 1 << 20);
        assert!(!c.token.has_key());
    }

    #[test]
    fn layers_override_in_order() {
        let file =
            "ping_interval = \"7s\"\nmax_subscriptions = 3\n[namespaces.chat]\npresence = true\n";
        let env = pairs(&[
            ("SIDECAST_PING_INTERVAL", "9s"),
            ("PATH", "/bin"),
            ("SIDECAST_LOG", "debug"),
            // Kubernetes service links for a Service named sidecast: not keys.
            ("SIDECAST_PORT", "tcp://10.0.0.1:80"),
            ("SIDECAST_PORT_80_TCP_ADDR", "10.0.0.1"),
            ("SIDECAST_SERVICE_HOST", "10.0.0.1"),
            ("SIDECAST_SERVICE_PORT_WS", "80"),
        ]);
        let flags = pairs(&[("max_subscriptions", "5")]);
        let c = Config::from_layers(Some(("f.toml", file)), &env, &flags).unwrap();
        assert_eq!(c.ping_interval, Duration::from_secs(9));
        assert_eq!(c.max_subscriptions, 5);
        assert!(c.channel_options("chat:x").presence);
        assert!(!c.channel_options("news:x").presence);
    }

    #[test]
    fn errors_name_the_key() {
        let err = |file: Option<&str>, env: &[(&str, &str)]| {
            Config::from_layers(file.map(|f| ("f.toml", f)), &pairs(env), &[])
                .unwrap_err()
                .to_string()
        };
        assert!(err(Some("bogus = 1"), &[]).contains("bogus"));
        assert!(err(Some("ping_interval = \"soon\""), &[]).contains("ping_interval"));
        assert!(err(Some("max_queue_bytes = \"x\""), &[]).contains("max_queue_bytes"));
        assert!(err(None, &[("SIDECAST_NOPE", "1")]).contains("SIDECAST_NOPE"));
        assert!(err(None, &[("SIDECAST_MAX_SUBSCRIPTIONS", "-1")])
            .contains("SIDECAST_MAX_SUBSCRIPTIONS"));
        assert!(err(None, &[("SIDECAST_GRPC_ADDR", "0.0.0.0:50051")]).contains("api_key"));
        assert!(err(None, &[("SIDECAST_TOKEN_ALGORITHMS", "ES256")]).contains("token_algorithms"));
        assert!(err(None, &[("SIDECAST_TOKEN_ALGORITHMS", "none")]).contains("token_algorithms"));
        assert!(err(Some("[namespaces.chat]\nhistory = 1"), &[]).contains("history"));
        assert!(err(Some("[namespaces.chat]\nhistory_size = 10"), &[])
            .contains("namespaces.chat.history_ttl"));
        assert!(err(Some("[namespaces.chat]\nhistory_ttl = \"soon\""), &[]).contains("history_ttl"));
        assert!(err(None, &[("SIDECAST_MAX_PUBLICATION_SIZE", "1000000")])
            .contains("max_publication_size"));
        let two_families = [
            ("SIDECAST_TOKEN_PUBLIC_KEY_FILE", "k.pem"),
            ("SIDECAST_TOKEN_ALGORITHMS", "RS256,ES256"),
        ];
        assert!(err(None, &two_families).contains("one family"));
    }

    #[test]
    fn hmac_secret_defaults_to_hs256() {
        let c =
            Config::from_layers(None, &pairs(&[("SIDECAST_TOKEN_HMAC_SECRET", "s")]), &[]).unwrap();
        assert_eq!(c.token.algorithms, vec![Algorithm::HS256]);
        assert_eq!(format!("{:?}", c.token.hmac_secret), "Some(\"***\")");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("2 weeks").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("99999999999999999h").is_err());
        assert!(parse_duration("31d").is_err());
        assert!(parse_duration("721h").is_err());
    }

    #[test]
    fn the_documented_example_file_is_valid() {
        let doc = include_str!("../docs/configuration.md");
        let start = doc.find("```toml\n").expect("an example") + "```toml\n".len();
        let end = start + doc[start..].find("```").unwrap();
        let c = Config::from_layers(Some(("docs/configuration.md", &doc[start..end])), &[], &[])
            .unwrap();
        assert!(c.channel_options("chat:1").allow_client_publish);
        assert_eq!(c.channel_options("notifications:a").max_subscribers, 10000);
        assert_eq!(c.max_subscriptions, 64);
    }

    #[test]
    fn every_key_has_a_documented_row() {
        let doc = include_str!("../docs/configuration.md");
        for (key, _, _) in KEYS {
            assert!(
                doc.contains(&format!("| `{key}` |")),
                "{key} is missing from docs/configuration.md"
            );
        }
    }
}
