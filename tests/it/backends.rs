//! The example backends of examples/backends, in Python (grpcio) and Go (google.golang.org/grpc),
//! each run as its own process against a real node: its event handler sees what a client does
//! and acknowledges it, its welcome publication reaches the client, its presence query finds
//! the client, its rpc answers arrive, and on SIGTERM it leaves the group cleanly.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use sidecast::pb::EventKind;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{ChildStdout, Command};

use crate::events::Member;
use crate::support::TestServer;

/// Python with grpc starts in a second or two, and Go builds from its cache in a few; this
/// only bounds a broken run.
const PATIENCE: Duration = Duration::from_secs(60);

const DIR: &str = env!("CARGO_MANIFEST_DIR");

#[tokio::test]
async fn python_backend_publishes_queries_presence_acknowledges_and_answers_rpcs() {
    let python = format!("{DIR}/examples/backends/python/.venv/bin/python");
    assert!(
        std::path::Path::new(&python).exists(),
        "examples/backends/python/.venv is missing: run the README's test command (scripts/test), which creates it"
    );
    let stubs_dir = tempfile::Builder::new()
        .prefix("sidecast-py-")
        .tempdir()
        .unwrap();
    let stubs = stubs_dir.path().to_str().unwrap();
    let generated = run(
        &python,
        &["-m", "grpc_tools.protoc", &format!("-I{DIR}/proto")],
    )
    .args([
        &format!("--python_out={stubs}"),
        &format!("--grpc_python_out={stubs}"),
        &format!("{DIR}/proto/sidecast/v1/control.proto"),
    ])
    .status()
    .await
    .unwrap();
    assert!(generated.success(), "protoc from grpcio-tools failed");
    let mut backend = run(
        &python,
        &[&format!("{DIR}/examples/backends/python/backend.py")],
    );
    backend.env("PYTHONPATH", stubs);
    exercise(backend, "py").await;
}

#[tokio::test]
async fn go_backend_publishes_queries_presence_acknowledges_and_answers_rpcs() {
    let out = tempfile::Builder::new()
        .prefix("sidecast-go-")
        .tempdir()
        .unwrap();
    let binary = out.path().join("backend");
    let built = tokio::time::timeout(
        Duration::from_secs(300),
        run("go", &["build", "-o", binary.to_str().unwrap(), "."])
            .current_dir(format!("{DIR}/examples/backends/go"))
            .status(),
    )
    .await
    .expect("go build ends (the first build downloads and compiles grpc)")
    .expect("Go is installed: scripts/test says which version");
    assert!(built.success(), "go build failed");
    exercise(run(binary.to_str().unwrap(), &[]), "go").await;
}

fn run(program: &str, args: &[&str]) -> Command {
    let mut command = Command::new(program);
    command.args(args).kill_on_drop(true);
    command
}

async fn line(lines: &mut Lines<BufReader<ChildStdout>>) -> Value {
    let line = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .expect("the backend prints in time")
        .unwrap()
        .expect("the backend is running");
    serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"))
}

/// The same scenario for each language: both backends behave, and print, identically.
async fn exercise(mut backend: Command, group: &str) {
    let server = TestServer::start_with_file(
        Some("[namespaces.room]\npublic = true\nallow_client_publish = true\npresence = true\n"),
        &[],
    )
    .await;
    let address = server.grpc_url.trim_start_matches("http://").to_string();
    let mut backend = backend
        .env("SIDECAST_GRPC", &address)
        .env("SIDECAST_GROUP", group)
        .stdout(Stdio::piped())
        .spawn()
        .expect("the backend starts");
    let mut lines = BufReader::new(backend.stdout.take().unwrap()).lines();
    assert_eq!(
        line(&mut lines).await,
        json!({"joined": group, "resumed": false, "buffered": 0})
    );

    let mut client = server.user("ann", json!({"meta": {"plan": "pro"}})).await;
    let c = client.client_id.clone();
    let c = c.as_str();
    client.subscribe(2, "room:a").await;
    // The backend handles the subscribe event by publishing a welcome to the channel.
    let welcome = client.recv().await;
    assert_eq!(
        welcome,
        json!({"type": "pub", "channel": "room:a", "data": {"welcome": "ann"}})
    );
    client
        .request(json!({"id": 3, "op": "publish", "channel": "room:a", "data": {"n": 1}}))
        .await;
    let echo = client
        .request(json!({"id": 4, "op": "rpc", "method": "app.echo", "data": {"x": 1}}))
        .await;
    assert_eq!(
        echo,
        json!({"id": 4, "result": {"data": {"echo": {"x": 1}, "user": "ann"}}})
    );
    let missing = client
        .request(json!({"id": 5, "op": "rpc", "method": "app.nope"}))
        .await;
    assert_eq!(missing["error"]["code"], "rpc_error", "{missing}");
    assert_eq!(missing["error"]["rpc_code"], 404, "{missing}");
    client
        .send_raw(tokio_tungstenite::tungstenite::Message::Close(None))
        .await;

    let expected = [
        json!({"seq": 1, "kind": "connect", "client": c, "user": "ann", "meta": {"plan": "pro"}}),
        json!({"seq": 2, "kind": "subscribe", "client": c, "user": "ann", "channel": "room:a"}),
        json!({"welcomed": "room:a", "offset": 0, "present": ["ann"]}),
        json!({"seq": 3, "kind": "publish", "client": c, "user": "ann", "channel": "room:a", "data": {"n": 1}}),
        json!({"seq": 0, "kind": "rpc", "client": c, "user": "ann", "method": "app.echo"}),
        json!({"seq": 0, "kind": "rpc", "client": c, "user": "ann", "method": "app.nope"}),
        json!({"seq": 4, "kind": "disconnect", "client": c, "user": "ann", "code": 1000}),
    ];
    for want in expected {
        assert_eq!(line(&mut lines).await, want);
    }

    // SIGTERM: the backend half-closes; sidecast applies its acks and ends the stream.
    let pid = backend.id().unwrap().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    assert_eq!(line(&mut lines).await, json!({"ended": "ok"}));
    let status = tokio::time::timeout(PATIENCE, backend.wait())
        .await
        .expect("the backend exits")
        .unwrap();
    assert!(status.success(), "{status:?}");
    // Everything it handled was acknowledged: the group it leaves behind is empty.
    let member = Member::join(&server, group, &[EventKind::Connect], 0).await;
    assert!(member.joined.resumed);
    assert_eq!(member.joined.buffered, 0);
}
