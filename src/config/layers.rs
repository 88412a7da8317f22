//! The three layers of configuration, later ones winning: a TOML file (`--config`),
//! environment variables `SIDECAST_<KEY>`, and command-line overrides (`--set key=value`).
//!
//! `main` calls [`Config::load`]; tests call [`Config::from_layers`] with plain pairs instead
//! of touching the process environment. Variables and flags are strings: each is turned into
//! the TOML type of its key's default (a number, a list written `a,b`, or text) and merged
//! over the file's table; serde then reads the merged table into [`Config`], and an error
//! names the key (and the variable, when one set it).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use super::Config;

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

pub(super) fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

/// Kubernetes injects `SIDECAST_PORT`, `SIDECAST_PORT_8080_TCP...` and
/// `SIDECAST_SERVICE_HOST/PORT...` into pods when a Service is named `sidecast`: not keys.
fn is_service_link(var: &str) -> bool {
    var == "SIDECAST_PORT"
        || var.starts_with("SIDECAST_PORT_")
        || var.starts_with("SIDECAST_SERVICE_HOST")
        || var.starts_with("SIDECAST_SERVICE_PORT")
}

/// Env vars with the prefix that are not configuration keys.
const ENV_NOT_KEYS: &[&str] = &["SIDECAST_LOG", "SIDECAST_CONFIG"];

/// Keys that are tables: set in the file only.
const TABLES: &[&str] = &["channel_defaults", "namespaces"];

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
        let path = file.map_or("(merged)", |(p, _)| p);
        let mut table = match file {
            Some((path, text)) => text.parse::<toml::Table>().map_err(|e| ConfigError::File {
                path: path.to_string(),
                message: e.message().to_string(),
            })?,
            None => toml::Table::new(),
        };
        let defaults = toml::Table::try_from(Config::default()).expect("the defaults serialize");
        let keys = Config::keys();
        for key in table.keys() {
            if !keys.contains(key.as_str()) {
                return Err(ConfigError::UnknownKey(key.clone()));
            }
        }
        // Which variable or flag set a key, for messages.
        let mut set_by: HashMap<String, String> = HashMap::new();
        let env = env.iter().filter_map(|(var, value)| {
            let key = var.strip_prefix("SIDECAST_")?;
            if ENV_NOT_KEYS.contains(&var.as_str()) || is_service_link(var) {
                return None;
            }
            Some((key.to_ascii_lowercase(), var.as_str(), value))
        });
        let flags = overrides
            .iter()
            .map(|(key, value)| (key.clone(), key.as_str(), value));
        for (key, name, value) in env.chain(flags) {
            if !keys.contains(key.as_str()) || TABLES.contains(&key.as_str()) {
                return Err(ConfigError::UnknownKey(name.to_string()));
            }
            table.insert(key.clone(), typed(name, defaults.get(&key), value)?);
            set_by.insert(key, name.to_string());
        }
        let merged = toml::Value::Table(table);
        let mut config: Config = serde_path_to_error::deserialize(merged).map_err(|e| {
            let key = e.path().to_string();
            // toml's message ends with a line naming the key again: the first line says it.
            let message = e.inner().to_string();
            let message = message.lines().next().unwrap_or_default().to_string();
            let top = key.split(['.', '[']).next().unwrap_or_default();
            match set_by.get(top) {
                Some(name) if name != top => invalid(&format!("{key} (from {name})"), message),
                Some(_) => invalid(&key, message),
                None => ConfigError::File {
                    path: path.to_string(),
                    message: format!("{key}: {message}"),
                },
            }
        })?;
        config.check()?;
        Ok(config)
    }

    /// Every key the configuration accepts.
    pub fn keys() -> BTreeSet<&'static str> {
        let mut fields = Vec::new();
        let _ = Config::deserialize(FieldNames(&mut fields));
        fields.into_iter().collect()
    }
}

/// An env var's or flag's text as the TOML type of its key's default: an integer, a
/// boolean, a list (comma-separated), or text (also for keys without a default). Text is
/// kept as given (a secret may end in whitespace), except around a duration or an address.
fn typed(
    name: &str,
    default: Option<&toml::Value>,
    text: &str,
) -> Result<toml::Value, ConfigError> {
    Ok(match default {
        Some(toml::Value::Integer(_)) => toml::Value::Integer(
            text.trim()
                .parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| {
                    invalid(
                        name,
                        format!("expected a non-negative integer, got {text:?}"),
                    )
                })?,
        ),
        Some(toml::Value::Boolean(_)) => toml::Value::Boolean(match text.trim() {
            "true" | "1" => true,
            "false" | "0" => false,
            _ => {
                return Err(invalid(
                    name,
                    format!("expected true or false, got {text:?}"),
                ))
            }
        }),
        Some(toml::Value::Array(_)) => toml::Value::Array(
            text.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_string()))
                .collect(),
        ),
        Some(toml::Value::String(default))
            if default.parse::<std::net::SocketAddr>().is_ok()
                || super::parse_duration(default).is_ok() =>
        {
            toml::Value::String(text.trim().to_string())
        }
        _ => toml::Value::String(text.to_string()),
    })
}

/// A deserializer that only records the field names a struct asks for.
struct FieldNames<'a>(&'a mut Vec<&'static str>);

impl<'de> Deserializer<'de> for FieldNames<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("field names only"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.extend(fields);
        Err(de::Error::custom("field names only"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use jsonwebtoken::Algorithm;
    use serde::Deserialize;

    use super::*;

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn bad_broker_settings_are_refused_by_name() {
        let err = |settings: &[(&str, &str)]| {
            Config::from_layers(None, &[], &pairs(settings))
                .unwrap_err()
                .to_string()
        };
        let twice = err(&[("broker", "redis://a:1,redis://a:1")]);
        assert!(twice.contains("listed twice"), "{twice}");
        let scheme = err(&[("broker", "http://a:1")]);
        assert!(scheme.contains("neither `memory` nor"), "{scheme}");
        let alone = err(&[("redis_cluster", "true")]);
        assert!(alone.contains("redis_cluster"), "{alone}");
        let db = err(&[("broker", "redis://a:1/2"), ("redis_cluster", "true")]);
        assert!(db.contains("only database 0"), "{db}");
        let seeds = err(&[
            ("broker", "redis://:one@a:1,redis://:two@b:1"),
            ("redis_cluster", "true"),
        ]);
        assert!(seeds.contains("the seeds of a Redis Cluster"), "{seeds}");
        assert!(
            !seeds.contains("one") && !seeds.contains("two"),
            "no password shown: {seeds}"
        );
        let fine = [
            ("broker", "redis://a:1,redis://b:1"),
            ("redis_cluster", "true"),
        ];
        assert!(Config::from_layers(None, &[], &pairs(&fine)).is_ok());
    }

    #[test]
    fn defaults() {
        let c = Config::from_layers(None, &[], &[]).unwrap();
        assert_eq!(c.ws_addr.to_string(), "0.0.0.0:8080");
        assert_eq!(c.grpc_addr.to_string(), "127.0.0.1:50051");
        assert_eq!(c.ping_interval, Duration::from_secs(25));
        assert_eq!(c.max_queue_bytes, 1 << 20);
        assert!(!c.token().has_key());
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
            ("SIDECAST_TRUSTED_PROXIES", "10.0.0.1, 192.168.0.0/16"),
        ]);
        let flags = pairs(&[
            ("max_subscriptions", "5"),
            ("api_key", ""),
            ("token_hmac_secret", "s3cret\n"),
            ("grpc_addr", " 127.0.0.1:6000 "),
        ]);
        let c = Config::from_layers(Some(("f.toml", file)), &env, &flags).unwrap();
        assert_eq!(c.ping_interval, Duration::from_secs(9));
        assert_eq!(c.max_subscriptions, 5);
        assert_eq!(c.trusted_proxies.len(), 2);
        assert!(c.api_key.is_none(), "empty means not set");
        let secret = c.token_hmac_secret.as_ref().unwrap();
        assert_eq!(secret.expose(), "s3cret\n", "text is kept as given");
        assert_eq!(c.grpc_addr.port(), 6000, "an address is trimmed");
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
        assert!(err(None, &[("SIDECAST_PING_INTERVAL", "soon")]).contains("SIDECAST_PING_INTERVAL"));
        assert!(err(None, &[("SIDECAST_NAMESPACES", "x")]).contains("SIDECAST_NAMESPACES"));
        assert!(err(None, &[("SIDECAST_GRPC_ADDR", "0.0.0.0:50051")]).contains("api_key"));
        assert!(err(None, &[("SIDECAST_TOKEN_ALGORITHMS", "ES256")]).contains("token_algorithms"));
        assert!(err(None, &[("SIDECAST_TOKEN_ALGORITHMS", "none")]).contains("token_algorithms"));
        assert!(err(Some("[namespaces.chat]\nhistory = 1"), &[]).contains("history"));
        assert!(err(Some("[namespaces.chat]\nhistory_size = 10"), &[])
            .contains("namespaces.chat.history_ttl"));
        assert!(err(Some("[namespaces.chat]\nhistory_ttl = \"soon\""), &[]).contains("history_ttl"));
        assert!(err(None, &[("SIDECAST_MAX_PUBLICATION_SIZE", "1000000")])
            .contains("max_publication_size"));
        assert!(err(None, &[("SIDECAST_LOG_FORMAT", "xml")]).contains("log_format"));
        assert!(err(Some("write_coalesce = \"101ms\""), &[]).contains("write_coalesce"));
        let coalesce = Config::from_layers(None, &pairs(&[("SIDECAST_WRITE_COALESCE", "0s")]), &[]);
        assert!(
            coalesce.unwrap().write_coalesce.is_zero(),
            "0 turns the waiting off"
        );
        assert!(
            err(None, &[("SIDECAST_OTLP_ENDPOINT", "127.0.0.1:4317")]).contains("otlp_endpoint")
        );
        assert!(err(
            None,
            &[("SIDECAST_OTLP_ENDPOINT", "https://collector:4317")]
        )
        .contains("TLS"));
        assert!(err(None, &[("SIDECAST_EVENTS_SCOPE", "world")]).contains("events_scope"));
        assert!(
            err(Some("[namespaces.c]\nslow_consumer = \"conflate\""), &[])
                .contains("namespaces.c.conflate_by")
        );
        assert!(err(Some("[namespaces.c]\nconflate_by = \"user\""), &[])
            .contains("needs slow_consumer"));
        let receipts = err(Some("[namespaces.r]\nreceipts = true"), &[]);
        assert!(receipts.contains("namespaces.r.receipts") && receipts.contains("history_size"));
        let long = "[namespaces.r]\nhistory_size = 1\nhistory_ttl = \"1m\"\nreceipts = true\nreceipt_timeout = \"2h\"";
        assert!(err(Some(long), &[]).contains("namespaces.r.receipt_timeout"));
        assert!(
            err(None, &[("SIDECAST_MAX_PENDING_RECEIPTS", "0")]).contains("max_pending_receipts")
        );
        assert!(
            err(Some("[namespaces.c]\nslow_consumer = \"drop\""), &[]).contains("slow_consumer")
        );
        assert!(
            err(None, &[("SIDECAST_EVENTS_SCOPE", "cluster")]).contains("needs a cluster"),
            "cluster scope on the memory engine"
        );
        assert!(
            err(None, &[("SIDECAST_ALLOWED_ORIGINS", "example.com")]).contains("allowed_origins")
        );
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
        assert_eq!(c.token_algorithms, vec![Algorithm::HS256]);
        assert_eq!(format!("{:?}", c.token_hmac_secret), "Some(\"***\")");
    }

    #[test]
    fn printed_configuration_reads_back_the_same() {
        let file = "allowed_origins = [\"https://*.example.com\"]\n[namespaces.chat]\nhistory_size = 5\nhistory_ttl = \"90s\"\n";
        let env = pairs(&[
            ("SIDECAST_API_KEY", "k3y"),
            ("SIDECAST_TRUSTED_PROXIES", "10.0.0.1"),
        ]);
        let c = Config::from_layers(Some(("f.toml", file)), &env, &[]).unwrap();
        let printed = c.to_toml();
        assert!(printed.contains("api_key = \"***\"") && !printed.contains("k3y"));
        let again = Config::from_layers(Some(("printed", &printed)), &[], &[]).unwrap();
        assert_eq!(again.to_toml(), printed);
        assert_eq!(
            again.channel_options("chat:1").history_ttl,
            Duration::from_secs(90)
        );
    }

    #[test]
    fn the_documented_example_file_is_valid() {
        let doc = include_str!("../../docs/configuration.md");
        let start = doc.find("```toml\n").expect("an example") + "```toml\n".len();
        let end = start + doc[start..].find("```").unwrap();
        let c = Config::from_layers(Some(("docs/configuration.md", &doc[start..end])), &[], &[])
            .unwrap();
        assert!(c.channel_options("chat:1").allow_client_publish);
        assert_eq!(c.channel_options("notifications:a").max_subscribers, 10000);
        assert_eq!(c.max_subscriptions, 64);
    }

    /// The keys of one table of docs/configuration.md: its rows' first cells.
    fn documented(section: &str) -> BTreeSet<&str> {
        section
            .lines()
            .filter_map(|l| l.strip_prefix("| `")?.split_once("` |").map(|(k, _)| k))
            .collect()
    }

    /// docs/configuration.md's tables and the keys accepted are the same sets.
    #[test]
    fn the_documented_keys_are_the_accepted_keys() {
        let doc = include_str!("../../docs/configuration.md");
        let (keys, namespaces) = doc.split_once("## Namespaces").expect("two sections");
        let accepted: BTreeSet<&str> = Config::keys()
            .into_iter()
            .filter(|k| !TABLES.contains(k))
            .collect();
        assert_eq!(documented(keys), accepted, "the table of keys");
        let mut options = Vec::new();
        let _ = super::super::NamespaceOptions::deserialize(FieldNames(&mut options));
        let options: BTreeSet<&str> = options.into_iter().collect();
        assert_eq!(
            documented(namespaces),
            options,
            "the table of namespace options"
        );
    }
}
