//! The `sidecast` binary: parse configuration, set up logging, bind, run, wait for a signal, drain.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use sidecast::auth::{mint_hs256, MintClaims};
use sidecast::config::{Config, LogFormat, Secret, EXIT_CONFIG};
use sidecast::trace::Exporter;
use sidecast::{run, Listeners, RunError};

/// mimalloc returns freed pages to the system: the buffers of a burst of connection
/// handshakes do not stay resident after the burst (bench/results/history.md, per-connection memory).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "sidecast",
    version,
    about = "A WebSocket fan-out sidecar controlled over gRPC"
)]
struct Cli {
    /// A TOML configuration file.
    #[arg(short, long, env = "SIDECAST_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Overrides ws_addr.
    #[arg(long, global = true)]
    ws_addr: Option<String>,
    /// Overrides grpc_addr.
    #[arg(long, global = true)]
    grpc_addr: Option<String>,
    /// Overrides admin_addr.
    #[arg(long, global = true)]
    admin_addr: Option<String>,
    /// Overrides log_format: text (the default) or json.
    #[arg(long, global = true)]
    log_format: Option<String>,
    /// Overrides any configuration key: --set ping_interval=10s (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", global = true)]
    set: Vec<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve,
    /// Print a connection token (HS256) that this configuration accepts.
    Token {
        /// The user id (`sub`).
        #[arg(long)]
        user: String,
        /// A channel pattern the client may subscribe to (repeatable), e.g. 'chat:*'.
        #[arg(long = "channel")]
        channels: Vec<String>,
        /// A channel pattern the client may publish to (repeatable).
        #[arg(long)]
        publish: Vec<String>,
        /// A channel the server subscribes the connection to at connect (repeatable).
        #[arg(long)]
        sub: Vec<String>,
        /// The `info` claim, a JSON object.
        #[arg(long)]
        info: Option<String>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
    /// Check or print the configuration.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Ask a running node's admin listener whether it is alive (exit 0) or not (exit 1): for
    /// container health checks, with no curl in the image.
    Health {
        /// Ask /readyz (accepting connections) instead of /healthz (alive).
        #[arg(long)]
        ready: bool,
    },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Validate FILE (with the SIDECAST_* environment and flags layered on it, as a run
    /// would): exit 0 when valid, 64 with a message naming the key otherwise.
    Check { file: PathBuf },
    /// Print the effective configuration as TOML, defaults included, secrets masked.
    Print,
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    // The soft open-file limit is often 1024 while the hard one is much higher: every socket
    // is a file, and max_connections is derived from the limit, so raise it first.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    if let Some(Command::Config {
        action: ConfigAction::Check { file },
    }) = &cli.command
    {
        cli.config = Some(file.clone());
    }
    let mut config = match load_config(&cli) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("sidecast: configuration error: {message}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    match &cli.command {
        Some(Command::Config { action }) => return config_command(action, &config),
        Some(Command::Health { ready }) => return health(&config, *ready),
        _ => {}
    }
    let serving = matches!(cli.command, None | Some(Command::Serve));
    // The node's runtime comes first: the span exporter, when configured, runs on it.
    let runtime = if serving {
        match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => Some(runtime),
            Err(e) => {
                eprintln!("sidecast: cannot start the runtime: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let otlp = runtime
        .as_ref()
        .map(|r| (config.otlp_endpoint.as_str(), r.handle()))
        .filter(|(endpoint, _)| !endpoint.is_empty());
    let exporter = match init_tracing(config.log_format, otlp) {
        Ok(exporter) => exporter,
        Err(message) => {
            eprintln!("sidecast: configuration error: {message}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    if !config.token().has_key() {
        if let Err(e) = use_dev_secret(&mut config) {
            eprintln!("sidecast: development secret: {e:#}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    }
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let runtime = runtime.expect("made for serving");
            let code = serve(&runtime, config);
            if let Some(exporter) = exporter {
                exporter.stop(SPAN_EXPORT_STOP);
            }
            code
        }
        Command::Config { .. } | Command::Health { .. } => unreachable!("handled above"),
        Command::Token {
            user,
            channels,
            publish,
            sub,
            info,
            ttl,
        } => match token(&config, user, channels, publish, sub, info, ttl) {
            Ok(token) => {
                println!("{token}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("sidecast token: {e:#}");
                ExitCode::from(EXIT_CONFIG as u8)
            }
        },
    }
}

fn config_command(action: &ConfigAction, config: &Config) -> ExitCode {
    match action {
        ConfigAction::Print => {
            print!("{}", config.to_toml());
            ExitCode::SUCCESS
        }
        ConfigAction::Check { file } => {
            // The key and certificate files must be usable too, as at start.
            if let Err(e) = sidecast::auth::Verifier::from_config(&config.token()) {
                eprintln!("sidecast: configuration error: {e}");
                return ExitCode::from(EXIT_CONFIG as u8);
            }
            let tls = sidecast::tls::ws_acceptor(config)
                .map(drop)
                .and_then(|()| sidecast::tls::grpc_config(config).map(drop));
            if let Err(e) = tls {
                eprintln!("sidecast: configuration error: {e}");
                return ExitCode::from(EXIT_CONFIG as u8);
            }
            if !config.token().has_key() {
                println!(
                    "{}: valid (no token key: the node would run in development mode)",
                    file.display()
                );
            } else {
                println!("{}: valid", file.display());
            }
            ExitCode::SUCCESS
        }
    }
}

/// GETs /healthz (or /readyz) from the configured admin listener; 0 when it answers 200.
fn health(config: &Config, ready: bool) -> ExitCode {
    use std::io::{Read, Write};
    let mut addr = config.admin_addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let path = if ready { "/readyz" } else { "/healthz" };
    let timeout = std::time::Duration::from_secs(3);
    let answer = (|| -> std::io::Result<String> {
        let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = String::new();
        stream.take(4096).read_to_string(&mut response)?;
        Ok(response)
    })();
    match answer {
        Ok(response) if response.starts_with("HTTP/1.1 200") => {
            println!("{addr}{path}: 200");
            ExitCode::SUCCESS
        }
        Ok(response) => {
            let status = response.lines().next().unwrap_or("no answer");
            eprintln!("sidecast health: {addr}{path}: {status}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("sidecast health: {addr}{path}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(cli: &Cli) -> Result<Config, String> {
    let mut overrides = Vec::new();
    for (key, value) in [
        ("ws_addr", &cli.ws_addr),
        ("grpc_addr", &cli.grpc_addr),
        ("admin_addr", &cli.admin_addr),
        ("log_format", &cli.log_format),
    ] {
        if let Some(value) = value {
            overrides.push((key.to_string(), value.clone()));
        }
    }
    for pair in &cli.set {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("--set {pair:?}: expected KEY=VALUE"))?;
        overrides.push((key.trim().to_string(), value.to_string()));
    }
    Config::load(cli.config.as_deref(), &overrides).map_err(|e| e.to_string())
}

/// Sets up logging, and the export of traced publications' spans when `otlp` (the
/// endpoint and the runtime whose task sends them) is given; an invalid filter in
/// SIDECAST_LOG or RUST_LOG is a configuration error.
fn init_tracing(
    format: LogFormat,
    otlp: Option<(&str, &tokio::runtime::Handle)>,
) -> Result<Option<Exporter>, String> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let (var, filter) = match (std::env::var("SIDECAST_LOG"), std::env::var("RUST_LOG")) {
        (Ok(f), _) => ("SIDECAST_LOG", f),
        (_, Ok(f)) => ("RUST_LOG", f),
        _ => ("default", "info".to_string()),
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .map_err(|e| format!("invalid log filter in {var} ({filter:?}): {e}"))?
        // The spans of traced publications are for the exporter, never the log.
        .add_directive(
            format!("{}=off", sidecast::trace::TARGET)
                .parse()
                .expect("a directive"),
        );
    let log = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let log = match format {
        LogFormat::Text => log.with_filter(filter).boxed(),
        LogFormat::Json => log.json().with_filter(filter).boxed(),
    };
    let Some((endpoint, runtime)) = otlp else {
        tracing_subscriber::registry().with(log).init();
        return Ok(None);
    };
    let _inside = runtime.enter();
    let (exporter, export) = Exporter::start(endpoint, SPAN_BATCH_DELAY)?;
    tracing_subscriber::registry().with(log).with(export).init();
    Ok(Some(exporter))
}

/// How often the spans of traced publications are sent to the collector.
const SPAN_BATCH_DELAY: std::time::Duration = std::time::Duration::from_secs(1);
/// How long a stopped node waits for its last spans to reach the collector.
const SPAN_EXPORT_STOP: std::time::Duration = std::time::Duration::from_secs(2);

/// Development mode: with no token key configured, tokens are checked against a random
/// secret kept in dev_secret_file (made on first use), so `sidecast token` can mint them.
/// Never accepts everyone.
fn use_dev_secret(config: &mut Config) -> anyhow::Result<()> {
    let path = config.dev_secret_file.clone();
    let secret = read_or_create_secret(&path)?;
    tracing::warn!(
        file = %path.display(),
        "DEVELOPMENT MODE: no token key is configured; tokens are verified with the development secret in this file. \
         Set token_hmac_secret, token_public_key_file or token_jwks_file in production."
    );
    config.token_hmac_secret = Some(Secret::new(secret));
    config.token_algorithms = vec![jsonwebtoken::Algorithm::HS256];
    Ok(())
}

fn read_or_create_secret(path: &Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(secret) if !secret.trim().is_empty() => return Ok(secret.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let secret = format!(
        "{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    );
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    write_private(path, &secret).with_context(|| format!("writing {}", path.display()))?;
    Ok(secret)
}

#[cfg(unix)]
fn write_private(path: &Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(secret.as_bytes())
}

#[cfg(not(unix))]
fn write_private(path: &Path, secret: &str) -> std::io::Result<()> {
    std::fs::write(path, secret)
}

fn token(
    config: &Config,
    user: String,
    channels: Vec<String>,
    publish: Vec<String>,
    subs: Vec<String>,
    info: Option<String>,
    ttl: u64,
) -> anyhow::Result<String> {
    let secret = config.token_hmac_secret.as_ref().context(
        "sidecast token signs with HS256 and needs token_hmac_secret (or development mode)",
    )?;
    let info = info
        .map(|i| serde_json::from_str::<serde_json::Value>(&i))
        .transpose()
        .context("--info must be a JSON object")?;
    let now = sidecast::ws::unix_now();
    Ok(mint_hs256(
        &MintClaims {
            sub: user,
            exp: now + ttl,
            iat: now,
            channels,
            publish,
            subs,
            info,
        },
        secret.expose(),
    ))
}

fn serve(runtime: &tokio::runtime::Runtime, config: Config) -> ExitCode {
    runtime.block_on(async move {
        let listeners = match Listeners::bind(&config).await {
            Ok(listeners) => listeners,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::FAILURE;
            }
        };
        let shutdown = CancellationToken::new();
        tokio::spawn(signal(shutdown.clone()));
        match run(listeners, config, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e @ (RunError::Keys(_) | RunError::Tls(_))) => {
                tracing::error!("{e}");
                ExitCode::from(EXIT_CONFIG as u8)
            }
            Err(e @ RunError::Control(_)) => {
                tracing::error!("{e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
async fn signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    let _ = tokio::signal::ctrl_c().await;
                    shutdown.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("signal received");
    shutdown.cancel();
}
