//! Another language: the example Python backend (examples/python/backend.py, grpcio, with
//! stubs generated from proto/ by this test) receives events, acknowledges them and answers
//! client rpcs.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use sidecast::pb::EventKind;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{ChildStdout, Command};

use crate::events::Member;
use crate::support::TestServer;

/// Python with grpc starts in a second or two; this only bounds a broken run.
const PYTHON_PATIENCE: Duration = Duration::from_secs(30);

async fn line(lines: &mut Lines<BufReader<ChildStdout>>) -> Value {
    let line = tokio::time::timeout(PYTHON_PATIENCE, lines.next_line())
        .await
        .expect("the backend prints in time")
        .unwrap()
        .expect("the backend is running");
    serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"))
}

#[tokio::test]
async fn python_backend_handles_events_acknowledges_and_answers_rpcs() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let python = format!("{dir}/tests/py/.venv/bin/python");
    assert!(
        std::path::Path::new(&python).exists(),
        "tests/py/.venv is missing: run the README's test command (scripts/test), which creates it"
    );
    let stubs_dir = tempfile::Builder::new()
        .prefix("sidecast-py-")
        .tempdir()
        .unwrap();
    let stubs = stubs_dir.path().to_str().unwrap().to_string();
    let generated = Command::new(&python)
        .args([
            "-m",
            "grpc_tools.protoc",
            &format!("-I{dir}/proto"),
            &format!("--python_out={stubs}"),
            &format!("--grpc_python_out={stubs}"),
            &format!("{dir}/proto/sidecast/v1/control.proto"),
        ])
        .status()
        .await
        .unwrap();
    assert!(generated.success(), "protoc from grpcio-tools failed");

    let server = TestServer::start_with_file(
        Some("[namespaces.room]\npublic = true\nallow_client_publish = true\n"),
        &[],
    )
    .await;
    let address = server.grpc_url.trim_start_matches("http://").to_string();
    let mut backend = Command::new(&python)
        .arg(format!("{dir}/examples/python/backend.py"))
        .env("PYTHONPATH", &stubs)
        .env("SIDECAST_GRPC", &address)
        .env("SIDECAST_GROUP", "py")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python starts");
    let mut lines = BufReader::new(backend.stdout.take().unwrap()).lines();
    assert_eq!(
        line(&mut lines).await,
        json!({"joined": "py", "resumed": false, "buffered": 0})
    );

    let mut client = server.user("ann", json!({"meta": {"plan": "pro"}})).await;
    client.subscribe(2, "room:a").await;
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
    let id = client.client_id.clone();
    client
        .send_raw(tokio_tungstenite::tungstenite::Message::Close(None))
        .await;

    let c = id.as_str();
    let expected = [
        json!({"seq": 1, "kind": "connect", "client": c, "user": "ann", "meta": {"plan": "pro"}}),
        json!({"seq": 2, "kind": "subscribe", "client": c, "user": "ann", "channel": "room:a"}),
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
    let status = tokio::time::timeout(PYTHON_PATIENCE, backend.wait())
        .await
        .expect("the backend exits")
        .unwrap();
    assert!(status.success(), "{status:?}");
    // Everything it handled was acknowledged: the group it leaves behind is empty.
    let member = Member::join(&server, "py", &[EventKind::Connect], 0).await;
    assert!(member.joined.resumed);
    assert_eq!(member.joined.buffered, 0);
}
