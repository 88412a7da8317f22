//! `sidecast-bench`: the load generator behind BENCHMARKS.md.
//!
//! It opens WebSocket connections (spread over 127.0.0.x source addresses), authenticates
//! and subscribes them, publishes open loop through sidecast's gRPC API (or the Node peer's
//! HTTP publish path), and reports deliveries/s, publish-to-receive latency percentiles
//! (HDR histogram), time to the last subscriber, loss, duplicates and reordering, the
//! server's CPU-seconds per million deliveries and its memory per connection, and its own
//! CPU use: a figure counts only if the generator stayed under 80% of its core.
//!
//! It runs on one thread (pin it to its own core with taskset). One process holds at most
//! ~20,000 sockets here: S2, S3 and the smoke run spread more connections over several
//! processes with `--processes` (shard.rs).

mod cursors;
mod events;
mod fleet;
mod otlp_sink;
mod probe;
mod publish_cost;
mod publisher;
mod scenario;
mod shard;
mod soak;
mod stats;
mod writes;
mod wsclient;

use std::net::SocketAddr;

use clap::{Parser, Subcommand};

use fleet::{Protocol, Target};
use publisher::{HttpApi, Sink};
use scenario::Ctx;

#[derive(Parser)]
#[command(
    name = "sidecast-bench",
    about = "Load generator for sidecast and its peers"
)]
struct Cli {
    /// The server's WebSocket address; several (comma-separated) spread the connections
    /// over the nodes of a cluster, connection i to address i mod n.
    #[arg(
        long,
        default_value = "127.0.0.1:8080",
        global = true,
        value_delimiter = ','
    )]
    ws: Vec<SocketAddr>,
    #[arg(long, default_value = "/ws", global = true)]
    path: String,
    /// sidecast's control API; ignored with --publish-http.
    #[arg(long, default_value = "http://127.0.0.1:50051", global = true)]
    grpc: String,
    /// Publish over one Control.PublishStream per publisher instead of a unary call each
    /// (against Centrifugo: through its batch API instead of one publish request each).
    #[arg(long, global = true)]
    publish_stream: bool,
    /// A W3C traceparent every unary Publish carries (its request field): the cost of
    /// traced publications (`otlp_endpoint` on the server exports their spans).
    #[arg(long, global = true)]
    traceparent: Option<String>,
    /// Publish through a peer's HTTP API at this address instead of gRPC: the Node peer's
    /// `POST /publish?channel=`, or Centrifugo's `POST /api/publish` with --api-key.
    #[arg(long, global = true)]
    publish_http: Option<SocketAddr>,
    /// Centrifugo's HTTP API key (with --publish-http).
    #[arg(long, global = true)]
    api_key: Option<String>,
    /// The client protocol the server speaks.
    #[arg(long, value_enum, default_value_t = Protocol::Sidecast, global = true)]
    protocol: Protocol,
    /// The HS256 secret the server verifies tokens with.
    #[arg(long, default_value = "bench-secret", global = true)]
    secret: String,
    /// The server's process id, for its CPU time and memory; several (comma-separated) for
    /// the nodes of a cluster, whose CPU times are added up.
    #[arg(long, global = true)]
    server_pid: Option<String>,
    /// Processes whose CPU is reported on their own in each window, as NAME=PID pairs
    /// separated by commas (each node of a cluster, and Redis).
    #[arg(long, global = true, value_delimiter = ',')]
    watch: Vec<String>,
    /// sidecast's admin address: frames per socket write are read from its /metrics.
    #[arg(long, global = true)]
    metrics: Option<SocketAddr>,
    /// Name of the server in the report.
    #[arg(long, default_value = "sidecast", global = true)]
    peer: String,
    /// How many 127.0.0.x source addresses to spread connections over.
    #[arg(long, default_value_t = 8, global = true)]
    sources: u8,
    /// Processes to hold the subscribers of S2, S3 and smoke (this one and P-1 shards on the
    /// same core): one process may hold ~20,000 sockets here.
    #[arg(long, default_value_t = 1, global = true)]
    processes: usize,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// CI smoke run: small N, a few seconds; fails on loss, duplicates or reordering.
    Smoke {
        #[arg(long, default_value_t = 50)]
        connections: usize,
        #[arg(long, default_value_t = 50.0)]
        rate: f64,
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
    },
    /// S1 idle: memory per connection by stage, and idle CPU.
    S1 {
        #[arg(long, default_value_t = 19_000)]
        connections: usize,
        #[arg(long, default_value_t = 60.0)]
        hold: f64,
    },
    /// S2 fan-out: one channel, rising publish rate until loss or p99 > 250 ms.
    S2 {
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        /// Padding bytes in each payload (total payload ≈ pad + 60).
        #[arg(long, default_value_t = 0)]
        pad: usize,
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "10,20,50,100,200,500,1000,2000"
        )]
        rates: Vec<f64>,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// S3 latency: percentiles and time to the last subscriber at a fixed rate.
    S3 {
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        #[arg(long, default_value_t = 15.0)]
        seconds: f64,
        #[arg(long, default_value_t = 0)]
        pad: usize,
    },
    /// S4 chat shape: personal channel + a room, connect/disconnect churn, rising rate.
    S4 {
        #[arg(long, default_value_t = 19_000)]
        connections: usize,
        #[arg(long, default_value_t = 10)]
        room_size: usize,
        /// Connects and disconnects per second.
        #[arg(long, default_value_t = 60.0)]
        churn: f64,
        /// Room publications per second, all rooms together.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "500,1000,2000,5000,10000,20000"
        )]
        rates: Vec<f64>,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
    },
    /// S5 slow consumers: a share of subscribers stops reading.
    S5 {
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        #[arg(long, default_value_t = 1.0)]
        slow_percent: f64,
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        #[arg(long, default_value_t = 15.0)]
        seconds: f64,
        #[arg(long, default_value_t = 1000)]
        pad: usize,
    },
    /// Live cursors: every user of one room publishes its cursor from its socket into a
    /// `conflate` namespace (run with BENCH_SERVER_CONFIG=bench/cursors.toml); a share of the
    /// users read only a tenth of each second.
    Cursors {
        #[arg(long, default_value_t = 200)]
        users: usize,
        /// Cursor moves each user publishes per second.
        #[arg(long, default_value_t = 30.0)]
        moves: f64,
        #[arg(long, default_value_t = 1.0)]
        slow_percent: f64,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
    },
    /// Soak: a full fleet for a long time with reconnect churn and recovery, publications on
    /// many channels with history and presence, heartbeats and an event group; samples the
    /// server's memory, slab, files, threads and tasks (bench/soak runs it).
    Soak {
        #[arg(long, default_value_t = 19_000)]
        connections: usize,
        #[arg(long, default_value_t = 3600.0)]
        seconds: f64,
        /// Reconnects per second, fleet-wide.
        #[arg(long, default_value_t = 200.0)]
        churn: f64,
        /// Channels (`soak:N`, which need history and presence).
        #[arg(long, default_value_t = 1000)]
        channels: usize,
        /// Publications per second, all channels together.
        #[arg(long, default_value_t = 500.0)]
        rate: f64,
        /// Seconds between samples.
        #[arg(long, default_value_t = 60.0)]
        sample_every: f64,
        /// Write the samples to this CSV file.
        #[arg(long)]
        csv: Option<std::path::PathBuf>,
        /// Exit non-zero unless nothing was lost or duplicated and memory, files and tasks
        /// stayed bounded.
        #[arg(long)]
        check: bool,
    },
    /// Event memory: a group's buffer filled by large publish events, its member reading
    /// without acknowledging (or not reading); the server's RSS growth against the bound.
    EventMemory {
        /// Bytes of data per publication.
        #[arg(long, default_value_t = 32_768)]
        size: usize,
        #[arg(long, default_value_t = 1000)]
        count: usize,
        /// The member's window (0: the server's default, 256).
        #[arg(long, default_value_t = 0)]
        window: u32,
        /// The member never reads its stream.
        #[arg(long)]
        stalled: bool,
        /// No group at all: what the publications alone leave in the process.
        #[arg(long)]
        no_group: bool,
        /// The server's events_buffer_bytes, to compare with.
        #[arg(long, default_value_t = 16 * 1024 * 1024)]
        bound: u64,
    },
    /// A shard process of --processes (started by the main process, not by hand).
    #[command(hide = true)]
    Shard {
        #[arg(long)]
        first: usize,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        prefix: String,
        #[arg(long)]
        channel: String,
    },
    /// S6 events: connection churn without, then with, a backend event group acknowledging.
    S6 {
        /// Connect-and-drop cycles started per second.
        #[arg(long, default_value_t = 2000.0)]
        rate: f64,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
    },
    /// Publish cost: the server's CPU per publication with no subscriber (no fan-out), one
    /// unary Publish each or over PublishStream with --publish-stream, at rising rates.
    PublishCost {
        /// Publishing tasks, each with its own connection (or stream).
        #[arg(long, default_value_t = 50)]
        publishers: usize,
        #[arg(long, default_value_t = 1900)]
        channels: usize,
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "1000,2000,5000,10000,20000,50000"
        )]
        rates: Vec<f64>,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
    },
    /// An OTLP/gRPC trace receiver that counts the spans it is sent (a collector for the
    /// server's `otlp_endpoint` in the tracing benchmark); runs until killed.
    OtlpSink {
        #[arg(long, default_value = "127.0.0.1:4317")]
        listen: SocketAddr,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let target = Target {
            ws: cli.ws,
            path: cli.path,
            secret: cli.secret,
            sources: cli.sources,
            protocol: cli.protocol,
        };
        if let Scenario::Shard {
            first,
            count,
            prefix,
            channel,
        } = cli.scenario
        {
            let share = shard::Share {
                first,
                count,
                prefix,
                channel,
            };
            return shard::serve(&target, share).await;
        }
        if let Scenario::OtlpSink { listen } = cli.scenario {
            return otlp_sink::serve(listen).await;
        }
        let sink = match cli.publish_http {
            Some(addr) => match cli.api_key {
                Some(key) if cli.publish_stream => Sink::HttpBatch(addr, key),
                Some(key) => Sink::Http(addr, HttpApi::Centrifugo { key }),
                None if cli.publish_stream => {
                    anyhow::bail!("--publish-stream needs sidecast's control API or Centrifugo's (--api-key)")
                }
                None => Sink::Http(addr, HttpApi::NodeWs),
            },
            None => {
                let client =
                    sidecast::pb::control_client::ControlClient::connect(cli.grpc.clone()).await?;
                match (cli.publish_stream, cli.traceparent.clone()) {
                    (true, None) => Sink::GrpcStream(client),
                    (true, Some(_)) => anyhow::bail!("--traceparent is for unary publishes"),
                    (false, traceparent) => Sink::Grpc(client, traceparent.unwrap_or_default()),
                }
            }
        };
        let ctx = Ctx {
            target,
            processes: cli.processes.max(1),
            shards: Default::default(),
            sink,
            server_pid: cli.server_pid,
            watch: cli
                .watch
                .iter()
                .filter_map(|w| w.split_once('='))
                .map(|(name, pid)| (name.to_string(), pid.to_string()))
                .collect(),
            metrics: cli.metrics,
            peer: cli.peer,
            grpc: cli.grpc,
        };
        match cli.scenario {
            Scenario::Smoke {
                connections,
                rate,
                seconds,
            } => scenario::smoke(&ctx, connections, rate, seconds).await,
            Scenario::S1 { connections, hold } => scenario::s1(&ctx, connections, hold).await,
            Scenario::S2 {
                subscribers,
                pad,
                rates,
                seconds,
            } => scenario::s2(&ctx, subscribers, pad, &rates, seconds).await,
            Scenario::S3 {
                subscribers,
                rate,
                seconds,
                pad,
            } => scenario::s3(&ctx, subscribers, rate, seconds, pad).await,
            Scenario::S4 {
                connections,
                room_size,
                churn,
                rates,
                seconds,
            } => scenario::s4(&ctx, connections, room_size, churn, &rates, seconds).await,
            Scenario::S5 {
                subscribers,
                slow_percent,
                rate,
                seconds,
                pad,
            } => scenario::s5(&ctx, subscribers, slow_percent, rate, seconds, pad).await,
            Scenario::Cursors {
                users,
                moves,
                slow_percent,
                seconds,
            } => cursors::cursors(&ctx, users, moves, slow_percent, seconds).await,
            Scenario::S6 { rate, seconds } => events::s6(&ctx, rate, seconds).await,
            Scenario::PublishCost {
                publishers,
                channels,
                rates,
                seconds,
            } => publish_cost::publish_cost(&ctx, publishers, channels, &rates, seconds).await,
            Scenario::EventMemory {
                size,
                count,
                window,
                stalled,
                no_group,
                bound,
            } => events::event_memory(&ctx, size, count, window, stalled, !no_group, bound).await,
            Scenario::Soak {
                connections,
                seconds,
                churn,
                channels,
                rate,
                sample_every,
                csv,
                check,
            } => {
                let options = soak::Options {
                    connections,
                    seconds,
                    churn,
                    channels,
                    rate,
                    sample_every,
                    csv,
                    check,
                };
                soak::soak(&ctx, options).await
            }
            Scenario::Shard { .. } | Scenario::OtlpSink { .. } => unreachable!("served above"),
        }
    })
}
