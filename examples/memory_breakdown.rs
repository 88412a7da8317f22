//! Measures what an idle connection costs sidecast, stage by stage: live heap bytes and
//! blocks (counted by a wrapper around the allocator the binary uses, mimalloc), resident
//! memory, and the kernel's slab.
//!
//!     cargo run --release --example memory_breakdown -- 5000
//!
//! The node runs in this process; the clients run in a child process (this same binary with
//! `--clients`), so only the server's allocations are counted. Stages: upgraded (no token
//! yet), authenticated, subscribed to a personal and a shared channel, and after one
//! heartbeat round trip.

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
    server(n)
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

fn server(n: usize) -> Result<(), Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (ws_addr, shutdown) = runtime.block_on(async {
        let overrides = vec![
            ("token_hmac_secret".to_string(), SECRET.to_string()),
            ("connect_timeout".to_string(), "10m".to_string()),
            ("ping_interval".to_string(), "10m".to_string()),
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
    for stage in ["upgraded", "authenticated", "subscribed", "heartbeat"] {
        writeln!(to_child, "{stage}")?;
        let mut line = String::new();
        from_child.read_line(&mut line)?;
        assert_eq!(line.trim(), "ok", "client stage {stage} failed: {line}");
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

/// Client side: opens `n` connections and advances them one stage per line on stdin.
fn clients(n: usize, url: &str) -> Result<(), Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let stdin = std::io::stdin();
        let mut lines = stdin.lock().lines();
        let mut conns = Vec::with_capacity(n);
        while let Some(Ok(stage)) = lines.next() {
            match stage.as_str() {
                "upgraded" => {
                    for _ in 0..n {
                        conns.push(tokio_tungstenite::connect_async(url).await?.0);
                    }
                }
                "authenticated" => {
                    let now = sidecast::ws::unix_now();
                    for (i, ws) in conns.iter_mut().enumerate() {
                        let claims = serde_json::json!({"sub": format!("u{i}"), "exp": now + 3600, "channels": ["user:*", "shared"]});
                        let token = jsonwebtoken::encode(
                            &jsonwebtoken::Header::default(),
                            &claims,
                            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
                        )?;
                        ws.send(Message::text(serde_json::json!({"id": 1, "op": "connect", "token": token}).to_string())).await?;
                        ws.next().await.ok_or("closed")??;
                    }
                }
                "subscribed" => {
                    for (i, ws) in conns.iter_mut().enumerate() {
                        for (id, channel) in [(2, format!("user:{i}")), (3, "shared".to_string())] {
                            ws.send(Message::text(serde_json::json!({"id": id, "op": "subscribe", "channel": channel}).to_string())).await?;
                            ws.next().await.ok_or("closed")??;
                        }
                    }
                }
                "heartbeat" => {
                    for ws in conns.iter_mut() {
                        ws.send(Message::text(r#"{"id":4,"op":"ping"}"#)).await?;
                        ws.next().await.ok_or("closed")??;
                    }
                }
                _ => return Ok(()),
            }
            println!("ok");
        }
        Ok(())
    })
}
