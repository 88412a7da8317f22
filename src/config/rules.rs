//! What no single value can say: the rules between keys, checked once the layers are read.
//! Each refusal names the key to change.

use jsonwebtoken::Algorithm;

use super::layers::invalid;
use super::values::{format_duration, redact};
use super::{
    default_max_connections, is_hmac, Config, ConfigError, Engine, EventsScope, NamespaceOptions,
    SlowConsumer,
};

impl Config {
    /// Checks the rules between keys and fills in what is derived (max_connections 0, the
    /// algorithm of a lone HMAC secret).
    pub(super) fn check(&mut self) -> Result<(), ConfigError> {
        if !self.ws_path.starts_with('/') {
            return Err(invalid("ws_path", "must start with '/'"));
        }
        if !self.sse_path.is_empty() && !self.sse_path.starts_with('/') {
            return Err(invalid(
                "sse_path",
                "must start with '/' (or be empty: no SSE)",
            ));
        }
        if self.sse_path == self.ws_path {
            return Err(invalid("sse_path", "must differ from ws_path"));
        }
        let otlp = &self.otlp_endpoint;
        // Plain HTTP/2 only: a collector (or its agent) runs beside the node.
        if !otlp.is_empty() && !otlp.starts_with("http://") {
            return Err(invalid(
                "otlp_endpoint",
                "must be an http:// address (or empty: no export); TLS to the collector is not supported",
            ));
        }
        if self.max_connections == 0 {
            self.max_connections = default_max_connections();
        }
        for (key, value) in [
            ("max_message_size", self.max_message_size),
            ("max_queue_bytes", self.max_queue_bytes),
            ("max_publication_size", self.max_publication_size),
            ("max_subscriptions", self.max_subscriptions),
            ("max_recovery", self.max_recovery),
            ("events_buffer", self.events_buffer),
            ("events_buffer_bytes", self.events_buffer_bytes),
            ("events_window", self.events_window),
            ("events_max_groups", self.events_max_groups),
            ("max_rpc_in_flight", self.max_rpc_in_flight),
            ("max_pending_receipts", self.max_pending_receipts),
            ("max_control_connections", self.max_control_connections),
            ("redis_pubsub_connections", self.redis_pubsub_connections),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        for (key, value) in [
            ("connect_timeout", self.connect_timeout),
            ("ping_interval", self.ping_interval),
            ("pong_timeout", self.pong_timeout),
            ("write_timeout", self.write_timeout),
            ("shutdown_timeout", self.shutdown_timeout),
            ("events_ack_timeout", self.events_ack_timeout),
            ("rpc_timeout", self.rpc_timeout),
            ("header_read_timeout", self.header_read_timeout),
            ("grpc_keepalive_interval", self.grpc_keepalive_interval),
            ("grpc_keepalive_timeout", self.grpc_keepalive_timeout),
            ("redis_timeout", self.redis_timeout),
            ("redis_presence_ttl", self.redis_presence_ttl),
        ] {
            if value.is_zero() {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if self.max_publication_size > self.max_queue_bytes / 4 {
            return Err(invalid(
                "max_publication_size",
                format!(
                    "must be at most a quarter of max_queue_bytes ({})",
                    self.max_queue_bytes / 4
                ),
            ));
        }
        for (cert, key, cert_name, key_name) in [
            (
                &self.ws_tls_cert_file,
                &self.ws_tls_key_file,
                "ws_tls_cert_file",
                "ws_tls_key_file",
            ),
            (
                &self.grpc_tls_cert_file,
                &self.grpc_tls_key_file,
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
        if self.grpc_tls_client_ca_file.is_some() && self.grpc_tls_cert_file.is_none() {
            return Err(invalid(
                "grpc_tls_client_ca_file",
                "client certificates need TLS on the control listener: set grpc_tls_cert_file and grpc_tls_key_file",
            ));
        }
        if self.write_coalesce > super::MAX_WRITE_COALESCE {
            return Err(invalid(
                "write_coalesce",
                format!(
                    "must be at most {}",
                    format_duration(super::MAX_WRITE_COALESCE)
                ),
            ));
        }
        if self.drain_window >= self.shutdown_timeout {
            return Err(invalid(
                "drain_window",
                format!(
                    "must be shorter than shutdown_timeout ({})",
                    format_duration(self.shutdown_timeout)
                ),
            ));
        }
        if self.events_window > self.events_buffer {
            return Err(invalid(
                "events_window",
                format!("must be at most events_buffer ({})", self.events_buffer),
            ));
        }
        if let Some(name) = &self.auth_cookie {
            if !crate::wire::cookie::valid_name(name) {
                return Err(invalid(
                    "auth_cookie",
                    "is not a cookie name (letters, digits and !#$%&'*+-.^_`|~)",
                ));
            }
            // A browser sends the cookie with every request to our host, whichever site opened
            // the socket: only the Origin check tells the app's pages from another site's.
            if self.allowed_origins.is_empty() || self.allowed_origins.iter().any(|o| o.is_any()) {
                return Err(invalid(
                    "allowed_origins",
                    "auth_cookie is set: list your app's origins (not \"*\"), or any site a visitor opens could connect with the visitor's cookie",
                ));
            }
        }
        if !self.grpc_addr.ip().is_loopback() && self.api_key.is_none() {
            return Err(invalid(
                "grpc_addr",
                format!(
                    "{} is not a loopback address: set api_key to expose the control API",
                    self.grpc_addr
                ),
            ));
        }
        for (name, options) in &self.namespaces {
            if name.is_empty()
                || name.contains(':')
                || crate::wire::channel::validate(name).is_err()
            {
                return Err(invalid(
                    &format!("namespaces.{name}"),
                    "not a valid namespace name",
                ));
            }
            check_namespace(&format!("namespaces.{name}"), options)?;
        }
        check_namespace("channel_defaults", &self.channel_defaults)?;
        self.check_broker()?;
        self.check_token_keys()
    }

    /// `memory`, or a list of distinct `redis://` addresses (shown without credentials).
    fn check_broker(&self) -> Result<(), ConfigError> {
        if self.redis_prefix.is_empty() || self.redis_prefix.contains(['{', '}', ' ']) {
            return Err(invalid(
                "redis_prefix",
                "must be non-empty, without spaces or braces",
            ));
        }
        let Engine::Redis(addresses) = self.engine() else {
            if self.redis_cluster {
                return Err(invalid(
                    "redis_cluster",
                    "needs the seed addresses of a Redis Cluster in broker (redis://...)",
                ));
            }
            if self.events_scope == EventsScope::Cluster {
                return Err(invalid(
                    "events_scope",
                    "`cluster` needs a cluster: set broker to one or more redis:// addresses",
                ));
            }
            return Ok(());
        };
        let mut seen = std::collections::HashSet::new();
        for address in &addresses {
            if !address.starts_with("redis://") {
                return Err(invalid(
                    "broker",
                    format!(
                        "{:?} is neither `memory` nor a redis:// address",
                        redact(address)
                    ),
                ));
            }
            let shown = redact(address);
            if let Err(e) = redis::Client::open(address.as_str()) {
                return Err(invalid("broker", format!("{shown:?}: {e}")));
            }
            if !seen.insert(address) {
                return Err(invalid("broker", format!("{shown:?} is listed twice")));
            }
            let db = redis::IntoConnectionInfo::into_connection_info(address.as_str())
                .map(|info| info.redis_settings().db());
            if self.redis_cluster && !matches!(db, Ok(0)) {
                return Err(invalid(
                    "broker",
                    format!("{shown:?}: a Redis Cluster has only database 0"),
                ));
            }
        }
        if self.redis_cluster {
            // The seeds must agree (credentials, TLS): the cluster client takes them as one.
            if let Err(e) = redis::cluster::ClusterClient::new(addresses.iter().map(String::as_str))
            {
                return Err(invalid(
                    "broker",
                    format!("the seeds of a Redis Cluster: {e}"),
                ));
            }
        }
        Ok(())
    }

    fn check_token_keys(&mut self) -> Result<(), ConfigError> {
        let asymmetric = self.token_public_key_file.is_some() || self.token_jwks_file.is_some();
        if self.token_algorithms.is_empty() {
            if asymmetric {
                return Err(invalid(
                    "token_algorithms",
                    "must be set (for example RS256, ES256 or EdDSA) when a public key or JWKS file is configured",
                ));
            }
            if self.token_hmac_secret.is_some() {
                self.token_algorithms = vec![Algorithm::HS256];
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
        let mut families: Vec<u8> = self
            .token_algorithms
            .iter()
            .map(family)
            .filter(|f| *f != 0)
            .collect();
        families.sort_unstable();
        families.dedup();
        if self.token_public_key_file.is_some()
            && self.token_jwks_file.is_none()
            && families.len() > 1
        {
            return Err(invalid(
                "token_algorithms",
                "token_public_key_file holds one key, so pin algorithms of one family (RS/PS, ES or EdDSA), or use token_jwks_file",
            ));
        }
        for alg in &self.token_algorithms {
            if is_hmac(*alg) && self.token_hmac_secret.is_none() {
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
}

fn check_namespace(table: &str, options: &NamespaceOptions) -> Result<(), ConfigError> {
    let conflating = options.slow_consumer == SlowConsumer::Conflate;
    match &options.conflate_by {
        None if conflating => {
            return Err(invalid(
                &format!("{table}.conflate_by"),
                "must name the data's key field when slow_consumer is \"conflate\"",
            ))
        }
        Some(_) if !conflating => {
            return Err(invalid(
                &format!("{table}.conflate_by"),
                "needs slow_consumer = \"conflate\"",
            ))
        }
        Some(field) if field.is_empty() => {
            return Err(invalid(
                &format!("{table}.conflate_by"),
                "must not be empty",
            ))
        }
        _ => {}
    }
    if options.has_history() && options.history_ttl.is_zero() {
        return Err(invalid(
            &format!("{table}.history_ttl"),
            "must be set when history_size is",
        ));
    }
    if options.receipts && !options.has_history() {
        return Err(invalid(
            &format!("{table}.receipts"),
            "needs history_size: a receipt names a publication by its offset",
        ));
    }
    if options.receipts
        && (options.receipt_timeout.is_zero()
            || options.receipt_timeout > super::MAX_RECEIPT_DEADLINE)
    {
        return Err(invalid(
            &format!("{table}.receipt_timeout"),
            "must be greater than 0 and at most 1h",
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
