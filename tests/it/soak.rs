//! The soak, short: the `sidecast` binary with the soak's configuration under a fleet with
//! reconnect churn for 60 s (bench/soak runs the long one). The generator's `--check` is the
//! verdict: nothing lost or duplicated across the reconnects, presence and the event group
//! exact at the end, peak memory of the second half within the first's, and the node back
//! to its idle files and tasks once everyone has left. Counts and memory, never timings.

use std::process::Stdio;
use std::time::Duration;

use crate::bench_smoke::generator;
use crate::support::{eventually, free_port, SECRET};

#[tokio::test]
async fn a_minute_of_churn_loses_nothing_and_leaks_nothing() {
    let root = env!("CARGO_MANIFEST_DIR");
    let (ws, grpc, admin) = (free_port(), free_port(), free_port());
    let mut server = tokio::process::Command::new(env!("CARGO_BIN_EXE_sidecast"))
        .args(["--config", &format!("{root}/bench/soak.d/sidecast.toml")])
        .args(["--ws-addr", &format!("127.0.0.1:{ws}")])
        .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
        .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
        .env("SIDECAST_TOKEN_HMAC_SECRET", SECRET)
        .env("SIDECAST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let admin_addr: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    eventually("the binary serves /readyz", || async move {
        tokio::net::TcpStream::connect(admin_addr).await.is_ok()
    })
    .await;

    let run = tokio::process::Command::new(generator())
        .args(["--ws", &format!("127.0.0.1:{ws}")])
        .args(["--grpc", &format!("http://127.0.0.1:{grpc}")])
        .args(["--metrics", &format!("127.0.0.1:{admin}")])
        .args(["--server-pid", &server.id().unwrap().to_string()])
        .args(["--secret", SECRET])
        .args(["soak", "--seconds", "60", "--connections", "1000"])
        .args(["--churn", "50", "--channels", "100", "--rate", "100"])
        .args(["--sample-every", "5", "--check"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    // The run's own end phase waits at most two minutes more: a safety net, not a pace.
    let output = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("the soak ends")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("soak: every check passed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Every client came back at least once, recovering what it missed while away.
    assert!(stdout.contains(r#""unrecovered":0"#), "{stdout}");
    server.kill().await.unwrap();
}
