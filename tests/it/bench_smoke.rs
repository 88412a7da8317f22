//! The load generator keeps working: a short smoke run against sidecast and against the
//! Node `ws` peer. It asserts correctness (no loss, duplicates or reordering), never timings.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::support::{TestServer, SECRET};

/// The generator is a package of its own (bench/generator), built beside this test's own
/// binaries by scripts/test (`cargo build --locked -p sidecast-bench`).
pub fn generator() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let path = dir.join("sidecast-bench");
    assert!(
        path.exists(),
        "{} is missing: build it with cargo build --locked -p sidecast-bench (scripts/test does)",
        path.display()
    );
    path
}

fn smoke(args: &[String]) -> String {
    smoke_with(args, &[])
}

/// `sidecast-bench ARGS smoke SMOKE_ARGS`; fails unless it exits 0.
fn smoke_with(args: &[String], smoke_args: &[&str]) -> String {
    run_scenario(args, "smoke", smoke_args)
}

/// `sidecast-bench ARGS SCENARIO SCENARIO_ARGS`; fails unless it exits 0.
fn run_scenario(args: &[String], scenario: &str, scenario_args: &[&str]) -> String {
    let output = Command::new(generator())
        .args(args)
        .arg(scenario)
        .args(scenario_args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    succeeded(output)
}

/// A finished command's standard output; fails, showing both outputs, unless it exited 0.
fn succeeded(output: std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The generator's options that point it at `server`.
fn to(server: &TestServer) -> Vec<String> {
    vec![
        "--ws".to_string(),
        server.ws_addr.to_string(),
        "--grpc".into(),
        server.grpc_url.clone(),
        "--secret".into(),
        SECRET.into(),
    ]
}

#[tokio::test]
async fn generator_smoke_against_sidecast() {
    let server = TestServer::start(&[]).await;
    let mut args = to(&server);
    args.extend(["--metrics".into(), server.admin.to_string()]);
    let out = tokio::task::spawn_blocking(move || smoke(&args))
        .await
        .unwrap();
    assert!(out.contains("smoke: 1 passed, 0 failed"), "{out}");
    // Frames per socket write, read from /metrics around the window.
    assert!(out.contains(" frames per write"), "{out}");
    assert!(!out.contains(r#""frames_per_write":null"#), "{out}");
}

/// The live-cursors scenario against a node with its configuration (bench/cursors.toml):
/// moves published from the sockets reach everyone, slow readers included, with no close.
#[tokio::test]
async fn the_cursors_scenario_runs_against_its_configuration() {
    let file = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/bench/cursors.toml"))
        .unwrap();
    let server = TestServer::start_with_file(Some(&file), &[]).await;
    let args = to(&server);
    let scenario = [
        "--users",
        "5",
        "--moves",
        "20",
        "--slow-percent",
        "20",
        "--seconds",
        "2",
    ];
    let out = tokio::task::spawn_blocking(move || run_scenario(&args, "cursors", &scenario))
        .await
        .unwrap();
    let result: serde_json::Value = out
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .map(|r| serde_json::from_str(r).unwrap())
        .unwrap_or_else(|| panic!("no RESULT in {out}"));
    assert_eq!(result["closes"], 0, "{out}");
    assert_eq!(result["slow"], 1, "{out}");
    assert!(result["published"].as_u64().unwrap() > 0, "{out}");
    assert!(result["slow_received"].as_u64().unwrap() > 0, "{out}");
    assert!(
        result["received"].as_u64().unwrap() > result["slow_received"].as_u64().unwrap(),
        "{out}"
    );
}

/// `--processes 3`: two shard processes hold two thirds of the subscribers; every delivery
/// they saw is merged into the window, and each publication's time to its last subscriber
/// is known only once all three processes have reported it.
#[tokio::test]
async fn generator_smoke_over_several_processes() {
    let server = TestServer::start(&[]).await;
    let mut args = to(&server);
    args.extend(["--processes".into(), "3".into()]);
    let out = tokio::task::spawn_blocking(move || smoke_with(&args, &["--connections", "61"]))
        .await
        .unwrap();
    assert!(out.contains("smoke: 1 passed, 0 failed"), "{out}");
    let result: serde_json::Value = out
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .map(|json| serde_json::from_str(json).unwrap())
        .unwrap_or_else(|| panic!("no RESULT line: {out}"));
    let published = result["published"].as_u64().unwrap();
    assert!(published > 0, "{result}");
    assert_eq!(
        result["received"].as_u64(),
        Some(published * 61),
        "{result}"
    );
    assert!(result["last_p99_ms"].as_f64().unwrap() > 0.0, "{result}");
}

#[tokio::test]
async fn generator_smoke_against_the_node_ws_peer() {
    let dir = env!("CARGO_MANIFEST_DIR");
    assert!(
        std::path::Path::new(&format!("{dir}/bench/peers/node-ws/node_modules/ws")).exists(),
        "bench/peers/node-ws/node_modules is missing: run the README's test command (scripts/test)"
    );
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (ws, publish) = (free(), free());
    let mut peer = Command::new("node")
        .arg(format!("{dir}/bench/peers/node-ws/server.mjs"))
        .env("PORT", ws.to_string())
        .env("PUBLISH_PORT", publish.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The peer prints one line once both listeners are ready.
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(peer.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.contains("listening"), "{line}");
    let args = vec![
        "--ws".to_string(),
        format!("127.0.0.1:{ws}"),
        "--publish-http".into(),
        format!("127.0.0.1:{publish}"),
        "--peer".into(),
        "node-ws".into(),
    ];
    let out = tokio::task::spawn_blocking(move || smoke(&args))
        .await
        .unwrap();
    peer.kill().unwrap();
    let _ = peer.wait();
    assert!(out.contains("smoke: 1 passed, 0 failed"), "{out}");
}

/// bench/report.py turns a raw results file into BENCHMARKS.md's tables and the targets
/// against the floor (measured last before each run) and against Centrifugo.
#[test]
fn the_report_prints_each_target_against_the_floor_and_the_peer() {
    let stdout = report("2026-12-04-centrifugo-s3-s4.txt");
    for row in [
        // The single-frame cost against the bare write of the floor run just before it.
        "| S2 single-frame CPU per delivery, 1000 x 100/s | 7.78 µs = 1.15x floor | <= 1.25x | met | bare write 6.74 µs |",
        // S3 ran after the first floor run, so that one is its floor.
        "| S3 last of 10000 p99 at 10/s | 165 ms = 1.13x floor | <= 1.5x | met | floor's last frame p99 146 ms |",
        "| S4 publications per CPU-second vs Centrifugo's batch API, 5000/s | 2.03x | >= 2x | met |",
        "| S4 publications per CPU-second, stream vs unary, 5000/s | 1.19x | >= 5x | NOT met |",
        "| S1 memory per idle connection vs Centrifugo | 3,726 B = 0.041x | <= 0.33x | met | 89,912 B |",
        "| centrifugo (batch API) | 2000 | 10000 | 99,375 |",
    ] {
        assert!(stdout.contains(row), "missing {row:?} in:\n{stdout}");
    }
    // Coalescing under load: the single-frame rows come from the runs with it off, the
    // comparisons with Centrifugo from the defaults; a rate whose publisher was late for
    // more than 1% of its publications does not count as sustained.
    let stdout = report("2026-12-04-coalesce.txt");
    for row in [
        "| S2 single-frame CPU per delivery, 10000 x 10/s | 8.02 µs = 1.21x floor | <= 1.25x | met | bare write 6.65 µs |",
        "| s2 pad=20 1000 x 50/s: CPU per delivery vs Centrifugo | 0.51x | <= 0.67x | met | 8.03 against 15.90 µs |",
        "| highest sustained S2 deliveries/s vs Centrifugo | 199,295 = 2.00x | >= 3x | NOT met |",
    ] {
        assert!(stdout.contains(row), "missing {row:?} in:\n{stdout}");
    }
    let stdout = report("2026-12-04-coalesce-first-build.txt");
    let row = "| highest sustained S2 deliveries/s vs Centrifugo | 398,438 = 3.99x | >= 3x | met |";
    assert!(stdout.contains(row), "missing {row:?} in:\n{stdout}");
    // The generator's cost beside the floor's receiver, from the file whose floor prints it.
    let stdout = report("2026-12-04-generator-floor.txt");
    let row = "| sidecast | 1000 | 100 | 6.32 | 5.95 | 1.06x |";
    assert!(stdout.contains(row), "missing {row:?} in:\n{stdout}");
}

/// `python3 bench/report.py bench/results/FILE`'s output; fails unless it exits 0.
fn report(file: &str) -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let output = Command::new("python3")
        .arg(format!("{root}/bench/report.py"))
        .arg(format!("{root}/bench/results/{file}"))
        .output()
        .unwrap();
    succeeded(output)
}
