//! Measures what an idle connection costs sidecast, stage by stage: live heap bytes and
//! blocks (counted by a wrapper around the allocator the binary uses, mimalloc), resident
//! memory, and the kernel's slab.
//!
//!     cargo run --release --example memory_breakdown -- 5000
//!
//! The node runs in this process; the clients run in a child process (this same binary with
//! `--clients`), so only the server's allocations are counted. Stages: upgraded (no token
//! yet), authenticated, subscribed to a personal and a shared channel, after one command
//! round trip, and, given a second argument, after that many seconds of heartbeats (a ping
//! every second, answered at once):
//!
//!     cargo run --release --example memory_breakdown -- 5000 60

use std::alloc::{GlobalAlloc, Layout};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};

use futures_util::{SinkExt, StreamExt};
use mimalloc::MiMalloc;
use tokio_tungstenite::tungstenite::Message;

/// The binary's allocator, counting live bytes and blocks.
struct Counting;

static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);
static LIVE_BLOCKS: AtomicI64 = AtomicI64::new(0);

// The only unsafe code in the repository (unsafe_code is denied everywhere else): a
// GlobalAlloc is an unsafe trait, and this one only counts before calling mimalloc.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as i64, Relaxed);
        LIVE_BLOCKS.fetch_add(1, Relaxed);
        unsafe { MiMalloc.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as i64, Relaxed);
        LIVE_BLOCKS.fetch_sub(1, Relaxed);
        unsafe { MiMalloc.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as i64, Relaxed);
        LIVE_BLOCKS.fetch_add(1, Relaxed);
        unsafe { MiMalloc.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size as i64 - layout.size() as i64, Relaxed);
        unsafe { MiMalloc.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const SECRET: &str = "memory-breakdown";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--clients") {
        return clients(args[2].parse()?, &args[3]);
    }
    let n: usize = args.get(1).map(|a| a.parse()).transpose()?.unwrap_or(5000);
    let heartbeat_seconds: u64 = args.get(2).map(|a| a.parse()).transpose()?.unwrap_or(0);
    server(n, heartbeat_seconds)
}

fn kib(path: &str, field: &str) -> i64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(0)
        * 1024
}

struct Reading {
    heap: i64,
    blocks: i64,
    rss: i64,
    slab: i64,
}

fn read() -> Reading {
    Reading {
        heap: LIVE_BYTES.load(Relaxed),
        blocks: LIVE_BLOCKS.load(Relaxed),
        rss: kib("/proc/self/status", "VmRSS:"),
        slab: kib("/proc/meminfo", "Slab:"),
    }
}

fn server(n: usize, heartbeat_seconds: u64) -> Result<(), Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (ws_addr, shutdown) = runtime.block_on(async {
        let overrides = vec![
            ("token_hmac_secret".to_string(), SECRET.to_string()),
            ("connect_timeout".to_string(), "10m".to_string()),
            // With a heartbeat stage, a ping every second (answered by the clients' tasks).
            (
                "ping_interval".to_string(),
                if heartbeat_seconds > 0 { "1s" } else { "10m" }.to_string(),
            ),
            ("pong_timeout".to_string(), "500ms".to_string()),
        ];
        let config = sidecast::config::Config::from_layers(None, &[], &overrides).expect("config");
        let node = sidecast::node::Node::build(config.clone()).expect("node");
        println!("fixed state of one connection (size_of, bytes):");
        for (part, bytes) in sidecast::ws::connection_state_sizes(&node) {
            println!("  {bytes:>6}  {part}");
        }
        let listeners = sidecast::Listeners {
            ws: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            grpc: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            admin: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        };
        let ws_addr = listeners.ws.local_addr().unwrap();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let token = shutdown.clone();
        tokio::spawn(async move { sidecast::run(listeners, config, token).await.unwrap() });
        (ws_addr, shutdown)
    });
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--clients", &n.to_string(), &format!("ws://{ws_addr}/ws")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut to_child = child.stdin.take().unwrap();
    let mut from_child = BufReader::new(child.stdout.take().unwrap());
    let base = read();
    println!("memory per connection, {n} idle connections (server process only; kernel slab counts both ends)");
    println!(
        "{:<34} {:>10} {:>8} {:>10} {:>10}",
        "stage", "heap B", "blocks", "RSS B", "slab B"
    );
    let mut previous = Reading {
        heap: base.heap,
        blocks: base.blocks,
        rss: base.rss,
        slab: base.slab,
    };
    let mut stages = vec!["upgraded", "authenticated", "subscribed", "command"];
    if heartbeat_seconds > 0 {
        stages.push("pinged");
    }
    for stage in stages {
        if stage == "pinged" {
            std::thread::sleep(std::time::Duration::from_secs(heartbeat_seconds));
        }
        writeln!(to_child, "{stage}")?;
        let mut line = String::new();
        from_child.read_line(&mut line)?;
        let pings = line.trim().strip_prefix("ok ");
        let pings: f64 = pings
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("client stage {stage} failed: {line}"));
        let stage = match stage {
            "pinged" => format!("{:.1} pings", pings / n as f64),
            _ => stage.to_string(),
        };
        // Let the server finish what the last messages started (a reply is queued before it is written).
        std::thread::sleep(std::time::Duration::from_millis(300));
        let now = read();
        let per = |a: i64, b: i64| (a - b) as f64 / n as f64;
        println!(
            "{:<34} {:>+10.0} {:>+8.2} {:>+10.0} {:>+10.0}",
            format!("{stage} (this stage)"),
            per(now.heap, previous.heap),
            per(now.blocks, previous.blocks),
            per(now.rss, previous.rss),
            per(now.slab, previous.slab)
        );
        println!(
            "{:<34} {:>10.0} {:>8.2} {:>10.0} {:>10.0}",
            format!("{stage} (total)"),
            per(now.heap, base.heap),
            per(now.blocks, base.blocks),
            per(now.rss, base.rss),
            per(now.slab, base.slab)
        );
        previous = now;
    }
    writeln!(to_child, "quit")?;
    child.wait()?;
    shutdown.cancel();
    Ok(())
}

/// Client side: opens `n` connections, each a task that answers the server's heartbeat
/// pings at once, and advances them one stage per line on stdin.
fn clients(n: usize, url: &str) -> Result<(), Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // Stdin is read on a thread of its own: the connections' tasks must keep answering
        // pings while this process waits for the next stage.
        let (line_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                if line_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut conns = Vec::with_capacity(n);
        let pings = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        while let Some(Ok(stage)) = lines.recv().await {
            match stage.as_str() {
                "upgraded" => {
                    for i in 0..n {
                        let ws = tokio_tungstenite::connect_async(url).await?.0;
                        let (tx, rx) = tokio::sync::mpsc::channel(1);
                        conns.push((tx, tokio::spawn(client(i, ws, rx, pings.clone()))));
                    }
                }
                "authenticated" | "subscribed" | "command" => {
                    for (tx, _) in &conns {
                        let (done, ok) = tokio::sync::oneshot::channel();
                        tx.send((stage.clone(), done)).await?;
                        ok.await?;
                    }
                }
                // Pings are answered by the connections' tasks while the server waits.
                "pinged" => {}
                _ => return Ok(()),
            }
            println!("ok {}", pings.load(Relaxed));
        }
        Ok(())
    })
}

type Stage = (String, tokio::sync::oneshot::Sender<()>);
type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One connection: runs the stages it is sent and answers every `{"type":"ping"}` push with
/// a pong, so heartbeats go on between stages.
async fn client(
    i: usize,
    mut ws: Ws,
    mut stages: tokio::sync::mpsc::Receiver<Stage>,
    pings: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Result<(), String> {
    let mut pending: Option<(usize, tokio::sync::oneshot::Sender<()>)> = None;
    loop {
        tokio::select! {
            stage = stages.recv(), if pending.is_none() => {
                let Some((stage, done)) = stage else { return Ok(()) };
                let requests = match stage.as_str() {
                    "authenticated" => {
                        let claims = serde_json::json!({"sub": format!("u{i}"), "exp": sidecast::ws::unix_now() + 3600, "channels": ["user:*", "shared"]});
                        let token = jsonwebtoken::encode(
                            &jsonwebtoken::Header::default(),
                            &claims,
                            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
                        )
                        .map_err(|e| e.to_string())?;
                        vec![serde_json::json!({"id": 1, "op": "connect", "token": token})]
                    }
                    "subscribed" => vec![
                        serde_json::json!({"id": 2, "op": "subscribe", "channel": format!("user:{i}")}),
                        serde_json::json!({"id": 3, "op": "subscribe", "channel": "shared"}),
                    ],
                    _ => vec![serde_json::json!({"id": 4, "op": "ping"})],
                };
                for request in &requests {
                    ws.send(Message::text(request.to_string())).await.map_err(|e| e.to_string())?;
                }
                pending = Some((requests.len(), done));
            }
            message = ws.next() => {
                let message = message.ok_or("closed")?.map_err(|e| e.to_string())?;
                let Message::Text(text) = message else { continue };
                let reply: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
                if reply["type"] == "ping" {
                    pings.fetch_add(1, Relaxed);
                    ws.send(Message::text(r#"{"op":"pong"}"#)).await.map_err(|e| e.to_string())?;
                } else if reply.get("id").is_some() || reply["type"] == "connected" {
                    if reply.get("error").is_some() {
                        return Err(format!("stage failed: {text}"));
                    }
                    let (left, _) = pending.as_mut().ok_or("unexpected reply")?;
                    *left -= 1;
                    if *left == 0 {
                        let (_, done) = pending.take().unwrap();
                        let _ = done.send(());
                    }
                }
            }
        }
    }
}
